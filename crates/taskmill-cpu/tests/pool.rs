//! Integration tests with real child processes: this test binary is also the
//! worker program (child mode) and, for the orphan test, a pool parent.
//!
//! `harness = false`: the pool re-executes this binary, and libtest would
//! otherwise interpret the child's run as a test run. Run one case with
//! `cargo test -p taskmill-cpu --test pool -- <name substring>`.

use std::collections::HashSet;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use taskmill_cpu::{
    CpuError, CpuPool, CpuRegistry, CpuRequest, HandlerError, PoolConfig, PoolError, RestartCause,
    is_child_mode, measure_handoff, run_child,
};

/// Memory the `leak` kind keeps alive on purpose.
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

#[derive(Deserialize)]
struct HashJob {
    data: String,
    rounds: u32,
}

fn sha256_chain(data: &[u8], rounds: u32) -> String {
    let mut digest: Vec<u8> = data.to_vec();
    for _ in 0..rounds {
        digest = Sha256::digest(&digest).to_vec();
    }
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn spin(ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut n: u64 = 0;
    while Instant::now() < until {
        n = std::hint::black_box(n.wrapping_add(1));
    }
    n
}

fn registry() -> CpuRegistry {
    let mut reg = CpuRegistry::new();
    reg.register_json("echo", |_, payload: Value| {
        Ok(json!({ "pid": std::process::id(), "payload": payload }))
    })
    .register_json("hash", |_, job: HashJob| {
        Ok(sha256_chain(job.data.as_bytes(), job.rounds))
    })
    .register_json("panic", |_, what: String| -> Result<(), HandlerError> {
        panic!("deliberate panic: {what}")
    })
    .register_fn("abort", |_| std::process::abort())
    .register_fn("exit", |_| std::process::exit(3))
    .register_fn("segv", |_| {
        // Rust's SIGSEGV handler (stack-overflow detection) resets the signal
        // to its default action and returns for faults that are not a guard
        // page hit; the second raise then kills the process.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        Ok(b"\"survived\"".to_vec())
    })
    .register_json("spin", |_, ms: u64| Ok(spin(ms)))
    .register_fn("fail", |_| {
        Err(HandlerError::Retryable {
            message: "try again later".into(),
            retry_after_ms: Some(250),
        })
    })
    .register_json("leak", |_, mb: usize| {
        LEAKED.lock().unwrap().push(vec![1u8; mb * 1024 * 1024]);
        Ok(json!({ "pid": std::process::id(), "mb": mb }))
    })
    .register_fn("rayon_threads", |_| {
        Ok(rayon::current_num_threads().to_string().into_bytes())
    })
    .register_fn("noisy", |_| {
        // Must end up on stderr, not in the frame stream.
        println!("a handler writing to stdout");
        Ok(b"\"quiet\"".to_vec())
    });
    reg
}

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|| Box::pin($name()) as CaseFuture) as fn() -> CaseFuture)),*]
    };
}

fn main() {
    if is_child_mode() {
        run_child(&registry());
    }
    if std::env::var_os("POOL_TEST_PARENT").is_some() {
        parent_mode();
        return;
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases = cases![
        echo_round_trip_and_many_concurrent_jobs,
        hash_chain_matches_in_process_result,
        panic_is_reported_and_child_replaced,
        abort_is_a_crash_naming_sigabrt,
        segv_and_exit_are_named,
        timeout_kills_and_replaces,
        handler_errors_do_not_restart,
        idle_child_killed_externally_is_replaced,
        jobs_survive_children_dying_just_before_handoff,
        recycles_after_max_jobs,
        recycles_above_rss_limit,
        address_space_limit_turns_huge_allocation_into_crash,
        parent_sigkill_leaves_no_children,
        shutdown_drains_then_kills,
        cancelled_caller_kills_and_replaces_child,
        caller_giving_up_while_queued_starts_nothing,
        dropping_the_pool_reaps_children,
        rayon_threads_follow_config,
        stdout_writes_in_handlers_do_not_corrupt_frames,
        oversized_payload_is_rejected,
        bad_program_fails_start,
        handoff_helper_returns_samples,
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        let result = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(90), tokio::spawn(case())).await
        });
        let took = started.elapsed();
        match result {
            Ok(Ok(())) => {
                passed += 1;
                println!("test {name} ... ok ({took:.2?})");
            }
            Ok(Err(join_error)) => {
                failed += 1;
                println!("test {name} ... FAILED ({join_error})");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED (hung for 90 s)");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    drop(runtime);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// Third mode: a pool parent that prints its children's pids, then waits to
/// be killed.
fn parent_mode() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let pool = CpuPool::start(config(2)).await.expect("pool starts");
        // Keep both children busy: a child blocked in a job never reads the
        // EOF of its stdin, so only PR_SET_PDEATHSIG can stop it.
        for _ in 0..2 {
            let pool = pool.clone();
            tokio::spawn(async move {
                let _ = pool
                    .run(request("spin", json!(60_000), Duration::from_secs(120)))
                    .await;
            });
        }
        while pool.busy() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pids: Vec<String> = pool.pids().iter().map(u32::to_string).collect();
        println!("PIDS {}", pids.join(" "));
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

// ---------------------------------------------------------------- helpers

fn config(size: usize) -> PoolConfig {
    let mut cfg = PoolConfig::for_current_exe(size);
    cfg.kill_grace = Duration::from_millis(300);
    cfg
}

async fn start(cfg: PoolConfig) -> CpuPool {
    let size = cfg.size;
    let pool = CpuPool::start(cfg).await.expect("pool starts");
    assert_eq!(pool.live(), size);
    assert_eq!(pool.pids().len(), size);
    pool
}

fn request(kind: &str, payload: Value, timeout: Duration) -> CpuRequest {
    CpuRequest::new(
        format!("job-{kind}"),
        kind,
        Bytes::from(serde_json::to_vec(&payload).unwrap()),
        timeout,
    )
}

async fn run_json(pool: &CpuPool, kind: &str, payload: Value) -> Result<Value, CpuError> {
    let bytes = pool
        .run(request(kind, payload, Duration::from_secs(20)))
        .await?;
    Ok(serde_json::from_slice(&bytes).expect("result is JSON"))
}

async fn echo_pid(pool: &CpuPool, payload: Value) -> u32 {
    let out = run_json(pool, "echo", payload.clone()).await.expect("echo");
    assert_eq!(out["payload"], payload);
    out["pid"].as_u64().expect("pid") as u32
}

/// The state letter from `/proc/<pid>/stat`, or `None` if the pid is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

/// Every thread of the process has exited, so its pipes are closed (it may
/// still be an unreaped zombie). A `Z` state of the pid alone is not enough:
/// the thread-group leader turns `Z` while its other threads (rayon) are
/// still exiting and still hold the file descriptors open.
fn is_dead(pid: u32) -> bool {
    match proc_state(pid) {
        None => true,
        Some('Z') => {
            std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |d| d.count() <= 1)
        }
        Some(_) => false,
    }
}

/// The process is fully gone: dead *and* reaped (not a zombie).
fn assert_reaped(pid: u32) {
    if let Some(state) = proc_state(pid) {
        panic!("process {pid} still present in /proc with state {state}");
    }
}

async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `job` and returns the pool's pids that disappeared meanwhile; checks
/// the pool is back at full strength when the error comes back.
async fn replaced_pid<T>(pool: &CpuPool, job: impl Future<Output = T>) -> (T, u32) {
    let before: HashSet<u32> = pool.pids().into_iter().collect();
    let out = job.await;
    assert_eq!(pool.live(), pool.size(), "pool back to full strength");
    let after: HashSet<u32> = pool.pids().into_iter().collect();
    assert_eq!(after.len(), pool.size());
    let gone: Vec<u32> = before.difference(&after).copied().collect();
    assert_eq!(
        gone.len(),
        1,
        "exactly one child replaced: {before:?} -> {after:?}"
    );
    assert_reaped(gone[0]);
    (out, gone[0])
}

fn kill9(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
}

// ---------------------------------------------------------------- cases

async fn echo_round_trip_and_many_concurrent_jobs() {
    let pool = start(config(2)).await;
    let pid = echo_pid(&pool, json!({"hello": "world", "n": [1, 2, 3]})).await;
    assert!(pool.pids().contains(&pid));

    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let pool = pool.clone();
        jobs.spawn(async move {
            let out = run_json(&pool, "echo", json!({ "i": i }))
                .await
                .expect("echo");
            assert_eq!(out["payload"]["i"], i);
            out["pid"].as_u64().unwrap() as u32
        });
    }
    let mut pids = HashSet::new();
    let mut count = 0;
    while let Some(pid) = jobs.join_next().await {
        pids.insert(pid.expect("job task"));
        count += 1;
    }
    assert_eq!(count, 2000);
    assert!(pids.len() <= 2, "only the two children served: {pids:?}");
    assert_eq!(pool.restarts_total(), 0);
    assert_eq!(pool.busy(), 0);
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn hash_chain_matches_in_process_result() {
    let pool = start(config(2)).await;
    let out = run_json(&pool, "hash", json!({"data": "taskmill", "rounds": 10_000}))
        .await
        .unwrap();
    assert_eq!(out, json!(sha256_chain(b"taskmill", 10_000)));
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn panic_is_reported_and_child_replaced() {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let mut cfg = config(2);
    cfg.on_restart = Some(std::sync::Arc::new({
        let seen = seen.clone();
        move |cause| seen.lock().unwrap().push(cause)
    }));
    let pool = start(cfg).await;
    let (result, _) = replaced_pid(&pool, run_json(&pool, "panic", json!("oh no"))).await;
    match result {
        Err(CpuError::Panicked { message }) => assert_eq!(message, "deliberate panic: oh no"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(pool.restarts(RestartCause::Panicked), 1);
    assert_eq!(*seen.lock().unwrap(), vec![RestartCause::Panicked]);
    echo_pid(&pool, json!(1)).await;
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn abort_is_a_crash_naming_sigabrt() {
    let pool = start(config(2)).await;
    let (result, _) = replaced_pid(&pool, run_json(&pool, "abort", json!(null))).await;
    let err = result.unwrap_err();
    match &err {
        CpuError::Crashed { cause } => {
            assert!(cause.starts_with("killed by signal 6 (SIGABRT)"), "{cause}")
        }
        other => panic!("expected Crashed, got {other:?}"),
    }
    assert!(err.is_retryable());
    assert_eq!(pool.restarts(RestartCause::Crashed), 1);
    echo_pid(&pool, json!(2)).await;
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn segv_and_exit_are_named() {
    let pool = start(config(2)).await;
    let (result, _) = replaced_pid(&pool, run_json(&pool, "segv", json!(null))).await;
    match result {
        Err(CpuError::Crashed { cause }) => {
            assert!(
                cause.starts_with("killed by signal 11 (SIGSEGV)"),
                "{cause}"
            )
        }
        other => panic!("expected Crashed, got {other:?}"),
    }
    let (result, _) = replaced_pid(&pool, run_json(&pool, "exit", json!(null))).await;
    match result {
        Err(CpuError::Crashed { cause }) => assert_eq!(cause, "exited with status 3"),
        other => panic!("expected Crashed, got {other:?}"),
    }
    assert_eq!(pool.restarts(RestartCause::Crashed), 2);
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn timeout_kills_and_replaces() {
    let pool = start(config(2)).await;
    let started = Instant::now();
    let (result, _) = replaced_pid(
        &pool,
        pool.run(request("spin", json!(30_000), Duration::from_millis(300))),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        result,
        Err(CpuError::Timeout {
            after: Duration::from_millis(300)
        })
    );
    assert!(took < Duration::from_secs(5), "timeout took {took:?}");
    assert_eq!(pool.restarts(RestartCause::Timeout), 1);
    echo_pid(&pool, json!(3)).await;
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn handler_errors_do_not_restart() {
    let pool = start(config(2)).await;
    let pids_before: HashSet<u32> = pool.pids().into_iter().collect();
    let err = run_json(&pool, "fail", json!(null)).await.unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
    assert!(matches!(
        err,
        CpuError::Handler(HandlerError::Retryable { .. })
    ));

    let err = run_json(&pool, "no_such_kind", json!(null))
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("unknown CPU job kind"), "{err}");

    let err = run_json(&pool, "hash", json!({"wrong": true}))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(
        err.to_string().contains("invalid payload for kind hash"),
        "{err}"
    );

    let pids_after: HashSet<u32> = pool.pids().into_iter().collect();
    assert_eq!(pids_before, pids_after);
    assert_eq!(pool.restarts_total(), 0);
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn idle_child_killed_externally_is_replaced() {
    let pool = start(config(2)).await;
    let victim = pool.pids()[0];
    kill9(victim);
    eventually("idle death detected", Duration::from_secs(5), || {
        pool.restarts(RestartCause::DiedIdle) == 1
            && pool.live() == 2
            && !pool.pids().contains(&victim)
    })
    .await;
    assert_reaped(victim);
    for i in 0..10 {
        echo_pid(&pool, json!(i)).await;
    }
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn jobs_survive_children_dying_just_before_handoff() {
    // Kill both children and hand out jobs right after they are dead, before
    // the supervisors had a chance to notice: no job may fail or hang.
    let pool = start(config(2)).await;
    for round in 0..3 {
        eventually("pool at full strength", Duration::from_secs(5), || {
            pool.live() == 2
        })
        .await;
        let victims = pool.pids();
        for &pid in &victims {
            kill9(pid);
        }
        eventually("victims dead", Duration::from_secs(5), || {
            victims.iter().all(|&pid| is_dead(pid))
        })
        .await;
        let mut jobs = tokio::task::JoinSet::new();
        for i in 0..4 {
            let pool = pool.clone();
            jobs.spawn(async move { echo_pid(&pool, json!([round, i])).await });
        }
        while let Some(pid) = jobs.join_next().await {
            assert!(!victims.contains(&pid.expect("job succeeded")));
        }
        for pid in victims {
            assert_reaped(pid);
        }
    }
    let counts = || {
        RestartCause::ALL
            .iter()
            .map(|&c| format!("{c}={}", pool.restarts(c)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(pool.restarts(RestartCause::DiedIdle) == 6 && pool.live() == 2) {
        assert!(
            Instant::now() < deadline,
            "expected six idle deaths: {} live={}",
            counts(),
            pool.live()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.restarts_total(), 6);
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn recycles_after_max_jobs() {
    let mut cfg = config(2);
    cfg.max_jobs_per_child = Some(5);
    let pool = start(cfg).await;
    let mut pids = HashSet::new();
    for i in 0..23 {
        pids.insert(echo_pid(&pool, json!(i)).await);
    }
    // 23 jobs at 5 per child need at least 5 different children.
    assert!(pids.len() >= 5, "distinct pids: {pids:?}");
    // Each slot's current child has served at most 4 jobs, so at least
    // 23 - 2 * 4 = 15 jobs ran on children that were retired after 5.
    eventually("recycled children replaced", Duration::from_secs(5), || {
        pool.restarts(RestartCause::Recycled) >= 3 && pool.live() == 2
    })
    .await;
    assert_eq!(pool.restarts_total(), pool.restarts(RestartCause::Recycled));
    for pid in pids.iter().filter(|p| !pool.pids().contains(p)) {
        eventually("retired child reaped", Duration::from_secs(5), || {
            proc_state(*pid).is_none()
        })
        .await;
    }
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn recycles_above_rss_limit() {
    let mut cfg = config(1);
    cfg.max_rss_per_child_bytes = Some(30 * 1024 * 1024);
    let pool = start(cfg).await;
    let first = echo_pid(&pool, json!("small")).await;
    assert_eq!(
        echo_pid(&pool, json!("small")).await,
        first,
        "a small child is kept"
    );
    let out = run_json(&pool, "leak", json!(50))
        .await
        .expect("leak job succeeds");
    assert_eq!(out["pid"].as_u64().unwrap() as u32, first);
    let next = echo_pid(&pool, json!("after")).await;
    assert_ne!(next, first, "the bloated child was replaced");
    assert_eq!(pool.restarts(RestartCause::Recycled), 1);
    assert_reaped(first);
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn address_space_limit_turns_huge_allocation_into_crash() {
    let mut cfg = config(1);
    cfg.rayon_threads_per_child = 1;
    cfg.address_space_limit_bytes = Some(1024 * 1024 * 1024);
    // The expected abort would print a long backtrace into the test output.
    cfg.envs.push(("RUST_BACKTRACE".into(), "0".into()));
    let pool = start(cfg).await;
    let err = run_json(&pool, "leak", json!(2048)).await.unwrap_err();
    match err {
        CpuError::Crashed { cause } => assert!(cause.contains("SIGABRT"), "{cause}"),
        other => panic!("expected Crashed, got {other:?}"),
    }
    // Within the limit, allocations still work.
    run_json(&pool, "leak", json!(64))
        .await
        .expect("small leak");
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn parent_sigkill_leaves_no_children() {
    // Become a subreaper so the orphaned grandchildren are reparented to us
    // (not to a container init that may never reap them) and we can observe
    // their death precisely.
    nix::sys::prctl::set_child_subreaper(true).expect("subreaper");
    let exe = std::env::current_exe().unwrap();
    let mut parent = Command::new(exe)
        .env("POOL_TEST_PARENT", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn parent");
    let stdout = parent.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let pids: Vec<u32> = line
        .trim()
        .strip_prefix("PIDS ")
        .unwrap_or_else(|| panic!("unexpected parent output {line:?}"))
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    for &pid in &pids {
        assert!(
            proc_state(pid).is_some(),
            "child {pid} alive before the kill"
        );
    }
    parent.kill().unwrap(); // SIGKILL
    parent.wait().unwrap();
    let killed_at = Instant::now();
    eventually(
        "children die with their parent",
        Duration::from_secs(2),
        || {
            pids.iter()
                .all(|&pid| matches!(proc_state(pid), None | Some('Z')))
        },
    )
    .await;
    // Reap them (they are ours now) and check how they died.
    for &pid in &pids {
        use nix::sys::wait::{WaitStatus, waitpid};
        match waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                assert_eq!(signal, nix::sys::signal::Signal::SIGKILL)
            }
            Ok(other) => panic!("child {pid} ended unexpectedly: {other:?}"),
            // Already reaped by someone else: it is gone either way.
            Err(nix::errno::Errno::ECHILD) => {}
            Err(err) => panic!("waitpid {pid}: {err}"),
        }
        assert_reaped(pid);
    }
    assert!(killed_at.elapsed() < Duration::from_secs(2));
}

async fn shutdown_drains_then_kills() {
    let pool = start(config(2)).await;
    let pids = pool.pids();
    let long = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.run(request("spin", json!(20_000), Duration::from_secs(60)))
                .await
        }
    });
    let short = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.run(request("spin", json!(400), Duration::from_secs(60)))
                .await
        }
    });
    eventually("both children busy", Duration::from_secs(5), || {
        pool.busy() == 2
    })
    .await;
    // A third job queued behind the busy children never starts.
    let queued = tokio::spawn({
        let pool = pool.clone();
        async move { run_json(&pool, "echo", json!("queued")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    let started = Instant::now();
    pool.shutdown(Duration::from_millis(1500)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "shutdown took {took:?}"
    );
    assert!(short.await.unwrap().is_ok(), "short job finished in grace");
    let long = long.await.unwrap().unwrap_err();
    assert_eq!(long, CpuError::Interrupted);
    assert!(long.is_shutdown() && long.is_retryable());
    assert_eq!(queued.await.unwrap().unwrap_err(), CpuError::PoolClosed);
    assert_eq!(pool.live(), 0);
    assert!(pool.pids().is_empty());
    for pid in pids {
        assert_reaped(pid);
    }
    assert_eq!(
        run_json(&pool, "echo", json!(1)).await.unwrap_err(),
        CpuError::PoolClosed
    );
}

async fn cancelled_caller_kills_and_replaces_child() {
    let pool = start(config(2)).await;
    let before = pool.pids();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        pool.run(request("spin", json!(30_000), Duration::from_secs(60))),
    )
    .await;
    assert!(abandoned.is_err(), "the caller gave up");
    eventually("cancelled child replaced", Duration::from_secs(5), || {
        pool.restarts(RestartCause::Cancelled) == 1 && pool.live() == 2 && pool.busy() == 0
    })
    .await;
    let gone: Vec<u32> = before
        .iter()
        .copied()
        .filter(|p| !pool.pids().contains(p))
        .collect();
    assert_eq!(gone.len(), 1);
    assert_reaped(gone[0]);
    // Both children answer normally afterwards.
    let (a, b) = tokio::join!(echo_pid(&pool, json!("a")), echo_pid(&pool, json!("b")));
    assert!(pool.pids().contains(&a) && pool.pids().contains(&b));
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn rayon_threads_follow_config() {
    let mut cfg = config(1);
    cfg.rayon_threads_per_child = 3;
    let pool = start(cfg).await;
    assert_eq!(
        run_json(&pool, "rayon_threads", json!(null)).await.unwrap(),
        json!(3)
    );
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn stdout_writes_in_handlers_do_not_corrupt_frames() {
    let pool = start(config(1)).await;
    for _ in 0..3 {
        assert_eq!(
            run_json(&pool, "noisy", json!(null)).await.unwrap(),
            json!("quiet")
        );
    }
    assert_eq!(pool.restarts_total(), 0);
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn oversized_payload_is_rejected() {
    let mut cfg = config(1);
    cfg.max_frame_bytes = 1024;
    let pool = start(cfg).await;
    let err = pool
        .run(CpuRequest::new(
            "big",
            "echo",
            Bytes::from(vec![b'1'; 2000]),
            Duration::from_secs(5),
        ))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        CpuError::PayloadTooLarge {
            size: 2000,
            max: 1024
        }
    ));
    assert!(!err.is_retryable());
    echo_pid(&pool, json!("fits")).await;
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn bad_program_fails_start() {
    let mut cfg = config(1);
    cfg.program = "/nonexistent/taskmill-worker".into();
    assert!(matches!(
        CpuPool::start(cfg).await,
        Err(PoolError::Spawn { .. })
    ));
    // A program that never enters child mode fails the handshake quickly.
    let mut cfg = config(1);
    cfg.program = "/bin/true".into();
    match CpuPool::start(cfg).await {
        Err(PoolError::Handshake { reason, .. }) => {
            assert!(reason.contains("run_child"), "{reason}")
        }
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

async fn handoff_helper_returns_samples() {
    let pool = start(config(2)).await;
    let samples = measure_handoff(&pool, 200).await.expect("no-op jobs");
    assert_eq!(samples.len(), 200);
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn caller_giving_up_while_queued_starts_nothing() {
    let pool = start(config(1)).await;
    let busy = tokio::spawn({
        let pool = pool.clone();
        async move { run_json(&pool, "spin", json!(400)).await }
    });
    eventually("child busy", Duration::from_secs(5), || pool.busy() == 1).await;
    // Queued behind the busy child; the caller gives up before it starts.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        run_json(&pool, "panic", json!("must never run")),
    )
    .await;
    assert!(gave_up.is_err());
    assert!(busy.await.unwrap().is_ok());
    echo_pid(&pool, json!("next")).await;
    assert_eq!(pool.restarts_total(), 0, "the abandoned job never ran");
    pool.shutdown(Duration::from_secs(5)).await;
}

async fn dropping_the_pool_reaps_children() {
    let pool = start(config(2)).await;
    echo_pid(&pool, json!(1)).await;
    let pids = pool.pids();
    drop(pool);
    eventually("children reaped after drop", Duration::from_secs(5), || {
        pids.iter().all(|&pid| proc_state(pid).is_none())
    })
    .await;
}
