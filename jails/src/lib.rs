//! Jails for compile jobs: one read-only image per toolchain, one container per job, a pool of
//! ready containers per image, and recycling on background tasks.
//!
//! A [`Backend`] knows how to make images and containers and run a command in one; the
//! [`Pool`] owns the life cycle around it and is the same for every backend. Backends:
//! - [`linux`]: an overlay (the image read-only below, a size-capped tmpfs above) entered through
//!   new mount, pid, net, ipc and uts namespaces by the small `kiln-jail` helper program, which
//!   drops to an unprivileged uid with no capabilities and `no_new_privs` before it runs the
//!   compiler.
//!
//! - [`pot`]: FreeBSD jails driven through the pot CLI and `jexec` (tested against a simulator).
//!
//! Files going into a container and outputs coming out are handled by [`inroot`], which never
//! follows a link out of the container's root.
//!
//! This crate knows nothing of the scheduler, the client or the protocol's messages.

pub mod inroot;
#[cfg(target_os = "linux")]
pub mod linux;
#[cfg(not(target_os = "linux"))]
#[path = "elsewhere.rs"]
pub mod linux;
mod pool;
pub mod pot;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use pool::{Lease, Pool};

/// Resource limits for one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock time; the whole process tree is killed when it runs out.
    pub timeout: Duration,
    /// Memory of the job's processes together (a cgroup limit where cgroups are available).
    pub memory: u64,
    /// Processes and threads the job may have at once.
    pub processes: u32,
    /// Largest file the job may write.
    pub file_size: u64,
    pub open_files: u64,
    /// Everything the job writes, inputs and `/tmp` included (the container's upper layer).
    pub disk: u64,
    /// The most a toolchain archive may expand to when its image is made: a gzip bomb stops
    /// here, before it fills the disk.
    pub toolchain_unpacked: u64,
}

impl Limits {
    /// The unpacker's caps for a toolchain archive.
    pub fn archive(&self) -> kiln_archive::Limits {
        kiln_archive::Limits {
            max_bytes: self.toolchain_unpacked,
            ..kiln_archive::Limits::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            timeout: Duration::from_secs(600),
            memory: 4 << 30,
            processes: 256,
            file_size: 2 << 30,
            open_files: 4096,
            disk: 4 << 30,
            toolchain_unpacked: 4 << 30,
        }
    }
}

/// What to run in a container.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Absolute program path inside the jail, then its arguments.
    pub argv: Vec<String>,
    /// The whole environment of the command; nothing of the builder's leaks in.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The unprivileged user and group the command runs as.
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The exit status, or `None` when the command was killed.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when the jail killed the command: which limit it hit.
    pub killed: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

/// A jail operation that failed. Each says what it was doing and on what.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("unpacking the toolchain: {0}")]
    Archive(#[from] kiln_archive::ArchiveError),
    /// A path the job named is not usable inside the jail.
    #[error("path {path:?}: {why}")]
    Path { path: PathBuf, why: String },
    /// The jail helper could not set the job up.
    #[error("jail setup failed: {0}")]
    Setup(String),
    /// A command driving the jail (pot, jexec) failed.
    #[error("`{command}` exited with {status}: {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

impl JailError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
        let what = what.into();
        move |source| JailError::Io { what, source }
    }

    pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
        let what = what.into();
        move |source| JailError::Sys { what, source }
    }
}

/// A way of making images and containers. Every method blocks; the [`Pool`] calls them on
/// blocking tasks.
pub trait Backend: Send + Sync + 'static {
    /// A toolchain, unpacked once, that containers are made from.
    type Image: Send + Sync + 'static;
    /// One job's world.
    type Container: Send + Sync + 'static;

    /// Removes containers and images an earlier run of this builder left behind; returns how
    /// many it removed.
    fn cleanup_leftovers(&self) -> Result<usize, JailError>;
    /// Makes the image for a toolchain archive; `key` names it uniquely.
    fn make_image(&self, key: &str, archive: &Path) -> Result<Self::Image, JailError>;
    fn destroy_image(&self, image: &Self::Image) -> Result<(), JailError>;
    fn make_container(&self, image: &Self::Image) -> Result<Self::Container, JailError>;
    /// Where a job's inputs go before it runs, seen from the builder: the container's `/`,
    /// written through [`inroot`] below this path.
    fn root(&self, container: &Self::Container) -> PathBuf;
    /// Where the job's outputs are read after it ran, through [`inroot`]: the container's `/`
    /// unless the backend keeps what the job wrote apart.
    fn outputs(&self, container: &Self::Container) -> PathBuf {
        self.root(container)
    }
    /// Whether inputs may be hard links to the builder's own files. Only where the job cannot
    /// write through them (an overlay's lower layer); elsewhere they are copied.
    fn links_inputs(&self) -> bool {
        false
    }
    /// Whether a container's root keeps the last job's inputs through a reset, so the next job
    /// only places what differs ([`inroot::Placer::sync`]). Only where jobs cannot write that
    /// root (an overlay's lower layer).
    fn keeps_inputs(&self) -> bool {
        false
    }
    fn run(&self, container: &Self::Container, spec: &RunSpec) -> Result<Outcome, JailError>;
    /// Brings a used container back to the image's state, or fails (and the pool destroys it).
    fn reset(&self, container: &Self::Container, image: &Self::Image) -> Result<(), JailError>;
    fn destroy_container(&self, container: &Self::Container) -> Result<(), JailError>;
}
