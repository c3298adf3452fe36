//! One job on this builder: fetch what is missing, place the inputs, run, return the outputs.

use std::collections::{HashMap, HashSet};
use std::path::{Component, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_jails::inroot::{Placer, Root, MAX_OUTPUT};
use kiln_jails::{Backend, JailError, Lease, RunSpec};
use kiln_proto::content::{chunk_digest, chunks, Assembly};
use kiln_proto::v1::{
    from_builder, Chunk, Finished, FromBuilder, JobChunk, JobFinished, JobNeed, JobRejected,
    JobSpec, JobStart, Need, OutputFile, ToolchainsChanged,
};
use kiln_proto::{digest_of, wire_digest, Digest};
use tokio::sync::mpsc;

use crate::{Jail, Shared};

/// How long a job waits for the next chunk it asked for.
const CHUNK_WAIT: Duration = Duration::from_secs(60);
/// The largest input file accepted.
const MAX_INPUT: u64 = 512 << 20;
/// The largest toolchain archive accepted.
const MAX_TOOLCHAIN: u64 = 2 << 30;
const MAX_INPUTS: usize = 200_000;
const MAX_OUTPUTS: usize = 64;

/// The jobs of one scheduler session.
#[derive(Default)]
pub(crate) struct Jobs {
    running: HashMap<u64, (mpsc::Sender<Chunk>, kiln_net::task::Owned<()>)>,
}

impl Jobs {
    pub fn start(
        &mut self,
        shared: &Arc<Shared>,
        out: &mpsc::Sender<FromBuilder>,
        start: JobStart,
    ) {
        self.running.retain(|_, (_, handle)| !handle.is_finished());
        let id = start.job_id;
        let Some(spec) = start.spec else {
            return;
        };
        let (tx, rx) = mpsc::channel(64);
        let handle = kiln_net::task::spawn("job", run(shared.clone(), out.clone(), id, spec, rx));
        self.running.insert(id, (tx, handle));
    }

    pub async fn chunk(&mut self, chunk: JobChunk) {
        let Some(data) = chunk.chunk else {
            return;
        };
        if let Some((tx, _)) = self.running.get(&chunk.job_id) {
            // A job that has stopped listening has ended; its chunks are dropped.
            let _ = tx.send(data).await;
        }
    }

    pub fn cancel(&mut self, id: u64) {
        if let Some((_, handle)) = self.running.remove(&id) {
            handle.abort();
        }
    }

    pub fn abort_all(&mut self) {
        for (_, (_, handle)) in self.running.drain() {
            handle.abort();
        }
    }
}

impl Drop for Jobs {
    /// A session dropped mid-way (the builder shutting down) takes its jobs with it, so none
    /// goes on placing inputs or reading outputs while the pool shuts down.
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// The builder's job slots. A slot is taken as a [`Slot`] guard and comes back when the last
/// holder of the guard drops it, so a job ends the same way whether it finished, failed or was
/// aborted (`Jobs::cancel`, `abort_all`): issue 15 saw an interrupted build leave every slot
/// taken for good when the slot was given back by code after an await.
#[derive(Debug, Clone)]
pub(crate) struct Slots(Arc<SlotsInner>);

#[derive(Debug)]
struct SlotsInner {
    free: std::sync::Mutex<Vec<u32>>,
    total: u32,
    /// Told whenever a slot comes back, for [`Slots::all_free`].
    freed: tokio::sync::Notify,
}

impl Slots {
    pub fn new(n: u32) -> Slots {
        Slots(Arc::new(SlotsInner {
            free: std::sync::Mutex::new((0..n).rev().collect()),
            total: n,
            freed: tokio::sync::Notify::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.0.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot, held until the guard is dropped.
    pub fn take(&self) -> Option<Slot> {
        let n = self.lock().pop()?;
        Some(Slot {
            slots: self.clone(),
            n,
        })
    }

    /// Slots no job holds.
    pub fn free(&self) -> u32 {
        self.lock().len() as u32
    }

    /// Returns once no job holds a slot: nothing runs in any container any more, so the pool
    /// may remove their images (issue 18: shutdown removed them under running jobs).
    pub async fn all_free(&self) {
        loop {
            let freed = self.0.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.free() == self.0.total {
                return;
            }
            freed.await;
        }
    }
}

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Slots,
    n: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().push(self.n);
        self.slots.0.freed.notify_waiters();
    }
}

/// Keeps a toolchain from eviction while a job uses it; dropping it unpins.
struct Pinned {
    shared: Arc<Shared>,
    toolchain: Digest,
}

impl Pinned {
    fn new(shared: &Arc<Shared>, toolchain: Digest) -> Pinned {
        shared.toolchains().pin(toolchain);
        Pinned {
            shared: shared.clone(),
            toolchain,
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.shared.toolchains().unpin(&self.toolchain);
    }
}

/// Everything a job holds while something may still touch its container: the slot (and so
/// its uid), the pinned toolchain and the container lease. Work that cannot be stopped halfway
/// (placing inputs and running the jail, both on blocking threads) holds a clone, so when the
/// job's task is aborted they come back only once nothing runs in the container any more.
struct Held {
    lease: LeaseGuard,
    _pinned: Pinned,
    _slot: Arc<Slot>,
}

/// Why a job did not produce a result.
enum JobError {
    /// Not the job's fault: another builder may run it.
    Retry(String),
    /// The job is malformed or hostile.
    Refuse(String),
    /// The scheduler is gone; nobody to tell.
    Gone,
}

impl From<JailError> for JobError {
    fn from(e: JailError) -> JobError {
        match e {
            // A hostile path or archive is the job's doing: no other builder should try it.
            JailError::Path { .. } | JailError::Archive(_) => JobError::Refuse(e.to_string()),
            other => JobError::Retry(other.to_string()),
        }
    }
}

async fn send(out: &mpsc::Sender<FromBuilder>, msg: from_builder::Msg) -> Result<(), JobError> {
    out.send(FromBuilder { msg: Some(msg) })
        .await
        .map_err(|_| JobError::Gone)
}

async fn run(
    shared: Arc<Shared>,
    out: mpsc::Sender<FromBuilder>,
    id: u64,
    spec: JobSpec,
    chunks_rx: mpsc::Receiver<Chunk>,
) {
    let label = spec.label.clone();
    let result = match shared.slots.take() {
        None => Err(JobError::Retry("the builder has no free slot".into())),
        Some(slot) => execute(&shared, &out, id, spec, chunks_rx, Arc::new(slot)).await,
    };
    let counted = |n: &std::sync::atomic::AtomicU64| {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let (retry, message) = match result {
        Ok(()) => return counted(&shared.metrics.finished),
        Err(JobError::Gone) => return,
        Err(JobError::Retry(m)) => {
            counted(&shared.metrics.retried);
            (true, m)
        }
        Err(JobError::Refuse(m)) => {
            counted(&shared.metrics.refused);
            (false, m)
        }
    };
    tracing::warn!(job = id, %label, retry, %message, "job not run");
    let _ = send(
        &out,
        from_builder::Msg::Rejected(JobRejected {
            job_id: id,
            retry,
            message,
        }),
    )
    .await;
}

/// A checked absolute path: no `..`, not the root, no NUL (see [`check`]).
fn jail_path(text: &str, what: &str) -> Result<PathBuf, JobError> {
    let path = PathBuf::from(text);
    let ok = !text.contains('\0')
        && path.is_absolute()
        && path.components().count() > 1
        && path.components().all(|c| {
            matches!(
                c,
                Component::RootDir | Component::Normal(_) | Component::CurDir
            )
        });
    if ok && text.len() < 4096 {
        Ok(path)
    } else {
        Err(JobError::Refuse(format!(
            "{what} {text:?} is not an absolute path inside the jail"
        )))
    }
}

struct Checked {
    toolchain: Digest,
    argv: Vec<String>,
    cwd: PathBuf,
    inputs: Vec<(PathBuf, Digest, bool)>,
    dirs: Vec<PathBuf>,
    outputs: Vec<PathBuf>,
}

fn check(spec: &JobSpec) -> Result<Checked, JobError> {
    let bad = |m: String| JobError::Refuse(m);
    let toolchain = spec
        .toolchain
        .as_ref()
        .ok_or_else(|| bad("no toolchain".into()))
        .and_then(|d| digest_of(d).map_err(|e| bad(e.to_string())))?;
    if spec.argv.is_empty() {
        return Err(bad("no command".into()));
    }
    jail_path(&spec.argv[0], "the program")?;
    // The jail helper gets the command as NUL-separated words: a NUL inside an argument or a
    // variable would let the job add words of its own, such as its uid or its time limit.
    let mut words = spec
        .argv
        .iter()
        .chain(spec.env.iter().flat_map(|e| [&e.name, &e.value]));
    if let Some(word) = words.find(|w| w.contains('\0')) {
        return Err(bad(format!("{word:?} holds a NUL byte")));
    }
    if spec.inputs.len() > MAX_INPUTS || spec.outputs.len() > MAX_OUTPUTS {
        return Err(bad("too many inputs or outputs".into()));
    }
    let mut inputs = Vec::with_capacity(spec.inputs.len());
    for f in &spec.inputs {
        let path = jail_path(&f.path, "input")?;
        let wire = f
            .digest
            .as_ref()
            .ok_or_else(|| bad(format!("input {} has no digest", f.path)))?;
        if wire.size > MAX_INPUT {
            return Err(bad(format!("input {} is over {MAX_INPUT} bytes", f.path)));
        }
        inputs.push((
            path,
            digest_of(wire).map_err(|e| bad(e.to_string()))?,
            f.executable,
        ));
    }
    Ok(Checked {
        toolchain,
        argv: spec.argv.clone(),
        cwd: jail_path(&spec.cwd, "the working directory")?,
        inputs,
        dirs: spec
            .dirs
            .iter()
            .map(|d| jail_path(d, "directory"))
            .collect::<Result<_, _>>()?,
        outputs: spec
            .outputs
            .iter()
            .map(|o| jail_path(o, "output"))
            .collect::<Result<_, _>>()?,
    })
}

/// The builder's checks of a [`JobSpec`] (paths inside the jail, digests, counts, no NUL), for
/// the fuzz targets in `fuzz/`. Not part of the API.
#[doc(hidden)]
pub fn check_spec_for_fuzzing(spec: &JobSpec) -> Result<(), String> {
    match check(spec) {
        Ok(_) => Ok(()),
        Err(JobError::Refuse(m) | JobError::Retry(m)) => Err(m),
        Err(JobError::Gone) => Err("gone".into()),
    }
}

async fn execute(
    shared: &Arc<Shared>,
    out: &mpsc::Sender<FromBuilder>,
    id: u64,
    spec: JobSpec,
    mut chunks_rx: mpsc::Receiver<Chunk>,
    slot: Arc<Slot>,
) -> Result<(), JobError> {
    let started = Instant::now();
    let checked = check(&spec)?;
    let tc = checked.toolchain;

    // What is missing: the toolchain (asked for by one job at a time), and input files.
    let mut fetch_guard = None;
    if !shared.toolchains().touch(&tc) {
        let lock = {
            let mut fetching = shared.fetching.lock().unwrap_or_else(|e| e.into_inner());
            fetching.entry(tc).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        if !shared.toolchains().touch(&tc) {
            fetch_guard = Some(guard);
        }
    }
    let mut wanted: HashMap<Digest, u64> = {
        let worker = shared.clone();
        let mut seen = HashSet::new();
        let files: Vec<(Digest, u64)> = checked
            .inputs
            .iter()
            .zip(&spec.inputs)
            .filter(|(f, _)| seen.insert(f.1))
            .map(|(f, wire)| (f.1, wire.digest.as_ref().map_or(0, |d| d.size)))
            .collect();
        // Checking a file this process has not used yet reads it: off the async threads.
        tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .filter(|(d, _)| !worker.inputs.have(d))
                .collect()
        })
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?
    };
    let need_toolchain = fetch_guard.is_some();
    if need_toolchain || !wanted.is_empty() {
        let need = Need {
            toolchain: need_toolchain,
            files: wanted.iter().map(|(d, s)| wire_digest(d, *s)).collect(),
        };
        send(
            out,
            from_builder::Msg::Need(JobNeed {
                job_id: id,
                need: Some(need),
            }),
        )
        .await?;
        receive(shared, out, &mut chunks_rx, tc, need_toolchain, &mut wanted).await?;
    }
    drop(fetch_guard);

    let pinned = Pinned::new(shared, tc);
    run_in_jail(shared, out, id, &spec, &checked, (slot, pinned), started).await
}

/// Receives the chunks this job asked for, verifying and keeping each piece of content.
async fn receive(
    shared: &Arc<Shared>,
    out: &mpsc::Sender<FromBuilder>,
    chunks_rx: &mut mpsc::Receiver<Chunk>,
    toolchain: Digest,
    mut need_toolchain: bool,
    wanted: &mut HashMap<Digest, u64>,
) -> Result<(), JobError> {
    let mut open: HashMap<Digest, Assembly> = HashMap::new();
    while need_toolchain || !wanted.is_empty() {
        let chunk = match tokio::time::timeout(CHUNK_WAIT, chunks_rx.recv()).await {
            Ok(Some(c)) => c,
            Ok(None) => return Err(JobError::Gone),
            Err(_) => return Err(JobError::Retry("the job's inputs stopped arriving".into())),
        };
        let (digest, size) = chunk_digest(&chunk).map_err(|e| JobError::Refuse(e.to_string()))?;
        let is_toolchain = digest == toolchain && need_toolchain;
        if !is_toolchain && !wanted.contains_key(&digest) {
            continue; // Sent ahead, but already here.
        }
        if chunk.offset == 0 {
            let max = if is_toolchain {
                MAX_TOOLCHAIN
            } else {
                MAX_INPUT
            };
            let asm =
                Assembly::new(digest, size, max).map_err(|e| JobError::Refuse(e.to_string()))?;
            open.insert(digest, asm);
        }
        // The tail of a transfer begun for an earlier placement of this job: its start went to
        // a builder that is gone. The client sends the whole content again.
        let Some(asm) = open.get_mut(&digest) else {
            continue;
        };
        let data = match asm.add(&chunk) {
            Ok(Some(data)) => data,
            Ok(None) => continue,
            Err(e) => return Err(JobError::Retry(format!("corrupt transfer: {e}"))),
        };
        open.remove(&digest);
        let received = if is_toolchain {
            &shared.metrics.toolchain_bytes
        } else {
            &shared.metrics.input_bytes
        };
        received.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if is_toolchain {
            need_toolchain = false;
            keep_toolchain(shared, out, digest, data).await?;
        } else {
            wanted.remove(&digest);
            let worker = shared.clone();
            tokio::task::spawn_blocking(move || worker.inputs.keep(&digest, &data))
                .await
                .map_err(|e| JobError::Retry(e.to_string()))?
                .map_err(|e| JobError::Retry(format!("keeping an input: {e}")))?;
        }
    }
    Ok(())
}

async fn keep_toolchain(
    shared: &Arc<Shared>,
    out: &mpsc::Sender<FromBuilder>,
    digest: Digest,
    data: Bytes,
) -> Result<(), JobError> {
    let worker = shared.clone();
    let size = data.len() as u64;
    let evicted = tokio::task::spawn_blocking(move || worker.toolchains().insert(digest, &data))
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?
        .map_err(|e| JobError::Retry(format!("keeping the toolchain: {e:#}")))?;
    for old in &evicted {
        let _ = shared.pool.evict(&old.to_hex()).await;
    }
    tracing::info!(toolchain = %digest, bytes = size, evicted = evicted.len(), "toolchain received");
    send(
        out,
        from_builder::Msg::Toolchains(ToolchainsChanged {
            added: vec![wire_digest(&digest, size)],
            evicted: evicted.iter().map(|d| wire_digest(d, 0)).collect(),
        }),
    )
    .await
}

/// Gives a container back to the pool however the job ends.
struct LeaseGuard {
    pool: kiln_jails::Pool<Jail>,
    lease: Option<Lease<Jail>>,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.pool.checkin(lease);
        }
    }
}

async fn run_in_jail(
    shared: &Arc<Shared>,
    out: &mpsc::Sender<FromBuilder>,
    id: u64,
    spec: &JobSpec,
    c: &Checked,
    (slot, pinned): (Arc<Slot>, Pinned),
    started: Instant,
) -> Result<(), JobError> {
    let slot_n = slot.n;
    let fetched = started.elapsed();
    let key = c.toolchain.to_hex();
    let archive = shared.toolchains().path(&c.toolchain);
    if let Err(e) = shared.pool.prepare(&key, archive.clone()).await {
        if let JailError::Archive(_) = e {
            // A hostile or broken archive is refused, and not kept.
            let _ = std::fs::remove_file(&archive);
            return Err(JobError::Refuse(format!("the toolchain: {e}")));
        }
        return Err(e.into());
    }
    let lease = shared.pool.checkout(&key).await?;
    let held = Arc::new(Held {
        lease: LeaseGuard {
            pool: shared.pool.clone(),
            lease: Some(lease),
        },
        _pinned: pinned,
        _slot: slot,
    });
    let (root_path, outputs_path) = held
        .lease
        .lease
        .as_ref()
        .map(|l| (l.root().to_path_buf(), l.outputs().to_path_buf()))
        .unwrap_or_default();
    let ready_at = started.elapsed();

    let uid = shared.job_uid(slot_n);
    let placed = {
        let worker = shared.clone();
        let held = held.clone();
        let files = c.inputs.clone();
        let dirs = c.dirs.clone();
        let cwd = c.cwd.clone();
        let outputs = c.outputs.clone();
        let root_path = root_path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), JobError> {
            let _held = held;
            let root = Root::open(&root_path)?;
            let backend = worker.pool.backend();
            let mut placer = Placer::new(&root, backend.links_inputs());
            let sources: Vec<(PathBuf, PathBuf, bool)> = files
                .iter()
                .map(|(path, digest, exec)| (path.clone(), worker.inputs.path(digest), *exec))
                .collect();
            // The directories this job needs: those it named, its working directory and its
            // outputs' directories. A kept inputs layer holds these and nothing of earlier jobs.
            let mut needed = dirs;
            needed.push(cwd.clone());
            needed.extend(outputs.iter().filter_map(|o| o.parent().map(PathBuf::from)));
            let placed = if backend.keeps_inputs() {
                placer.sync(&sources, &needed).map(|_| ())
            } else {
                needed
                    .iter()
                    .try_for_each(|dir| root.make_dirs(dir, None).map(|_| ()))
                    .and_then(|()| {
                        sources.iter().try_for_each(|(path, source, exec)| {
                            placer.link_or_copy(path, source, *exec)
                        })
                    })
            };
            if let Err(e) = placed {
                // An input evicted since it was checked is not the job's fault.
                if let Some((path, _, _)) = sources.iter().find(|(_, source, _)| !source.exists()) {
                    return Err(JobError::Retry(format!(
                        "input {} went missing",
                        path.display()
                    )));
                }
                return Err(e.into());
            }
            let (owner, group) = backend.owner(uid);
            root.chown_dir(&cwd, owner, group)?;
            for output in &outputs {
                if let Some(parent) = output.parent() {
                    root.chown_dir(parent, owner, group)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?
    };
    placed?;
    let placed_at = started.elapsed();

    let mut limits = shared.config.limits;
    if spec.timeout_ms > 0 {
        limits.timeout = limits.timeout.min(Duration::from_millis(spec.timeout_ms));
    }
    let run = RunSpec {
        argv: c.argv.clone(),
        env: spec
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect(),
        cwd: c.cwd.clone(),
        uid,
        gid: uid,
        limits,
    };
    // The jail runs on a task of its own that holds the job's resources: aborting this job
    // stops waiting for it, and the slot comes back when the jail's own limits end the run
    // (its owner is the job while the job lives, then those limits).
    let outcome = {
        use tracing::Instrument;
        let held = held.clone();
        let pool = shared.pool.clone();
        let task = async move {
            let lease = held.lease.lease.as_ref().ok_or(JailError::Setup(
                "the job's container was already returned".into(),
            ))?;
            pool.run(lease, run).await
        };
        shared
            .runs
            .spawn(
                "jail run",
                task.instrument(tracing::info_span!("jail run", job = id)),
            )
            .await
            .map_err(|e| JobError::Retry(e.to_string()))??
    };
    let outcome_elapsed = outcome.elapsed;

    let read = {
        let outputs = c.outputs.clone();
        let held = held.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<(PathBuf, Bytes)>, JobError> {
            let _held = held;
            let root = Root::open(&outputs_path)?;
            let mut found = Vec::new();
            for path in outputs {
                if let Some(data) = root.read_file(&path, MAX_OUTPUT)? {
                    found.push((path, Bytes::from(data)));
                }
            }
            Ok(found)
        })
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?
    };
    drop(held);
    let outputs = read?;
    let read_at = started.elapsed();
    shared.metrics.run.observe(outcome_elapsed);
    shared
        .metrics
        .overhead
        .observe(read_at.saturating_sub(outcome_elapsed));
    let digests: Vec<Digest> = outputs.iter().map(|(_, d)| Digest::of(d)).collect();
    let finished = Finished {
        exit_code: outcome.exit_code.unwrap_or(-1),
        stdout: outcome.stdout.into(),
        stderr: outcome.stderr.into(),
        outputs: outputs
            .iter()
            .zip(&digests)
            .map(|((path, data), d)| OutputFile {
                path: path.to_string_lossy().into_owned(),
                digest: Some(wire_digest(d, data.len() as u64)),
            })
            .collect(),
        builder: shared.config.name.clone(),
        killed: outcome.killed.unwrap_or_default(),
        run_ms: outcome.elapsed.as_millis() as u64,
    };
    // Where the job's time went: receiving what was missing, taking a container (making the
    // image the first time), placing the inputs, the jail (compiler included), reading the
    // outputs.
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        job = id,
        source = %spec.label,
        exit = finished.exit_code,
        run_ms = finished.run_ms,
        fetch_ms = format!("{:.1}", ms(fetched)),
        ready_ms = format!("{:.1}", ms(ready_at.saturating_sub(fetched))),
        place_ms = format!("{:.1}", ms(placed_at.saturating_sub(ready_at))),
        read_ms = format!("{:.1}", ms(read_at.saturating_sub(placed_at + outcome_elapsed))),
        inputs = c.inputs.len(),
        "compiled"
    );
    send(
        out,
        from_builder::Msg::Finished(JobFinished {
            job_id: id,
            finished: Some(finished),
        }),
    )
    .await?;
    for ((_, data), digest) in outputs.iter().zip(&digests) {
        for chunk in chunks(digest, data) {
            send(
                out,
                from_builder::Msg::Chunk(JobChunk {
                    job_id: id,
                    chunk: Some(chunk),
                }),
            )
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_aborted_job_gives_its_slot_back() {
        let slots = Slots::new(2);
        let (took_tx, took_rx) = tokio::sync::oneshot::channel();
        let job = {
            let slots = slots.clone();
            kiln_net::task::spawn("test job", async move {
                let slot = slots.take().expect("a free slot");
                let _ = took_tx.send(());
                // A compile that never ends, as far as this task knows.
                std::future::pending::<()>().await;
                drop(slot);
            })
        };
        took_rx.await.unwrap();
        assert_eq!(slots.free(), 1);
        job.abort();
        assert!(job.await.unwrap_err().is_cancelled());
        assert_eq!(slots.free(), 2, "the aborted job kept its slot");
    }

    #[tokio::test]
    async fn a_slot_held_by_a_running_jail_comes_back_when_the_run_ends() {
        let slots = Slots::new(1);
        let slot = Arc::new(slots.take().unwrap());
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let run = {
            let slot = slot.clone();
            kiln_net::task::spawn("test run", async move {
                let _ = end_rx.await;
                drop(slot);
            })
        };
        // The job's own task goes (aborted), the run it started has not ended yet.
        drop(slot);
        assert_eq!(slots.free(), 0, "a slot freed while its jail still runs");
        assert!(slots.take().is_none());
        // Shutdown waits for that run before the pool removes images.
        let waiting = {
            let slots = slots.clone();
            kiln_net::task::spawn("test shutdown", async move { slots.all_free().await })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "shutdown went on while a jail still ran"
        );
        end_tx.send(()).unwrap();
        run.await.unwrap();
        waiting.await.unwrap();
        assert_eq!(slots.free(), 1);
    }

    #[test]
    fn job_paths_must_stay_absolute_and_inside() {
        for ok in ["/usr/bin/gcc", "/home/u/x.c", "/a/./b"] {
            assert!(jail_path(ok, "p").is_ok(), "{ok}");
        }
        for bad in ["", "/", "rel/x", "/a/../../etc/passwd", "../x", "/a\0"] {
            assert!(jail_path(bad, "p").is_err(), "{bad}");
        }
    }

    #[test]
    fn jobs_with_nul_bytes_are_refused() {
        let spec = JobSpec {
            toolchain: Some(wire_digest(&Digest::of(b"t"), 1)),
            argv: vec!["/bin/cc".into(), "-c".into()],
            cwd: "/w".into(),
            ..JobSpec::default()
        };
        assert!(check(&spec).is_ok());
        let refused = |change: &dyn Fn(&mut JobSpec)| {
            let mut spec = spec.clone();
            change(&mut spec);
            check(&spec).is_err()
        };
        // Each once reached the jail helper as extra words: `--uid 1` here.
        let smuggle = |before: &str| [before, "--uid", "1"].join("\0");
        assert!(refused(&|s| s.env.push(kiln_proto::v1::EnvVar {
            name: "A".into(),
            value: smuggle("x"),
        })));
        assert!(refused(&|s| s.argv.push(smuggle("x"))));
        assert!(refused(&|s| s.cwd = smuggle("/w")));
        assert!(refused(&|s| s.outputs.push("/w/a.o\0".into())));
    }
}
