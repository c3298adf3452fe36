//! The Linux jail against real namespaces and overlayfs (these tests need root): a job that
//! tries to reach the network, read the host's files, write outside its upper layer, fork-bomb
//! or run past its limit is stopped and reported, and the host is untouched.

// A test drives the outside world directly: programs, the environment, tasks.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_archive::{Manifest, Source};
use kiln_jails::inroot::{Placer, Root};
use kiln_jails::linux::LinuxJail;
use kiln_jails::{Backend, Limits, Outcome, Pool, RunSpec};

struct Fixture {
    _dir: tempfile::TempDir,
    work: PathBuf,
    archive: PathBuf,
    pool: Pool<LinuxJail>,
}

fn fixture(keep: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe.c");
    let status = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&probe)
        .arg(&src)
        .status()
        .expect("gcc is needed for the jail tests");
    assert!(status.success(), "building the probe failed");
    let mut m = Manifest::default();
    m.add(
        "usr/bin/probe",
        Source::File {
            host: probe,
            executable: true,
        },
    );
    m.add(
        "etc/motd",
        Source::File {
            host: src,
            executable: false,
        },
    );
    let archive = dir.path().join("toolchain.tar.gz");
    m.pack(std::fs::File::create(&archive).unwrap()).unwrap();
    let work = dir.path().join("work");
    let helper = Path::new(env!("CARGO_BIN_EXE_kiln-jail"));
    let limits = Limits {
        timeout: Duration::from_secs(20),
        processes: 32,
        disk: 64 << 20,
        ..Limits::default()
    };
    let jail = LinuxJail::new(&work, helper, limits).unwrap();
    Fixture {
        _dir: dir,
        work,
        archive,
        pool: Pool::new(jail, keep, 2),
    }
}

fn spec(uid: u32, args: &[&str], timeout: Duration) -> RunSpec {
    let mut argv = vec!["/usr/bin/probe".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    RunSpec {
        argv,
        env: vec![("LANG".into(), "C".into())],
        cwd: "/job".into(),
        uid,
        gid: uid,
        limits: Limits {
            timeout,
            processes: 32,
            ..Limits::default()
        },
    }
}

async fn run_once(
    f: &Fixture,
    uid: u32,
    args: &[&str],
    timeout: Duration,
) -> (Outcome, Option<Vec<u8>>) {
    f.pool.prepare("probe", f.archive.clone()).await.unwrap();
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    give(&f.pool, &root, "/job", uid);
    let outcome = f.pool.run(&lease, spec(uid, args, timeout)).await.unwrap();
    let out = Root::open(lease.outputs())
        .unwrap()
        .read_file(Path::new("/job/out.txt"), 1 << 20)
        .unwrap();
    f.pool.checkin(lease);
    (outcome, out)
}

/// Gives the directory `path` to the job that runs as `uid`: that uid, or on a rootless jail the
/// builder's own, which the job's user namespace maps to it.
fn give(pool: &Pool<LinuxJail>, root: &Root, path: &str, uid: u32) {
    let (owner, group) = pool.backend().owner(uid);
    root.chown_dir(Path::new(path), owner, group).unwrap();
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How many processes carry `tag` in their command line: a job's, found whatever uid the host
/// sees them as (on a rootless jail, the builder's own).
fn processes_tagged(tag: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .any(|word| word == tag.as_bytes())
        })
        .count()
}

#[tokio::test]
async fn runs_unprivileged_without_capabilities_and_returns_outputs() {
    const UID: u32 = 64100;
    let f = fixture(2);
    let (outcome, out) = run_once(&f, UID, &["hello"], Duration::from_secs(20)).await;
    let stdout = text(&outcome.stdout);
    assert_eq!(outcome.exit_code, Some(3), "{outcome:?}");
    assert!(
        stdout.contains(&format!("uid={UID} gid={UID} host=kiln-jail")),
        "{stdout}"
    );
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("CapPrm:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
    assert_eq!(text(&outcome.stderr), "to stderr\n");
    assert_eq!(out.unwrap(), b"made in the jail\n");
}

#[tokio::test]
async fn has_no_network() {
    const UID: u32 = 64101;
    let f = fixture(1);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let (outcome, _) = run_once(&f, UID, &["net", &port], Duration::from_secs(20)).await;
    let stdout = text(&outcome.stdout);
    assert!(
        stdout.starts_with("connect ") && !stdout.contains("connect ok"),
        "{stdout}"
    );
    assert!(
        listener.accept().is_err(),
        "the jail reached the host's loopback"
    );
}

#[tokio::test]
async fn cannot_see_host_files_or_write_outside_its_layer() {
    const UID: u32 = 64102;
    let f = fixture(1);
    let secret = f.work.parent().unwrap().join("host-secret");
    std::fs::write(&secret, b"secret").unwrap();
    let secret = secret.to_str().unwrap().to_string();
    let (outcome, _) = run_once(
        &f,
        UID,
        &["read", &secret, "/etc/shadow", "/etc/hostname", "/etc/motd"],
        Duration::from_secs(20),
    )
    .await;
    let stdout = text(&outcome.stdout);
    assert!(
        stdout.contains(&format!("{secret} No such file")),
        "{stdout}"
    );
    assert!(stdout.contains("/etc/shadow No such file"), "{stdout}");
    assert!(stdout.contains("/etc/hostname No such file"), "{stdout}");
    assert!(
        stdout.contains("/etc/motd ok"),
        "the image is not visible: {stdout}"
    );

    let planted = f.work.parent().unwrap().join("planted");
    let planted = planted.to_str().unwrap().to_string();
    let (outcome, _) = run_once(
        &f,
        UID,
        &[
            "write",
            "/etc/motd",
            "/usr/bin/evil",
            "/tmp/scratch",
            &planted,
            "/job/fine",
        ],
        Duration::from_secs(20),
    )
    .await;
    let stdout = text(&outcome.stdout);
    if f.pool.backend().rootless() {
        // On a rootless jail the image is the builder's, whose id the job's user namespace
        // maps to the job: it may change its own copy of it, in its own layer, and nothing else.
        assert!(stdout.contains("/etc/motd ok"), "{stdout}");
        let images = f.work.join("images");
        for image in std::fs::read_dir(&images).unwrap() {
            let motd = image.unwrap().path().join("etc/motd");
            let len = std::fs::metadata(&motd).unwrap().len();
            assert!(
                len > 0,
                "the job wrote through to the image: {}",
                motd.display()
            );
        }
    } else {
        assert!(stdout.contains("/etc/motd Permission denied"), "{stdout}");
        assert!(
            stdout.contains("/usr/bin/evil Permission denied"),
            "{stdout}"
        );
    }
    assert!(stdout.contains("/tmp/scratch ok"), "{stdout}");
    assert!(stdout.contains("/job/fine ok"), "{stdout}");
    assert!(!Path::new(&planted).exists(), "a job wrote to the host");
    assert!(!Path::new("/usr/bin/evil").exists());
    assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
}

#[tokio::test]
async fn a_fork_bomb_is_bounded_and_everything_dies_at_the_limit() {
    const UID: u32 = 64103;
    let f = fixture(1);
    let started = std::time::Instant::now();
    let (outcome, _) = run_once(&f, UID, &["forkbomb", "bomb-64103"], Duration::from_secs(2)).await;
    let stdout = text(&outcome.stdout);
    let forked: usize = stdout
        .trim()
        .strip_prefix("forked ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout:?} {outcome:?}"));
    assert!(forked < 32, "forked {forked} processes past the limit");
    assert_eq!(outcome.signal, Some(9));
    assert!(
        outcome
            .killed
            .as_deref()
            .unwrap_or("")
            .starts_with("time limit"),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        processes_tagged("bomb-64103"),
        0,
        "processes of the job outlived it"
    );
}

#[tokio::test]
async fn a_job_past_its_time_is_killed_with_its_detached_children() {
    const UID: u32 = 64104;
    let f = fixture(1);
    let (outcome, _) = run_once(&f, UID, &["spin", "spin-64104"], Duration::from_millis(500)).await;
    assert_eq!(outcome.exit_code, None);
    assert!(
        outcome
            .killed
            .as_deref()
            .unwrap_or("")
            .starts_with("time limit"),
        "{outcome:?}"
    );
    assert_eq!(
        processes_tagged("spin-64104"),
        0,
        "a setsid child escaped the kill"
    );
}

#[tokio::test]
async fn an_output_link_out_of_the_jail_is_refused() {
    const UID: u32 = 64105;
    let f = fixture(1);
    f.pool.prepare("probe", f.archive.clone()).await.unwrap();
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    give(&f.pool, &root, "/job", UID);
    let outcome = f
        .pool
        .run(
            &lease,
            spec(
                UID,
                &["symlink", "/etc/passwd", "/job/out.o"],
                Duration::from_secs(20),
            ),
        )
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    let err = Root::open(lease.outputs())
        .unwrap()
        .read_file(Path::new("/job/out.o"), 1 << 20)
        .unwrap_err();
    assert!(err.to_string().contains("symlink"), "{err}");
    f.pool.checkin(lease);
}

#[tokio::test]
async fn containers_are_reset_and_reused_and_leftovers_cleaned() {
    const UID: u32 = 64106;
    let f = fixture(1);
    let (_, out) = run_once(&f, UID, &["hello"], Duration::from_secs(20)).await;
    assert!(out.is_some());
    // Wait for the background reset to put the container back.
    for _ in 0..200 {
        if f.pool.ready_counts().get("probe") == Some(&1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.pool.ready_counts().get("probe"), Some(&1));
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.outputs()).unwrap();
    assert_eq!(
        root.read_file(Path::new("/job/out.txt"), 100).unwrap(),
        None,
        "reset left files"
    );
    f.pool.checkin(lease);
    f.pool.shutdown().await;

    // A builder that died leaves mounts behind; a new one removes them.
    let helper = Path::new(env!("CARGO_BIN_EXE_kiln-jail"));
    let jail = LinuxJail::new(&f.work, helper, Limits::default()).unwrap();
    let image = jail.make_image("again", &f.archive).unwrap();
    let _container = jail.make_container(&image).unwrap();
    let jail = LinuxJail::new(&f.work, helper, Limits::default()).unwrap();
    assert!(jail.cleanup_leftovers().unwrap() >= 2);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(f.work.to_str().unwrap()),
        "mounts left under the work dir"
    );
}

#[tokio::test]
async fn a_job_over_its_memory_limit_is_killed_and_reported() {
    const UID: u32 = 64_107;
    if !Path::new("/sys/fs/cgroup/memory").is_dir()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        eprintln!("no memory cgroup on this machine: nothing to test");
        return;
    }
    let f = fixture(1);
    f.pool.prepare("probe", f.archive.clone()).await.unwrap();
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    give(&f.pool, &root, "/job", UID);
    let mut small = spec(UID, &["alloc", "256"], Duration::from_secs(20));
    small.limits.memory = 64 << 20;
    let outcome = f.pool.run(&lease, small).await.unwrap();
    if f.pool.backend().rootless() {
        // No memory cgroup is delegated here: the address space is bounded per process, and
        // the allocation fails instead.
        assert!(
            text(&outcome.stdout).starts_with("malloc failed"),
            "{outcome:?}"
        );
    } else {
        assert_eq!(outcome.signal, Some(9), "{outcome:?}");
        assert_eq!(
            outcome.killed.as_deref(),
            Some("memory limit"),
            "{outcome:?}"
        );
    }
    // Within the limit, the same job runs.
    let mut fits = spec(UID, &["alloc", "16"], Duration::from_secs(20));
    fits.limits.memory = 64 << 20;
    let outcome = f.pool.run(&lease, fits).await.unwrap();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    f.pool.checkin(lease);
}

#[tokio::test]
async fn a_job_given_up_on_is_killed_when_its_container_is_reset() {
    const UID: u32 = 64_108;
    let f = fixture(1);
    f.pool.prepare("probe", f.archive.clone()).await.unwrap();
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    give(&f.pool, &root, "/job", UID);
    // The builder stops waiting (its client went away): the run is dropped mid-way, once the
    // job is seen running.
    const TAG: &str = "given-up-64108";
    let mut run = Box::pin(
        f.pool
            .run(&lease, spec(UID, &["spin", TAG], Duration::from_secs(60))),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while processes_tagged(TAG) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never started"
        );
        tokio::select! {
            _ = &mut run => panic!("a spinning job finished"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    drop(run);
    f.pool.checkin(lease);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while processes_tagged(TAG) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned job kept running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn inputs_linked_from_the_builder_are_never_written_through() {
    const UID: u32 = 64_109;
    let f = fixture(1);
    // The builder's own copy, as its input store keeps it; writable by anyone, the worst case
    // a careless umask could leave.
    let kept = f.work.parent().unwrap().join("kept.h");
    std::fs::write(&kept, b"#define KEPT 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o666)).unwrap();
    f.pool.prepare("probe", f.archive.clone()).await.unwrap();
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    let mut placer = Placer::new(&root, f.pool.backend().links_inputs());
    placer
        .link_or_copy(Path::new("/job/kept.h"), &kept, false)
        .unwrap();
    drop(placer);
    give(&f.pool, &root, "/job", UID);
    let outcome = f
        .pool
        .run(
            &lease,
            spec(UID, &["write", "/job/kept.h"], Duration::from_secs(20)),
        )
        .await
        .unwrap();
    assert!(
        text(&outcome.stdout).contains("/job/kept.h ok"),
        "{outcome:?}"
    );
    // The job truncated its own copy in its layer; the builder's file is as it was.
    assert_eq!(std::fs::read(&kept).unwrap(), b"#define KEPT 1\n");
    let written = Root::open(lease.outputs())
        .unwrap()
        .read_file(Path::new("/job/kept.h"), 100)
        .unwrap();
    assert_eq!(written.as_deref(), Some(&b""[..]));
    f.pool.checkin(lease);
}

/// The lines of the probe's `escape` report, as (call, how it ended).
fn escape_report(stdout: &str) -> std::collections::HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn a_job_gets_eperm_for_namespaces_mounts_keyrings_and_kernel_interfaces() {
    const UID: u32 = 64_110;
    let f = fixture(1);
    let (outcome, _) = run_once(&f, UID, &["escape"], Duration::from_secs(20)).await;
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    let report = escape_report(&text(&outcome.stdout));
    for call in [
        "unshare-user",
        "unshare-net",
        "clone-newuser",
        "setns",
        "mount",
        "keyctl",
        "bpf",
        "perf_event_open",
        "ptrace",
        "userfaultfd",
        "vsock",
        "af_alg",
    ] {
        assert_eq!(
            report.get(call).map(String::as_str),
            Some("Operation not permitted"),
            "{call}: {report:?}"
        );
    }
    // clone3's flags cannot be filtered: it is sent back to clone, whose flags are.
    assert_eq!(
        report.get("clone3").map(String::as_str),
        Some("Function not implemented")
    );
    // What compilers do still works.
    assert_eq!(report.get("fork").map(String::as_str), Some("ok"));
    assert_eq!(report.get("unix-socket").map(String::as_str), Some("ok"));
    assert_eq!(report.get("thread").map(String::as_str), Some("ok"));
}

#[tokio::test]
async fn keyrings_and_ipc_objects_do_not_pass_from_one_job_to_the_next() {
    // Both jobs as one slot's uid, as two clients' jobs in one slot would be.
    const UID: u32 = 64_111;
    let f = fixture(1);
    let (put, _) = run_once(
        &f,
        UID,
        &["key-put", "alice-token"],
        Duration::from_secs(20),
    )
    .await;
    let (ipc, _) = run_once(
        &f,
        UID,
        &["ipc-put", "alice-token"],
        Duration::from_secs(20),
    )
    .await;
    assert!(
        text(&ipc.stdout).contains("shmget ok"),
        "the job could not make its own IPC objects: {ipc:?}"
    );
    let (keys, _) = run_once(&f, UID, &["key-get"], Duration::from_secs(20)).await;
    let (shm, _) = run_once(&f, UID, &["ipc-get"], Duration::from_secs(20)).await;
    for later in [&keys, &shm] {
        assert!(
            !text(&later.stdout).contains("alice-token"),
            "a later job read an earlier one's secret: {}\n(the earlier job: {})",
            text(&later.stdout),
            text(&put.stdout)
        );
    }
    assert!(
        text(&put.stdout).contains("add_key Operation not permitted"),
        "{put:?}"
    );
    let shm = text(&shm.stdout);
    assert!(shm.contains("shmget No such file"), "{shm}");
    assert!(shm.contains("mq_open No such file"), "{shm}");
}

#[tokio::test]
async fn the_mount_table_and_proc_show_nothing_of_the_builder() {
    const UID: u32 = 64_112;
    let f = fixture(1);
    let (outcome, _) = run_once(
        &f,
        UID,
        &[
            "cat",
            "/proc/self/mountinfo",
            "/proc/self/cgroup",
            "/proc/keys",
        ],
        Duration::from_secs(20),
    )
    .await;
    let seen = text(&outcome.stdout);
    assert!(seen.contains(" / / "), "no root mount listed: {seen}");
    let work = f.work.to_str().unwrap();
    assert!(!seen.contains(work), "the builder's paths show: {seen}");
    let pid = format!("{}-", std::process::id());
    assert!(!seen.contains(&pid), "the builder's pid shows: {seen}");
    // Keys are not namespaced: /proc/keys is /dev/null in the jail.
    assert!(seen.contains(" /null /proc/keys "), "{seen}");
}

#[tokio::test]
async fn tmp_stays_writable_when_the_inputs_live_under_it() {
    const UID: u32 = 64_113;
    let f = fixture(1);
    let source = f.work.parent().unwrap().join("x.c");
    std::fs::write(&source, b"int x;\n").unwrap();
    f.pool.prepare("probe", f.archive.clone()).await.unwrap();
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    let mut placer = Placer::new(&root, f.pool.backend().links_inputs());
    placer
        .link_or_copy(Path::new("/tmp/proj/x.c"), &source, false)
        .unwrap();
    drop(placer);
    give(&f.pool, &root, "/tmp/proj", UID);
    let mut run = spec(
        UID,
        &["write", "/tmp/ccTemp.s", "/tmp/proj/x.o"],
        Duration::from_secs(20),
    );
    run.cwd = "/tmp/proj".into();
    let outcome = f.pool.run(&lease, run).await.unwrap();
    let stdout = text(&outcome.stdout);
    // gcc writes its temporary files to /tmp, whoever made the directory.
    assert!(stdout.contains("/tmp/ccTemp.s ok"), "{stdout}");
    assert!(stdout.contains("/tmp/proj/x.o ok"), "{stdout}");
    f.pool.checkin(lease);
}

#[tokio::test]
async fn a_job_that_fills_its_disk_fails_as_itself_and_the_container_goes_on() {
    const UID: u32 = 64_114;
    let f = fixture(1);
    let (outcome, _) = run_once(&f, UID, &["fill", "/job/big"], Duration::from_secs(20)).await;
    assert_eq!(outcome.exit_code, Some(1), "{outcome:?}");
    assert_eq!(
        outcome.killed.as_deref(),
        Some(format!("disk limit ({} bytes)", 64 << 20).as_str()),
        "{}",
        text(&outcome.stdout)
    );
    // The next job in the same container finds it reset and runs.
    let (next, out) = run_once(&f, UID, &["hello"], Duration::from_secs(20)).await;
    assert_eq!(next.exit_code, Some(3), "{next:?}");
    assert_eq!(next.killed, None);
    assert!(out.is_some());
}

#[tokio::test]
async fn a_jobs_exit_status_is_its_own_whatever_it_is() {
    const UID: u32 = 64_115;
    let f = fixture(1);
    // 125 is what the jail's init exits with when it fails; a job may exit with it too, and it
    // is then the job's result, not the builder's failure.
    let (outcome, _) = run_once(&f, UID, &["exit", "125"], Duration::from_secs(20)).await;
    assert_eq!(outcome.exit_code, Some(125), "{outcome:?}");
    // A command the toolchain lacks is the job's failure too (127, as shells say).
    f.pool.prepare("probe", f.archive.clone()).await.unwrap();
    let lease = f.pool.checkout("probe").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    give(&f.pool, &root, "/job", UID);
    let mut missing = spec(UID, &[], Duration::from_secs(20));
    missing.argv = vec!["/usr/bin/not-in-the-toolchain".into()];
    let outcome = f.pool.run(&lease, missing).await.unwrap();
    assert_eq!(outcome.exit_code, Some(127), "{outcome:?}");
    assert!(
        text(&outcome.stderr).contains("not-in-the-toolchain"),
        "{outcome:?}"
    );
    f.pool.checkin(lease);
}
