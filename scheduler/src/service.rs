//! The gRPC service: I/O only. What happens to a job is decided by [`JobTable`]; this module
//! reads the streams, feeds the table its events, and carries out what it answers.
//!
//! What is shared, and how (issue 17: the scheduler scales with cores, not builders):
//! - the job table sits behind one lock, held for bookkeeping only: never across a send, a
//!   hash or JSON building, and placement under it costs a few ordered-set steps;
//! - chunks are relayed without it: each job's [`Route`] (its client's stream, its builder)
//!   is found in a sharded map, and builder links in a read-mostly map;
//! - a job's results go to its client through a queue of its own, so a client that reads
//!   slowly delays only its own job, never the builder's other results;
//! - a toolchain a client uploads is assembled by that job's reader and verified on a
//!   task of its own; only the finished archive takes the store's lock;
//! - the status, the dashboard and `/metrics` are built from copies taken under the lock.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use kiln_net::task::Tracker;
use kiln_proto::content::{chunk_digest, chunks, Assembly};
use kiln_proto::v1::scheduler_server::{Scheduler as SchedulerRpc, SchedulerServer};
use kiln_proto::v1::{
    from_builder, from_client, to_builder, to_client, BuilderStatus, Chunk, FallbackReport,
    FromBuilder, FromClient, JobChunk, Need, ReportReply, StatusReply, StatusRequest,
    SuspectReport, ToBuilder, ToClient, Welcome,
};
use kiln_proto::{digest_of, version_mismatch, Digest, MAX_MESSAGE, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Caller, Held, InFlight, Role};
use crate::jobs::{JobId, JobTable, Limits, Out, Outcome, BUCKET, WINDOW};
use crate::metrics::{Gauges, Metrics};
use crate::placement::{self, BuilderState};
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

type ClientItem = Result<ToClient, Status>;
/// Boxed, so that each builder's link queue holds pointers: its first block of slots is
/// allocated when the builder joins, and at the message's own size it was ~9 KiB per builder.
type BuilderTx = mpsc::Sender<Box<ToBuilder>>;

/// Result bytes a job may have queued for a client that does not read them. Past this the
/// client is cut off and the job cancelled: the builder's link is never held up for it.
const CLIENT_BACKLOG: u64 = 256 << 20;

/// One job's relay: its client's stream and the builder it runs on. Shared by the job's own
/// reader and the builder's reader; nothing here is locked for longer than a field's copy.
struct Route {
    client: Mutex<Option<mpsc::UnboundedSender<ClientItem>>>,
    /// Chunk bytes queued for the client and not yet taken by its stream.
    backlog: Arc<AtomicU64>,
    builder: Mutex<String>,
    /// Chunk bytes relayed for this job, to its builder and back.
    bytes: AtomicU64,
    toolchain: Digest,
    /// Counts against its client's jobs in flight until the job's streams are gone.
    _held: Option<Held>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is bookkeeping; a panic elsewhere must not take the farm down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Route {
    /// Queues `msg` for the client without waiting; false if the client is gone or was cut
    /// off for not reading.
    fn push(&self, msg: ClientItem) -> bool {
        let n = match &msg {
            Ok(ToClient {
                msg: Some(to_client::Msg::Chunk(c)),
            }) => c.data.len() as u64,
            _ => 0,
        };
        let mut client = lock(&self.client);
        let Some(tx) = client.as_ref() else {
            return false;
        };
        if self.backlog.fetch_add(n, Ordering::Relaxed) + n > CLIENT_BACKLOG {
            let _ = tx.send(Err(Status::resource_exhausted(format!(
                "this job's client left more than {} MiB of results unread; the job is cancelled",
                CLIENT_BACKLOG >> 20
            ))));
            *client = None;
            return false;
        }
        tx.send(msg).is_ok()
    }

    /// Ends the client's stream, after what is queued, with `error` last if there is one.
    fn close(&self, error: Option<Status>) {
        if let Some(tx) = lock(&self.client).take() {
            if let Some(e) = error {
                let _ = tx.send(Err(e));
            }
        }
    }

    fn builder(&self) -> String {
        lock(&self.builder).clone()
    }

    fn is_on(&self, builder: &str) -> bool {
        *lock(&self.builder) == builder
    }
}

/// The stream of a job's messages to its client, counting the result bytes it takes off the
/// job's queue.
#[derive(Debug)]
pub struct ClientStream {
    rx: mpsc::UnboundedReceiver<ClientItem>,
    backlog: Arc<AtomicU64>,
}

impl tokio_stream::Stream for ClientStream {
    type Item = ClientItem;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientItem>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(ToClient {
            msg: Some(to_client::Msg::Chunk(c)),
        }))) = &polled
        {
            self.backlog
                .fetch_sub(c.data.len() as u64, Ordering::Relaxed);
        }
        polled
    }
}

/// The stream of a builder's link.
#[derive(Debug)]
pub struct BuilderStream {
    rx: mpsc::Receiver<Box<ToBuilder>>,
}

impl tokio_stream::Stream for BuilderStream {
    type Item = Result<ToBuilder, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|m| m.map(|m| Ok(*m)))
    }
}

/// Jobs' routes, in shards so that jobs on different cores rarely meet on one lock.
struct Routes([Mutex<HashMap<JobId, Arc<Route>>>; 32]);

impl Routes {
    fn shard(&self, job: JobId) -> &Mutex<HashMap<JobId, Arc<Route>>> {
        &self.0[job as usize % self.0.len()]
    }

    fn get(&self, job: JobId) -> Option<Arc<Route>> {
        lock(self.shard(job)).get(&job).cloned()
    }

    fn insert(&self, job: JobId, route: Arc<Route>) {
        lock(self.shard(job)).insert(job, route);
    }

    fn remove(&self, job: JobId) -> Option<Arc<Route>> {
        lock(self.shard(job)).remove(&job)
    }
}

/// A builder's link: its stream's sender, and what stops its reader when the table loses it.
struct Link {
    tx: BuilderTx,
    _stop: oneshot::Sender<()>,
}

struct Inner {
    config: Config,
    table: Mutex<JobTable>,
    routes: Routes,
    links: RwLock<HashMap<String, Link>>,
    toolchains: Mutex<Toolchains>,
    /// The shared cache's lookups over the last [`WINDOW`]: when, hits, misses.
    cache_lookups: Mutex<VecDeque<(Instant, u64, u64)>>,
    next_job: AtomicU64,
    next_builder: AtomicU64,
    started: Instant,
    shutdown: watch::Receiver<bool>,
    metrics: Metrics,
    in_flight: InFlight,
    /// The streams' readers, toolchain senders and verifiers: waited for at shutdown.
    tasks: Tracker,
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

impl Scheduler {
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> Scheduler {
        Scheduler {
            inner: Arc::new(Inner {
                table: Mutex::new(JobTable::new(Limits {
                    max_attempts: config.max_attempts,
                    heartbeat: config.heartbeat,
                })),
                routes: Routes(std::array::from_fn(|_| Mutex::default())),
                links: RwLock::default(),
                toolchains: Mutex::new(Toolchains::new(config.toolchain_cache)),
                cache_lookups: Mutex::default(),
                config,
                next_job: AtomicU64::new(1),
                next_builder: AtomicU64::new(1),
                started: Instant::now(),
                shutdown,
                metrics: Metrics::default(),
                in_flight: InFlight::default(),
                tasks: Tracker::new(),
            }),
        }
    }

    fn table(&self) -> MutexGuard<'_, JobTable> {
        lock(&self.inner.table)
    }

    fn link(&self, builder: &str) -> Option<BuilderTx> {
        self.inner
            .links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(builder)
            .map(|l| l.tx.clone())
    }

    /// Carries out what the table decided, in order. No lock is held here.
    async fn apply(&self, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::Client(job, msg) => {
                    if let Some(route) = self.inner.routes.get(job) {
                        route.push(Ok(msg));
                    }
                }
                Out::Builder(builder, msg) => {
                    // A link gone between the decision and now: the builder's loss places its
                    // jobs again.
                    if let Some(link) = self.link(&builder) {
                        let _ = link.send(Box::new(msg)).await;
                    }
                }
                Out::Route(job, builder) => {
                    if let Some(route) = self.inner.routes.get(job) {
                        *lock(&route.builder) = builder;
                    }
                }
                Out::Need(job, builder, need, toolchain) => {
                    self.on_need(job, &builder, need, toolchain).await
                }
                Out::Close(job, error) => {
                    if let Some(route) = self.inner.routes.remove(job) {
                        route.close(error.map(Status::unavailable));
                    }
                }
                Out::Disconnect(builder) => {
                    // Dropping the link ends the builder's stream and stops its reader.
                    self.inner
                        .links
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&builder);
                }
                Out::Ended(outcome, took) => {
                    self.inner.metrics.count(outcome);
                    if outcome == Outcome::Finished {
                        self.inner.metrics.job.observe(took);
                    }
                }
                Out::FirstPlaced(took) => self.inner.metrics.placement.observe(took),
                Out::Retried => {
                    self.inner.metrics.retries.fetch_add(1, Ordering::Relaxed);
                }
            }
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
                let mut lookups = lock(&self.inner.cache_lookups);
                lookups.push_back((at, now.0.saturating_sub(hits), now.1.saturating_sub(misses)));
                while lookups
                    .front()
                    .is_some_and(|(t, _, _)| at.duration_since(*t) > WINDOW)
                {
                    lookups.pop_front();
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

    /// Loses builders that fell silent, by the table's clock, every heartbeat until shutdown.
    async fn watch_heartbeats(self) {
        let mut stop = self.inner.shutdown.clone();
        let mut tick = tokio::time::interval(self.inner.config.heartbeat);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let outs = self.table().tick(Instant::now());
            self.apply(outs).await;
        }
    }

    /// The farm now: what `kiln dist-status` and the dashboard show. Built under the table's
    /// lock from plain fields (no JSON), once per call.
    pub fn status_reply(&self) -> StatusReply {
        let now = Instant::now();
        let t = self.table();
        let fleet = t.fleet();
        let builders = fleet
            .builders()
            .iter()
            .map(|(id, b)| BuilderStatus {
                id: id.clone(),
                name: b.name.clone(),
                label: fleet.label(id).unwrap_or_default(),
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
                connected_ms: now.saturating_duration_since(b.connected).as_millis() as u64,
                toolchains_received: b.toolchains_received,
                suspect: b.suspect.clone().unwrap_or_default(),
            })
            .collect();
        StatusReply {
            protocol_version: PROTOCOL_VERSION,
            builders,
            jobs: t.job_status(now),
            jobs_done: t.jobs_done,
            jobs_failed: t.jobs_failed,
            uptime_ms: now.duration_since(self.inner.started).as_millis() as u64,
        }
    }

    /// `GET /api/status`, the dashboard's data: the status, the jobs that ended last, and the
    /// jobs finished per 10 seconds over the last five minutes (oldest first). The JSON is
    /// built from copies, with no lock held.
    pub fn dashboard_json(&self) -> serde_json::Value {
        let status = self.status_reply();
        let history = self.table().history();
        let lookups_seen: Vec<(Instant, u64, u64)> =
            lock(&self.inner.cache_lookups).iter().copied().collect();
        let now = Instant::now();
        let recent: Vec<serde_json::Value> = history
            .recent
            .iter()
            .map(|r| {
                serde_json::json!({
                    "label": r.label,
                    "client": r.client,
                    "builder": r.builder,
                    "ms": r.ms,
                    "outcome": r.outcome.label(),
                    "bytes": r.bytes,
                    "ago_ms": now.saturating_duration_since(r.at).as_millis() as u64,
                })
            })
            .collect();
        let buckets = (WINDOW.as_secs() / BUCKET.as_secs()) as usize;
        let bucket = |t: &Instant| {
            let age = (now.saturating_duration_since(*t).as_secs() / BUCKET.as_secs()) as usize;
            (age < buckets).then(|| buckets - 1 - age)
        };
        let mut per_bucket = vec![0u64; buckets];
        for (t, n) in &history.finished {
            if let Some(i) = bucket(t) {
                per_bucket[i] += n;
            }
        }
        let mut lookups = vec![(0u64, 0u64); buckets];
        for (t, hits, misses) in &lookups_seen {
            if let Some(i) = bucket(t) {
                lookups[i].0 += hits;
                lookups[i].1 += misses;
            }
        }
        let hit_rate: Vec<Option<f64>> = lookups
            .iter()
            .map(|(h, m)| (h + m > 0).then(|| *h as f64 / (h + m) as f64))
            .collect();
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
                "toolchains": b.toolchains_held,
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
            "fallbacks": self.inner.metrics.fallbacks().into_iter().map(|(client, cause, count)| serde_json::json!({
                "client": client,
                "cause": cause,
                "count": count,
            })).collect::<Vec<_>>(),
            "finished_per_10s": per_bucket,
            "cache": self.inner.config.cache,
            "cache_hit_rate_per_10s": hit_rate,
        })
    }

    /// `GET /metrics`: the counters and the registry's gauges, in Prometheus's text format.
    pub fn metrics_text(&self) -> String {
        let gauges = {
            let t = self.table();
            let (slots, slots_busy) = t.fleet().slots();
            Gauges {
                builders: t.fleet().builders().len() as u64,
                slots,
                slots_busy,
                jobs_in_flight: t.jobs_in_flight() as u64,
                toolchains_kept_bytes: 0,
            }
        };
        let gauges = Gauges {
            toolchains_kept_bytes: lock(&self.inner.toolchains).bytes(),
            ..gauges
        };
        self.inner.metrics.render(gauges)
    }

    /// A builder is gone: the table sends its jobs elsewhere (or, when the scheduler is
    /// stopping, ends them).
    async fn builder_lost(&self, id: &str, why: &str) {
        let outs = {
            let mut t = self.table();
            if *self.inner.shutdown.borrow() {
                t.stop();
            }
            t.builder_lost(id, why, Instant::now())
        };
        self.apply(outs).await;
        // Lost by its reader rather than by the clock: the link goes too.
        self.inner
            .links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// One message on a builder's stream. Chunks are relayed without the table; the rest is
    /// an event for it.
    async fn on_builder_message(&self, builder: &str, msg: from_builder::Msg, alive: &mut Instant) {
        let now = Instant::now();
        let outs = match msg {
            from_builder::Msg::Register(_) => return,
            from_builder::Msg::Heartbeat(hb) => {
                *alive = now;
                let outs = self.table().heartbeat(builder, hb.slots, now);
                self.apply(outs).await;
                return;
            }
            from_builder::Msg::Toolchains(change) => {
                let added: Vec<Digest> = change
                    .added
                    .iter()
                    .filter_map(|d| digest_of(d).ok())
                    .collect();
                let evicted: Vec<Digest> = change
                    .evicted
                    .iter()
                    .filter_map(|d| digest_of(d).ok())
                    .collect();
                self.table().toolchains(builder, &added, &evicted);
                return;
            }
            from_builder::Msg::Need(need) => {
                self.table()
                    .need(builder, need.job_id, need.need.unwrap_or_default())
            }
            from_builder::Msg::Chunk(c) => {
                // A builder streaming a large result may queue its heartbeats behind it: its
                // chunks count as signs of life, told to the table at most every half beat.
                if now.saturating_duration_since(*alive) > self.inner.config.heartbeat / 2 {
                    *alive = now;
                    let slots = self.table().fleet().get(builder).map(|b| b.slots);
                    if let Some(slots) = slots {
                        self.table().heartbeat(builder, slots, now);
                    }
                }
                let (Some(route), Some(chunk)) = (self.inner.routes.get(c.job_id), c.chunk) else {
                    return;
                };
                if !route.is_on(builder) {
                    return;
                }
                let n = chunk.data.len() as u64;
                route.bytes.fetch_add(n, Ordering::Relaxed);
                self.inner
                    .metrics
                    .to_clients
                    .fetch_add(n, Ordering::Relaxed);
                let delivered = route.push(Ok(ToClient {
                    msg: Some(to_client::Msg::Chunk(chunk)),
                }));
                if !delivered {
                    // Its client is gone or was cut off: the job is over, not the builder.
                    self.client_gone(c.job_id).await;
                }
                return;
            }
            from_builder::Msg::Finished(f) => {
                let bytes = self.bytes_of(f.job_id);
                self.table()
                    .finished(builder, f.job_id, f.finished, bytes, now)
            }
            from_builder::Msg::Rejected(r) => {
                let bytes = self.bytes_of(r.job_id);
                self.table()
                    .rejected(builder, r.job_id, r.retry, r.message, bytes, now)
            }
        };
        self.apply(outs).await;
    }

    fn bytes_of(&self, job: JobId) -> u64 {
        self.inner
            .routes
            .get(job)
            .map_or(0, |r| r.bytes.load(Ordering::Relaxed))
    }

    /// A builder lacks something for a job. Toolchains the scheduler holds go from here, on a
    /// task of their own so a large archive holds up none of this builder's other messages;
    /// the rest is asked of the client.
    async fn on_need(&self, job_id: JobId, builder: &str, mut need: Need, digest: Digest) {
        let data = if need.toolchain {
            lock(&self.inner.toolchains).get(&digest)
        } else {
            None
        };
        if let (Some(data), Some(link)) = (data, self.link(builder)) {
            need.toolchain = false;
            tracing::debug!(job = job_id, builder, "sending a cached toolchain");
            let this = self.clone();
            self.inner.tasks.spawn("toolchain sender", async move {
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
                    if link.send(Box::new(msg)).await.is_err() {
                        break;
                    }
                }
            });
        }
        if need.toolchain || !need.files.is_empty() {
            if let Some(route) = self.inner.routes.get(job_id) {
                route.push(Ok(ToClient {
                    msg: Some(to_client::Msg::Need(need)),
                }));
            }
        }
    }

    /// A chunk from a client: relayed to the job's builder. If it is part of a toolchain the
    /// scheduler does not hold yet, it is also assembled here, in the job's own reader, and
    /// verified on a task of its own: no shared lock is held for either.
    async fn on_client_chunk(
        &self,
        job_id: JobId,
        route: &Route,
        upload: &mut Option<Assembly>,
        chunk: Chunk,
    ) -> Result<(), Status> {
        let n = chunk.data.len() as u64;
        route.bytes.fetch_add(n, Ordering::Relaxed);
        let (digest, size) =
            chunk_digest(&chunk).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let assemble = digest == route.toolchain
            && (upload.is_some()
                || (chunk.offset == 0 && !lock(&self.inner.toolchains).contains(&digest)));
        if assemble {
            if chunk.offset == 0 {
                *upload = Some(
                    Assembly::new(digest, size, self.inner.config.max_toolchain)
                        .map_err(|e| Status::invalid_argument(format!("toolchain: {e}")))?,
                );
            }
            if let Some(asm) = upload.as_mut() {
                if chunk.offset + n >= size {
                    // The last chunk: hashing the whole archive is left to a task, so this
                    // job's relay goes on meanwhile.
                    let mut asm = upload.take().expect("checked above");
                    let last = chunk.clone();
                    let this = self.clone();
                    self.inner.tasks.spawn("toolchain verifier", async move {
                        match tokio::task::spawn_blocking(move || asm.add(&last)).await {
                            Ok(Ok(Some(data))) => {
                                lock(&this.inner.toolchains).insert(digest, data)
                            }
                            Ok(Ok(None)) => {}
                            Ok(Err(e)) => {
                                // The builder checks the digest too and refuses the job; here
                                // the copy is just not kept.
                                tracing::warn!(job = job_id, error = %e, "toolchain upload is corrupt");
                            }
                            Err(e) => tracing::warn!(job = job_id, "toolchain check failed: {e}"),
                        }
                    });
                } else if let Err(e) = asm.add(&chunk) {
                    tracing::warn!(job = job_id, error = %e, "toolchain upload is corrupt");
                    *upload = None;
                }
            }
        }
        if let Some(link) = self.link(&route.builder()) {
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
            let _ = link.send(Box::new(msg)).await;
        }
        Ok(())
    }

    /// The client's stream ended (or it was cut off): the job is over for everyone.
    async fn client_gone(&self, job_id: JobId) {
        let route = self.inner.routes.remove(job_id);
        let bytes = route
            .as_ref()
            .map_or(0, |r| r.bytes.load(Ordering::Relaxed));
        if let Some(route) = &route {
            route.close(None);
        }
        let outs = self.table().client_gone(job_id, bytes, Instant::now());
        self.apply(outs).await;
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

/// Refuses a peer that speaks another protocol version, naming both.
fn same_version(peer: &str, theirs: u32) -> Result<(), Status> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(version_mismatch(peer, theirs)))
    }
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
    type JoinStream = BuilderStream;
    type CompileStream = ClientStream;

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
        same_version("the builder", reg.protocol_version)?;
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
        let (stop, mut stopped) = oneshot::channel();
        let now = Instant::now();
        let state = BuilderState {
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
            connected: now,
            jobs_done: 0,
            jobs_failed: 0,
            toolchains_received: 0,
            suspect: None,
        };
        // The welcome is first on the link, before any job the table may place there.
        let welcome = ToBuilder {
            msg: Some(to_builder::Msg::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                builder_id: id.clone(),
                heartbeat_ms: self.inner.config.heartbeat.as_millis() as u64,
            })),
        };
        let _ = tx.try_send(Box::new(welcome));
        // The link before the table: a job placed there at once must find it.
        self.inner
            .links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Link { tx, _stop: stop });
        let outs = self.table().join(id.clone(), state, now);
        self.apply(outs).await;
        tracing::info!(builder = %name, id = %id, ?peer, credential = %caller.name, slots = reg.slots, os = %reg.os, arch = %reg.arch, "builder joined");
        let this = self.clone();
        let mut shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn("builder reader", async move {
            let mut alive = Instant::now();
            let why = loop {
                let next = tokio::select! {
                    next = incoming.message() => next,
                    // The table lost it (silent for three heartbeats) and dropped its link.
                    _ = &mut stopped => break "no heartbeat".to_string(),
                    _ = shutdown.wait_for(|s| *s) => break "the scheduler is shutting down".to_string(),
                };
                match next {
                    Err(e) => break format!("stream error: {}", e.message()),
                    Ok(None) => break "the builder closed its stream".to_string(),
                    // Boxed: the handling's state lives only while a message is handled, not
                    // in every idle builder's task (memory per builder, issue 17).
                    Ok(Some(FromBuilder { msg: Some(msg) })) => {
                        Box::pin(this.on_builder_message(&id, msg, &mut alive)).await
                    }
                    Ok(Some(_)) => {}
                }
            };
            Box::pin(this.builder_lost(&id, &why)).await;
        });
        Ok(Response::new(BuilderStream { rx }))
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
        same_version("the client", spec.protocol_version)?;
        let toolchain = validate(&spec).map_err(Status::invalid_argument)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicU64::new(0));
        let id = self.inner.next_job.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(job = id, label = %spec.label, client = %caller.name, "job received");
        self.inner.metrics.received_from(&caller.name);
        let route = Arc::new(Route {
            client: Mutex::new(Some(tx)),
            backlog: backlog.clone(),
            builder: Mutex::default(),
            bytes: AtomicU64::new(0),
            toolchain,
            _held: held,
        });
        self.inner.routes.insert(id, route.clone());
        let outs = self
            .table()
            .submit(id, spec, toolchain, caller.name, Instant::now());
        self.apply(outs).await;
        let this = self.clone();
        let mut shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn("job reader", async move {
            let mut upload = None;
            loop {
                let next = tokio::select! {
                    next = incoming.message() => next,
                    _ = shutdown.wait_for(|s| *s) => {
                        // Its builder's link closes too: the client compiles locally.
                        route.close(Some(Status::unavailable(
                            "the scheduler is shutting down; the job did not finish",
                        )));
                        break;
                    }
                };
                match next {
                    Ok(Some(FromClient {
                        msg: Some(from_client::Msg::Chunk(chunk)),
                    })) => {
                        if let Err(status) =
                            this.on_client_chunk(id, &route, &mut upload, chunk).await
                        {
                            route.close(Some(status));
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Err(status) if status.code() == tonic::Code::InvalidArgument => {
                        // A message that does not decode: the client hears why its job ended.
                        route.close(Some(status));
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            this.client_gone(id).await;
        });
        Ok(Response::new(ClientStream { rx, backlog }))
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
        same_version("the client", r.protocol_version)?;
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
        self.table()
            .suspect(&r.builder, why)
            .map_err(|e| Status::not_found(e.to_string()))?;
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
        same_version("the client", r.protocol_version)?;
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
    let tasks = scheduler.inner.tasks.clone();
    if let Some(url) = cache {
        tasks.spawn("cache watcher", scheduler.clone().watch_cache(url));
    }
    tasks.spawn("heartbeat watcher", scheduler.clone().watch_heartbeats());
    let web = http.map(|listener| {
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics))
            .route("/", axum::routing::get(dashboard))
            .route("/api/status", axum::routing::get(api_status))
            .with_state(scheduler.clone());
        let mut stop = stop_rx.clone();
        kiln_net::task::spawn(
            "http server",
            kiln_net::tls::serve_http(listener, listen, app, async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
        )
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
    // Every reader ends at the shutdown signal; what still runs after a grace period (a send
    // to a link nobody reads any more) is aborted, so shutdown cannot hang on it.
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = tasks.len(),
            "tasks still running at shutdown; aborting them"
        );
        tasks.abort_all();
        tasks.wait().await;
    }
    served?;
    Ok(())
}

/// How long shutdown waits for the scheduler's tasks before it aborts them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
