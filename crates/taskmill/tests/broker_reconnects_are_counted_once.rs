//! `taskmill_broker_reconnects_total` counts what its help text says: "Times
//! the worker re-established its broker connection after losing it". One
//! outage during which the broker refuses the worker for a few seconds is one
//! reconnect, however many connection attempts failed in between (operators
//! alert on "> 3 reconnects in 10 min", docs/operations.md).
//!
//! The outage is made without touching other tests: the worker uses its own
//! vhost and user; the test revokes the user's permissions and closes its
//! connection (the worker then fails to reopen it), and grants them back
//! after ~3 s.

mod common;

use std::time::{Duration, Instant};

use taskmill_worker::WorkerBuilder;

fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("this test needs rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost and a user of their own, deleted when dropped.
struct Tenant {
    name: String,
}

impl Tenant {
    fn create() -> Tenant {
        let name = format!("tm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["add_user", &name, "pw"]);
        let t = Tenant { name };
        t.grant();
        t
    }

    fn url(&self) -> String {
        format!("amqp://{0}:pw@127.0.0.1:5672/{0}", self.name)
    }

    fn grant(&self) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.name,
            &self.name,
            ".*",
            ".*",
            ".*",
        ]);
    }

    fn revoke(&self) {
        rabbitmqctl(&["clear_permissions", "-p", &self.name, &self.name]);
    }

    /// Closes every connection of the user; returns how many.
    fn close_connections(&self) -> usize {
        let list = rabbitmqctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "user",
            "pid",
        ]);
        let mut n = 0;
        for line in list.lines() {
            let mut cols = line.split_whitespace();
            if let (Some(user), Some(pid)) = (cols.next(), cols.next())
                && user == self.name
            {
                rabbitmqctl(&["close_connection", pid, "test: outage"]);
                n += 1;
            }
        }
        n
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        for args in [
            vec!["delete_vhost", self.name.as_str()],
            vec!["delete_user", self.name.as_str()],
        ] {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(&args)
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn one_outage_is_one_reconnect() {
    let tenant = Tenant::create();
    let queue = common::unique_queue("reconn");
    let data = common::temp_dir("reconn");
    let mut config = common::config(&queue);
    config.amqp_url = tenant.url();
    config.data_dir = data.0.clone();
    let worker = WorkerBuilder::new(config)
        .io("noop", |_ctx, _p: serde_json::Value| async { Ok(()) })
        .build()
        .unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(30)).await;
    let reconnects = || async {
        let (_, m) = common::http_get(handle.http_addr, "/metrics")
            .await
            .unwrap();
        common::metric_value(&m, "taskmill_broker_reconnects_total").unwrap_or(-1.0)
    };
    assert_eq!(reconnects().await, 0.0);

    // The outage: the broker refuses the worker for ~3 s. The worker retries
    // with a backoff starting at 100 ms, so it fails several times.
    tenant.revoke();
    assert!(
        tenant.close_connections() >= 1,
        "the worker's connection was not found"
    );
    assert!(
        common::eventually(Duration::from_secs(10), || !handle.is_ready()).await,
        "the worker stayed ready without a connection"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    tenant.grant();
    let back = Instant::now();
    assert!(
        handle.wait_ready(Duration::from_secs(30)).await,
        "the worker did not reconnect"
    );
    eprintln!(
        "reconnected {:?} after the permissions came back",
        back.elapsed()
    );
    // Let a late increment show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = reconnects().await;
    assert_eq!(
        n, 1.0,
        "one outage, one re-established connection; the metric says {n}"
    );

    shutdown.cancel();
    handle.wait().await.unwrap();
    // The tenant's vhost (and its queues) go with the guard.
}
