//! The per-user agent: compiles of a build share one connection to the scheduler, and an agent
//! that is missing, dead, frozen or replaced costs a compile nothing but the direct connection
//! it would have made anyway. The scheduler is reached through a relay that counts connections.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::link::Shape;
use kiln_tests::sample::{project, stat};
use kiln_tests::{ok, Farm, Project};

/// A project of `farm` whose scheduler is reached through a counting relay.
fn linked(farm: &Farm) -> (Project, std::sync::Arc<kiln_tests::link::Counts>) {
    let (url, counts) = farm.link(Shape::default());
    let mut p = project(farm);
    for (k, v) in p.env.iter_mut() {
        if k == "KILN_SCHEDULER" {
            *v = url.clone();
        }
    }
    (p, counts)
}

/// Compiles a source of its own (so it misses the cache) through the farm.
fn compile(p: &Project, n: usize) {
    let source = format!("src/f{n}.c");
    p.write(&source, &format!("int f{n}(int x) {{ return x * {n}; }}\n"));
    ok(&p.kiln(&["gcc", "-c", &source, "-o", &format!("f{n}.o")]));
}

/// The agent's socket in `p`'s cache directory, once it is there.
fn agent_socket(p: &Project) -> PathBuf {
    let dir = p.cache.join("agent");
    wait_for(&format!("an agent socket in {}", dir.display()), || {
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|path| {
                path.extension().is_some_and(|e| e == "sock")
                    && std::os::unix::net::UnixStream::connect(path).is_ok()
            })
    })
}

/// The pid of the agent serving `socket`, from its lock file.
fn agent_pid(socket: &Path) -> i32 {
    let text = std::fs::read_to_string(socket.with_extension("lock")).unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid in the lock file: {text:?}"))
}

/// Waits for `what` to come true; the bound is for a broken build, not part of the test.
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    // A zombie has given up its socket and its lock: as good as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn signal(pid: i32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

#[test]
fn compiles_share_the_agents_one_connection() {
    let farm = Farm::start(1, 4);
    let (p, counts) = linked(&farm);
    // The first compile finds no agent: it connects itself and starts one.
    compile(&p, 0);
    assert_eq!(counts.connections(), 1);
    let socket = agent_socket(&p);
    for n in 1..=6 {
        compile(&p, n);
    }
    assert_eq!(stat(&p, "dist_compiles"), 7, "{}", p.stats());
    assert_eq!(stat(&p, "dist_fallbacks"), 0, "{}", p.stats());
    assert_eq!(
        counts.connections(),
        2,
        "six compiles through the agent should share its one connection"
    );
    // Without the agent, each compile pays for a connection of its own.
    let mut direct = p;
    direct.env.push(("KILN_AGENT".into(), "0".into()));
    for n in 7..=9 {
        compile(&direct, n);
    }
    assert_eq!(counts.connections(), 5);
    assert_eq!(stat(&direct, "dist_compiles"), 10, "{}", direct.stats());

    // The agent leaves when its socket does (a removed cache directory, a tidy-up).
    let pid = agent_pid(&socket);
    std::fs::remove_file(&socket).unwrap();
    wait_for("the agent to exit", || (!alive(pid)).then_some(()));
}

#[test]
fn a_dead_frozen_or_impostor_agent_costs_a_compile_nothing() {
    let farm = Farm::start(1, 4);
    let (p, _counts) = linked(&farm);
    compile(&p, 0);
    let socket = agent_socket(&p);
    let first = agent_pid(&socket);

    // Killed: its socket stays behind, refusing connections.
    signal(first, "-KILL");
    wait_for("the agent to die", || (!alive(first)).then_some(()));
    compile(&p, 1);
    // That compile started a new agent, which replaced the dead one's socket.
    let second = wait_for("a new agent", || {
        let socket = agent_socket(&p);
        let pid = agent_pid(&socket);
        (pid != first).then_some(pid)
    });
    compile(&p, 2);

    // Frozen: the kernel takes the connection but nobody answers.
    signal(second, "-STOP");
    compile(&p, 3);
    signal(second, "-CONT");
    compile(&p, 4);

    // Not an agent at all: a plain file where the socket should be.
    signal(second, "-KILL");
    wait_for("the agent to die", || (!alive(second)).then_some(()));
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, "not a socket").unwrap();
    compile(&p, 5);
    compile(&p, 6);

    assert_eq!(stat(&p, "dist_compiles"), 7, "{}", p.stats());
    assert_eq!(stat(&p, "dist_fallbacks"), 0, "{}", p.stats());
}

#[test]
fn an_agent_serves_only_its_own_user() {
    let farm = Farm::start(1, 1);
    let (p, _counts) = linked(&farm);
    compile(&p, 0);
    let socket = agent_socket(&p);
    use std::os::unix::fs::PermissionsExt;
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    let socket_mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    assert_eq!(socket_mode & 0o777, 0o600);

    // A directory others can write to is not used: kiln compiles without an agent and says
    // why when asked to serve one.
    let other = Project::new();
    let mut env = p.env.clone();
    env.retain(|(k, _)| k != "KILN_DIR");
    std::fs::create_dir_all(other.cache.join("agent")).unwrap();
    std::fs::set_permissions(
        other.cache.join("agent"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let mut cmd = other.command(kiln_tests::kiln_bin());
    cmd.envs(env).args(["agent", "--idle", "1"]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a private directory"), "{stderr}");
    // Compiles there go to the farm directly, and leave the directory as it was.
    let mut other = other;
    other.env = p.env.clone();
    compile(&other, 1);
    compile(&other, 2);
    assert_eq!(stat(&other, "dist_compiles"), 2, "{}", other.stats());
    let left: Vec<_> = std::fs::read_dir(other.cache.join("agent"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn fallbacks_reach_the_schedulers_metrics_by_client_and_cause() {
    let mut farm = Farm::start(1, 1);
    let (p, _counts) = linked(&farm);
    compile(&p, 0);
    agent_socket(&p);
    // With no builder the scheduler has nowhere to place a job: the compile runs here.
    farm.kill_builder(0);
    compile(&p, 1);
    compile(&p, 2);
    assert_eq!(stat(&p, "dist_fallbacks"), 2, "{}", p.stats());
    let by_cause = p.stats()["dist_fallbacks_by_cause"].clone();
    let (cause, _) = by_cause
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, n)| n.as_i64() == Some(2))
        .unwrap_or_else(|| panic!("one cause for both fallbacks: {by_cause}"));
    // Labelled with the name of the client's token, which kiln-scheduler init wrote first in
    // its tokens file.
    let tokens = std::fs::read_to_string(farm.secret("client-tokens")).unwrap();
    let client = tokens
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let line =
        format!("kiln_scheduler_client_fallbacks_total{{client=\"{client}\",cause=\"{cause}\"}}");
    let reported = wait_for(&format!("{line} in the scheduler's metrics"), || {
        farm.metrics().get(&line).copied().filter(|n| *n >= 2.0)
    });
    assert_eq!(reported, 2.0);
    // And on the dashboard's data, for an operator who is not scraping.
    let shown = farm.dashboard()["fallbacks"].clone();
    assert!(
        shown
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["client"] == client.as_str()
                && f["cause"] == cause.as_str()
                && f["count"] == 2),
        "{shown}"
    );
}
