//! The job table: every job's lifecycle and every builder's slots, as a state machine with no
//! I/O (issue 18).
//!
//! The service feeds it events (a job arrives, a builder joins, beats, asks for something,
//! finishes or rejects a job, is lost; a client goes away; the clock ticks) with the time as an
//! argument, and gets back the messages to send ([`Out`]) instead of sending them. So the
//! lifecycle is tested without sockets or sleeps, and the service holds the table's lock only
//! for bookkeeping, never across I/O, hashing or JSON building.
//!
//! A job is [`Phase::Running`] on one builder (holding one of its slots), possibly
//! [`Phase::Waiting`] for its toolchain or inputs, then [`Phase::Finished`] (the slot is free
//! again, the outputs are still being relayed) until its client goes away. A builder lost or
//! rejecting a job for a reason that is not the job's fault sends it to another builder, up to
//! [`Limits::max_attempts`]; then, or with no builder or no free slot, the client hears why at
//! once and compiles locally. Every way out is one [`Outcome`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kiln_proto::v1::{
    refused, to_builder, to_client, Finished, JobCancel, JobSpec, JobStart, JobStatus, Need,
    Placed, Refused, ToBuilder, ToClient,
};
use kiln_proto::Digest;

pub use crate::metrics::Outcome;
use crate::placement::{BuilderState, Fleet, NoPlace, Wants};

pub type JobId = u64;

/// Jobs kept for the dashboard's list, and the window its throughput chart covers.
pub const RECENT: usize = 50;
pub const WINDOW: Duration = Duration::from_secs(300);

/// How long a job that may wait (`JobSpec.wait_for_slot`) is held for a slot before it is
/// refused for no capacity: well inside the client's deadline for the job's placement.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// The table's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Builders a job may be tried on before the client is told to compile locally.
    pub max_attempts: u32,
    /// How often builders beat; three missed beats and a builder is lost.
    pub heartbeat: Duration,
}

/// What the service must do, in this order.
#[derive(Debug)]
pub enum Out {
    /// A message on the job's stream to its client.
    Client(JobId, ToClient),
    /// A message on a builder's link.
    Builder(String, ToBuilder),
    /// The job's chunks go to and come from this builder from now on.
    Route(JobId, String),
    /// The builder asked for the job's toolchain (from the scheduler's store if it has it,
    /// else from the client) and for the listed inputs (from the client).
    Need(JobId, String, Need, Digest),
    /// The job's stream to its client ends; with an error when the scheduler is stopping.
    Close(JobId, Option<String>),
    /// The builder is lost: close its link.
    Disconnect(String),
    /// The job left the scheduler (for the counters), after this long.
    Ended(Outcome, Duration),
    /// The job was placed for the first time, this long after it arrived.
    FirstPlaced(Duration),
    /// A builder failed a job through no fault of the job's: it is placed again.
    Retried,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Held for a free slot (its client has no core of its own to spare), since this moment.
    Queued(Instant),
    /// On its builder, holding a slot.
    Running,
    /// On its builder, holding a slot, which asked for its toolchain or inputs.
    Waiting,
    /// The builder reported the result and freed the slot; outputs may still be relayed.
    Finished,
}

#[derive(Debug)]
struct Job {
    spec: JobSpec,
    toolchain: Digest,
    /// The name of the client's token.
    caller: String,
    builder: String,
    phase: Phase,
    attempt: u32,
    tried: Vec<String>,
    started: Instant,
}

/// A job that is over, for the dashboard.
#[derive(Debug, Clone)]
pub struct Recent {
    pub label: String,
    /// The name of the client's token.
    pub client: String,
    pub builder: String,
    pub ms: u64,
    pub outcome: Outcome,
    pub bytes: u64,
    pub at: Instant,
}

/// What the dashboard shows beyond the status, copied out so its JSON is built unlocked.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The jobs that ended last, newest first.
    pub recent: Vec<Recent>,
    /// Jobs finished per [`BUCKET`], oldest first: when the bucket began, and how many.
    pub finished: Vec<(Instant, u64)>,
}

/// The dashboard's throughput chart counts finished jobs per this long.
pub const BUCKET: Duration = Duration::from_secs(10);

/// The jobs and builders of one scheduler.
#[derive(Debug)]
pub struct JobTable {
    limits: Limits,
    fleet: Fleet,
    jobs: HashMap<JobId, Job>,
    /// When each builder was last heard from.
    seen: HashMap<String, Instant>,
    /// Builders a cross-check found wrong, by name, and why: kept across their reconnects.
    suspects: HashMap<String, String>,
    /// Jobs held for a slot, oldest first. A job that left meanwhile is skipped when met.
    queue: VecDeque<JobId>,
    stopping: bool,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    /// The last [`RECENT`] jobs that ended.
    recent: VecDeque<Recent>,
    /// Jobs finished over the last [`WINDOW`], per [`BUCKET`]: counts, not one entry per job,
    /// so a busy farm's chart costs the same as an idle one's.
    finished: VecDeque<(Instant, u64)>,
}

/// A report named a builder that is not joined.
#[derive(Debug, thiserror::Error)]
#[error("no builder named {0:?} is joined")]
pub struct UnknownBuilder(pub String);

fn refused(reason: refused::Reason, message: impl Into<String>) -> ToClient {
    ToClient {
        msg: Some(to_client::Msg::Refused(Refused {
            reason: reason as i32,
            message: message.into(),
        })),
    }
}

impl JobTable {
    pub fn new(limits: Limits) -> JobTable {
        JobTable {
            limits,
            fleet: Fleet::default(),
            jobs: HashMap::new(),
            seen: HashMap::new(),
            suspects: HashMap::new(),
            queue: VecDeque::new(),
            stopping: false,
            jobs_done: 0,
            jobs_failed: 0,
            recent: VecDeque::new(),
            finished: VecDeque::new(),
        }
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    pub fn jobs_in_flight(&self) -> usize {
        self.jobs.len()
    }

    pub fn phase(&self, job: JobId) -> Option<Phase> {
        self.jobs.get(&job).map(|j| j.phase)
    }

    /// The builder job `job` is on, if it is placed.
    pub fn builder_of(&self, job: JobId) -> Option<&str> {
        self.jobs.get(&job).map(|j| j.builder.as_str())
    }

    /// A builder joined with `b` (its suspicion, if its name has one, is restored).
    /// A builder joined; jobs held for a slot may go to it.
    pub fn join(&mut self, id: String, mut b: BuilderState, now: Instant) -> Vec<Out> {
        b.suspect = self.suspects.get(&b.name).cloned();
        self.seen.insert(id.clone(), now);
        self.fleet.insert(id, b);
        let mut out = Vec::new();
        self.drain_queue(now, &mut out);
        out
    }

    /// A builder's heartbeat, with the slots it has now.
    pub fn heartbeat(&mut self, id: &str, slots: u32, now: Instant) -> Vec<Out> {
        if let Some(seen) = self.seen.get_mut(id) {
            *seen = now;
        }
        let slots = slots.max(1);
        let mut out = Vec::new();
        if self.fleet.get(id).is_some_and(|b| b.slots != slots) {
            self.fleet.update(id, |b| b.slots = slots);
            // More slots may serve the jobs held for one.
            self.drain_queue(now, &mut out);
        }
        out
    }

    /// A builder's toolchains changed.
    pub fn toolchains(&mut self, id: &str, added: &[Digest], evicted: &[Digest]) {
        self.fleet.update(id, |b| {
            for d in added {
                b.toolchains.insert(*d);
                b.toolchains_received += 1;
            }
            for d in evicted {
                b.toolchains.remove(d);
            }
        });
    }

    /// The scheduler is stopping: jobs that would be placed again end instead.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// A job arrived: it is placed, or its client hears why not.
    pub fn submit(
        &mut self,
        id: JobId,
        spec: JobSpec,
        toolchain: Digest,
        caller: String,
        now: Instant,
    ) -> Vec<Out> {
        self.jobs.insert(
            id,
            Job {
                spec,
                toolchain,
                caller,
                builder: String::new(),
                phase: Phase::Finished,
                attempt: 0,
                tried: Vec::new(),
                started: now,
            },
        );
        let mut out = Vec::new();
        self.place(id, now, &mut out);
        out
    }

    /// A slot taken on `builder`.
    fn take_slot(&mut self, builder: &str) {
        let ok = self.fleet.update(builder, |b| {
            b.running += 1;
            b.running <= b.slots
        });
        debug_assert_eq!(
            ok,
            Some(true),
            "placed on {builder}, which had no free slot"
        );
        if ok != Some(true) {
            tracing::error!(builder, "slot accounting: placed a job with no free slot");
        }
    }

    /// A slot given back by `builder`. Fails loudly on a slot that was never taken instead of
    /// hiding the bug.
    fn free_slot(&mut self, builder: &str) {
        let ok = self
            .fleet
            .update(builder, |b| match b.running.checked_sub(1) {
                Some(n) => {
                    b.running = n;
                    true
                }
                None => false,
            });
        // A builder already removed has no slots to give back.
        debug_assert_ne!(ok, Some(false), "freed a slot {builder} never had taken");
        if ok == Some(false) {
            tracing::error!(builder, "slot accounting: freed a slot that was not taken");
        }
    }

    /// Places job `id`, first time or again, or ends it with its reason.
    fn place(&mut self, id: JobId, now: Instant, out: &mut Vec<Out>) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let decision = if self.stopping {
            // Its builder's link closed because this scheduler is stopping: the job is not
            // short of capacity, the scheduler is going away. The client compiles locally.
            let job = self.jobs.remove(&id).expect("looked up above");
            tracing::info!(job = id, label = %job.spec.label, "job ended by the scheduler's shutdown");
            out.push(Out::Close(
                id,
                Some("the scheduler is shutting down; the job did not finish".into()),
            ));
            return;
        } else if job.attempt >= self.limits.max_attempts {
            Err((
                Outcome::BuildersFailed,
                format!("{} builders failed this job", job.attempt),
            ))
        } else {
            let wants = Wants {
                os: &job.spec.os,
                arch: &job.spec.arch,
                toolchain: job.toolchain,
                exclude: &job.tried,
            };
            self.fleet.place(&wants, now).map_err(|e| match e {
                NoPlace::NoBuilders => (
                    Outcome::NoBuilders,
                    format!("no {}/{} builder is connected", job.spec.os, job.spec.arch),
                ),
                NoPlace::NoCapacity => {
                    (Outcome::NoCapacity, "every suitable builder is busy".into())
                }
            })
        };
        // A first placement that finds no free slot waits for one when the client asked to.
        if let Err((Outcome::NoCapacity, _)) = &decision {
            let job = self.jobs.get_mut(&id).expect("looked up above");
            if job.spec.wait_for_slot && job.attempt == 0 {
                if !matches!(job.phase, Phase::Queued(_)) {
                    job.phase = Phase::Queued(now);
                    self.queue.push_back(id);
                }
                return;
            }
        }
        match decision {
            Ok(builder) => {
                self.take_slot(&builder);
                let name = self
                    .fleet
                    .get(&builder)
                    .map(|b| b.name.clone())
                    .unwrap_or_default();
                let job = self.jobs.get_mut(&id).expect("looked up above");
                job.attempt += 1;
                if job.attempt == 1 {
                    out.push(Out::FirstPlaced(now.saturating_duration_since(job.started)));
                }
                job.tried.push(builder.clone());
                job.builder = builder.clone();
                job.phase = Phase::Running;
                out.push(Out::Route(id, builder.clone()));
                out.push(Out::Client(
                    id,
                    ToClient {
                        msg: Some(to_client::Msg::Placed(Placed {
                            builder: name,
                            attempt: job.attempt,
                        })),
                    },
                ));
                out.push(Out::Builder(
                    builder,
                    ToBuilder {
                        msg: Some(to_builder::Msg::Start(JobStart {
                            job_id: id,
                            spec: Some(job.spec.clone()),
                        })),
                    },
                ));
            }
            Err((outcome, message)) => {
                let reason = match outcome {
                    Outcome::NoBuilders => refused::Reason::NoBuilders,
                    Outcome::NoCapacity => refused::Reason::NoCapacity,
                    _ => refused::Reason::BuildersFailed,
                };
                tracing::info!(job = id, %message, "job refused");
                out.push(Out::Client(id, refused(reason, message)));
                self.end(id, outcome, 0, now, out);
                out.push(Out::Close(id, None));
            }
        }
    }

    /// Places the jobs held for a slot, oldest first, as far as the free slots go.
    fn drain_queue(&mut self, now: Instant, out: &mut Vec<Out>) {
        if self.queue.is_empty() {
            return;
        }
        let held: Vec<JobId> = self.queue.drain(..).collect();
        for id in held {
            let queued =
                |t: &JobTable| matches!(t.jobs.get(&id).map(|j| j.phase), Some(Phase::Queued(_)));
            if !queued(self) {
                continue;
            }
            self.place(id, now, out);
            if queued(self) {
                self.queue.push_back(id);
            }
        }
    }

    /// Job `id` leaves the table with `outcome`.
    fn end(&mut self, id: JobId, outcome: Outcome, bytes: u64, now: Instant, out: &mut Vec<Out>) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.record(&job, outcome, bytes, now, out);
    }

    fn record(
        &mut self,
        job: &Job,
        outcome: Outcome,
        bytes: u64,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let took = now.saturating_duration_since(job.started);
        out.push(Out::Ended(outcome, took));
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(Recent {
            label: job.spec.label.clone(),
            client: job.caller.clone(),
            // Builders are listed by label, as in the builders' table.
            builder: self.fleet.label(&job.builder).unwrap_or_default(),
            ms: took.as_millis() as u64,
            outcome,
            bytes,
            at: now,
        });
        if outcome == Outcome::Finished {
            match self.finished.back_mut() {
                Some((start, n)) if now.saturating_duration_since(*start) < BUCKET => *n += 1,
                _ => self.finished.push_back((now, 1)),
            }
        }
        while self
            .finished
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW)
        {
            self.finished.pop_front();
        }
    }

    /// Job `id` failed on its builder through no fault of its own: another builder tries it.
    fn retry(&mut self, id: JobId, why: &str, now: Instant, out: &mut Vec<Out>) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let builder = job.builder.clone();
        if job.phase != Phase::Finished {
            self.free_slot(&builder);
        }
        self.fleet.note(&builder, |b| {
            b.last_failure = Some(now);
            b.jobs_failed += 1;
        });
        self.jobs_failed += 1;
        out.push(Out::Retried);
        tracing::warn!(job = id, builder = %builder, why, "job failed on its builder; placing it again");
        self.place(id, now, out);
    }

    /// The job `id` as `builder` may speak of it: only the builder it is placed on.
    fn on(&self, builder: &str, id: JobId) -> Option<&Job> {
        self.jobs.get(&id).filter(|j| j.builder == builder)
    }

    /// A builder asked for what job `id` lacks.
    pub fn need(&mut self, builder: &str, id: JobId, need: Need) -> Vec<Out> {
        let Some(job) = self.jobs.get_mut(&id).filter(|j| j.builder == builder) else {
            return Vec::new();
        };
        if job.phase == Phase::Running {
            job.phase = Phase::Waiting;
        }
        vec![Out::Need(id, builder.to_owned(), need, job.toolchain)]
    }

    /// A builder reported job `id`'s result; `bytes` were relayed for it so far.
    pub fn finished(
        &mut self,
        builder: &str,
        id: JobId,
        finished: Option<Finished>,
        bytes: u64,
        now: Instant,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        match self.on(builder, id).map(|j| j.phase) {
            Some(Phase::Running | Phase::Waiting) => {}
            // A second report of the same job is ignored; its slot was freed once.
            _ => return out,
        }
        self.free_slot(builder);
        self.fleet.note(builder, |b| b.jobs_done += 1);
        self.jobs_done += 1;
        let job = self.jobs.get_mut(&id).expect("looked up above");
        job.phase = Phase::Finished;
        // The job stays until its client goes away: its outputs are still on their way.
        let job = self.jobs.remove(&id).expect("looked up above");
        self.record(&job, Outcome::Finished, bytes, now, &mut out);
        self.jobs.insert(id, job);
        if let Some(finished) = finished {
            out.push(Out::Client(
                id,
                ToClient {
                    msg: Some(to_client::Msg::Finished(finished)),
                },
            ));
        }
        self.drain_queue(now, &mut out);
        out
    }

    /// A builder refused job `id`: for a reason of its own (`retry`, the job goes elsewhere)
    /// or because the job is malformed or hostile (the client hears it and compiles locally).
    pub fn rejected(
        &mut self,
        builder: &str,
        id: JobId,
        retry: bool,
        message: String,
        bytes: u64,
        now: Instant,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(phase) = self.on(builder, id).map(|j| j.phase) else {
            return out;
        };
        if retry {
            self.retry(id, &message, now, &mut out);
            self.drain_queue(now, &mut out);
            return out;
        }
        if phase != Phase::Finished {
            self.free_slot(builder);
        }
        out.push(Out::Client(
            id,
            refused(refused::Reason::BadRequest, message),
        ));
        self.end(id, Outcome::Refused, bytes, now, &mut out);
        out.push(Out::Close(id, None));
        self.drain_queue(now, &mut out);
        out
    }

    /// The client's stream ended: the job is over for everyone.
    pub fn client_gone(&mut self, id: JobId, bytes: u64, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(job) = self.jobs.remove(&id) else {
            return out;
        };
        if let Phase::Queued(_) = job.phase {
            // Never placed: no slot, no builder to tell.
            self.record(&job, Outcome::Abandoned, bytes, now, &mut out);
            return out;
        }
        if job.phase != Phase::Finished {
            self.free_slot(&job.builder);
            self.record(&job, Outcome::Abandoned, bytes, now, &mut out);
            out.push(Out::Builder(
                job.builder.clone(),
                ToBuilder {
                    msg: Some(to_builder::Msg::Cancel(JobCancel { job_id: id })),
                },
            ));
            self.drain_queue(now, &mut out);
        }
        out
    }

    /// A builder is gone (its stream ended, or it fell silent): its jobs go elsewhere.
    pub fn builder_lost(&mut self, id: &str, why: &str, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        self.seen.remove(id);
        let Some(b) = self.fleet.get(id) else {
            return out;
        };
        tracing::warn!(builder = %b.name, id, why, "builder lost");
        let mut jobs: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.builder == id)
            .map(|(k, _)| *k)
            .collect();
        jobs.sort_unstable();
        for job in jobs {
            self.retry(job, why, now, &mut out);
        }
        self.fleet.remove(id);
        out.push(Out::Disconnect(id.to_owned()));
        out
    }

    /// The clock moved: builders silent for three heartbeats are lost.
    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        let silence = self.limits.heartbeat * 3;
        let mut lost: Vec<String> = self
            .seen
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > silence)
            .map(|(id, _)| id.clone())
            .collect();
        lost.sort();
        let why = format!("no heartbeat for {} ms", silence.as_millis());
        let mut out = Vec::new();
        for id in lost {
            out.extend(self.builder_lost(&id, &why, now));
        }
        // Jobs held for a slot too long: the client compiles them itself after all.
        let expired: Vec<JobId> = self
            .queue
            .iter()
            .copied()
            .filter(|id| {
                matches!(self.jobs.get(id).map(|j| j.phase),
                    Some(Phase::Queued(since)) if now.saturating_duration_since(since) >= QUEUE_WAIT)
            })
            .collect();
        for id in expired {
            let message = format!(
                "every suitable builder stayed busy for {} s",
                QUEUE_WAIT.as_secs()
            );
            tracing::info!(job = id, %message, "held job refused");
            out.push(Out::Client(
                id,
                refused(refused::Reason::NoCapacity, message),
            ));
            self.end(id, Outcome::NoCapacity, 0, now, &mut out);
            out.push(Out::Close(id, None));
        }
        self.queue.retain(|id| self.jobs.contains_key(id));
        out
    }

    /// A client's cross-check found builder `name` wrong: it gets no more jobs, even after it
    /// reconnects.
    pub fn suspect(&mut self, name: &str, why: String) -> Result<(), UnknownBuilder> {
        let ids: Vec<String> = self
            .fleet
            .builders()
            .iter()
            .filter(|(_, b)| b.name == name)
            .map(|(id, _)| id.clone())
            .collect();
        if ids.is_empty() {
            return Err(UnknownBuilder(name.to_owned()));
        }
        for id in ids {
            self.fleet.update(&id, |b| b.suspect = Some(why.clone()));
        }
        self.suspects.insert(name.to_owned(), why);
        Ok(())
    }

    /// The jobs in flight, for the status.
    pub fn job_status(&self, now: Instant) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> = self
            .jobs
            .iter()
            .map(|(id, j)| JobStatus {
                id: *id,
                builder: self.fleet.label(&j.builder).unwrap_or_default(),
                builder_id: j.builder.clone(),
                label: j.spec.label.clone(),
                running_ms: now.saturating_duration_since(j.started).as_millis() as u64,
                attempt: j.attempt,
            })
            .collect();
        jobs.sort_by_key(|j| j.id);
        jobs
    }

    /// The dashboard's history, copied.
    pub fn history(&self) -> History {
        History {
            recent: self.recent.iter().rev().cloned().collect(),
            finished: self.finished.iter().copied().collect(),
        }
    }

    /// Every builder's `running` equals the jobs holding its slots; for tests.
    #[cfg(test)]
    fn check(&self) {
        for (id, b) in self.fleet.builders() {
            let holding = self
                .jobs
                .values()
                .filter(|j| &j.builder == id && j.phase != Phase::Finished)
                .count() as u32;
            assert_eq!(b.running, holding, "slots of {id}");
            assert!(b.running <= b.slots, "{id} runs more than its slots");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::v1::{refused::Reason, to_client::Msg as C};

    const HB: Duration = Duration::from_secs(2);

    fn table(max_attempts: u32) -> JobTable {
        JobTable::new(Limits {
            max_attempts,
            heartbeat: HB,
        })
    }

    fn tc() -> Digest {
        Digest::of(b"gcc")
    }

    fn builder(name: &str, slots: u32, now: Instant) -> BuilderState {
        BuilderState {
            name: name.into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            jail: "linux".into(),
            slots,
            running: 0,
            toolchains: [tc()].into_iter().collect(),
            last_failure: None,
            connected: now,
            jobs_done: 0,
            jobs_failed: 0,
            toolchains_received: 0,
            suspect: None,
        }
    }

    fn spec(label: &str) -> JobSpec {
        JobSpec {
            os: "linux".into(),
            arch: "x86_64".into(),
            argv: vec!["cc".into()],
            label: label.into(),
            ..JobSpec::default()
        }
    }

    /// Where the outs sent the job, if anywhere.
    fn started_on(out: &[Out]) -> Option<&str> {
        out.iter().find_map(|o| match o {
            Out::Builder(
                b,
                ToBuilder {
                    msg: Some(to_builder::Msg::Start(_)),
                },
            ) => Some(b.as_str()),
            _ => None,
        })
    }

    fn refusal(out: &[Out]) -> Option<Reason> {
        out.iter().find_map(|o| match o {
            Out::Client(
                _,
                ToClient {
                    msg: Some(C::Refused(r)),
                },
            ) => Reason::try_from(r.reason).ok(),
            _ => None,
        })
    }

    fn outcome(out: &[Out]) -> Option<Outcome> {
        out.iter().find_map(|o| match o {
            Out::Ended(o, _) => Some(*o),
            _ => None,
        })
    }

    fn closes(out: &[Out], job: JobId) -> bool {
        out.iter()
            .any(|o| matches!(o, Out::Close(j, _) if *j == job))
    }

    #[test]
    fn a_job_runs_finishes_and_frees_its_slot() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        let out = t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        assert_eq!(started_on(&out), Some("b1"));
        assert!(matches!(out[0], Out::FirstPlaced(_)));
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Route(1, b) if b == "b1")));
        assert_eq!(t.fleet().slots(), (1, 1));
        t.check();
        let out = t.need("b1", 1, Need::default());
        assert!(matches!(&out[..], [Out::Need(1, b, _, d)] if b == "b1" && *d == tc()));
        assert_eq!(t.phase(1), Some(Phase::Waiting));
        // Only the builder the job is on may speak of it.
        assert!(t
            .finished("b2", 1, Some(Finished::default()), 0, now)
            .is_empty());
        let out = t.finished("b1", 1, Some(Finished::default()), 7, now);
        assert_eq!(outcome(&out), Some(Outcome::Finished));
        assert!(out.iter().any(|o| matches!(
            o,
            Out::Client(
                1,
                ToClient {
                    msg: Some(C::Finished(_))
                }
            )
        )));
        assert_eq!(t.phase(1), Some(Phase::Finished));
        assert_eq!(t.fleet().slots(), (1, 0));
        // A repeated report frees nothing twice.
        assert!(t.finished("b1", 1, None, 7, now).is_empty());
        t.check();
        // The client leaving after its result is no abandonment and cancels nothing.
        assert!(t.client_gone(1, 7, now).is_empty());
        assert_eq!(t.jobs_in_flight(), 0);
        assert_eq!(t.jobs_done, 1);
        assert_eq!(t.history().recent[0].outcome, Outcome::Finished);
        assert_eq!(t.history().recent[0].bytes, 7);
    }

    #[test]
    fn a_retried_job_goes_to_another_builder_until_attempts_run_out() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        t.join("b2".into(), builder("two", 1, now), now);
        t.join("b3".into(), builder("three", 1, now), now);
        let first = t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        assert_eq!(started_on(&first), Some("b1"));
        let out = t.rejected("b1", 1, true, "pool broken".into(), 0, now);
        assert!(out.iter().any(|o| matches!(o, Out::Retried)));
        assert_eq!(started_on(&out), Some("b2"));
        assert!(t.fleet().get("b1").unwrap().last_failure.is_some());
        t.check();
        // The second failure is the last attempt: the client compiles locally, even though b3
        // is free.
        let out = t.rejected("b2", 1, true, "pool broken".into(), 0, now);
        assert_eq!(started_on(&out), None);
        assert_eq!(refusal(&out), Some(Reason::BuildersFailed));
        assert_eq!(outcome(&out), Some(Outcome::BuildersFailed));
        assert!(closes(&out, 1));
        assert_eq!(t.jobs_failed, 2);
        assert_eq!(t.fleet().slots(), (3, 0));
        t.check();
    }

    #[test]
    fn a_hostile_job_is_refused_and_not_retried() {
        let now = Instant::now();
        let mut t = table(3);
        t.join("b1".into(), builder("one", 1, now), now);
        t.join("b2".into(), builder("two", 1, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        let out = t.rejected("b1", 1, false, "path escapes".into(), 0, now);
        assert_eq!(started_on(&out), None);
        assert_eq!(refusal(&out), Some(Reason::BadRequest));
        assert_eq!(outcome(&out), Some(Outcome::Refused));
        assert_eq!(t.jobs_in_flight(), 0);
        t.check();
    }

    #[test]
    fn a_builder_lost_mid_job_sends_its_jobs_elsewhere() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 2, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        t.submit(2, spec("b.c"), tc(), "ci".into(), now);
        t.join("b2".into(), builder("two", 4, now), now);
        let out = t.builder_lost("b1", "stream error", now);
        let starts: Vec<&str> = out
            .iter()
            .filter_map(|o| match o {
                Out::Builder(
                    b,
                    ToBuilder {
                        msg: Some(to_builder::Msg::Start(_)),
                    },
                ) => Some(b.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(starts, ["b2", "b2"]);
        assert!(matches!(out.last(), Some(Out::Disconnect(b)) if b == "b1"));
        assert!(t.fleet().get("b1").is_none());
        assert_eq!(t.builder_of(1), Some("b2"));
        assert_eq!(t.fleet().slots(), (4, 2));
        t.check();
        // Late words from the lost builder change nothing.
        assert!(t.finished("b1", 1, None, 0, now).is_empty());
        t.check();
    }

    #[test]
    fn a_builder_lost_with_no_other_ends_the_job_with_no_builders() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        let out = t.builder_lost("b1", "stream error", now);
        // b1 is still counted while its jobs are placed again, but it is excluded.
        assert!(matches!(
            refusal(&out),
            Some(Reason::NoCapacity | Reason::NoBuilders)
        ));
        assert!(closes(&out, 1));
        assert_eq!(t.jobs_in_flight(), 0);
        t.check();
    }

    #[test]
    fn a_client_abandoning_its_job_frees_the_slot_and_cancels_it() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        let out = t.client_gone(1, 3, now);
        assert_eq!(outcome(&out), Some(Outcome::Abandoned));
        assert!(out.iter().any(|o| matches!(o,
            Out::Builder(b, ToBuilder { msg: Some(to_builder::Msg::Cancel(c)) })
                if b == "b1" && c.job_id == 1)));
        assert_eq!(t.fleet().slots(), (1, 0));
        // The builder's late result for it is ignored.
        assert!(t.finished("b1", 1, None, 0, now).is_empty());
        t.check();
    }

    #[test]
    fn no_capacity_and_no_builders_are_immediate_answers() {
        let now = Instant::now();
        let mut t = table(2);
        let out = t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        assert_eq!(refusal(&out), Some(Reason::NoBuilders));
        assert_eq!(outcome(&out), Some(Outcome::NoBuilders));
        assert!(closes(&out, 1));
        t.join("b1".into(), builder("one", 1, now), now);
        t.submit(2, spec("a.c"), tc(), "ci".into(), now);
        let out = t.submit(3, spec("b.c"), tc(), "ci".into(), now);
        assert_eq!(refusal(&out), Some(Reason::NoCapacity));
        assert_eq!(outcome(&out), Some(Outcome::NoCapacity));
        assert_eq!(t.jobs_in_flight(), 1);
        // The slot comes back with the result, and the next job gets it.
        t.finished("b1", 2, None, 0, now);
        let out = t.submit(4, spec("c.c"), tc(), "ci".into(), now);
        assert_eq!(started_on(&out), Some("b1"));
        t.check();
    }

    /// A job whose client has no core to spare.
    fn waiting(label: &str) -> JobSpec {
        JobSpec {
            wait_for_slot: true,
            ..spec(label)
        }
    }

    #[test]
    fn a_job_that_may_wait_gets_the_first_slot_that_frees() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        // Held, not refused: nothing is said to its client yet.
        let out = t.submit(2, waiting("b.c"), tc(), "ci".into(), now);
        assert!(out.is_empty(), "{out:?}");
        assert!(matches!(t.phase(2), Some(Phase::Queued(_))));
        let out = t.submit(3, waiting("c.c"), tc(), "ci".into(), now);
        assert!(out.is_empty(), "{out:?}");
        t.check();
        // The slot comes back: the oldest held job gets it, the next one waits on.
        let out = t.finished("b1", 1, None, 0, now);
        assert_eq!(started_on(&out), Some("b1"));
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Route(2, b) if b == "b1")));
        assert_eq!(t.phase(2), Some(Phase::Running));
        assert!(matches!(t.phase(3), Some(Phase::Queued(_))));
        t.check();
        // A held job whose client leaves is over, and holds up no one.
        t.client_gone(3, 0, now);
        t.submit(4, waiting("d.c"), tc(), "ci".into(), now);
        // A new builder takes what is held.
        let out = t.join("b2".into(), builder("two", 1, now), now);
        assert_eq!(started_on(&out), Some("b2"));
        assert_eq!(t.phase(4), Some(Phase::Running));
        t.check();
    }

    #[test]
    fn a_held_job_is_refused_when_no_slot_frees_in_time() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        t.submit(2, waiting("b.c"), tc(), "ci".into(), now);
        // The builder beats on, busy; the clock runs.
        t.heartbeat("b1", 1, now + QUEUE_WAIT / 2);
        assert!(t.tick(now + QUEUE_WAIT / 2).is_empty());
        t.heartbeat("b1", 1, now + QUEUE_WAIT);
        let out = t.tick(now + QUEUE_WAIT);
        assert_eq!(refusal(&out), Some(Reason::NoCapacity));
        assert_eq!(outcome(&out), Some(Outcome::NoCapacity));
        assert!(closes(&out, 2));
        assert_eq!(t.phase(2), None);
        // A slot freed later places nothing: the queue is empty.
        let out = t.finished("b1", 1, None, 0, now + QUEUE_WAIT);
        assert_eq!(started_on(&out), None);
        t.check();
    }

    #[test]
    fn a_suspect_builder_gets_no_jobs_even_after_it_reconnects() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 4, now), now);
        assert!(t.suspect("nobody", "x".into()).is_err());
        t.suspect("one", "outputs differ".into()).unwrap();
        let out = t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        assert_eq!(refusal(&out), Some(Reason::NoBuilders));
        t.builder_lost("b1", "reconnecting", now);
        t.join("b2".into(), builder("one", 4, now), now);
        assert_eq!(
            t.fleet().get("b2").unwrap().suspect.as_deref(),
            Some("outputs differ")
        );
        let out = t.submit(2, spec("a.c"), tc(), "ci".into(), now);
        assert_eq!(refusal(&out), Some(Reason::NoBuilders));
        t.join("b3".into(), builder("two", 4, now), now);
        let out = t.submit(3, spec("a.c"), tc(), "ci".into(), now);
        assert_eq!(started_on(&out), Some("b3"));
    }

    #[test]
    fn a_builder_silent_for_three_heartbeats_is_lost_by_the_clock() {
        let t0 = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, t0), t0);
        t.join("b2".into(), builder("two", 1, t0), t0);
        t.submit(1, spec("a.c"), tc(), "ci".into(), t0);
        assert_eq!(t.builder_of(1), Some("b1"));
        // b2 beats, b1 does not.
        t.heartbeat("b2", 1, t0 + HB * 2);
        assert!(t.tick(t0 + HB * 3).is_empty());
        t.heartbeat("b2", 1, t0 + HB * 3);
        let out = t.tick(t0 + HB * 3 + Duration::from_millis(1));
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Disconnect(b) if b == "b1")));
        assert_eq!(started_on(&out), Some("b2"));
        assert!(t.fleet().get("b1").is_none());
        assert!(t.fleet().get("b2").is_some());
        t.check();
    }

    #[test]
    fn a_stopping_scheduler_ends_jobs_instead_of_placing_them_again() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        t.join("b2".into(), builder("two", 1, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        t.stop();
        let out = t.builder_lost("b1", "the scheduler is shutting down", now);
        assert_eq!(started_on(&out), None);
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Close(1, Some(m)) if m.contains("shutting down"))));
        t.check();
    }

    #[test]
    fn a_heartbeat_changing_slots_reindexes_the_builder() {
        let now = Instant::now();
        let mut t = table(2);
        t.join("b1".into(), builder("one", 1, now), now);
        t.submit(1, spec("a.c"), tc(), "ci".into(), now);
        assert_eq!(
            refusal(&t.submit(2, spec("b.c"), tc(), "ci".into(), now)),
            Some(Reason::NoCapacity)
        );
        t.heartbeat("b1", 2, now);
        let out = t.submit(3, spec("c.c"), tc(), "ci".into(), now);
        assert_eq!(started_on(&out), Some("b1"));
        t.check();
    }
}
