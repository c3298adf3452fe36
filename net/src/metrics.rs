//! Prometheus's text exposition format (version 0.0.4), which kiln's servers speak on
//! `GET /metrics`: counters, gauges and fixed-bucket latency histograms, written as text.
//! Series are named by the caller; labels must come from fixed sets so series stay bounded.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The `Content-Type` of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency buckets, in seconds: from a placement (sub-millisecond) to a
/// long C++ compile.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0,
];

/// A latency histogram with fixed buckets, updated without a lock.
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
}

/// Text being written, one metric family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, help, "counter");
        let _ = writeln!(self.out, "{name} {value}");
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, help, "gauge");
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A counter with one label: `(label value, count)` pairs.
    pub fn labelled_counter(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) {
        self.family(name, help, "counter");
        for (v, n) in values {
            let v = escape_label(v);
            let _ = writeln!(self.out, "{name}{{{label}=\"{v}\"}} {n}");
        }
    }

    /// A counter with two labels: `((first, second), count)` pairs.
    pub fn counter_by_two(
        &mut self,
        name: &str,
        help: &str,
        labels: (&str, &str),
        values: &[((&str, &str), u64)],
    ) {
        self.family(name, help, "counter");
        for ((a, b), n) in values {
            let (a, b) = (escape_label(a), escape_label(b));
            let _ = writeln!(
                self.out,
                "{name}{{{}=\"{a}\",{}=\"{b}\"}} {n}",
                labels.0, labels.1
            );
        }
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, help, "histogram");
        for (bound, n) in BUCKETS.iter().zip(&h.counts) {
            let _ = writeln!(
                self.out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let count = h.count.load(Ordering::Relaxed);
        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            self.out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the exposition format quotes it: backslash, quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.labelled_counter("a_total", "A.", "who", &[("x\"y\\z\nw", 1)]);
        let text = e.finish();
        assert!(
            text.lines().any(|l| l == r#"a_total{who="x\"y\\z\nw"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn families_are_typed_and_buckets_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_millis(30));
        let mut e = Exposition::default();
        e.counter("a_total", "A.", 3);
        e.labelled_counter("b_total", "B.", "kind", &[("x", 1), ("y", 0)]);
        e.gauge("c", "C.", 7);
        e.histogram("d_seconds", "D.", &h);
        let text = e.finish();
        for line in [
            "# TYPE a_total counter",
            "a_total 3",
            "b_total{kind=\"x\"} 1",
            "b_total{kind=\"y\"} 0",
            "# TYPE c gauge",
            "c 7",
            "# TYPE d_seconds histogram",
            "d_seconds_bucket{le=\"0.0005\"} 0",
            "d_seconds_bucket{le=\"0.001\"} 1",
            "d_seconds_bucket{le=\"0.05\"} 2",
            "d_seconds_bucket{le=\"+Inf\"} 2",
            "d_seconds_sum 0.0307",
            "d_seconds_count 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
