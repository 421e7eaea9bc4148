//! `Config::validate`: every setting checked before a worker starts, each
//! error naming its key.

use super::*;

impl Config {
    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_string(),
            message,
        };
        if self.queues.is_empty() && self.celery_queues.is_empty() {
            return Err(invalid(
                "queues",
                "at least one queue (or celery queue) is needed".into(),
            ));
        }
        for q in &self.queues {
            check_queue_name(q).map_err(|m| invalid("queues", m))?;
        }
        for q in &self.celery_queues {
            check_queue_name(q).map_err(|m| invalid("celery_queues", m))?;
            if self.queues.contains(q) {
                return Err(invalid(
                    "celery_queues",
                    format!("queue `{q}` is in `queues` too: a queue speaks one protocol"),
                ));
            }
            if *q == self.cpu_queue {
                return Err(invalid(
                    "celery_queues",
                    format!("queue `{q}` is the cpu_queue, which speaks taskmill's protocol"),
                ));
            }
        }
        for name in self.queue.keys() {
            check_queue_name(name).map_err(|m| invalid(&format!("queue.{name}"), m))?;
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1".into()));
        }
        if self.heartbeat_ms == 0 {
            return Err(invalid("heartbeat_ms", "must be at least 1".into()));
        }
        if self.lease_ms < self.heartbeat_ms.saturating_mul(2) {
            return Err(invalid(
                "lease_ms",
                format!(
                    "must be at least twice heartbeat_ms ({} ms), or one late heartbeat loses every lease",
                    self.heartbeat_ms
                ),
            ));
        }
        for (name, q) in &self.queue {
            if q.concurrency == Some(0) {
                return Err(invalid(
                    &format!("queue.{name}.concurrency"),
                    "must be at least 1".into(),
                ));
            }
        }
        if self.job_timeout_ms == 0 {
            return Err(invalid("job_timeout_ms", "must be positive".into()));
        }
        for (name, k) in &self.kind {
            if k.timeout_ms == Some(0) {
                return Err(invalid(
                    &format!("kind.{name}.timeout_ms"),
                    "must be positive".into(),
                ));
            }
        }
        if self.max_attempts == 0 {
            return Err(invalid("max_attempts", "must be at least 1".into()));
        }
        if !(self.backoff_factor >= 1.0 && self.backoff_factor.is_finite()) {
            return Err(invalid("backoff_factor", "must be a number >= 1".into()));
        }
        for (name, k) in &self.kind {
            if k.max_attempts == Some(0) {
                return Err(invalid(
                    &format!("kind.{name}.max_attempts"),
                    "must be at least 1".into(),
                ));
            }
            if k.backoff_factor
                .is_some_and(|f| !(f >= 1.0 && f.is_finite()))
            {
                return Err(invalid(
                    &format!("kind.{name}.backoff_factor"),
                    "must be a number >= 1".into(),
                ));
            }
        }
        check_queue_name(&self.cpu_queue).map_err(|m| invalid("cpu_queue", m))?;
        if self.max_payload_bytes == 0 {
            return Err(invalid("max_payload_bytes", "must be positive".into()));
        }
        self.check_prefetch_memory()?;
        if !(self.amqp_url.starts_with("amqp://") || self.amqp_url.starts_with("amqps://")) {
            return Err(invalid(
                "amqp_url",
                format!(
                    "must start with amqp:// or amqps://, got `{}`",
                    redact_url(&self.amqp_url)
                ),
            ));
        }
        Ok(())
    }
}

fn check_queue_name(q: &str) -> Result<(), String> {
    if q.is_empty() || q.len() > 200 {
        return Err(format!("queue name `{q}` must be 1 to 200 bytes"));
    }
    if q.starts_with("amq.") {
        return Err(format!(
            "queue name `{q}`: the amq. prefix is reserved by RabbitMQ"
        ));
    }
    if q.ends_with(".dead") {
        return Err(format!(
            "queue name `{q}`: names ending in .dead are dead-letter queues"
        ));
    }
    Ok(())
}
