//! The farm end to end: a scheduler and two builders in this process, real Linux jails, real
//! gcc and clang. Remote objects must be byte-identical to local ones, `-g` included.

use kiln_tests::sample::{project, remote_matches_local, stat, C_SOURCE, HEADER};
use kiln_tests::{ok, Farm, Project};
use prost::bytes as prost_bytes;

#[test]
fn dist_objects_are_byte_identical_with_debug_info_and_toolchains_travel_once() {
    let farm = Farm::start(2, 2);
    let p = project(&farm);
    let mut n = 0;
    for compiler in ["gcc", "clang"] {
        for flags in [
            &["-g", "-O2"][..],
            &["-O0"][..],
            &["-g", "-gsplit-dwarf", "-O1"][..],
        ] {
            let mut args = vec![compiler, "-c", "src/main.c", "-o", "main.o", "-Iinc"];
            args.extend(flags);
            remote_matches_local(&p, &args, "main.o");
            n += 1;
            // Forget the result so the next round goes to the farm again.
            p.kiln(&["clear"]);
        }
    }
    for compiler in ["g++", "clang++"] {
        let args = [
            compiler,
            "-c",
            "src/map.cc",
            "-o",
            "map.o",
            "-Iinc",
            "-g",
            "-O2",
            "-MD",
            "-MF",
            "map.d",
        ];
        remote_matches_local(&p, &args, "map.o");
        n += 1;
    }
    assert_eq!(stat(&p, "dist_compiles"), n, "{}", p.stats());
    assert_eq!(stat(&p, "dist_fallbacks"), 0, "{}", p.stats());

    // Every toolchain reached each builder at most once.
    let status = farm.status();
    for b in status["builders"].as_array().unwrap() {
        let received = b["toolchains_received"].as_u64().unwrap();
        let held = b["toolchains"].as_u64().unwrap();
        assert_eq!(received, held, "a toolchain was sent twice to {b}");
        assert!(held <= 4, "{b}");
    }
    assert_eq!(status["jobs_done"].as_u64().unwrap(), n as u64);
}

#[test]
fn a_dist_result_is_cached_like_a_local_one() {
    let farm = Farm::start(1, 2);
    let p = project(&farm);
    let args = ["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc", "-g"];
    ok(&p.kiln(&args));
    ok(&p.kiln(&args));
    assert_eq!(stat(&p, "dist_compiles"), 1);
    assert_eq!(stat(&p, "hits"), 1);
    // The manifest knows the header the builder read: editing it is a miss.
    p.write("inc/util.h", &HEADER.replace("3", "4"));
    kiln_tests::settle();
    remote_matches_local(&p, &args, "main.o");
    assert_eq!(stat(&p, "dist_compiles"), 2);
}

#[test]
fn compile_errors_from_the_farm_are_the_compilers_own() {
    let farm = Farm::start(1, 1);
    let p = project(&farm);
    p.write("src/bad.c", "int f(void) { return undeclared_thing; }\n");
    let remote = p.kiln(&["gcc", "-c", "src/bad.c", "-o", "bad.o"]);
    let local = p.bare(&["gcc", "-c", "src/bad.c", "-o", "bad.o"]);
    assert_eq!(remote.status.code(), local.status.code());
    assert_eq!(
        String::from_utf8_lossy(&remote.stderr),
        String::from_utf8_lossy(&local.stderr)
    );
    assert_eq!(stat(&p, "dist_compiles"), 1);
    assert_eq!(stat(&p, "compile_failed"), 1);
}

#[test]
fn the_build_goes_on_when_the_farm_cannot_help() {
    // A scheduler address where nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut p = Project::new();
    p.env.push(("KILN_SCHEDULER".into(), url));
    p.write("inc/util.h", HEADER);
    p.write("src/main.c", C_SOURCE);
    ok(&p.kiln(&["--dist", "gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc"]));
    assert!(p.path("main.o").exists());
    assert_eq!(p.stats()["dist_fallbacks_by_cause"]["unreachable"], 1);

    // A scheduler with no builders says so at once.
    let farm = Farm::start(0, 1);
    let p = project(&farm);
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc"]));
    assert_eq!(p.stats()["dist_fallbacks_by_cause"]["no_builders"], 1);

    // -march=native depends on this machine and stays here.
    ok(&p.kiln(&[
        "gcc",
        "-march=native",
        "-c",
        "src/main.c",
        "-o",
        "n.o",
        "-Iinc",
    ]));
    assert_eq!(p.stats()["dist_fallbacks_by_cause"]["unsupported"], 1);
}

/// Starts `kiln <args>` without waiting for it.
fn spawn_kiln(p: &Project, args: &[&str]) -> std::process::Child {
    p.command(kiln_tests::kiln_bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// A source that takes the compiler a while, so a builder can be killed in the middle.
/// Writes a source that takes a while to compile as `src/NAME`. Each test names its own: tests
/// run side by side and find their compile by its file name among every process's.
fn slow_source(p: &Project, name: &str) {
    let mut text = String::from("#include \"util.h\"\n");
    for i in 0..3000 {
        text.push_str(&format!(
            "int f{i}(int x) {{ int s = 0; for (int j = 0; j < x; j++) s += (j * {i}) % 7 + helper(j); return s; }}\n"
        ));
    }
    p.write(&format!("src/{name}"), &text);
    kiln_tests::settle();
}

/// Waits until a compiler proper (`cc1`) runs on `source`: on the farm, once the builder has
/// every input (the scheduler counts a job as running from its placement).
fn wait_for_cc1(source: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let running = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("cc1") && cmd.contains(source)
        });
        if running {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the compile never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_header_edited_while_the_farm_compiles_is_not_stored_as_it_was_read() {
    // The include scan read util.h before the job left; the cache must not record that
    // content for a compile whose header changed before it was stored.
    let farm = Farm::start(1, 1);
    let p = project(&farm);
    slow_source(&p, "slow_edit.c");
    let args = [
        "gcc",
        "-c",
        "src/slow_edit.c",
        "-o",
        "slow.o",
        "-O2",
        "-Iinc",
    ];
    let child = spawn_kiln(&p, &args);
    wait_for_cc1("slow_edit.c");
    p.write("inc/util.h", &format!("{HEADER}/* edited */\n"));
    ok(&child.wait_with_output().unwrap());
    let s = p.stats();
    assert_eq!(s["dist_compiles"].as_i64(), Some(1), "{s}");
    assert_eq!(
        s["uncacheable_by_reason"]["modified_during_compile"].as_i64(),
        Some(1),
        "{s}"
    );
    // Nothing was stored, so the next compile is not a hit.
    kiln_tests::settle();
    ok(&p.kiln(&args));
    assert_eq!(stat(&p, "hits"), 0, "{}", p.stats());
    assert_eq!(stat(&p, "dist_compiles"), 2, "{}", p.stats());
}

#[test]
fn a_builder_killed_mid_job_does_not_fail_the_build() {
    let mut farm = Farm::start(2, 1);
    let p = project(&farm);
    slow_source(&p, "slow_killed.c");
    let args = [
        "gcc",
        "-c",
        "src/slow_killed.c",
        "-o",
        "slow.o",
        "-O2",
        "-Iinc",
    ];
    let child = spawn_kiln(&p, &args);
    // Wait until the job runs on a builder, then kill that builder.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let victim = loop {
        let status = farm.status();
        let running = status["jobs"]
            .as_array()
            .and_then(|jobs| jobs.first())
            .and_then(|j| j["builder"].as_str())
            .filter(|b| !b.is_empty())
            .map(str::to_owned);
        let busy = status["builders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["running"].as_u64() == Some(1));
        if let (Some(name), true) = (running, busy) {
            break name;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never started: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let index: usize = victim.trim_start_matches("builder").parse().unwrap();
    farm.kill_builder(index);
    let out = child.wait_with_output().unwrap();
    ok(&out);
    let remote = p.read("slow.o");
    ok(&p.bare(&args));
    assert_eq!(remote, p.read("slow.o"));
    // The scheduler placed it again on the other builder.
    assert_eq!(stat(&p, "dist_compiles"), 1, "{}", p.stats());
    let status = farm.status();
    assert_eq!(status["builders"].as_array().unwrap().len(), 1);
    assert!(status["jobs_failed"].as_u64().unwrap() >= 1);
}

#[test]
fn builders_rejoin_a_restarted_scheduler_and_jobs_flow_again() {
    let mut farm = Farm::start(2, 1);
    let p = project(&farm);
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "a.o", "-Iinc"]));
    farm.restart_scheduler();
    farm.wait_for_builders(2);
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "b.o", "-Iinc", "-DAGAIN"]));
    assert_eq!(stat(&p, "dist_compiles"), 2, "{}", p.stats());
    // The new scheduler learned which toolchains the builders already hold.
    let held: u64 = farm.status()["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["toolchains"].as_u64().unwrap())
        .sum::<u64>();
    assert!(held >= 1);
}

#[test]
fn dist_status_lists_builders() {
    let farm = Farm::start(2, 3);
    let p = farm.project();
    let out = p.kiln(&["dist-status", "--json"]);
    ok(&out);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let builders = doc["builders"].as_array().unwrap();
    assert_eq!(builders.len(), 2);
    assert!(builders
        .iter()
        .all(|b| b["slots"] == 3 && b["jail"] == "linux"));
    let text = p.kiln(&["dist-status"]);
    ok(&text);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("builder0") && text.contains("builder1"),
        "{text}"
    );
}

#[test]
fn peers_of_another_protocol_version_are_refused_with_both_versions_named() {
    use kiln_proto::v1::{from_builder, from_client, FromBuilder, FromClient, JobSpec, Register};
    let farm = Farm::start(0, 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = farm.grpc().await;
        let spec = FromClient {
            msg: Some(from_client::Msg::Spec(JobSpec {
                protocol_version: 99,
                ..JobSpec::default()
            })),
        };
        let err = client
            .compile(tokio_stream::iter(vec![spec]))
            .await
            .expect_err("a v99 client was accepted");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("v99") && err.message().contains("v1"),
            "{}",
            err.message()
        );

        let register = FromBuilder {
            msg: Some(from_builder::Msg::Register(Register {
                protocol_version: 99,
                name: "old".into(),
                os: "linux".into(),
                arch: "x86_64".into(),
                slots: 1,
                ..Register::default()
            })),
        };
        let mut client = farm
            .grpc_with(kiln_net::auth::Credential::File(
                farm.secret("builder.token"),
            ))
            .await;
        let err = client
            .join(tokio_stream::iter(vec![register]))
            .await
            .expect_err("a v99 builder was accepted");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("builder speaks kiln protocol v99"),
            "{}",
            err.message()
        );
    });
    assert_eq!(farm.status()["builders"].as_array().unwrap().len(), 0);
}

#[test]
fn a_new_builder_gets_the_toolchain_from_the_scheduler_not_the_client() {
    let mut farm = Farm::start(1, 1);
    let p = project(&farm);
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "a.o", "-Iinc"]));
    assert_eq!(stat(&p, "dist_toolchain_uploads"), 1);
    // The only builder that holds it goes away; a fresh one takes its place.
    farm.start_builder(1);
    farm.wait_for_builders(2);
    farm.kill_builder(0);
    farm.wait_for_builders(1);
    remote_matches_local(
        &p,
        &["gcc", "-c", "src/main.c", "-o", "b.o", "-Iinc", "-DB"],
        "b.o",
    );
    assert_eq!(stat(&p, "dist_compiles"), 2);
    assert_eq!(
        stat(&p, "dist_toolchain_uploads"),
        1,
        "the client sent the toolchain again"
    );
    let status = farm.status();
    assert_eq!(status["builders"][0]["name"], "builder1");
    assert_eq!(status["builders"][0]["toolchains_received"], 1);
    // The scheduler served it from its own store, as its metrics and builder1's agree.
    let served = farm.metrics()["kiln_scheduler_toolchains_served_bytes_total"];
    assert!(served > 1e6, "{served}");
    let received = farm.builder_metrics(1)["kiln_builder_received_bytes_total{kind=\"toolchain\"}"];
    assert_eq!(received, served);
}

#[test]
fn a_corrupt_transfer_is_retried_elsewhere_then_refused_and_the_farm_stays_healthy() {
    use kiln_proto::v1::{from_client, refused, to_client, FromClient, InputFile, JobSpec};
    let farm = Farm::start(2, 1);
    let p = project(&farm);
    // A real compile first, so both builders could hold the toolchain.
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "a.o", "-Iinc"]));
    let toolchain = (0..2)
        .find_map(|i| farm.toolchains_on(i).pop())
        .expect("a builder holds the toolchain");

    // A client that names a file by one digest and sends other bytes for it.
    let claimed = b"int x = 1;\n";
    let digest = kiln_proto::Digest::of(claimed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refusal = runtime.block_on(async {
        let mut client = farm.grpc().await;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(FromClient {
            msg: Some(from_client::Msg::Spec(JobSpec {
                protocol_version: kiln_proto::PROTOCOL_VERSION,
                toolchain: Some(kiln_proto::wire_digest(&toolchain, 1)),
                os: std::env::consts::OS.into(),
                arch: std::env::consts::ARCH.into(),
                argv: vec!["/usr/bin/gcc".into(), "-c".into(), "/w/x.c".into()],
                cwd: "/w".into(),
                inputs: vec![InputFile {
                    path: "/w/x.c".into(),
                    digest: Some(kiln_proto::wire_digest(&digest, claimed.len() as u64)),
                    executable: false,
                }],
                outputs: vec!["/w/x.o".into()],
                ..JobSpec::default()
            })),
        })
        .await
        .unwrap();
        let mut stream = client
            .compile(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        loop {
            match stream.message().await.unwrap().and_then(|m| m.msg) {
                Some(to_client::Msg::Need(need)) => {
                    for wire in need.files {
                        let chunk = kiln_proto::v1::Chunk {
                            digest: Some(wire),
                            offset: 0,
                            data: bytes_of(b"int x = 666;"),
                        };
                        let _ = tx
                            .send(FromClient {
                                msg: Some(from_client::Msg::Chunk(chunk)),
                            })
                            .await;
                    }
                }
                Some(to_client::Msg::Refused(r)) => break r,
                Some(_) => {}
                None => panic!("the stream ended without an answer"),
            }
        }
    });
    assert_eq!(
        refusal.reason,
        refused::Reason::BuildersFailed as i32,
        "{refusal:?}"
    );
    assert_eq!(
        farm.status()["jobs_failed"],
        2,
        "it was not tried on both builders"
    );
    // The dashboard's data shows both builders as having just failed a job.
    let (_, body) =
        kiln_tests::http_request(&farm.http.to_string(), "GET", "/api/status", &[], b"");
    let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for b in api["builders"].as_array().unwrap() {
        assert_eq!(b["health"], "failed recently", "{api}");
        assert!(b["last_failure_ms"].as_u64().is_some(), "{api}");
    }
    // Nothing corrupt was kept, and both builders still work.
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "b.o", "-Iinc", "-DB"]));
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "c.o", "-Iinc", "-DC"]));
    assert_eq!(stat(&p, "dist_compiles"), 3);
    assert_eq!(farm.status()["builders"].as_array().unwrap().len(), 2);
}

fn bytes_of(data: &[u8]) -> prost_bytes::Bytes {
    prost_bytes::Bytes::copy_from_slice(data)
}

#[test]
fn a_supplied_toolchain_archive_stands_in_for_the_compiler() {
    let farm = Farm::start(1, 1);
    let mut p = project(&farm);
    let archive = p.path("gcc-toolchain.tar.gz");
    let out = p.kiln(&["toolchain", "package", "gcc", archive.to_str().unwrap()]);
    ok(&out);
    let gcc = String::from_utf8(p.bare(&["sh", "-c", "command -v gcc"]).stdout).unwrap();
    let config = p.path("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[dist_toolchains]\n{:?} = {:?}\n",
            gcc.trim(),
            archive.to_str().unwrap()
        ),
    )
    .unwrap();
    p.env
        .push(("KILN_CONFIG".into(), config.to_str().unwrap().into()));
    remote_matches_local(
        &p,
        &["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc", "-g"],
        "main.o",
    );
    assert_eq!(stat(&p, "dist_compiles"), 1, "{}", p.stats());
    let held = farm.toolchains_on(0)[0].to_hex();
    let expected = kiln_proto::Digest::of(&std::fs::read(&archive).unwrap()).to_hex();
    assert_eq!(
        held, expected,
        "the builder got another toolchain than the supplied one"
    );
}

#[test]
fn the_schedulers_metrics_count_the_jobs_it_ran() {
    let farm = Farm::start(2, 2);
    let p = project(&farm);
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc", "-g"]));
    ok(&p.kiln(&["g++", "-c", "src/map.cc", "-o", "map.o", "-Iinc"]));
    // A compile error is a job the farm finished: the compiler's own result.
    p.write("src/bad.c", "int main(void) { return undeclared; }\n");
    kiln_tests::settle();
    assert!(!p
        .kiln(&["gcc", "-c", "src/bad.c", "-o", "bad.o"])
        .status
        .success());
    assert_eq!(stat(&p, "dist_fallbacks"), 0, "{}", p.stats());

    // The last client's stream may still be closing: wait for the scheduler to see it end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let m = farm.metrics();
        if m["kiln_scheduler_jobs_in_flight"] == 0.0 || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:?}"))
    };
    assert_eq!(get("kiln_scheduler_jobs_total{outcome=\"finished\"}"), 3.0);
    // By the name of the client's token: `init` names the first one `clients`.
    assert_eq!(
        get("kiln_scheduler_client_jobs_total{client=\"clients\"}"),
        3.0
    );
    assert_eq!(get("kiln_scheduler_jobs_total{outcome=\"abandoned\"}"), 0.0);
    assert_eq!(
        get("kiln_scheduler_jobs_total{outcome=\"no_capacity\"}"),
        0.0
    );
    assert_eq!(get("kiln_scheduler_placement_seconds_count"), 3.0);
    assert_eq!(get("kiln_scheduler_job_seconds_count"), 3.0);
    assert_eq!(get("kiln_scheduler_job_seconds_bucket{le=\"+Inf\"}"), 3.0);
    assert_eq!(get("kiln_scheduler_job_retries_total"), 0.0);
    assert_eq!(get("kiln_scheduler_builders"), 2.0);
    assert_eq!(get("kiln_scheduler_slots"), 4.0);
    assert_eq!(get("kiln_scheduler_slots_busy"), 0.0);
    assert_eq!(get("kiln_scheduler_jobs_in_flight"), 0.0);
    // Sources, headers and the toolchains went to builders; objects came back.
    let out_bytes = p.read("main.o").len() + p.read("map.o").len();
    assert!(get("kiln_scheduler_relayed_bytes_total{direction=\"to_client\"}") >= out_bytes as f64);
    assert!(get("kiln_scheduler_relayed_bytes_total{direction=\"to_builder\"}") > 1e6);
    // The scheduler keeps the toolchains it relayed, to hand to builders that lack them.
    assert!(get("kiln_scheduler_toolchains_kept_bytes") > 1e6);

    // Each builder counts its own share: together, the three jobs.
    let builders: Vec<_> = (0..2).map(|i| farm.builder_metrics(i)).collect();
    let sum = |k: &str| -> f64 {
        builders
            .iter()
            .map(|m| {
                m.get(k)
                    .copied()
                    .unwrap_or_else(|| panic!("no {k} in {m:?}"))
            })
            .sum()
    };
    assert_eq!(sum("kiln_builder_jobs_total{result=\"finished\"}"), 3.0);
    assert_eq!(sum("kiln_builder_jobs_total{result=\"retry\"}"), 0.0);
    assert_eq!(sum("kiln_builder_overhead_seconds_count"), 3.0);
    assert_eq!(sum("kiln_builder_run_seconds_count"), 3.0);
    assert_eq!(sum("kiln_builder_slots"), 4.0);
    assert_eq!(sum("kiln_builder_slots_busy"), 0.0);
    // What the builders received is what the scheduler relayed or served them.
    let received = sum("kiln_builder_received_bytes_total{kind=\"toolchain\"}")
        + sum("kiln_builder_received_bytes_total{kind=\"input\"}");
    assert_eq!(
        received,
        get("kiln_scheduler_relayed_bytes_total{direction=\"to_builder\"}")
            + get("kiln_scheduler_toolchains_served_bytes_total")
    );
    assert!(sum("kiln_builder_toolchains") >= 1.0);
}

#[test]
fn packaging_the_toolchain_shows_progress_on_a_terminal_only() {
    let farm = Farm::start(1, 1);
    let p = project(&farm);
    // On a terminal (script(1) gives the compile a pseudo-terminal): a progress line, cleared.
    let out = p
        .command("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "{} gcc -c src/main.c -o main.o -Iinc",
            kiln_tests::kiln_bin().display()
        ))
        .arg("/dev/null")
        .output()
        .expect("script (util-linux)");
    ok(&out);
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("kiln: packaging")
            && screen.contains("for the farm")
            && screen.contains('%'),
        "no progress on the terminal: {screen:?}"
    );
    assert!(
        screen.ends_with("\r\x1b[K"),
        "the line was not cleared: {screen:?}"
    );
    assert_eq!(stat(&p, "dist_compiles"), 1, "{}", p.stats());
    // Not a terminal: nothing of kiln's in the compiler's stderr (another compiler, another
    // toolchain to package).
    remote_matches_local(
        &p,
        &["g++", "-c", "src/map.cc", "-o", "map.o", "-Iinc"],
        "map.o",
    );
    assert_eq!(stat(&p, "dist_compiles"), 2, "{}", p.stats());
}

/// Headless Chromium on `url`: with `dump`, the page's DOM once its scripts ran.
fn chromium(url: &str, args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=5000", "--window-size=1200,900"])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (Debian's chromium package; scripts/test.sh installs it)")
}

#[test]
fn the_dashboard_shows_the_builders_and_jobs_in_a_real_browser() {
    let farm = Farm::start(2, 2);
    let p = project(&farm);
    ok(&p.kiln(&["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc", "-g"]));
    ok(&p.kiln(&["g++", "-c", "src/map.cc", "-o", "map.o", "-Iinc"]));

    // The data behind the page.
    let http = farm.http.to_string();
    let (status, body) = kiln_tests::http_request(&http, "GET", "/api/status", &[], b"");
    assert_eq!(status, 200);
    let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(api["builders"].as_array().unwrap().len(), 2, "{api}");
    for b in api["builders"].as_array().unwrap() {
        assert_eq!(b["health"], "ok", "{api}");
        assert!(b["last_failure_ms"].is_null(), "{api}");
    }
    let recent = api["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 2, "{api}");
    assert!(
        recent[0]["label"].as_str().unwrap().ends_with("src/map.cc"),
        "{api}"
    );
    assert_eq!(recent[0]["outcome"], "finished");
    assert_eq!(recent[0]["client"], "clients", "{api}");
    assert!(recent[0]["bytes"].as_u64().unwrap() > 0, "{api}");
    let per_10s: u64 = api["finished_per_10s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(per_10s, 2, "{api}");

    // The page in a real browser, after its script fetched and drew that data.
    let url = format!("http://{http}/");
    let dom = chromium(&url, &["--dump-dom"]);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    for shown in [
        "builder0",
        "builder1",
        "main.c",
        "map.cc",
        "finished",
        "2 builders",
        "<td>clients</td>",
    ] {
        assert!(dom.contains(shown), "{shown} is not on the page: {dom}");
    }
    assert!(!dom.contains("loading…"), "the page never updated: {dom}");
    assert_eq!(
        dom.matches("<rect").count(),
        30,
        "the throughput chart: {dom}"
    );

    // While the farm compiles: the job in flight and its builder's busy slot.
    slow_source(&p, "slow_shown.c");
    let child = spawn_kiln(
        &p,
        &[
            "gcc",
            "-c",
            "src/slow_shown.c",
            "-o",
            "slow.o",
            "-O2",
            "-Iinc",
        ],
    );
    wait_for_cc1("slow_shown.c");
    let dom = chromium(&url, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    for shown in ["slow_shown.c", "1 of 4 slots busy", "1 job in flight"] {
        assert!(dom.contains(shown), "{shown} is not on the page: {dom}");
    }
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let took = chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    assert!(
        took.status.success(),
        "{}",
        String::from_utf8_lossy(&took.stderr)
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    ok(&child.wait_with_output().unwrap());
}

#[test]
fn the_dashboard_charts_the_shared_caches_hit_rate() {
    let home = kiln_tests::Project::new();
    let server = kiln_tests::CacheServer::start(&home.path("store"), &[]);
    let farm = Farm::start_watching_cache(1, 1, &server.url());
    // Two machines on the shared cache: the first misses and uploads, the second hits.
    let args = ["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc"];
    for _ in 0..2 {
        let p = Project::with_remote(&server.url());
        p.write("inc/util.h", HEADER);
        p.write("src/main.c", C_SOURCE);
        kiln_tests::settle();
        ok(&p.kiln(&args));
    }
    let http = farm.http.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let rates = loop {
        let (_, body) = kiln_tests::http_request(&http, "GET", "/api/status", &[], b"");
        let api: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(api["cache"], server.url().as_str(), "{api}");
        let rates: Vec<f64> = api["cache_hit_rate_per_10s"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r.as_f64())
            .collect();
        if rates.iter().any(|r| *r > 0.0) || std::time::Instant::now() > deadline {
            break rates;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // The first machine's lookups missed, the second's hit: a rate above zero is charted.
    assert!(!rates.is_empty(), "no lookups charted");
    assert!(rates.iter().all(|r| (0.0..=1.0).contains(r)), "{rates:?}");
    assert!(rates.iter().any(|r| *r > 0.0), "no hit charted: {rates:?}");
    let dom = chromium(&format!("http://{http}/"), &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(&server.url()) && dom.contains("% hits"),
        "{dom}"
    );
}
