//! Arguments and configuration loading.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use taskmill_core::config::{Config, QueueType};

use crate::commands;

/// taskmill: a task-queue worker on RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "taskmill", version, about)]
pub struct Cli {
    /// TOML config file (also TASKMILL_CONFIG). Env vars override it, flags override both.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// AMQP URL of the broker (TASKMILL_AMQP_URL). A password given here is
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
}

/// `taskmill config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration as TOML, secrets redacted.
    Show,
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
    /// Queue type to declare: quorum or classic.
    #[arg(long)]
    pub queue_type: Option<QueueType>,
    /// Drain grace on shutdown, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<taskmill_core::config::LogFormat>,
}

/// Loads the configuration: defaults < file < env < global flags.
pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let file = cli
        .config
        .clone()
        .or_else(|| std::env::var_os("TASKMILL_CONFIG").map(PathBuf::from));
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
        config.queue_type = t;
    }
    if let Some(g) = args.shutdown_grace_ms {
        config.shutdown_grace_ms = g;
    }
    if let Some(f) = args.log_format {
        config.log_format = f;
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => crate::report::report(&e),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = load_config(&cli)?;
    if let Command::Worker(args) = &cli.command {
        apply_worker_flags(&mut config, args);
    }
    match &cli.command {
        Command::Config(ConfigCommand::Show) => {
            config.validate()?;
            print!("{}", config.to_redacted_toml());
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
            Command::Config(_) => unreachable!("handled above"),
        }
    });
    // Send the last spans before the process exits.
    taskmill_telemetry::logging::shutdown();
    result
}
