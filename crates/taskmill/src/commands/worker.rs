//! `taskmill worker`.

use std::process::ExitCode;

use taskmill_core::config::Config;
use taskmill_worker::WorkerBuilder;

/// Runs a worker with the built-in kinds until SIGTERM/SIGINT; exits 0 after
/// the drain.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let worker =
        crate::kinds::register(WorkerBuilder::new(config.clone()), config.diagnostic_kinds)
            .build()?;
    let shutdown = taskmill_worker::signal::shutdown_on_signals();
    let handle = worker.start(shutdown).await?;
    handle.wait().await?;
    Ok(ExitCode::SUCCESS)
}
