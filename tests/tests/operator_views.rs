//! What operators and users read: `kiln dist-status` and the dashboard's data tell builders
//! apart and show their health, and a cache directory kiln cannot write is reported once, in
//! words that say what to do, while the compile goes on.

use kiln_tests::{ok, Farm};

#[test]
fn two_builders_with_one_name_are_told_apart_and_their_health_is_shown() {
    let mut farm = Farm::start(1, 1);
    // Two builders on one host both default to its host name.
    farm.start_builder_with(1, |c| c.name = "builder0".into());
    farm.wait_for_builders(2);
    let p = farm.project();

    let out = ok(&p.kiln(&["dist-status"])).clone();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let header = text.lines().find(|l| l.starts_with("BUILDER")).unwrap();
    assert!(header.ends_with("HEALTH"), "{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("builder0")).collect();
    assert_eq!(rows.len(), 2, "{text}");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| &r[..r.find(')').map_or(r.len(), |i| i + 1)])
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("builder0 (b")) && names[0] != names[1],
        "{text}"
    );
    assert!(rows.iter().all(|r| r.ends_with(" ok")), "{text}");

    // The dashboard's data says the same.
    let (status, body) =
        kiln_tests::http_request(&farm.http.to_string(), "GET", "/api/status", &[], b"");
    assert_eq!(status, 200);
    let dash: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut shown: Vec<&str> = dash["builders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    shown.sort_unstable();
    let mut listed = names.clone();
    listed.sort_unstable();
    assert_eq!(shown, listed);

    // A builder reported by a cross-check is shown as suspect in both.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        farm.grpc()
            .await
            .report(kiln_proto::v1::SuspectReport {
                protocol_version: kiln_proto::PROTOCOL_VERSION,
                builder: "builder0".into(),
                label: "a.c".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let out = ok(&p.kiln(&["dist-status", "--json"])).clone();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for b in json["builders"].as_array().unwrap() {
        assert_eq!(b["health"], "suspect", "{json}");
        assert!(
            b["label"].as_str().unwrap().starts_with("builder0 (b"),
            "{json}"
        );
    }
    let out = ok(&p.kiln(&["dist-status"])).clone();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("builder0") && l.ends_with(" suspect"))
            .count(),
        2,
        "{text}"
    );

    // A builder whose name is its own keeps it unadorned.
    farm.kill_builder(1);
    farm.wait_for_builders(1);
    let json = farm.status();
    assert_eq!(json["builders"][0]["label"], "builder0", "{json}");
}

/// A read-only bind mount of `path` over itself, undone when dropped (needs root, as CI has).
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn mount(path: &std::path::Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("mount")
                .args(args)
                .arg(path)
                .arg(path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "a read-only bind mount needs root: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["--bind"]);
        let guard = ReadOnly(path.to_owned());
        run(&["-o", "remount,bind,ro"]);
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_cache_directory_kiln_cannot_write_is_reported_once_and_the_compile_goes_on() {
    let p = kiln_tests::Project::new();
    p.write("hit.c", "int hit(void) { return 1; }\n");
    p.write("miss.c", "int miss(void) { return 2; }\n");
    kiln_tests::settle();
    ok(&p.kiln(&["gcc", "-c", "hit.c", "-o", "hit.o"]));
    assert_eq!(p.stat("misses"), 1, "{}", p.stats());
    let _ro = ReadOnly::mount(&p.cache);

    let warned = |out: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("kiln")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(
            lines[0].starts_with("kiln: warning: cannot write to the cache directory")
                && lines[0].contains(&p.cache.display().to_string())
                && lines[0].contains("Read-only file system")
                && lines[0].contains("Set KILN_DIR"),
            "{stderr}"
        );
        assert!(!stderr.contains("dependency list"), "{stderr}");
        lines[0].to_owned()
    };
    // A miss: the compiler cannot write kiln's dependency list there; it runs as asked.
    let out = ok(&p.kiln(&["gcc", "-c", "miss.c", "-o", "miss.o"])).clone();
    assert!(warned(&out).contains("compiling without the cache"));
    ok(&p.bare(&["gcc", "-c", "miss.c", "-o", "bare.o"]));
    assert_eq!(p.read("miss.o"), p.read("bare.o"));
    // A hit is still served, but not counted: said once, too.
    std::fs::remove_file(p.path("hit.o")).unwrap();
    let out = ok(&p.kiln(&["gcc", "-c", "hit.c", "-o", "hit.o"])).clone();
    assert!(warned(&out).contains("keeps no statistics"));
    assert!(p.path("hit.o").exists());
}
