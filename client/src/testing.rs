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
