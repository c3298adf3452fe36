//! The remote tier: a `kiln-cache` server named by `KILN_REMOTE_CACHE` (`https://HOST:PORT`),
//! reached over gRPC (`kiln.v1.Cache`) on the port its HTTP protocols share.
//!
//! Lookups go to the local cache first, then here; what the server has is copied into the local
//! cache. Results made locally are pushed unless `KILN_NO_PUSH` is set. The server is only ever
//! an optimisation: every failure is counted in `kiln stats` and the build goes on. After a
//! failure the server is left alone for [`DOWN_FOR`], so a dead server does not add its
//! timeout to every compile. Nothing is set up until the first call, so a local hit pays
//! nothing for the remote tier.

use std::cell::OnceCell;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use kiln_cache::Digest;
use kiln_proto::v1::cache_client::CacheClient;
use kiln_proto::v1::{CacheGet, CachePut};

use crate::config::Config;

/// How long a failed server is left alone.
pub const DOWN_FOR: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest body accepted from the server.
const MAX_BODY: usize = 1 << 30;

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
    #[error("remote cache {url}: {message}")]
    Transport { url: String, message: String },
    #[error("remote cache {url} answered {code:?}: {message}")]
    Status {
        url: String,
        code: tonic::Code,
        message: String,
    },
}

/// What this process did with the server, for `kiln stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub hits: i64,
    pub errors: i64,
    pub uploads: i64,
}

type Client = CacheClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        kiln_net::auth::Bearer,
    >,
>;

/// A client of one `kiln-cache` server.
#[derive(Debug)]
pub struct Remote {
    base: String,
    tls: kiln_net::tls::ClientFiles,
    token: kiln_net::auth::Credential,
    push: bool,
    down_marker: PathBuf,
    /// Set by the first failure: the rest of this process leaves the server alone too.
    down: std::cell::Cell<bool>,
    /// The runtime and channel, made by the first call.
    link: OnceCell<Result<(tokio::runtime::Runtime, Client), RemoteError>>,
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
        Some(Remote {
            base: url.trim_end_matches('/').to_owned(),
            tls: cfg.tls(),
            token: cfg.credential(),
            push: !cfg.no_push && !cfg.read_only,
            down_marker,
            down: std::cell::Cell::new(false),
            link: OnceCell::new(),
        })
    }

    fn transport(&self, message: impl std::fmt::Display) -> RemoteError {
        RemoteError::Transport {
            url: self.base.clone(),
            message: message.to_string(),
        }
    }

    fn connect(&self) -> Result<(tokio::runtime::Runtime, Client), RemoteError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.transport(e))?;
        let interceptor = self.token.interceptor().map_err(|e| self.transport(e))?;
        let endpoint = kiln_net::tls::endpoint(&self.base, &self.tls)
            .map_err(|e| self.transport(e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true);
        let channel = runtime
            .block_on(endpoint.connect())
            .map_err(|e| self.transport(crate::dist::error_chain(&e)))?;
        let client = CacheClient::with_interceptor(channel, interceptor)
            .max_decoding_message_size(MAX_BODY)
            .max_encoding_message_size(MAX_BODY);
        Ok((runtime, client))
    }

    /// Runs one call on the link, marking the server down if it fails.
    fn call<T>(
        &self,
        call: impl AsyncFnOnce(Client) -> Result<T, tonic::Status>,
    ) -> Result<T, RemoteError> {
        let result = match self.link.get_or_init(|| self.connect()) {
            Ok((runtime, client)) => {
                runtime
                    .block_on(call(client.clone()))
                    .map_err(|s| RemoteError::Status {
                        url: self.base.clone(),
                        code: s.code(),
                        message: s.message().to_owned(),
                    })
            }
            Err(e) => Err(self.transport(e)),
        };
        result.map_err(|e| self.failed(e))
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
        let request = CacheGet {
            protocol_version: kiln_proto::PROTOCOL_VERSION,
            kind: kind.path().into(),
            key: key.to_hex(),
        };
        let entry = self
            .call(async move |mut c| c.get(request).await)?
            .into_inner();
        Ok(entry.found.then(|| entry.body.to_vec()))
    }

    /// Stores an entry on the server (nothing when pushing is off).
    pub fn put(&self, kind: Entry, key: &Digest, body: &[u8]) -> Result<bool, RemoteError> {
        if !self.push || self.down.get() {
            return Ok(false);
        }
        let request = CachePut {
            protocol_version: kiln_proto::PROTOCOL_VERSION,
            kind: kind.path().into(),
            key: key.to_hex(),
            body: bytes::Bytes::copy_from_slice(body),
        };
        self.call(async move |mut c| c.put(request).await)?;
        Ok(true)
    }
}
