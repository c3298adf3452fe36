//! Helpers for the client's unit tests.

use std::path::{Path, PathBuf};

/// The program `name` from `PATH`. A test that needs a real compiler fails when it is missing,
/// as the harness's `require` does, instead of passing having tested nothing.
pub fn require(name: &str) -> PathBuf {
    crate::compiler::find(name, &crate::env::Env::capture(), Path::new("/nonexistent"))
        .unwrap_or_else(|e| {
            panic!("{name} is not installed ({e:#}): scripts/test.sh installs what the tests need")
        })
}

/// A gcc identity with these default include directories and no binary behind it.
pub fn identity(c_dirs: &[&str], cxx_dirs: &[&str]) -> crate::compiler::Identity {
    serde_json::from_value(serde_json::json!({
        "path": "/usr/bin/cc", "family": "Gcc", "digest": "", "version": "cc 1",
        "c_dirs": c_dirs, "cxx_dirs": cxx_dirs,
        "stat": {"size": 0, "mtime_ns": 0, "ctime_ns": 0, "ino": 0, "dev": 0},
    }))
    .unwrap()
}
