//! The scheduler's counters, and their rendering in Prometheus's text exposition format for
//! `GET /metrics` on `--http ADDR`.
//!
//! Counters and histograms are atomics bumped on the job path (no lock); gauges (builders,
//! slots, toolchains kept) are read from the registry when scraped. Labels come from fixed sets
//! (outcomes, directions), never from a client or builder name, so the series stay bounded.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a job left the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A builder returned the compiler's result (whatever its exit status).
    Finished,
    /// No builder for its platform was connected.
    NoBuilders,
    /// Every suitable builder was busy.
    NoCapacity,
    /// Builders failed it too often; the client compiles locally.
    BuildersFailed,
    /// A builder refused it as malformed or hostile.
    Refused,
    /// The client went away before a result.
    Abandoned,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Finished,
        Outcome::NoBuilders,
        Outcome::NoCapacity,
        Outcome::BuildersFailed,
        Outcome::Refused,
        Outcome::Abandoned,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::NoBuilders => "no_builders",
            Outcome::NoCapacity => "no_capacity",
            Outcome::BuildersFailed => "builders_failed",
            Outcome::Refused => "refused",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Upper bounds of the latency buckets, in seconds: from a placement (sub-millisecond) to a
/// long C++ compile.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0,
];

/// A latency histogram with the fixed [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, n) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, n) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// What the scheduler counts.
#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Placements after a builder failed a job.
    pub retries: AtomicU64,
    /// Chunk bytes relayed from clients to builders, and from builders to clients.
    pub to_builders: AtomicU64,
    pub to_clients: AtomicU64,
    /// From a job's arrival to its first placement.
    pub placement: Histogram,
    /// From a job's arrival to the builder's result.
    pub job: Histogram,
}

/// The registry's side of a scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub builders: u64,
    pub slots: u64,
    pub slots_busy: u64,
    pub jobs_in_flight: u64,
    pub toolchains_kept_bytes: u64,
}

impl Metrics {
    pub fn count(&self, outcome: Outcome) {
        let i = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or_default();
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP kiln_scheduler_jobs_total Jobs that left the scheduler, by outcome.\n\
             # TYPE kiln_scheduler_jobs_total counter\n",
        );
        for (o, n) in Outcome::ALL.iter().zip(&self.outcomes) {
            let _ = writeln!(
                out,
                "kiln_scheduler_jobs_total{{outcome=\"{}\"}} {}",
                o.label(),
                n.load(Ordering::Relaxed)
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "kiln_scheduler_job_retries_total",
            "Jobs placed again after a builder failed them.",
            self.retries.load(Ordering::Relaxed),
        );
        out.push_str(
            "# HELP kiln_scheduler_relayed_bytes_total Chunk bytes relayed, by direction.\n\
             # TYPE kiln_scheduler_relayed_bytes_total counter\n",
        );
        for (dir, v) in [
            ("to_builder", &self.to_builders),
            ("to_client", &self.to_clients),
        ] {
            let _ = writeln!(
                out,
                "kiln_scheduler_relayed_bytes_total{{direction=\"{dir}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.placement.render(
            &mut out,
            "kiln_scheduler_placement_seconds",
            "From a job's arrival to its first placement on a builder.",
        );
        self.job.render(
            &mut out,
            "kiln_scheduler_job_seconds",
            "From a job's arrival to its builder's result.",
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "kiln_scheduler_builders",
            "Builders connected.",
            g.builders,
        );
        gauge(
            &mut out,
            "kiln_scheduler_slots",
            "Job slots of the connected builders.",
            g.slots,
        );
        gauge(
            &mut out,
            "kiln_scheduler_slots_busy",
            "Slots running a job.",
            g.slots_busy,
        );
        gauge(
            &mut out,
            "kiln_scheduler_jobs_in_flight",
            "Jobs received and not yet over.",
            g.jobs_in_flight,
        );
        gauge(
            &mut out,
            "kiln_scheduler_toolchains_kept_bytes",
            "Toolchain archives kept to hand to builders.",
            g.toolchains_kept_bytes,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_has_every_series_with_cumulative_buckets() {
        let m = Metrics::default();
        m.count(Outcome::Finished);
        m.count(Outcome::Finished);
        m.count(Outcome::NoCapacity);
        m.placement.observe(Duration::from_micros(700));
        m.placement.observe(Duration::from_millis(30));
        let text = m.render(Gauges {
            builders: 2,
            slots: 8,
            slots_busy: 3,
            ..Gauges::default()
        });
        for line in [
            "kiln_scheduler_jobs_total{outcome=\"finished\"} 2",
            "kiln_scheduler_jobs_total{outcome=\"no_capacity\"} 1",
            "kiln_scheduler_jobs_total{outcome=\"abandoned\"} 0",
            "kiln_scheduler_placement_seconds_bucket{le=\"0.0005\"} 0",
            "kiln_scheduler_placement_seconds_bucket{le=\"0.001\"} 1",
            "kiln_scheduler_placement_seconds_bucket{le=\"0.05\"} 2",
            "kiln_scheduler_placement_seconds_bucket{le=\"+Inf\"} 2",
            "kiln_scheduler_placement_seconds_sum 0.0307",
            "kiln_scheduler_placement_seconds_count 2",
            "kiln_scheduler_job_seconds_count 0",
            "kiln_scheduler_slots 8",
            "kiln_scheduler_slots_busy 3",
            "# TYPE kiln_scheduler_builders gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
