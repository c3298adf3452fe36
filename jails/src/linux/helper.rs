//! `kiln-jail`, the program that enters a Linux jail. It runs as two processes:
//!
//! 1. `kiln-jail run …`, started by the builder: joins the job's cgroups, unshares the mount,
//!    pid, net, ipc and uts namespaces, makes every mount private, and starts stage 2. It
//!    enforces the wall-clock limit (killing stage 2, the namespace's init, kills every process
//!    in it) and writes a one-line report for the builder.
//! 2. `kiln-jail init …`, pid 1 of the new pid namespace: mounts `/proc` and a minimal `/dev`
//!    in the container root, pivots into it, sets the hostname and rlimits, drops to
//!    the job's uid and gid (which clears every capability), sets `no_new_privs`, starts a new
//!    session and execs the command.
//!
//! Two small processes instead of `fork` in the builder keep untrusted setup out of a
//! multi-threaded process and need no `unsafe`. The new network namespace has only a loopback
//! interface, and it is down.

use std::ffi::OsString;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};

/// The exit status stage 2 uses for its own failures; compilers do not use it.
const SETUP_FAILED: i32 = 125;

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

/// The helper's parameters, passed on its command line by the builder.
#[derive(Debug, Clone, Default)]
struct Params {
    root: PathBuf,
    status: PathBuf,
    cgroup: String,
    uid: u32,
    gid: u32,
    cwd: PathBuf,
    timeout_ms: u64,
    memory: u64,
    processes: u64,
    file_size: u64,
    open_files: u64,
    argv: Vec<OsString>,
}

impl Params {
    fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Params, String> {
        let mut p = Params::default();
        while let Some(flag) = args.next() {
            let flag = flag.to_string_lossy().into_owned();
            if flag == "--" {
                p.argv = args.collect();
                break;
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let text = value.to_string_lossy().into_owned();
            let num = || {
                text.parse::<u64>()
                    .map_err(|_| format!("{flag}: not a number: {text}"))
            };
            match flag.as_str() {
                "--root" => p.root = value.into(),
                "--status" => p.status = value.into(),
                "--cgroup" => p.cgroup = text.clone(),
                "--uid" => p.uid = num()? as u32,
                "--gid" => p.gid = num()? as u32,
                "--cwd" => p.cwd = value.into(),
                "--timeout-ms" => p.timeout_ms = num()?,
                "--memory" => p.memory = num()?,
                "--processes" => p.processes = num()?,
                "--file-size" => p.file_size = num()?,
                "--open-files" => p.open_files = num()?,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if p.argv.is_empty() || p.root.as_os_str().is_empty() {
            return Err("usage: kiln-jail run|init --root DIR … -- PROGRAM ARGS…".into());
        }
        if p.uid == 0 || p.gid == 0 {
            return Err("refusing to run a job as root".into());
        }
        Ok(p)
    }

    fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            out.push(k.into());
            out.push(v);
        };
        push("--root", self.root.clone().into());
        push("--status", self.status.clone().into());
        push("--cgroup", self.cgroup.clone().into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        push("--cwd", self.cwd.clone().into());
        push("--timeout-ms", self.timeout_ms.to_string().into());
        push("--memory", self.memory.to_string().into());
        push("--processes", self.processes.to_string().into());
        push("--file-size", self.file_size.to_string().into());
        push("--open-files", self.open_files.to_string().into());
        out.push("--".into());
        out.extend(self.argv.iter().cloned());
        out
    }
}

/// The `kiln-jail` program.
pub fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let stage = args.next().unwrap_or_default();
    let params = match Params::parse(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kiln-jail: {e}");
            return ExitCode::from(2);
        }
    };
    match stage.to_str() {
        Some("run") => {
            let report = stage1(&params).unwrap_or_else(Report::Error);
            match fs::write(&params.status, report.line() + "\n") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kiln-jail: writing {}: {e}", params.status.display());
                    ExitCode::from(1)
                }
            }
        }
        Some("init") => {
            let e = stage2(&params);
            eprintln!("kiln-jail: {e}");
            ExitCode::from(SETUP_FAILED as u8)
        }
        _ => {
            eprintln!("kiln-jail: the first argument is `run` (the builder starts jobs with it)");
            ExitCode::from(2)
        }
    }
}

fn stage1(p: &Params) -> Result<Report, String> {
    let cgroups = join_cgroups(&p.cgroup, p.memory, p.processes);
    // A container's cgroups outlive its jobs (creating memory cgroups is slow): count this
    // job's OOM kills from here.
    let oom_before = cgroups.oom_kills();
    // The clock runs on its own thread, started before the pid namespace exists: after
    // unshare(CLONE_NEWPID) this process may not create threads any more.
    let (pid_tx, pid_rx) = std::sync::mpsc::channel::<nix::unistd::Pid>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let limit = Duration::from_millis(p.timeout_ms.max(1));
    let timer = std::thread::spawn(move || {
        let Ok(pid) = pid_rx.recv() else {
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
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(|e| format!("creating namespaces: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("finding kiln-jail: {e}"))?;
    let mut child = Command::new(exe)
        .arg("init")
        .args(p.to_args())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the jail's init: {e}"))?;
    let _ = pid_tx.send(nix::unistd::Pid::from_raw(child.id() as i32));
    let status = child.wait();
    let _ = done_tx.send(());
    let timed_out = timer.join().unwrap_or(false);
    let status = status.map_err(|e| format!("waiting for the job: {e}"))?;
    if let Some(code) = status.code() {
        if code == SETUP_FAILED {
            return Ok(Report::Error(
                "the jail could not start the command (its message is on stderr)".into(),
            ));
        }
        return Ok(Report::Exit(code));
    }
    let sig = status.signal().unwrap_or(0);
    let why = if timed_out {
        Some(format!("time limit ({} ms)", p.timeout_ms))
    } else if cgroups.oom_kills() > oom_before {
        Some("memory limit".to_string())
    } else if sig == Signal::SIGXCPU as i32 {
        Some("cpu time limit".to_string())
    } else if sig == Signal::SIGXFSZ as i32 {
        Some("file size limit".to_string())
    } else {
        None
    };
    Ok(Report::Signal(sig, why))
}

fn stage2(p: &Params) -> String {
    match enter(p) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn enter(p: &Params) -> Result<Never, String> {
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
    let root = &p.root;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        flags | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting /proc: {e}"))?;
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

    let limits = [
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_FSIZE, p.file_size),
        (Resource::RLIMIT_NOFILE, p.open_files),
        (Resource::RLIMIT_NPROC, p.processes),
        (Resource::RLIMIT_CPU, p.timeout_ms.div_ceil(1000) + 1),
    ];
    for (resource, value) in limits {
        setrlimit(resource, value, value).map_err(|e| format!("setrlimit {resource:?}: {e}"))?;
    }

    let (uid, gid) = (Uid::from_raw(p.uid), Gid::from_raw(p.gid));
    nix::unistd::setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    // Leaving uid 0 clears the permitted, effective and ambient capability sets.
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    // If stage 1 dies (the builder killed it), so does the whole namespace. Set after the
    // change of user, which clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| format!("pdeathsig: {e}"))?;
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    nix::unistd::chdir(&p.cwd).map_err(|e| format!("entering {}: {e}", p.cwd.display()))?;

    let err = Command::new(&p.argv[0]).args(&p.argv[1..]).exec();
    Err(format!("running {}: {err}", p.argv[0].to_string_lossy()))
}

/// The job's cgroups: memory and process limits where the kernel offers them. Best effort:
/// without cgroups the rlimits still bound processes, file sizes and CPU time.
struct Cgroups {
    dirs: Vec<PathBuf>,
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

fn join_cgroups(name: &str, memory: u64, processes: u64) -> Cgroups {
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
        let writes: Vec<(&str, String)> = if v2 {
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
            let _ = fs::write(dir.join(file), value);
        }
        if fs::write(dir.join("cgroup.procs"), &me).is_ok() {
            joined.push(dir);
        }
    }
    Cgroups { dirs: joined }
}

impl Cgroups {
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

/// Removes a container's cgroups (they are empty once its last job's stage 1 has exited).
pub fn remove_cgroups(name: &str) {
    for dir in cgroup_dirs(name) {
        let _ = fs::remove_dir(dir);
    }
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
    fn params_refuse_root_and_round_trip() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>().into_iter();
        let p = Params::parse(args(&[
            "--root", "/r", "--uid", "1000", "--gid", "1000", "--cwd", "/w", "--", "/bin/cc", "-c",
        ]))
        .unwrap();
        assert_eq!(
            p.argv,
            vec![OsString::from("/bin/cc"), OsString::from("-c")]
        );
        let again = Params::parse(p.to_args().into_iter()).unwrap();
        assert_eq!(again.to_args(), p.to_args());
        assert!(Params::parse(args(&[
            "--root", "/r", "--uid", "0", "--gid", "1", "--", "x"
        ]))
        .is_err());
        assert!(Params::parse(args(&["--root", "/r", "--uid", "5"])).is_err());
    }
}
