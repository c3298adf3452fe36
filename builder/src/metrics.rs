//! The builder's counters, for `GET /metrics` on `--http ADDR` (optional: a builder needs no
//! open port, so this is for those whose operators scrape them).

use std::sync::atomic::{AtomicU64, Ordering};

use kiln_net::metrics::{Exposition, Histogram};

/// What the builder counts.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Jobs that ran to a result (any exit status), were handed back to be placed elsewhere,
    /// and were refused as malformed or hostile.
    pub finished: AtomicU64,
    pub retried: AtomicU64,
    pub refused: AtomicU64,
    /// Content received: toolchain archives and input files.
    pub toolchain_bytes: AtomicU64,
    pub input_bytes: AtomicU64,
    /// The builder's own time per job outside the jail: fetching what is missing, taking a
    /// container, placing inputs, reading outputs…
    pub overhead: Histogram,
    /// …and in it: entering the jail, the command, leaving.
    pub run: Histogram,
}

/// The state's side of a scrape.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Gauges {
    pub slots: u64,
    pub slots_busy: u64,
    pub toolchains: u64,
    pub toolchain_bytes: u64,
    pub containers_ready: u64,
}

impl Metrics {
    pub fn render(&self, g: Gauges) -> String {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let mut e = Exposition::default();
        e.labelled_counter(
            "kiln_builder_jobs_total",
            "Jobs by result: finished (the command's own result), retry (handed back), refused.",
            "result",
            &[
                ("finished", load(&self.finished)),
                ("retry", load(&self.retried)),
                ("refused", load(&self.refused)),
            ],
        );
        e.labelled_counter(
            "kiln_builder_received_bytes_total",
            "Content received, by kind.",
            "kind",
            &[
                ("toolchain", load(&self.toolchain_bytes)),
                ("input", load(&self.input_bytes)),
            ],
        );
        e.histogram(
            "kiln_builder_overhead_seconds",
            "The builder's own time per job outside the jail (fetch, container, inputs, outputs).",
            &self.overhead,
        );
        e.histogram(
            "kiln_builder_run_seconds",
            "Time in the jail: entering it, the command, leaving.",
            &self.run,
        );
        e.gauge("kiln_builder_slots", "Job slots.", g.slots);
        e.gauge(
            "kiln_builder_slots_busy",
            "Slots running a job.",
            g.slots_busy,
        );
        e.gauge("kiln_builder_toolchains", "Toolchains held.", g.toolchains);
        e.gauge(
            "kiln_builder_toolchain_cache_bytes",
            "Bytes of toolchain archives held.",
            g.toolchain_bytes,
        );
        e.gauge(
            "kiln_builder_containers_ready",
            "Pooled containers waiting for a job.",
            g.containers_ready,
        );
        e.finish()
    }
}
