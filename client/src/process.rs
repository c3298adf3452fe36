//! The one door to running other programs: the real compiler, its probes.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Replaces this process with the compiler, so an uncacheable compile behaves exactly as if
/// kiln were not there (terminal, signals, stdin). Returns only on failure.
pub fn exec(program: &Path, args: &[std::ffi::OsString]) -> io::Error {
    Command::new(program).args(args).exec()
}

/// Runs a program to completion with stdout and stderr captured and stdin inherited (or
/// closed, for probes).
pub fn capture(program: &Path, args: &[String], inherit_stdin: Option<bool>) -> io::Result<Output> {
    let stdin = if inherit_stdin.unwrap_or(false) {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    Command::new(program).args(args).stdin(stdin).output()
}
