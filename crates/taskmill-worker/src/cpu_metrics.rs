//! Exposes the CPU pool's state as `taskmill_cpu_pool_busy`, `_size` and
//! `_live`, read at scrape time so they are never stale.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, Opts};
use taskmill_cpu::CpuPool;

pub(crate) struct PoolCollector {
    pool: CpuPool,
    busy: IntGauge,
    size: IntGauge,
    live: IntGauge,
}

impl PoolCollector {
    pub(crate) fn new(pool: CpuPool) -> Self {
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(Opts::new(name, help)).expect("valid metric")
        };
        PoolCollector {
            pool,
            busy: gauge(
                "taskmill_cpu_pool_busy",
                "CPU worker processes running a job now.",
            ),
            size: gauge(
                "taskmill_cpu_pool_size",
                "Configured number of CPU worker processes.",
            ),
            live: gauge(
                "taskmill_cpu_pool_live",
                "CPU worker processes alive and ready or busy.",
            ),
        }
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        [&self.busy, &self.size, &self.live]
            .into_iter()
            .flat_map(|g| g.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.busy.set(self.pool.busy() as i64);
        self.size.set(self.pool.size() as i64);
        self.live.set(self.pool.live() as i64);
        [&self.busy, &self.size, &self.live]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}
