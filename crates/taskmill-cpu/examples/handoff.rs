//! Informal hand-off round-trip figures for a no-op CPU job.
//!
//! `cargo run --release -p taskmill-cpu --example handoff -- [size] [samples]`
//! (size 0 = one process per core). Prints p50/p90/p99/max of sequential
//! round trips, then the throughput of `size` concurrent callers.

use std::time::{Duration, Instant};

use taskmill_cpu::{CpuPool, CpuRegistry, CpuRequest, NOOP_KIND, PoolConfig, measure_handoff};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn main() {
    if taskmill_cpu::is_child_mode() {
        taskmill_cpu::run_child(&CpuRegistry::new());
    }
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let samples: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let pool = CpuPool::start(PoolConfig::for_current_exe(size))
            .await
            .expect("pool starts");
        // Warm up: page in both sides, settle the scheduler.
        measure_handoff(&pool, 200).await.expect("warm-up");
        let mut rtt = measure_handoff(&pool, samples).await.expect("samples");
        rtt.sort_unstable();
        println!(
            "pool size {}: {} sequential no-op round trips: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            pool.size(),
            rtt.len(),
            percentile(&rtt, 0.50),
            percentile(&rtt, 0.90),
            percentile(&rtt, 0.99),
            rtt[rtt.len() - 1],
        );

        let callers = pool.size() * 4;
        let per_caller = samples / callers.max(1);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..callers {
            let pool = pool.clone();
            tasks.spawn(async move {
                for _ in 0..per_caller {
                    let req = CpuRequest::new("x", NOOP_KIND, &b""[..], Duration::from_secs(10));
                    pool.run(req).await.expect("no-op job");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let took = started.elapsed();
        println!(
            "{} concurrent callers, {} no-op jobs: {:.0} jobs/s",
            callers,
            callers * per_caller,
            (callers * per_caller) as f64 / took.as_secs_f64()
        );
        pool.shutdown(Duration::from_secs(5)).await;
    });
}
