//! The remote tier: a `kiln-cache` server named by `KILN_REMOTE_CACHE` (`http://HOST:PORT`).
//!
//! Lookups go to the local cache first, then here; what the server has is copied into the local
//! cache. Results made locally are pushed unless `KILN_NO_PUSH` is set. The server is only ever
//! an optimisation: every failure is counted in `kiln stats` and the build goes on. After a
//! failure the server is left alone for [`DOWN_FOR`], so a dead server does not add its
//! timeout to every compile.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use kiln_cache::Digest;

use crate::config::Config;

/// How long a failed server is left alone.
pub const DOWN_FOR: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest body accepted from the server.
const MAX_BODY: u64 = 4 << 30;

/// What kind of entry a request names; part of its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Manifest,
    Result,
    GoAction,
    GoOutput,
}

impl Entry {
    fn path(self) -> &'static str {
        match self {
            Entry::Manifest => "manifest",
            Entry::Result => "result",
            Entry::GoAction => "go-action",
            Entry::GoOutput => "go-output",
        }
    }
}

/// A failed exchange with the server.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote cache {url}: {source}")]
    Transport { url: String, source: ureq::Error },
    #[error("remote cache {url} answered {status}")]
    Status { url: String, status: u16 },
}

/// What this process did with the server, for `kiln stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub hits: i64,
    pub errors: i64,
    pub uploads: i64,
}

/// A client of one `kiln-cache` server.
#[derive(Debug)]
pub struct Remote {
    base: String,
    agent: ureq::Agent,
    push: bool,
    down_marker: PathBuf,
    /// Set by the first failure: the rest of this process leaves the server alone too.
    down: std::cell::Cell<bool>,
}

impl Remote {
    /// The configured server, unless none is configured or it failed less than [`DOWN_FOR`] ago.
    pub fn from_config(cfg: &Config) -> Option<Remote> {
        let url = cfg.remote_cache.as_deref()?;
        let down_marker = cfg.dir.join("remote-down");
        let recently_down = fs::metadata(&down_marker)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < DOWN_FOR));
        if recently_down {
            tracing::debug!(url, "remote cache failed recently; not asking it");
            return None;
        }
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build();
        Some(Remote {
            base: url.trim_end_matches('/').to_owned(),
            agent: ureq::Agent::new_with_config(config),
            push: !cfg.no_push && !cfg.read_only,
            down_marker,
            down: std::cell::Cell::new(false),
        })
    }

    fn url(&self, kind: Entry, key: &Digest) -> String {
        format!("{}/kiln/{}/{}", self.base, kind.path(), key.to_hex())
    }

    fn failed(&self, e: RemoteError) -> RemoteError {
        self.down.set(true);
        tracing::warn!("{e}; not asking it again for {} s", DOWN_FOR.as_secs());
        let marked =
            fs::File::create(&self.down_marker).and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(err) = marked {
            tracing::debug!(error = %err, "cannot note that the remote cache is down");
        }
        e
    }

    /// The entry's bytes, or `None` when the server does not have it.
    pub fn get(&self, kind: Entry, key: &Digest) -> Result<Option<Vec<u8>>, RemoteError> {
        if self.down.get() {
            return Ok(None);
        }
        let url = self.url(kind, key);
        let mut resp = match self.agent.get(&url).call() {
            Ok(r) => r,
            Err(source) => return Err(self.failed(RemoteError::Transport { url, source })),
        };
        match resp.status().as_u16() {
            200 => match resp.body_mut().with_config().limit(MAX_BODY).read_to_vec() {
                Ok(bytes) => Ok(Some(bytes)),
                Err(source) => Err(self.failed(RemoteError::Transport { url, source })),
            },
            404 => Ok(None),
            status => Err(self.failed(RemoteError::Status { url, status })),
        }
    }

    /// Stores an entry on the server (nothing when pushing is off).
    pub fn put(&self, kind: Entry, key: &Digest, body: &[u8]) -> Result<bool, RemoteError> {
        if !self.push || self.down.get() {
            return Ok(false);
        }
        let url = self.url(kind, key);
        match self.agent.put(&url).send(body) {
            Ok(resp) if resp.status().is_success() => Ok(true),
            Ok(resp) => Err(self.failed(RemoteError::Status {
                url,
                status: resp.status().as_u16(),
            })),
            Err(source) => Err(self.failed(RemoteError::Transport { url, source })),
        }
    }
}
