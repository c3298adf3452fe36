//! The pot backend against `potsim` (tests/potsim/potsim.py), a simulator of FreeBSD's pot,
//! jexec and rctl over a directory tree that keeps pot's state rules and runs jexec'd commands
//! chrooted as the jail's user (these tests need root and python3).
//!
//! Golden tests pin the exact command sequences (cold image, warm container, failed reset,
//! start-up cleanup); the others check what the sequences achieve. What only a real FreeBSD
//! host can prove is listed in docs/freebsd.md.

// A test drives the outside world directly: programs, the environment, tasks.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_archive::{Manifest, Source};
use kiln_jails::inroot::Root;
use kiln_jails::pot::command::render;
use kiln_jails::pot::{CommandRunner, Output, PotConfig, PotJail, SystemRunner};
use kiln_jails::{Backend, Limits, Outcome, Pool, RunSpec};

const UID: u32 = 62_500;
const START: &str = r#"cd "$1" || exit 1; printf 'kiln-pot: in the jail\n' >&2; shift; exec "$@""#;

fn potsim() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/potsim/potsim.py")
}

/// A simulated FreeBSD host: pot's tree with a template pot holding a shell and a few tools.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let mut setup = Command::new("python3");
        setup
            .arg(potsim())
            .arg("setup")
            .arg(dir.path())
            .args(["--template", "kiln-template", "--user", "kiln"])
            .args(["--uid", &UID.to_string()]);
        let tools = [
            "/bin/sh",
            "/usr/bin/env",
            "/bin/cat",
            "/bin/ln",
            "/bin/sleep",
            "/usr/bin/setsid",
        ];
        for tool in tools {
            setup.args(["--copy", tool]);
        }
        let out = setup.output().expect("python3 runs the pot simulator");
        assert!(
            out.status.success(),
            "potsim setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Host { dir }
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.dir.path().join("bin").join(name)
    }

    fn fs_root(&self) -> PathBuf {
        self.dir.path().join("fs")
    }

    fn config(&self) -> PotConfig {
        PotConfig {
            pot: self.tool("pot"),
            jexec: self.tool("jexec"),
            rctl: Some(self.tool("rctl")),
            fs_root: self.fs_root(),
            ..PotConfig::default()
        }
    }

    /// Runs the simulated pot directly, as an operator would.
    fn pot(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.tool("pot")).args(args).output().unwrap()
    }

    fn pots(&self) -> Vec<String> {
        let out = self.pot(&["ls", "-q"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The simulator's own journal: every command, and any overlap it caught.
    fn journal(&self) -> String {
        std::fs::read_to_string(self.fs_root().join(".potsim/log")).unwrap_or_default()
    }

    fn rules(&self) -> String {
        let out = Command::new(self.tool("rctl")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

enum Fault {
    Fail(Output),
    /// Tell the test the command was reached, then wait until the test lets it go.
    Hold {
        reached: tokio::sync::oneshot::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    },
}

/// How long a test waits for an event before it fails rather than hang. Never an ordering:
/// every wait is for an event (a command run, a state reached), and this bounds only a bug.
const HANG: Duration = Duration::from_secs(120);

/// Records every command (program by its file name) and passes it to the simulator, unless a
/// fault planted for commands starting with some text says otherwise. Every command started
/// or finished is an event tests can wait for.
struct Recorder {
    log: Mutex<Vec<Vec<String>>>,
    faults: Mutex<Vec<(String, Fault)>>,
    events: tokio::sync::watch::Sender<u64>,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder {
            log: Mutex::default(),
            faults: Mutex::default(),
            events: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorder")
    }
}

impl Recorder {
    fn fail(&self, prefix: &str, out: Output) {
        self.faults
            .lock()
            .unwrap()
            .push((prefix.into(), Fault::Fail(out)));
    }

    /// Holds the first command starting with `prefix` before it runs: the receiver hears
    /// when it is reached, and the command runs once the sender is used or dropped.
    fn hold(
        &self,
        prefix: &str,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (reached, heard) = tokio::sync::oneshot::channel();
        let (release, held) = std::sync::mpsc::channel();
        self.faults.lock().unwrap().push((
            prefix.into(),
            Fault::Hold {
                reached,
                release: held,
            },
        ));
        (heard, release)
    }

    fn event(&self) {
        self.events.send_modify(|n| *n += 1);
    }

    /// Waits until `done` holds, checking it again after every command started or finished.
    async fn until(&self, what: &str, done: impl Fn() -> bool) {
        loop {
            // Subscribed before the check: an event between the two is not missed.
            let mut events = self.events.subscribe();
            if done() {
                return;
            }
            if tokio::time::timeout(HANG, events.changed()).await.is_err() {
                panic!(
                    "{what}: still not so after {HANG:?}; commands: {:#?}",
                    self.lines()
                );
            }
        }
    }

    fn raw(&self) -> Vec<Vec<String>> {
        self.log.lock().unwrap().clone()
    }

    /// The commands so far, as typed, with kiln's pot names replaced by IMAGE1, JOB1… in the
    /// order they first appear and the job's start script by $START.
    fn lines(&self) -> Vec<String> {
        let mut names = HashMap::new();
        self.raw()
            .iter()
            .map(|argv| normalize(&render(argv), &mut names))
            .collect()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Waits until a command starting with `prefix` has been run.
    async fn wait_for(&self, prefix: &str) {
        self.until(&format!("a `{prefix}` command"), || {
            self.lines().iter().any(|l| l.starts_with(prefix))
        })
        .await;
    }
}

impl CommandRunner for Recorder {
    fn run(&self, argv: &[String], timeout: Option<Duration>) -> std::io::Result<Output> {
        let mut shown = argv.to_vec();
        if let Some(p) = shown.first_mut() {
            *p = Path::new(p.as_str())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        let line = render(&shown);
        self.log.lock().unwrap().push(shown);
        self.event();
        let fault = {
            let mut faults = self.faults.lock().unwrap();
            faults
                .iter()
                .position(|(p, _)| line.starts_with(p.as_str()))
                .map(|i| faults.remove(i).1)
        };
        let out = match fault {
            Some(Fault::Fail(out)) => Ok(out),
            Some(Fault::Hold { reached, release }) => {
                let _ = reached.send(());
                // Used or dropped, the sender lets the command go.
                let _ = release.recv();
                SystemRunner.run(argv, timeout)
            }
            None => SystemRunner.run(argv, timeout),
        };
        self.event();
        out
    }
}

fn normalize(line: &str, names: &mut HashMap<String, String>) -> String {
    let line = line.replace(&render(&[START.to_string()]), "$START");
    let mut out = String::new();
    let mut rest = line.as_str();
    while let Some(at) = ["kiln-image-", "kiln-job-"]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| (i, *p)))
        .min()
    {
        let (i, kind) = at;
        out.push_str(&rest[..i]);
        let len = rest[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(rest.len() - i);
        let name = &rest[i..i + len];
        let label = if kind == "kiln-job-" { "JOB" } else { "IMAGE" };
        let count = names.values().filter(|v| v.starts_with(label)).count();
        let placeholder = names
            .entry(name.to_string())
            .or_insert_with(|| format!("{label}{}", count + 1));
        out.push_str(placeholder);
        rest = &rest[i + len..];
    }
    out.push_str(rest);
    out
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(20),
        memory: 256 << 20,
        processes: 64,
        open_files: 512,
        ..Limits::default()
    }
}

/// A toolchain archive: one marker file, named after `name`.
fn toolchain(dir: &Path, name: &str) -> PathBuf {
    let marker = dir.join(format!("{name}.txt"));
    std::fs::write(&marker, format!("toolchain {name}\n")).unwrap();
    let mut m = Manifest::default();
    m.add(
        format!("opt/{name}/id.txt"),
        Source::File {
            host: marker,
            executable: false,
        },
    );
    let archive = dir.join(format!("{name}.tar.gz"));
    m.pack(std::fs::File::create(&archive).unwrap()).unwrap();
    archive
}

fn spec(script: &str) -> RunSpec {
    RunSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("LANG".into(), "C".into())],
        cwd: "/job".into(),
        uid: UID,
        gid: UID,
        limits: limits(),
    }
}

struct Fixture {
    host: Host,
    rec: Arc<Recorder>,
    pool: Pool<PotJail>,
}

fn fixture(keep: usize) -> Fixture {
    let host = Host::new();
    let rec = Arc::new(Recorder::default());
    let jail = PotJail::with_runner(host.config(), limits(), rec.clone()).unwrap();
    Fixture {
        host,
        rec,
        pool: Pool::new(jail, keep, 2),
    }
}

/// A container of `name`'s image, made first if need be.
async fn leased(f: &Fixture, name: &str) -> kiln_jails::Lease<PotJail> {
    let archive = toolchain(f.host.dir.path(), name);
    f.pool.prepare(name, archive).await.unwrap();
    f.pool.checkout(name).await.unwrap()
}

/// Prepares `name`'s image, runs `script` in a container of it with /job given to the jail
/// user, and returns the outcome and /job/out.txt.
async fn job(f: &Fixture, name: &str, script: &str) -> (Outcome, Option<Vec<u8>>) {
    let lease = leased(f, name).await;
    let root = Root::open(lease.root()).unwrap();
    root.chown_dir(Path::new("/job"), UID, UID).unwrap();
    let outcome = f.pool.run(&lease, spec(script)).await.unwrap();
    let out = root.read_file(Path::new("/job/out.txt"), 1 << 20).unwrap();
    f.pool.checkin(lease);
    (outcome, out)
}

async fn wait_ready(pool: &Pool<PotJail>, key: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pool.ready_counts().get(key).copied().unwrap_or(0) != n {
        assert!(Instant::now() < deadline, "{:?}", pool.ready_counts());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn jexec_line(script: &str) -> String {
    render(&[
        "jexec".into(),
        "-U".into(),
        "kiln".into(),
        "JOB1".into(),
        "/bin/sh".into(),
        "-c".into(),
        "$START".into(),
        "sh".into(),
        "/job".into(),
        "/usr/bin/env".into(),
        "-i".into(),
        "LANG=C".into(),
        "/bin/sh".into(),
        "-c".into(),
        script.into(),
    ])
    .replace("'$START'", "$START")
}

#[tokio::test]
async fn pot_golden_cold_image_then_container_then_job_then_reset() {
    let f = fixture(1);
    let script = "echo made > out.txt";
    let (outcome, out) = job(&f, "tc", script).await;
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    assert_eq!(out.as_deref(), Some(&b"made\n"[..]));
    wait_ready(&f.pool, "tc", 1).await;
    assert_eq!(
        f.rec.lines(),
        vec![
            "pot clone -p IMAGE1 -P kiln-template".to_string(),
            "pot snapshot -p IMAGE1".into(),
            "pot clone -p JOB1 -P IMAGE1".into(),
            "pot snapshot -p JOB1".into(),
            "pot start -p JOB1".into(),
            "rctl -a jail:JOB1:memoryuse:deny=268435456".into(),
            "rctl -a jail:JOB1:maxproc:deny=64".into(),
            "rctl -a jail:JOB1:openfiles:deny=512".into(),
            jexec_line(script),
            "pot stop -p JOB1".into(),
            "pot revert -p JOB1".into(),
            "pot start -p JOB1".into(),
        ]
    );
    // The exact start script, and names that say whose pots they are.
    let raw = f.rec.raw();
    let jexec = raw.iter().find(|a| a[0] == "jexec").unwrap();
    assert_eq!(jexec[6], START);
    let image = &raw[0][3];
    assert!(
        image.starts_with(&format!("kiln-image-tc-{}-", std::process::id())),
        "{image}"
    );
    assert!(raw[2][3].starts_with("kiln-job-"), "{:?}", raw[2]);
    // The image holds the toolchain over the template's system, and its snapshot was taken.
    let image_root = f.host.fs_root().join("jails").join(image).join("m");
    assert_eq!(
        std::fs::read(image_root.join("opt/tc/id.txt")).unwrap(),
        b"toolchain tc\n"
    );
    assert!(image_root.join("bin/sh").exists());
    assert!(!image_root.join(".kiln-toolchain").exists());
    assert!(
        f.host.rules().contains(":maxproc:deny=64"),
        "{}",
        f.host.rules()
    );
    assert!(
        !f.host.journal().contains("CONCURRENT"),
        "{}",
        f.host.journal()
    );
}

#[tokio::test]
async fn pot_golden_warm_container_runs_with_no_pot_command_and_starts_clean() {
    let f = fixture(1);
    job(&f, "tc", "echo first > out.txt; echo junk > /tmp/junk").await;
    wait_ready(&f.pool, "tc", 1).await;
    f.rec.clear();
    let script = "cat /tmp/junk out.txt 2>&1; echo second > out.txt";
    let (outcome, out) = job(&f, "tc", script).await;
    assert_eq!(out.as_deref(), Some(&b"second\n"[..]));
    // The reset took the container back to its snapshot: nothing of the first job is left.
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    assert!(stdout.contains("/tmp/junk: No such file"), "{stdout}");
    assert!(stdout.contains("out.txt: No such file"), "{stdout}");
    wait_ready(&f.pool, "tc", 1).await;
    let mut names = HashMap::new();
    let jexec = normalize(&render(&f.rec.raw()[0]), &mut names);
    assert!(jexec.starts_with("jexec -U kiln JOB1 /bin/sh"), "{jexec}");
    assert_eq!(
        f.rec.lines(),
        vec![
            jexec_line(script),
            "pot stop -p JOB1".into(),
            "pot revert -p JOB1".into(),
            "pot start -p JOB1".into(),
        ]
    );
}

#[tokio::test]
async fn pot_golden_a_failed_reset_destroys_the_container() {
    let f = fixture(1);
    f.rec.fail(
        "pot revert -p kiln-job-",
        Output::exited(1, b"###>  injected revert failure\n", b""),
    );
    job(&f, "tc", "true").await;
    f.rec.wait_for("rctl -r").await;
    assert_eq!(
        f.rec.lines()[9..],
        [
            "pot stop -p JOB1",
            "pot revert -p JOB1",
            "pot destroy -F -p JOB1",
            "rctl -r jail:JOB1",
        ]
    );
    assert_eq!(f.pool.ready_counts().get("tc"), Some(&0));
    assert!(!f.host.pots().iter().any(|p| p.starts_with("kiln-job-")));
    assert!(!f.host.rules().contains("kiln-job-"), "{}", f.host.rules());
    // The next job gets a new container from the same image.
    f.rec.clear();
    let (outcome, _) = job(&f, "tc", "true").await;
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(f.rec.lines()[0], "pot clone -p JOB1 -P IMAGE1");
}

#[tokio::test]
async fn pot_golden_startup_cleanup_removes_only_kilns_leftovers() {
    let host = Host::new();
    let ok = |out: std::process::Output| assert!(out.status.success(), "{out:?}");
    // What a builder killed mid-run leaves: an image, two containers (one running), rules.
    ok(host.pot(&["clone", "-p", "kiln-image-ab12-77-0", "-P", "kiln-template"]));
    ok(host.pot(&["snapshot", "-p", "kiln-image-ab12-77-0"]));
    for job in ["kiln-job-77-1", "kiln-job-77-2"] {
        ok(host.pot(&["clone", "-p", job, "-P", "kiln-image-ab12-77-0"]));
        ok(host.pot(&["snapshot", "-p", job]));
    }
    ok(host.pot(&["start", "-p", "kiln-job-77-2"]));
    let rctl = Command::new(host.tool("rctl"))
        .args(["-a", "jail:kiln-job-77-2:maxproc:deny=10"])
        .output()
        .unwrap();
    ok(rctl);
    // Pots that are not kiln's, one of them named close to kiln's.
    ok(host.pot(&["clone", "-p", "web", "-P", "kiln-template"]));
    ok(host.pot(&["clone", "-p", "kilnx-job-1", "-P", "kiln-template"]));

    let rec = Arc::new(Recorder::default());
    let jail = PotJail::with_runner(host.config(), limits(), rec.clone()).unwrap();
    assert_eq!(jail.cleanup_leftovers().unwrap(), 3);
    assert_eq!(
        rec.lines(),
        [
            "pot ls -q",
            "pot destroy -F -p JOB1",
            "rctl -r jail:JOB1",
            "pot destroy -F -p JOB2",
            "rctl -r jail:JOB2",
            "pot destroy -F -p IMAGE1",
        ]
    );
    assert_eq!(rec.raw()[1][4], "kiln-job-77-1");
    assert_eq!(host.pots(), ["kiln-template", "kilnx-job-1", "web"]);
    assert_eq!(host.rules(), "");
}

#[tokio::test]
async fn pot_startup_cleanup_failures_name_the_pot_command() {
    let host = Host::new();
    assert!(host
        .pot(&["clone", "-p", "kiln-job-1-1", "-P", "kiln-template"])
        .status
        .success());
    let rec = Arc::new(Recorder::default());
    rec.fail(
        "pot destroy -F -p kiln-job-1-1",
        Output::exited(
            1,
            b"###>  zfs failed to destroy the dataset zroot/pot/jails/kiln-job-1-1\n",
            b"",
        ),
    );
    let jail = PotJail::with_runner(host.config(), limits(), rec).unwrap();
    let err = jail.cleanup_leftovers().unwrap_err().to_string();
    assert!(err.starts_with('`'), "{err}");
    assert!(
        err.contains("/bin/pot destroy -F -p kiln-job-1-1` exited with exit status 1: ###>  zfs"),
        "{err}"
    );
}

#[test]
fn potsim_keeps_pots_state_rules() {
    let host = Host::new();
    let run = |args: &[&str]| {
        let out = host.pot(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    assert_eq!(
        run(&["clone", "-p", "img", "-P", "kiln-template"]).0,
        Some(0)
    );
    // A clone needs a snapshot of its base.
    let (code, text) = run(&["clone", "-p", "c1", "-P", "img"]);
    assert_eq!(code, Some(1));
    assert!(
        text.contains("has no snap - please take a snapshot of img"),
        "{text}"
    );
    assert_eq!(run(&["snapshot", "-p", "img"]).0, Some(0));
    assert_eq!(run(&["clone", "-p", "c1", "-P", "img"]).0, Some(0));
    // Names are unique, without dots.
    let (code, text) = run(&["clone", "-p", "c1", "-P", "img"]);
    assert_eq!(
        (code, text.trim()),
        (Some(1), "###>  pot c1 already exists")
    );
    assert_eq!(run(&["clone", "-p", "c.1", "-P", "img"]).0, Some(1));
    // Snapshot and revert are refused while a pot runs; start and stop are idempotent.
    assert_eq!(run(&["snapshot", "-p", "c1"]).0, Some(0));
    assert_eq!(run(&["start", "-p", "c1"]).0, Some(0));
    assert_eq!(run(&["start", "-p", "c1"]).0, Some(0));
    let (code, text) = run(&["snapshot", "-p", "c1"]);
    assert_eq!(code, Some(1));
    assert!(
        text.contains("Snapshot is possible only for stopped pots"),
        "{text}"
    );
    let (code, text) = run(&["revert", "-p", "c1"]);
    assert_eq!(code, Some(1));
    assert!(
        text.contains("Revert is possible only for stopped pots"),
        "{text}"
    );
    // A base with clones cannot be destroyed, even with -F.
    let (code, text) = run(&["destroy", "-F", "-p", "img"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("snapshot has dependent clones"), "{text}");
    assert!(text.contains("img destruction failed"), "{text}");
    // jexec needs a running pot.
    assert_eq!(run(&["stop", "-p", "c1"]).0, Some(0));
    assert_eq!(run(&["stop", "-p", "c1"]).0, Some(0));
    let out = Command::new(host.tool("jexec"))
        .args(["c1", "/bin/sh", "-c", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "jexec: jail \"c1\" not found\n"
    );
    // Destroying the clone first, then the base, works.
    assert_eq!(run(&["destroy", "-F", "-p", "c1"]).0, Some(0));
    assert_eq!(run(&["destroy", "-F", "-p", "img"]).0, Some(0));
    let (code, text) = run(&["destroy", "-F", "-p", "img"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("not found"), "{text}");
    assert_eq!(host.pots(), ["kiln-template"]);
}

#[test]
fn potsim_loses_a_second_snapshot_within_one_second_like_pot() {
    let host = Host::new();
    assert!(host
        .pot(&["clone", "-p", "p", "-P", "kiln-template"])
        .status
        .success());
    // Retry until both snapshots fall in one second (the first try nearly always does).
    for _ in 0..5 {
        let a = host.pot(&["snapshot", "-p", "p"]);
        let b = host.pot(&["snapshot", "-p", "p"]);
        assert!(
            a.status.success() && b.status.success(),
            "pot ignores zfs's failure"
        );
        if host.journal().contains("SNAPSHOT-LOST p@") {
            assert!(String::from_utf8_lossy(&b.stderr).contains("dataset already exists"));
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!(
        "two snapshots never fell within one second: {}",
        host.journal()
    );
}

#[tokio::test]
async fn pot_jobs_run_as_the_jail_user_with_exactly_their_environment() {
    let f = fixture(1);
    let lease = leased(&f, "tc").await;
    let root = Root::open(lease.root()).unwrap();
    root.chown_dir(Path::new("/job/sub"), UID, UID).unwrap();
    // The program sees exactly the job's variables: nothing of the builder's or the shell's.
    let mut run = spec("");
    run.argv = vec!["/usr/bin/env".into()];
    run.env = vec![
        ("LANG".into(), "C".into()),
        ("SPACED".into(), "two words = one".into()),
    ];
    let outcome = f.pool.run(&lease, run).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&outcome.stdout),
        "LANG=C\nSPACED=two words = one\n"
    );
    let mut run =
        spec("echo \"cwd=$(pwd)\"; echo x > owned; cat /opt/tc/id.txt; echo to stderr >&2; exit 3");
    run.cwd = "/job/sub".into();
    let outcome = f.pool.run(&lease, run).await.unwrap();
    assert_eq!(outcome.exit_code, Some(3), "{outcome:?}");
    assert_eq!(
        String::from_utf8_lossy(&outcome.stdout),
        "cwd=/job/sub\ntoolchain tc\n"
    );
    assert_eq!(String::from_utf8_lossy(&outcome.stderr), "to stderr\n");
    use std::os::unix::fs::MetadataExt;
    let owned = std::fs::metadata(lease.root().join("job/sub/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (UID, UID));

    // A job for another uid is refused: in a pot, every job runs as the jail's user.
    let mut other = spec("true");
    other.uid = UID + 1;
    let err = f.pool.run(&lease, other).await.unwrap_err().to_string();
    assert!(err.contains("runs as kiln (uid 62500)"), "{err}");
    // An environment variable env(1) would misread is refused, not mangled.
    let mut bad = spec("true");
    bad.env.push(("-u".into(), "x".into()));
    assert!(f.pool.run(&lease, bad).await.is_err());
    // A working directory that is not there: a jail failure naming jexec, not an exit status.
    let mut missing = spec("true");
    missing.cwd = "/nonexistent".into();
    let err = f.pool.run(&lease, missing).await.unwrap_err().to_string();
    assert!(err.contains("/bin/jexec -U kiln kiln-job-"), "{err}");
    assert!(
        err.contains("exited with exit status 1: sh: 1: cd: can't cd to /nonexistent"),
        "{err}"
    );
    f.pool.checkin(lease);
}

#[tokio::test]
async fn pot_a_job_past_its_time_is_killed_and_its_jail_stopped() {
    let f = fixture(1);
    let lease = leased(&f, "tc").await;
    Root::open(lease.root())
        .unwrap()
        .chown_dir(Path::new("/job"), UID, UID)
        .unwrap();
    f.rec.clear();
    // A child that leaves the job's process group and holds its output open.
    let mut run = spec("echo started; /usr/bin/setsid /bin/sleep 60 & exec /bin/sleep 60");
    run.limits.timeout = Duration::from_millis(800);
    let started = Instant::now();
    let outcome = f.pool.run(&lease, run).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(outcome.signal, Some(9), "{outcome:?}");
    assert_eq!(outcome.exit_code, None);
    assert_eq!(outcome.killed.as_deref(), Some("time limit (800 ms)"));
    assert_eq!(String::from_utf8_lossy(&outcome.stdout), "started\n");
    assert_eq!(f.rec.lines()[1], "pot stop -p JOB1");
    let root = std::fs::canonicalize(lease.root()).unwrap();
    let inside: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("root")).ok().as_deref() == Some(&*root))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(inside.is_empty(), "processes left in the jail: {inside:?}");
    // The reset starts it again and the container serves the next job.
    f.pool.checkin(lease);
    wait_ready(&f.pool, "tc", 1).await;
    let (outcome, out) = job(&f, "tc", "echo again > out.txt").await;
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    assert_eq!(out.as_deref(), Some(&b"again\n"[..]));
}

#[tokio::test]
async fn pot_outputs_are_read_in_the_jail_root_and_links_out_are_refused() {
    let f = fixture(1);
    let secret = f.host.dir.path().join("host-secret");
    std::fs::write(&secret, b"secret").unwrap();
    let script = format!(
        "/bin/ln -s {} out.txt; /bin/ln -s /etc/passwd /job/o2",
        secret.display()
    );
    let lease = leased(&f, "tc").await;
    let root = Root::open(lease.root()).unwrap();
    root.chown_dir(Path::new("/job"), UID, UID).unwrap();
    let outcome = f.pool.run(&lease, spec(&script)).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    for output in ["/job/out.txt", "/job/o2"] {
        let err = root.read_file(Path::new(output), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }
    f.pool.checkin(lease);
}

#[tokio::test]
async fn pot_many_jobs_on_two_toolchains_never_drive_one_pot_concurrently() {
    let f = fixture(2);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let pool = f.pool.clone();
        let name = if i % 2 == 0 { "even" } else { "odd" };
        let archive = toolchain(f.host.dir.path(), name);
        tasks.push(tokio::spawn(async move {
            pool.prepare(name, archive).await.unwrap();
            let lease = pool.checkout(name).await.unwrap();
            Root::open(lease.root())
                .unwrap()
                .chown_dir(Path::new("/job"), UID, UID)
                .unwrap();
            let outcome = pool
                .run(&lease, spec(&format!("cat /opt/{name}/id.txt")))
                .await
                .unwrap();
            pool.checkin(lease);
            outcome
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.unwrap();
        let name = if i % 2 == 0 { "even" } else { "odd" };
        assert_eq!(
            String::from_utf8_lossy(&outcome.stdout),
            format!("toolchain {name}\n")
        );
    }
    // Evict one toolchain while the pool still recycles: containers go before their image.
    f.pool.evict("even").await.unwrap();
    f.pool.shutdown().await;
    let journal = f.host.journal();
    assert!(!journal.contains("CONCURRENT"), "{journal}");
    assert!(!journal.contains("SNAPSHOT-LOST"), "{journal}");
    // Every pot goes once the pool has shut down: containers still recycling when it did are
    // destroyed as they finish. Each command that finishes may be the last.
    f.rec
        .until("only the template left", || {
            f.host.pots() == ["kiln-template"]
        })
        .await;
    // Each image was destroyed after every container cloned from it.
    let raw = f.rec.raw();
    let destroyed = |name: &String| {
        raw.iter()
            .position(|a| a[1] == "destroy" && a.get(4) == Some(name))
            .unwrap_or_else(|| panic!("{name} never destroyed"))
    };
    let clones: Vec<(&String, &String)> = raw
        .iter()
        .filter(|a| a[1] == "clone")
        .map(|a| (&a[3], &a[5]))
        .collect();
    for (pot, base) in &clones {
        if base.starts_with("kiln-image-") {
            assert!(
                destroyed(pot) < destroyed(base),
                "{pot} outlived its image {base}"
            );
        }
    }
    assert_eq!(
        clones
            .iter()
            .filter(|(p, _)| p.starts_with("kiln-image-"))
            .count(),
        2
    );
}

#[tokio::test]
async fn pot_making_one_image_does_not_hold_up_another_toolchains_jobs() {
    let f = fixture(1);
    // The slow toolchain's image stays mid-snapshot until the fast job is done: ordered by
    // events, not by how long either takes on a loaded machine.
    let (reached, release) = f.rec.hold("pot snapshot -p kiln-image-slow");
    let slow = {
        let pool = f.pool.clone();
        let archive = toolchain(f.host.dir.path(), "slow");
        tokio::spawn(async move { pool.prepare("slow", archive).await })
    };
    reached
        .await
        .expect("the slow image's snapshot was reached");
    // Were image making serialised, this job would wait for the held snapshot forever.
    let (outcome, _) = tokio::time::timeout(HANG, job(&f, "fast", "true"))
        .await
        .expect("a job on another toolchain waited for the slow image");
    assert_eq!(outcome.exit_code, Some(0));
    assert!(!slow.is_finished(), "the slow image was made while held");
    drop(release);
    slow.await.unwrap().unwrap();
    assert!(f.pool.has_image("slow") && f.pool.has_image("fast"));
}

#[test]
fn pot_an_image_goes_only_after_its_containers() {
    let host = Host::new();
    let jail = PotJail::with_runner(host.config(), limits(), Arc::new(SystemRunner)).unwrap();
    let archive = toolchain(host.dir.path(), "tc");
    let image = jail.make_image("tc", &archive).unwrap();
    let container = jail.make_container(&image).unwrap();
    let err = jail.destroy_image(&image).unwrap_err().to_string();
    assert!(err.contains("still has 1 containers"), "{err}");
    jail.destroy_container(&container).unwrap();
    jail.destroy_image(&image).unwrap();
    assert_eq!(host.pots(), ["kiln-template"]);

    // Without a snapshot of the template, the clone fails and says why, naming the command.
    std::fs::remove_dir_all(host.fs_root().join(".potsim/snap/kiln-template")).unwrap();
    let err = jail.make_image("tc", &archive).unwrap_err().to_string();
    assert!(
        err.starts_with("`") && err.contains(" clone -p kiln-image-tc-"),
        "{err}"
    );
    assert!(err.contains("-P kiln-template` exited with exit status 1: ###>  zroot/pot/jails/kiln-template/m has no snap"), "{err}");
}

#[test]
fn potsim_refuses_two_commands_on_one_pot_at_once() {
    let host = Host::new();
    assert!(host
        .pot(&["clone", "-p", "p", "-P", "kiln-template"])
        .status
        .success());
    // `pot start` sleeps half a second with the pot claimed; a stop meanwhile is refused.
    let start = Command::new(host.tool("pot"))
        .args(["start", "-p", "p"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.fs_root().join(".potsim/running/p").exists() {
        assert!(Instant::now() < deadline, "pot start never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = host.pot(&["stop", "-p", "p"]);
    assert_eq!(stop.status.code(), Some(70), "{stop:?}");
    assert!(String::from_utf8_lossy(&stop.stderr).contains("not safe to drive concurrently"));
    assert!(start.wait_with_output().unwrap().status.success());
    assert!(host.journal().contains("CONCURRENT p"));
}
