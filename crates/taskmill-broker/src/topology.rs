//! Idempotent declaration of the protocol's topology.
//!
//! For a queue `Q`: the durable direct exchange `taskmill`; the durable queue
//! `Q` bound under `Q`; the durable queue `Q.dead` bound under `Q.dead`. Quorum
//! work queues carry `x-delivery-limit` and dead-letter to `Q.dead` through the
//! exchange, so a message that kills workers before any outcome is recorded
//! ends in `Q.dead` instead of looping forever.

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use taskmill_core::config::QueueType;
use taskmill_core::wire::{
    DELAY_DELIVER_EXCHANGE, DELAY_LEVELS, DELAY_TICK, EXCHANGE, dead_queue_name,
    delay_deliver_pattern, delay_exchange, delay_level_pattern,
};

use crate::connection::{Broker, BrokerError};

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

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

impl Broker {
    /// Declares the exchange, `spec`'s queue and its dead-letter queue, and
    /// their bindings. Safe to call from many workers at once.
    pub async fn declare(&self, spec: &QueueSpec) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
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

        let dead = dead_queue_name(&spec.name);
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long(spec.queue_type.as_str()));
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long(spec.queue_type.as_str()));
        if spec.queue_type == QueueType::Quorum {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(spec.delivery_limit)),
            );
            args.insert("x-dead-letter-exchange".into(), long(EXCHANGE));
            args.insert("x-dead-letter-routing-key".into(), long(&dead));
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for (name, args) in [(&dead, dead_args), (&spec.name, args)] {
            ch.queue_declare(name.as_str().into(), durable, args)
                .await
                .map_err(BrokerError::op(format!("queue.declare {name}")))?;
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
        Ok(())
    }

    /// Declares a queue served in Celery mode the way Celery (kombu) declares
    /// its `Queue(name)`: a durable direct exchange named like the queue, the
    /// durable queue with no arguments (classic) or only `x-queue-type:
    /// quorum`, bound under its name. So a Celery producer or worker that
    /// declares it too gets no PRECONDITION_FAILED. Celery producers publish
    /// to the default exchange with the queue name as routing key, which needs
    /// no binding. taskmill adds bindings (additive, invisible to Celery):
    /// from the delay ladder's delivery exchange (ETAs and retries) and from
    /// `taskmill` under the queue name (`taskmill dlq replay`); and declares
    /// `Q.dead` as for a taskmill queue. Idempotent.
    pub async fn declare_celery(&self, spec: &QueueSpec) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
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
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut args = FieldTable::default();
        if spec.queue_type == QueueType::Quorum {
            args.insert("x-queue-type".into(), long(QueueType::Quorum.as_str()));
        }
        ch.queue_declare(spec.name.as_str().into(), durable, args)
            .await
            .map_err(BrokerError::op(format!("queue.declare {}", spec.name)))?;
        let dead = dead_queue_name(&spec.name);
        let mut dead_args = FieldTable::default();
        dead_args.insert("x-queue-type".into(), long(spec.queue_type.as_str()));
        ch.queue_declare(dead.as_str().into(), durable, dead_args)
            .await
            .map_err(BrokerError::op(format!("queue.declare {dead}")))?;
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
        Ok(())
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
