//! The one door through which the pot backend runs programs (`pot`, `jexec`, `rctl`).
//!
//! Everything the backend does to the host goes through [`CommandRunner::run`]: one argument
//! vector in, an exit status and both output streams out. [`SystemRunner`] runs the program;
//! tests put a recording runner in its place to check the exact command sequences.

use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Output kept per stream; the rest is dropped and the truncation noted.
pub const MAX_STREAM: usize = 16 << 20;

/// How long, after a timed-out command's process group is killed, to wait for its output
/// streams to close. A process that left the group (`setsid`) can hold them open; the caller
/// stops the jail, which ends it.
const GRACE: Duration = Duration::from_secs(1);

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
    /// The runner killed it (its whole process group) when its time ran out.
    TimedOut(Duration),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Exited(code) => write!(f, "exit status {code}"),
            Status::Signaled(sig) => write!(f, "signal {sig}"),
            Status::TimedOut(limit) => {
                write!(f, "signal 9 at its time limit of {} ms", limit.as_millis())
            }
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: Status,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// An exit with `code` and the given streams (for runners that fake commands).
    pub fn exited(code: i32, stdout: &[u8], stderr: &[u8]) -> Output {
        Output {
            status: Status::Exited(code),
            stdout: stdout.to_vec(),
            stderr: stderr.to_vec(),
        }
    }

    pub fn success(&self) -> bool {
        self.status == Status::Exited(0)
    }
}

/// Runs one program. Implementations must be usable from many threads at once.
pub trait CommandRunner: Send + Sync + std::fmt::Debug + 'static {
    /// Runs `argv` (the program first) with stdin closed and returns how it ended with what it
    /// wrote (at most [`MAX_STREAM`] bytes of each stream). With a `timeout`, the command's
    /// process group is killed when the time runs out and the status is [`Status::TimedOut`].
    /// `Err` only when the program could not be started or waited for.
    fn run(&self, argv: &[String], timeout: Option<Duration>) -> io::Result<Output>;
}

/// Runs commands for real with `std::process`. Each command gets a process group of its own,
/// so a timeout kills everything it started that stayed in the group.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

enum Event {
    Exited(std::process::ExitStatus),
    Closed,
}

impl CommandRunner for SystemRunner {
    fn run(&self, argv: &[String], timeout: Option<Duration>) -> io::Result<Output> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "an empty command"))?;
        // The door to pot, jexec and rctl: every FreeBSD command goes through here.
        #[allow(clippy::disallowed_methods)]
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let started = Instant::now();
        let (tx, rx) = mpsc::channel::<Event>();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            readers.push(spawn_drain(pipe, stdout.clone(), tx.clone()));
        }
        if let Some(pipe) = child.stderr.take() {
            readers.push(spawn_drain(pipe, stderr.clone(), tx.clone()));
        }
        let waiter = std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = tx.send(Event::Exited(status));
            }
        });

        let mut exited = None;
        let mut open = readers.len();
        let mut timed_out = false;
        while exited.is_none() || open > 0 {
            let event = match timeout {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(limit) => match limit.checked_sub(started.elapsed()) {
                    Some(left) => rx.recv_timeout(left),
                    None => Err(mpsc::RecvTimeoutError::Timeout),
                },
            };
            match event {
                Ok(Event::Exited(status)) => exited = Some(status),
                Ok(Event::Closed) => open -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if timed_out {
            // The group's id stays reserved while any member lives, so this reaches only the
            // command and what it started (ESRCH when they are all gone already).
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let grace = Instant::now() + GRACE;
            while exited.is_none() || open > 0 {
                match rx.recv_timeout(grace.saturating_duration_since(Instant::now())) {
                    Ok(Event::Exited(status)) => exited = Some(status),
                    Ok(Event::Closed) => open -= 1,
                    Err(_) => break,
                }
            }
        }
        if exited.is_some() {
            let _ = waiter.join();
        }
        // Readers still blocked belong to a process that escaped the group; they end when the
        // caller stops the jail, and what they read so far is returned now.
        if open == 0 {
            for reader in readers {
                let _ = reader.join();
            }
        }
        let status = match (timed_out, exited) {
            (true, _) => Status::TimedOut(timeout.unwrap_or_default()),
            (false, Some(status)) => match (status.code(), status.signal()) {
                (Some(code), _) => Status::Exited(code),
                (None, Some(sig)) => Status::Signaled(sig),
                (None, None) => Status::Exited(-1),
            },
            (false, None) => {
                return Err(io::Error::other(format!(
                    "lost track of {program} (it could not be waited for)"
                )))
            }
        };
        let take = |buf: &Arc<Mutex<Vec<u8>>>| {
            std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()))
        };
        Ok(Output {
            status,
            stdout: take(&stdout),
            stderr: take(&stderr),
        })
    }
}

/// Reads a stream to its end into `buf`, keeping at most [`MAX_STREAM`] bytes, and says so on
/// `done`.
fn spawn_drain(
    mut stream: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 64 << 10];
        let mut dropped = 0usize;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
                Ok(n) => {
                    let mut kept = buf.lock().unwrap_or_else(|e| e.into_inner());
                    let room = MAX_STREAM.saturating_sub(kept.len()).min(n);
                    kept.extend_from_slice(&chunk[..room]);
                    dropped += n - room;
                }
            }
        }
        if dropped > 0 {
            buf.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(
                    format!("\n[kiln: {dropped} more bytes of output dropped]\n").as_bytes(),
                );
        }
        let _ = done.send(Event::Closed);
    })
}

/// `argv` as a person would type it, for error messages and logs.
pub fn render(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pot_runner_reports_exit_streams_and_signals() {
        let out = SystemRunner
            .run(
                &argv(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]),
                None,
            )
            .unwrap();
        assert_eq!(out.status, Status::Exited(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let out = SystemRunner
            .run(&argv(&["/bin/sh", "-c", "kill -9 $$"]), None)
            .unwrap();
        assert_eq!(out.status, Status::Signaled(9));
        assert!(SystemRunner
            .run(&argv(&["/nonexistent/pot"]), None)
            .is_err());
    }

    #[test]
    fn pot_runner_kills_the_whole_group_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        // A child in the same group that would outlive its parent, holding the pipes open.
        let script = format!(
            "(sleep 2; touch {}) & echo started; exec sleep 30",
            marker.display()
        );
        let started = Instant::now();
        let out = SystemRunner
            .run(
                &argv(&["/bin/sh", "-c", &script]),
                Some(Duration::from_millis(300)),
            )
            .unwrap();
        assert_eq!(out.status, Status::TimedOut(Duration::from_millis(300)));
        assert_eq!(out.stdout, b"started\n");
        assert!(started.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !marker.exists(),
            "a child of the timed-out command lived on"
        );
    }

    #[test]
    fn pot_commands_render_as_typed() {
        assert_eq!(
            render(&argv(&[
                "pot",
                "clone",
                "-p",
                "a-b",
                "-i",
                "lo0|127.0.0.2",
                "it's"
            ])),
            r"pot clone -p a-b -i 'lo0|127.0.0.2' 'it'\''s'"
        );
    }
}
