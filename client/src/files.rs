//! Reading and hashing the files a compile depends on, and telling whether they changed.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_cache::Digest;
use memchr::arch::all::twoway::Finder;

/// File timestamps are coarse (a kernel tick, up to 10 ms). A file whose mtime or ctime is
/// within this margin of an instant may have changed at that instant without its timestamps
/// showing it, so kiln treats it as changed.
pub const TIMESTAMP_SLACK: Duration = Duration::from_millis(100);

/// Macros and directives in a file that make its compile depend on more than its text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    /// `__DATE__`: the output changes from day to day.
    pub date: bool,
    /// `__TIME__`: the output changes from second to second.
    pub time: bool,
    /// `__TIMESTAMP__`: the source's modification time.
    pub timestamp: bool,
    /// `.incbin`: the assembler reads a file kiln does not see.
    pub incbin: bool,
    /// `__has_include`: the output depends on files that may not exist, which no dependency
    /// list names.
    pub has_include: bool,
}

/// Below this size the portable substring search is cheaper than the SIMD one, which first
/// probes the CPU (CPUID traps to the hypervisor in a VM: ~50 µs, more than scanning a typical
/// source on a hit). Above it, the SIMD search wins by far (megabytes of headers on a miss).
const SIMD_SCAN_MIN: usize = 64 * 1024;

impl Scan {
    pub fn of(data: &[u8]) -> Scan {
        let has = |needle: &[u8]| {
            if data.len() < SIMD_SCAN_MIN {
                Finder::new(needle).find(data, needle).is_some()
            } else {
                memchr::memmem::find(data, needle).is_some()
            }
        };
        Scan {
            date: has(b"__DATE__"),
            time: has(b"__TIME__"),
            timestamp: has(b"__TIMESTAMP__"),
            incbin: has(b".incbin"),
            has_include: has(b"__has_include"),
        }
    }

    pub fn union(self, o: Scan) -> Scan {
        Scan {
            date: self.date || o.date,
            time: self.time || o.time,
            timestamp: self.timestamp || o.timestamp,
            incbin: self.incbin || o.incbin,
            has_include: self.has_include || o.has_include,
        }
    }
}

/// What `stat` says about a file: enough to notice any change made after it was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl Stat {
    pub fn of(m: &Metadata) -> Stat {
        Stat {
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    /// The later of mtime and ctime.
    pub fn changed_ns(&self) -> i64 {
        self.mtime_ns.max(self.ctime_ns)
    }

    /// Whether the file changed at or after `instant` (less the timestamp slack).
    pub fn changed_since(&self, instant: SystemTime) -> bool {
        self.changed_ns() >= nanos(instant) - TIMESTAMP_SLACK.as_nanos() as i64
    }
}

/// Nanoseconds since the epoch.
pub fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// An instant on the file system's own clock: the change time kiln stamps on a file of its
/// own just before a compile. Any later change to another file of the same file system gets a
/// change time at least as late, so a file whose ctime is strictly earlier last changed before
/// the mark, and every read after the mark saw its final content. That holds on any clock
/// granularity (both stamps are truncated alike) and lets a header generated milliseconds
/// before the compile be cached, where [`TIMESTAMP_SLACK`] alone would refuse it (issue 15).
///
/// Only files on the mark's own device are compared with it: another file system may keep
/// coarser times or, over a network, another machine's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    ctime_ns: i64,
    dev: u64,
}

impl Mark {
    /// Stamps a fresh file in `dir` (removed at once; kiln keeps only its stat). The file is
    /// stat'ed before it is written to: kernels with fine-grained timestamps (Linux 6.13 and
    /// later) then stamp the write with the exact time rather than the last clock tick, so a
    /// file written in the same tick, just before, still compares as earlier.
    pub fn take(dir: &Path) -> io::Result<Mark> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            ".mark.{}.{}",
            std::process::id(),
            nanos(SystemTime::now())
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let _ = std::fs::remove_file(&path);
        file.metadata()?;
        file.write_all(b"m")?;
        let stat = Stat::of(&file.metadata()?);
        Ok(Mark {
            ctime_ns: stat.ctime_ns,
            dev: stat.dev,
        })
    }
}

/// When a file last changed, as far as its stat can tell, relative to the start of a compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Before the compile started: what was read during it is what is there now.
    Before,
    /// After the compile started: it changed during the compile.
    After,
    /// Too close to the start to tell (the same clock tick as the mark, or within the
    /// timestamp slack of the start on a file system the mark cannot speak for).
    Unknown,
}

/// Whether the file with this stat changed during a compile that started at `started` (the
/// wall clock) and `mark` (the file system's clock, when one could be taken).
pub fn last_change(stat: &Stat, started: SystemTime, mark: Option<Mark>) -> Since {
    if !stat.changed_since(started) {
        return Since::Before;
    }
    if let Some(mark) = mark.filter(|m| m.dev == stat.dev) {
        // The later of ctime and mtime: only a change sets the ctime, but some file systems
        // (FUSE, network mounts) report a ctime that writes do not move. Setting an mtime back
        // moves the ctime forward, so neither can make a change look older than the mark.
        return match stat.changed_ns().cmp(&mark.ctime_ns) {
            std::cmp::Ordering::Less => Since::Before,
            std::cmp::Ordering::Greater => Since::After,
            std::cmp::Ordering::Equal => Since::Unknown,
        };
    }
    if stat.changed_ns() >= nanos(started) + TIMESTAMP_SLACK.as_nanos() as i64 {
        Since::After
    } else {
        Since::Unknown
    }
}

/// A hashed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub digest: Digest,
    pub stat: Stat,
    /// The file had been still for longer than the timestamp slack when it was hashed, so an
    /// identical stat later proves it unchanged since.
    pub stable: bool,
    pub data: Vec<u8>,
}

/// Why a file could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// It changed while being read.
    #[error("file changed while it was read")]
    Changed,
}

/// Reads and hashes a file. The file is stat'ed before and after reading; if it changed in
/// between, the read is refused.
pub fn hash_file(path: &Path) -> Result<Hashed, HashError> {
    let mut file = File::open(path)?;
    let before = Stat::of(&file.metadata()?);
    let mut data = Vec::with_capacity(before.size as usize);
    file.read_to_end(&mut data)?;
    let after = Stat::of(&file.metadata()?);
    if before != after || data.len() as u64 != after.size {
        return Err(HashError::Changed);
    }
    Ok(Hashed {
        digest: Digest::of(&data),
        stable: still_for_the_slack(&after),
        stat: after,
        data,
    })
}

/// Whether a file with this stat has not changed for [`TIMESTAMP_SLACK`]: then the same stat
/// later proves the content read now unchanged.
pub fn still_for_the_slack(stat: &Stat) -> bool {
    nanos(SystemTime::now()) - stat.changed_ns() >= TIMESTAMP_SLACK.as_nanos() as i64
}

/// The stat of `path`, following links as the compiler does.
pub fn stat(path: &Path) -> io::Result<Stat> {
    std::fs::metadata(path).map(|m| Stat::of(&m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_macros() {
        let d = Scan::of(b"const char *d = __DATE__;");
        assert!(d.date && !d.time && !d.incbin && !d.has_include);
        assert!(Scan::of(b"__TIMESTAMP__").timestamp && !Scan::of(b"__TIMESTAMP__").time);
        assert!(Scan::of(b"asm(\".incbin \\\"x\\\"\")").incbin);
        assert!(Scan::of(b"#if __has_include(<x.h>)").has_include);
        assert_eq!(Scan::of(b"int main(){}"), Scan::default());
        // Both searchers agree, either side of the size where kiln switches between them.
        for len in [SIMD_SCAN_MIN - 100, SIMD_SCAN_MIN + 100] {
            let mut big = vec![b'x'; len];
            big[len - 20..len - 12].copy_from_slice(b"__TIME__");
            assert!(Scan::of(&big).time && !Scan::of(&big).date, "{len}");
        }
        let u = Scan::of(b"__DATE__").union(Scan::of(b".incbin"));
        assert!(u.date && u.incbin && !u.time);
    }

    #[test]
    fn a_mark_orders_changes_on_its_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let started = SystemTime::now();
        let before = dir.path().join("before.h");
        std::fs::write(&before, "int x;").unwrap();
        let mark = Mark::take(&dir.path().join("tmp")).unwrap();
        let after = dir.path().join("after.h");
        std::fs::write(&after, "int y;").unwrap();
        let s = |p: &Path| stat(p).unwrap();
        // Written just before the mark: a generated header, cacheable. Where the kernel stamps
        // only whole clock ticks, the same tick cannot be told apart, and never reads as Before.
        let verdict = last_change(&s(&before), started, Some(mark));
        assert!(
            matches!(verdict, Since::Before | Since::Unknown),
            "{verdict:?}"
        );
        // Written after it: a change during the compile, whatever the clock's granularity.
        assert!(matches!(
            last_change(&s(&after), started, Some(mark)),
            Since::After | Since::Unknown
        ));
        assert_ne!(last_change(&s(&after), started, Some(mark)), Since::Before);
        // Without a mark (or on another device) only the slack decides: a file changed after
        // the compile started is never taken as older (Unknown, or After past the slack, which
        // a stalled machine can reach).
        assert_ne!(last_change(&s(&before), started, None), Since::Before);
        let other = Mark {
            dev: s(&before).dev + 1,
            ..mark
        };
        assert_ne!(
            last_change(&s(&before), started, Some(other)),
            Since::Before
        );
        // Old files are older than any mark.
        let old = Stat {
            mtime_ns: nanos(started) - 10_000_000_000,
            ctime_ns: nanos(started) - 10_000_000_000,
            ..s(&before)
        };
        assert_eq!(last_change(&old, started, None), Since::Before);
        // A change well after the start is After even without a mark.
        let late = Stat {
            ctime_ns: nanos(SystemTime::now()) + 10_000_000_000,
            ..old
        };
        assert_eq!(last_change(&late, started, None), Since::After);
    }

    #[test]
    fn fresh_file_is_not_stable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.h");
        std::fs::write(&p, "int x;").unwrap();
        let h = hash_file(&p).unwrap();
        assert!(!h.stable);
        assert_eq!(h.digest, Digest::of(b"int x;"));
        assert!(h
            .stat
            .changed_since(SystemTime::now() - Duration::from_secs(5)));
    }
}
