//! Idempotent declaration of the protocol's topology.
//!
//! For a queue `Q`: the durable direct exchange `taskmill`; the durable queue
//! `Q` bound under `Q`; the durable queue `Q.dead` bound under `Q.dead`. Quorum
//! work queues carry `x-delivery-limit` and dead-letter to `Q.dead` through the
//! exchange, so a message that kills workers before any outcome is recorded
//! ends in `Q.dead` instead of looping forever.
//!
//! Arguments follow the broker ([`BrokerInfo`]): where it can, a quorum
//! work queue dead-letters at-least-once (`x-dead-letter-strategy:
//! at-least-once`, which needs `x-overflow: reject-publish`), and a quorum
//! `Q.dead` has its delivery limit switched off (`x-delivery-limit: -1`) on
//! brokers that give quorum queues one by default (RabbitMQ 4.0+: 20), so
//! requeues while browsing never drop a dead letter.
//!
//! **Queues declared by older versions.** RabbitMQ refuses to redeclare a
//! queue with different arguments (PRECONDITION_FAILED), and AMQP cannot read
//! a queue's arguments. So each queue is declared with a list of argument
//! sets, newest first, ending with exactly what earlier taskmill versions
//! declared: a new queue gets the newest; an existing one is redeclared with
//! the set it was created with, is reported in [`Declared::legacy_arguments`]
//! and logged, and keeps working. Migrating it is an operator's step (see
//! [`Declared::legacy_arguments`]).

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use taskmill_core::config::QueueType;
use taskmill_core::wire::{
    DELAY_DELIVER_EXCHANGE, DELAY_LEVELS, DELAY_TICK, EXCHANGE, dead_queue_name,
    delay_deliver_pattern, delay_exchange, delay_level_pattern,
};

use crate::broker_info::BrokerInfo;
use crate::connection::{Broker, BrokerError};
use crate::error::is_soft_error;

/// What to declare for one work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Queue name (also its routing key).
    pub name: String,
    /// Queue type.
    pub queue_type: QueueType,
    /// Quorum queues: deliveries before the broker dead-letters a message.
    pub delivery_limit: u32,
}

/// Declaration choices beyond the [`QueueSpec`], for
/// [`Broker::declare_with`] and [`Broker::declare_celery_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclareOptions {
    /// `x-consumer-timeout` on the work queue: how long a delivery may stay
    /// unacked before the broker closes the consumer's channel, instead of
    /// the broker-wide `consumer_timeout`. Applied only where the broker
    /// supports it ([`BrokerInfo::supports_per_queue_consumer_timeout`],
    /// RabbitMQ 3.12+); [`Declared::consumer_timeout_applied`] says whether it
    /// was. `None`: the broker-wide timeout.
    pub consumer_timeout: Option<Duration>,
}

/// What a declaration did, beyond succeeding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// Queues that already existed with the arguments of an older taskmill
    /// version and kept them (they work as before, without the newer
    /// arguments). To migrate one: drain it and delete it so the next worker
    /// declares it anew, or (dead-letter strategy, delivery limit, consumer
    /// timeout) set the equivalent policy keys (`dead-letter-strategy`,
    /// `overflow`, `delivery-limit`, `consumer-timeout`) with
    /// `rabbitmqctl set_policy`; policies apply to existing queues.
    pub legacy_arguments: Vec<String>,
    /// Whether the work queue carries the requested `x-consumer-timeout`.
    pub consumer_timeout_applied: bool,
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

/// One set of queue arguments, in declaration order (easy to compare in tests).
pub(crate) type Args = Vec<(&'static str, AMQPValue)>;

const CONSUMER_TIMEOUT: &str = "x-consumer-timeout";

fn table(args: &Args) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn has(args: &Args, key: &str) -> bool {
    args.iter().any(|(k, _)| *k == key)
}

/// The argument sets to try for a queue, newest first, ending with `legacy`:
/// `preferred`, `preferred` without the consumer timeout, `legacy` with it,
/// `legacy`; duplicates removed. The consumer timeout is the extra most
/// likely to change between runs, so the other new arguments are kept when
/// only it differs.
fn candidates(legacy: Args, extra: Args, timeout: Option<AMQPValue>) -> Vec<Args> {
    let with_timeout = |base: &Args| {
        let mut a = base.clone();
        if let Some(t) = &timeout {
            a.push((CONSUMER_TIMEOUT, t.clone()));
        }
        a
    };
    let mut newest = legacy.clone();
    newest.extend(extra);
    let mut out: Vec<Args> = Vec::new();
    for a in [with_timeout(&newest), newest, with_timeout(&legacy), legacy] {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// `x-consumer-timeout`, when asked for and supported.
fn consumer_timeout(info: &BrokerInfo, opts: &DeclareOptions) -> Option<AMQPValue> {
    let t = opts.consumer_timeout?;
    info.supports_per_queue_consumer_timeout()
        .then(|| AMQPValue::LongLongInt(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)))
}

/// At-least-once dead-lettering, where the broker has it (quorum only).
fn at_least_once(info: &BrokerInfo) -> Args {
    if info.supports_at_least_once_dead_lettering() {
        vec![
            ("x-dead-letter-strategy", long("at-least-once")),
            ("x-overflow", long("reject-publish")),
        ]
    } else {
        Vec::new()
    }
}

/// Argument sets for a taskmill work queue.
pub(crate) fn work_queue_arguments(
    spec: &QueueSpec,
    info: &BrokerInfo,
    opts: &DeclareOptions,
) -> Vec<Args> {
    let mut legacy: Args = vec![("x-queue-type", long(spec.queue_type.as_str()))];
    let mut extra = Vec::new();
    if spec.queue_type == QueueType::Quorum {
        legacy.push((
            "x-delivery-limit",
            AMQPValue::LongLongInt(i64::from(spec.delivery_limit)),
        ));
        legacy.push(("x-dead-letter-exchange", long(EXCHANGE)));
        legacy.push((
            "x-dead-letter-routing-key",
            long(&dead_queue_name(&spec.name)),
        ));
        extra = at_least_once(info);
    }
    candidates(legacy, extra, consumer_timeout(info, opts))
}

/// Argument sets for `Q.dead`: never a delivery limit, so browsing (which
/// returns messages) cannot make the broker drop a dead letter.
pub(crate) fn dead_queue_arguments(spec: &QueueSpec, info: &BrokerInfo) -> Vec<Args> {
    let legacy: Args = vec![("x-queue-type", long(spec.queue_type.as_str()))];
    let mut extra = Vec::new();
    if spec.queue_type == QueueType::Quorum && info.quorum_delivery_limit_default().is_some() {
        // -1 switches the 4.x default limit off.
        extra.push(("x-delivery-limit", AMQPValue::LongLongInt(-1)));
    }
    candidates(legacy, extra, None)
}

/// Argument sets for a Celery queue: what kombu declares (nothing, or only
/// `x-queue-type: quorum`) last; first, on quorum, the same dead-lettering
/// to `Q.dead` as a taskmill queue, so a message the broker gives up on
/// (the 4.x default delivery limit, a reject) is kept, not dropped.
pub(crate) fn celery_queue_arguments(
    spec: &QueueSpec,
    info: &BrokerInfo,
    opts: &DeclareOptions,
) -> Vec<Args> {
    let mut legacy: Args = Vec::new();
    let mut extra: Args = Vec::new();
    if spec.queue_type == QueueType::Quorum {
        legacy.push(("x-queue-type", long(QueueType::Quorum.as_str())));
        extra.push(("x-dead-letter-exchange", long(EXCHANGE)));
        extra.push((
            "x-dead-letter-routing-key",
            long(&dead_queue_name(&spec.name)),
        ));
        extra.extend(at_least_once(info));
    }
    candidates(legacy, extra, consumer_timeout(info, opts))
}

impl Broker {
    /// Declares `name` durable with the first of `sets` the broker accepts
    /// (see the module doc), reopening `ch` after each refusal (it closes the
    /// channel). Returns the accepted set; the error of the first refusal if
    /// none is accepted.
    async fn declare_queue(
        &self,
        ch: &mut lapin::Channel,
        name: &str,
        sets: &[Args],
        declared: &mut Declared,
    ) -> Result<Args, BrokerError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut first_refusal = None;
        for (i, args) in sets.iter().enumerate() {
            match ch.queue_declare(name.into(), durable, table(args)).await {
                Ok(_) => {
                    if i > 0 {
                        tracing::warn!(
                            queue = name,
                            refused = %first_refusal.as_ref().map(ToString::to_string).unwrap_or_default(),
                            "queue exists with older arguments and keeps them; delete it or use a policy to migrate"
                        );
                        declared.legacy_arguments.push(name.to_string());
                    }
                    return Ok(args.clone());
                }
                Err(e) if is_soft_error(&e, lapin::protocol::AMQPSoftError::PRECONDITIONFAILED) => {
                    first_refusal.get_or_insert(e);
                    *ch = self.channel().await?;
                }
                Err(e) => return Err(BrokerError::op(format!("queue.declare {name}"))(e)),
            }
        }
        Err(BrokerError::op(format!("queue.declare {name}"))(
            first_refusal.expect("at least one argument set"),
        ))
    }

    /// Declares the exchange, `spec`'s queue and its dead-letter queue, and
    /// their bindings. Safe to call from many workers at once.
    pub async fn declare(&self, spec: &QueueSpec) -> Result<Declared, BrokerError> {
        self.declare_with(spec, &DeclareOptions::default()).await
    }

    /// [`Broker::declare`] with `opts`.
    pub async fn declare_with(
        &self,
        spec: &QueueSpec,
        opts: &DeclareOptions,
    ) -> Result<Declared, BrokerError> {
        let mut ch = self.channel().await?;
        ch.exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::op(format!("exchange.declare {EXCHANGE}")))?;

        let info = self.info();
        let dead = dead_queue_name(&spec.name);
        let mut declared = Declared::default();
        for (name, sets) in [
            (&dead, dead_queue_arguments(spec, info)),
            (&spec.name, work_queue_arguments(spec, info, opts)),
        ] {
            let accepted = self
                .declare_queue(&mut ch, name, &sets, &mut declared)
                .await?;
            if *name == spec.name {
                declared.consumer_timeout_applied = has(&accepted, CONSUMER_TIMEOUT);
            }
            ch.queue_bind(
                name.as_str().into(),
                EXCHANGE.into(),
                name.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("queue.bind {name}")))?;
        }
        // Delayed copies (retries, `enqueue --delay`) reach the queue through
        // the delay ladder's delivery exchange.
        ch.queue_bind(
            spec.name.as_str().into(),
            DELAY_DELIVER_EXCHANGE.into(),
            delay_deliver_pattern(&spec.name).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::op(format!(
            "queue.bind {} to {DELAY_DELIVER_EXCHANGE}",
            spec.name
        )))?;
        let _ = ch.close(200, "declared".into()).await;
        Ok(declared)
    }

    /// Declares a queue served in Celery mode the way Celery (kombu) declares
    /// its `Queue(name)`: a durable direct exchange named like the queue, the
    /// durable queue with no arguments (classic) or only `x-queue-type:
    /// quorum`, bound under its name. So a Celery producer or worker that
    /// declares it too gets no PRECONDITION_FAILED. Except: a *new* quorum
    /// queue also dead-letters to `Q.dead` like a taskmill queue
    /// (`x-dead-letter-exchange: taskmill`, `x-dead-letter-routing-key:
    /// Q.dead`, at-least-once where supported), so a Celery app that declares
    /// it must pass the same `queue_arguments`; an existing one keeps kombu's
    /// arguments ([`Declared::legacy_arguments`]). Celery producers publish
    /// to the default exchange with the queue name as routing key, which needs
    /// no binding. taskmill adds bindings (additive, invisible to Celery):
    /// from the delay ladder's delivery exchange (ETAs and retries) and from
    /// `taskmill` under the queue name (`taskmill dlq replay`); and declares
    /// `Q.dead` as for a taskmill queue. Idempotent.
    pub async fn declare_celery(&self, spec: &QueueSpec) -> Result<Declared, BrokerError> {
        self.declare_celery_with(spec, &DeclareOptions::default())
            .await
    }

    /// [`Broker::declare_celery`] with `opts`.
    pub async fn declare_celery_with(
        &self,
        spec: &QueueSpec,
        opts: &DeclareOptions,
    ) -> Result<Declared, BrokerError> {
        let mut ch = self.channel().await?;
        let durable_direct = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for ex in [EXCHANGE, spec.name.as_str()] {
            ch.exchange_declare(
                ex.into(),
                ExchangeKind::Direct,
                durable_direct,
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("exchange.declare {ex}")))?;
        }
        let info = self.info();
        let mut declared = Declared::default();
        let accepted = self
            .declare_queue(
                &mut ch,
                &spec.name,
                &celery_queue_arguments(spec, info, opts),
                &mut declared,
            )
            .await?;
        declared.consumer_timeout_applied = has(&accepted, CONSUMER_TIMEOUT);
        let dead = dead_queue_name(&spec.name);
        self.declare_queue(
            &mut ch,
            &dead,
            &dead_queue_arguments(spec, info),
            &mut declared,
        )
        .await?;
        let delay_pattern = delay_deliver_pattern(&spec.name);
        let bindings = [
            (spec.name.as_str(), spec.name.as_str(), spec.name.as_str()),
            (spec.name.as_str(), EXCHANGE, spec.name.as_str()),
            (
                spec.name.as_str(),
                DELAY_DELIVER_EXCHANGE,
                delay_pattern.as_str(),
            ),
            (dead.as_str(), EXCHANGE, dead.as_str()),
        ];
        for (queue, exchange, key) in bindings {
            ch.queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("queue.bind {queue} to {exchange}")))?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(declared)
    }

    /// Declares the delay ladder: for each level `n` a topic exchange and a
    /// queue holding messages `DELAY_TICK × 2^n` (queue-level TTL, so every
    /// message in a queue expires in order at its head), dead-lettering to the
    /// next lower level, level 0 to the delivery exchange. A message's routing
    /// key selects the levels it waits in. Idempotent. The ladder is shared by
    /// every queue of the vhost, so its type is fixed: quorum queues, which
    /// dead-letter at-least-once (a delayed job is never dropped between levels).
    pub async fn declare_delays(&self) -> Result<(), BrokerError> {
        let queue_type = QueueType::Quorum;
        let ch = self.channel().await?;
        let durable_ex = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let exchanges = std::iter::once(DELAY_DELIVER_EXCHANGE.to_string())
            .chain((0..DELAY_LEVELS).map(delay_exchange));
        for ex in exchanges {
            ch.exchange_declare(
                ex.as_str().into(),
                ExchangeKind::Topic,
                durable_ex,
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("exchange.declare {ex}")))?;
        }
        for level in 0..DELAY_LEVELS {
            let name = delay_exchange(level);
            let next = if level == 0 {
                DELAY_DELIVER_EXCHANGE.to_string()
            } else {
                delay_exchange(level - 1)
            };
            let ttl_ms = (DELAY_TICK.as_millis() as i64) << level;
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), long(queue_type.as_str()));
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms));
            args.insert("x-dead-letter-exchange".into(), long(&next));
            if queue_type == QueueType::Quorum {
                args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
                args.insert("x-overflow".into(), long("reject-publish"));
            }
            ch.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(BrokerError::op(format!("queue.declare {name}")))?;
            ch.queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                delay_level_pattern(level, true).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("queue.bind {name}")))?;
            ch.exchange_bind(
                next.as_str().into(),
                name.as_str().into(),
                delay_level_pattern(level, false).into(),
                lapin::options::ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("exchange.bind {next} <- {name}")))?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    fn rabbit(version: &str) -> BrokerInfo {
        let mut props = FieldTable::default();
        props.insert("product".into(), long("RabbitMQ"));
        props.insert("version".into(), long(version));
        BrokerInfo::from_server_properties(&props)
    }

    fn spec(queue_type: QueueType) -> QueueSpec {
        QueueSpec {
            name: "jobs".to_string(),
            queue_type,
            delivery_limit: 20,
        }
    }

    fn keys(args: &Args) -> Vec<&'static str> {
        args.iter().map(|(k, _)| *k).collect()
    }

    fn value<'a>(args: &'a Args, key: &str) -> &'a AMQPValue {
        &args.iter().find(|(k, _)| *k == key).unwrap().1
    }

    const LEGACY_QUORUM: [&str; 4] = [
        "x-queue-type",
        "x-delivery-limit",
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
    ];

    #[test]
    fn quorum_work_queues_dead_letter_at_least_once_where_supported() {
        let none = DeclareOptions::default();
        let sets = work_queue_arguments(&spec(QueueType::Quorum), &rabbit("3.10.8"), &none);
        assert_eq!(sets.len(), 2);
        let mut newest = LEGACY_QUORUM.to_vec();
        newest.extend(["x-dead-letter-strategy", "x-overflow"]);
        assert_eq!(keys(&sets[0]), newest);
        assert_eq!(
            value(&sets[0], "x-dead-letter-strategy"),
            &long("at-least-once")
        );
        assert_eq!(value(&sets[0], "x-overflow"), &long("reject-publish"));
        assert_eq!(
            value(&sets[0], "x-dead-letter-routing-key"),
            &long("jobs.dead")
        );
        // The last set is exactly what earlier versions declared.
        assert_eq!(keys(&sets[1]), LEGACY_QUORUM);

        let old = work_queue_arguments(&spec(QueueType::Quorum), &rabbit("3.9.29"), &none);
        assert_eq!(old.len(), 1);
        assert_eq!(keys(&old[0]), LEGACY_QUORUM);
    }

    #[test]
    fn consumer_timeout_is_declared_only_where_supported() {
        let opts = DeclareOptions {
            consumer_timeout: Some(Duration::from_secs(3600)),
        };
        let classic = spec(QueueType::Classic);
        let sets = work_queue_arguments(&classic, &rabbit("3.12.0"), &opts);
        assert_eq!(sets.len(), 2);
        assert_eq!(keys(&sets[0]), ["x-queue-type", CONSUMER_TIMEOUT]);
        assert_eq!(
            value(&sets[0], CONSUMER_TIMEOUT),
            &AMQPValue::LongLongInt(3_600_000)
        );
        assert_eq!(keys(&sets[1]), ["x-queue-type"]);
        assert_eq!(
            work_queue_arguments(&classic, &rabbit("3.11.0"), &opts).len(),
            1
        );

        // Quorum on 4.x: every combination, newest first, legacy last.
        let sets = work_queue_arguments(&spec(QueueType::Quorum), &rabbit("4.0.1"), &opts);
        assert_eq!(sets.len(), 4);
        assert!(has(&sets[0], CONSUMER_TIMEOUT) && has(&sets[0], "x-dead-letter-strategy"));
        assert!(!has(&sets[1], CONSUMER_TIMEOUT) && has(&sets[1], "x-dead-letter-strategy"));
        assert!(has(&sets[2], CONSUMER_TIMEOUT) && !has(&sets[2], "x-dead-letter-strategy"));
        assert_eq!(keys(&sets[3]), LEGACY_QUORUM);
    }

    #[test]
    fn dead_queues_have_no_delivery_limit() {
        let quorum = spec(QueueType::Quorum);
        let v4 = dead_queue_arguments(&quorum, &rabbit("4.0.0"));
        assert_eq!(keys(&v4[0]), ["x-queue-type", "x-delivery-limit"]);
        assert_eq!(
            value(&v4[0], "x-delivery-limit"),
            &AMQPValue::LongLongInt(-1)
        );
        assert_eq!(keys(&v4[1]), ["x-queue-type"]);
        // Before 4.0 quorum queues have no default limit: nothing to switch off.
        let v3 = dead_queue_arguments(&quorum, &rabbit("3.13.7"));
        assert_eq!(v3.len(), 1);
        assert_eq!(keys(&v3[0]), ["x-queue-type"]);
        let classic = dead_queue_arguments(&spec(QueueType::Classic), &rabbit("4.0.0"));
        assert_eq!(classic.len(), 1);
        assert_eq!(value(&classic[0], "x-queue-type"), &long("classic"));
    }

    #[test]
    fn quorum_celery_queues_dead_letter_like_taskmill_queues() {
        let none = DeclareOptions::default();
        let sets = celery_queue_arguments(&spec(QueueType::Quorum), &rabbit("3.10.8"), &none);
        assert_eq!(
            keys(&sets[0]),
            [
                "x-queue-type",
                "x-dead-letter-exchange",
                "x-dead-letter-routing-key",
                "x-dead-letter-strategy",
                "x-overflow"
            ]
        );
        assert_eq!(value(&sets[0], "x-dead-letter-exchange"), &long(EXCHANGE));
        assert_eq!(
            value(&sets[0], "x-dead-letter-routing-key"),
            &long("jobs.dead")
        );
        // What kombu declares for a quorum queue.
        assert_eq!(keys(&sets[1]), ["x-queue-type"]);
        // A classic Celery queue stays exactly kombu's: no arguments.
        let classic = celery_queue_arguments(&spec(QueueType::Classic), &rabbit("4.0.0"), &none);
        assert_eq!(classic, vec![Vec::new()]);
    }
}
