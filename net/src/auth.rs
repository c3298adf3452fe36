//! Tokens: the secret a client or builder presents (`authorization: Bearer TOKEN`), and the
//! files a server checks them against.
//!
//! A server never holds a token, only its BLAKE3 hash: a tokens file has one line per token,
//! `NAME HASH [jobs=N]`, where `jobs` limits the jobs a client may have in flight. The file is
//! read again whenever it changes, so a token is added, rotated or revoked by editing it, with no
//! restart. Comparing hashes takes the same time however many bytes match.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The metadata key a token travels in.
pub const HEADER: &str = "authorization";

/// The header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token in a header value, if it is a bearer token (or, for HTTP clients that can only
/// send a user and password, the password of Basic authentication).
pub fn presented(value: &str) -> Option<String> {
    let value = value.trim();
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let basic = value.strip_prefix("Basic ")?;
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    Some(password.to_owned())
}

/// The hash a tokens file records for `token`.
pub fn hash(token: &str) -> String {
    blake3::hash(token.trim().as_bytes()).to_hex().to_string()
}

/// A new token: 32 bytes from the operating system's random source, in hex.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a token from its file (the whole file, trimmed), naming the file when it cannot.
pub fn read_token(path: &Path) -> Result<String, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(token.to_owned())
}

/// Where a client or builder gets the token it presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Credential {
    /// None: for a farm that runs without tokens.
    #[default]
    None,
    /// Read from this file at each connection, so a rotated token is picked up.
    File(PathBuf),
    /// Held in memory (an in-process builder's).
    Token(String),
}

impl Credential {
    /// The token to present now.
    pub fn token(&self) -> Result<Option<String>, String> {
        match self {
            Credential::None => Ok(None),
            Credential::File(path) => read_token(path).map(Some),
            Credential::Token(t) => Ok(Some(t.clone())),
        }
    }

    /// A tonic interceptor that presents the token on every call.
    pub fn interceptor(&self) -> Result<Bearer, String> {
        let value = match self.token()? {
            None => None,
            Some(t) => Some(
                bearer(&t)
                    .parse()
                    .map_err(|_| "the token holds characters a header cannot carry".to_string())?,
            ),
        };
        Ok(Bearer(value))
    }
}

/// Presents a token on every call of a tonic client.
#[derive(Debug, Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(HEADER, value.clone());
        }
        Ok(request)
    }
}

/// One accepted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its name in the file: who holds it, for logs and limits.
    pub name: String,
    hash: blake3::Hash,
    /// Jobs a client holding it may have in flight; `None` for no limit.
    pub max_jobs: Option<u32>,
}

/// A tokens file that has a line the parser cannot take.
#[derive(Debug, thiserror::Error)]
#[error("tokens file {}: {reason}", path.display())]
pub struct TokensError {
    pub path: PathBuf,
    pub reason: String,
}

fn parse(path: &Path, text: &str) -> Result<Vec<Grant>, TokensError> {
    let bad = |n: usize, why: &str| TokensError {
        path: path.into(),
        reason: format!("line {}: {why}", n + 1),
    };
    let mut grants = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(hex)) = (words.next(), words.next()) else {
            return Err(bad(n, "expected NAME HASH [jobs=N]"));
        };
        let hash = blake3::Hash::from_hex(hex).map_err(|_| {
            bad(
                n,
                "the hash must be 64 hex digits (see `kiln-scheduler token`)",
            )
        })?;
        let mut max_jobs = None;
        for word in words {
            let Some(n_jobs) = word.strip_prefix("jobs=") else {
                return Err(bad(
                    n,
                    &format!("unknown setting {word:?}; only jobs=N is known"),
                ));
            };
            max_jobs = Some(
                n_jobs
                    .parse::<u32>()
                    .ok()
                    .filter(|&j| j > 0)
                    .ok_or_else(|| bad(n, "jobs= takes a whole number above 0"))?,
            );
        }
        grants.push(Grant {
            name: name.to_owned(),
            hash,
            max_jobs,
        });
    }
    Ok(grants)
}

type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// A tokens file, read again when it changes.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    state: Mutex<(Stamp, Vec<Grant>)>,
}

impl Tokens {
    /// Reads `path`; a missing or malformed file is an error at start-up.
    pub fn open(path: &Path) -> Result<Tokens, TokensError> {
        let text = fs::read_to_string(path).map_err(|e| TokensError {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let grants = parse(path, &text)?;
        Ok(Tokens {
            path: path.into(),
            state: Mutex::new((stamp(path), grants)),
        })
    }

    /// The grant for `token`, if this file holds it. A file that changed is read first; if it
    /// has become unreadable or malformed, the tokens read last stay in force and the problem is
    /// logged, so a half-saved edit locks nobody out.
    pub fn check(&self, token: &str) -> Option<Grant> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.path);
        if now != state.0 {
            match fs::read_to_string(&self.path)
                .map_err(|e| TokensError {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })
                .and_then(|text| parse(&self.path, &text))
            {
                Ok(grants) => {
                    tracing::info!(file = %self.path.display(), tokens = grants.len(), "tokens file read again");
                    *state = (now, grants);
                }
                Err(e) => {
                    tracing::warn!("{e}; keeping the tokens read before");
                    state.0 = now;
                }
            }
        }
        let presented = blake3::hash(token.trim().as_bytes());
        // Every grant is compared, so the time taken does not say which one matched.
        let mut found = None;
        for grant in &state.1 {
            if grant.hash == presented && found.is_none() {
                found = Some(grant.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        fs::write(&path, format!("# the CI\nci {} jobs=4\n", hash(&a))).unwrap();
        let tokens = Tokens::open(&path).unwrap();
        let grant = tokens.check(&a).expect("a is granted");
        assert_eq!((grant.name.as_str(), grant.max_jobs), ("ci", Some(4)));
        assert_eq!(tokens.check(&b), None);
        // Rotation: b replaces a. The length changes, so no mtime granularity is needed.
        fs::write(
            &path,
            format!("ci {}\nlaptop {}\n", hash(&b), hash(&a)).replace("ci", "ci2"),
        )
        .unwrap();
        assert_eq!(tokens.check(&b).unwrap().name, "ci2");
        assert_eq!(tokens.check(&a).unwrap().name, "laptop");
        // A broken edit keeps what was in force.
        fs::write(&path, "ci2 not-a-hash\n").unwrap();
        assert_eq!(tokens.check(&b).unwrap().name, "ci2");
    }

    #[test]
    fn malformed_lines_are_named() {
        let path = Path::new("t");
        let e = parse(path, "ok 00\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("line 1: the hash must be 64 hex digits"),
            "{e}"
        );
        let h = hash("x");
        let e = parse(path, &format!("a {h}\nb {h} jobs=0\n")).unwrap_err();
        assert!(e.to_string().contains("line 2: jobs= takes"), "{e}");
        let e = parse(path, &format!("a {h} mode=x\n")).unwrap_err();
        assert!(e.to_string().contains("unknown setting"), "{e}");
        let e = parse(path, "lonely\n").unwrap_err();
        assert!(e.to_string().contains("expected NAME HASH"), "{e}");
    }

    #[test]
    fn bearer_and_basic_headers_present_the_token() {
        assert_eq!(presented("Bearer abc").as_deref(), Some("abc"));
        // "kiln:abc" in base64, as ccache or curl send a URL's user:password.
        assert_eq!(presented("Basic a2lsbjphYmM=").as_deref(), Some("abc"));
        assert_eq!(presented("Digest x"), None);
        assert_eq!(presented("Basic !!!"), None);
    }
}
