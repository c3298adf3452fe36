//! Direct-mode manifests: for one set of (compiler, arguments, source), which header files with
//! which contents led to which result.
//!
//! A manifest lists every header a compile opened (from the compiler's own dependency output)
//! with its digest and stat, and the *negative* paths: places earlier on the include path where
//! a header of the same name did not exist. A lookup succeeds only if every header still has
//! its digest and no negative path has appeared, so a new header that would shadow an old one
//! is a miss. Headers whose stat is unchanged since they were hashed (and had been still for a
//! while before) are not read again. Negative paths are grouped by their parent directory: a
//! directory whose stat is unchanged has gained no entry, so its negatives need no look.

use std::collections::HashMap;
use std::path::Path;

use kiln_cache::Digest;

use crate::codec::{Reader, Writer};
use crate::files::{self, Stat};

const FORMAT: u8 = 5;
/// Results kept per manifest; the oldest go first.
const MAX_ENTRIES: usize = 32;
/// Past this many distinct file records a manifest starts over.
const MAX_FILES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub path: String,
    pub digest: Digest,
    pub stat: Stat,
    /// The stat can vouch for the content (see [`crate::files::Hashed::stable`]).
    pub stable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub files: Vec<u32>,
    pub negatives: Vec<u32>,
    pub positives: Vec<u32>,
    /// The day the result was made, when a header uses `__DATE__`.
    pub date: Option<String>,
    pub result: Digest,
}

/// A directory that must gain no entry, with its stat when that was last known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirRecord {
    pub path: String,
    pub stat: Stat,
    pub stable: bool,
}

/// A path that must not exist, and the directory it would appear in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negative {
    pub path: String,
    /// Index into [`Manifest::dirs`], when the parent could be fingerprinted.
    pub dir: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Direct mode cannot be trusted for this key (a project file uses `__has_include`): results
    /// are keyed by the preprocessor's output instead, and the lists below are empty.
    pub preprocessor: bool,
    /// Why, for `KILN_LOG=debug`: the file and its `__has_include` that kiln cannot follow.
    pub preprocessor_why: String,
    pub files: Vec<FileRecord>,
    pub dirs: Vec<DirRecord>,
    pub negatives: Vec<Negative>,
    /// Paths that must exist: files a `__has_include` found, which the compile may not have
    /// opened.
    pub positives: Vec<String>,
    pub entries: Vec<Entry>,
}

fn put_stat(w: &mut Writer, s: &Stat) {
    w.u64(s.size);
    w.i64(s.mtime_ns);
    w.i64(s.ctime_ns);
    w.u64(s.ino);
    w.u64(s.dev);
}

fn get_stat(r: &mut Reader) -> Option<Stat> {
    Some(Stat {
        size: r.u64()?,
        mtime_ns: r.i64()?,
        ctime_ns: r.i64()?,
        ino: r.u64()?,
        dev: r.u64()?,
    })
}

/// The outcome of checking a manifest against the file system.
#[derive(Debug)]
pub struct Found {
    pub result: Digest,
    /// Records that were re-read and are now stable: writing them back saves the re-read
    /// next time.
    pub refreshed: Vec<(usize, Stat)>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(FORMAT);
        w.u8(u8::from(self.preprocessor));
        w.str(&self.preprocessor_why);
        w.u32(self.files.len() as u32);
        for f in &self.files {
            w.str(&f.path);
            w.digest(&f.digest);
            put_stat(&mut w, &f.stat);
            w.u8(u8::from(f.stable));
        }
        w.u32(self.dirs.len() as u32);
        for d in &self.dirs {
            w.str(&d.path);
            put_stat(&mut w, &d.stat);
            w.u8(u8::from(d.stable));
        }
        w.u32(self.negatives.len() as u32);
        for n in &self.negatives {
            w.str(&n.path);
            w.u32(n.dir.unwrap_or(u32::MAX));
        }
        w.u32(self.positives.len() as u32);
        for p in &self.positives {
            w.str(p);
        }
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            w.u32(e.files.len() as u32);
            e.files.iter().for_each(|i| w.u32(*i));
            w.u32(e.negatives.len() as u32);
            e.negatives.iter().for_each(|i| w.u32(*i));
            w.u32(e.positives.len() as u32);
            e.positives.iter().for_each(|i| w.u32(*i));
            w.str(e.date.as_deref().unwrap_or(""));
            w.digest(&e.result);
        }
        w.0
    }

    /// Decodes a manifest; `None` for another format version or damage.
    pub fn decode(bytes: &[u8]) -> Option<Manifest> {
        let mut r = Reader(bytes);
        if r.u8()? != FORMAT {
            return None;
        }
        let mut m = Manifest {
            preprocessor: r.u8()? != 0,
            preprocessor_why: r.str()?,
            ..Manifest::default()
        };
        for _ in 0..r.u32()? {
            m.files.push(FileRecord {
                path: r.str()?,
                digest: r.digest()?,
                stat: get_stat(&mut r)?,
                stable: r.u8()? != 0,
            });
        }
        for _ in 0..r.u32()? {
            m.dirs.push(DirRecord {
                path: r.str()?,
                stat: get_stat(&mut r)?,
                stable: r.u8()? != 0,
            });
        }
        let nd = m.dirs.len() as u32;
        for _ in 0..r.u32()? {
            let path = r.str()?;
            let dir = match r.u32()? {
                u32::MAX => None,
                i if i < nd => Some(i),
                _ => return None,
            };
            m.negatives.push(Negative { path, dir });
        }
        for _ in 0..r.u32()? {
            m.positives.push(r.str()?);
        }
        let (nf, nn, np) = (
            m.files.len() as u32,
            m.negatives.len() as u32,
            m.positives.len() as u32,
        );
        for _ in 0..r.u32()? {
            let files = (0..r.u32()?)
                .map(|_| r.u32().filter(|i| *i < nf))
                .collect::<Option<Vec<_>>>()?;
            let negatives = (0..r.u32()?)
                .map(|_| r.u32().filter(|i| *i < nn))
                .collect::<Option<Vec<_>>>()?;
            let positives = (0..r.u32()?)
                .map(|_| r.u32().filter(|i| *i < np))
                .collect::<Option<Vec<_>>>()?;
            let date = r.str().filter(|d| !d.is_empty());
            m.entries.push(Entry {
                files,
                negatives,
                positives,
                date,
                result: r.digest()?,
            });
        }
        r.is_empty().then_some(m)
    }

    /// Finds the newest entry whose headers all still match, relative to `cwd`.
    pub fn lookup(&self, cwd: &Path, today: &str) -> Option<Found> {
        // Each file and negative is checked at most once across entries.
        // A verified file: its stat now, and whether that stat can vouch for it next time.
        // Indices are dense, so the memos are vectors: a hit checks hundreds of paths.
        let mut file_ok: Vec<Option<Option<(Stat, bool)>>> = vec![None; self.files.len()];
        let mut digests: HashMap<&str, Option<(Digest, Stat, bool)>> = HashMap::new();
        let mut absent: Vec<Option<bool>> = vec![None; self.negatives.len()];
        let mut dir_unchanged: Vec<Option<bool>> = vec![None; self.dirs.len()];
        let mut present: Vec<Option<bool>> = vec![None; self.positives.len()];
        'entries: for e in self.entries.iter().rev() {
            if e.date.as_deref().is_some_and(|d| d != today) {
                continue;
            }
            for &i in &e.negatives {
                let neg = &self.negatives[i as usize];
                let ok = *absent[i as usize].get_or_insert_with(|| {
                    let unchanged = neg.dir.is_some_and(|d| {
                        *dir_unchanged[d as usize].get_or_insert_with(|| {
                            let rec = &self.dirs[d as usize];
                            rec.stable
                                && files::stat(&cwd.join(&rec.path)).is_ok_and(|st| st == rec.stat)
                        })
                    });
                    unchanged || std::fs::symlink_metadata(cwd.join(&neg.path)).is_err()
                });
                if !ok {
                    continue 'entries;
                }
            }
            for &i in &e.positives {
                let ok = *present[i as usize].get_or_insert_with(|| {
                    std::fs::metadata(cwd.join(&self.positives[i as usize])).is_ok()
                });
                if !ok {
                    continue 'entries;
                }
            }
            for &i in &e.files {
                let rec = &self.files[i as usize];
                let verdict = file_ok[i as usize].get_or_insert_with(|| {
                    let path = cwd.join(&rec.path);
                    match files::stat(&path) {
                        Ok(st) if rec.stable && st == rec.stat => Some((st, true)),
                        Ok(_) => {
                            let d = digests.entry(rec.path.as_str()).or_insert_with(|| {
                                files::hash_file(&path)
                                    .ok()
                                    .map(|h| (h.digest, h.stat, h.stable))
                            });
                            d.filter(|(digest, _, _)| *digest == rec.digest)
                                .map(|(_, st, stable)| (st, stable))
                        }
                        Err(_) => None,
                    }
                });
                if verdict.is_none() {
                    continue 'entries;
                }
            }
            let refreshed = e
                .files
                .iter()
                .filter_map(|&i| {
                    let rec = &self.files[i as usize];
                    let (now, stable) = file_ok[i as usize].flatten()?;
                    (stable && (now != rec.stat || !rec.stable)).then_some((i as usize, now))
                })
                .collect();
            return Some(Found {
                result: e.result,
                refreshed,
            });
        }
        None
    }

    /// Why the newest entry does not match, for `KILN_LOG=debug`. Only called on a miss.
    pub fn explain_miss(&self, cwd: &Path, today: &str) -> String {
        let Some(e) = self.entries.last() else {
            return "the manifest is empty".into();
        };
        let others = match self.entries.len() {
            1 => String::new(),
            n => format!(" (and {} older results do not match either)", n - 1),
        };
        if e.date.as_deref().is_some_and(|d| d != today) {
            return format!("the last result used __DATE__ and the date has changed{others}");
        }
        for &i in &e.negatives {
            let neg = &self.negatives[i as usize];
            if std::fs::symlink_metadata(cwd.join(&neg.path)).is_ok() {
                return format!(
                    "{} now exists and would be included instead{others}",
                    neg.path
                );
            }
        }
        for &i in &e.positives {
            let path = &self.positives[i as usize];
            if std::fs::metadata(cwd.join(path)).is_err() {
                return format!("{path}, which __has_include found, is gone{others}");
            }
        }
        for &i in &e.files {
            let rec = &self.files[i as usize];
            match files::hash_file(&cwd.join(&rec.path)) {
                Err(err) => return format!("header {} cannot be read: {err}{others}", rec.path),
                Ok(h) if h.digest != rec.digest => {
                    return format!("header {} changed{others}", rec.path)
                }
                Ok(_) => {}
            }
        }
        format!("the last result's headers match now; they changed and changed back{others}")
    }

    /// Records that re-read files are stable with their new stat.
    pub fn refresh(&mut self, refreshed: &[(usize, Stat)]) {
        for &(i, stat) in refreshed {
            if let Some(rec) = self.files.get_mut(i) {
                rec.stat = stat;
                rec.stable = true;
            }
        }
    }

    /// Adds the results of `other` (another machine's, say) that this manifest lacks, as older
    /// than its own. Skipped when the union would outgrow the manifest's bounds.
    pub fn merge(&mut self, other: &Manifest) {
        if self.preprocessor
            || other.preprocessor
            || self.files.len() + other.files.len() > MAX_FILES
        {
            return;
        }
        let mine = std::mem::take(&mut self.entries);
        for e in &other.entries {
            if mine.iter().any(|m| m.result == e.result) {
                continue;
            }
            let files = e
                .files
                .iter()
                .map(|&i| other.files[i as usize].clone())
                .collect();
            let negatives = e
                .negatives
                .iter()
                .map(|&i| {
                    let n = &other.negatives[i as usize];
                    (
                        n.path.clone(),
                        n.dir.map(|d| other.dirs[d as usize].clone()),
                    )
                })
                .collect();
            let positives = e
                .positives
                .iter()
                .map(|&i| other.positives[i as usize].clone())
                .collect();
            self.add(files, negatives, positives, e.date.clone(), e.result);
        }
        // This manifest's own entries stay the newest.
        self.entries.extend(mine);
        let excess = self.entries.len().saturating_sub(MAX_ENTRIES);
        self.entries.drain(..excess);
    }

    /// Adds a result for the given headers and negative paths, keeping the manifest bounded.
    pub fn add(
        &mut self,
        files: Vec<FileRecord>,
        negatives: Vec<(String, Option<DirRecord>)>,
        positives: Vec<String>,
        date: Option<String>,
        result: Digest,
    ) {
        if self.files.len() + files.len() > MAX_FILES {
            *self = Manifest::default();
        }
        let mut file_idx = Vec::with_capacity(files.len());
        for f in files {
            let i = match self
                .files
                .iter()
                .position(|g| g.path == f.path && g.digest == f.digest)
            {
                Some(i) => {
                    self.files[i] = f;
                    i
                }
                None => {
                    self.files.push(f);
                    self.files.len() - 1
                }
            };
            file_idx.push(i as u32);
        }
        let mut neg_idx = Vec::with_capacity(negatives.len());
        for (path, dir) in negatives {
            let dir = dir.map(|d| match self.dirs.iter().position(|g| g.path == d.path) {
                Some(i) => {
                    self.dirs[i] = d;
                    i as u32
                }
                None => {
                    self.dirs.push(d);
                    self.dirs.len() as u32 - 1
                }
            });
            let i = match self.negatives.iter().position(|g| g.path == path) {
                Some(i) => {
                    self.negatives[i].dir = dir;
                    i
                }
                None => {
                    self.negatives.push(Negative { path, dir });
                    self.negatives.len() - 1
                }
            };
            neg_idx.push(i as u32);
        }
        let mut pos_idx = Vec::with_capacity(positives.len());
        for path in positives {
            let i = match self.positives.iter().position(|g| *g == path) {
                Some(i) => i,
                None => {
                    self.positives.push(path);
                    self.positives.len() - 1
                }
            };
            pos_idx.push(i as u32);
        }
        self.entries.retain(|e| e.result != result);
        self.entries.push(Entry {
            files: file_idx,
            negatives: neg_idx,
            positives: pos_idx,
            date,
            result,
        });
        if self.entries.len() > MAX_ENTRIES {
            self.entries.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path, name: &str) -> FileRecord {
        let h = files::hash_file(&dir.join(name)).unwrap();
        FileRecord {
            path: name.into(),
            digest: h.digest,
            stat: h.stat,
            stable: true,
        }
    }

    #[test]
    fn lookup_checks_contents_and_negatives() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.h"), "int a;").unwrap();
        let mut m = Manifest::default();
        m.add(
            vec![record(d, "a.h")],
            vec![("early/a.h".into(), None)],
            vec![],
            None,
            Digest::of(b"r1"),
        );
        let m = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(m.lookup(d, "today").unwrap().result, Digest::of(b"r1"));

        // A header appearing earlier on the include path is a miss.
        std::fs::create_dir(d.join("early")).unwrap();
        std::fs::write(d.join("early/a.h"), "int shadow;").unwrap();
        assert!(m.lookup(d, "today").is_none());
        std::fs::remove_file(d.join("early/a.h")).unwrap();

        // Changed contents are a miss, even with an identical size.
        std::fs::write(d.join("a.h"), "int b;").unwrap();
        assert!(m.lookup(d, "today").is_none());
    }

    #[test]
    fn an_unchanged_directory_vouches_for_its_negatives() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("inc")).unwrap();
        let mut st = files::stat(&d.join("inc")).unwrap();
        let rec = |stat| {
            Some(DirRecord {
                path: "inc".into(),
                stat,
                stable: true,
            })
        };
        let mut m = Manifest::default();
        m.add(
            vec![],
            vec![("inc/a.h".into(), rec(st))],
            vec![],
            None,
            Digest::of(b"r"),
        );
        assert!(m.lookup(d, "").is_some());
        // A new entry changes the directory's stat, so the negative is checked and fails.
        std::fs::write(d.join("inc/a.h"), "x").unwrap();
        assert!(m.lookup(d, "").is_none());
        // A stale fingerprint would vouch wrongly, which is why only a stat equal to the
        // recorded one counts: record the new stat and the lookup trusts it.
        st = files::stat(&d.join("inc")).unwrap();
        let mut m = Manifest::default();
        m.add(
            vec![],
            vec![("inc/a.h".into(), rec(st))],
            vec![],
            None,
            Digest::of(b"r"),
        );
        assert!(
            m.lookup(d, "").is_some(),
            "vouched by the unchanged directory"
        );
        let unstable = Some(DirRecord {
            path: "inc".into(),
            stat: st,
            stable: false,
        });
        let mut m = Manifest::default();
        m.add(
            vec![],
            vec![("inc/a.h".into(), unstable)],
            vec![],
            None,
            Digest::of(b"r"),
        );
        assert!(
            m.lookup(d, "").is_none(),
            "an unstable fingerprint vouches for nothing"
        );
    }

    #[test]
    fn merge_keeps_both_machines_results() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.h"), "int a;").unwrap();
        std::fs::write(d.join("b.h"), "int b;").unwrap();
        let mut mine = Manifest::default();
        mine.add(
            vec![record(d, "a.h")],
            vec![],
            vec![],
            None,
            Digest::of(b"mine"),
        );
        let mut theirs = Manifest::default();
        theirs.add(
            vec![record(d, "b.h")],
            vec![("gone.h".into(), None)],
            vec!["b.h".into()],
            None,
            Digest::of(b"theirs"),
        );
        mine.merge(&theirs);
        let mine = Manifest::decode(&mine.encode()).unwrap();
        assert_eq!(mine.entries.len(), 2);
        assert_eq!(
            mine.entries.last().unwrap().result,
            Digest::of(b"mine"),
            "own results stay newest"
        );
        assert_eq!(mine.lookup(d, "").unwrap().result, Digest::of(b"mine"));
        std::fs::write(d.join("a.h"), "int changed;").unwrap();
        assert_eq!(mine.lookup(d, "").unwrap().result, Digest::of(b"theirs"));
    }

    #[test]
    fn positives_must_stay() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("found.h"), "").unwrap();
        let mut m = Manifest::default();
        m.add(
            vec![],
            vec![],
            vec!["found.h".into()],
            None,
            Digest::of(b"r"),
        );
        let m = Manifest::decode(&m.encode()).unwrap();
        assert!(m.lookup(d, "").is_some());
        std::fs::remove_file(d.join("found.h")).unwrap();
        assert!(m.lookup(d, "").is_none());
        assert!(m.explain_miss(d, "").contains("found.h"));
    }

    #[test]
    fn date_bound_entries_expire() {
        let mut m = Manifest::default();
        m.add(
            vec![],
            vec![],
            vec![],
            Some("Nov 22 2026".into()),
            Digest::of(b"r"),
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(m.lookup(dir.path(), "Nov 22 2026").is_some());
        assert!(m.lookup(dir.path(), "Nov 23 2026").is_none());
    }

    #[test]
    fn bounded_and_decoding_refuses_damage() {
        let mut m = Manifest::default();
        for n in 0..(MAX_ENTRIES as u32 + 5) {
            m.add(
                vec![],
                vec![(format!("n{n}"), None)],
                vec![],
                None,
                Digest::of(&n.to_le_bytes()),
            );
        }
        assert_eq!(m.entries.len(), MAX_ENTRIES);
        let bytes = m.encode();
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_none());
        let mut bad = bytes.clone();
        bad[0] = 99;
        assert!(Manifest::decode(&bad).is_none());
    }
}
