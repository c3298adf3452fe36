//! The gRPC service: builder links, job relay, retries, status.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_proto::content::{chunk_digest, chunks, Assembly};
use kiln_proto::v1::scheduler_server::{Scheduler as SchedulerRpc, SchedulerServer};
use kiln_proto::v1::{
    from_builder, from_client, refused, to_builder, to_client, BuilderStatus, Chunk,
    FallbackReport, FromBuilder, FromClient, JobCancel, JobChunk, JobStart, JobStatus, Need,
    Placed, Refused, ReportReply, StatusReply, StatusRequest, SuspectReport, ToBuilder, ToClient,
    Welcome,
};
use kiln_proto::{digest_of, version_mismatch, Digest, MAX_MESSAGE, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Caller, Held, InFlight, Role};
use crate::metrics::{Gauges, Metrics, Outcome};
use crate::placement::{self, BuilderState, NoPlace, Registry, Wants};
use crate::toolchains::Toolchains;

/// The scheduler's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often builders send a heartbeat; three missed ones and a builder is lost.
    pub heartbeat: Duration,
    /// Memory for toolchain archives relayed to builders.
    pub toolchain_cache: u64,
    /// Builders a job may be tried on before the client is told to compile locally.
    pub max_attempts: u32,
    /// The largest toolchain the scheduler accepts.
    pub max_toolchain: u64,
    /// A kiln-cache (`https://HOST:PORT`) whose counts the dashboard's hit-rate chart reads.
    pub cache: Option<String>,
    /// The CA its certificate chains to.
    pub cache_tls: kiln_net::tls::ClientFiles,
    /// The token it wants, when it keeps reads private.
    pub cache_token: kiln_net::auth::Credential,
    /// How often that is read.
    pub cache_poll: Duration,
    /// TLS for the gRPC and HTTP listeners, or plain text.
    pub listen: kiln_net::tls::Listen,
    /// The HTTP listener's own, when it differs from [`Config::listen`].
    pub http_listen: Option<kiln_net::tls::Listen>,
    /// The credentials clients and builders must present.
    pub auth: Auth,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            heartbeat: Duration::from_secs(2),
            toolchain_cache: 2 << 30,
            max_attempts: 2,
            max_toolchain: 1 << 30,
            cache: None,
            cache_tls: kiln_net::tls::ClientFiles::default(),
            cache_token: kiln_net::auth::Credential::None,
            cache_poll: Duration::from_secs(10),
            listen: kiln_net::tls::Listen::Insecure,
            http_listen: None,
            auth: Auth::default(),
        }
    }
}

type ClientTx = mpsc::Sender<Result<ToClient, Status>>;
type BuilderTx = mpsc::Sender<Result<ToBuilder, Status>>;

struct Job {
    spec: kiln_proto::v1::JobSpec,
    toolchain: Digest,
    client: ClientTx,
    builder: String,
    attempt: u32,
    tried: Vec<String>,
    started: Instant,
    /// The builder reported the result; the slot is free again.
    finished: bool,
    /// Chunk bytes relayed for this job, to its builder and back.
    bytes: u64,
    /// Counts against its client's jobs in flight until the job is dropped.
    _held: Option<Held>,
    /// The name of the client's token.
    caller: String,
}

/// A job that is over, for the dashboard.
#[derive(Debug, Clone)]
struct Recent {
    label: String,
    /// The name of the client's token.
    client: String,
    builder: String,
    ms: u64,
    outcome: &'static str,
    bytes: u64,
    at: Instant,
}

/// Jobs kept for the dashboard's list, and the window its throughput chart covers.
const RECENT: usize = 50;
const WINDOW: Duration = Duration::from_secs(300);

struct State {
    registry: Registry,
    links: HashMap<String, BuilderTx>,
    jobs: HashMap<u64, Job>,
    toolchains: Toolchains,
    /// Toolchains arriving from clients, by job.
    uploads: HashMap<u64, Assembly>,
    jobs_done: u64,
    jobs_failed: u64,
    /// The last [`RECENT`] jobs that ended.
    recent: std::collections::VecDeque<Recent>,
    /// When jobs finished over the last [`WINDOW`].
    finished_at: std::collections::VecDeque<Instant>,
    /// The shared cache's lookups over the last [`WINDOW`]: when, hits, misses.
    cache_lookups: std::collections::VecDeque<(Instant, u64, u64)>,
    /// Builders a cross-check found wrong, by name, and why: kept across their reconnects.
    suspects: HashMap<String, String>,
}

impl Job {
    /// What the dashboard keeps of it once it is over.
    fn recent(&self, outcome: &'static str) -> Recent {
        let at = Instant::now();
        Recent {
            label: self.spec.label.clone(),
            client: self.caller.clone(),
            builder: self.builder.clone(),
            ms: at.duration_since(self.started).as_millis() as u64,
            outcome,
            bytes: self.bytes,
            at,
        }
    }
}

impl State {
    fn ended(&mut self, mut recent: Recent) {
        let now = recent.at;
        // Builders are listed by label, as in the builders' table.
        recent.builder = label(&self.registry.builders, &recent.builder).unwrap_or_default();
        let outcome = recent.outcome;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(recent);
        if outcome == "finished" {
            self.finished_at.push_back(now);
        }
        while self
            .finished_at
            .front()
            .is_some_and(|t| now.duration_since(*t) > WINDOW)
        {
            self.finished_at.pop_front();
        }
    }
}

struct Inner {
    config: Config,
    state: Mutex<State>,
    next_job: AtomicU64,
    next_builder: AtomicU64,
    started: Instant,
    shutdown: watch::Receiver<bool>,
    metrics: Metrics,
    in_flight: InFlight,
}

/// The scheduler service; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

fn refused(reason: refused::Reason, message: impl Into<String>) -> ToClient {
    ToClient {
        msg: Some(to_client::Msg::Refused(Refused {
            reason: reason as i32,
            message: message.into(),
        })),
    }
}

impl Scheduler {
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    registry: Registry::default(),
                    links: HashMap::new(),
                    jobs: HashMap::new(),
                    toolchains: Toolchains::new(config.toolchain_cache),
                    uploads: HashMap::new(),
                    jobs_done: 0,
                    jobs_failed: 0,
                    recent: Default::default(),
                    finished_at: Default::default(),
                    cache_lookups: Default::default(),
                    suspects: HashMap::new(),
                }),
                config,
                next_job: AtomicU64::new(1),
                next_builder: AtomicU64::new(1),
                started: Instant::now(),
                shutdown,
                metrics: Metrics::default(),
                in_flight: InFlight::default(),
            }),
        }
    }

    /// Reads the shared cache's lookup counters every [`Config::cache_poll`] until shutdown,
    /// keeping what changed since the last read for the dashboard. An unreachable cache is
    /// skipped (and logged once per outage).
    async fn watch_cache(self, url: String) {
        let mut stop = self.inner.shutdown.clone();
        let mut tick = tokio::time::interval(self.inner.config.cache_poll);
        let mut last: Option<(u64, u64)> = None;
        let mut down = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = match self.cache_lookups(&url).await {
                Ok(now) => now,
                Err(e) => {
                    if !down {
                        tracing::warn!(cache = %url, "cannot read the shared cache's counts: {e}");
                    }
                    down = true;
                    continue;
                }
            };
            down = false;
            if let Some((hits, misses)) = last {
                let at = Instant::now();
                let mut st = self.lock();
                st.cache_lookups.push_back((
                    at,
                    now.0.saturating_sub(hits),
                    now.1.saturating_sub(misses),
                ));
                while st
                    .cache_lookups
                    .front()
                    .is_some_and(|(t, _, _)| at.duration_since(*t) > WINDOW)
                {
                    st.cache_lookups.pop_front();
                }
            }
            last = Some(now);
        }
    }

    /// A kiln-cache's hits and misses so far, over all its protocols.
    async fn cache_lookups(&self, url: &str) -> Result<(u64, u64), String> {
        let config = &self.inner.config;
        let interceptor = config.cache_token.interceptor()?;
        let channel = kiln_net::tls::endpoint(url, &config.cache_tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let stats =
            kiln_proto::v1::cache_client::CacheClient::with_interceptor(channel, interceptor)
                .stats(kiln_proto::v1::CacheStatsRequest {})
                .await
                .map_err(|s| s.message().to_owned())?
                .into_inner();
        Ok((stats.hits, stats.misses))
    }

    /// The farm now: what `kiln dist-status` and the dashboard show.
    pub fn status_reply(&self) -> StatusReply {
        let now = Instant::now();
        let st = self.lock();
        // Names shared by more than one builder, counted once for the whole reply.
        let mut named: HashMap<&str, usize> = HashMap::new();
        for b in st.registry.builders.values() {
            *named.entry(b.name.as_str()).or_default() += 1;
        }
        let label = |id: &str| match st.registry.builders.get(id) {
            Some(b) if named[b.name.as_str()] > 1 => format!("{} ({id})", b.name),
            Some(b) => b.name.clone(),
            None => String::new(),
        };
        let builders = st
            .registry
            .builders
            .iter()
            .map(|(id, b)| BuilderStatus {
                id: id.clone(),
                name: b.name.clone(),
                label: label(id),
                last_failure_ms: b
                    .last_failure
                    .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                health: health(b, now).into(),
                os: b.os.clone(),
                arch: b.arch.clone(),
                jail: b.jail.clone(),
                slots: b.slots,
                running: b.running,
                // Digests are capabilities (see the field's comment): counted, not listed.
                toolchains: Vec::new(),
                toolchains_held: b.toolchains.len() as u32,
                jobs_done: b.jobs_done,
                jobs_failed: b.jobs_failed,
                connected_ms: now.duration_since(b.connected).as_millis() as u64,
                toolchains_received: b.toolchains_received,
                suspect: b.suspect.clone().unwrap_or_default(),
            })
            .collect();
        let mut jobs: Vec<JobStatus> = st
            .jobs
            .iter()
            .map(|(id, j)| JobStatus {
                id: *id,
                builder: label(&j.builder),
                builder_id: j.builder.clone(),
                label: j.spec.label.clone(),
                running_ms: now.duration_since(j.started).as_millis() as u64,
                attempt: j.attempt,
            })
            .collect();
        jobs.sort_by_key(|j| j.id);
        StatusReply {
            protocol_version: PROTOCOL_VERSION,
            builders,
            jobs,
            jobs_done: st.jobs_done,
            jobs_failed: st.jobs_failed,
            uptime_ms: now.duration_since(self.inner.started).as_millis() as u64,
        }
    }

    /// `GET /api/status`, the dashboard's data: the status, the jobs that ended last, and the
    /// jobs finished per 10 seconds over the last five minutes (oldest first).
    pub fn dashboard_json(&self) -> serde_json::Value {
        let status = self.status_reply();
        let (recent, per_bucket, hit_rate) = {
            let st = self.lock();
            let now = Instant::now();
            let recent: Vec<serde_json::Value> = st
                .recent
                .iter()
                .rev()
                .map(|r| {
                    serde_json::json!({
                        "label": r.label,
                        "client": r.client,
                        "builder": r.builder,
                        "ms": r.ms,
                        "outcome": r.outcome,
                        "bytes": r.bytes,
                        "ago_ms": now.duration_since(r.at).as_millis() as u64,
                    })
                })
                .collect();
            let buckets = (WINDOW.as_secs() / 10) as usize;
            let bucket = |t: &Instant| {
                let age = (now.duration_since(*t).as_secs() / 10) as usize;
                (age < buckets).then(|| buckets - 1 - age)
            };
            let mut per_bucket = vec![0u64; buckets];
            for i in st.finished_at.iter().filter_map(bucket) {
                per_bucket[i] += 1;
            }
            let mut lookups = vec![(0u64, 0u64); buckets];
            for (t, hits, misses) in &st.cache_lookups {
                if let Some(i) = bucket(t) {
                    lookups[i].0 += hits;
                    lookups[i].1 += misses;
                }
            }
            let hit_rate: Vec<Option<f64>> = lookups
                .iter()
                .map(|(h, m)| (h + m > 0).then(|| *h as f64 / (h + m) as f64))
                .collect();
            (recent, per_bucket, hit_rate)
        };
        serde_json::json!({
            "uptime_ms": status.uptime_ms,
            "jobs_done": status.jobs_done,
            "jobs_failed": status.jobs_failed,
            "builders": status.builders.iter().map(|b| serde_json::json!({
                "name": b.label,
                "platform": format!("{}/{}", b.os, b.arch),
                "jail": b.jail,
                "slots": b.slots,
                "running": b.running,
                "toolchains": b.toolchains.len(),
                "jobs_done": b.jobs_done,
                "jobs_failed": b.jobs_failed,
                "connected_ms": b.connected_ms,
                "last_failure_ms": b.last_failure_ms,
                "health": b.health,
                "suspect": b.suspect,
            })).collect::<Vec<_>>(),
            "jobs": status.jobs.iter().map(|j| serde_json::json!({
                "label": j.label,
                "builder": j.builder,
                "running_ms": j.running_ms,
                "attempt": j.attempt,
            })).collect::<Vec<_>>(),
            "recent": recent,
            "finished_per_10s": per_bucket,
            "cache": self.inner.config.cache,
            "cache_hit_rate_per_10s": hit_rate,
        })
    }

    /// `GET /metrics`: the counters and the registry's gauges, in Prometheus's text format.
    pub fn metrics_text(&self) -> String {
        let gauges = {
            let st = self.lock();
            let builders = st.registry.builders.values();
            Gauges {
                builders: st.registry.builders.len() as u64,
                slots: builders.clone().map(|b| u64::from(b.slots)).sum(),
                slots_busy: builders.map(|b| u64::from(b.running)).sum(),
                jobs_in_flight: st.jobs.len() as u64,
                toolchains_kept_bytes: st.toolchains.bytes(),
            }
        };
        self.inner.metrics.render(gauges)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is bookkeeping; a panic elsewhere must not take the farm down with it.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Places job `id` (first time or again) and starts it on the chosen builder. On failure the
    /// client is told why and the job is forgotten.
    async fn place(&self, id: u64) {
        if *self.inner.shutdown.borrow() {
            // Its builder's link closed because this scheduler is stopping: the job is not
            // short of capacity, the scheduler is going away. The client says so and
            // compiles locally.
            let job = self.lock().jobs.remove(&id);
            if let Some(job) = job {
                tracing::info!(job = id, "job ended by the scheduler's shutdown");
                let _ = job
                    .client
                    .send(Err(Status::unavailable(
                        "the scheduler is shutting down; the job did not finish",
                    )))
                    .await;
            }
            return;
        }
        let decision = {
            let mut st = self.lock();
            let st = &mut *st;
            let Some(job) = st.jobs.get_mut(&id) else {
                return;
            };
            if job.attempt >= self.inner.config.max_attempts {
                Err((
                    refused::Reason::BuildersFailed,
                    format!("{} builders failed this job", job.attempt),
                ))
            } else {
                let wants = Wants {
                    os: &job.spec.os,
                    arch: &job.spec.arch,
                    toolchain: job.toolchain,
                    exclude: &job.tried,
                };
                match placement::place(&st.registry, &wants, Instant::now()) {
                    Ok(builder) => {
                        job.attempt += 1;
                        if job.attempt == 1 {
                            self.inner.metrics.placement.observe(job.started.elapsed());
                        }
                        job.tried.push(builder.clone());
                        job.builder = builder.clone();
                        job.finished = false;
                        st.uploads.remove(&id);
                        if let Some(b) = st.registry.builders.get_mut(&builder) {
                            b.running += 1;
                        }
                        let start = ToBuilder {
                            msg: Some(to_builder::Msg::Start(JobStart {
                                job_id: id,
                                spec: Some(job.spec.clone()),
                            })),
                        };
                        let placed = ToClient {
                            msg: Some(to_client::Msg::Placed(Placed {
                                builder: st
                                    .registry
                                    .builders
                                    .get(&builder)
                                    .map(|b| b.name.clone())
                                    .unwrap_or_default(),
                                attempt: job.attempt,
                            })),
                        };
                        Ok((
                            st.links.get(&builder).cloned(),
                            job.client.clone(),
                            start,
                            placed,
                        ))
                    }
                    Err(NoPlace::NoBuilders) => Err((
                        refused::Reason::NoBuilders,
                        format!("no {}/{} builder is connected", job.spec.os, job.spec.arch),
                    )),
                    Err(NoPlace::NoCapacity) => Err((
                        refused::Reason::NoCapacity,
                        "every suitable builder is busy".into(),
                    )),
                }
            }
        };
        match decision {
            Ok((link, client, start, placed)) => {
                let _ = client.send(Ok(placed)).await;
                match link {
                    Some(link) if link.send(Ok(start)).await.is_ok() => {}
                    // The builder went away between placement and sending: its loss handler
                    // (or this retry) places the job again.
                    _ => Box::pin(self.retry(id, "the builder's link closed")).await,
                }
            }
            Err((reason, message)) => {
                let job = {
                    let mut st = self.lock();
                    let job = st.jobs.remove(&id);
                    if let Some(j) = &job {
                        st.ended(j.recent(match reason {
                            refused::Reason::NoBuilders => "no_builders",
                            refused::Reason::NoCapacity => "no_capacity",
                            _ => "builders_failed",
                        }));
                    }
                    job
                };
                if let Some(job) = job {
                    self.inner.metrics.count(match reason {
                        refused::Reason::NoBuilders => Outcome::NoBuilders,
                        refused::Reason::NoCapacity => Outcome::NoCapacity,
                        _ => Outcome::BuildersFailed,
                    });
                    tracing::info!(job = id, %message, "job refused");
                    let _ = job.client.send(Ok(refused(reason, message))).await;
                }
            }
        }
    }

    /// Job `id` failed on its builder through no fault of its own: try another.
    async fn retry(&self, id: u64, why: &str) {
        {
            let mut st = self.lock();
            let st = &mut *st;
            let Some(job) = st.jobs.get_mut(&id) else {
                return;
            };
            if let Some(b) = st.registry.builders.get_mut(&job.builder) {
                if !job.finished {
                    b.running = b.running.saturating_sub(1);
                }
                b.last_failure = Some(Instant::now());
                b.jobs_failed += 1;
            }
            st.jobs_failed += 1;
            self.inner.metrics.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job = id, builder = %job.builder, why, "job failed on its builder; placing it again");
        }
        self.place(id).await;
    }

    async fn builder_lost(&self, id: &str, why: &str) {
        let jobs: Vec<u64> = {
            let mut st = self.lock();
            st.links.remove(id);
            if let Some(b) = st.registry.builders.get(id) {
                tracing::warn!(builder = %b.name, id, why, "builder lost");
            }
            st.jobs
                .iter()
                .filter(|(_, j)| j.builder == id)
                .map(|(k, _)| *k)
                .collect()
        };
        for job in jobs {
            self.retry(job, why).await;
        }
        self.lock().registry.builders.remove(id);
    }

    async fn on_builder_message(&self, builder: &str, msg: from_builder::Msg) {
        match msg {
            from_builder::Msg::Register(_) => {}
            from_builder::Msg::Heartbeat(hb) => {
                if let Some(b) = self.lock().registry.builders.get_mut(builder) {
                    b.slots = hb.slots.max(1);
                }
            }
            from_builder::Msg::Toolchains(change) => {
                let mut st = self.lock();
                if let Some(b) = st.registry.builders.get_mut(builder) {
                    for d in change.added.iter().filter_map(|d| digest_of(d).ok()) {
                        b.toolchains.insert(d);
                        b.toolchains_received += 1;
                    }
                    for d in change.evicted.iter().filter_map(|d| digest_of(d).ok()) {
                        b.toolchains.remove(&d);
                    }
                }
            }
            from_builder::Msg::Need(need) => {
                self.on_need(builder, need.job_id, need.need.unwrap_or_default())
                    .await
            }
            from_builder::Msg::Chunk(c) => {
                let n = c.chunk.as_ref().map_or(0, |c| c.data.len() as u64);
                let client = {
                    let mut st = self.lock();
                    st.jobs
                        .get_mut(&c.job_id)
                        .filter(|j| j.builder == builder)
                        .map(|j| {
                            j.bytes += n;
                            j.client.clone()
                        })
                };
                if let (Some(client), Some(chunk)) = (client, c.chunk) {
                    let n = chunk.data.len() as u64;
                    self.inner
                        .metrics
                        .to_clients
                        .fetch_add(n, Ordering::Relaxed);
                    let _ = client
                        .send(Ok(ToClient {
                            msg: Some(to_client::Msg::Chunk(chunk)),
                        }))
                        .await;
                }
            }
            from_builder::Msg::Finished(f) => {
                let client = {
                    let mut st = self.lock();
                    let st = &mut *st;
                    match st.jobs.get_mut(&f.job_id).filter(|j| j.builder == builder) {
                        Some(job) => {
                            job.finished = true;
                            st.jobs_done += 1;
                            self.inner.metrics.count(Outcome::Finished);
                            self.inner.metrics.job.observe(job.started.elapsed());
                            if let Some(b) = st.registry.builders.get_mut(builder) {
                                b.running = b.running.saturating_sub(1);
                                b.jobs_done += 1;
                            }
                            let client = job.client.clone();
                            let recent = job.recent("finished");
                            st.ended(recent);
                            Some(client)
                        }
                        None => None,
                    }
                };
                if let (Some(client), Some(finished)) = (client, f.finished) {
                    let _ = client
                        .send(Ok(ToClient {
                            msg: Some(to_client::Msg::Finished(finished)),
                        }))
                        .await;
                }
            }
            from_builder::Msg::Rejected(r) => {
                if self.client_of(builder, r.job_id).is_none() {
                    return;
                }
                if r.retry {
                    self.retry(r.job_id, &r.message).await;
                } else {
                    let job = {
                        let mut st = self.lock();
                        let job = st.jobs.remove(&r.job_id);
                        if let Some(b) = st.registry.builders.get_mut(builder) {
                            b.running = b.running.saturating_sub(1);
                        }
                        if let Some(j) = &job {
                            st.ended(j.recent("refused"));
                        }
                        job
                    };
                    if let Some(job) = job {
                        self.inner.metrics.count(Outcome::Refused);
                        let _ = job
                            .client
                            .send(Ok(refused(refused::Reason::BadRequest, r.message)))
                            .await;
                    }
                }
            }
        }
    }

    fn client_of(&self, builder: &str, job: u64) -> Option<ClientTx> {
        self.lock()
            .jobs
            .get(&job)
            .filter(|j| j.builder == builder)
            .map(|j| j.client.clone())
    }

    /// A builder lacks something for a job. Toolchains the scheduler holds go from here; the
    /// rest is asked of the client.
    async fn on_need(&self, builder: &str, job_id: u64, mut need: Need) {
        let (client, link, toolchain) = {
            let mut st = self.lock();
            let st = &mut *st;
            let Some(job) = st.jobs.get(&job_id).filter(|j| j.builder == builder) else {
                return;
            };
            let toolchain = if need.toolchain {
                st.toolchains
                    .get(&job.toolchain)
                    .map(|data| (job.toolchain, data))
            } else {
                None
            };
            if toolchain.is_some() {
                need.toolchain = false;
            }
            (
                job.client.clone(),
                st.links.get(builder).cloned(),
                toolchain,
            )
        };
        if let (Some((digest, data)), Some(link)) = (toolchain, link) {
            tracing::debug!(job = job_id, builder, "sending a cached toolchain");
            // On its own task: a large archive must not hold up this builder's other messages.
            let this = self.clone();
            tokio::spawn(async move {
                for chunk in chunks(&digest, &data) {
                    let n = chunk.data.len() as u64;
                    this.inner
                        .metrics
                        .toolchains_served
                        .fetch_add(n, Ordering::Relaxed);
                    let msg = ToBuilder {
                        msg: Some(to_builder::Msg::Chunk(JobChunk {
                            job_id,
                            chunk: Some(chunk),
                        })),
                    };
                    if link.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
            });
        }
        if need.toolchain || !need.files.is_empty() {
            let _ = client
                .send(Ok(ToClient {
                    msg: Some(to_client::Msg::Need(need)),
                }))
                .await;
        }
    }

    /// A chunk from a client: relayed to the job's builder, and kept if it is part of a
    /// toolchain the scheduler does not hold yet.
    async fn on_client_chunk(&self, job_id: u64, chunk: Chunk) -> Result<(), Status> {
        let link = {
            let mut st = self.lock();
            let st = &mut *st;
            let Some(job) = st.jobs.get_mut(&job_id) else {
                return Ok(());
            };
            job.bytes += chunk.data.len() as u64;
            let (digest, size) =
                chunk_digest(&chunk).map_err(|e| Status::invalid_argument(e.to_string()))?;
            if digest == job.toolchain && !st.toolchains.contains(&digest) {
                if chunk.offset == 0 {
                    match Assembly::new(digest, size, self.inner.config.max_toolchain) {
                        Ok(a) => {
                            st.uploads.insert(job_id, a);
                        }
                        Err(e) => return Err(Status::invalid_argument(format!("toolchain: {e}"))),
                    }
                }
                if let Some(asm) = st.uploads.get_mut(&job_id) {
                    match asm.add(&chunk) {
                        Ok(Some(data)) => {
                            st.uploads.remove(&job_id);
                            st.toolchains.insert(digest, data);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            // The builder checks the digest too and refuses the job; here the
                            // copy is just not kept.
                            tracing::warn!(job = job_id, error = %e, "toolchain upload is corrupt");
                            st.uploads.remove(&job_id);
                        }
                    }
                }
            }
            st.links.get(&job.builder).cloned()
        };
        if let Some(link) = link {
            let n = chunk.data.len() as u64;
            self.inner
                .metrics
                .to_builders
                .fetch_add(n, Ordering::Relaxed);
            let msg = ToBuilder {
                msg: Some(to_builder::Msg::Chunk(JobChunk {
                    job_id,
                    chunk: Some(chunk),
                })),
            };
            let _ = link.send(Ok(msg)).await;
        }
        Ok(())
    }

    /// The client's stream ended: the job is over for everyone.
    async fn client_gone(&self, job_id: u64) {
        let (job, link) = {
            let mut st = self.lock();
            st.uploads.remove(&job_id);
            let job = st.jobs.remove(&job_id);
            let link = job.as_ref().and_then(|j| st.links.get(&j.builder).cloned());
            if let Some(j) = &job {
                if !j.finished {
                    self.inner.metrics.count(Outcome::Abandoned);
                    let recent = j.recent("abandoned");
                    st.ended(recent);
                    if let Some(b) = st.registry.builders.get_mut(&j.builder) {
                        b.running = b.running.saturating_sub(1);
                    }
                }
            }
            (job, link)
        };
        if let (Some(job), Some(link)) = (job, link) {
            if !job.finished {
                let msg = ToBuilder {
                    msg: Some(to_builder::Msg::Cancel(JobCancel { job_id })),
                };
                let _ = link.send(Ok(msg)).await;
            }
        }
    }
}

/// A builder's health for people: `suspect` (placement skips it), `failed recently` (placement
/// puts it last, for [`placement::FAILURE_PENALTY`]) or `ok`.
fn health(b: &BuilderState, now: Instant) -> &'static str {
    if b.suspect.is_some() {
        "suspect"
    } else if b
        .last_failure
        .is_some_and(|t| now.saturating_duration_since(t) < placement::FAILURE_PENALTY)
    {
        "failed recently"
    } else {
        "ok"
    }
}

/// Builder `id`'s label: its name, or `name (id)` when another joined builder has the same
/// name (two builders on one host both default to its host name), so that people can tell them
/// apart in `kiln dist-status` and on the dashboard. No allocation but the label's: it runs
/// as each job ends.
fn label(builders: &BTreeMap<String, BuilderState>, id: &str) -> Option<String> {
    let b = builders.get(id)?;
    let twins = builders.values().filter(|o| o.name == b.name).count();
    Some(if twins > 1 {
        format!("{} ({id})", b.name)
    } else {
        b.name.clone()
    })
}

fn validate(spec: &kiln_proto::v1::JobSpec) -> Result<Digest, String> {
    let toolchain = spec
        .toolchain
        .as_ref()
        .ok_or("the job names no toolchain")?;
    let digest = digest_of(toolchain).map_err(|e| e.to_string())?;
    if spec.argv.is_empty() {
        return Err("the job has no command".into());
    }
    if spec.os.is_empty() || spec.arch.is_empty() {
        return Err("the job names no platform".into());
    }
    Ok(digest)
}

#[tonic::async_trait]
impl SchedulerRpc for Scheduler {
    type JoinStream = ReceiverStream<Result<ToBuilder, Status>>;
    type CompileStream = ReceiverStream<Result<ToClient, Status>>;

    async fn join(
        &self,
        request: Request<Streaming<FromBuilder>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let peer = request
            .extensions()
            .get::<kiln_net::tls::Peer>()
            .and_then(|p| p.addr);
        let caller = self
            .inner
            .config
            .auth
            .check(&request, Role::Builder, "builders need")
            .inspect_err(|status| {
                // As for jobs: an operator sees why a builder could not join, never the token.
                tracing::warn!(?peer, code = ?status.code(), reason = %status.message(), "refused a builder: its credential failed");
            })?;
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty builder stream"))?;
        let Some(from_builder::Msg::Register(reg)) = first.msg else {
            return Err(Status::invalid_argument(
                "a builder's first message must be Register",
            ));
        };
        if reg.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(version_mismatch(
                "the builder",
                reg.protocol_version,
            )));
        }
        if reg.slots == 0 || reg.os.is_empty() || reg.arch.is_empty() {
            return Err(Status::invalid_argument(
                "a builder must register a platform and at least one slot",
            ));
        }
        if let Some(e) = reg.toolchains.iter().find_map(|d| digest_of(d).err()) {
            return Err(Status::invalid_argument(format!(
                "Register lists a toolchain by a {e}"
            )));
        }
        let id = format!(
            "b{}",
            self.inner.next_builder.fetch_add(1, Ordering::Relaxed)
        );
        let name = if reg.name.is_empty() {
            id.clone()
        } else {
            reg.name.clone()
        };
        let (tx, rx) = mpsc::channel(256);
        {
            let mut st = self.lock();
            let suspect = st.suspects.get(&name).cloned();
            st.registry.builders.insert(
                id.clone(),
                BuilderState {
                    name: name.clone(),
                    os: reg.os.clone(),
                    arch: reg.arch.clone(),
                    jail: reg.jail.clone(),
                    slots: reg.slots,
                    running: 0,
                    toolchains: reg
                        .toolchains
                        .iter()
                        .filter_map(|d| digest_of(d).ok())
                        .collect(),
                    last_failure: None,
                    connected: Instant::now(),
                    jobs_done: 0,
                    jobs_failed: 0,
                    toolchains_received: 0,
                    suspect,
                },
            );
            st.links.insert(id.clone(), tx.clone());
        }
        tracing::info!(builder = %name, id = %id, ?peer, credential = %caller.name, slots = reg.slots, os = %reg.os, arch = %reg.arch, "builder joined");
        let welcome = ToBuilder {
            msg: Some(to_builder::Msg::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                builder_id: id.clone(),
                heartbeat_ms: self.inner.config.heartbeat.as_millis() as u64,
            })),
        };
        let _ = tx.send(Ok(welcome)).await;
        drop(tx);
        let this = self.clone();
        let silence = self.inner.config.heartbeat * 3;
        let mut shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let why = loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(silence, incoming.message()) => next,
                    _ = shutdown.changed() => break "the scheduler is shutting down".to_string(),
                };
                match next {
                    Err(_) => break format!("no heartbeat for {} ms", silence.as_millis()),
                    Ok(Err(e)) => break format!("stream error: {}", e.message()),
                    Ok(Ok(None)) => break "the builder closed its stream".to_string(),
                    Ok(Ok(Some(FromBuilder { msg: Some(msg) }))) => {
                        this.on_builder_message(&id, msg).await
                    }
                    Ok(Ok(Some(_))) => {}
                }
            };
            this.builder_lost(&id, &why).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn compile(
        &self,
        request: Request<Streaming<FromClient>>,
    ) -> Result<Response<Self::CompileStream>, Status> {
        let caller: Caller = match self
            .inner
            .config
            .auth
            .check(&request, Role::Client, "jobs need")
        {
            Ok(caller) => caller,
            Err(status) => {
                // Operators must see these (issue 15): counted as a refused job, and logged
                // with why the credential failed. The message never holds the token itself.
                self.inner.metrics.count(Outcome::Refused);
                let peer = request
                    .extensions()
                    .get::<kiln_net::tls::Peer>()
                    .and_then(|p| p.addr);
                tracing::warn!(?peer, code = ?status.code(), reason = %status.message(), "refused a job: its credential failed");
                return Err(status);
            }
        };
        let held = self.inner.in_flight.take(&caller)?;
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty job stream"))?;
        let Some(from_client::Msg::Spec(spec)) = first.msg else {
            return Err(Status::invalid_argument(
                "a job's first message must be its JobSpec",
            ));
        };
        if spec.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(version_mismatch(
                "the client",
                spec.protocol_version,
            )));
        }
        let toolchain = validate(&spec).map_err(Status::invalid_argument)?;
        let (tx, rx) = mpsc::channel(64);
        let id = self.inner.next_job.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(job = id, label = %spec.label, client = %caller.name, "job received");
        self.inner.metrics.received_from(&caller.name);
        self.lock().jobs.insert(
            id,
            Job {
                spec,
                toolchain,
                client: tx,
                builder: String::new(),
                attempt: 0,
                tried: Vec::new(),
                started: Instant::now(),
                finished: false,
                bytes: 0,
                _held: held,
                caller: caller.name,
            },
        );
        self.place(id).await;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match incoming.message().await {
                    Ok(Some(FromClient {
                        msg: Some(from_client::Msg::Chunk(chunk)),
                    })) => {
                        if let Err(status) = this.on_client_chunk(id, chunk).await {
                            let client = this.lock().jobs.get(&id).map(|j| j.client.clone());
                            if let Some(client) = client {
                                let _ = client.send(Err(status)).await;
                            }
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Err(status) if status.code() == tonic::Code::InvalidArgument => {
                        // A message that does not decode: the client hears why its job ended.
                        let client = this.lock().jobs.get(&id).map(|j| j.client.clone());
                        if let Some(client) = client {
                            let _ = client.send(Err(status)).await;
                        }
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            this.client_gone(id).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        // The status names every builder and job: a client's view, never a builder's.
        self.inner
            .config
            .auth
            .check(&request, Role::Client, "status calls need")?;
        Ok(Response::new(self.status_reply()))
    }

    async fn report(
        &self,
        request: Request<SuspectReport>,
    ) -> Result<Response<ReportReply>, Status> {
        let caller =
            self.inner
                .config
                .auth
                .check(&request, Role::Client, "suspect reports need")?;
        let r = request.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(version_mismatch(
                "the client",
                r.protocol_version,
            )));
        }
        if r.builder.is_empty() || r.builder.len() > 256 {
            return Err(Status::invalid_argument("a report names one builder"));
        }
        let why = format!(
            "{} differed from a second compile ({}) of {}, reported by {}",
            if r.differing.is_empty() {
                "the result".to_string()
            } else {
                r.differing.join(", ")
            },
            if r.checked_by.is_empty() {
                "local"
            } else {
                &r.checked_by
            },
            r.label,
            caller.name,
        );
        // The report is the client's word: it is logged in full for whoever looks into it.
        tracing::error!(builder = %r.builder, "builder marked suspect: {why}");
        let mut st = self.lock();
        let known = st.registry.builders.values().any(|b| b.name == r.builder);
        if !known {
            return Err(Status::not_found(format!(
                "no builder named {:?} is joined",
                r.builder
            )));
        }
        for b in st
            .registry
            .builders
            .values_mut()
            .filter(|b| b.name == r.builder)
        {
            b.suspect = Some(why.clone());
        }
        st.suspects.insert(r.builder, why);
        drop(st);
        self.inner
            .metrics
            .suspect_reports
            .fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ReportReply {}))
    }

    async fn fallbacks(
        &self,
        request: Request<FallbackReport>,
    ) -> Result<Response<ReportReply>, Status> {
        let caller =
            self.inner
                .config
                .auth
                .check(&request, Role::Client, "fallback reports need")?;
        let r = request.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(version_mismatch(
                "the client",
                r.protocol_version,
            )));
        }
        crate::fallbacks::check(&r).map_err(Status::invalid_argument)?;
        for c in &r.counts {
            self.inner
                .metrics
                .fallbacks_from(&caller.name, &c.cause, c.count);
        }
        Ok(Response::new(ReportReply {}))
    }
}

/// Serves the scheduler on `listener` until `shutdown` resolves; builder links are closed then,
/// so builders reconnect to the next scheduler. With `http`, the dashboard and `GET /metrics`
/// (Prometheus's text format) are served there until the same moment. Both listeners use
/// [`Config::listen`].
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listen = config.listen.clone();
    serve_listeners(config, vec![(listener, listen)], http, shutdown).await
}

/// [`serve`] on several gRPC listeners, each with its own security: `--local-builder` adds a
/// plain-text loopback one that only its in-process builder's token opens.
pub async fn serve_listeners(
    config: Config,
    listeners: Vec<(tokio::net::TcpListener, kiln_net::tls::Listen)>,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let cache = config.cache.clone();
    let listen = config
        .http_listen
        .clone()
        .unwrap_or_else(|| config.listen.clone());
    let scheduler = Scheduler::new(config, stop_rx.clone());
    let watcher = cache.map(|url| tokio::spawn(scheduler.clone().watch_cache(url)));
    let web = http.map(|listener| {
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics))
            .route("/", axum::routing::get(dashboard))
            .route("/api/status", axum::routing::get(api_status))
            .with_state(scheduler.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(kiln_net::tls::serve_http(
            listener,
            listen,
            app,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ))
    });
    let service = SchedulerServer::new(scheduler)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let incoming = listeners
        .into_iter()
        .enumerate()
        .map(|(i, (listener, listen))| (i, kiln_net::tls::incoming(listener, listen)))
        .collect::<tokio_stream::StreamMap<usize, _>>();
    let incoming = tokio_stream::StreamExt::map(incoming, |(_, conn)| conn);
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        // A call must be answered this soon: a peer that opens a stream and never sends its
        // first message is cut off. The streams themselves then last as long as their jobs.
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    if let Some(web) = web {
        web.await??;
    }
    if let Some(watcher) = watcher {
        watcher.await?;
    }
    served?;
    Ok(())
}

async fn metrics(
    axum::extract::State(scheduler): axum::extract::State<Scheduler>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            kiln_net::metrics::CONTENT_TYPE,
        )],
        scheduler.metrics_text(),
    )
}

/// The dashboard: one page with no build step, updating itself from `/api/status`.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn api_status(
    axum::extract::State(scheduler): axum::extract::State<Scheduler>,
) -> axum::Json<serde_json::Value> {
    axum::Json(scheduler.dashboard_json())
}
