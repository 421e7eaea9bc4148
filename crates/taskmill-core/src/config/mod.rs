//! Worker configuration.
//!
//! Precedence, lowest first: built-in defaults < TOML file (`--config` or
//! `TASKMILL_CONFIG`) < `TASKMILL_*` environment variables < command-line flags.
//! Every setting has a default that works against a local broker. Unknown keys in
//! the file are errors naming the key and its line; unknown `TASKMILL_*`
//! variables are errors too, so a typo never silently falls back to a default.
//! `docs/configuration.md` documents every key.
//!
//! Layout: here the types and the file's parsing; `validate` holds the
//! checks (`Config::validate`); `env` holds the `TASKMILL_*` variable table
//! and its application; `secrets` reads secret-bearing settings from files
//! (`TASKMILL_*_URL_FILE`, `*_password_file`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::redact::redact_url;
use crate::retry::{Jitter, RetryPolicy};
use crate::wire::DEFAULT_QUEUE;

mod duration;
mod env;
mod secrets;
mod validate;

pub use duration::parse_ms;
pub use env::{OTHER_ENV, env_keys, no_files};
pub use secrets::{FILE_ENV, ReadFile, with_password};

/// The type of the work queues the worker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, durable Raft queues: the safe default.
    Quorum,
    /// Classic queues: faster on one node, not replicated.
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!("expected `quorum` or `classic`, got `{other}`")),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected `text` or `json`, got `{other}`")),
        }
    }
}

/// Settings of one queue (`[queue.NAME]` in the file); unset fields take the
/// worker-wide value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Unacknowledged deliveries the broker may push to this worker (basic.qos).
    pub prefetch: Option<u16>,
    /// Jobs of this queue that run at once.
    pub concurrency: Option<usize>,
    /// Queue type for this queue.
    pub queue_type: Option<QueueType>,
}

/// Settings of one job kind (`[kind."NAME"]` in the file); unset fields take
/// the worker-wide value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    /// Hard timeout of one attempt, in milliseconds.
    #[serde(deserialize_with = "duration::opt_ms", alias = "timeout", default)]
    pub timeout_ms: Option<u64>,
    /// Attempts in all, the first included.
    pub max_attempts: Option<u32>,
    /// Backoff after the first failure, in milliseconds.
    #[serde(deserialize_with = "duration::opt_ms", alias = "backoff_base", default)]
    pub backoff_base_ms: Option<u64>,
    /// Backoff growth per further failure.
    pub backoff_factor: Option<f64>,
    /// Largest backoff, in milliseconds.
    #[serde(deserialize_with = "duration::opt_ms", alias = "backoff_max", default)]
    pub backoff_max_ms: Option<u64>,
    /// Backoff randomisation: `full`, `equal` or `none`.
    pub jitter: Option<Jitter>,
}

/// The effective configuration of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// AMQP URL of the broker; a vhost in the path is honoured (`%2f` is `/`).
    pub amqp_url: String,
    /// A file holding the broker password, put into `amqp_url`'s user-info
    /// at start-up (`amqp_url` then names the user and no password).
    pub amqp_password_file: Option<PathBuf>,
    /// Address of the HTTP endpoint serving `/metrics`, `/healthz`, `/readyz`.
    pub http_addr: SocketAddr,
    /// Queues this worker consumes, in taskmill's protocol.
    pub queues: Vec<String>,
    /// Queues this worker consumes in Celery mode: Celery protocol v2 task
    /// messages in, results to the client's `rpc://` reply queue out
    /// (`docs/protocol.md`, "Celery producers"). Declared as Celery declares
    /// a queue: classic (or quorum when `[queue.NAME] queue_type` says so),
    /// bound to an exchange of the same name.
    pub celery_queues: Vec<String>,
    /// Type of the queues the worker declares.
    pub queue_type: QueueType,
    /// Default prefetch (basic.qos) per queue; 0 means "same as concurrency".
    pub prefetch: u16,
    /// Default number of jobs run at once per queue.
    pub concurrency: usize,
    /// On SIGTERM/SIGINT, how long in-flight jobs may run before the rest is
    /// left to the broker for redelivery.
    #[serde(deserialize_with = "duration::ms", alias = "shutdown_grace")]
    pub shutdown_grace_ms: u64,
    /// Default hard timeout of one attempt of a job (IO or CPU kind).
    #[serde(deserialize_with = "duration::ms", alias = "job_timeout")]
    pub job_timeout_ms: u64,
    /// Attempts in all for a job whose errors are retryable (first included).
    pub max_attempts: u32,
    /// Backoff after the first failure, in milliseconds.
    #[serde(deserialize_with = "duration::ms", alias = "backoff_base")]
    pub backoff_base_ms: u64,
    /// Backoff growth per further failure.
    pub backoff_factor: f64,
    /// Largest backoff, in milliseconds.
    #[serde(deserialize_with = "duration::ms", alias = "backoff_max")]
    pub backoff_max_ms: u64,
    /// Backoff randomisation: `full` (default), `equal` or `none`.
    pub jitter: Jitter,
    /// How long a completed or failed idempotency key is remembered, in hours.
    pub store_retention_hours: u64,
    /// The queue consumed for CPU jobs when CPU kinds are registered; its
    /// prefetch and concurrency follow the CPU pool size.
    pub cpu_queue: String,
    /// Readiness turns false when a queue has ready messages, none of its
    /// jobs runs and nothing was delivered for this long (0: off).
    #[serde(deserialize_with = "duration::ms", alias = "consume_watchdog")]
    pub consume_watchdog_ms: u64,
    /// The lease a claim on an idempotency key takes, in milliseconds; the
    /// worker renews it on every heartbeat while the job runs, so a worker
    /// that dies loses its keys within this long.
    #[serde(deserialize_with = "duration::ms", alias = "lease")]
    pub lease_ms: u64,
    /// Time between heartbeats, in milliseconds: each renews every lease the
    /// worker holds and its registry row, in one store call. The worker
    /// counts as dead after three missed heartbeats.
    #[serde(deserialize_with = "duration::ms", alias = "heartbeat")]
    pub heartbeat_ms: u64,
    /// The broker's consumer timeout (RabbitMQ's `consumer_timeout`, 30 min
    /// by default), in milliseconds: a job whose timeout may outlast it is
    /// parked in the store and acked before it runs (0: never ack early).
    #[serde(deserialize_with = "duration::ms", alias = "broker_consumer_timeout")]
    pub broker_consumer_timeout_ms: u64,
    /// Largest accepted payload; larger jobs are refused at enqueue and
    /// dead-lettered at consume.
    pub max_payload_bytes: usize,
    /// Most payload bytes one queue's prefetch window may hold in memory:
    /// each queue's prefetch × `max_payload_bytes` must stay within it, so a
    /// burst of the largest accepted messages cannot exhaust the worker.
    pub max_prefetch_bytes: u64,
    /// Quorum queues: deliveries of one message before the broker dead-letters
    /// it to `Q.dead` (guards against messages that kill workers).
    pub delivery_limit: u32,
    /// Directory for the embedded store and scratch files.
    pub data_dir: PathBuf,
    /// Idempotency and result store: `sqlite://FILE` or `postgres://...`.
    /// Unset: a SQLite file `taskmill.db` in `data_dir`.
    pub store_url: Option<String>,
    /// A file holding the PostgreSQL password, put into `store_url`'s
    /// user-info at start-up.
    pub store_password_file: Option<PathBuf>,
    /// Local CPU worker processes; 0 means one per core.
    pub cpu_processes: usize,
    /// Rayon threads inside each CPU worker process; 0 means
    /// max(1, cores / cpu_processes), so processes × threads never
    /// oversubscribe the cores.
    pub cpu_rayon_threads: usize,
    /// Replace a CPU worker process after this many jobs (0: never).
    pub cpu_max_jobs_per_child: u64,
    /// Replace a CPU worker process whose resident memory exceeds this many
    /// MiB, checked between jobs (0: no limit).
    pub cpu_max_rss_mb: u64,
    /// Address-space limit (RLIMIT_AS) of each CPU worker process in MiB; an
    /// allocation beyond it fails inside the job (0: no limit).
    pub cpu_address_space_mb: u64,
    /// Enables the diagnostic kinds (`test.fail`, `test.cpu_fail`, `test.effect`,
    /// `test.crash`, `test.panic`,
    /// `test.spin`) used by smoke tests; off in production.
    pub diagnostic_kinds: bool,
    /// Name of this worker in logs and dead-letter headers; default host-pid.
    pub worker_id: Option<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (`info`, `taskmill=debug,lapin=warn`, ...).
    pub log_level: String,
    /// Per-queue settings.
    pub queue: BTreeMap<String, QueueConfig>,
    /// Per-kind settings.
    pub kind: BTreeMap<String, KindConfig>,
}

/// Default of [`Config::max_prefetch_bytes`]: 256 MiB, which the defaults
/// (prefetch = concurrency = 100, 1 MiB payloads) stay well within.
pub const DEFAULT_MAX_PREFETCH_BYTES: u64 = 256 * 1024 * 1024;

/// Default AMQP URL: the local broker with the guest account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp_url: DEFAULT_AMQP_URL.to_string(),
            amqp_password_file: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            queues: vec![DEFAULT_QUEUE.to_string()],
            celery_queues: Vec::new(),
            queue_type: QueueType::Quorum,
            prefetch: 0,
            concurrency: 100,
            shutdown_grace_ms: 30_000,
            job_timeout_ms: 300_000,
            max_attempts: 5,
            backoff_base_ms: 1_000,
            backoff_factor: 2.0,
            backoff_max_ms: 300_000,
            jitter: Jitter::Full,
            store_retention_hours: 24 * 7,
            cpu_queue: "cpu".to_string(),
            consume_watchdog_ms: 60_000,
            lease_ms: 15_000,
            heartbeat_ms: 2_000,
            broker_consumer_timeout_ms: 1_800_000,
            max_payload_bytes: 1024 * 1024,
            max_prefetch_bytes: DEFAULT_MAX_PREFETCH_BYTES,
            delivery_limit: 20,
            data_dir: PathBuf::from("data"),
            store_url: None,
            store_password_file: None,
            cpu_processes: 0,
            cpu_rayon_threads: 0,
            cpu_max_jobs_per_child: 0,
            cpu_max_rss_mb: 0,
            cpu_address_space_mb: 0,
            diagnostic_kinds: false,
            worker_id: None,
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            queue: BTreeMap::new(),
            kind: BTreeMap::new(),
        }
    }
}

/// A configuration that cannot be used, with the key (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML or has an unknown key or a wrong type; the
    /// message names the key, line and column.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment variable has a value that does not parse.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A `TASKMILL_*` variable that taskmill does not know (a typo?).
    #[error("unknown environment variable {var}; known: {known}")]
    UnknownEnv {
        /// The variable.
        var: String,
        /// The known names.
        known: String,
    },
    /// A value that parsed but is not allowed.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Parses a TOML document read from `path` (the caller reads the file;
    /// `path` only names it in errors). Errors name the file, key and line.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Checks that no queue's prefetch window can hold more than
    /// `max_prefetch_bytes` of payload: the broker pushes up to `prefetch`
    /// unacked deliveries, each up to `max_payload_bytes`, before the worker
    /// refuses any of them. The error names the key that sets the prefetch.
    fn check_prefetch_memory(&self) -> Result<(), ConfigError> {
        let payload = u64::try_from(self.max_payload_bytes).unwrap_or(u64::MAX);
        let mut named: Vec<&String> = self.queues.iter().chain(&self.celery_queues).collect();
        named.extend(self.queue.keys());
        for name in named {
            let own = self.queue.get(name).cloned().unwrap_or_default();
            let (prefetch, key) = if *name == self.cpu_queue && own.prefetch.is_none() {
                // The CPU queue's prefetch follows the pool (two jobs per
                // process); with one process per core (0) the size is only
                // known at start-up, so only a configured size is checked.
                let processes = own.concurrency.unwrap_or(self.cpu_processes);
                if processes == 0 {
                    continue;
                }
                let prefetch = u16::try_from(processes.saturating_mul(2)).unwrap_or(u16::MAX);
                (prefetch, "cpu_processes".to_string())
            } else {
                let key = match (own.prefetch, self.prefetch) {
                    (Some(_), _) => format!("queue.{name}.prefetch"),
                    (None, 0) if own.concurrency.is_some() => {
                        format!("queue.{name}.concurrency")
                    }
                    (None, 0) => "concurrency".to_string(),
                    (None, _) => "prefetch".to_string(),
                };
                (self.queue_settings(name).prefetch, key)
            };
            let window = u64::from(prefetch).saturating_mul(payload);
            if window > self.max_prefetch_bytes {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "queue `{name}` may hold a prefetch of {prefetch} × max_payload_bytes {} = {window} bytes in memory, over max_prefetch_bytes {}; lower the prefetch or max_payload_bytes, or raise max_prefetch_bytes",
                        self.max_payload_bytes, self.max_prefetch_bytes
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether `queue` is served in Celery mode.
    pub fn is_celery_queue(&self, queue: &str) -> bool {
        self.celery_queues.iter().any(|q| q == queue)
    }

    /// The effective settings of `queue`.
    pub fn queue_settings(&self, queue: &str) -> QueueSettings {
        let q = self.queue.get(queue).cloned().unwrap_or_default();
        let concurrency = q.concurrency.unwrap_or(self.concurrency);
        let prefetch = q.prefetch.unwrap_or(self.prefetch);
        let prefetch = if prefetch == 0 {
            u16::try_from(concurrency).unwrap_or(u16::MAX)
        } else {
            prefetch
        };
        // A Celery queue is declared as Celery declares it: classic unless
        // its own table says quorum; the worker-wide type does not apply.
        let default_type = if self.is_celery_queue(queue) {
            QueueType::Classic
        } else {
            self.queue_type
        };
        QueueSettings {
            name: queue.to_string(),
            prefetch,
            concurrency,
            queue_type: q.queue_type.unwrap_or(default_type),
        }
    }

    /// The hard timeout of one attempt of `kind`.
    pub fn kind_timeout(&self, kind: &str) -> std::time::Duration {
        let ms = self
            .kind
            .get(kind)
            .and_then(|k| k.timeout_ms)
            .unwrap_or(self.job_timeout_ms);
        std::time::Duration::from_millis(ms)
    }

    /// The store URL: configured, or a SQLite file in `data_dir`.
    pub fn store_url(&self) -> String {
        self.store_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("taskmill.db").display()))
    }

    /// The retry policy of `kind`.
    pub fn retry_policy(&self, kind: &str) -> RetryPolicy {
        let k = self.kind.get(kind).cloned().unwrap_or_default();
        RetryPolicy {
            max_attempts: k.max_attempts.unwrap_or(self.max_attempts).max(1),
            base: std::time::Duration::from_millis(
                k.backoff_base_ms.unwrap_or(self.backoff_base_ms),
            ),
            factor: k.backoff_factor.unwrap_or(self.backoff_factor),
            cap: std::time::Duration::from_millis(k.backoff_max_ms.unwrap_or(self.backoff_max_ms)),
            jitter: k.jitter.unwrap_or(self.jitter),
        }
    }

    /// The worker id: configured, or `default()` (the caller reads the host
    /// name and pid, e.g. `taskmill_broker::default_worker_id`).
    pub fn worker_id(&self, default: impl FnOnce() -> String) -> String {
        self.worker_id.clone().unwrap_or_else(default)
    }

    /// The configuration as TOML with every secret redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(&self.redacted())
            .unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// A copy with every secret redacted (what `config show` prints).
    pub fn redacted(&self) -> Config {
        let mut shown = self.clone();
        shown.amqp_url = redact_url(&shown.amqp_url);
        shown.store_url = shown.store_url.as_deref().map(redact_url);
        shown
    }
}

/// The resolved settings of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// Queue name.
    pub name: String,
    /// basic.qos prefetch.
    pub prefetch: u16,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Queue type.
    pub queue_type: QueueType,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        let q = c.queue_settings("default");
        assert_eq!(q.prefetch, 100);
        assert_eq!(q.queue_type, QueueType::Quorum);
    }

    #[test]
    fn prefetch_memory_is_bounded_per_queue() {
        // Defaults: prefetch follows concurrency (100) × 1 MiB = 100 MiB.
        let c = Config::default();
        assert_eq!(c.max_prefetch_bytes, 256 * 1024 * 1024);
        c.validate().unwrap();

        let invalid = |c: &Config| match c.validate() {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected Invalid, got {other:?}"),
        };
        let mut c = Config {
            queues: vec!["big".into()],
            ..Config::default()
        };
        c.queue.insert(
            "big".into(),
            QueueConfig {
                prefetch: Some(300),
                ..QueueConfig::default()
            },
        );
        let (key, message) = invalid(&c);
        assert_eq!(key, "queue.big.prefetch");
        for part in ["`big`", "300", "1048576", "314572800", "268435456"] {
            assert!(message.contains(part), "{part} missing from {message}");
        }
        c.max_prefetch_bytes = 300 * 1024 * 1024;
        c.validate().unwrap();

        // The worker-wide prefetch, and a prefetch that follows concurrency.
        let mut c = Config {
            prefetch: 500,
            ..Config::default()
        };
        assert_eq!(invalid(&c).0, "prefetch");
        c.prefetch = 0;
        c.concurrency = 257;
        assert_eq!(invalid(&c).0, "concurrency");
        c.concurrency = 256;
        c.validate().unwrap();
        c.max_payload_bytes = 1024 * 1024 + 1;
        assert_eq!(invalid(&c).0, "concurrency");

        // The CPU queue: two jobs per configured process.
        let mut c = Config {
            queues: vec!["default".into(), "cpu".into()],
            cpu_processes: 129,
            ..Config::default()
        };
        assert_eq!(invalid(&c).0, "cpu_processes");
        c.cpu_processes = 0;
        c.validate().unwrap();

        let mut c = Config::default();
        c.apply_env(
            [("TASKMILL_MAX_PREFETCH_BYTES".into(), "1000".into())],
            &no_files,
        )
        .unwrap();
        assert_eq!(c.max_prefetch_bytes, 1000);
        assert_eq!(invalid(&c).0, "concurrency");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::from_toml(
            "amqp_url = \"amqp://x\"\n\nprefetch_count = 5\n",
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("prefetch_count"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("w.toml"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err = Config::from_toml("[queue.default]\nprefetch = \"ten\"\n", Path::new("w.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("prefetch"), "{err}");
    }

    #[test]
    fn precedence_file_then_env() {
        let mut c = Config::from_toml(
            "queues = [\"a\", \"b\"]\nconcurrency = 7\n[queue.b]\nconcurrency = 3\nqueue_type = \"classic\"\n",
            Path::new("w.toml"),
        )
        .unwrap();
        assert_eq!(c.queue_settings("b").concurrency, 3);
        assert_eq!(c.queue_settings("a").concurrency, 7);
        c.apply_env(
            [
                ("TASKMILL_QUEUES".to_string(), "x, y".to_string()),
                ("TASKMILL_CONCURRENCY".to_string(), "9".to_string()),
                ("PATH".to_string(), "/bin".to_string()),
            ],
            &no_files,
        )
        .unwrap();
        assert_eq!(c.queues, vec!["x", "y"]);
        assert_eq!(c.queue_settings("x").concurrency, 9);
        assert_eq!(c.queue_settings("b").queue_type, QueueType::Classic);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let mut c = Config::default();
        let err = c
            .apply_env(
                [("TASKMILL_PREFETCH".to_string(), "lots".to_string())],
                &no_files,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TASKMILL_PREFETCH") && err.contains("lots"),
            "{err}"
        );
        let err = c
            .apply_env([("TASKMILL_QUEUE".to_string(), "x".to_string())], &no_files)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown environment variable TASKMILL_QUEUE"),
            "{err}"
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        let c = Config {
            queues: vec!["jobs.dead".into()],
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("`queues`"));
        let c = Config {
            amqp_url: "http://u:pw@host".into(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("amqp_url") && !err.contains("pw"), "{err}");
    }

    #[test]
    fn celery_queues_from_file_env_and_checks() {
        let mut c = Config::from_toml(
            "celery_queues = [\"celery\"]\n[queue.celery]\nconcurrency = 4\n",
            Path::new("w.toml"),
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.is_celery_queue("celery") && !c.is_celery_queue("default"));
        let s = c.queue_settings("celery");
        assert_eq!((s.concurrency, s.queue_type), (4, QueueType::Classic));
        assert_eq!(c.queue_settings("default").queue_type, QueueType::Quorum);
        c.apply_env(
            [
                (
                    "TASKMILL_CELERY_QUEUES".to_string(),
                    "reports, mail".to_string(),
                ),
                ("TASKMILL_QUEUES".to_string(), String::new()),
            ],
            &no_files,
        )
        .unwrap();
        assert_eq!(c.celery_queues, vec!["reports", "mail"]);
        c.validate().unwrap();
        let both = Config {
            celery_queues: vec!["default".into()],
            ..Config::default()
        };
        let err = both.validate().unwrap_err().to_string();
        assert!(
            err.contains("celery_queues") && err.contains("one protocol"),
            "{err}"
        );
        let none = Config {
            queues: Vec::new(),
            ..Config::default()
        };
        assert!(none.validate().is_err());
    }

    #[test]
    fn show_redacts_password_and_round_trips() {
        let c = Config {
            amqp_url: "amqp://app:hunter2@rabbit:5672/prod".into(),
            store_url: Some("postgres://app:pgsecret@db/jobs".into()),
            ..Config::default()
        };
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("pgsecret"), "{shown}");
        let back = Config::from_toml(&shown, Path::new("shown.toml")).unwrap();
        assert_eq!(back.queues, c.queues);
    }
}
