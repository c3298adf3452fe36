//! The end-to-end test harness: real compilers, real files, the real `kiln` binary.
//!
//! Each [`Project`] is a fresh directory with its own cache and a clean environment (no
//! `KILN_*` variables leak in from the caller), so tests run in parallel without sharing state.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `kiln` binary of this workspace, built on first use so it is never stale.
pub fn kiln_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "kiln-client", "--bin", "kiln"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for the kiln binary");
        assert!(status.success(), "building kiln failed");
        // tests/target/... is not where the workspace builds: ask for the workspace's target dir.
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let bin = profile_dir.join("kiln");
        assert!(bin.exists(), "kiln binary not found at {}", bin.display());
        bin
    })
}

/// Fails the test with a clear message when a tool the test needs is not on PATH.
pub fn require(tool: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| {
        std::fs::metadata(d.join(tool))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    assert!(
        found,
        "{tool} is not installed: scripts/test.sh installs what the tests need"
    );
}

/// A scratch project with its own kiln cache.
#[derive(Debug)]
pub struct Project {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
    /// Extra environment for kiln runs.
    pub env: Vec<(String, String)>,
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

impl Project {
    pub fn new() -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = dir.path().join(".kiln-cache");
        Project {
            dir,
            cache,
            env: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file, creating its directory.
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    /// A command running in the project with a clean kiln environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("KILN_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("KILN_DIR", &self.cache)
            .env("HOME", self.dir.path())
            .env("LC_ALL", "C");
        cmd.env_remove("XDG_CONFIG_HOME")
            .env_remove("SOURCE_DATE_EPOCH");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `kiln <args>`.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command(kiln_bin())
            .args(args)
            .output()
            .expect("run kiln")
    }

    /// Runs the compiler directly.
    pub fn bare(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .expect("run compiler")
    }

    /// Compiles through kiln, then with the bare compiler, and asserts that `output` came out
    /// byte-identical both times.
    pub fn kiln_matches_bare(&self, args: &[&str], output: &str) {
        ok(&self.kiln(args));
        let cached = self.read(output);
        ok(&self.bare(args));
        assert_eq!(
            cached,
            self.read(output),
            "{output} from kiln differs from the compiler's ({args:?})"
        );
    }

    /// `kiln stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.kiln(&["stats", "--json"]);
        assert!(
            out.status.success(),
            "kiln stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    pub fn stat(&self, name: &str) -> i64 {
        let s = self.stats();
        s[name]
            .as_i64()
            .unwrap_or_else(|| panic!("no stat {name} in {s}"))
    }

    pub fn reason(&self, name: &str) -> i64 {
        self.stats()["uncacheable_by_reason"][name]
            .as_i64()
            .unwrap_or(0)
    }

    /// The cache's entry files of one kind (`R` results, `M` manifests).
    pub fn entries(&self, kind: char) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(shards) = std::fs::read_dir(&self.cache) else {
            return out;
        };
        for shard in shards.flatten() {
            let Ok(subs) = std::fs::read_dir(shard.path()) else {
                continue;
            };
            for sub in subs.flatten() {
                let Ok(files) = std::fs::read_dir(sub.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.len() == 63 && name.ends_with(kind) {
                        out.push(f.path());
                    }
                }
            }
        }
        out
    }
}

/// Asserts a command succeeded, showing its stderr otherwise.
pub fn ok(out: &Output) -> &Output {
    assert!(
        out.status.success(),
        "command failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// File timestamps are coarse, and kiln refuses to store a result whose inputs changed within
/// a short margin of the compile (they may have changed during it). Tests that edit a file and
/// then expect it to be cached wait this long first.
pub fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(150));
}

/// A tmpfs of a fixed size mounted for the life of the value (needs root, as CI has).
#[derive(Debug)]
pub struct TinyDisk {
    pub path: PathBuf,
}

impl TinyDisk {
    pub fn mount(path: PathBuf, size: &str) -> TinyDisk {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyDisk { path }
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
