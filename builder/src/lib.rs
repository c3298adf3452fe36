//! `kiln-builder`: dials the scheduler, keeps toolchains and input files by digest, and runs
//! each job in a jail made from the client's own toolchain.
//!
//! A job arrives as a [`JobSpec`]: the toolchain digest, the command, and the input files by
//! path and digest. The builder asks (one `JobNeed`) for whatever it lacks, verifies every byte
//! against its digest, takes a container for the toolchain from the pool, places the inputs at
//! their absolute paths inside it, runs the command as the slot's unprivileged user, and returns
//! the exit status, the output streams and the outputs as chunks. Nothing in a job is trusted:
//! paths are checked, archives are unpacked by the hardened unpacker, files go in and come out
//! without following links out of the container.

mod inputs;
mod jail;
mod job;
mod metrics;
mod toolchains;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_jails::{Backend, Limits, Pool};
use kiln_proto::v1::scheduler_client::SchedulerClient;
use kiln_proto::v1::{from_builder, to_builder, FromBuilder, Heartbeat, Register};
use kiln_proto::{version_mismatch, wire_digest, Digest, MAX_MESSAGE, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use jail::{Jail, JailKind};
#[doc(hidden)]
pub use job::check_spec_for_fuzzing;
pub use toolchains::ToolchainCache;

/// The builder's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The scheduler's URL: `https://host:port`, or `http://` on a farm run `--insecure`.
    pub scheduler: String,
    /// The CA the scheduler's certificate must chain to, and this builder's own certificate
    /// for mutual TLS.
    pub tls: kiln_net::tls::ClientFiles,
    /// The builder token it presents, unless its certificate speaks for it.
    pub token: kiln_net::auth::Credential,
    /// How this builder appears in status.
    pub name: String,
    /// Jobs at once.
    pub slots: u32,
    /// Toolchains, input files, images and containers live here.
    pub work_dir: PathBuf,
    /// The jail backend.
    pub jail: JailKind,
    /// The `kiln-jail` helper program (Linux jails).
    pub jail_helper: PathBuf,
    /// Disk for toolchain archives.
    pub toolchain_cache: u64,
    /// Disk for input files kept by digest.
    pub input_cache: u64,
    /// Limits for each job; a job may ask for a shorter time limit, never a longer one.
    pub limits: Limits,
    /// Slot `i` runs as uid and gid `uid_base + i`.
    pub uid_base: u32,
    /// Ready containers kept per toolchain.
    pub pool_size: usize,
}

impl Config {
    pub fn new(scheduler: &str, work_dir: PathBuf, jail_helper: PathBuf) -> Config {
        Config {
            scheduler: scheduler.to_string(),
            tls: kiln_net::tls::ClientFiles::default(),
            token: kiln_net::auth::Credential::None,
            name: hostname(),
            slots: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
            work_dir,
            jail: JailKind::Linux,
            jail_helper,
            toolchain_cache: 10 << 30,
            input_cache: 10 << 30,
            limits: Limits::default(),
            uid_base: 61_000,
            pool_size: 2,
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "builder".into())
}

/// The state every job of this builder shares.
pub(crate) struct Shared {
    config: Config,
    pool: Pool<Jail>,
    toolchains: Mutex<ToolchainCache>,
    /// One lock per toolchain being fetched, so concurrent jobs ask for it once.
    fetching: Mutex<std::collections::HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    inputs: inputs::Inputs,
    slots: job::Slots,
    metrics: metrics::Metrics,
    /// Jail runs: they outlive an aborted job (a run cannot be stopped halfway) and end by the
    /// jail's own limits; shutdown waits for them.
    runs: kiln_net::task::Tracker,
}

impl Shared {
    fn toolchains(&self) -> MutexGuard<'_, ToolchainCache> {
        self.toolchains.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The uid (and gid) the job in `slot` runs as.
    fn job_uid(&self, slot: u32) -> u32 {
        self.pool.backend().job_uid(self.config.uid_base, slot)
    }

    /// `GET /metrics`.
    fn metrics_text(&self) -> String {
        let held = self.toolchains().held();
        self.metrics.render(metrics::Gauges {
            slots: u64::from(self.config.slots),
            slots_busy: u64::from(self.running()),
            toolchains: held.len() as u64,
            toolchain_bytes: held.iter().map(|(_, s)| s).sum(),
            containers_ready: self.pool.ready_counts().values().sum::<usize>() as u64,
        })
    }

    /// Slots whose job has not ended: what the heartbeat and `/metrics` report as running.
    fn running(&self) -> u32 {
        self.config.slots.saturating_sub(self.slots.free())
    }
}

/// Runs the builder until `shutdown` resolves: reconnects to the scheduler whenever the link
/// drops, with a growing pause between attempts.
/// With `http`, `GET /metrics` is served there until then, with TLS or not as `listen` says.
pub async fn serve(
    config: Config,
    http: Option<(tokio::net::TcpListener, kiln_net::tls::Listen)>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let jail = Jail::open(&config)?;
    let removed = jail.cleanup_leftovers()?;
    if removed > 0 {
        tracing::info!(
            removed,
            "removed containers and images left by an earlier run"
        );
    }
    let toolchains =
        ToolchainCache::open(&config.work_dir.join("toolchains"), config.toolchain_cache)?;
    let inputs = inputs::Inputs::open(config.work_dir.join("inputs"), config.input_cache);
    let shared = Arc::new(Shared {
        pool: Pool::new(jail, config.pool_size, config.slots.max(1)),
        toolchains: Mutex::new(toolchains),
        fetching: Mutex::new(Default::default()),
        inputs,
        slots: job::Slots::new(config.slots),
        metrics: metrics::Metrics::default(),
        runs: kiln_net::task::Tracker::new(),
        config,
    });
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let web = http.map(|(listener, listen)| {
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics_page))
            .with_state(shared.clone());
        kiln_net::task::spawn(
            "http server",
            kiln_net::tls::serve_http(listener, listen, app, async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }),
        )
    });
    tokio::pin!(shutdown);
    let mut pause = Duration::from_millis(100);
    let mut trouble = LinkTrouble::default();
    loop {
        let session = session(shared.clone(), &mut trouble);
        tokio::select! {
            _ = &mut shutdown => break,
            ended = session => {
                match ended {
                    Ok(()) => pause = Duration::from_millis(100),
                    Err(e) => {
                        let cause = format!("{e:#}");
                        match trouble.failed(&cause) {
                            Some(attempts) => tracing::warn!(
                                scheduler = %shared.config.scheduler,
                                error = %cause,
                                attempts,
                                "scheduler link failed; retrying (said again when the cause \
                                 changes, else ever more rarely)"
                            ),
                            None => tracing::debug!(error = %cause, "scheduler link failed"),
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    let _ = stop_tx.send(true);
    if let Some(web) = web {
        web.await??;
    }
    // The session is gone and its jobs aborted, but a job's container may still be in use: a
    // jail run, or inputs being placed or outputs read on a blocking thread, hold its slot.
    // Images are removed only once every slot is back (each run ends by the jail's limits).
    let running = shared.config.slots.saturating_sub(shared.slots.free());
    if running > 0 {
        tracing::info!(
            running,
            "waiting for running jobs to end before removing their images"
        );
    }
    shared.slots.all_free().await;
    shared.runs.wait().await;
    shared.pool.shutdown().await;
    Ok(())
}

async fn metrics_page(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            kiln_net::metrics::CONTENT_TYPE,
        )],
        shared.metrics_text(),
    )
}

/// When a builder speaks of its link to the scheduler failing: at the first failure, when the
/// cause changes, then after 2, 4, 8, … failed attempts in a row, so a scheduler down for an
/// hour is not a warning every 5 s (issue 15). Plain data, so the rule is tested without a
/// network.
#[derive(Debug, Default)]
struct LinkTrouble {
    failures: u32,
    cause: Option<String>,
    next_warning: u32,
}

impl LinkTrouble {
    /// Counts a failed attempt; returns the failures so far when this one deserves a warning.
    fn failed(&mut self, cause: &str) -> Option<u32> {
        self.failures += 1;
        let changed = self.cause.as_deref() != Some(cause);
        if changed {
            self.cause = Some(cause.to_owned());
        }
        if changed || self.failures >= self.next_warning {
            self.next_warning = self.failures.saturating_mul(2);
            return Some(self.failures);
        }
        None
    }

    /// The link is up: returns how many attempts had failed before, if any.
    fn joined(&mut self) -> Option<u32> {
        let failures = std::mem::take(self).failures;
        (failures > 0).then_some(failures)
    }
}

/// One connection to the scheduler, until it ends. Jobs of this session end with it: the
/// scheduler places them again elsewhere.
async fn session(shared: Arc<Shared>, trouble: &mut LinkTrouble) -> anyhow::Result<()> {
    let config = &shared.config;
    // Both are read at each dial, so a renewed token or CA is picked up without a restart.
    let interceptor = config.token.interceptor().map_err(|e| anyhow::anyhow!(e))?;
    let endpoint = kiln_net::tls::endpoint(&config.scheduler, &config.tls)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await?;
    let mut client = SchedulerClient::with_interceptor(channel, interceptor)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (out, rx) = mpsc::channel::<FromBuilder>(256);
    let held = shared.toolchains().held();
    out.send(FromBuilder {
        msg: Some(from_builder::Msg::Register(Register {
            protocol_version: PROTOCOL_VERSION,
            name: shared.config.name.clone(),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
            slots: shared.config.slots,
            toolchains: held.iter().map(|(d, s)| wire_digest(d, *s)).collect(),
            jail: shared.pool.backend().kind().into(),
        })),
    })
    .await?;
    let mut incoming = client
        .join(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let welcome = match incoming.message().await? {
        Some(kiln_proto::v1::ToBuilder {
            msg: Some(to_builder::Msg::Welcome(w)),
        }) => w,
        _ => anyhow::bail!("the scheduler did not welcome this builder"),
    };
    if welcome.protocol_version != PROTOCOL_VERSION {
        anyhow::bail!(version_mismatch("the scheduler", welcome.protocol_version));
    }
    match trouble.joined() {
        Some(failed) => tracing::info!(
            id = %welcome.builder_id,
            scheduler = %shared.config.scheduler,
            failed,
            "joined the farm again after failed attempts"
        ),
        None => {
            tracing::info!(id = %welcome.builder_id, scheduler = %shared.config.scheduler, "joined the farm")
        }
    }

    let heartbeat = Duration::from_millis(welcome.heartbeat_ms.clamp(100, 60_000));
    let _beat = {
        let shared = shared.clone();
        let out = out.clone();
        kiln_net::task::spawn("heartbeat", async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tick.tick().await;
                let msg = FromBuilder {
                    msg: Some(from_builder::Msg::Heartbeat(Heartbeat {
                        running: shared.running(),
                        slots: shared.config.slots,
                    })),
                };
                if out.send(msg).await.is_err() {
                    break;
                }
            }
        })
    };

    let mut jobs = job::Jobs::default();
    let result = loop {
        match incoming.message().await {
            Ok(Some(msg)) => match msg.msg {
                Some(to_builder::Msg::Start(start)) => jobs.start(&shared, &out, start),
                Some(to_builder::Msg::Chunk(chunk)) => jobs.chunk(chunk).await,
                Some(to_builder::Msg::Cancel(cancel)) => jobs.cancel(cancel.job_id),
                Some(to_builder::Msg::Welcome(_)) | None => {}
            },
            Ok(None) => break Ok(()),
            Err(status) => break Err(anyhow::anyhow!("{}", status.message())),
        }
    };
    jobs.abort_all();
    result
}

#[cfg(test)]
mod tests {
    use super::LinkTrouble;

    #[test]
    fn a_failing_link_is_warned_about_when_it_starts_changes_and_ever_more_rarely() {
        let mut t = LinkTrouble::default();
        let warned: Vec<u32> = (0..40)
            .filter_map(|_| t.failed("connection refused"))
            .collect();
        assert_eq!(warned, [1, 2, 4, 8, 16, 32]);
        // A new cause is said at once, then the same backoff from there.
        assert_eq!(t.failed("invalid peer certificate"), Some(41));
        assert_eq!(t.failed("invalid peer certificate"), None);
        assert_eq!(t.joined(), Some(42));
        // Up again: the next failure is news.
        assert_eq!(t.joined(), None);
        assert_eq!(t.failed("connection refused"), Some(1));
    }
}
