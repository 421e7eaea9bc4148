//! The clap command with each flag's environment variable and default in
//! its help (`[env: TASKMILL_CONCURRENCY] [default: 100]`), taken from the
//! configuration's own table and defaults so the help cannot drift from what
//! the worker does. clap's `env`/`default_value` are not used for these: a
//! flag that always had a value would override the file and the environment.
//! The same command feeds the shell completions and the man page.

use clap::CommandFactory;
use taskmill_core::config::Config;

use crate::cli::Cli;

/// `(arg id, environment variable, default)` of the flags that set config keys.
fn worker_flags(d: &Config) -> Vec<(&'static str, &'static str, String)> {
    vec![
        ("queues", "TASKMILL_QUEUES", d.queues.join(",")),
        ("celery_queues", "TASKMILL_CELERY_QUEUES", "none".into()),
        ("http_addr", "TASKMILL_HTTP_ADDR", d.http_addr.to_string()),
        (
            "concurrency",
            "TASKMILL_CONCURRENCY",
            d.concurrency.to_string(),
        ),
        ("prefetch", "TASKMILL_PREFETCH", d.prefetch.to_string()),
        (
            "queue_type",
            "TASKMILL_QUEUE_TYPE",
            d.queue_type.as_str().into(),
        ),
        (
            "shutdown_grace_ms",
            "TASKMILL_SHUTDOWN_GRACE_MS",
            d.shutdown_grace_ms.to_string(),
        ),
        (
            "log_format",
            "TASKMILL_LOG_FORMAT",
            format!("{:?}", d.log_format).to_lowercase(),
        ),
    ]
}

fn annotate(arg: clap::Arg, env: &str, default: Option<&str>) -> clap::Arg {
    let mut tail = format!(" [env: {env}]");
    if let Some(d) = default {
        tail.push_str(&format!(" [default: {d}]"));
    }
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    let long = arg.get_long_help().map(ToString::to_string);
    let arg = arg.help(format!("{help}{tail}"));
    match long {
        Some(l) => arg.long_help(format!("{l}{tail}")),
        None => arg,
    }
}

/// The full command: [`Cli`] with the annotations above.
pub fn command() -> clap::Command {
    let d = Config::default();
    let amqp_default = taskmill_core::redact::redact_url(&d.amqp_url);
    let flags = worker_flags(&d);
    Cli::command()
        .mut_arg("config", |a| {
            annotate(
                a,
                "TASKMILL_CONFIG",
                Some("./taskmill.toml, $XDG_CONFIG_HOME/taskmill/taskmill.toml, /etc/taskmill/taskmill.toml"),
            )
        })
        .mut_arg("amqp_url", |a| annotate(a, "TASKMILL_AMQP_URL", Some(&amqp_default)))
        .mut_subcommand("worker", |mut w| {
            for (id, env, default) in &flags {
                w = w.mut_arg(*id, |a| annotate(a, env, Some(default)));
            }
            w
        })
}

/// The man pages of `taskmill` and of each subcommand (`taskmill-worker`,
/// ...), one after the other, in roff.
pub fn man_pages(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let cmd = command();
    clap_mangen::Man::new(cmd.clone()).render(out)?;
    for sub in cmd.get_subcommands() {
        let name = format!("taskmill-{}", sub.get_name());
        let page = sub.clone().name(name.clone()).bin_name(name);
        clap_mangen::Man::new(page).render(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_valid_and_annotated() {
        command().debug_assert();
        let mut cmd = command();
        cmd.build();
        let worker = cmd.find_subcommand_mut("worker").unwrap();
        let help = worker.render_help().to_string();
        assert!(
            help.contains("[env: TASKMILL_CONCURRENCY] [default: 100]"),
            "{help}"
        );
        assert!(
            help.contains("[env: TASKMILL_QUEUE_TYPE] [default: quorum]"),
            "{help}"
        );
        assert!(
            help.contains("[possible values: quorum, classic]"),
            "{help}"
        );
        assert!(help.contains("[possible values: text, json]"), "{help}");
    }
}
