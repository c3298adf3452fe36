//! The servers' logs: `--log-format json` writes one JSON object per line, for log shippers;
//! an unknown format is refused before anything starts.

use std::io::BufRead;
use std::process::{Command, Stdio};

#[test]
fn json_logs_are_one_object_per_line() {
    let mut child = Command::new(kiln_tests::program("kiln-scheduler"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--insecure",
        ])
        .env("KILN_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Started once it says where it listens; then a SIGTERM makes it log its shutdown.
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("kiln-scheduler: listening on"), "{first}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "nothing logged");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"shutting down\"")),
        "{stderr}"
    );
}

#[test]
fn an_unknown_log_format_is_refused() {
    for program in ["kiln-scheduler", "kiln-builder", "kiln-cache"] {
        let out = Command::new(kiln_tests::program(program))
            .args(["--log-format", "xml"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{program}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unknown log format \"xml\" (human or json)"),
            "{program}: {err}"
        );
    }
}
