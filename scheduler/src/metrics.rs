//! The scheduler's counters, rendered for `GET /metrics` on `--http ADDR`.
//!
//! Counters and histograms are atomics bumped on the job path (no lock); gauges (builders,
//! slots, toolchains kept) are read from the registry when scraped. Labels come from fixed sets
//! (outcomes, directions) or from the names in the client tokens file, which the operator
//! writes; never from what a client or builder says, so the series stay bounded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kiln_net::metrics::{Exposition, Histogram};

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

    pub fn label(self) -> &'static str {
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

/// The most fallback causes kept apart for one client (kiln has 13).
pub const MAX_CAUSES: usize = 32;

/// What the scheduler counts.
#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Placements after a builder failed a job.
    pub retries: AtomicU64,
    /// Cross-check reports that marked a builder suspect.
    pub suspect_reports: AtomicU64,
    /// Chunk bytes relayed from clients to builders, and from builders to clients.
    pub to_builders: AtomicU64,
    pub to_clients: AtomicU64,
    /// Toolchain bytes sent to builders from the scheduler's own store.
    pub toolchains_served: AtomicU64,
    /// From a job's arrival to its first placement.
    pub placement: Histogram,
    /// From a job's arrival to the builder's result.
    pub job: Histogram,
    /// Jobs received, by the name of the client's token (`anyone` on an open farm).
    clients: Mutex<BTreeMap<String, u64>>,
    /// Compiles clients reported running locally instead, by client and cause.
    fallbacks: Mutex<BTreeMap<(String, String), u64>>,
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

    /// A job arrived from the client whose token is named `client`.
    pub fn received_from(&self, client: &str) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        *clients.entry(client.to_owned()).or_default() += 1;
    }

    /// The client whose token is named `client` compiled `count` jobs locally for `cause`.
    /// Causes are the client's word and become labels: past [`MAX_CAUSES`] of them for one
    /// client, new ones are counted as `other`, so no client can grow the series without bound.
    pub fn fallbacks_from(&self, client: &str, cause: &str, count: u64) {
        let mut fallbacks = self.fallbacks.lock().unwrap_or_else(|e| e.into_inner());
        let key = (client.to_owned(), cause.to_owned());
        let known = fallbacks.contains_key(&key)
            || fallbacks.keys().filter(|(c, _)| c == client).count() < MAX_CAUSES;
        let key = if known {
            key
        } else {
            (client.to_owned(), "other".to_owned())
        };
        let n = fallbacks.entry(key).or_default();
        *n = n.saturating_add(count);
    }

    /// Reported fallbacks, by client and cause, for the dashboard.
    pub fn fallbacks(&self) -> Vec<(String, String, u64)> {
        let fallbacks = self.fallbacks.lock().unwrap_or_else(|e| e.into_inner());
        fallbacks
            .iter()
            .map(|((client, cause), n)| (client.clone(), cause.clone(), *n))
            .collect()
    }

    /// The exposition text.
    pub fn render(&self, g: Gauges) -> String {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let clients: Vec<(&str, u64)> = clients.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let outcomes: Vec<(&str, u64)> = Outcome::ALL
            .iter()
            .zip(&self.outcomes)
            .map(|(o, n)| (o.label(), load(n)))
            .collect();
        let mut e = Exposition::default();
        e.labelled_counter(
            "kiln_scheduler_jobs_total",
            "Jobs that left the scheduler, by outcome.",
            "outcome",
            &outcomes,
        );
        e.labelled_counter(
            "kiln_scheduler_client_jobs_total",
            "Jobs received, by the name of the client's token in the tokens file.",
            "client",
            &clients,
        );
        let fallbacks = self.fallbacks();
        let fallbacks: Vec<((&str, &str), u64)> = fallbacks
            .iter()
            .map(|(client, cause, n)| ((client.as_str(), cause.as_str()), *n))
            .collect();
        e.counter_by_two(
            "kiln_scheduler_client_fallbacks_total",
            "Compiles clients ran locally instead of on the farm, as they reported them, by the \
             name of the client's token and the cause (kiln stats' names).",
            ("client", "cause"),
            &fallbacks,
        );
        e.counter(
            "kiln_scheduler_job_retries_total",
            "Jobs placed again after a builder failed them.",
            load(&self.retries),
        );
        e.counter(
            "kiln_scheduler_suspect_reports_total",
            "Cross-check reports that marked a builder suspect.",
            load(&self.suspect_reports),
        );
        e.labelled_counter(
            "kiln_scheduler_relayed_bytes_total",
            "Chunk bytes relayed, by direction.",
            "direction",
            &[
                ("to_builder", load(&self.to_builders)),
                ("to_client", load(&self.to_clients)),
            ],
        );
        e.counter(
            "kiln_scheduler_toolchains_served_bytes_total",
            "Toolchain bytes sent to builders from the scheduler's own store.",
            load(&self.toolchains_served),
        );
        e.histogram(
            "kiln_scheduler_placement_seconds",
            "From a job's arrival to its first placement on a builder.",
            &self.placement,
        );
        e.histogram(
            "kiln_scheduler_job_seconds",
            "From a job's arrival to its builder's result.",
            &self.job,
        );
        e.gauge("kiln_scheduler_builders", "Builders connected.", g.builders);
        e.gauge(
            "kiln_scheduler_slots",
            "Job slots of the connected builders.",
            g.slots,
        );
        e.gauge(
            "kiln_scheduler_slots_busy",
            "Slots running a job.",
            g.slots_busy,
        );
        e.gauge(
            "kiln_scheduler_jobs_in_flight",
            "Jobs received and not yet over.",
            g.jobs_in_flight,
        );
        e.gauge(
            "kiln_scheduler_toolchains_kept_bytes",
            "Toolchain archives kept to hand to builders.",
            g.toolchains_kept_bytes,
        );
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_and_gauge_is_exposed() {
        let m = Metrics::default();
        m.count(Outcome::Finished);
        m.count(Outcome::Finished);
        m.count(Outcome::NoCapacity);
        m.received_from("ci");
        m.received_from("alice");
        m.received_from("ci");
        m.fallbacks_from("alice", "stalled", 2);
        m.fallbacks_from("alice", "stalled", 1);
        m.fallbacks_from("ci", "no_capacity", 4);
        // A client inventing causes ends up in one series, not thousands.
        for i in 0..100 {
            m.fallbacks_from("mallory", &format!("cause_{i}"), 1);
        }
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
            "kiln_scheduler_client_jobs_total{client=\"ci\"} 2",
            "kiln_scheduler_client_jobs_total{client=\"alice\"} 1",
            "kiln_scheduler_client_fallbacks_total{client=\"alice\",cause=\"stalled\"} 3",
            "kiln_scheduler_client_fallbacks_total{client=\"ci\",cause=\"no_capacity\"} 4",
            "kiln_scheduler_client_fallbacks_total{client=\"mallory\",cause=\"other\"} 68",
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
