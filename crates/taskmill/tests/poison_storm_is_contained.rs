//! A storm of 1 000 poison messages (random and broken bodies, oversize
//! bodies, headers of the wrong type or value, unknown kinds, missing
//! properties, wrong content types) interleaved with 200 valid jobs: every
//! poison message ends in `Q.dead` once, with the reason its defect calls
//! for and its original body; every valid job runs exactly once; the worker
//! answers `/readyz` 200 throughout.
//!
//! The messages come from a fixed-seed xorshift generator, so a failure
//! replays identically.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskmill_broker::Outgoing;
use taskmill_core::HeaderValue;
use taskmill_core::wire::{
    EXCHANGE, H_ATTEMPT, H_DEAD_ERROR, H_DEAD_QUEUE, H_DEAD_REASON, H_ENQUEUED_AT_US,
    H_FIRST_FAILED_AT_MS, H_IDEMPOTENCY_KEY, H_KIND, H_PROTOCOL, H_TIMEOUT_MS, H_TRACEPARENT,
};
use taskmill_worker::WorkerBuilder;

const POISON: usize = 1_000;
const VALID: usize = 200;
const MAX_PAYLOAD: usize = 4_096;
/// Identifies each poison message, also on its dead-letter copy.
const H_POISON_ID: &str = "x-poison-id";

/// xorshift64*: small, deterministic, good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    /// Lowercase letters, `min` to `min + spread - 1` of them.
    fn text_len(&mut self, min: usize, spread: u64) -> String {
        let len = min + self.below(spread) as usize;
        self.text(len)
    }
    fn text(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b'a' + self.below(26) as u8))
            .collect()
    }
}

/// One message to publish, and for poison the reason it must die with.
struct Msg {
    id: Option<String>,
    content_type: Option<String>,
    headers: Vec<(&'static str, HeaderValue)>,
    body: Vec<u8>,
    /// `None` for a valid job.
    expect: Option<&'static str>,
}

fn kind(k: &str) -> (&'static str, HeaderValue) {
    (H_KIND, HeaderValue::Str(k.to_string()))
}

/// A header value that is not a string.
fn not_a_string(rng: &mut Rng) -> HeaderValue {
    match rng.below(5) {
        0 => HeaderValue::Int(rng.next() as i64),
        1 => HeaderValue::Bool(rng.below(2) == 0),
        2 => HeaderValue::Float(rng.below(1000) as f64 / 7.0),
        3 => HeaderValue::Bytes(vec![0xff, 0xfe, rng.next() as u8]),
        _ => HeaderValue::Other("void"),
    }
}

/// A header value that is not an integer.
fn not_an_int(rng: &mut Rng) -> HeaderValue {
    match rng.below(4) {
        0 => HeaderValue::Str(rng.below(100).to_string()),
        1 => HeaderValue::Bool(true),
        2 => HeaderValue::Float(2.5),
        _ => HeaderValue::Bytes(vec![0xc3, 0x28]),
    }
}

/// Headers the decoder ignores (or, for an invalid `traceparent`, must
/// ignore), sprinkled over every message.
fn noise(rng: &mut Rng, headers: &mut Vec<(&'static str, HeaderValue)>) {
    for name in ["x-noise-a", "x-noise-b", H_TRACEPARENT] {
        if rng.below(3) == 0 {
            let v = match rng.below(3) {
                0 => not_a_string(rng),
                1 => not_an_int(rng),
                _ => HeaderValue::Str(rng.text(12)),
            };
            headers.push((name, v));
        }
    }
}

/// Poison message `i`: a valid job with exactly one defect, so the reason
/// it must be dead-lettered with is known.
fn poison(rng: &mut Rng, i: usize) -> Msg {
    let mut m = Msg {
        id: Some(format!("poison-{i}")),
        content_type: Some("application/json".into()),
        headers: vec![kind("test.count")],
        body: br#"{"n": 0}"#.to_vec(),
        expect: None,
    };
    let reason = match rng.below(14) {
        0 => {
            // Random bytes, broken UTF-8 first: never JSON.
            let len = 1 + rng.below(300) as usize;
            m.body = [&[0xffu8, 0xfe][..], &rng.bytes(len)].concat();
            "invalid_json"
        }
        1 => {
            m.body = rng
                .pick(&[
                    &b"{\"n\": 1"[..],
                    b"{n: 1}",
                    b"",
                    b"\"unterminated",
                    b"{\"n\": 1}}",
                    b"nul",
                ])
                .to_vec();
            "invalid_json"
        }
        2 => {
            m.body = rng
                .pick(&[
                    &b"{\"n\": \"seven\"}"[..],
                    b"[\"a\"]",
                    b"\"text\"",
                    b"{\"m\": 1}",
                    b"null",
                    b"{\"n\": -1}",
                    b"{\"n\": 1.5}",
                ])
                .to_vec();
            "invalid_payload"
        }
        3 => {
            let len = MAX_PAYLOAD + 1 + rng.below(20_000) as usize;
            m.body = rng.bytes(len);
            "payload_too_large"
        }
        4 => {
            m.headers = vec![match rng.below(3) {
                0 => (H_KIND, not_a_string(rng)),
                1 => (H_KIND, HeaderValue::Str(String::new())),
                _ => (H_KIND, HeaderValue::Str(rng.text_len(256, 100))),
            }];
            "bad_header"
        }
        5 => {
            m.headers.clear();
            "missing_header"
        }
        6 => {
            m.headers = vec![kind(&format!("no.such.{}", rng.text(8)))];
            "unknown_kind"
        }
        7 => {
            let v = match rng.below(4) {
                0 => not_an_int(rng),
                1 => HeaderValue::Int(0),
                2 => HeaderValue::Int(-1 - rng.below(1000) as i64),
                _ => HeaderValue::Int(i64::from(u32::MAX) + 1 + rng.below(1000) as i64),
            };
            m.headers.push((H_ATTEMPT, v));
            "bad_header"
        }
        8 => {
            let v = match rng.below(3) {
                0 => not_an_int(rng),
                1 => HeaderValue::Int(0),
                _ => HeaderValue::Int(-1 - rng.below(1000) as i64),
            };
            m.headers.push((H_TIMEOUT_MS, v));
            "bad_header"
        }
        9 => {
            m.id = if rng.below(2) == 0 {
                None
            } else {
                Some(String::new())
            };
            "missing_header"
        }
        10 => {
            if rng.below(4) == 0 {
                m.content_type = None;
                "missing_header"
            } else {
                m.content_type = Some(
                    rng.pick(&[
                        "text/plain",
                        "application/xml",
                        "application/x-python-serialize",
                        "",
                        "application/jsonx",
                        "json",
                    ])
                    .to_string(),
                );
                "bad_header"
            }
        }
        11 => {
            if rng.below(3) == 0 {
                m.headers.push((H_PROTOCOL, HeaderValue::Str("1".into())));
                "bad_header"
            } else {
                let v = *rng.pick(&[0i64, 2, 3, -1, 1000]);
                m.headers.push((H_PROTOCOL, HeaderValue::Int(v)));
                "unsupported_protocol"
            }
        }
        12 => {
            let v = match rng.below(3) {
                0 => HeaderValue::Str(String::new()),
                1 => HeaderValue::Str(rng.text_len(256, 50)),
                _ => not_a_string(rng),
            };
            m.headers.push((H_IDEMPOTENCY_KEY, v));
            "bad_header"
        }
        _ => {
            if rng.below(2) == 0 {
                m.headers.push((
                    H_ENQUEUED_AT_US,
                    HeaderValue::Int(-1 - rng.below(1000) as i64),
                ));
            } else {
                m.headers.push((H_FIRST_FAILED_AT_MS, not_an_int(rng)));
            }
            "bad_header"
        }
    };
    m.expect = Some(reason);
    m.headers.push((H_POISON_ID, HeaderValue::Int(i as i64)));
    noise(rng, &mut m.headers);
    m
}

fn valid(rng: &mut Rng, n: usize) -> Msg {
    let mut headers = vec![kind("test.count")];
    if rng.below(2) == 0 {
        headers.push((H_PROTOCOL, HeaderValue::Int(1)));
    }
    noise(rng, &mut headers);
    Msg {
        id: Some(format!("valid-{n}")),
        content_type: Some(
            rng.pick(&[
                "application/json",
                "application/json; charset=utf-8",
                "Application/JSON",
            ])
            .to_string(),
        ),
        headers,
        body: format!("{{\"n\": {n}}}").into_bytes(),
        expect: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_storm_is_dead_lettered_and_valid_jobs_run_once() {
    let queue = common::unique_queue("storm");
    let data = common::temp_dir("storm");
    let mut config = common::config(&queue);
    config.data_dir = data.0.clone();
    config.max_payload_bytes = MAX_PAYLOAD;

    let (builder, counts) = common::counting(WorkerBuilder::new(config), VALID);
    let worker = builder.build().unwrap();
    let (handle, shutdown) = common::start(worker, Duration::from_secs(20)).await;
    let addr = handle.http_addr;

    // Watch /readyz for the whole storm.
    let stop_probe = Arc::new(AtomicBool::new(false));
    let probes = Arc::new(AtomicUsize::new(0));
    let not_ready = Arc::new(Mutex::new(Vec::<u16>::new()));
    let probe = {
        let (stop, probes, not_ready) = (stop_probe.clone(), probes.clone(), not_ready.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let status = common::http_get(addr, "/readyz")
                    .await
                    .map(|r| r.0)
                    .unwrap_or(0);
                probes.fetch_add(1, Ordering::SeqCst);
                if status != 200 {
                    not_ready.lock().unwrap().push(status);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // 1 000 poison and 200 valid messages, shuffled together.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut msgs: Vec<Msg> = (0..POISON).map(|i| poison(&mut rng, i)).collect();
    msgs.extend((0..VALID).map(|n| valid(&mut rng, n)));
    for i in (1..msgs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        msgs.swap(i, j);
    }
    let mut by_reason: HashMap<&str, usize> = HashMap::new();
    for m in &msgs {
        if let Some(r) = m.expect {
            *by_reason.entry(r).or_default() += 1;
        }
    }
    eprintln!("poison by expected reason: {by_reason:?}");

    let broker = common::broker().await;
    let publisher = broker.publisher().await.unwrap();
    for chunk in msgs.chunks(100) {
        let mut pending = Vec::new();
        for m in chunk {
            let out = Outgoing::raw(
                EXCHANGE,
                &queue,
                m.id.as_deref(),
                m.content_type.as_deref(),
                &m.headers,
                m.body.clone(),
            );
            pending.push(publisher.send(&out).await.unwrap());
        }
        for p in pending {
            p.wait().await.unwrap();
        }
    }

    let dead = format!("{queue}.dead");
    assert!(
        common::eventually(Duration::from_secs(60), || counts
            .lock()
            .unwrap()
            .iter()
            .all(|c| *c >= 1))
        .await,
        "not every valid job ran within 60 s"
    );
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while broker.queue_depth(&dead).await.unwrap() < POISON as u32 {
        assert!(
            std::time::Instant::now() < until,
            "only {} of {POISON} poison messages dead-lettered within 60 s",
            broker.queue_depth(&dead).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settle: a duplicate dead letter or a second run would show up now.
    assert_eq!(
        common::settled_depth(&broker, &dead, Duration::from_secs(10)).await,
        POISON as u32,
        "each poison message is dead-lettered exactly once"
    );
    stop_probe.store(true, Ordering::SeqCst);
    probe.await.unwrap();
    let bad = not_ready.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "/readyz was not 200 in {} of {} probes: {:?}",
        bad.len(),
        probes.load(Ordering::SeqCst),
        &bad[..bad.len().min(10)]
    );
    assert!(probes.load(Ordering::SeqCst) > 10, "the probe barely ran");

    let counts = counts.lock().unwrap().clone();
    let wrong: Vec<(usize, u32)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != 1)
        .map(|(n, c)| (n, *c))
        .collect();
    assert!(
        wrong.is_empty(),
        "valid jobs not run exactly once (n, runs): {wrong:?}"
    );

    // Every dead letter: its poison id, the expected reason, an error text,
    // the queue, and the original body.
    let poison_msgs: HashMap<i64, &Msg> = msgs
        .iter()
        .filter_map(|m| {
            let id = m.headers.iter().find(|(k, _)| *k == H_POISON_ID)?;
            match id.1 {
                HeaderValue::Int(i) => Some((i, m)),
                _ => None,
            }
        })
        .collect();
    let mut seen = vec![false; POISON];
    let mut mismatches = Vec::new();
    while let Some(d) = broker.get(&dead).await.unwrap() {
        let Some(HeaderValue::Int(i)) = d.header(H_POISON_ID) else {
            panic!(
                "a dead letter that is not a poison message: {:?}",
                d.message_id()
            );
        };
        let m = poison_msgs[&i];
        assert!(!seen[i as usize], "poison {i} dead-lettered twice");
        seen[i as usize] = true;
        let reason = d.header_str(H_DEAD_REASON);
        if reason.as_deref() != m.expect {
            mismatches.push(format!(
                "poison {i}: reason {reason:?}, expected {:?} (error {:?})",
                m.expect,
                d.header_str(H_DEAD_ERROR)
            ));
        }
        assert!(
            !d.header_str(H_DEAD_ERROR).unwrap_or_default().is_empty(),
            "poison {i}"
        );
        assert_eq!(d.header_str(H_DEAD_QUEUE).as_deref(), Some(queue.as_str()));
        assert!(
            d.body() == m.body.as_slice(),
            "poison {i}: the original body is kept"
        );
        d.ack().await.unwrap();
    }
    assert!(
        seen.iter().all(|s| *s),
        "some poison messages are missing from {dead}"
    );
    assert!(
        mismatches.is_empty(),
        "{} dead letters with an unexpected reason:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );

    let (_, metrics) = common::http_get(addr, "/metrics").await.unwrap();
    let dead_total = common::metric_sum(
        &metrics,
        "taskmill_dead_letters_total",
        &[("queue", &queue)],
    );
    assert_eq!(dead_total, POISON as f64, "{metrics}");
    let ok = common::metric_sum(
        &metrics,
        "taskmill_jobs_total",
        &[("queue", &queue), ("outcome", "ok")],
    );
    assert_eq!(ok, VALID as f64, "{metrics}");
    assert_eq!(common::http_get(addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(common::http_get(addr, "/readyz").await.unwrap().0, 200);

    shutdown.cancel();
    handle.wait().await.unwrap();
    assert_eq!(
        common::settled_depth(&broker, &queue, Duration::from_secs(10)).await,
        0
    );
    common::cleanup(&broker, &queue).await;
}
