//! `kiln-cache`, the HTTP cache server: its protocols at the wire, and the real clients.

use kiln_tests::{ok, require, shared, CacheServer, Project};

fn sha256_hex(data: &[u8]) -> String {
    // The server checks CAS names; the test computes them with the system's sha256sum.
    let p = Project::new();
    p.write("blob", "");
    std::fs::write(p.path("blob"), data).unwrap();
    let out = ok(&p.command("sha256sum").arg(p.path("blob")).output().unwrap()).clone();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn bazel_and_ccache_over_http() {
    let p = Project::new();
    let server = CacheServer::start(&p.path("store"), &[]);
    let blob = b"an output file".to_vec();
    let hash = sha256_hex(&blob);

    assert_eq!(server.request("GET", &format!("/cas/{hash}"), b"").0, 404);
    assert_eq!(server.request("PUT", &format!("/cas/{hash}"), &blob).0, 200);
    assert_eq!(
        server.request("PUT", &format!("/cas/{hash}"), &blob).0,
        200,
        "PUTs are idempotent"
    );
    assert_eq!(
        server.request("GET", &format!("/cas/{hash}"), b""),
        (200, blob.clone())
    );
    assert_eq!(server.request("HEAD", &format!("/cas/{hash}"), b"").0, 200);
    let (status, msg) = server.request("PUT", &format!("/cas/{}", "0".repeat(64)), &blob);
    assert_eq!(status, 400, "a CAS body must hash to its name");
    assert!(String::from_utf8_lossy(&msg).contains(&hash));
    assert_eq!(
        server
            .request("PUT", &format!("/ac/{hash}"), b"action result")
            .0,
        200
    );
    assert_eq!(
        server.request("GET", &format!("/ac/{hash}"), b"").1,
        b"action result"
    );

    // ccache's subdirs and flat layouts name the same entry.
    let key = "0123456789abcdef0123456789abcdef01234567";
    assert_eq!(
        server
            .request(
                "PUT",
                &format!("/ccache/{}/{}", &key[..2], &key[2..]),
                b"result"
            )
            .0,
        200
    );
    assert_eq!(
        server.request("GET", &format!("/ccache/{key}"), b""),
        (200, b"result".to_vec())
    );
    assert_eq!(
        server.request("DELETE", &format!("/ccache/{key}"), b"").0,
        200
    );
    assert_eq!(server.request("GET", &format!("/ccache/{key}"), b"").0, 404);

    assert_eq!(server.request("GET", "/nothing/here", b"").0, 404);
    assert_eq!(server.request("POST", &format!("/ac/{hash}"), b"x").0, 405);
    assert_eq!(server.request("GET", "/files/../etc", b"").0, 404);
}

#[test]
fn damage_size_limits_concurrency_and_eviction() {
    let p = Project::new();
    let store = p.path("store");
    let server = CacheServer::start(&store, &["--max-body", "64K", "--max-size", "256K"]);

    // A damaged body is a miss, never wrong bytes.
    assert_eq!(
        server.request("PUT", "/ccache/aabbcc", b"precious bytes").0,
        200
    );
    let mut corrupted = 0;
    for f in walk(&store) {
        if f.file_name().unwrap().to_string_lossy().ends_with('B') {
            let mut bytes = std::fs::read(&f).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&f, bytes).unwrap();
            corrupted += 1;
        }
    }
    assert_eq!(corrupted, 1);
    assert_eq!(server.request("GET", "/ccache/aabbcc", b"").0, 404);

    // Too large: refused whole.
    assert_eq!(
        server
            .request("PUT", "/ccache/huge", &vec![7u8; 100 * 1024])
            .0,
        413
    );
    assert_eq!(server.request("GET", "/ccache/huge", b"").0, 404);

    // Many writers of one key: the entry is one of theirs, whole.
    let bodies: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 20_000]).collect();
    std::thread::scope(|s| {
        for b in &bodies {
            let server = &server;
            s.spawn(move || assert_eq!(server.request("PUT", "/ccache/contended", b).0, 200));
        }
    });
    let (status, got) = server.request("GET", "/ccache/contended", b"");
    assert_eq!(status, 200);
    assert!(bodies.contains(&got), "a torn or mixed body");

    // Eviction keeps the store under its cap.
    for i in 0..60 {
        assert_eq!(
            server
                .request("PUT", &format!("/ccache/k{i}"), &vec![1u8; 8 * 1024])
                .0,
            200
        );
    }
    let on_disk: u64 = walk(&store)
        .iter()
        .filter(|f| f.file_name().unwrap().to_string_lossy().ends_with('B'))
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 256 * 1024, "{on_disk} bytes on disk");
    assert_eq!(
        server.request("GET", "/ccache/k59", b"").0,
        200,
        "the newest entry stays"
    );

    // /metrics counts what happened above, by protocol.
    let m = server.metrics();
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:?}"))
    };
    assert_eq!(get("kiln_cache_puts_total{protocol=\"ccache\"}"), 77.0);
    assert_eq!(get("kiln_cache_puts_total{protocol=\"waf\"}"), 0.0);
    assert_eq!(get("kiln_cache_hits_total{protocol=\"ccache\"}"), 2.0);
    assert_eq!(get("kiln_cache_misses_total{protocol=\"ccache\"}"), 2.0);
    assert_eq!(get("kiln_cache_corrupt_total"), 1.0);
    assert_eq!(
        get("kiln_cache_served_bytes_total"),
        (got.len() + 8 * 1024) as f64
    );
    let size = get("kiln_cache_size_bytes");
    assert!(size > 0.0 && size <= (256 * 1024) as f64, "{size}");
    assert!(get("kiln_cache_entries") >= 1.0);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn real_ccache_hits_remotely_from_a_cold_local_cache() {
    require("ccache");
    require("gcc");
    let p = Project::new();
    let server = CacheServer::start(&p.path("store"), &[]);
    for i in 0..3 {
        p.write(
            &format!("src/f{i}.c"),
            &format!("int f{i}(int x) {{ return x + {i}; }}\n"),
        );
    }
    let remote = format!("http://{}/ccache/", server.addr);
    let ccache = |local: &str, i: usize| {
        ok(&p
            .command("ccache")
            .env("CCACHE_DIR", p.path(local))
            .env("CCACHE_REMOTE_STORAGE", &remote)
            .args([
                "gcc",
                "-c",
                &format!("src/f{i}.c"),
                "-o",
                &format!("f{i}.o"),
            ])
            .output()
            .unwrap());
        p.read(&format!("f{i}.o"))
    };
    let first: Vec<Vec<u8>> = (0..3).map(|i| ccache("local-a", i)).collect();
    // A second machine: an empty local cache, the same server.
    let second: Vec<Vec<u8>> = (0..3).map(|i| ccache("local-b", i)).collect();
    assert_eq!(first, second);
    let stats = p
        .command("ccache")
        .env("CCACHE_DIR", p.path("local-b"))
        .arg("--print-stats")
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout).into_owned();
    let remote_hits: i64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("remote_storage_hit\t"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no remote_storage_hit in:\n{stats}"));
    assert_eq!(remote_hits, 3, "{stats}");
}

#[test]
fn real_waf_clean_build_is_all_hits() {
    require("python3");
    let p = Project::new();
    let has_waflib = p
        .command("python3")
        .args(["-c", "import waflib, urllib3"])
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        has_waflib,
        "waflib and urllib3 are not installed: scripts/test.sh installs them"
    );
    // A cache that checks tokens, with waf (whose client cannot send one) let through.
    let tokens = p.path("tokens");
    std::fs::write(&tokens, format!("ci {}\n", kiln_net::auth::hash("secret"))).unwrap();
    let server = CacheServer::start(
        &p.path("store"),
        &[
            "--tokens",
            tokens.to_str().unwrap(),
            "--anonymous",
            "waf",
            "--insecure",
        ],
    );
    let key = "ab".repeat(32);
    assert_eq!(
        server.request("PUT", &format!("/ccache/{key}"), b"x").0,
        401
    );
    let bearer = [("Authorization", "Bearer secret")];
    assert_eq!(
        server
            .request_with("PUT", &format!("/ccache/{key}"), &bearer, b"x")
            .0,
        200
    );
    p.write(
        "waf",
        "#!/usr/bin/env python3\nimport os, waflib\nfrom waflib import Scripting, Context\n\
         Scripting.waf_entry_point(os.getcwd(), Context.WAFVERSION, os.path.dirname(os.path.dirname(waflib.__file__)))\n",
    );
    p.write(
        "wscript",
        "def options(opt):\n    opt.load('compiler_c')\n\
         def configure(conf):\n    conf.load('compiler_c')\n\
         def build(bld):\n    bld.load('wafcache')\n    bld.program(source=['a.c', 'b.c', 'main.c'], target='app')\n",
    );
    p.write("a.c", "int a(void) { return 1; }\n");
    p.write("b.c", "int b(void) { return 2; }\n");
    p.write(
        "main.c",
        "int a(void); int b(void);\nint main(void) { return a() + b() - 3; }\n",
    );
    let waf = |args: &[&str]| {
        let out = p
            .command("python3")
            .arg("waf")
            .args(args)
            .env("WAFCACHE", format!("http://{}/files/", server.addr))
            .env("WAFCACHE_STATS", "1")
            .output()
            .unwrap();
        ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    waf(&["configure"]);
    waf(&["build"]);
    let first = p.read("build/app");
    let log = waf(&["clean", "build"]);
    let line = log
        .lines()
        .find(|l| l.contains("wafcache stats"))
        .unwrap_or_else(|| panic!("no stats in:\n{log}"));
    // "wafcache stats: N requests, N hits (ratio: 100.00%), 0 writes"
    let nums: Vec<i64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        nums.len() >= 2 && nums[0] >= 4 && nums[0] == nums[1],
        "not all hits: {line}"
    );
    assert_eq!(p.read("build/app"), first);
}

#[test]
fn kiln_remote_tier_serves_a_second_machine() {
    require("gcc");
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let url = server.url();
    let machine = || shared::machine(&url, &[]);
    let args = shared::ARGS;
    let a = machine();
    shared::stores(&a);

    // Another machine: its own empty local cache, the same server.
    let b = machine();
    shared::is_served(&b);
    // The remote hit was copied into b's local cache.
    ok(&b.kiln(&args));
    assert_eq!(b.stats()["remote_hits"], 1);
    assert_eq!(b.stats()["hits"], 2);

    // With KILN_NO_PUSH a machine reads but never writes.
    let mut c = machine();
    c.env.push(("KILN_NO_PUSH".into(), "1".into()));
    c.write("src/m.c", "int other(void) { return 7; }\n");
    kiln_tests::settle();
    ok(&c.kiln(&args));
    assert_eq!(c.stats()["remote_uploads"], 0);

    // A dead server: the build goes on, quietly, and the server is not asked again at once.
    drop(server);
    let d = machine();
    let out = ok(&d.kiln(&args)).clone();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.stats()["remote_errors"], 1);
    let _ = std::fs::remove_file(d.path("m.o"));
    ok(&d.kiln(&args));
    assert_eq!(
        d.stats()["remote_errors"],
        1,
        "a failed server is left alone for a while"
    );
    assert_eq!(d.stats()["hits"], 1);
}

#[test]
fn background_uploads_reach_the_server() {
    require("gcc");
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let machine = || {
        let mut p = Project::with_remote(&server.url());
        p.env.push(("KILN_REMOTE_ASYNC".into(), "1".into()));
        p.write("a.c", "int a(int x) { return x * 5; }\n");
        kiln_tests::settle();
        p
    };
    let args = ["gcc", "-c", "a.c", "-o", "a.o"];
    let a = machine();
    ok(&a.kiln(&args));
    // The uploader runs on after the compile returned; it counts what it pushed when done.
    let mut uploads = 0;
    for _ in 0..200 {
        uploads = a.stats()["remote_uploads"].as_i64().unwrap();
        if uploads == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        uploads, 2,
        "the background upload did not finish within 10 s"
    );
    let b = machine();
    b.kiln_matches_bare(&args, "a.o");
    assert_eq!(b.stats()["remote_hits"], 1);
}

#[test]
fn a_stale_local_manifest_still_finds_what_other_machines_made() {
    require("gcc");
    let store = tempfile::tempdir().unwrap();
    let server = CacheServer::start(store.path(), &[]);
    let machine = || {
        let p = Project::with_remote(&server.url());
        p.write("inc/v.h", "#define V 1\n");
        p.write("m.c", "#include \"v.h\"\nint m(void) { return V; }\n");
        kiln_tests::settle();
        p
    };
    let args = ["gcc", "-c", "m.c", "-o", "m.o", "-Iinc"];
    let (a, b) = (machine(), machine());
    ok(&a.kiln(&args));
    ok(&b.kiln(&args));
    assert_eq!(b.stats()["remote_hits"], 1);
    // Both move on; a compiles first. b's own manifest knows only the old header.
    for p in [&a, &b] {
        p.write("inc/v.h", "#define V 2\n");
    }
    kiln_tests::settle();
    ok(&a.kiln(&args));
    b.kiln_matches_bare(&args, "m.o");
    let s = b.stats();
    assert_eq!(
        (s["remote_hits"].as_i64(), s["misses"].as_i64()),
        (Some(2), Some(0)),
        "{s}"
    );
}
