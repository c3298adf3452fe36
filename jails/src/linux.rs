//! The Linux backend: overlayfs containers entered through namespaces.
//!
//! Layout under the work directory:
//! - `images/<key>`: an unpacked toolchain, never written after it is made (the overlay's
//!   lowest layer; overlayfs forbids changing a mounted lower layer);
//! - `inputs/<id>`: a container's next job's inputs, placed by the builder (as hard links to
//!   its store where it can), the overlay's upper lower layer;
//! - `containers/<id>`: a size-capped tmpfs holding `upper/` and `work/`, what the job
//!   writes, and `root/`, where the overlay is mounted inside the jail.
//!
//! A container is *primed* when it is made and after every reset: the `kiln-jail` helper (see
//! [`helper`]) is started, joins the container's cgroups, enters new pid, net, ipc, uts and
//! mount namespaces, and waits for a job on its stdin. A job then costs only what cannot be
//! done ahead: the overlay mount, `/proc` and `/dev`, `pivot_root`, dropping to the job's uid,
//! and `exec`. The overlay lives in the jail's mount namespace only, so it is gone when the job
//! is; the builder reads the outputs from `upper/`. Resetting a container is remounting its
//! tmpfs and priming it again, on a background task. The inputs directory is kept: no job can
//! write it, and the next job's placement changes only what differs. The builder
//! itself only mounts and unmounts tmpfs; nothing untrusted ever runs in its process.

pub mod helper;
mod seccomp;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{Backend, JailError, Limits, Outcome, RunSpec};

/// The work directory's parts: see the module docs.
const SUBDIRS: [&str; 4] = ["images", "containers", "inputs", "status"];

/// Compiler output kept per stream; the rest is dropped and the truncation noted.
const MAX_STREAM: usize = 16 << 20;

/// The Linux namespace backend.
#[derive(Debug)]
pub struct LinuxJail {
    work: PathBuf,
    helper: PathBuf,
    limits: Limits,
    /// In a user namespace of an ordinary user (see [`enter_user_namespace`]), not root.
    rootless: bool,
}

/// Names containers and temporary images uniquely within this process (the pid covers other
/// processes), across every backend instance.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// An unpacked toolchain.
#[derive(Debug)]
pub struct Image {
    dir: PathBuf,
}

/// One container: a tmpfs with the job's layer, an inputs directory, and a primed helper.
#[derive(Debug)]
pub struct Container {
    dir: PathBuf,
    inputs: PathBuf,
    image: PathBuf,
    /// Where the helper writes how the job ended: on the builder's disk, not in the tmpfs the
    /// job can fill.
    status: PathBuf,
    /// The helper waiting for this container's next job.
    primed: std::sync::Mutex<Option<std::process::Child>>,
    /// The helper of the job running in it, so a reset can stop a job its builder gave up on.
    running: std::sync::Mutex<Option<u32>>,
}

impl Container {
    /// Kills the job still running here, if any: its helper's death takes the jail's init, and
    /// so every process of the job, with it. A primed helper is stopped and reaped.
    fn stop_job(&self) {
        let pid = *self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let primed = self.primed.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = primed {
            // Closing its stdin ends it quietly; the kill makes sure.
            drop(child.stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// Removes the helper's reports of the last job (stage 1's and its init's).
    fn remove_reports(&self) {
        let mut init = self.status.clone().into_os_string();
        init.push(".init");
        let _ = fs::remove_file(&self.status);
        let _ = fs::remove_file(init);
    }
}

impl LinuxJail {
    /// A backend keeping its images and containers under `work` and entering jails through the
    /// `kiln-jail` program at `helper`. `limits.disk` caps each container's writes.
    pub fn new(work: &Path, helper: &Path, limits: Limits) -> Result<LinuxJail, JailError> {
        // overlayfs mount options are comma- and colon-separated: a work directory containing
        // either could not be expressed.
        let text = work.to_string_lossy();
        if text.contains(',') || text.contains(':') || !work.is_absolute() {
            return Err(JailError::Path {
                path: work.to_path_buf(),
                why: "the work directory must be an absolute path without ',' or ':'".into(),
            });
        }
        if !helper.is_file() {
            return Err(JailError::Path {
                path: helper.to_path_buf(),
                why: "the kiln-jail helper program is not there (install it beside kiln-builder, \
                      or name it with --jail-helper)"
                    .into(),
            });
        }
        for sub in SUBDIRS {
            fs::create_dir_all(work.join(sub)).map_err(JailError::io(format!(
                "creating {}",
                work.join(sub).display()
            )))?;
        }
        Ok(LinuxJail {
            work: work.to_path_buf(),
            helper: helper.to_path_buf(),
            limits,
            rootless: !is_real_root(),
        })
    }

    /// Whether this builder runs without root, in a user namespace of its own.
    pub fn rootless(&self) -> bool {
        self.rootless
    }

    /// The owner of what the builder makes for the job in `uid` (its working directory): the
    /// job's own uid, or on a rootless builder the builder's own ids, which are the only ones
    /// mapped and which the job's user namespace maps to the job's.
    pub fn owner(&self, uid: u32) -> (u32, u32) {
        if self.rootless {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        } else {
            (uid, uid)
        }
    }

    fn mount_container(&self, c: &Container) -> Result<(), JailError> {
        let size = format!("size={},mode=0755", self.limits.disk);
        mount(
            Some("kiln"),
            &c.dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(size.as_str()),
        )
        .map_err(JailError::sys(format!(
            "mounting a tmpfs on {}",
            c.dir.display()
        )))?;
        for sub in ["upper", "work", "root"] {
            fs::create_dir(c.dir.join(sub))
                .map_err(JailError::io(format!("creating {}/{sub}", c.dir.display())))?;
        }
        Ok(())
    }

    /// Starts the helper that waits for `c`'s next job (see [`helper`]).
    fn prime(&self, c: &Container) -> Result<(), JailError> {
        let setup = helper::Setup {
            root: c.dir.join("root"),
            lower: vec![c.inputs.clone(), c.image.clone()],
            upper: c.upper(),
            work: c.dir.join("work"),
            status: c.status.clone(),
            cgroup: c
                .dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        };
        // The door to the jail helper, which runs each job.
        #[allow(clippy::disallowed_methods)]
        let child = Command::new(&self.helper)
            .arg("run")
            .args(setup.to_args())
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(JailError::io(format!("starting {}", self.helper.display())))?;
        *c.primed.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    /// Whether the job used up its layer (bytes or inodes), so that its failure is the disk
    /// limit's.
    fn layer_full(&self, c: &Container) -> bool {
        let Ok(st) = nix::sys::statvfs::statvfs(&c.dir) else {
            return false;
        };
        let free = st.blocks_available() * st.fragment_size();
        // A write that fails for want of room leaves less than a page or so behind.
        free < 64 << 10 || st.files_available() == 0
    }

    fn unmount_container(&self, c: &Container) -> Result<(), JailError> {
        for target in [&c.dir] {
            match umount2(target, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(e) => {
                    return Err(JailError::Sys {
                        what: format!("unmounting {}", target.display()),
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Whether this process is root in the host's user namespace (not merely in one of its own).
pub fn is_real_root() -> bool {
    nix::unistd::geteuid().is_root()
        && fs::read_to_string("/proc/self/uid_map")
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}

/// For a builder started by an ordinary user: a user namespace in which that user is root, so
/// the builder can mount its containers' tmpfs and overlays and make the jobs' namespaces
/// (kernels from 5.11 allow overlayfs there). Only the user's own ids are mapped, so every job
/// runs as that user on the host, in a user namespace of its own in which it has no
/// capabilities. Call it before starting threads, then [`private_mounts`].
pub fn enter_user_namespace() -> Result<(), JailError> {
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(JailError::sys("creating a user namespace (are unprivileged user namespaces allowed? see user.max_user_namespaces)"))?;
    let write = |file: &str, text: String| {
        fs::write(Path::new("/proc/self").join(file), text)
            .map_err(JailError::io(format!("writing /proc/self/{file}")))
    };
    write("uid_map", format!("0 {uid} 1\n"))?;
    write("setgroups", "deny\n".into())?;
    write("gid_map", format!("0 {gid} 1\n"))
}

/// Gives the calling process a mount namespace of its own, with every mount private, so the
/// containers it mounts are invisible to the host and vanish when it exits. Call it before
/// starting threads: the kernel refuses to unshare mounts in a threaded process.
pub fn private_mounts() -> Result<(), JailError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(JailError::sys("creating a private mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(JailError::sys("making mounts private"))
}

/// Mount points under `dir`, deepest first, read from the kernel's table.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn unescape_mountinfo(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (bytes[i], octal) {
            out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Backend for LinuxJail {
    type Image = Image;
    type Container = Container;

    fn cleanup_leftovers(&self) -> Result<usize, JailError> {
        let mut removed = helper::remove_stale_cgroups();
        for target in mounts_below(&self.work) {
            if umount2(&target, MntFlags::MNT_DETACH).is_ok() {
                removed += 1;
            }
        }
        for sub in SUBDIRS {
            let dir = self.work.join(sub);
            let entries =
                fs::read_dir(&dir).map_err(JailError::io(format!("listing {}", dir.display())))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let gone = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&path)
                } else {
                    // The helpers' reports.
                    fs::remove_file(&path)
                };
                gone.map_err(JailError::io(format!("removing {}", path.display())))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn make_image(&self, key: &str, archive: &Path) -> Result<Image, JailError> {
        let dir = self.work.join("images").join(key);
        let tmp = self.work.join("images").join(format!(
            ".{key}.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = fs::File::open(archive)
            .map_err(JailError::io(format!("opening {}", archive.display())))?;
        let unpacked =
            kiln_archive::unpack(std::io::BufReader::new(file), &tmp, &self.limits.archive());
        if let Err(e) = unpacked {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        // Mount points the helper needs, and /tmp; real directories in the image, so nothing is
        // created in the job's upper layer before the job starts. /tmp is the container's own
        // (inside its size cap), not a mount: inputs may live under /tmp on the client.
        for sub in ["proc", "dev", "tmp"] {
            let path = tmp.join(sub);
            if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                let _ = fs::remove_dir_all(&tmp);
                return Err(JailError::Setup(format!(
                    "the toolchain archive has /{sub} and it is not a directory"
                )));
            }
            fs::create_dir_all(&path)
                .map_err(JailError::io(format!("creating {}", path.display())))?;
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(tmp.join("tmp"), fs::Permissions::from_mode(0o1777))
            .map_err(JailError::io("making /tmp writable"))?;
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .map_err(JailError::io(format!("replacing {}", dir.display())))?;
        }
        fs::rename(&tmp, &dir)
            .map_err(JailError::io(format!("renaming into {}", dir.display())))?;
        Ok(Image { dir })
    }

    fn destroy_image(&self, image: &Image) -> Result<(), JailError> {
        fs::remove_dir_all(&image.dir)
            .map_err(JailError::io(format!("removing {}", image.dir.display())))
    }

    fn make_container(&self, image: &Image) -> Result<Container, JailError> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.work.join("containers").join(&id);
        let inputs = self.work.join("inputs").join(&id);
        for d in [&dir, &inputs] {
            fs::create_dir(d).map_err(JailError::io(format!("creating {}", d.display())))?;
        }
        let container = Container {
            status: self.work.join("status").join(&id),
            dir,
            inputs,
            image: image.dir.clone(),
            primed: std::sync::Mutex::new(None),
            running: std::sync::Mutex::new(None),
        };
        if let Err(e) = self
            .mount_container(&container)
            .and_then(|()| self.prime(&container))
        {
            let _ = self.destroy_container(&container);
            return Err(e);
        }
        Ok(container)
    }

    fn root(&self, container: &Container) -> PathBuf {
        container.inputs.clone()
    }

    fn outputs(&self, container: &Container) -> PathBuf {
        container.upper()
    }

    fn links_inputs(&self) -> bool {
        true
    }

    fn keeps_inputs(&self) -> bool {
        true
    }

    fn run(&self, container: &Container, spec: &RunSpec) -> Result<Outcome, JailError> {
        let limits = spec.limits;
        // Encoded first: a job that cannot be sent leaves the container primed.
        let words = helper::Job {
            uid: spec.uid,
            gid: spec.gid,
            cwd: spec.cwd.clone(),
            timeout_ms: limits.timeout.as_millis() as u64,
            memory: limits.memory,
            processes: u64::from(limits.processes),
            file_size: limits.file_size,
            open_files: limits.open_files,
            address_space: 0,
            userns: self.rootless,
            env: spec
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}").into())
                .collect(),
            argv: spec.argv.iter().map(Into::into).collect(),
        }
        .to_words()
        .map_err(JailError::Setup)?;
        let status_file = &container.status;
        let _ = fs::remove_file(status_file);
        let primed = container
            .primed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // A second job in one container (no reset between) primes it again here.
        let mut child = match primed {
            Some(child) => child,
            None => {
                self.prime(container)?;
                container
                    .primed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .ok_or_else(|| JailError::Setup("the container was not primed".into()))?
            }
        };
        let started = Instant::now();
        *container.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(child.id());
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            // A helper that died while primed has closed its end; its report says why.
            let _ = stdin.write_all(&words);
        }
        let out = child
            .stdout
            .take()
            .map(|s| std::thread::spawn(move || drain(s)));
        let err = child
            .stderr
            .take()
            .map(|s| std::thread::spawn(move || drain(s)));
        let status = child.wait();
        *container.running.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let status = status.map_err(JailError::io("waiting for the jail helper"))?;
        let elapsed = started.elapsed();
        let stdout = out.and_then(|t| t.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|t| t.join().ok()).unwrap_or_default();
        let report = fs::read_to_string(status_file).unwrap_or_default();
        let mut outcome = Outcome {
            stdout,
            stderr,
            elapsed,
            ..Outcome::default()
        };
        match helper::Report::parse(&report) {
            Some(helper::Report::Exit(code)) => {
                outcome.exit_code = Some(code);
                // A job that filled its layer failed for that reason, whatever the compiler
                // made of the error: say which limit it was.
                if code != 0 && self.layer_full(container) {
                    outcome.killed = Some(format!("disk limit ({} bytes)", self.limits.disk));
                }
            }
            Some(helper::Report::Signal(sig, killed)) => {
                outcome.signal = Some(sig);
                outcome.killed = killed;
            }
            Some(helper::Report::Error(msg)) => return Err(JailError::Setup(msg)),
            None => {
                return Err(JailError::Setup(format!(
                    "the jail helper ended ({status}) without a report; stderr: {}",
                    String::from_utf8_lossy(&outcome.stderr)
                )))
            }
        }
        Ok(outcome)
    }

    fn reset(&self, container: &Container, _image: &Image) -> Result<(), JailError> {
        container.stop_job();
        self.unmount_container(container)?;
        container.remove_reports();
        for sub in ["upper", "work", "root", "lower"] {
            let path = container.dir.join(sub);
            if path.is_dir() {
                let _ = fs::remove_dir(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
        // The inputs stay: the next job's placement keeps what it shares with this one.
        self.mount_container(container)?;
        self.prime(container)
    }

    fn destroy_container(&self, container: &Container) -> Result<(), JailError> {
        container.stop_job();
        self.unmount_container(container)?;
        if let Some(name) = container.dir.file_name().and_then(|n| n.to_str()) {
            helper::remove_cgroups(name);
        }
        container.remove_reports();
        let _ = fs::remove_dir_all(&container.inputs);
        fs::remove_dir_all(&container.dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(JailError::io(format!(
                "removing {}",
                container.dir.display()
            )))
    }
}

/// Reads a stream to its end, keeping at most [`MAX_STREAM`] bytes.
fn drain(mut stream: impl Read) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 64 << 10];
    let mut dropped = 0usize;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_STREAM.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
                dropped += n - room;
            }
        }
    }
    if dropped > 0 {
        kept.extend_from_slice(
            format!("\n[kiln: {dropped} more bytes of output dropped]\n").as_bytes(),
        );
    }
    kept
}
