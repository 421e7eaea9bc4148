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
use taskmill_core::wire::{EXCHANGE, dead_queue_name};

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
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }
}
