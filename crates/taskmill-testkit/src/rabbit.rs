//! Extra RabbitMQ nodes beside the service broker, for the TLS and cluster
//! tests: a thin wrapper over `scripts/rabbitmq-node.sh`, which gives each node
//! its own node name, ports, database, logs and config under
//! `/tmp/taskmill-rabbit/NAME`, owned by the `rabbitmq` user.
//!
//! The calls block (a node takes about 7 s to boot, 2 s to stop): call them
//! from a multi-thread runtime or `spawn_blocking`. A node is stopped and its
//! directory removed when its [`ExtraNode`] is dropped, also on a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Error;

/// The script this module drives.
pub fn node_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/rabbitmq-node.sh")
}

/// Whether this machine can start extra nodes: the RabbitMQ server is
/// installed and its `rabbitmq` user exists.
pub fn can_start_nodes() -> bool {
    Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
        && Command::new("id")
            .arg("rabbitmq")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

/// An amqps listener for a node.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The CA that signs client certificates (and, usually, the server's).
    pub ca: PathBuf,
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// Require a client certificate signed by `ca`
    /// (`verify_peer` + `fail_if_no_peer_cert`).
    pub verify_peer: bool,
}

/// What node to start.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The node name's first part (`NAME@localhost`): lower-case letters,
    /// digits, `-` and `_`. Make it unique per test process, e.g. with
    /// [`NodeOptions::unique`].
    pub name: String,
    /// The plain AMQP port on 127.0.0.1.
    pub amqp_port: u16,
    /// The Erlang distribution port (default: a free one).
    pub dist_port: Option<u16>,
    /// An amqps listener besides the plain one.
    pub tls: Option<TlsListener>,
}

impl NodeOptions {
    /// A node named `PREFIX-PID-N` (unique within this machine while this
    /// process lives) on free ports, with no TLS listener.
    pub fn unique(prefix: &str) -> Result<NodeOptions, Error> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        Ok(NodeOptions {
            name: format!("{prefix}-{}-{n}", std::process::id()),
            amqp_port: crate::http::free_port()?,
            dist_port: Some(crate::http::free_port()?),
            tls: None,
        })
    }
}

/// A running extra node; stopped and wiped when dropped.
#[derive(Debug)]
pub struct ExtraNode {
    options: NodeOptions,
    dir: PathBuf,
    wiped: bool,
}

/// Runs the script with `args`, failing with its stderr when it fails.
fn script(args: &[&str]) -> Result<Output, Error> {
    let out = Command::new("bash")
        .arg(node_script())
        .args(args)
        .output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Io(std::io::Error::other(format!(
            "rabbitmq-node.sh {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))))
    }
}

impl ExtraNode {
    /// Starts the node and waits until it has booted and its AMQP port
    /// answers.
    pub fn start(options: NodeOptions) -> Result<ExtraNode, Error> {
        let out = script(
            &Self::start_args(&options, true)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )?;
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Ok(ExtraNode {
            options,
            dir,
            wiped: false,
        })
    }

    fn start_args(o: &NodeOptions, fresh: bool) -> Vec<String> {
        let mut a = vec!["start".to_string(), o.name.clone(), o.amqp_port.to_string()];
        if let Some(p) = o.dist_port {
            a.extend(["--dist-port".to_string(), p.to_string()]);
        }
        if let Some(t) = &o.tls {
            a.extend([
                "--tls-port".to_string(),
                t.port.to_string(),
                "--ca".to_string(),
                t.ca.display().to_string(),
                "--cert".to_string(),
                t.cert.display().to_string(),
                "--key".to_string(),
                t.key.display().to_string(),
            ]);
            if t.verify_peer {
                a.push("--verify-peer".to_string());
            }
        }
        if fresh {
            a.push("--fresh".to_string());
        }
        a
    }

    /// The node name (`NAME@localhost`).
    pub fn node_name(&self) -> String {
        format!("{}@localhost", self.options.name)
    }

    /// The short name given in [`NodeOptions::name`].
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The plain AMQP port.
    pub fn amqp_port(&self) -> u16 {
        self.options.amqp_port
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn amqp_url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.options.amqp_port
        )
    }

    /// `amqps://guest:guest@localhost:PORT/%2f`, when the node has a TLS
    /// listener (`localhost`, so the certificate's name can be checked).
    pub fn amqps_url(&self) -> Option<String> {
        self.options
            .tls
            .as_ref()
            .map(|t| format!("amqps://guest:guest@localhost:{}/%2f", t.port))
    }

    /// The node's directory (its `log/` holds the broker log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `rabbitmqctl ARGS` against this node; its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String, Error> {
        let mut a = vec!["ctl", self.options.name.as_str()];
        a.extend_from_slice(args);
        Ok(String::from_utf8_lossy(&script(&a)?.stdout).into_owned())
    }

    /// Runs `rabbitmq-queues ARGS` against this node; its stdout.
    pub fn queues(&self, args: &[&str]) -> Result<String, Error> {
        let mut a = vec!["queues", self.options.name.as_str()];
        a.extend_from_slice(args);
        Ok(String::from_utf8_lossy(&script(&a)?.stdout).into_owned())
    }

    /// Stops the node, keeping its database (see [`ExtraNode::restart`]).
    pub fn stop(&self) -> Result<(), Error> {
        script(&["stop", &self.options.name]).map(|_| ())
    }

    /// Starts a stopped node again on the same ports and database.
    pub fn restart(&self) -> Result<(), Error> {
        let args = Self::start_args(&self.options, false);
        script(&args.iter().map(String::as_str).collect::<Vec<_>>()).map(|_| ())
    }

    /// Stops the node and removes its directory.
    pub fn wipe(mut self) -> Result<(), Error> {
        self.wiped = true;
        script(&["wipe", &self.options.name]).map(|_| ())
    }
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        if !self.wiped {
            let _ = script(&["wipe", &self.options.name]);
        }
    }
}
