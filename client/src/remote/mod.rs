//! The remote tier: a shared cache named by `KILN_REMOTE_CACHE`, reached over gRPC in one of
//! two protocols:
//!
//! - `https://HOST:PORT`: a `kiln-cache` server, in kiln's own protocol (`kiln.v1.Cache`, see
//!   [`kiln`]);
//! - `grpc://HOST:PORT` or `grpcs://HOST:PORT`: any cache of the Remote Execution API
//!   (bazel-remote, BuildBuddy, BuildGrid, NativeLink, kiln-cache itself), each kiln entry an
//!   action-cache entry whose output is a CAS blob (see [`reapi`] for the layout).
//!
//! Lookups go to the local cache first, then here; what the server has is copied into the local
//! cache. Results made locally are pushed unless `KILN_NO_PUSH` is set. The server is only ever
//! an optimisation: every failure is counted in `kiln stats` and the build goes on. After a
//! failure the server is left alone for [`DOWN_FOR`], so a dead server does not add its
//! timeout to every compile. Nothing is set up until the first call, so a local hit pays
//! nothing for the remote tier.

mod kiln;
mod reapi;

use std::cell::OnceCell;
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
    #[error("remote cache {url} answered {code:?}: {message}{}", hint(*code))]
    Status {
        url: String,
        code: tonic::Code,
        message: String,
    },
}

/// What to do about an answer, where there is something to do.
fn hint(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            " (the server refused kiln's token: check the file named by token_file, \
             KILN_TOKEN_FILE, against the server's tokens)"
        }
        _ => "",
    }
}

/// What this process did with the server, for `kiln stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub hits: i64,
    pub errors: i64,
    pub uploads: i64,
}

/// Which protocol the configured URL speaks, decided by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `https://` (or `http://`): kiln's own, to a `kiln-cache`.
    Kiln,
    /// `grpc://` or `grpcs://`: the Remote Execution API.
    Reapi,
}

impl Protocol {
    /// The protocol of a `KILN_REMOTE_CACHE` URL and the URL the gRPC channel dials, or why it
    /// is not one kiln can use.
    pub fn of(url: &str) -> Result<(Protocol, String), String> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let (protocol, dial) = match scheme {
            "https" | "http" => (Protocol::Kiln, url.to_owned()),
            "grpcs" => (Protocol::Reapi, format!("https://{rest}")),
            "grpc" => (Protocol::Reapi, format!("http://{rest}")),
            _ => {
                return Err(format!(
                    "remote cache {url:?} is not a URL kiln can use: want https://HOST:PORT for a \
                     kiln-cache, or grpcs://HOST:PORT (grpc:// without TLS) for any REAPI cache \
                     (KILN_REMOTE_CACHE, remote_cache)"
                ))
            }
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') && protocol == Protocol::Reapi {
            return Err(format!(
                "remote cache {url:?} names no server: want {scheme}://HOST:PORT (a REAPI \
                 instance name goes in KILN_REMOTE_INSTANCE, not the URL)"
            ));
        }
        Ok((protocol, dial.trim_end_matches('/').to_owned()))
    }
}

/// An open channel to the server, in the configured protocol.
enum Link {
    Kiln(kiln::Client),
    Reapi(reapi::Client),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Kiln(_) => "Link::Kiln",
            Link::Reapi(_) => "Link::Reapi",
        })
    }
}

/// A client of one remote cache.
#[derive(Debug)]
pub struct Remote {
    /// The URL as configured, for messages.
    url: String,
    /// The URL the channel dials.
    dial: String,
    protocol: Protocol,
    /// The REAPI instance name (`KILN_REMOTE_INSTANCE`).
    instance: String,
    tls: kiln_net::tls::ClientFiles,
    token: kiln_net::auth::Credential,
    push: bool,
    down_marker: PathBuf,
    /// Set by the first failure: the rest of this process leaves the server alone too.
    down: std::cell::Cell<bool>,
    /// The runtime and channel, made by the first call.
    link: OnceCell<Result<(tokio::runtime::Runtime, Link), RemoteError>>,
}

impl Remote {
    /// The configured server, unless none is configured or it failed less than [`DOWN_FOR`] ago.
    pub fn from_config(cfg: &Config) -> Option<Remote> {
        let url = cfg.remote_cache.as_deref()?;
        // The configuration checked the URL; one that slipped through is no remote tier.
        let (protocol, dial) = Protocol::of(url)
            .inspect_err(|e| tracing::warn!("{e}"))
            .ok()?;
        let down_marker = cfg.dir.join("remote-down");
        let recently_down = fs::metadata(&down_marker)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < DOWN_FOR));
        if recently_down {
            tracing::debug!(url, "remote cache failed recently; not asking it");
            return None;
        }
        Some(Remote {
            url: url.trim_end_matches('/').to_owned(),
            dial,
            protocol,
            instance: cfg.remote_instance.clone().unwrap_or_default(),
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
            url: self.url.clone(),
            message: message.to_string(),
        }
    }

    fn connect(&self) -> Result<(tokio::runtime::Runtime, Link), RemoteError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.transport(e))?;
        let interceptor = self.token.interceptor().map_err(|e| self.transport(e))?;
        let endpoint = kiln_net::tls::endpoint(&self.dial, &self.tls)
            .map_err(|e| self.transport(e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true);
        let channel = runtime
            .block_on(endpoint.connect())
            .map_err(|e| self.transport(crate::dist::error_chain(&e)))?;
        let link = match self.protocol {
            Protocol::Kiln => Link::Kiln(kiln::Client::new(channel, interceptor)),
            Protocol::Reapi => Link::Reapi(reapi::Client::new(
                channel,
                interceptor,
                self.instance.clone(),
            )),
        };
        Ok((runtime, link))
    }

    /// Runs one call on the link, marking the server down if it fails.
    fn call<T>(
        &self,
        call: impl AsyncFnOnce(&Link) -> Result<T, tonic::Status>,
    ) -> Result<T, RemoteError> {
        let result = match self.link.get_or_init(|| self.connect()) {
            Ok((runtime, link)) => runtime
                .block_on(call(link))
                .map_err(|s| RemoteError::Status {
                    url: self.url.clone(),
                    code: s.code(),
                    message: s.message().to_owned(),
                }),
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
        self.call(async move |link| match link {
            Link::Kiln(c) => c.get(kind, key).await,
            Link::Reapi(c) => c.get(kind, key).await,
        })
    }

    /// Stores an entry on the server (nothing when pushing is off, or the server takes no
    /// writes).
    pub fn put(&self, kind: Entry, key: &Digest, body: &[u8]) -> Result<bool, RemoteError> {
        if !self.push || self.down.get() {
            return Ok(false);
        }
        self.call(async move |link| match link {
            Link::Kiln(c) => c.put(kind, key, body).await.map(|()| true),
            Link::Reapi(c) => c.put(kind, key, body).await,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_chooses_the_protocol() {
        for (url, want) in [
            ("https://cache:8080", (Protocol::Kiln, "https://cache:8080")),
            (
                "http://127.0.0.1:9/",
                (Protocol::Kiln, "http://127.0.0.1:9"),
            ),
            ("grpcs://cache:443", (Protocol::Reapi, "https://cache:443")),
            ("grpc://[::1]:9092/", (Protocol::Reapi, "http://[::1]:9092")),
        ] {
            let (p, dial) = Protocol::of(url).unwrap();
            assert_eq!((p, dial.as_str()), want, "{url}");
        }
        for bad in [
            "cache:8080",
            "s3://bucket",
            "ftp://cache",
            "grpc://",
            "grpcs://cache:443/main",
        ] {
            assert!(Protocol::of(bad).is_err(), "{bad}");
        }
        let err = Protocol::of("bazel-remote:9092").unwrap_err();
        assert!(err.contains("grpcs://HOST:PORT"), "{err}");
    }
}
