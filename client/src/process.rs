//! The one door to running other programs: the real compiler, its probes.

// This module is the door to running programs.
#![allow(clippy::disallowed_methods)]

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Replaces this process with the compiler, so an uncacheable compile behaves exactly as if
/// kiln were not there (terminal, signals, stdin). Returns only on failure.
pub fn exec(program: &Path, args: &[std::ffi::OsString]) -> io::Error {
    Command::new(program).args(args).exec()
}

/// Runs a probe of the compiler with the include-path variables removed, so what it reports
/// is the compiler's own.
pub fn probe(program: &Path, args: &[String]) -> io::Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("CPATH")
        .env_remove("C_INCLUDE_PATH")
        .env_remove("CPLUS_INCLUDE_PATH")
        .env_remove("OBJC_INCLUDE_PATH")
        .env_remove("OBJCPLUS_INCLUDE_PATH")
        .output()
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

/// Starts a program in its own process group with no standard streams, and does not wait for
/// it: an uploader that outlives the compile that started it and exits when done.
pub fn spawn_detached(program: &Path, args: &[&std::ffi::OsStr]) -> io::Result<()> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}
