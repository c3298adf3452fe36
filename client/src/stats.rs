//! Statistics: what kiln did with each compile, kept in `DIR/stats/` as eight small counter
//! files (a process picks one by its pid, so parallel builds rarely wait on each other).

use std::path::{Path, PathBuf};

use kiln_cache::{Counters, Limits, Store};
use serde_json::json;

use crate::args::Reason;

const SHARDS: u32 = 8;

/// What happened to one invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit {
        saved_ms: i64,
    },
    Miss,
    Uncacheable(Reason),
    /// The compiler itself failed: passed through, not cached.
    CompileFailed,
    /// kiln failed and ran the compiler directly.
    Error,
}

fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("stats")
}

/// Applies `f` to this process's counter file; a failure only loses statistics, and a cache
/// directory kiln cannot write is reported (once). On a full disk a new counter file cannot be
/// made, so the count goes to one that exists: a full cache still counts what it serves.
fn bump(cache_dir: &Path, f: impl Fn(&mut Counters)) {
    let own = std::process::id() % SHARDS;
    let mut result = Ok(());
    for n in (0..SHARDS).map(|k| (own + k) % SHARDS) {
        let shard = dir(cache_dir).join(n.to_string());
        if n != own && !shard.metadata().is_ok_and(|m| m.len() > 0) {
            continue;
        }
        // A write that found no space wrote nothing (the file was new and empty, or is
        // rewritten within its own block): the count is made again in another file.
        result = Counters::update(&shard, &f).map(drop);
        if !matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::StorageFull) {
            break;
        }
    }
    if let Err(e) = result {
        if unwritable(&e) {
            warn_unwritable(
                cache_dir,
                &e,
                "kiln keeps no statistics and stores no results",
            );
        } else {
            tracing::debug!(error = %e, "cannot update statistics");
        }
    }
}

/// Whether `e` says the cache directory cannot be written at all (its permissions, a
/// read-only file system), rather than that one write failed.
pub fn unwritable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

/// Tells the user, on stderr and once per process, that kiln cannot write its cache directory:
/// compiles go on without the cache, but nothing is stored or counted, which would otherwise
/// go unnoticed (every compile still succeeds).
/// `then` says what kiln does about it, as in `compiling without the cache`.
pub fn warn_unwritable(cache_dir: &Path, e: &dyn std::fmt::Display, then: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        eprintln!(
            "kiln: warning: cannot write to the cache directory {} ({e}); {then}. Set KILN_DIR \
             to a directory kiln can write, or make this one writable (its permissions, or a \
             read-only mount)",
            cache_dir.display()
        );
    });
}

/// [`warn_unwritable`] for a compiler that could not write kiln's dependency list (at `ours`,
/// in the cache directory), with the reason the compiler gave: its message's last words, as
/// in `…/x.d: Read-only file system`.
pub fn warn_unwritable_deps(cache_dir: &Path, stderr: &[u8], ours: &str) {
    let stderr = String::from_utf8_lossy(stderr);
    let reason = stderr
        .lines()
        .find(|l| l.contains(ours))
        .and_then(|l| l.rsplit_once(": "))
        .map_or(
            "the compiler could not write its dependency list there",
            |(_, r)| r.trim(),
        );
    // Only a directory kiln cannot write at all is worth a word on the compile's stderr. A full
    // disk is passing (eviction makes room) and is counted as an error; a build's stderr stays
    // the compiler's own.
    if reason.contains("Read-only file system") || reason.contains("Permission denied") {
        warn_unwritable(
            cache_dir,
            &reason,
            "compiling without the cache, and keeping no statistics",
        );
    } else {
        tracing::debug!(%reason, "the compiler could not write kiln's dependency list");
    }
}

/// Counts one outcome, plus `corrupt` damaged entries met on the way.
pub fn record(cache_dir: &Path, outcome: Outcome, corrupt: u32) {
    bump(cache_dir, |c| {
        match outcome {
            Outcome::Hit { saved_ms } => {
                c.add("hits", 1);
                c.add("time_saved_ms", saved_ms.max(0));
            }
            Outcome::Miss => c.add("misses", 1),
            Outcome::Uncacheable(r) => c.add(&format!("uncacheable.{}", r.name()), 1),
            Outcome::CompileFailed => c.add("compile_failed", 1),
            Outcome::Error => c.add("errors", 1),
        }
        c.add("corrupt_entries", i64::from(corrupt));
    });
}

/// Counts one `kiln go-cacheprog` session.
pub fn record_go(cache_dir: &Path, counts: crate::gocache::Counts) {
    bump(cache_dir, |c| {
        c.add("go_gets", counts.gets);
        c.add("go_hits", counts.hits);
        c.add("go_puts", counts.puts);
    });
}

/// Counts what one process did with the remote tier.
pub fn record_remote(cache_dir: &Path, counts: crate::remote::Counts) {
    if counts != crate::remote::Counts::default() {
        bump(cache_dir, |c| {
            c.add("remote_hits", counts.hits);
            c.add("remote_errors", counts.errors);
            c.add("remote_uploads", counts.uploads);
        });
    }
}

/// Counts a compile sent to the farm: done there, or the cause it came back to this machine.
/// `Ok(true)` when this client had to upload the compiler's toolchain.
/// A cross-check of a farm result: `agreed` when the second compile made the same outputs.
pub fn record_cross_check(cache_dir: &Path, agreed: bool) {
    bump(cache_dir, |c| {
        c.add("cross_checks", 1);
        c.add("cross_check_mismatches", i64::from(!agreed));
    });
}

pub fn record_dist(cache_dir: &Path, outcome: Result<bool, &'static str>) {
    bump(cache_dir, |c| match outcome {
        Ok(sent_toolchain) => {
            c.add("dist_compiles", 1);
            c.add("dist_toolchain_uploads", i64::from(sent_toolchain));
        }
        Err(cause) => c.add(&format!("dist_fallback.{cause}"), 1),
    });
}

/// The sum of all shards.
pub fn load(cache_dir: &Path) -> Counters {
    let mut total = Counters::default();
    for n in 0..SHARDS {
        if let Ok(c) = Counters::read(&dir(cache_dir).join(n.to_string())) {
            total.merge(&c);
        }
    }
    total
}

/// Resets every counter.
pub fn zero(cache_dir: &Path) -> std::io::Result<()> {
    for n in 0..SHARDS {
        Counters::update(&dir(cache_dir).join(n.to_string()), |c| c.values.clear())?;
    }
    Ok(())
}

/// The statistics as a JSON document.
pub fn to_json(c: &Counters, store: &Store, limits: Limits) -> serde_json::Value {
    let (size, files) = store.usage();
    let uncacheable: serde_json::Map<String, serde_json::Value> = Reason::NAMES
        .iter()
        .map(|r| (r.to_string(), json!(c.get(&format!("uncacheable.{r}")))))
        .filter(|(_, v)| v.as_i64() != Some(0))
        .collect();
    let uncacheable_total: i64 = Reason::NAMES
        .iter()
        .map(|r| c.get(&format!("uncacheable.{r}")))
        .sum();
    let dist_fallbacks: serde_json::Map<String, serde_json::Value> = crate::dist::Fallback::NAMES
        .iter()
        .map(|cause| {
            (
                cause.to_string(),
                json!(c.get(&format!("dist_fallback.{cause}"))),
            )
        })
        .filter(|(_, v)| v.as_i64() != Some(0))
        .collect();
    json!({
        "requests": c.get("hits") + c.get("misses") + c.get("compile_failed") + c.get("errors") + uncacheable_total,
        "hits": c.get("hits"),
        "misses": c.get("misses"),
        "compile_failed": c.get("compile_failed"),
        "errors": c.get("errors"),
        "uncacheable": uncacheable_total,
        "uncacheable_by_reason": uncacheable,
        "corrupt_entries": c.get("corrupt_entries"),
        "time_saved_ms": c.get("time_saved_ms"),
        "remote_hits": c.get("remote_hits"),
        "remote_errors": c.get("remote_errors"),
        "remote_uploads": c.get("remote_uploads"),
        "dist_compiles": c.get("dist_compiles"),
        "dist_toolchain_uploads": c.get("dist_toolchain_uploads"),
        "dist_fallbacks": dist_fallbacks.values().map(|v| v.as_i64().unwrap_or(0)).sum::<i64>(),
        "dist_fallbacks_by_cause": dist_fallbacks,
        "cross_checks": c.get("cross_checks"),
        "cross_check_mismatches": c.get("cross_check_mismatches"),
        "go_gets": c.get("go_gets"),
        "go_hits": c.get("go_hits"),
        "go_puts": c.get("go_puts"),
        "cache_dir": store.dir(),
        "cache_size_bytes": size,
        "cache_entries": files,
        "cache_max_size_bytes": limits.max_size,
        "cache_max_entries": limits.max_files,
    })
}

/// The statistics as a table for people.
pub fn to_text(j: &serde_json::Value) -> String {
    let n = |k: &str| j[k].as_i64().unwrap_or(0);
    let pct = |part: i64, whole: i64| {
        if whole > 0 {
            format!("{:5.1} %", 100.0 * part as f64 / whole as f64)
        } else {
            String::new()
        }
    };
    let cacheable = n("hits") + n("misses");
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<28}{value}\n"));
    line(
        "Cache directory",
        j["cache_dir"].as_str().unwrap_or("").to_owned(),
    );
    line("Compile requests", n("requests").to_string());
    line(
        "  Hits",
        format!("{:<10}{}", n("hits"), pct(n("hits"), cacheable)),
    );
    line(
        "  Misses",
        format!("{:<10}{}", n("misses"), pct(n("misses"), cacheable)),
    );
    line("  Uncacheable", n("uncacheable").to_string());
    if let Some(reasons) = j["uncacheable_by_reason"].as_object() {
        for (reason, count) in reasons {
            line(&format!("    {reason}"), count.to_string());
        }
    }
    line("  Compile failed", n("compile_failed").to_string());
    line("  Errors", n("errors").to_string());
    line("Corrupt entries replaced", n("corrupt_entries").to_string());
    if n("remote_hits") + n("remote_errors") + n("remote_uploads") > 0 {
        line(
            "Remote cache",
            format!(
                "{} hits, {} uploads, {} errors",
                n("remote_hits"),
                n("remote_uploads"),
                n("remote_errors")
            ),
        );
    }
    if n("dist_compiles") + n("dist_fallbacks") > 0 {
        line(
            "Compiled on the farm",
            format!(
                "{:<10}{} local fallbacks",
                n("dist_compiles"),
                n("dist_fallbacks")
            ),
        );
        if let Some(causes) = j["dist_fallbacks_by_cause"].as_object() {
            for (cause, count) in causes {
                line(&format!("    {cause}"), count.to_string());
            }
        }
        if n("cross_checks") > 0 {
            line(
                "  Cross-checked",
                format!(
                    "{:<10}{} disagreed",
                    n("cross_checks"),
                    n("cross_check_mismatches")
                ),
            );
        }
    }
    if n("go_gets") + n("go_puts") > 0 {
        let hits = format!(
            "{} hits {}",
            n("go_hits"),
            pct(n("go_hits"), n("go_gets")).trim()
        );
        line(
            "Go cache (GOCACHEPROG)",
            format!("{} gets, {hits}, {} puts", n("go_gets"), n("go_puts")),
        );
    }
    // Each hit saves its own compile's time; summed over a parallel build they can exceed
    // the build's wall time, so the line says what it adds up (issue 15).
    line(
        "Compile time saved",
        format!(
            "{:.1} s, summed over compiles (a parallel build's wall time gains less)",
            n("time_saved_ms") as f64 / 1000.0
        ),
    );
    let max = n("cache_max_size_bytes");
    let limit = if max > 0 {
        format!(" of {}", human_bytes(max as u64))
    } else {
        String::new()
    };
    line(
        "Cache size",
        format!(
            "{}{limit} ({} entries)",
            human_bytes(n("cache_size_bytes") as u64),
            n("cache_entries")
        ),
    );
    out
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
