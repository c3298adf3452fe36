//! Where a job goes: a pure function of the registry's state and the time, tested without
//! sockets.
//!
//! Rules, in order: only builders of the job's platform with a free slot; never one excluded for
//! this job (it already failed it); builders that failed recently only when no other has room;
//! among the rest, one that holds the toolchain first, then the least loaded per slot, then the
//! one with the most free slots, then by id so the choice is deterministic.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use kiln_proto::Digest;

/// How long a builder that failed a job is passed over while others have room.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(30);

/// What placement knows of one builder.
#[derive(Debug, Clone)]
pub struct BuilderState {
    pub name: String,
    pub os: String,
    pub arch: String,
    pub jail: String,
    pub slots: u32,
    /// Jobs placed there and not finished.
    pub running: u32,
    pub toolchains: HashSet<Digest>,
    pub last_failure: Option<Instant>,
    pub connected: Instant,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub toolchains_received: u64,
    /// Why a client's cross-check found it wrong; a suspect builder gets no jobs.
    pub suspect: Option<String>,
}

/// The builders the scheduler knows, by id.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    pub builders: BTreeMap<String, BuilderState>,
}

/// What a job asks of a builder.
#[derive(Debug, Clone)]
pub struct Wants<'a> {
    pub os: &'a str,
    pub arch: &'a str,
    pub toolchain: Digest,
    /// Builders this job must not go to again.
    pub exclude: &'a [String],
}

/// Why a job has no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlace {
    /// No connected builder runs this platform.
    NoBuilders,
    /// Builders exist, all full (or all excluded).
    NoCapacity,
}

/// Chooses the builder for a job.
pub fn place(reg: &Registry, wants: &Wants<'_>, now: Instant) -> Result<String, NoPlace> {
    let platform: Vec<(&String, &BuilderState)> = reg
        .builders
        .iter()
        .filter(|(_, b)| b.os == wants.os && b.arch == wants.arch && b.suspect.is_none())
        .collect();
    if platform.is_empty() {
        return Err(NoPlace::NoBuilders);
    }
    let open = platform
        .into_iter()
        .filter(|(id, b)| b.running < b.slots && !wants.exclude.contains(id));
    let recently_failed = |b: &BuilderState| {
        b.last_failure
            .is_some_and(|t| now.saturating_duration_since(t) < FAILURE_PENALTY)
    };
    open.min_by(|(ida, a), (idb, b)| {
        let key = |b: &BuilderState| (recently_failed(b), !b.toolchains.contains(&wants.toolchain));
        key(a)
            .cmp(&key(b))
            // Load per slot: a/b < c/d  <=>  a*d < c*b.
            .then(
                (u64::from(a.running) * u64::from(b.slots))
                    .cmp(&(u64::from(b.running) * u64::from(a.slots))),
            )
            .then((b.slots - b.running).cmp(&(a.slots - a.running)))
            .then(ida.cmp(idb))
    })
    .map(|(id, _)| id.clone())
    .ok_or(NoPlace::NoCapacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(slots: u32, running: u32, toolchains: &[Digest]) -> BuilderState {
        BuilderState {
            name: String::new(),
            os: "linux".into(),
            arch: "x86_64".into(),
            jail: "linux".into(),
            slots,
            running,
            toolchains: toolchains.iter().copied().collect(),
            last_failure: None,
            connected: Instant::now(),
            jobs_done: 0,
            jobs_failed: 0,
            toolchains_received: 0,
            suspect: None,
        }
    }

    fn reg(builders: Vec<(&str, BuilderState)>) -> Registry {
        Registry {
            builders: builders
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    fn wants(tc: Digest, exclude: &[String]) -> Wants<'_> {
        Wants {
            os: "linux",
            arch: "x86_64",
            toolchain: tc,
            exclude,
        }
    }

    #[test]
    fn a_suspect_builder_gets_no_jobs() {
        let tc = Digest::of(b"gcc");
        let mut bad = builder(8, 0, &[tc]);
        bad.suspect = Some("outputs differ".into());
        let r = reg(vec![("a", bad.clone()), ("b", builder(1, 1, &[]))]);
        assert_eq!(
            place(&r, &wants(tc, &[]), Instant::now()),
            Err(NoPlace::NoCapacity)
        );
        let r = reg(vec![("a", bad)]);
        assert_eq!(
            place(&r, &wants(tc, &[]), Instant::now()),
            Err(NoPlace::NoBuilders)
        );
    }

    #[test]
    fn placement_table() {
        let tc = Digest::of(b"gcc");
        let other = Digest::of(b"clang");
        let now = Instant::now();
        let failed = |mut b: BuilderState| {
            b.last_failure = Some(now);
            b
        };
        type Case = (
            &'static str,
            Registry,
            Vec<String>,
            Result<&'static str, NoPlace>,
        );
        let cases: Vec<Case> = vec![
            ("empty farm", reg(vec![]), vec![], Err(NoPlace::NoBuilders)),
            (
                "toolchain holder first, even if busier",
                reg(vec![
                    ("a", builder(4, 0, &[other])),
                    ("b", builder(4, 2, &[tc])),
                ]),
                vec![],
                Ok("b"),
            ),
            (
                "then least loaded per slot",
                reg(vec![
                    ("a", builder(2, 1, &[tc])),
                    ("b", builder(8, 2, &[tc])),
                ]),
                vec![],
                Ok("b"),
            ),
            (
                "a full toolchain holder loses to a free builder without it",
                reg(vec![("a", builder(2, 2, &[tc])), ("b", builder(2, 0, &[]))]),
                vec![],
                Ok("b"),
            ),
            (
                "all full is no capacity",
                reg(vec![("a", builder(1, 1, &[tc])), ("b", builder(2, 2, &[]))]),
                vec![],
                Err(NoPlace::NoCapacity),
            ),
            (
                "excluded builders are never chosen",
                reg(vec![("a", builder(4, 0, &[tc])), ("b", builder(4, 3, &[]))]),
                vec!["a".to_string()],
                Ok("b"),
            ),
            (
                "only excluded builders is no capacity",
                reg(vec![("a", builder(4, 0, &[tc]))]),
                vec!["a".to_string()],
                Err(NoPlace::NoCapacity),
            ),
            (
                "a builder that just failed is passed over",
                reg(vec![
                    ("a", failed(builder(4, 0, &[tc]))),
                    ("b", builder(4, 3, &[])),
                ]),
                vec![],
                Ok("b"),
            ),
            (
                "but used when it is the only one with room",
                reg(vec![
                    ("a", failed(builder(4, 0, &[tc]))),
                    ("b", builder(4, 4, &[])),
                ]),
                vec![],
                Ok("a"),
            ),
            (
                "ties break by id",
                reg(vec![("b", builder(2, 0, &[])), ("a", builder(2, 0, &[]))]),
                vec![],
                Ok("a"),
            ),
        ];
        for (name, registry, exclude, expected) in cases {
            let got = place(&registry, &wants(tc, &exclude), now);
            assert_eq!(got.as_deref().map_err(|e| *e), expected, "{name}");
        }
    }

    #[test]
    fn other_platforms_do_not_count() {
        let tc = Digest::of(b"gcc");
        let mut bsd = builder(4, 0, &[tc]);
        bsd.os = "freebsd".into();
        let r = reg(vec![("bsd", bsd)]);
        assert_eq!(
            place(&r, &wants(tc, &[]), Instant::now()),
            Err(NoPlace::NoBuilders)
        );
    }

    #[test]
    fn the_failure_penalty_expires() {
        let tc = Digest::of(b"gcc");
        let then = Instant::now();
        let mut a = builder(4, 0, &[tc]);
        a.last_failure = Some(then);
        let r = reg(vec![("a", a), ("b", builder(4, 3, &[]))]);
        assert_eq!(place(&r, &wants(tc, &[]), then).unwrap(), "b");
        assert_eq!(
            place(&r, &wants(tc, &[]), then + FAILURE_PENALTY).unwrap(),
            "a"
        );
    }
}
