//! `taskmill bench` runs end to end through the real binary against the real
//! broker and prints well-formed results: every job drained, every ratio
//! positive, the queues it made deleted. Speed is not judged here (that is
//! the benchmark's job), only that the figures exist and make sense.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Runs `taskmill bench <args> --json` and returns its JSON objects.
fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .env("TASKMILL_AMQP_URL", common::amqp_url())
        .env("TASKMILL_LOG_LEVEL", "warn")
        .env("TASKMILL_BENCH_PYTHON", python())
        .output()
        .expect("running taskmill bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "taskmill bench {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // The human table goes to stderr with --json.
    assert!(
        stderr.contains("scenario") && stderr.contains("verdict"),
        "no table on stderr:\n{stderr}"
    );
    stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{stdout}"))
        })
        .collect()
}

/// The Python with Celery for the `celery` scenario: `CELERY_PYTHON`, else
/// the repository's `.venv` (`make venv`).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CELERY_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

fn common_fields(v: &Value, scenario: &str) {
    assert_eq!(v["scenario"], scenario);
    assert_eq!(v["queue_type"], "classic");
    assert!(v["run_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(num(v, &["process_memory", "peak_rss_bytes"]) > 0.0);
    assert!(v["targets"].is_array());
}

#[test]
fn noop_reports_every_phase_against_the_ceiling() {
    let out = bench(&["noop", "--jobs", "2000", "--queue-type", "classic"]);
    assert_eq!(out.len(), 1, "one object per scenario: {out:?}");
    let v = &out[0];
    common_fields(v, "noop");
    assert_eq!(num(v, &["jobs"]), 2000.0);
    assert_eq!(num(v, &["jobs_drained"]), 2000.0);
    assert_eq!(num(v, &["jobs_not_ok"]), 0.0);
    for phase in ["publish", "drain", "end_to_end"] {
        for field in [
            "taskmill_jobs_per_s",
            "ceiling_jobs_per_s",
            "pct_of_ceiling",
        ] {
            assert!(num(v, &[phase, field]) > 0.0, "{phase}.{field} in {v:#}");
        }
    }
    // Publish and drain carry the issue's >= 80 % targets.
    assert_eq!(v["targets"].as_array().unwrap().len(), 2);
    let run_id = v["run_id"].as_str().expect("run_id");
    let left = queues_of_run(run_id);
    assert!(left.is_empty(), "queues left behind: {left:?}");
}

#[test]
fn io_reports_drain_against_ideal_and_worker_memory() {
    let out = bench(&[
        "io",
        "--jobs",
        "500",
        "--in-flight",
        "200",
        "--queue-type",
        "classic",
    ]);
    assert_eq!(out.len(), 1);
    let v = &out[0];
    common_fields(v, "io");
    assert_eq!(num(v, &["jobs_drained"]), 500.0);
    assert_eq!(num(v, &["jobs_not_ok"]), 0.0);
    // 500 jobs of 100 ms, 1000 at once: the ideal is 0.05 s, and no drain of
    // 100 ms jobs can be shorter than one job.
    assert!((num(v, &["ideal_s"]) - 0.05).abs() < 1e-9);
    assert!(num(v, &["drain_s"]) >= 0.1);
    assert!(num(v, &["bound_s"]) >= num(v, &["ideal_s"]));
    assert!(num(v, &["drain_vs_bound"]) > 0.0);
    assert!(num(v, &["noop_drain_jobs_per_s"]) > 0.0);
    assert!(num(v, &["ceiling_consume_s"]) > 0.0);
    let mem = &v["worker_memory"];
    assert!(num(mem, &["idle", "rss_bytes"]) > 1e6);
    assert!(num(mem, &["loaded", "rss_bytes"]) > 1e6);
    assert_eq!(num(mem, &["in_flight"]), 200.0);
}

#[test]
fn cpu_reports_both_job_sizes_on_1_and_n_processes_and_the_hand_off() {
    let out = bench(&[
        "cpu",
        "--jobs",
        "20",
        "--rounds",
        "1",
        "--queue-type",
        "classic",
    ]);
    let v = &out[0];
    common_fields(v, "cpu");
    let runs = v["runs"].as_array().expect("runs");
    let sizes = v["pool_sizes"].as_array().expect("pool sizes");
    assert_eq!(runs.len(), 2 * sizes.len(), "{v:#}");
    assert_eq!(sizes[0], 1);
    for run in runs {
        let jobs = if run["job_ms"] == 10 { 20.0 } else { 200.0 };
        assert_eq!(num(run, &["jobs"]), jobs, "{run:#}");
        assert!(num(run, &["jobs_per_s"]) > 0.0);
        assert!(num(run, &["raw_compute_jobs_per_s"]) > 0.0);
    }
    assert!(v["speedups"].is_array());
    let p50 = num(v, &["handoff", "p50_us"]);
    assert!(p50 > 0.0 && num(v, &["handoff", "p99_us"]) >= p50, "{v:#}");
    assert_eq!(num(v, &["handoff", "samples"]), 5000.0);
    let targets = v["targets"].as_array().expect("targets");
    assert!(
        targets
            .iter()
            .any(|t| t["measure"] == "hand-off round trip p50 us"),
        "{targets:#?}"
    );
}

#[test]
fn latency_at_a_fixed_rate_has_percentiles_for_both_sides() {
    let out = bench(&[
        "latency",
        "--rate",
        "200",
        "--seconds",
        "1",
        "--queue-type",
        "classic",
    ]);
    let v = &out[0];
    common_fields(v, "latency");
    let level = &v["levels"][0];
    assert_eq!(num(level, &["jobs"]), 200.0);
    assert_eq!(num(level, &["samples"]), 200.0);
    assert_eq!(num(level, &["ceiling_samples"]), 200.0);
    for side in ["taskmill_ms", "ceiling_ms"] {
        let p50 = num(level, &[side, "p50"]);
        let p99 = num(level, &[side, "p99"]);
        assert!(p50 > 0.0 && p99 >= p50, "{side} in {level:#}");
    }
}

#[test]
fn retry_succeeds_every_job_exactly_once_in_both_tiers() {
    let out = bench(&[
        "retry",
        "--jobs",
        "500",
        "--rounds",
        "1",
        "--queue-type",
        "classic",
    ]);
    let v = &out[0];
    common_fields(v, "retry");
    assert_eq!(num(v, &["jobs"]), 500.0);
    assert_eq!(num(v, &["failing_jobs"]), 100.0, "20 % fail once");
    assert_eq!(num(v, &["duplicates"]), 0.0, "{v:#}");
    assert_eq!(num(v, &["missing"]), 0.0);
    assert_eq!(num(v, &["retries"]), 200.0, "100 per tier");
    let tiers = v["tiers"].as_array().expect("tiers");
    let backoffs: Vec<f64> = tiers.iter().map(|t| num(t, &["backoff_ms"])).collect();
    assert_eq!(backoffs, [0.0, 1000.0]);
    for t in tiers {
        assert_eq!(num(t, &["retries_per_failing_job"]), 1.0, "{t:#}");
        assert_eq!(num(t, &["duplicates"]), 0.0, "{t:#}");
        assert!(num(t, &["completed_jobs_per_s"]) > 0.0, "{t:#}");
        assert!(num(t, &["ideal_jobs_per_s"]) > 0.0, "{t:#}");
        // The last failing job's copy waits out its backoff.
        assert!(num(t, &["drain_s"]) >= num(t, &["backoff_ms"]) / 1000.0);
    }
    let targets = v["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "one duplicates target per tier");
    assert!(targets.iter().all(|t| t["met"] == true), "{targets:#?}");
    let left = queues_of_run(v["run_id"].as_str().unwrap());
    assert!(left.is_empty(), "queues left behind: {left:?}");
}

#[test]
fn mixed_reports_io_latency_with_the_pool_saturated_and_idle() {
    let out = bench(&[
        "mixed",
        "--jobs",
        "300",
        "--rounds",
        "1",
        "--queue-type",
        "classic",
    ]);
    let v = &out[0];
    common_fields(v, "mixed");
    assert_eq!(num(v, &["io_jobs"]), 300.0);
    assert_eq!(num(v, &["jobs_not_ok"]), 0.0);
    // Enqueue to finished includes the 100 ms sleep.
    for side in ["saturated_ms", "idle_ms"] {
        let p50 = num(v, &[side, "p50"]);
        assert!(
            p50 >= 100.0 && num(v, &[side, "p99"]) >= p50,
            "{side}: {v:#}"
        );
    }
    assert!(num(v, &["p99_bound_ms"]) == 300.0);
    let rounds = v["per_round"].as_array().expect("per_round");
    let sides: Vec<&str> = rounds.iter().map(|r| r["side"].as_str().unwrap()).collect();
    assert_eq!(sides, ["idle", "saturated"]);
    for r in rounds {
        assert_eq!(num(r, &["samples"]), 300.0, "{r:#}");
    }
    // The CPU work outlasted the IO phase: the pool was busy, and work was
    // still queued when the worker stopped.
    assert!(num(v, &["cpu_pool_busy_pct"]) > 0.0, "{v:#}");
    assert!(num(v, &["cpu_jobs_left_queued"]) > 0.0, "{v:#}");
    assert_eq!(num(&rounds[0], &["cpu_jobs_done_in_io_phase"]), 0.0);
    let targets = v["targets"].as_array().expect("targets");
    assert!(
        targets
            .iter()
            .any(|t| t["measure"] == "io p99 ms, pool saturated vs sleep"),
        "{targets:#?}"
    );
}

#[test]
fn all_runs_every_scenario_and_leaves_no_queue_behind() {
    let out = bench(&[
        "all",
        "--jobs",
        "2000",
        "--rounds",
        "1",
        "--seconds",
        "1",
        "--in-flight",
        "100",
        "--queue-type",
        "classic",
    ]);
    let names: Vec<&str> = out
        .iter()
        .map(|v| v["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "noop", "io", "cpu", "mixed", "latency", "retry", "payload", "celery"
        ]
    );
    assert_eq!(num(&out[7], &["tasks"]), 200.0, "celery gets a tenth");
    for v in &out {
        assert_eq!(v["run_id"], out[0]["run_id"], "one run");
        assert_eq!(v["jobs_not_ok"].as_f64().unwrap_or(0.0), 0.0, "{v:#}");
    }
    let retry = &out[5];
    assert_eq!(num(retry, &["jobs"]), 200.0, "retry gets a tenth");
    assert_eq!(num(retry, &["duplicates"]), 0.0, "{retry:#}");
    assert_eq!(
        num(retry, &["retries"]),
        2.0 * num(retry, &["failing_jobs"]),
        "one retry per failing job in each of the two tiers"
    );
    assert_eq!(num(&out[3], &["io_jobs"]), 100.0, "mixed gets a fortieth");
    let left = queues_of_run(out[0]["run_id"].as_str().unwrap());
    assert!(left.is_empty(), "queues left behind: {left:?}");
}

#[test]
fn celery_drains_the_same_tasks_with_taskmill_and_celery() {
    let out = bench(&["celery", "--jobs", "300", "--rounds", "2"]);
    assert_eq!(out.len(), 1, "one object per scenario: {out:?}");
    let v = &out[0];
    assert_eq!(v["scenario"], "celery");
    assert_eq!(num(v, &["tasks"]), 300.0);
    for field in [
        "taskmill_tasks_per_s",
        "celery_tasks_per_s",
        "ratio_taskmill_to_celery",
        "python_send_tasks_per_s",
    ] {
        assert!(num(v, &[field]) > 0.0, "{field} in {v:#}");
    }
    assert!(v["store"].as_str().is_some_and(|s| s.starts_with("sqlite")));
    let rounds = v["per_round"].as_array().expect("per_round");
    let sides: Vec<&str> = rounds.iter().map(|r| r["side"].as_str().unwrap()).collect();
    assert_eq!(
        sides,
        ["taskmill", "celery", "celery", "taskmill"],
        "alternating"
    );
    for r in rounds.iter().filter(|r| r["side"] == "taskmill") {
        assert_eq!(num(r, &["taskmill_ok"]), 300.0, "{r:#}");
    }
    let run_id = v["run_id"].as_str().expect("run_id");
    let left = queues_of_run(run_id);
    assert!(left.is_empty(), "queues left behind: {left:?}");
    let ps = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .expect("ps");
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines().any(|l| l.contains(run_id)),
        "a worker of the run is still running:\n{ps}"
    );
}

/// Names of the queues whose name contains `run_id`, from `rabbitmqctl`
/// when it is available (empty otherwise).
fn queues_of_run(run_id: &str) -> Vec<String> {
    let Ok(out) = Command::new("rabbitmqctl")
        .args(["list_queues", "name", "--quiet", "--no-table-headers"])
        .output()
    else {
        return Default::default();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("bench-") && l.contains(run_id))
        .map(str::to_string)
        .collect()
}
