//! The farm under what real builds do to it (issue 15): a build interrupted with Ctrl-C, a
//! scheduler restarted or frozen mid-build. Real make, real signals, real jails.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_tests::sample::{project, stat};
use kiln_tests::{kiln_bin, ok, Farm, Project};

/// Sources that each keep the compiler busy for a while, so a build can be interrupted while
/// the farm runs them, and a Makefile that compiles them through kiln.
fn slow_project(farm: &Farm, files: usize) -> Project {
    let p = project(farm);
    let mut objects = Vec::new();
    for n in 0..files {
        let mut text = String::from("#include \"util.h\"\n");
        for i in 0..1200 {
            text.push_str(&format!(
                "int f{n}_{i}(int x) {{ int s = 0; for (int j = 0; j < x; j++) s += (j * {i}) % 7 + helper(j); return s; }}\n"
            ));
        }
        p.write(&format!("src/slow{n}.c"), &text);
        objects.push(format!("slow{n}.o"));
    }
    p.write(
        "Makefile",
        &format!(
            "CC = {kiln} gcc\nOBJS = {objs}\nall: $(OBJS)\n%.o: src/%.c\n\t$(CC) $(CFLAGS) -O2 -Iinc -c $< -o $@\nclean:\n\trm -f $(OBJS)\n",
            kiln = kiln_bin().display(),
            objs = objects.join(" "),
        ),
    );
    kiln_tests::settle();
    p
}

/// `make -j4 CFLAGS=<cflags>` in a process group of its own, so it can be interrupted as a
/// terminal's Ctrl-C would: the signal goes to make and every compile it started.
fn spawn_make(p: &Project, cflags: &str) -> Child {
    use std::os::unix::process::CommandExt;
    p.command("make")
        .args(["-j4", &format!("CFLAGS={cflags}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("make runs")
}

/// Waits until the scheduler has at least `n` jobs placed on builders and a compiler proper
/// runs on one of the slow sources.
fn wait_for_farm_jobs(farm: &Farm, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = farm.status();
        let placed = status["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| !j["builder"].as_str().unwrap_or_default().is_empty())
            .count();
        if placed >= n && cc1_running("slow") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} jobs never ran on the farm: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cc1_running(source: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        cmd.contains("cc1") && cmd.contains(source)
    })
}

/// Waits until every builder reports all its slots free, as its `/metrics` says.
fn wait_for_idle_builders(farm: &Farm, builders: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let busy: Vec<f64> = (0..builders)
            .map(|i| farm.builder_metrics(i)["kiln_builder_slots_busy"])
            .collect();
        if busy.iter().all(|b| *b == 0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "builders still report busy slots with no build running: {busy:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_interrupted_build_and_a_restarted_scheduler_leave_the_farm_whole() {
    let mut farm = Farm::start(2, 2);
    let p = slow_project(&farm, 4);

    // Ctrl-C while the builders run the build's jobs.
    let make = spawn_make(&p, "-DROUND=1");
    wait_for_farm_jobs(&farm, 1);
    let pgid = make.id().to_string();
    let killed = Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = make.wait_with_output().unwrap();
    assert!(!out.status.success(), "make was not interrupted");

    // The scheduler restarted (gracefully) while the next build runs on the farm.
    let make = spawn_make(&p, "-DROUND=2");
    wait_for_farm_jobs(&farm, 1);
    farm.restart_scheduler();
    // Jobs the old scheduler had in flight compile locally; the build itself succeeds.
    ok(&make.wait_with_output().unwrap());
    farm.wait_for_builders(2);

    // Every job of the earlier builds ended on the builders, however it ended.
    wait_for_idle_builders(&farm, 2);
    let status = farm.status();
    for b in status["builders"].as_array().unwrap() {
        assert_eq!(b["running"], 0, "{status}");
    }

    // The next build compiles on the farm, every object of it.
    let before = (stat(&p, "dist_compiles"), stat(&p, "dist_fallbacks"));
    ok(&p.command("make").arg("clean").output().unwrap());
    let out = p
        .command("make")
        .args(["-j4", "CFLAGS=-DROUND=3"])
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(
        (stat(&p, "dist_compiles"), stat(&p, "dist_fallbacks")),
        (before.0 + 4, before.1),
        "the build after the interruption did not compile on the farm: {}",
        p.stats()
    );
    let done: u64 = farm.status()["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["jobs_done"].as_u64().unwrap())
        .sum();
    assert_eq!(done, 4, "{}", farm.status());
}
