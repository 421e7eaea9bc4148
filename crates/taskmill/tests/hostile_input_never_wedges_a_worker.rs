//! No input wedges a worker. For each class of hostile message (a NUL or
//! another control byte in an idempotency key, a job id or a Celery task id,
//! an overlong key, an oversized body, a payload whose `Deserialize` panics,
//! a handler asking to be retried after `Duration::MAX`, a CPU job asking for
//! `u64::MAX` ms) the worker settles the message once — dead-lettered with its
//! `taskmill-dead-reason`, or its retry copy sent to the delay ladder — stays
//! ready, and runs the valid job published right behind it.
//!
//! A real broker, the real stores (SQLite, and PostgreSQL for the class that
//! once deferred itself every 5 s forever), a worker started in-process.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use taskmill_broker::{Broker, Outgoing, Publisher};
use taskmill_core::celery::{CeleryCall, H_ID, H_TASK};
use taskmill_core::config::{Config, KindConfig};
use taskmill_core::retry::Jitter;
use taskmill_core::wire::{EXCHANGE, H_DEAD_ERROR, H_DEAD_REASON, H_IDEMPOTENCY_KEY, H_KIND};
use taskmill_core::{HeaderValue, Outcome};
use taskmill_worker::{
    CancellationToken, CpuHandlerError, CpuJobInput, JobContext, JobError, WorkerBuilder,
    WorkerHandle,
};

/// A worker under test with its queue, a `test.ok` kind counting its runs,
/// and every finished attempt.
struct Rig {
    queue: String,
    handle: WorkerHandle,
    shutdown: CancellationToken,
    broker: Broker,
    publisher: Publisher,
    ran: Arc<AtomicUsize>,
    reports: common::Reports,
    _data: common::TempDir,
}

/// Starts a worker on a fresh queue (SQLite store in its own directory
/// unless `tune` sets another), with `test.ok` plus the kinds `extra` adds.
async fn rig(
    name: &str,
    tune: impl FnOnce(&mut Config),
    extra: impl FnOnce(WorkerBuilder) -> WorkerBuilder,
) -> Rig {
    let queue = common::unique_queue(name);
    let data = common::temp_dir(name);
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    tune(&mut config);
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let reports: common::Reports = Arc::default();
    let rep = reports.clone();
    let builder = WorkerBuilder::new(config)
        .io("test.ok", move |_ctx, _p: serde_json::Value| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .on_job_done(move |report| {
            rep.lock()
                .unwrap()
                .push((std::time::Instant::now(), report.clone()))
        });
    let worker = extra(builder).build().unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(30)).await;
    let broker = common::broker().await;
    let publisher = broker.publisher().await.unwrap();
    Rig {
        queue,
        handle,
        shutdown,
        broker,
        publisher,
        ran,
        reports,
        _data: data,
    }
}

impl Rig {
    /// Publishes a taskmill message to this rig's queue (kind `test.ok`
    /// unless `headers` names one).
    async fn publish(&self, id: &str, headers: &[(&'static str, HeaderValue)], body: &[u8]) {
        self.publish_to(&self.queue, id, headers, body).await;
    }

    async fn publish_to(
        &self,
        queue: &str,
        id: &str,
        headers: &[(&'static str, HeaderValue)],
        body: &[u8],
    ) {
        let mut all = headers.to_vec();
        if !all.iter().any(|(k, _)| *k == H_KIND) {
            all.push((H_KIND, HeaderValue::Str("test.ok".into())));
        }
        let msg = Outgoing::raw(
            EXCHANGE,
            queue,
            Some(id),
            Some("application/json"),
            &all,
            body.to_vec(),
        );
        self.publisher.publish(&msg).await.unwrap();
    }

    /// Waits until `test.ok` has run `n` times.
    async fn wait_ran(&self, n: usize, what: &str) {
        assert!(
            common::eventually(Duration::from_secs(30), || self.ran.load(Ordering::SeqCst)
                >= n)
            .await,
            "{what}: test.ok ran {} times, expected {n}",
            self.ran.load(Ordering::SeqCst)
        );
    }

    /// Asserts that `Q.dead` holds exactly the expected dead letters, each
    /// once (message id -> reason), waiting for them and then a little longer
    /// for a second copy that must not come; removes them.
    async fn assert_dead_once(&self, expected: &[(&str, &str)]) {
        let dead = format!("{}.dead", self.queue);
        let want = u32::try_from(expected.len()).unwrap();
        let mut depth = 0;
        for _ in 0..300 {
            depth = self.broker.queue_depth(&dead).await.unwrap();
            if depth >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A class that loops (deferral, requeue) would add copies meanwhile.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        depth = depth.max(self.broker.queue_depth(&dead).await.unwrap());
        assert_eq!(depth, want, "dead letters in {dead}");
        let mut browser = self.broker.browse(&dead).await.unwrap();
        let mut seen = Vec::new();
        while let Some(msg) = browser.next().await.unwrap() {
            seen.push((
                msg.message_id().unwrap_or_default().to_string(),
                msg.header_str(H_DEAD_REASON).unwrap_or_default(),
                msg.header_str(H_DEAD_ERROR).unwrap_or_default(),
            ));
            browser.ack(msg).await.unwrap();
        }
        browser.requeue_all().await.unwrap();
        for (id, reason) in expected {
            let hits: Vec<_> = seen.iter().filter(|(i, _, _)| i == id).collect();
            assert_eq!(hits.len(), 1, "dead letters of {id:?}: {seen:?}");
            assert_eq!(hits[0].1, *reason, "reason of {id:?}: {seen:?}");
            assert!(
                !hits[0].2.is_empty(),
                "{id:?} has no dead-letter error text"
            );
        }
    }

    /// Asserts `/readyz` answers 200, now and over the next second.
    async fn assert_ready(&self) {
        for _ in 0..5 {
            let (status, body) = common::http_get(self.handle.http_addr, "/readyz")
                .await
                .unwrap();
            assert_eq!(status, 200, "the worker is not ready: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Outcomes of the attempts of `kind` reported so far.
    fn outcomes(&self, kind: &str) -> Vec<Outcome> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.kind == kind)
            .map(|(_, r)| r.outcome)
            .collect()
    }

    /// Nothing was deferred: no class settled by waiting and trying again.
    fn assert_nothing_deferred(&self) {
        let deferred: Vec<_> = self
            .reports
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.outcome == Outcome::Deferred)
            .map(|(_, r)| r.clone())
            .collect();
        assert!(deferred.is_empty(), "deferred: {deferred:?}");
    }

    async fn stop(self, also: &[&str]) {
        self.shutdown.cancel();
        self.handle.wait().await.unwrap();
        common::cleanup(&self.broker, &self.queue).await;
        for q in also {
            common::cleanup(&self.broker, q).await;
        }
    }
}

fn key(k: &str) -> (&'static str, HeaderValue) {
    (H_IDEMPOTENCY_KEY, HeaderValue::Str(k.to_string()))
}

/// A NUL in the key, published before a valid keyed job: refused once as
/// `bad_header`, never deferred, readiness stays true.
async fn nul_key_is_refused_once(rig: &Rig) {
    rig.publish("nul-key", &[key("order\0-1")], b"{}").await;
    rig.publish("after-nul", &[key("order-1")], b"{}").await;
    rig.wait_ran(1, "the keyed job behind the NUL key").await;
    rig.assert_dead_once(&[("nul-key", "bad_header")]).await;
    rig.assert_nothing_deferred();
    rig.assert_ready().await;
    assert_eq!(rig.ran.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_the_key_is_refused_once_on_postgres() {
    let db = common::PgDb::create();
    let url = db.url();
    let rig = rig("nulpg", |c| c.store_url = Some(url), |b| b).await;
    nul_key_is_refused_once(&rig).await;
    assert_eq!(
        db.count("SELECT count(*) FROM taskmill_jobs WHERE state = 'completed'"),
        1,
        "only the valid key is in the store"
    );
    rig.stop(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_the_key_is_refused_once_on_sqlite() {
    let rig = rig("nulsqlite", |_| {}, |b| b).await;
    nul_key_is_refused_once(&rig).await;
    rig.stop(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_bytes_in_keys_and_job_ids_are_refused_once() {
    let rig = rig("ctrl", |_| {}, |b| b).await;
    rig.publish("esc-key", &[key("k\u{1b}[31m")], b"{}").await;
    rig.publish("del-key", &[key("k\u{7f}")], b"{}").await;
    rig.publish("c1-key", &[key("k\u{85}")], b"{}").await;
    rig.publish("crlf\r\nX-Injected: 1", &[], b"{}").await;
    rig.publish("nul\0id", &[], b"{}").await;
    rig.publish("tab\tid", &[key("fine")], b"{}").await;
    rig.publish("after-ctrl", &[key("fine")], b"{}").await;
    rig.wait_ran(1, "the job behind the control bytes").await;
    rig.assert_dead_once(&[
        ("esc-key", "bad_header"),
        ("del-key", "bad_header"),
        ("c1-key", "bad_header"),
        ("crlf\r\nX-Injected: 1", "bad_header"),
        ("nul\0id", "bad_header"),
        ("tab\tid", "bad_header"),
    ])
    .await;
    rig.assert_nothing_deferred();
    rig.assert_ready().await;
    assert_eq!(rig.ran.load(Ordering::SeqCst), 1);
    rig.stop(&[]).await;
}

/// Keys over 255 bytes are refused; 255 bytes run. (A `message_id` over 255
/// bytes cannot be sent at all: AMQP carries it as a short string.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_over_255_bytes_are_refused_once() {
    let rig = rig("longkey", |_| {}, |b| b).await;
    rig.publish("long-key", &[key(&"k".repeat(256))], b"{}")
        .await;
    // 128 two-byte characters: 256 bytes, so the bound is in bytes.
    rig.publish("long-utf8-key", &[key(&"é".repeat(128))], b"{}")
        .await;
    rig.publish("max-key", &[key(&"k".repeat(255))], b"{}")
        .await;
    rig.publish(&"i".repeat(255), &[], b"{}").await;
    rig.wait_ran(2, "the 255-byte key and id").await;
    rig.assert_dead_once(&[("long-key", "bad_header"), ("long-utf8-key", "bad_header")])
        .await;
    rig.assert_ready().await;
    assert_eq!(rig.ran.load(Ordering::SeqCst), 2);
    rig.stop(&[]).await;
}

fn celery_task(queue: &str, id: &str) -> Outgoing {
    Outgoing::raw(
        EXCHANGE,
        queue,
        None,
        Some("application/json"),
        &[
            (H_TASK, HeaderValue::Str("tests.count".into())),
            (H_ID, HeaderValue::Str(id.into())),
        ],
        br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
            .to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_celery_task_id_with_a_nul_is_refused_once() {
    let counted = Arc::new(AtomicUsize::new(0));
    let c = counted.clone();
    let rig = rig(
        "celerynul",
        |config| {
            config.celery_queues = std::mem::take(&mut config.queues);
        },
        move |b| {
            b.io("tests.count", move |_ctx: JobContext, _call: CeleryCall| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
        },
    )
    .await;
    let q = rig.queue.clone();
    for id in ["task\0one", "task\u{1b}two", &"t".repeat(256), "fine-1"] {
        rig.publisher.publish(&celery_task(&q, id)).await.unwrap();
    }
    assert!(
        common::eventually(Duration::from_secs(30), || counted.load(Ordering::SeqCst)
            == 1)
        .await,
        "the Celery task behind the hostile ids runs"
    );
    // Celery messages carry their id in a header, not in `message_id`.
    let dead = format!("{q}.dead");
    assert_eq!(
        common::settled_depth(&rig.broker, &dead, Duration::from_secs(20)).await,
        3,
        "each hostile task is dead-lettered once"
    );
    let mut browser = rig.broker.browse(&dead).await.unwrap();
    let mut ids = Vec::new();
    while let Some(msg) = browser.next().await.unwrap() {
        assert_eq!(msg.header_str(H_DEAD_REASON).as_deref(), Some("bad_header"));
        ids.push(msg.header_str(H_ID).unwrap_or_default());
        browser.ack(msg).await.unwrap();
    }
    browser.requeue_all().await.unwrap();
    ids.sort();
    let mut want = vec![
        "task\0one".to_string(),
        "task\u{1b}two".into(),
        "t".repeat(256),
    ];
    want.sort();
    assert_eq!(ids, want);
    rig.assert_nothing_deferred();
    rig.assert_ready().await;
    assert_eq!(counted.load(Ordering::SeqCst), 1);
    rig.stop(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_payload_bytes_is_refused_once() {
    const MAX: usize = 4096;
    let rig = rig("oversized", |c| c.max_payload_bytes = MAX, |b| b).await;
    // `{}` padded with JSON whitespace: one byte over, and exactly at, the bound.
    let body = |len: usize| {
        let mut b = b"{}".to_vec();
        b.resize(len, b' ');
        b
    };
    rig.publish("too-big", &[key("big")], &body(MAX + 1)).await;
    rig.publish("at-limit", &[key("big")], &body(MAX)).await;
    rig.wait_ran(1, "the job of exactly max_payload_bytes")
        .await;
    rig.assert_dead_once(&[("too-big", "payload_too_large")])
        .await;
    rig.assert_nothing_deferred();
    rig.assert_ready().await;
    rig.stop(&[]).await;
}

/// A payload type whose `Deserialize` panics on any input.
struct Explosive;

impl<'de> serde::Deserialize<'de> for Explosive {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("Explosive::deserialize panics on purpose")
    }
}

/// A panicking `Deserialize` is caught like a panicking handler: the attempt
/// is `crashed`, which is retryable, so it is retried per the kind's policy
/// and dead-lettered as `attempts_exhausted` (outcome `crashed`) when the
/// attempts are spent. The worker keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_deserialize_is_retried_then_dead_lettered() {
    let rig = rig(
        "explode",
        |c| {
            c.kind.insert(
                "test.explode".into(),
                KindConfig {
                    max_attempts: Some(2),
                    backoff_base_ms: Some(200),
                    jitter: Some(Jitter::None),
                    ..KindConfig::default()
                },
            );
        },
        |b| {
            b.io("test.explode", |_ctx, _p: Explosive| async move {
                Ok::<_, JobError>(())
            })
        },
    )
    .await;
    let explode = [(H_KIND, HeaderValue::Str("test.explode".into()))];
    rig.publish("boom", &explode, b"{}").await;
    rig.publish("after-boom", &[], b"{}").await;
    rig.wait_ran(1, "the job behind the panicking payload")
        .await;
    rig.assert_dead_once(&[("boom", "attempts_exhausted")])
        .await;
    assert_eq!(
        rig.outcomes("test.explode"),
        [Outcome::Retried, Outcome::Crashed],
        "one retry, then dead-lettered as crashed"
    );
    let errors: Vec<String> = rig
        .reports
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, r)| r.error.clone())
        .collect();
    assert!(
        errors.iter().all(|e| e.contains("panics on purpose")),
        "{errors:?}"
    );
    rig.assert_ready().await;
    // Still running jobs after two panics.
    rig.publish("after-boom-2", &[], b"{}").await;
    rig.wait_ran(2, "a job after the retry's panic").await;
    rig.stop(&[]).await;
}

/// The retry copy of a job that asks for `Duration::MAX` waits in the delay
/// ladder (clamped to its longest delay): it is neither run again soon, nor in
/// `Q`, nor in `Q.dead`, and the worker stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_duration_max_waits_in_the_ladder() {
    let tried = Arc::new(AtomicUsize::new(0));
    let t = tried.clone();
    let rig = rig(
        "retrymax",
        |_| {},
        move |b| {
            b.io("test.forever", move |_ctx, _p: serde_json::Value| {
                let t = t.clone();
                async move {
                    t.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>(JobError::Retryable {
                        message: "come back never".into(),
                        retry_after: Some(Duration::MAX),
                    })
                }
            })
        },
    )
    .await;
    let forever = [(H_KIND, HeaderValue::Str("test.forever".into()))];
    rig.publish("forever", &forever, b"{}").await;
    rig.publish("after-forever", &[], b"{}").await;
    rig.wait_ran(1, "the job behind the endless retry").await;
    assert_retry_copy_is_in_the_ladder(&rig, "test.forever", &rig.queue, &tried).await;
    rig.stop(&[]).await;
}

/// Checks the one attempt of `kind` was retried (its copy confirmed into
/// the ladder), and nothing of it is in `queue` or `queue.dead` a few
/// seconds later.
async fn assert_retry_copy_is_in_the_ladder(
    rig: &Rig,
    kind: &str,
    queue: &str,
    tried: &AtomicUsize,
) {
    assert!(
        common::eventually(Duration::from_secs(30), || !rig.outcomes(kind).is_empty()).await,
        "the attempt of {kind} settles"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rig.outcomes(kind), [Outcome::Retried]);
    assert_eq!(tried.load(Ordering::SeqCst), 1, "not run again soon");
    assert_eq!(
        rig.broker.queue_depth(queue).await.unwrap(),
        0,
        "not in {queue}"
    );
    assert_eq!(
        rig.broker
            .queue_depth(&format!("{queue}.dead"))
            .await
            .unwrap(),
        0,
        "not dead-lettered"
    );
    rig.assert_ready().await;
}

/// A stand-in CPU worker process speaking the pool's frame protocol: it
/// answers `test.cpu_ok` with a result and any other kind with a retryable
/// error whose `retry_after_ms` is `u64::MAX`, the largest value the wire
/// allows a child to send.
const FAKE_CHILD: &str = r#"#!/usr/bin/env python3
import json, os, struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
def send(tag, body):
    out.write(struct.pack("<I", 1 + len(body)) + bytes([tag]) + body)
    out.flush()
def read(n):
    data = b""
    while len(data) < n:
        chunk = inp.read(n - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data
threads = int(os.environ.get("TASKMILL_CPU_RAYON_THREADS", "1"))
send(3, json.dumps({"protocol": 1, "pid": os.getpid(), "rayon_threads": threads}).encode())
while True:
    body = read(struct.unpack("<I", read(4))[0])
    header_len = struct.unpack("<I", body[:4])[0]
    header = json.loads(body[4:4 + header_len])
    if header["kind"] == "test.cpu_ok":
        send(0, b"{}")
    else:
        err = {"type": "retryable", "message": "come back never", "retry_after_ms": 2**64 - 1}
        send(1, json.dumps(err).encode())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_retry_after_of_u64_max_ms_waits_in_the_ladder() {
    let dir = common::temp_dir("fakechild");
    let child = dir.0.join("fake_cpu_child.py");
    std::fs::write(&child, FAKE_CHILD).unwrap();
    std::fs::set_permissions(&child, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cpu_queue = common::unique_queue("retrymaxcpu");
    let cq = cpu_queue.clone();
    let rig = rig(
        "retrymaxio",
        move |c| {
            c.cpu_queue = cq;
            c.cpu_processes = 1;
            c.cpu_rayon_threads = 1;
        },
        move |b| {
            let noop =
                |_input: &CpuJobInput<'_>, _p: serde::de::IgnoredAny| Ok::<_, CpuHandlerError>(());
            b.cpu("test.cpu_forever", noop)
                .cpu("test.cpu_ok", noop)
                .cpu_program(child)
        },
    )
    .await;
    let kind = |k: &str| [(H_KIND, HeaderValue::Str(k.into()))];
    rig.publish_to(&cpu_queue, "cpu-forever", &kind("test.cpu_forever"), b"{}")
        .await;
    rig.publish_to(&cpu_queue, "cpu-after", &kind("test.cpu_ok"), b"{}")
        .await;
    assert!(
        common::eventually(Duration::from_secs(30), || rig.outcomes("test.cpu_ok")
            == [Outcome::Ok])
        .await,
        "the CPU job behind runs: {:?}",
        rig.outcomes("test.cpu_ok")
    );
    // The fake child cannot count its runs; one `retried` report and an empty
    // queue say the same.
    let once = AtomicUsize::new(1);
    assert_retry_copy_is_in_the_ladder(&rig, "test.cpu_forever", &cpu_queue, &once).await;
    let error = rig
        .reports
        .lock()
        .unwrap()
        .iter()
        .find(|(_, r)| r.kind == "test.cpu_forever")
        .and_then(|(_, r)| r.error.clone());
    assert!(
        error
            .as_deref()
            .unwrap_or_default()
            .contains("come back never"),
        "{error:?}"
    );
    rig.stop(&[&cpu_queue]).await;
}
