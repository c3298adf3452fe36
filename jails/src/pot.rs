//! The FreeBSD backend: jails managed by `pot`, over ZFS clones.
//!
//! - **Image** (once per toolchain): `pot clone` of the operator's template pot, the toolchain
//!   unpacked into `<fs_root>/jails/<image>/m` over the template's system, then
//!   `pot snapshot`. The image is never started.
//! - **Container**: `pot clone` of the image, `pot snapshot` (the state every reset returns
//!   to), `pot start`, and the rctl limits on the jail (`jail:<name>:memoryuse`, `maxproc`,
//!   `openfiles`), which the kernel keeps by jail name across restarts.
//! - **Job**: the builder writes the inputs and reads the outputs under [`PotJail::root`]
//!   through [`crate::inroot`]; the command runs through
//!   `jexec -U <user> <pot> /bin/sh -c 'cd "$1" … exec "$@"' sh CWD /usr/bin/env -i K=V… ARGV…`.
//!   The shell changes to the working directory portably (`jexec -d` is recent) and writes a
//!   marker to stderr once it is in the jail and in that directory, so a failure of jexec
//!   itself is told apart from the compiler's own exit status. `env -i` then gives the command
//!   exactly the job's variables: it comes after the `cd` because sh exports `PWD` and `OLDPWD`,
//!   and `jexec -l` is not used because it adds the login class's `HOME`, `PATH`, `TERM`…
//!   The wall-clock limit is enforced here: at the limit the jexec process group is killed,
//!   then `pot stop` ends whatever else runs in the jail.
//! - **Reset** (on the pool's background tasks): `pot stop`, `pot revert`, `pot start`. A
//!   failure goes back to the pool, which destroys the container (`pot destroy -F`).
//!
//! pot keeps shell state per pot and is not safe to drive concurrently (bsdpot/pot#152, #202,
//! #215): every operation on one pot holds that pot's lock, and `clone`, `destroy` and `ls`,
//! which read or change other pots' state (a clone rewrites its base's `fscomp.conf`; a destroy
//! scans every pot's configuration), also hold one global lock. Starts, stops, reverts and
//! runs of different containers proceed in parallel.
//!
//! pot names snapshots by `date +%s` and ignores a failed `zfs snapshot`, so a second snapshot
//! of one pot within the same second would be lost without a word, and `revert` would go back
//! to the older one. pot has no option to name a snapshot; this backend never asks for two
//! snapshots of one pot within one second (it waits for the next second).
//!
//! Every command goes through [`CommandRunner`]; a failure becomes [`JailError::Command`] with
//! the command, its status and its stderr (pot prints its own `###>` errors on stdout, so that
//! is used when stderr is empty).
//!
//! Portability: this module is plain `std` and POSIX, and [`crate::inroot`], which the builder
//! uses on [`PotJail::root`], resolves paths with `O_RESOLVE_BENEATH` on FreeBSD (13 and later).
//! The crate type-checks for FreeBSD; it has not run there.

pub mod command;
mod toolchain;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use command::{CommandRunner, Output, Status, SystemRunner};

use crate::{Backend, JailError, Limits, Outcome, RunSpec};

/// Written to stderr by the job's shell once it is in the jail and in the working directory;
/// removed from the job's stderr.
const ENTERED: &str = "kiln-pot: in the jail\n";

/// The shell that starts a job: `$1` is the working directory, the rest the command.
const START: &str = r#"cd "$1" || exit 1; printf 'kiln-pot: in the jail\n' >&2; shift; exec "$@""#;

/// Where pot and jails live, and how kiln uses them. The defaults match a stock pot
/// installation and docs/freebsd.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PotConfig {
    /// The `pot` program.
    pub pot: PathBuf,
    /// The `jexec` program.
    pub jexec: PathBuf,
    /// The `rctl` program that applies the memory, process and open-file limits to each
    /// container; `None` leaves limits to the template (the kernel needs `kern.racct.enable=1`).
    pub rctl: Option<PathBuf>,
    /// The pot every image is cloned from: a FreeBSD base with the jail user, snapshotted.
    pub template: String,
    /// pot's `POT_FS_ROOT`: a pot's root is `<fs_root>/jails/<name>/m`.
    pub fs_root: PathBuf,
    /// Extra arguments for every `pot clone` (network type, DNS…).
    pub clone_args: Vec<String>,
    /// Names of kiln's pots start with this; pots with it left by an earlier run are destroyed
    /// at start-up. One prefix per builder on a host.
    pub prefix: String,
    /// The unprivileged user (in the template's `/etc/passwd`) that runs every job.
    pub user: String,
    /// The longest a `pot` or `rctl` command may take before it is killed.
    pub command_timeout: Duration,
}

impl Default for PotConfig {
    fn default() -> PotConfig {
        PotConfig {
            pot: "pot".into(),
            jexec: "jexec".into(),
            rctl: Some("rctl".into()),
            template: "kiln-template".into(),
            fs_root: "/opt/pot".into(),
            clone_args: Vec::new(),
            prefix: "kiln-".into(),
            user: "kiln".into(),
            command_timeout: Duration::from_secs(300),
        }
    }
}

/// The user jobs run as, read from the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// A toolchain image: a pot that is never started.
#[derive(Debug)]
pub struct Image {
    name: String,
}

impl Image {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One container: a running pot cloned from an image.
#[derive(Debug)]
pub struct Container {
    name: String,
    image: String,
}

impl Container {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What this process knows about one pot, behind that pot's lock.
#[derive(Debug, Default)]
struct PotState {
    /// The epoch second by which the last snapshot was taken.
    last_snapshot: Option<u64>,
}

/// The FreeBSD pot backend.
#[derive(Debug)]
pub struct PotJail {
    config: PotConfig,
    limits: Limits,
    user: JailUser,
    runner: Arc<dyn CommandRunner>,
    next: AtomicU64,
    /// Held by operations that read or change other pots' state (clone, destroy, ls).
    global: Mutex<()>,
    pots: Mutex<HashMap<String, Arc<Mutex<PotState>>>>,
    /// Containers alive per image: an image goes only after them.
    children: Mutex<HashMap<String, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state behind these locks stays consistent between commands; carry on after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn epoch_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A name pot, jail(8) and ZFS all accept: letters, digits, `-` and `_`, not starting with `-`.
fn plain_name(text: &str) -> bool {
    !text.is_empty()
        && !text.starts_with('-')
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl PotJail {
    /// A backend driving the real `pot`, `jexec` and `rctl`.
    pub fn new(config: PotConfig, limits: Limits) -> Result<PotJail, JailError> {
        PotJail::with_runner(config, limits, Arc::new(SystemRunner))
    }

    /// A backend whose commands go through `runner`. Checks the configuration and reads the
    /// jail user from the template's `/etc/passwd`.
    pub fn with_runner(
        config: PotConfig,
        limits: Limits,
        runner: Arc<dyn CommandRunner>,
    ) -> Result<PotJail, JailError> {
        let bad = |what: &str, value: &str| {
            JailError::Setup(format!(
                "pot {what} {value:?}: use letters, digits, '-' and '_' only"
            ))
        };
        if !plain_name(&config.prefix) {
            return Err(bad("name prefix", &config.prefix));
        }
        if !plain_name(&config.template) {
            return Err(bad("template", &config.template));
        }
        if !plain_name(&config.user) {
            return Err(bad("jail user", &config.user));
        }
        let ours = [
            format!("{}image-", config.prefix),
            format!("{}job-", config.prefix),
        ];
        if ours.iter().any(|p| config.template.starts_with(p)) {
            return Err(JailError::Setup(format!(
                "the template {:?} is named like kiln's own pots (prefix {:?}), which are \
                 destroyed at start-up: rename it or choose another prefix",
                config.template, config.prefix
            )));
        }
        let template_root = config
            .fs_root
            .join("jails")
            .join(&config.template)
            .join("m");
        if !template_root.is_dir() {
            return Err(JailError::Path {
                path: template_root,
                why: "the template pot's root is not there: create the template as \
                      docs/freebsd.md shows, or name it (--pot-template) and pot's \
                      POT_FS_ROOT (--pot-fs-root)"
                    .into(),
            });
        }
        let user = read_user(&template_root, &config.user)?;
        Ok(PotJail {
            config,
            limits,
            user,
            runner,
            next: AtomicU64::new(0),
            global: Mutex::new(()),
            pots: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &PotConfig {
        &self.config
    }

    /// The user every job runs as; the builder gives the job's directories to its uid.
    pub fn user(&self) -> &JailUser {
        &self.user
    }

    /// The root of pot `name`, seen from the builder.
    pub fn root_of(&self, name: &str) -> PathBuf {
        self.config.fs_root.join("jails").join(name).join("m")
    }

    fn new_name(&self, kind: &str, key: Option<&str>) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        match key {
            Some(key) => {
                let short: String = key
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric())
                    .take(12)
                    .collect();
                format!("{}{kind}-{short}-{pid}-{n}", self.config.prefix)
            }
            None => format!("{}{kind}-{pid}-{n}", self.config.prefix),
        }
    }

    fn is_ours(&self, name: &str) -> Option<&'static str> {
        let prefix = &self.config.prefix;
        if name == self.config.template {
            None
        } else if name.starts_with(&format!("{prefix}job-")) {
            Some("job")
        } else if name.starts_with(&format!("{prefix}image-")) {
            Some("image")
        } else {
            None
        }
    }

    fn pot_cell(&self, name: &str) -> Arc<Mutex<PotState>> {
        lock(&self.pots)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn forget(&self, name: &str) {
        lock(&self.pots).remove(name);
    }

    /// Runs `argv`; an error unless it exits 0.
    fn checked(&self, argv: Vec<String>) -> Result<Output, JailError> {
        let out = self
            .runner
            .run(&argv, Some(self.config.command_timeout))
            .map_err(|e| JailError::Io {
                what: format!("running {}", command::render(&argv)),
                source: e,
            })?;
        if out.success() {
            Ok(out)
        } else {
            Err(command_error(&argv, &out))
        }
    }

    fn pot(&self, args: &[&str]) -> Result<Output, JailError> {
        let mut argv = vec![self.config.pot.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|s| s.to_string()));
        self.checked(argv)
    }

    /// `pot clone -p NEW -P BASE <clone args>`, holding the global lock and both pots' locks.
    fn clone_pot(&self, new: &str, base: &str) -> Result<(), JailError> {
        let _global = lock(&self.global);
        let (first, second) = if base < new { (base, new) } else { (new, base) };
        let (a, b) = (self.pot_cell(first), self.pot_cell(second));
        let _a = lock(&a);
        let _b = lock(&b);
        let mut args = vec!["clone", "-p", new, "-P", base];
        args.extend(self.config.clone_args.iter().map(String::as_str));
        self.pot(&args).map(drop)
    }

    /// `pot snapshot -p NAME`, never twice within one second (pot names snapshots by the
    /// second and silently keeps the first of two).
    fn snapshot_locked(&self, name: &str, state: &mut PotState) -> Result<(), JailError> {
        while state.last_snapshot >= Some(epoch_secs()) {
            let into_second = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(Duration::ZERO, |d| {
                    Duration::from_nanos(d.subsec_nanos().into())
                });
            std::thread::sleep(Duration::from_secs(1).saturating_sub(into_second));
        }
        let done = self.pot(&["snapshot", "-p", name]);
        // pot's `date +%s` ran before this instant: the next snapshot waits until it is past.
        state.last_snapshot = Some(epoch_secs());
        done.map(drop)
    }

    fn destroy_pot(&self, name: &str) -> Result<(), JailError> {
        {
            let _global = lock(&self.global);
            let cell = self.pot_cell(name);
            let _pot = lock(&cell);
            self.pot(&["destroy", "-F", "-p", name])?;
        }
        self.forget(name);
        Ok(())
    }

    /// Applies the resource limits to a container's jail.
    fn apply_limits(&self, name: &str) -> Result<(), JailError> {
        let Some(rctl) = &self.config.rctl else {
            return Ok(());
        };
        let rules = [
            ("memoryuse", self.limits.memory),
            ("maxproc", u64::from(self.limits.processes)),
            ("openfiles", self.limits.open_files),
        ];
        for (resource, amount) in rules {
            let argv = vec![
                rctl.to_string_lossy().into_owned(),
                "-a".into(),
                format!("jail:{name}:{resource}:deny={amount}"),
            ];
            if let Err(e) = self.checked(argv) {
                tracing::warn!(
                    "rctl refused a limit; is kern.racct.enable=1 set in /boot/loader.conf \
                     (docs/freebsd.md)?"
                );
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes a container's rctl rules, which the kernel keeps after the jail is gone.
    fn remove_limits(&self, name: &str) {
        let Some(rctl) = &self.config.rctl else {
            return;
        };
        let argv = vec![
            rctl.to_string_lossy().into_owned(),
            "-r".into(),
            format!("jail:{name}"),
        ];
        if let Err(e) = self.checked(argv) {
            tracing::warn!(error = %e, pot = name, "removing a container's rctl rules failed");
        }
    }

    fn container_gone(&self, image: &str) {
        if let Some(n) = lock(&self.children).get_mut(image) {
            *n = n.saturating_sub(1);
        }
    }

    fn jexec_argv(&self, name: &str, spec: &RunSpec) -> Result<Vec<String>, JailError> {
        let mut argv = vec![
            self.config.jexec.to_string_lossy().into_owned(),
            "-U".into(),
            self.user.name.clone(),
            name.to_string(),
            "/bin/sh".into(),
            "-c".into(),
            START.into(),
            "sh".into(),
            spec.cwd.to_string_lossy().into_owned(),
            "/usr/bin/env".into(),
            "-i".into(),
        ];
        // env(1) takes its first operand without `=` as the program.
        if spec.argv.first().is_none_or(|p| p.contains('=')) {
            return Err(JailError::Setup(format!(
                "the program {:?} cannot be started through env(1)",
                spec.argv.first()
            )));
        }
        for (key, value) in &spec.env {
            // env(1) reads `K=V` up to the first `=`, and would take a leading `-` as an option.
            if key.is_empty() || key.contains('=') || key.starts_with('-') || key.contains('\0') {
                return Err(JailError::Setup(format!(
                    "environment variable {key:?} cannot be passed into a pot"
                )));
            }
            argv.push(format!("{key}={value}"));
        }
        argv.extend(spec.argv.iter().cloned());
        Ok(argv)
    }
}

/// The error for a command that did not succeed.
fn command_error(argv: &[String], out: &Output) -> JailError {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.is_empty() {
        // pot prints its own errors (`###>  …`) on stdout.
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    const KEEP: usize = 4000;
    if text.len() > KEEP {
        let mut cut = text.len() - KEEP;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("…{}", &text[cut..]);
    }
    let mut command = command::render(argv);
    if command.len() > 300 {
        let mut cut = 300;
        while !command.is_char_boundary(cut) {
            cut -= 1;
        }
        command = format!("{}…", &command[..cut]);
    }
    JailError::Command {
        command,
        status: out.status.to_string(),
        stderr: text,
    }
}

/// The uid and gid of `user` in the template's `/etc/passwd` (the same in every pot made
/// from it). The template is the operator's; a symlink there is refused all the same.
fn read_user(template_root: &Path, user: &str) -> Result<JailUser, JailError> {
    let passwd = template_root.join("etc/passwd");
    let missing = |why: String| JailError::Path {
        path: passwd.clone(),
        why,
    };
    let meta = std::fs::symlink_metadata(&passwd)
        .map_err(|e| missing(format!("cannot read the template's users: {e}")))?;
    if !meta.is_file() {
        return Err(missing("is not a regular file".into()));
    }
    let text = std::fs::read_to_string(&passwd)
        .map_err(|e| missing(format!("cannot read the template's users: {e}")))?;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || fields[0] != user {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (fields[2].parse::<u32>(), fields[3].parse::<u32>()) else {
            return Err(missing(format!("the entry for {user} is malformed")));
        };
        if uid == 0 || gid == 0 {
            return Err(missing(format!(
                "{user} is uid or gid 0: jobs must run unprivileged"
            )));
        }
        return Ok(JailUser {
            name: user.to_string(),
            uid,
            gid,
        });
    }
    Err(missing(format!(
        "no user {user} in the template (add it with `pw useradd` inside the template, as \
         docs/freebsd.md shows)"
    )))
}

impl Backend for PotJail {
    type Image = Image;
    type Container = Container;

    fn cleanup_leftovers(&self) -> Result<usize, JailError> {
        let listed = {
            let _global = lock(&self.global);
            self.pot(&["ls", "-q"])?
        };
        let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let mut jobs: Vec<&String> = names
            .iter()
            .filter(|n| self.is_ours(n) == Some("job"))
            .collect();
        let mut images: Vec<&String> = names
            .iter()
            .filter(|n| self.is_ours(n) == Some("image"))
            .collect();
        jobs.sort();
        images.sort();
        // Containers first: an image's snapshot is the origin of their clones.
        let mut removed = 0;
        let mut first_error = None;
        for name in jobs.into_iter().chain(images) {
            match self.destroy_pot(name) {
                Ok(()) => {
                    removed += 1;
                    if self.is_ours(name) == Some("job") {
                        self.remove_limits(name);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, pot = %name, "removing a leftover pot failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    fn make_image(&self, key: &str, archive: &Path) -> Result<Image, JailError> {
        let name = self.new_name("image", Some(key));
        self.clone_pot(&name, &self.config.template)?;
        lock(&self.children).insert(name.clone(), 0);
        let made = {
            let cell = self.pot_cell(&name);
            let mut state = lock(&cell);
            toolchain::install(
                archive,
                &self.root_of(&name),
                ".kiln-toolchain",
                &self.limits.archive(),
            )
            .and_then(|()| self.snapshot_locked(&name, &mut state))
        };
        if let Err(e) = made {
            lock(&self.children).remove(&name);
            if let Err(cleanup) = self.destroy_pot(&name) {
                tracing::warn!(error = %cleanup, pot = %name, "removing a half-made image failed");
            }
            return Err(e);
        }
        Ok(Image { name })
    }

    fn destroy_image(&self, image: &Image) -> Result<(), JailError> {
        let alive = lock(&self.children).get(&image.name).copied().unwrap_or(0);
        if alive > 0 {
            return Err(JailError::Setup(format!(
                "image {} still has {alive} containers cloned from it; they are destroyed first",
                image.name
            )));
        }
        self.destroy_pot(&image.name)?;
        lock(&self.children).remove(&image.name);
        Ok(())
    }

    fn make_container(&self, image: &Image) -> Result<Container, JailError> {
        let name = self.new_name("job", None);
        self.clone_pot(&name, &image.name)?;
        *lock(&self.children).entry(image.name.clone()).or_default() += 1;
        let container = Container {
            name,
            image: image.name.clone(),
        };
        let started = {
            let cell = self.pot_cell(&container.name);
            let mut state = lock(&cell);
            self.snapshot_locked(&container.name, &mut state)
                .and_then(|()| self.pot(&["start", "-p", &container.name]).map(drop))
                .and_then(|()| self.apply_limits(&container.name))
        };
        if let Err(e) = started {
            if let Err(cleanup) = self.destroy_container(&container) {
                tracing::warn!(error = %cleanup, pot = %container.name, "removing a half-made container failed");
            }
            return Err(e);
        }
        Ok(container)
    }

    fn root(&self, container: &Container) -> PathBuf {
        self.root_of(&container.name)
    }

    fn run(&self, container: &Container, spec: &RunSpec) -> Result<Outcome, JailError> {
        if spec.uid != self.user.uid {
            return Err(JailError::Setup(format!(
                "the job is to run as uid {}, but every job in a pot runs as {} (uid {})",
                spec.uid, self.user.name, self.user.uid
            )));
        }
        let argv = self.jexec_argv(&container.name, spec)?;
        let cell = self.pot_cell(&container.name);
        let _pot = lock(&cell);
        let limit = spec.limits.timeout;
        let started = Instant::now();
        let out = self
            .runner
            .run(&argv, Some(limit))
            .map_err(|e| JailError::Io {
                what: format!("running {}", self.config.jexec.display()),
                source: e,
            })?;
        let elapsed = started.elapsed();
        let entered = out.stderr.starts_with(ENTERED.as_bytes());
        let timed_out = matches!(out.status, Status::TimedOut(_));
        if !entered && !timed_out {
            // jexec, or the shell before the job's program, failed: a jail problem.
            return Err(command_error(&argv, &out));
        }
        let mut stderr = out.stderr;
        if entered {
            stderr.drain(..ENTERED.len());
        }
        let mut outcome = Outcome {
            stdout: out.stdout,
            stderr,
            elapsed,
            ..Outcome::default()
        };
        match out.status {
            Status::Exited(code) => outcome.exit_code = Some(code),
            Status::Signaled(sig) => outcome.signal = Some(sig),
            Status::TimedOut(_) => {
                outcome.signal = Some(9);
                outcome.killed = Some(format!("time limit ({} ms)", limit.as_millis()));
                // jexec's process group is dead; whatever left it dies with the jail. The
                // reset starts it again.
                if let Err(e) = self.pot(&["stop", "-p", &container.name]) {
                    tracing::warn!(error = %e, pot = %container.name, "stopping a timed-out container failed");
                }
            }
        }
        Ok(outcome)
    }

    fn reset(&self, container: &Container, _image: &Image) -> Result<(), JailError> {
        let cell = self.pot_cell(&container.name);
        let _pot = lock(&cell);
        let name = container.name.as_str();
        self.pot(&["stop", "-p", name])?;
        self.pot(&["revert", "-p", name])?;
        self.pot(&["start", "-p", name])?;
        Ok(())
    }

    fn destroy_container(&self, container: &Container) -> Result<(), JailError> {
        self.destroy_pot(&container.name)?;
        self.remove_limits(&container.name);
        self.container_gone(&container.image);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every command with success, noting when each ran.
    #[derive(Debug, Default)]
    struct Clock {
        calls: Mutex<Vec<(String, SystemTime)>>,
    }

    impl CommandRunner for Clock {
        fn run(&self, argv: &[String], _: Option<Duration>) -> std::io::Result<Output> {
            lock(&self.calls).push((command::render(argv), SystemTime::now()));
            Ok(Output::exited(0, b"", b""))
        }
    }

    fn backend(runner: Arc<dyn CommandRunner>) -> (tempfile::TempDir, PotJail) {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("jails/kiln-template/m/etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("passwd"),
            "root:*:0:0:Charlie &:/root:/bin/sh\nkiln:*:6100:6200:kiln:/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        let config = PotConfig {
            fs_root: dir.path().to_path_buf(),
            ..PotConfig::default()
        };
        let jail = PotJail::with_runner(config, Limits::default(), runner).unwrap();
        (dir, jail)
    }

    #[test]
    fn pot_snapshots_of_one_pot_are_never_taken_within_one_second() {
        let clock = Arc::new(Clock::default());
        let (_dir, jail) = backend(clock.clone());
        let mut state = PotState::default();
        for _ in 0..3 {
            jail.snapshot_locked("kiln-job-1", &mut state).unwrap();
        }
        let seconds: Vec<u64> = lock(&clock.calls)
            .iter()
            .map(|(_, t)| t.duration_since(UNIX_EPOCH).unwrap().as_secs())
            .collect();
        assert_eq!(seconds.len(), 3);
        assert!(
            seconds.windows(2).all(|w| w[0] < w[1]),
            "two snapshots shared a second: {seconds:?}"
        );
        // Another pot is not held up by this one's last snapshot.
        let mut other = PotState::default();
        let before = Instant::now();
        jail.snapshot_locked("kiln-job-2", &mut other).unwrap();
        assert!(before.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn pot_config_is_checked_and_the_user_read_from_the_template() {
        let (dir, jail) = backend(Arc::new(Clock::default()));
        assert_eq!(
            jail.user(),
            &JailUser {
                name: "kiln".into(),
                uid: 6100,
                gid: 6200
            }
        );
        let with = |f: &dyn Fn(&mut PotConfig)| {
            let mut config = PotConfig {
                fs_root: dir.path().to_path_buf(),
                ..PotConfig::default()
            };
            f(&mut config);
            PotJail::with_runner(config, Limits::default(), Arc::new(Clock::default()))
                .unwrap_err()
                .to_string()
        };
        assert!(with(&|c| c.user = "root".into()).contains("unprivileged"));
        assert!(with(&|c| c.user = "nobody".into()).contains("no user nobody"));
        assert!(with(&|c| c.prefix = "a.b".into()).contains("prefix"));
        assert!(with(&|c| c.template = "kiln-image-x".into()).contains("named like kiln's"));
        assert!(with(&|c| c.fs_root = "/nonexistent".into()).contains("template pot's root"));
        assert!(jail.is_ours("kiln-template").is_none());
        assert_eq!(jail.is_ours("kiln-job-1-2"), Some("job"));
        assert_eq!(jail.is_ours("kiln-image-ab-1-2"), Some("image"));
        assert_eq!(jail.is_ours("kilnx-job-1"), None);
    }

    #[test]
    fn pot_failures_name_the_command_status_and_stderr() {
        let argv: Vec<String> = ["pot", "revert", "-p", "kiln-job-1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let err = command_error(
            &argv,
            &Output::exited(
                1,
                b"###>  The pot kiln-job-1 is still running. Revert is possible only for stopped pots\n",
                b"",
            ),
        );
        assert_eq!(
            err.to_string(),
            "`pot revert -p kiln-job-1` exited with exit status 1: ###>  The pot kiln-job-1 is \
             still running. Revert is possible only for stopped pots"
        );
        let err = command_error(&argv, &Output::exited(2, b"ignored", b"zfs: boom\n"));
        assert!(
            err.to_string().ends_with("exit status 2: zfs: boom"),
            "{err}"
        );
    }
}
