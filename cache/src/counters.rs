//! A small file of named counters, updated under an exclusive file lock.
//!
//! Many kiln processes update the same counters at once; each update is a locked
//! read-modify-write of one small file. The format is one `name value` pair per line, so a
//! person can read it, and a damaged line (a crash mid-write) only loses that line.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Named signed counters kept in one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Counter values by name; missing names read as zero.
    pub values: BTreeMap<String, i64>,
}

impl Counters {
    /// The value of `name`, zero when absent.
    pub fn get(&self, name: &str) -> i64 {
        self.values.get(name).copied().unwrap_or(0)
    }

    /// Adds `delta` to `name`.
    pub fn add(&mut self, name: &str, delta: i64) {
        if delta != 0 {
            *self.values.entry(name.to_owned()).or_insert(0) += delta;
        }
    }

    /// Adds every counter of `other` to this one.
    pub fn merge(&mut self, other: &Counters) {
        for (k, v) in &other.values {
            self.add(k, *v);
        }
    }

    fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            if let (Some(name), Some(value), None) = (parts.next(), parts.next(), parts.next()) {
                if let Ok(v) = value.parse::<i64>() {
                    c.values.insert(name.to_owned(), v);
                }
            }
        }
        c
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.values {
            s.push_str(k);
            s.push(' ');
            s.push_str(&v.to_string());
            s.push('\n');
        }
        s
    }

    /// Reads the counters at `path`; a missing file is all zeros.
    pub fn read(path: &Path) -> io::Result<Counters> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Counters::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Counters::default()),
            Err(e) => Err(e),
        }
    }

    /// Locks `path`, applies `f` to its counters and writes them back. Creates the file and its
    /// parent directory as needed. Returns the counters as written.
    pub fn update(path: &Path, f: impl FnOnce(&mut Counters)) -> io::Result<Counters> {
        let mut file = open_locked(path)?;
        let mut text = String::new();
        // A file damaged by a crash mid-write may not be UTF-8; start it over rather than fail.
        if file.read_to_string(&mut text).is_err() {
            text.clear();
        }
        let mut counters = Counters::parse(&text);
        f(&mut counters);
        let rendered = counters.render();
        file.seek(SeekFrom::Start(0))?;
        file.write_all(rendered.as_bytes())?;
        // Overwrite in place and shorten only when needed: truncating to zero first would free
        // the file's block on every update (a synchronous discard on some disks) and make ext4
        // flush the file on close.
        if (rendered.len() as u64) < text.len() as u64 {
            file.set_len(rendered.len() as u64)?;
        }
        Ok(counters)
        // The lock is released when `file` is closed.
    }
}

fn open_locked(path: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    };
    let file = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent: PathBuf = path.parent().map(Path::to_path_buf).unwrap_or_default();
            std::fs::create_dir_all(parent)?;
            open()?
        }
        Err(e) => return Err(e),
    };
    file.lock()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/stats");
        assert_eq!(Counters::read(&path).unwrap().get("hits"), 0);
        Counters::update(&path, |c| c.add("hits", 2)).unwrap();
        Counters::update(&path, |c| c.add("hits", -1)).unwrap();
        assert_eq!(Counters::read(&path).unwrap().get("hits"), 1);
    }

    #[test]
    fn damaged_lines_are_skipped() {
        let c = Counters::parse("hits 3\ngarbage\nmisses x\nsize 10 extra\nsize 7\n");
        assert_eq!(c.get("hits"), 3);
        assert_eq!(c.get("misses"), 0);
        assert_eq!(c.get("size"), 7);
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        Counters::update(&path, |c| c.add("n", 1)).unwrap();
                    }
                });
            }
        });
        assert_eq!(Counters::read(&path).unwrap().get("n"), 400);
    }
}
