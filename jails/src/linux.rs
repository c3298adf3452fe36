//! The Linux backend: overlayfs containers entered through namespaces.
//!
//! Layout under the work directory:
//! - `images/<key>`: an unpacked toolchain, never written after it is made (the overlay's lower
//!   layer; overlayfs forbids changing a mounted lower layer);
//! - `containers/<id>`: a size-capped tmpfs holding `upper/` and `work/`, with the overlay
//!   mounted on `root/`. Resetting a container is unmounting both and mounting them again, which
//!   costs a few milliseconds and happens on a background task.
//!
//! A job runs through the `kiln-jail` helper program (see [`helper`]), which enters new mount,
//! pid, net, ipc and uts namespaces, pivots into `root/`, and drops to the job's uid. The builder
//! itself only mounts and unmounts; nothing untrusted ever runs in its process.

pub mod helper;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{Backend, JailError, Limits, Outcome, RunSpec};

/// Compiler output kept per stream; the rest is dropped and the truncation noted.
const MAX_STREAM: usize = 16 << 20;

/// The Linux namespace backend.
#[derive(Debug)]
pub struct LinuxJail {
    work: PathBuf,
    helper: PathBuf,
    limits: Limits,
}

/// Names containers and temporary images uniquely within this process (the pid covers other
/// processes), across every backend instance.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// An unpacked toolchain.
#[derive(Debug)]
pub struct Image {
    dir: PathBuf,
}

/// One container: a tmpfs with the overlay on `root/`.
#[derive(Debug)]
pub struct Container {
    dir: PathBuf,
    root: PathBuf,
    /// The helper of the job running in it, so a reset can stop a job its builder gave up on.
    running: std::sync::Mutex<Option<u32>>,
}

impl Container {
    /// Kills the job still running here, if any: its helper's death takes the jail's init, and
    /// so every process of the job, with it.
    fn stop_job(&self) {
        let pid = *self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
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
        for sub in ["images", "containers"] {
            fs::create_dir_all(work.join(sub)).map_err(JailError::io(format!(
                "creating {}",
                work.join(sub).display()
            )))?;
        }
        Ok(LinuxJail {
            work: work.to_path_buf(),
            helper: helper.to_path_buf(),
            limits,
        })
    }

    fn mount_container(&self, image: &Image, c: &Container) -> Result<(), JailError> {
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
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            image.dir.display(),
            c.dir.join("upper").display(),
            c.dir.join("work").display()
        );
        mount(
            Some("overlay"),
            &c.root,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(JailError::sys(format!(
            "mounting the overlay on {}",
            c.root.display()
        )))
    }

    fn unmount_container(&self, c: &Container) -> Result<(), JailError> {
        for target in [&c.root, &c.dir] {
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
        let mut removed = 0;
        for target in mounts_below(&self.work) {
            if umount2(&target, MntFlags::MNT_DETACH).is_ok() {
                removed += 1;
            }
        }
        for sub in ["images", "containers"] {
            let dir = self.work.join(sub);
            let entries =
                fs::read_dir(&dir).map_err(JailError::io(format!("listing {}", dir.display())))?;
            for entry in entries.flatten() {
                fs::remove_dir_all(entry.path()).map_err(JailError::io(format!(
                    "removing {}",
                    entry.path().display()
                )))?;
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
        let unpacked = kiln_proto::archive::unpack(
            std::io::BufReader::new(file),
            &tmp,
            &kiln_proto::archive::Limits::default(),
        );
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
        let dir = self.work.join("containers").join(id);
        fs::create_dir(&dir).map_err(JailError::io(format!("creating {}", dir.display())))?;
        let container = Container {
            root: dir.join("root"),
            dir,
            running: std::sync::Mutex::new(None),
        };
        if let Err(e) = self.mount_container(image, &container) {
            let _ = self.destroy_container(&container);
            return Err(e);
        }
        Ok(container)
    }

    fn root(&self, container: &Container) -> PathBuf {
        container.root.clone()
    }

    fn run(&self, container: &Container, spec: &RunSpec) -> Result<Outcome, JailError> {
        let status_file = container.dir.join("status");
        let _ = fs::remove_file(&status_file);
        let limits = spec.limits;
        let mut cmd = Command::new(&self.helper);
        cmd.arg("run")
            .arg("--root")
            .arg(&container.root)
            .arg("--status")
            .arg(&status_file)
            .arg("--cgroup")
            .arg(container.dir.file_name().unwrap_or_default())
            .args([
                "--uid",
                &spec.uid.to_string(),
                "--gid",
                &spec.gid.to_string(),
            ])
            .arg("--cwd")
            .arg(&spec.cwd)
            .args(["--timeout-ms", &limits.timeout.as_millis().to_string()])
            .args(["--memory", &limits.memory.to_string()])
            .args(["--processes", &limits.processes.to_string()])
            .args(["--file-size", &limits.file_size.to_string()])
            .args(["--open-files", &limits.open_files.to_string()])
            .arg("--")
            .args(&spec.argv)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(JailError::io(format!("starting {}", self.helper.display())))?;
        *container.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(child.id());
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
        let report = fs::read_to_string(&status_file).unwrap_or_default();
        let mut outcome = Outcome {
            stdout,
            stderr,
            elapsed,
            ..Outcome::default()
        };
        match helper::Report::parse(&report) {
            Some(helper::Report::Exit(code)) => outcome.exit_code = Some(code),
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

    fn reset(&self, container: &Container, image: &Image) -> Result<(), JailError> {
        container.stop_job();
        self.unmount_container(container)?;
        for sub in ["upper", "work", "root", "status"] {
            let path = container.dir.join(sub);
            if path.is_dir() {
                let _ = fs::remove_dir(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
        self.mount_container(image, container)
    }

    fn destroy_container(&self, container: &Container) -> Result<(), JailError> {
        container.stop_job();
        self.unmount_container(container)?;
        if let Some(name) = container.dir.file_name().and_then(|n| n.to_str()) {
            helper::remove_cgroups(name);
        }
        let _ = fs::remove_file(container.dir.join("status"));
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
