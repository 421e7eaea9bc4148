//! The `TASKMILL_*` environment variables: one setter per configuration key,
//! and the variables read elsewhere that are not configuration keys.

use std::path::PathBuf;

use super::secrets::{FILE_ENV, ReadFile, read_secret};
use super::{Config, ConfigError};

type EnvSetter = fn(&mut Config, &str) -> Result<(), String>;

fn parse<T: std::str::FromStr>(v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.trim()
        .parse::<T>()
        .map_err(|e| format!("invalid value `{v}`: {e}"))
}

/// The `TASKMILL_*` variables that set configuration keys, with their setters.
const ENV_KEYS: &[(&str, EnvSetter)] = &[
    ("TASKMILL_AMQP_URL", |c, v| {
        c.amqp_url = v.to_string();
        Ok(())
    }),
    ("TASKMILL_AMQP_PASSWORD_FILE", |c, v| {
        c.amqp_password_file = Some(PathBuf::from(v));
        Ok(())
    }),
    ("TASKMILL_HTTP_ADDR", |c, v| {
        c.http_addr = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_QUEUES", |c, v| {
        c.queues = split_list(v);
        Ok(())
    }),
    ("TASKMILL_CELERY_QUEUES", |c, v| {
        c.celery_queues = split_list(v);
        Ok(())
    }),
    ("TASKMILL_QUEUE_TYPE", |c, v| {
        c.queue_type = v.parse()?;
        Ok(())
    }),
    ("TASKMILL_PREFETCH", |c, v| {
        c.prefetch = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_CONCURRENCY", |c, v| {
        c.concurrency = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_SHUTDOWN_GRACE_MS", |c, v| {
        c.shutdown_grace_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_JOB_TIMEOUT_MS", |c, v| {
        c.job_timeout_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_MAX_ATTEMPTS", |c, v| {
        c.max_attempts = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_BACKOFF_BASE_MS", |c, v| {
        c.backoff_base_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_BACKOFF_FACTOR", |c, v| {
        c.backoff_factor = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_JITTER", |c, v| {
        c.jitter = v.parse()?;
        Ok(())
    }),
    ("TASKMILL_BACKOFF_MAX_MS", |c, v| {
        c.backoff_max_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_STORE_RETENTION_HOURS", |c, v| {
        c.store_retention_hours = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_CPU_QUEUE", |c, v| {
        c.cpu_queue = v.to_string();
        Ok(())
    }),
    ("TASKMILL_CONSUME_WATCHDOG_MS", |c, v| {
        c.consume_watchdog_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_LEASE_MS", |c, v| {
        c.lease_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_HEARTBEAT_MS", |c, v| {
        c.heartbeat_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_BROKER_CONSUMER_TIMEOUT_MS", |c, v| {
        c.broker_consumer_timeout_ms = super::duration::parse_ms(v)?;
        Ok(())
    }),
    ("TASKMILL_MAX_PAYLOAD_BYTES", |c, v| {
        c.max_payload_bytes = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_MAX_PREFETCH_BYTES", |c, v| {
        c.max_prefetch_bytes = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_DELIVERY_LIMIT", |c, v| {
        c.delivery_limit = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_DATA_DIR", |c, v| {
        c.data_dir = PathBuf::from(v);
        Ok(())
    }),
    ("TASKMILL_STORE_URL", |c, v| {
        c.store_url = Some(v.to_string());
        Ok(())
    }),
    ("TASKMILL_STORE_PASSWORD_FILE", |c, v| {
        c.store_password_file = Some(PathBuf::from(v));
        Ok(())
    }),
    ("TASKMILL_CPU_PROCESSES", |c, v| {
        c.cpu_processes = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_CPU_RAYON_THREADS", |c, v| {
        c.cpu_rayon_threads = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_CPU_MAX_JOBS_PER_CHILD", |c, v| {
        c.cpu_max_jobs_per_child = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_CPU_MAX_RSS_MB", |c, v| {
        c.cpu_max_rss_mb = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_CPU_ADDRESS_SPACE_MB", |c, v| {
        c.cpu_address_space_mb = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_DIAGNOSTIC_KINDS", |c, v| {
        c.diagnostic_kinds = parse(v)?;
        Ok(())
    }),
    ("TASKMILL_WORKER_ID", |c, v| {
        c.worker_id = Some(v.to_string());
        Ok(())
    }),
    ("TASKMILL_LOG_FORMAT", |c, v| {
        c.log_format = v.parse()?;
        Ok(())
    }),
    ("TASKMILL_LOG_LEVEL", |c, v| {
        c.log_level = v.to_string();
        Ok(())
    }),
];

/// `TASKMILL_*` variables that are read elsewhere and are not config keys.
pub const OTHER_ENV: &[&str] = &[
    // The config file path itself.
    "TASKMILL_CONFIG",
    // Set by the worker for its CPU child processes.
    "TASKMILL_CPU_CHILD",
    "TASKMILL_CPU_MAX_FRAME_BYTES",
    // Read by the telemetry crate: which spans are exported.
    "TASKMILL_TRACE_FILTER",
    // Read by the diagnostic kind `test.effect`.
    "TASKMILL_EFFECTS_FILE",
    // Read by `taskmill bench celery`: the Python interpreter with Celery.
    "TASKMILL_BENCH_PYTHON",
];

/// Every environment variable that sets a configuration key, in documentation order.
pub fn env_keys() -> impl Iterator<Item = &'static str> {
    ENV_KEYS.iter().map(|(name, _)| *name)
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Config {
    /// Applies `TASKMILL_*` variables from `vars` over this configuration.
    /// A `*_FILE` variable of [`FILE_ENV`] sets its key from the file it
    /// names, read with `read`; giving both it and the plain variable is an
    /// error.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
        read: ReadFile<'_>,
    ) -> Result<(), ConfigError> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with("TASKMILL_"))
            .collect();
        for (name, value) in &vars {
            let set_from_file = FILE_ENV.iter().find(|(file_var, _)| file_var == name);
            let (target, value) = match set_from_file {
                Some((_, target)) => {
                    if vars.iter().any(|(n, _)| n == target) {
                        return Err(ConfigError::Env {
                            var: name.clone(),
                            message: format!("{target} is set too; set only one of them"),
                        });
                    }
                    (
                        *target,
                        read_secret(read, std::path::Path::new(value), name)?,
                    )
                }
                None => (name.as_str(), value.clone()),
            };
            if let Some((_, set)) = ENV_KEYS.iter().find(|(n, _)| *n == target) {
                set(self, &value).map_err(|message| ConfigError::Env {
                    var: name.clone(),
                    message,
                })?;
            } else if !OTHER_ENV.contains(&name.as_str()) {
                let known: Vec<&str> = env_keys()
                    .chain(FILE_ENV.iter().map(|(f, _)| *f))
                    .chain(OTHER_ENV.iter().copied())
                    .collect();
                return Err(ConfigError::UnknownEnv {
                    var: name.clone(),
                    known: known.join(", "),
                });
            }
        }
        Ok(())
    }
}

/// A file reader that finds no file: for callers (and tests) whose
/// environment sets no `*_FILE` variable.
pub fn no_files(path: &std::path::Path) -> std::io::Result<String> {
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{}: files are not read here", path.display()),
    ))
}
