//! Arguments and configuration loading.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use taskmill_core::config::{Config, LogFormat, QueueType};

use crate::commands;

/// taskmill: a task-queue worker on RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "taskmill", version, about)]
pub struct Cli {
    /// TOML config file. Env vars override it, flags override both.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// AMQP URL of the broker. A password given here is
    /// readable by every local user in /proc/PID/cmdline: give it with
    /// TASKMILL_AMQP_URL_FILE or amqp_password_file instead.
    #[arg(long, global = true, value_name = "URL")]
    pub amqp_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a worker: consume the configured queues until SIGTERM/SIGINT.
    Worker(WorkerArgs),
    /// Publish jobs (with publisher confirms) and print their ids.
    Enqueue(commands::enqueue::EnqueueArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Start a worker in-process, run a mixed workload and print a summary.
    Demo(commands::demo::DemoArgs),
    /// Measure throughput and latency against the raw broker ceiling.
    Bench(commands::bench::BenchArgs),
    /// Inspect, replay and purge dead letters.
    Dlq(commands::dlq::DlqArgs),
    /// Print a shell completion script (`taskmill completions bash >
    /// /etc/bash_completion.d/taskmill`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man pages (roff) of taskmill and of each subcommand.
    Man,
}

/// `--queue-type`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueTypeArg {
    /// Replicated, durable Raft queues.
    Quorum,
    /// Classic queues: faster on one node, not replicated.
    Classic,
}

impl From<QueueTypeArg> for QueueType {
    fn from(a: QueueTypeArg) -> QueueType {
        match a {
            QueueTypeArg::Quorum => QueueType::Quorum,
            QueueTypeArg::Classic => QueueType::Classic,
        }
    }
}

/// `--log-format`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(a: LogFormatArg) -> LogFormat {
        match a {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// `taskmill config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration as TOML (or JSON), secrets
    /// redacted, and the file it was read from.
    Show {
        /// Print one JSON object: `{"file": PATH or null, "config": {...}}`.
        #[arg(long)]
        json: bool,
    },
    /// Print every TASKMILL_* environment variable that sets a key (and the
    /// TASKMILL_*_URL_FILE variables that set one from a file).
    Keys,
}

/// Worker flags; each overrides the file and the environment.
#[derive(Debug, Args, Default)]
pub struct WorkerArgs {
    /// Queue to consume (repeatable; replaces TASKMILL_QUEUES).
    #[arg(long = "queue", value_name = "QUEUE")]
    pub queues: Vec<String>,
    /// Queue to consume in Celery mode: Celery protocol v2 tasks, results to
    /// the client's rpc:// backend (repeatable; replaces TASKMILL_CELERY_QUEUES).
    #[arg(long = "celery-queue", value_name = "QUEUE")]
    pub celery_queues: Vec<String>,
    /// Address of the /metrics, /healthz, /readyz endpoint.
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Jobs run at once per queue.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// basic.qos prefetch per queue (0: same as concurrency).
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// Queue type to declare.
    #[arg(long, value_enum)]
    pub queue_type: Option<QueueTypeArg>,
    /// Drain grace on shutdown: milliseconds or a duration (`45s`).
    #[arg(long, value_name = "DURATION", value_parser = taskmill_core::config::parse_ms)]
    pub shutdown_grace_ms: Option<u64>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,
}

/// Loads the configuration: defaults < file < env < global flags.
pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let file = config_file(cli);
    let mut config = match &file {
        Some(path) => read_config_file(path)?,
        None => Config::default(),
    };
    let read: taskmill_core::config::ReadFile<'_> = &|p| std::fs::read_to_string(p);
    config.apply_env(std::env::vars(), read)?;
    if let Some(url) = &cli.amqp_url {
        if !taskmill_core::redact::secret_spans(url).is_empty() {
            eprintln!(
                "warning: the password in --amqp-url is visible to every local user in \
                 /proc/{}/cmdline; give it with TASKMILL_AMQP_URL_FILE or amqp_password_file",
                std::process::id()
            );
        }
        config.amqp_url = url.clone();
    }
    config.resolve_secrets(read)?;
    Ok(config)
}

/// The config file to read: `--config`, else `TASKMILL_CONFIG`, else the
/// first that exists of `./taskmill.toml`,
/// `$XDG_CONFIG_HOME/taskmill/taskmill.toml` (`~/.config` when unset) and
/// `/etc/taskmill/taskmill.toml`; `None` when there is none (defaults and
/// the environment only).
pub fn config_file(cli: &Cli) -> Option<PathBuf> {
    if let Some(p) = &cli.config {
        return Some(p.clone());
    }
    if let Some(p) = std::env::var_os("TASKMILL_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    default_config_paths().into_iter().find(|p| p.is_file())
}

/// Where a config file is looked for when none is named, in order.
pub fn default_config_paths() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("taskmill.toml")];
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(dir) = xdg {
        paths.push(dir.join("taskmill").join("taskmill.toml"));
    }
    paths.push(PathBuf::from("/etc/taskmill/taskmill.toml"));
    paths
}

/// Reads the TOML file at `path` and parses it. Core only parses (it does
/// no IO); the errors still name the file, and for a bad key its line.
fn read_config_file(path: &std::path::Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        crate::report::UsageError(format!("cannot read config file {}: {e}", path.display()))
    })?;
    Ok(Config::from_toml(&text, path)?)
}

fn apply_worker_flags(config: &mut Config, args: &WorkerArgs) {
    if !args.queues.is_empty() {
        config.queues = args.queues.clone();
    }
    if !args.celery_queues.is_empty() {
        config.celery_queues = args.celery_queues.clone();
    }
    if let Some(a) = args.http_addr {
        config.http_addr = a;
    }
    if let Some(c) = args.concurrency {
        config.concurrency = c;
    }
    if let Some(p) = args.prefetch {
        config.prefetch = p;
    }
    if let Some(t) = args.queue_type {
        config.queue_type = t.into();
    }
    if let Some(g) = args.shutdown_grace_ms {
        config.shutdown_grace_ms = g;
    }
    if let Some(f) = args.log_format {
        config.log_format = f.into();
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let matches = crate::help::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli) {
        Ok(code) => code,
        Err(e) => crate::report::report(&e),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = crate::help::command();
            clap_complete::generate(*shell, &mut cmd, "taskmill", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            crate::help::man_pages(&mut std::io::stdout()).context("writing the man pages")?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let mut config = load_config(&cli)?;
    if let Command::Worker(args) = &cli.command {
        apply_worker_flags(&mut config, args);
    }
    match &cli.command {
        Command::Config(ConfigCommand::Show { json }) => {
            config.validate()?;
            let file = config_file(&cli);
            if *json {
                let shown = serde_json::json!({
                    "file": file.as_ref().map(|f| f.display().to_string()),
                    "config": config.redacted(),
                });
                println!("{shown}");
            } else {
                match &file {
                    Some(f) => println!("# read from {}", f.display()),
                    None => println!("# no config file: defaults and the environment"),
                }
                print!("{}", config.to_redacted_toml());
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Config(ConfigCommand::Keys) => {
            for k in taskmill_core::config::env_keys() {
                println!("{k}");
            }
            for (file_var, _) in taskmill_core::config::FILE_ENV {
                println!("{file_var}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    // The tools report a broker failure once, as their error; lapin's own
    // ERROR lines about the same failure would only repeat it (unless the
    // filter names lapin).
    let tool = matches!(cli.command, Command::Enqueue(_) | Command::Dlq(_));
    let log_level = if tool && !config.log_level.contains("lapin") {
        format!("{},lapin=off", config.log_level)
    } else {
        config.log_level.clone()
    };
    taskmill_telemetry::logging::init(
        config.log_format == taskmill_core::config::LogFormat::Json,
        &log_level,
    )
    .map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Worker(_) => commands::worker::run(config).await,
            Command::Enqueue(args) => commands::enqueue::run(config, args).await,
            Command::Demo(args) => commands::demo::run(config, args).await,
            Command::Bench(args) => commands::bench::run(config, args).await,
            Command::Dlq(args) => commands::dlq::run(config, args).await,
            Command::Config(_) | Command::Completions { .. } | Command::Man => {
                unreachable!("handled above")
            }
        }
    });
    // Send the last spans before the process exits.
    taskmill_telemetry::logging::shutdown();
    result
}
