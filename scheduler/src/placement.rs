//! Where a job goes: a pure function of the registry's state and the time, tested without
//! sockets.
//!
//! Rules, in order: only builders of the job's platform with a free slot; never one excluded for
//! this job (it already failed it); builders that failed recently only when no other has room;
//! among the rest, one that holds the toolchain first, then the least loaded per slot, then the
//! one with the most free slots, then by id so the choice is deterministic.
//!
//! [`place`] states the rules by scanning every builder; [`Fleet`] keeps the same builders
//! indexed by platform, toolchain and load, so that a job costs a few ordered-set steps
//! however large the fleet is (issue 17). Both must always choose the same builder; a test
//! checks that on random fleets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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

/// A builder's place in the load order: least loaded per slot first, then most free slots,
/// then by id; the order [`place`] uses after its health and toolchain keys.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Load {
    running: u32,
    slots: u32,
    id: String,
}

impl Ord for Load {
    fn cmp(&self, o: &Load) -> std::cmp::Ordering {
        // Load per slot: a/b < c/d  <=>  a*d < c*b (slots are never 0).
        (u64::from(self.running) * u64::from(o.slots))
            .cmp(&(u64::from(o.running) * u64::from(self.slots)))
            .then(
                (o.slots - o.running.min(o.slots))
                    .cmp(&(self.slots - self.running.min(self.slots))),
            )
            .then(self.id.cmp(&o.id))
    }
}

impl PartialOrd for Load {
    fn partial_cmp(&self, o: &Load) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

type Platform = (String, String);

/// The builders the scheduler knows, indexed for placement: per platform, the builders with a
/// free slot in load order, and the same per toolchain they hold. Suspect builders are in no
/// index. Every change to what the index keys on (slots, running, toolchains, suspicion) goes
/// through a method here, so the index cannot drift from the builders.
#[derive(Debug, Default)]
pub struct Fleet {
    builders: BTreeMap<String, BuilderState>,
    /// Builders not suspect, per platform: tells "no builders" from "no capacity".
    platforms: HashMap<Platform, usize>,
    free: HashMap<Platform, BTreeSet<Load>>,
    holders: HashMap<(Platform, Digest), BTreeSet<Load>>,
    /// How many joined builders carry each name, for labels.
    names: HashMap<String, usize>,
    slots: u64,
    busy: u64,
}

impl Fleet {
    pub fn builders(&self) -> &BTreeMap<String, BuilderState> {
        &self.builders
    }

    pub fn get(&self, id: &str) -> Option<&BuilderState> {
        self.builders.get(id)
    }

    /// Slots of all joined builders, and how many run a job.
    pub fn slots(&self) -> (u64, u64) {
        (self.slots, self.busy)
    }

    /// Builder `id`'s label: its name, or `name (id)` when another joined builder has the same
    /// name (two builders on one host both default to its host name).
    pub fn label(&self, id: &str) -> Option<String> {
        let b = self.builders.get(id)?;
        Some(if self.names.get(&b.name).copied().unwrap_or(0) > 1 {
            format!("{} ({id})", b.name)
        } else {
            b.name.clone()
        })
    }

    fn unindex(&mut self, id: &str) {
        let Some(b) = self.builders.get(id) else {
            return;
        };
        self.slots -= u64::from(b.slots);
        self.busy -= u64::from(b.running);
        if b.suspect.is_some() {
            return;
        }
        let platform = (b.os.clone(), b.arch.clone());
        let load = Load {
            running: b.running,
            slots: b.slots,
            id: id.to_owned(),
        };
        if let Some(n) = self.platforms.get_mut(&platform) {
            *n -= 1;
        }
        if b.running < b.slots {
            for d in &b.toolchains {
                if let Some(set) = self.holders.get_mut(&(platform.clone(), *d)) {
                    set.remove(&load);
                    if set.is_empty() {
                        self.holders.remove(&(platform.clone(), *d));
                    }
                }
            }
            if let Some(set) = self.free.get_mut(&platform) {
                set.remove(&load);
            }
        }
    }

    fn reindex(&mut self, id: &str) {
        let Some(b) = self.builders.get(id) else {
            return;
        };
        self.slots += u64::from(b.slots);
        self.busy += u64::from(b.running);
        if b.suspect.is_some() {
            return;
        }
        let platform = (b.os.clone(), b.arch.clone());
        *self.platforms.entry(platform.clone()).or_default() += 1;
        if b.running < b.slots {
            let load = Load {
                running: b.running,
                slots: b.slots,
                id: id.to_owned(),
            };
            for d in &b.toolchains {
                self.holders
                    .entry((platform.clone(), *d))
                    .or_default()
                    .insert(load.clone());
            }
            self.free.entry(platform).or_default().insert(load);
        }
    }

    pub fn insert(&mut self, id: String, b: BuilderState) {
        self.remove(&id);
        *self.names.entry(b.name.clone()).or_default() += 1;
        self.builders.insert(id.clone(), b);
        self.reindex(&id);
    }

    pub fn remove(&mut self, id: &str) -> Option<BuilderState> {
        self.unindex(id);
        let b = self.builders.remove(id)?;
        if let Some(n) = self.names.get_mut(&b.name) {
            *n -= 1;
            if *n == 0 {
                self.names.remove(&b.name);
            }
        }
        Some(b)
    }

    /// Changes what the index keys on, keeping it true.
    pub fn update<R>(&mut self, id: &str, f: impl FnOnce(&mut BuilderState) -> R) -> Option<R> {
        self.unindex(id);
        let r = self.builders.get_mut(id).map(f);
        self.reindex(id);
        r
    }

    /// Changes only what the index does not key on: counters and the last failure.
    pub fn note<R>(&mut self, id: &str, f: impl FnOnce(&mut BuilderState) -> R) -> Option<R> {
        let b = self.builders.get_mut(id)?;
        let before = (b.running, b.slots, b.suspect.is_some(), b.toolchains.len());
        let r = f(b);
        debug_assert_eq!(
            before,
            (b.running, b.slots, b.suspect.is_some(), b.toolchains.len()),
            "Fleet::note changed an indexed field; use Fleet::update"
        );
        Some(r)
    }

    /// Chooses the builder for a job: the same choice as [`place`], without a scan. Builders
    /// that failed recently or are excluded are stepped over, so the cost grows with those,
    /// which are few, and not with the fleet.
    pub fn place(&self, wants: &Wants<'_>, now: Instant) -> Result<String, NoPlace> {
        let platform = (wants.os.to_owned(), wants.arch.to_owned());
        if self.platforms.get(&platform).copied().unwrap_or(0) == 0 {
            return Err(NoPlace::NoBuilders);
        }
        let failed = |l: &Load| {
            self.builders[&l.id]
                .last_failure
                .is_some_and(|t| now.saturating_duration_since(t) < FAILURE_PENALTY)
        };
        let pick = |set: Option<&BTreeSet<Load>>, allow_failed: bool| {
            set.into_iter()
                .flatten()
                .find(|l| !wants.exclude.contains(&l.id) && (allow_failed || !failed(l)))
                .map(|l| l.id.clone())
        };
        let holders = self.holders.get(&(platform.clone(), wants.toolchain));
        let free = self.free.get(&platform);
        // In the order of place's keys: healthy holders, healthy others, failed holders, any.
        pick(holders, false)
            .or_else(|| pick(free, false))
            .or_else(|| pick(holders, true))
            .or_else(|| pick(free, true))
            .ok_or(NoPlace::NoCapacity)
    }

    /// The builders as a plain registry, for [`place`] in tests.
    #[cfg(test)]
    fn registry(&self) -> Registry {
        Registry {
            builders: self.builders.clone(),
        }
    }
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

    /// A tiny deterministic generator, so the random fleets are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn the_index_chooses_as_the_rules_do() {
        let now = Instant::now();
        let tcs = [
            Digest::of(b"gcc"),
            Digest::of(b"clang"),
            Digest::of(b"rustc"),
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..300 {
            let mut fleet = Fleet::default();
            let n = rng.below(12) + 1;
            for i in 0..n {
                let slots = rng.below(4) as u32 + 1;
                let held: Vec<Digest> = tcs.iter().copied().filter(|_| rng.below(2) == 0).collect();
                let mut b = builder(slots, rng.below(u64::from(slots) + 1) as u32, &held);
                if rng.below(5) == 0 {
                    b.os = "freebsd".into();
                }
                if rng.below(6) == 0 {
                    b.last_failure = Some(now);
                }
                if rng.below(10) == 0 {
                    b.suspect = Some("differs".into());
                }
                fleet.insert(format!("b{i}"), b);
            }
            // Changes after joining go through the index too.
            for _ in 0..rng.below(6) {
                let id = format!("b{}", rng.below(n));
                match rng.below(4) {
                    0 => {
                        fleet.update(&id, |b| b.running = b.running.saturating_sub(1));
                    }
                    1 => {
                        fleet.update(&id, |b| b.running = (b.running + 1).min(b.slots));
                    }
                    2 => {
                        let tc = tcs[rng.below(3) as usize];
                        fleet.update(&id, |b| {
                            if !b.toolchains.insert(tc) {
                                b.toolchains.remove(&tc);
                            }
                        });
                    }
                    _ => {
                        fleet.remove(&id);
                    }
                }
            }
            let exclude: Vec<String> = (0..rng.below(3))
                .map(|_| format!("b{}", rng.below(n)))
                .collect();
            let tc = tcs[rng.below(3) as usize];
            let w = wants(tc, &exclude);
            assert_eq!(
                fleet.place(&w, now),
                place(&fleet.registry(), &w, now),
                "round {round}: {fleet:#?} excluding {exclude:?}"
            );
        }
    }

    #[test]
    fn the_fleet_counts_slots_and_names() {
        let mut fleet = Fleet::default();
        let mut a = builder(4, 0, &[]);
        a.name = "host".into();
        fleet.insert("b1".into(), a.clone());
        assert_eq!(fleet.label("b1").unwrap(), "host");
        fleet.insert("b2".into(), a);
        assert_eq!(fleet.label("b1").unwrap(), "host (b1)");
        fleet.update("b2", |b| b.running = 3);
        assert_eq!(fleet.slots(), (8, 3));
        fleet.remove("b1");
        assert_eq!(fleet.label("b2").unwrap(), "host");
        assert_eq!(fleet.slots(), (4, 3));
    }
}
