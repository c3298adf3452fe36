//! `kiln-jail`, the program that enters a Linux jail. It runs as two processes, started when
//! a container is pooled, so that everything slow about entering a jail is done before a job
//! arrives:
//!
//! 1. `kiln-jail run …`, started by the builder: joins the container's cgroups (moving a
//!    process into a cgroup v1 memory controller waits for an RCU grace period, about 10 ms),
//!    unshares the pid, net, ipc and uts namespaces and starts stage 2 in them. It then waits
//!    for the job on its stdin, sets the job's memory and process limits on the cgroups, hands
//!    the job to stage 2, enforces the wall-clock limit (killing stage 2, the namespace's init,
//!    kills every process in it) and writes a one-line report for the builder.
//! 2. `kiln-jail init …`, pid 1 of the new pid namespace: makes a mount namespace of its own
//!    and waits for the job. Then it mounts the container's overlay (the job's inputs and the
//!    toolchain image below, the container's tmpfs above), `/proc` and a minimal `/dev`, pivots
//!    into it, sets the hostname and rlimits, drops to the job's uid and gid (which clears every
//!    capability), sets `no_new_privs`, starts a new session, installs the system call filter
//!    (see `seccomp`) and execs the command with exactly the job's environment.
//!
//! The overlay is mounted by stage 2, after the builder has placed the inputs, because
//! overlayfs forbids changing a lower layer while it is mounted; it lives in stage 2's mount
//! namespace and vanishes with it. A job is the NUL-separated words of [`Job::to_words`] on
//! stdin, ended by closing it; a closed stdin with no job ends both stages quietly.
//!
//! Two small processes instead of `fork` in the builder keep untrusted setup out of a
//! multi-threaded process and need no `unsafe`. The new network namespace has only a loopback
//! interface, and it is down.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};

/// The exit status stage 2 uses for its own failures. It means nothing by itself (a job may
/// exit with it too): stage 2's own report, [`init_report`], says whether it failed.
const SETUP_FAILED: i32 = 125;
/// The exit status of a command that could not be executed, as shells use it.
const NOT_EXECUTED: i32 = 127;

/// Where stage 2 says why it failed, beside stage 1's report: a file on the builder's disk,
/// opened before the job exists and closed by the `exec` of its command, so nothing the job
/// does can write it, and no exit status the job chooses can pass for a failure of the jail.
fn init_report(setup: &Setup) -> PathBuf {
    let mut path = setup.status.clone().into_os_string();
    path.push(".init");
    path.into()
}

/// Why stage 2 did not run the command.
enum InitError {
    /// Setting the jail up failed: the builder's problem.
    Setup(String),
    /// The command itself could not be executed (not in the toolchain, not executable): the
    /// job's own result.
    Exec(String),
}

impl From<String> for InitError {
    fn from(e: String) -> InitError {
        InitError::Setup(e)
    }
}
/// The largest job message accepted on stdin.
const MAX_JOB: u64 = 16 << 20;

/// What stage 1 tells the builder, one line in the status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Exit(i32),
    /// Killed by a signal; with the limit that caused it when the jail did the killing.
    Signal(i32, Option<String>),
    Error(String),
}

impl Report {
    fn line(&self) -> String {
        match self {
            Report::Exit(code) => format!("exit {code}"),
            Report::Signal(sig, None) => format!("signal {sig}"),
            Report::Signal(sig, Some(why)) => format!("signal {sig} {why}"),
            Report::Error(msg) => format!("error {}", msg.replace('\n', " ")),
        }
    }

    pub fn parse(text: &str) -> Option<Report> {
        let line = text.lines().next()?;
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "exit" => rest.trim().parse().ok().map(Report::Exit),
            "signal" => {
                let (sig, why) = rest.split_once(' ').unwrap_or((rest, ""));
                let why = (!why.is_empty()).then(|| why.to_string());
                sig.parse().ok().map(|s| Report::Signal(s, why))
            }
            "error" => Some(Report::Error(rest.to_string())),
            _ => None,
        }
    }
}

/// The container a primed helper serves, on its command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Setup {
    /// Where the overlay is mounted (stage 2's mount namespace only).
    pub root: PathBuf,
    /// The overlay's lower layers, top first: the job's inputs, then the toolchain image.
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Where stage 1 writes its report.
    pub status: PathBuf,
    /// The container's cgroup name (empty: none).
    pub cgroup: String,
}

impl Setup {
    fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Setup, String> {
        let mut s = Setup::default();
        while let Some(flag) = args.next() {
            let flag = flag.to_string_lossy().into_owned();
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--root" => s.root = value.into(),
                "--lower" => s.lower.push(value.into()),
                "--upper" => s.upper = value.into(),
                "--work" => s.work = value.into(),
                "--status" => s.status = value.into(),
                "--cgroup" => s.cgroup = value.to_string_lossy().into_owned(),
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if s.root.as_os_str().is_empty() || s.lower.is_empty() || s.upper.as_os_str().is_empty() {
            return Err(
                "usage: kiln-jail run|init --root DIR --lower DIR… --upper DIR --work DIR \
                        --status FILE [--cgroup NAME], then the job on stdin"
                    .into(),
            );
        }
        Ok(s)
    }

    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            out.push(k.into());
            out.push(v);
        };
        push("--root", self.root.clone().into());
        for l in &self.lower {
            push("--lower", l.clone().into());
        }
        push("--upper", self.upper.clone().into());
        push("--work", self.work.clone().into());
        push("--status", self.status.clone().into());
        push("--cgroup", self.cgroup.clone().into());
        out
    }
}

/// One job, sent to a primed helper on its stdin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Job {
    pub uid: u32,
    pub gid: u32,
    pub cwd: PathBuf,
    pub timeout_ms: u64,
    pub memory: u64,
    pub processes: u64,
    pub file_size: u64,
    pub open_files: u64,
    /// Address space per process (`RLIMIT_AS`), 0 for none: the memory limit where no memory
    /// cgroup could be joined (set by stage 1, which knows).
    pub address_space: u64,
    /// Rootless builders: the job gets a user namespace of its own in which `uid` and `gid`
    /// are the helper's own ids, since no other id is mapped.
    pub userns: bool,
    /// `NAME=VALUE`, the command's whole environment.
    pub env: Vec<OsString>,
    pub argv: Vec<OsString>,
}

impl Job {
    /// The job as NUL-separated words: flags, `--env NAME=VALUE`s, `--`, the command. A word
    /// holding a NUL is refused: it would arrive as several words, and a job's environment or
    /// working directory could then set `--uid` or the limits itself (found by `fuzz/`).
    pub fn to_words(&self) -> Result<Vec<u8>, String> {
        let mut words: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            words.push(k.into());
            words.push(v);
        };
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        push("--cwd", self.cwd.clone().into());
        push("--timeout-ms", self.timeout_ms.to_string().into());
        push("--memory", self.memory.to_string().into());
        push("--processes", self.processes.to_string().into());
        push("--file-size", self.file_size.to_string().into());
        push("--open-files", self.open_files.to_string().into());
        push("--address-space", self.address_space.to_string().into());
        push("--userns", u8::from(self.userns).to_string().into());
        for e in &self.env {
            push("--env", e.clone());
        }
        words.push("--".into());
        words.extend(self.argv.iter().cloned());
        let mut out = Vec::new();
        for w in words {
            if w.as_bytes().contains(&0) {
                return Err(format!("a job word holds a NUL byte: {w:?}"));
            }
            out.extend_from_slice(w.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    pub fn parse(bytes: &[u8]) -> Result<Job, String> {
        let mut words = bytes
            .strip_suffix(&[0])
            .ok_or("the job does not end with a NUL")?
            .split(|b| *b == 0)
            .map(|w| OsString::from_vec(w.to_vec()));
        let mut j = Job::default();
        while let Some(flag) = words.next() {
            let flag = flag.to_string_lossy().into_owned();
            if flag == "--" {
                j.argv = words.collect();
                break;
            }
            let value = words
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?;
            let text = value.to_string_lossy().into_owned();
            let num = || {
                text.parse::<u64>()
                    .map_err(|_| format!("{flag}: not a number: {text}"))
            };
            match flag.as_str() {
                "--uid" => j.uid = u32::try_from(num()?).map_err(|_| "--uid: out of range")?,
                "--gid" => j.gid = u32::try_from(num()?).map_err(|_| "--gid: out of range")?,
                "--cwd" => j.cwd = value.into(),
                "--timeout-ms" => j.timeout_ms = num()?,
                "--memory" => j.memory = num()?,
                "--processes" => j.processes = num()?,
                "--file-size" => j.file_size = num()?,
                "--open-files" => j.open_files = num()?,
                "--address-space" => j.address_space = num()?,
                "--userns" => j.userns = num()? != 0,
                "--env" if value.as_bytes().contains(&b'=') => j.env.push(value),
                "--env" => return Err(format!("--env {text}: not NAME=VALUE")),
                _ => return Err(format!("unknown job option {flag}")),
            }
        }
        if j.argv.is_empty() || j.argv[0].is_empty() {
            return Err("the job has no command".into());
        }
        if j.uid == 0 || j.gid == 0 {
            return Err("refusing to run a job as root".into());
        }
        Ok(j)
    }
}

/// Reads a job from stdin: `None` when it was closed with nothing sent.
fn read_job() -> Result<Option<Vec<u8>>, String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_JOB + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the job: {e}"))?;
    if bytes.len() as u64 > MAX_JOB {
        return Err(format!("the job is over {MAX_JOB} bytes"));
    }
    Ok((!bytes.is_empty()).then_some(bytes))
}

/// The `kiln-jail` program.
pub fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let stage = args.next().unwrap_or_default();
    let setup = match Setup::parse(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln-jail: {e}");
            return ExitCode::from(2);
        }
    };
    match stage.to_str() {
        Some("run") => {
            let report = match stage1(&setup) {
                Ok(Some(report)) => report,
                // No job came: the container was destroyed while pooled.
                Ok(None) => return ExitCode::SUCCESS,
                Err(e) => Report::Error(e),
            };
            match fs::write(&setup.status, report.line() + "\n") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kiln-jail: writing {}: {e}", setup.status.display());
                    ExitCode::from(1)
                }
            }
        }
        Some("init") => {
            // Rust opens files close-on-exec: the job never holds this one.
            let report = fs::File::create(init_report(&setup));
            let (line, message) = match stage2(&setup) {
                Ok(()) => return ExitCode::SUCCESS,
                Err(InitError::Setup(e)) => (format!("setup {e}"), e),
                Err(InitError::Exec(e)) => (format!("exec {e}"), e),
            };
            eprintln!("kiln-jail: {message}");
            if let Ok(mut report) = report {
                let _ = report.write_all(line.replace('\n', " ").as_bytes());
            }
            ExitCode::from(SETUP_FAILED as u8)
        }
        _ => {
            eprintln!("kiln-jail: the first argument is `run` (the builder starts jobs with it)");
            ExitCode::from(2)
        }
    }
}

fn stage1(setup: &Setup) -> Result<Option<Report>, String> {
    let cgroups = join_cgroups(&setup.cgroup);
    // The clock runs on its own thread, started before the pid namespace exists: after
    // unshare(CLONE_NEWPID) this process may not create threads any more.
    let (start_tx, start_rx) = std::sync::mpsc::channel::<(nix::unistd::Pid, Duration)>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let timer = std::thread::spawn(move || {
        let Ok((pid, limit)) = start_rx.recv() else {
            return false;
        };
        match done_rx.recv_timeout(limit) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Killing pid 1 of a pid namespace kills everything in it.
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                true
            }
            _ => false,
        }
    });
    // The mount namespace is stage 2's alone: one copy of the mount table per job.
    unshare(
        CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            // After joining the container's cgroups: the job sees its cgroup as the root, not
            // a name that holds the builder's pid.
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| format!("creating namespaces: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("finding kiln-jail: {e}"))?;
    // The door to the jail's init: this program again, inside the new namespaces.
    #[allow(clippy::disallowed_methods)]
    let mut child = Command::new(exe)
        .arg("init")
        .args(setup.to_args())
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the jail's init: {e}"))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut to_init = child.stdin.take();

    // Primed: everything above happened before the job existed.
    let job = match read_job() {
        Ok(Some(bytes)) => Job::parse(&bytes).map(|job| (job, bytes)),
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        Err(e) => Err(e),
    };
    let (mut job, mut bytes) = match job {
        Ok(found) => found,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    if !cgroups.limit(job.memory, job.processes) {
        // No memory cgroup (a rootless builder without delegation, or no controller): each
        // process's address space is bounded instead, which is weaker but still a bound.
        job.address_space = job.memory;
        bytes = job.to_words()?;
    }
    // A container's cgroups outlive its jobs (creating memory cgroups is slow): count this
    // job's OOM kills from here.
    let oom_before = cgroups.oom_kills();
    let _ = start_tx.send((pid, Duration::from_millis(job.timeout_ms.max(1))));
    if let Some(mut pipe) = to_init.take() {
        // A failed write means init died setting up; its status says how.
        let _ = pipe.write_all(&bytes);
    }
    let status = child.wait();
    let _ = done_tx.send(());
    let timed_out = timer.join().unwrap_or(false);
    let status = status.map_err(|e| format!("waiting for the job: {e}"))?;
    // Stage 2's own word decides whether it failed, never the exit status alone.
    match fs::read_to_string(init_report(setup)) {
        Ok(line) if line.starts_with("exec ") => return Ok(Some(Report::Exit(NOT_EXECUTED))),
        Ok(line) if !line.is_empty() => {
            return Ok(Some(Report::Error(
                line.strip_prefix("setup ").unwrap_or(&line).to_string(),
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(format!("the jail's init left no report: {e}")),
    }
    if let Some(code) = status.code() {
        return Ok(Some(Report::Exit(code)));
    }
    let sig = status.signal().unwrap_or(0);
    let why = if timed_out {
        Some(format!("time limit ({} ms)", job.timeout_ms))
    } else if cgroups.oom_kills() > oom_before {
        Some("memory limit".to_string())
    } else if sig == Signal::SIGXCPU as i32 {
        Some("cpu time limit".to_string())
    } else if sig == Signal::SIGXFSZ as i32 {
        Some("file size limit".to_string())
    } else {
        None
    };
    Ok(Some(Report::Signal(sig, why)))
}

fn stage2(setup: &Setup) -> Result<(), InitError> {
    // A mount namespace of its own: pivot_root moves the root of every process in the
    // namespace, and stage 1 must keep the builder's view to write its report.
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("creating a mount namespace: {e}"))?;
    // Nothing mounted for the job may appear in the builder's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    // If stage 1 dies (the builder killed it), so does the whole namespace.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("pdeathsig: {e}"))?;
    // Compiled while the container waits in the pool, not on the job's time.
    let filters = super::seccomp::programs()?;
    let Some(bytes) = read_job()? else {
        return Ok(());
    };
    let job = Job::parse(&bytes)?;
    match enter(setup, &job, &filters)? {}
}

enum Never {}

/// Files of `/proc` a job sees as empty (bind mounts of `/dev/null`).
const MASKED_PROC: [&str; 5] = ["keys", "key-users", "kcore", "timer_list", "sched_debug"];

/// Where the overlay's layers are named from, below the upper layer's parent (the container's
/// own tmpfs, which the job cannot see).
const LAYER_LINKS: &str = "lower";

/// Mounts the container's overlay on `setup.root`. Its options are named relative to the
/// container's directory, through links made here, because `/proc/self/mountinfo` shows them
/// to the job: it must not learn the builder's paths, its pid (in the container's name) or
/// which of the builder's input directories it was given.
fn mount_overlay(setup: &Setup) -> Result<(), String> {
    let base = setup
        .upper
        .parent()
        .filter(|b| setup.work.parent() == Some(*b))
        .ok_or("the upper and work directories must share a parent")?;
    let links = base.join(LAYER_LINKS);
    match fs::create_dir(&links) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", links.display())),
    }
    let mut lower = Vec::new();
    for (i, layer) in setup.lower.iter().enumerate() {
        let link = links.join(i.to_string());
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(layer, &link)
            .map_err(|e| format!("naming layer {}: {e}", layer.display()))?;
        lower.push(format!("{LAYER_LINKS}/{i}"));
    }
    let name = |p: &Path| {
        p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        name(&setup.upper),
        name(&setup.work)
    );
    nix::unistd::chdir(base).map_err(|e| format!("entering {}: {e}", base.display()))?;
    mount(
        Some("overlay"),
        &setup.root,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| {
        format!(
            "mounting the container's overlay on {}: {e}",
            setup.root.display()
        )
    })
}

fn enter(
    setup: &Setup,
    job: &Job,
    filters: &[seccompiler::BpfProgram],
) -> Result<Never, InitError> {
    let root = &setup.root;
    mount_overlay(setup)?;
    // The image's /tmp is world-writable, but a job whose inputs live under /tmp has it as a
    // directory of the inputs layer, made by the builder (0755, root). Setting it here copies
    // it up into the job's own layer.
    // Only then: otherwise /tmp is the image's, already right, and touching it costs a copy-up.
    let tmp = root.join("tmp");
    let inputs_have_tmp = setup
        .lower
        .first()
        .is_some_and(|inputs| fs::symlink_metadata(inputs.join("tmp")).is_ok());
    if inputs_have_tmp && fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_dir()) {
        use std::os::unix::fs::PermissionsExt;
        nix::unistd::chown(&tmp, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
            .map_err(|e| format!("owning /tmp: {e}"))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
            .map_err(|e| format!("making /tmp writable: {e}"))?;
    }
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        flags | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting /proc: {e}"))?;
    // Not namespaced, and none of a compiler's business: keys the builder's session can see,
    // kernel memory, and the scheduler's view of every process on the host.
    for file in MASKED_PROC {
        let target = root.join("proc").join(file);
        if target.exists() {
            mount(
                Some("/dev/null"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("masking /proc/{file}: {e}"))?;
        }
    }
    let dev = root.join("dev");
    mount(
        Some("kiln-dev"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(|e| format!("mounting /dev: {e}"))?;
    for node in ["null", "zero", "full", "random", "urandom"] {
        let target = dev.join(node);
        fs::File::create(&target).map_err(|e| format!("creating /dev/{node}: {e}"))?;
        mount(
            Some(Path::new("/dev").join(node).as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("binding /dev/{node}: {e}"))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| format!("creating /dev/{name}: {e}"))?;
    }
    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only
    // the container.
    nix::unistd::chdir(root).map_err(|e| format!("entering {}: {e}", root.display()))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detaching the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    let _ = nix::unistd::sethostname("kiln-jail");

    let (uid, gid) = (Uid::from_raw(job.uid), Gid::from_raw(job.gid));
    // Before the limits: a new user namespace takes its process limit from its creator's,
    // and checks it against every process of the builder's user, not only the job's.
    if job.userns {
        own_user_namespace(job)?;
    }
    let limits = [
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_FSIZE, job.file_size),
        (Resource::RLIMIT_NOFILE, job.open_files),
        (Resource::RLIMIT_NPROC, job.processes),
        (Resource::RLIMIT_CPU, job.timeout_ms.div_ceil(1000) + 1),
    ];
    for (resource, value) in limits {
        setrlimit(resource, value, value).map_err(|e| format!("setrlimit {resource:?}: {e}"))?;
    }
    if job.address_space > 0 {
        let value = job.address_space;
        setrlimit(Resource::RLIMIT_AS, value, value)
            .map_err(|e| format!("setrlimit RLIMIT_AS: {e}"))?;
    }

    if !job.userns {
        nix::unistd::setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
    }
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    // Leaving uid 0 clears the permitted, effective and ambient capability sets.
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    // The change of user cleared the parent-death signal set before the job came.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("pdeathsig: {e}"))?;
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    nix::unistd::chdir(&job.cwd).map_err(|e| format!("entering {}: {e}", job.cwd.display()))?;
    // Last, so the helper's own set-up above is not filtered; it holds across every exec.
    super::seccomp::install(filters)?;

    let env = job.env.iter().filter_map(|e| {
        let (k, v) = e
            .as_bytes()
            .split_at(e.as_bytes().iter().position(|b| *b == b'=')?);
        Some((OsStr::from_bytes(k), OsStr::from_bytes(&v[1..])))
    });
    // The door to the job itself: its program, with exactly its environment.
    #[allow(clippy::disallowed_methods)]
    let err = Command::new(&job.argv[0])
        .args(&job.argv[1..])
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .exec();
    Err(InitError::Exec(format!(
        "running {}: {err}",
        job.argv[0].to_string_lossy()
    )))
}

/// On a rootless builder, where only the builder's own id is mapped: a user namespace in which
/// the job's uid and gid are that id, so that the change of user below drops every capability
/// as it does for a real unprivileged uid. Supplementary groups cannot be changed here (an
/// unprivileged user namespace denies `setgroups`); they are the builder user's, unmapped.
fn own_user_namespace(job: &Job) -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| format!("creating a user namespace: {e}"))?;
    let write = |file: &str, text: String| {
        fs::write(Path::new("/proc/self").join(file), text)
            .map_err(|e| format!("writing /proc/self/{file}: {e}"))
    };
    write("uid_map", format!("{} 0 1\n", job.uid))?;
    write("setgroups", "deny\n".into())?;
    write("gid_map", format!("{} 0 1\n", job.gid))
}

/// The job's cgroups: memory and process limits where the kernel offers them. Best effort:
/// without cgroups the rlimits still bound processes, file sizes and CPU time.
struct Cgroups {
    dirs: Vec<PathBuf>,
    v2: bool,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if name.is_empty() {
        return Vec::new();
    }
    if root.join("cgroup.controllers").exists() {
        vec![root.join("kiln").join(name)]
    } else {
        ["memory", "pids"]
            .iter()
            .map(|c| root.join(c).join("kiln").join(name))
            .filter(|d| d.parent().and_then(Path::parent).is_some_and(Path::is_dir))
            .collect()
    }
}

fn join_cgroups(name: &str) -> Cgroups {
    let dirs = cgroup_dirs(name);
    let v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
    let me = std::process::id().to_string();
    let mut joined = Vec::new();
    for dir in dirs {
        if v2 {
            let _ = fs::write(
                Path::new(CGROUP_ROOT).join("cgroup.subtree_control"),
                "+memory +pids",
            );
            if let Some(parent) = dir.parent() {
                let _ = fs::create_dir_all(parent);
                let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory +pids");
            }
        }
        if fs::create_dir_all(&dir).is_err() {
            continue;
        }
        if fs::write(dir.join("cgroup.procs"), &me).is_ok() {
            joined.push(dir);
        }
    }
    Cgroups { dirs: joined, v2 }
}

impl Cgroups {
    /// Sets the job's limits; cheap, unlike joining. Returns whether a memory limit was set.
    fn limit(&self, memory: u64, processes: u64) -> bool {
        let mut memory_set = false;
        for dir in &self.dirs {
            let writes: Vec<(&str, String)> = if self.v2 {
                vec![
                    ("memory.max", memory.to_string()),
                    ("memory.swap.max", "0".into()),
                    ("pids.max", processes.to_string()),
                ]
            } else if dir.starts_with(Path::new(CGROUP_ROOT).join("memory")) {
                vec![("memory.limit_in_bytes", memory.to_string())]
            } else {
                vec![("pids.max", processes.to_string())]
            };
            for (file, value) in writes {
                let written = fs::write(dir.join(file), value).is_ok();
                if written && file.starts_with("memory.") && file != "memory.swap.max" {
                    memory_set = true;
                }
            }
        }
        memory_set
    }

    fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .map(|dir| {
                let events = fs::read_to_string(dir.join("memory.events"))
                    .or_else(|_| fs::read_to_string(dir.join("memory.oom_control")))
                    .unwrap_or_default();
                events
                    .lines()
                    .filter_map(|l| l.strip_prefix("oom_kill "))
                    .filter_map(|n| n.trim().parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }
}

/// Removes a container's cgroups. Its helper has been killed, but the jail's init dies of that
/// a moment later (a parent-death signal): whatever is still inside is killed, and removal is
/// tried again for up to a second.
pub fn remove_cgroups(name: &str) {
    for dir in cgroup_dirs(name) {
        for _ in 0..100 {
            match fs::remove_dir(&dir) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => {
                    for pid in fs::read_to_string(dir.join("cgroup.procs"))
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|p| p.trim().parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            Signal::SIGKILL,
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
    }
}

/// Removes the empty cgroups left under kiln's by builders that died: a live container's
/// cgroup holds its waiting helper, and the kernel refuses to remove a cgroup that is not
/// empty, so other builders on the host keep theirs. Returns how many it removed.
pub fn remove_stale_cgroups() -> usize {
    let root = Path::new(CGROUP_ROOT);
    let parents: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.join("kiln")]
    } else {
        ["memory", "pids"]
            .iter()
            .map(|c| root.join(c).join("kiln"))
            .collect()
    };
    let mut removed = 0;
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) && fs::remove_dir(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        for r in [
            Report::Exit(0),
            Report::Exit(1),
            Report::Signal(9, None),
            Report::Signal(9, Some("time limit (50 ms)".into())),
            Report::Error("mounting /proc: EPERM".into()),
        ] {
            assert_eq!(Report::parse(&r.line()), Some(r));
        }
        assert_eq!(Report::parse(""), None);
        assert_eq!(Report::parse("exit x"), None);
    }

    #[test]
    fn jobs_refuse_root_and_round_trip() {
        let job = Job {
            uid: 1000,
            gid: 1000,
            cwd: "/w".into(),
            timeout_ms: 5,
            env: vec!["A=b=c".into(), "EMPTY=".into()],
            argv: vec![
                "/bin/cc".into(),
                "-c".into(),
                "with space\nand newline".into(),
            ],
            ..Job::default()
        };
        assert_eq!(Job::parse(&job.to_words().unwrap()).unwrap(), job);
        let root = Job {
            uid: 0,
            ..job.clone()
        };
        assert!(Job::parse(&root.to_words().unwrap()).is_err());
        let no_command = Job {
            argv: vec![],
            ..job.clone()
        };
        assert!(Job::parse(&no_command.to_words().unwrap()).is_err());
        assert!(Job::parse(b"--uid\x005").is_err(), "unterminated");
        assert!(Job::parse(b"--env\0NOEQUALS\0--\0/x\0").is_err());
        assert!(Job::parse(b"--uid\0x\0--\0/x\0").is_err());
    }

    #[test]
    fn jobs_refuse_words_that_would_split() {
        // An environment value with NULs once became extra words: here, a uid and a time limit
        // of the job's choosing.
        let job = Job {
            uid: 1000,
            gid: 1000,
            cwd: "/w".into(),
            timeout_ms: 5,
            env: vec![["A=x", "--uid", "1", "--timeout-ms", "99999999"]
                .join("\0")
                .into()],
            argv: vec!["/bin/cc".into()],
            ..Job::default()
        };
        assert!(job.to_words().is_err());
        let clean = Job {
            env: vec!["A=x".into()],
            ..job
        };
        assert!(clean.to_words().is_ok());
        for cwd in [["/w", "--uid", "1"].join("\0"), "/w\0".into()] {
            let job = Job {
                cwd: cwd.clone().into(),
                ..clean.clone()
            };
            assert!(job.to_words().is_err(), "{cwd:?}");
        }
    }

    #[test]
    fn setups_round_trip() {
        let s = Setup {
            root: "/c/root".into(),
            lower: vec!["/in".into(), "/img".into()],
            upper: "/c/upper".into(),
            work: "/c/work".into(),
            status: "/c/status".into(),
            cgroup: "1-2".into(),
        };
        assert_eq!(Setup::parse(s.to_args().into_iter()).unwrap(), s);
        assert!(Setup::parse(vec![OsString::from("--root")].into_iter()).is_err());
    }
}
