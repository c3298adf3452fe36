//! `kiln-cache`: kiln's store over HTTP, in the protocols other build tools already speak.
//!
//! - waf's `wafcache`: `GET` and multipart `POST` (field `file`) on `/files/<sig>/<i>`; the
//!   double slash waf sends after `/files/` is tolerated; a miss is 404, never an empty 200.
//! - Bazel's HTTP cache: `GET`, `HEAD` and `PUT` on `/ac/<sha256>` and `/cas/<sha256>`; a CAS
//!   body must hash to its name.
//! - ccache's HTTP remote storage under `/ccache/`: `GET`, `HEAD`, `PUT`, `DELETE`; the
//!   `subdirs` (`ab/cdef…`) and `flat` layouts name the same entry.
//!
//! - kiln's own remote tier: `GET`, `HEAD` and `PUT` on `/kiln/<kind>/<key>`, where `kind` is
//!   `manifest`, `result`, `go-action` or `go-output` and `key` 64 hex digits.
//!
//! Every body is a checksummed entry of the `cache/` store: written atomically, verified on
//! every read (a damaged one is a 404, never wrong bytes), evicted least-recently-used under a
//! size and a count cap, with a trim at an interval as well as on writes.

mod grpc;
mod reapi;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use kiln_cache::{Digest, Hasher, Kind, Limits, Lookup, Store};
use kiln_net::metrics::{Exposition, CONTENT_TYPE};
use sha2::Digest as _;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;

/// Settings of one server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The store's directory.
    pub dir: PathBuf,
    pub limits: Limits,
    /// How often the whole store is trimmed to its limits (writes also trim their shard).
    pub trim_interval: Duration,
    /// The largest body accepted; larger uploads get 413.
    pub max_body: usize,
    /// TLS, or plain text.
    pub listen: kiln_net::tls::Listen,
    /// The tokens that may write (any protocol); `None` lets anyone write.
    pub tokens: Option<Arc<kiln_net::auth::Tokens>>,
    /// Reads need a token too.
    pub private: bool,
    /// Protocols (`waf`, `bazel`, `ccache`) that need no token at all, for clients that cannot
    /// send one (waf's).
    pub anonymous: Vec<String>,
}

/// Which protocol a request speaks, and the key it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Waf(String),
    BazelAc(String),
    BazelCas(String),
    Ccache(String),
    /// kiln's own entries, by kind and key.
    Kiln(&'static str, String),
}

/// The kinds of entry kiln clients keep on the server.
pub const KILN_KINDS: &[&str] = &["manifest", "result", "go-action", "go-output"];

impl Route {
    /// The entry a route names: distinct per protocol, so no tool can read another's entries.
    fn key(&self) -> Digest {
        let (ns, k) = match self {
            Route::Waf(k) => ("waf", k),
            Route::BazelAc(k) => ("bazel-ac", k),
            Route::BazelCas(k) => ("bazel-cas", k),
            Route::Ccache(k) => ("ccache", k),
            Route::Kiln(kind, k) => (*kind, k),
        };
        Hasher::new("kiln-cache http v1").str(ns).str(k).finish()
    }
}

fn is_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Parses a request path; empty segments (`//`) are ignored.
pub fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["files", sig, i] if is_key(sig) && is_key(i) => Some(Route::Waf(format!("{sig}/{i}"))),
        ["ac", h] if is_sha256_hex(h) => Some(Route::BazelAc((*h).to_owned())),
        ["cas", h] if is_sha256_hex(h) => Some(Route::BazelCas((*h).to_owned())),
        ["kiln", kind, h] if is_sha256_hex(h) => KILN_KINDS
            .iter()
            .find(|k| *k == kind)
            .map(|k| Route::Kiln(k, (*h).to_owned())),
        ["ccache", rest @ ..] if !rest.is_empty() && rest.iter().all(|s| is_key(s)) => {
            Some(Route::Ccache(rest.concat()))
        }
        _ => None,
    }
}

#[derive(Clone)]
struct AppState {
    store: Arc<Store>,
    max_body: usize,
    counts: Arc<Counts>,
    tokens: Option<Arc<kiln_net::auth::Tokens>>,
    private: bool,
    /// By protocol index: writes need no token.
    anonymous: [bool; PROTOCOL_COUNT],
}

impl AppState {
    /// Whether a request with this `Authorization` value may read (or `write`); the error says
    /// what is missing or wrong.
    fn access(&self, header: Option<&str>, write: bool) -> Result<(), String> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        if !write && !self.private {
            return Ok(());
        }
        let what = if write { "writing" } else { "reading" };
        let Some(token) = header.and_then(kiln_net::auth::presented) else {
            return Err(format!(
                "{what} needs a client token (Authorization: Bearer TOKEN, or TOKEN as the \
                 password of the URL's user:password)"
            ));
        };
        match tokens.check(&token) {
            Some(_) => Ok(()),
            None => Err(
                "the token is not in kiln-cache's --tokens (revoked, or the wrong file?)".into(),
            ),
        }
    }
}

/// The protocols, as metric labels.
const PROTOCOLS: [&str; PROTOCOL_COUNT] =
    ["waf", "bazel_ac", "bazel_cas", "ccache", "kiln", "reapi"];
const PROTOCOL_COUNT: usize = 6;

/// What the server counts for `GET /metrics`, by protocol.
#[derive(Debug, Default)]
struct Counts {
    hits: [AtomicU64; PROTOCOL_COUNT],
    misses: [AtomicU64; PROTOCOL_COUNT],
    puts: [AtomicU64; PROTOCOL_COUNT],
    corrupt: AtomicU64,
    bytes_served: AtomicU64,
    bytes_stored: AtomicU64,
    evicted: AtomicU64,
}

impl Route {
    fn protocol(&self) -> usize {
        match self {
            Route::Waf(_) => 0,
            Route::BazelAc(_) => 1,
            Route::BazelCas(_) => 2,
            Route::Ccache(_) => 3,
            Route::Kiln(..) => 4,
        }
    }
}

impl Counts {
    /// Hits and misses over every protocol.
    fn lookups(&self) -> (u64, u64) {
        let sum =
            |a: &[AtomicU64; PROTOCOL_COUNT]| a.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        (sum(&self.hits), sum(&self.misses))
    }

    fn render(&self, store: &Store) -> String {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let by = |a: &[AtomicU64; PROTOCOL_COUNT]| -> Vec<(&str, u64)> {
            PROTOCOLS.iter().copied().zip(a.iter().map(load)).collect()
        };
        let (size, files) = store.usage();
        let mut e = Exposition::default();
        e.labelled_counter(
            "kiln_cache_hits_total",
            "Entries served, by protocol.",
            "protocol",
            &by(&self.hits),
        );
        e.labelled_counter(
            "kiln_cache_misses_total",
            "Lookups that found nothing, by protocol.",
            "protocol",
            &by(&self.misses),
        );
        e.labelled_counter(
            "kiln_cache_puts_total",
            "Entries stored, by protocol.",
            "protocol",
            &by(&self.puts),
        );
        e.counter(
            "kiln_cache_corrupt_total",
            "Damaged entries found on read and removed.",
            load(&self.corrupt),
        );
        e.counter(
            "kiln_cache_served_bytes_total",
            "Body bytes served.",
            load(&self.bytes_served),
        );
        e.counter(
            "kiln_cache_stored_bytes_total",
            "Body bytes stored.",
            load(&self.bytes_stored),
        );
        e.counter(
            "kiln_cache_evicted_total",
            "Entries evicted by the periodic trim.",
            load(&self.evicted),
        );
        e.gauge("kiln_cache_size_bytes", "Bytes in the store.", size);
        e.gauge("kiln_cache_entries", "Entries in the store.", files);
        e.finish()
    }
}

/// Serves until `shutdown` completes, then waits for the trim task and open requests.
pub async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Arc::new(Store::open(&config.dir, config.limits));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let counts = Arc::new(Counts::default());
    let trim = kiln_net::task::spawn(
        "trim",
        trim_loop(store.clone(), counts.clone(), config.trim_interval, stop_rx),
    );
    let state = AppState {
        store,
        max_body: config.max_body,
        counts,
        tokens: config.tokens,
        private: config.private,
        anonymous: std::array::from_fn(|i| {
            let name = PROTOCOLS[i].split('_').next().unwrap_or_default();
            i != 4 && i != reapi::PROTOCOL && config.anonymous.iter().any(|p| p == name)
        }),
    };
    let grpc = kiln_proto::v1::cache_server::CacheServer::new(grpc::CacheService(state.clone()))
        .max_decoding_message_size(config.max_body.saturating_add(4096))
        .max_encoding_message_size(config.max_body.saturating_add(4096));
    let max = config.max_body.saturating_add(4096);
    let api = reapi::Reapi::new(state.clone());
    use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
    // gRPC calls by their paths; everything else is one of the HTTP protocols.
    let app = tonic::service::Routes::new(grpc)
        .add_service(re::capabilities_server::CapabilitiesServer::new(
            api.clone(),
        ))
        .add_service(
            re::action_cache_server::ActionCacheServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            re::content_addressable_storage_server::ContentAddressableStorageServer::new(
                api.clone(),
            )
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            bazel_remote_apis::google::bytestream::byte_stream_server::ByteStreamServer::new(api)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .into_axum_router()
        .fallback_service(Router::new().fallback(handle).with_state(state));
    kiln_net::tls::serve_http(listener, config.listen, app, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await?;
    trim.await?;
    Ok(())
}

/// Trims the store to its limits every `every`, until told to stop.
async fn trim_loop(
    store: Arc<Store>,
    counts: Arc<Counts>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let store = store.clone();
                match tokio::task::spawn_blocking(move || store.cleanup()).await {
                    Ok(Ok(r)) if r.evicted > 0 => {
                        counts.evicted.fetch_add(r.evicted, Ordering::Relaxed);
                        tracing::info!(evicted = r.evicted, size = r.size, files = r.files, "trimmed");
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "trim failed"),
                    Err(e) => tracing::warn!(error = %e, "trim task failed"),
                }
            }
            _ = stop.changed() => return,
        }
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, msg.into()).into_response()
}

async fn handle(State(st): State<AppState>, req: Request) -> Response {
    let method = req.method().clone();
    if req.uri().path() == "/metrics" && method == Method::GET {
        let store = st.store.clone();
        let counts = st.counts.clone();
        return match tokio::task::spawn_blocking(move || counts.render(&store)).await {
            Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        };
    }
    let Some(route) = route(req.uri().path()) else {
        return text(
            StatusCode::NOT_FOUND,
            "kiln-cache: no such path (try /files/, /ac/, /cas/ or /ccache/)\n",
        );
    };
    let key = route.key();
    let protocol = route.protocol();
    let write = !matches!(method, Method::GET | Method::HEAD);
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let checked = if st.anonymous[protocol] {
        Ok(())
    } else {
        st.access(header, write)
    };
    if let Err(why) = checked {
        // Read a small upload before refusing it: an HTTP/2 client that is answered before it
        // finished sending sees a reset stream instead of the refusal. A large one is cut off.
        let _ = to_bytes(req.into_body(), 64 << 10).await;
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"kiln-cache\", Basic realm=\"kiln-cache\"",
            )
            .body(Body::from(format!("kiln-cache: {why}\n")))
            .unwrap_or_else(|_| StatusCode::UNAUTHORIZED.into_response());
    }
    match (&route, &method) {
        (_, &Method::GET) | (_, &Method::HEAD) => {
            get(&st, key, protocol, method == Method::HEAD).await
        }
        (Route::Waf(_), &Method::POST) => {
            let body = match waf_upload(req, &st).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            put(&st, key, protocol, body).await
        }
        (
            Route::BazelAc(_) | Route::BazelCas(_) | Route::Ccache(_) | Route::Kiln(..),
            &Method::PUT,
        ) => {
            let body = match to_bytes(req.into_body(), st.max_body).await {
                Ok(b) => b,
                Err(_) => return too_large(&st),
            };
            if let Route::BazelCas(hash) = &route {
                let actual = sha2::Sha256::digest(&body);
                let actual: String = actual.iter().map(|b| format!("{b:02x}")).collect();
                if &actual != hash {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("kiln-cache: the body's SHA-256 is {actual}, not {hash}\n"),
                    );
                }
            }
            put(&st, key, protocol, body).await
        }
        (Route::Ccache(_), &Method::DELETE) => {
            let store = st.store.clone();
            match tokio::task::spawn_blocking(move || store.remove(Kind::Blob, &key)).await {
                Ok(Ok(true)) => StatusCode::OK.into_response(),
                Ok(Ok(false)) => StatusCode::NOT_FOUND.into_response(),
                _ => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "kiln-cache: cannot remove the entry\n",
                ),
            }
        }
        _ => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("kiln-cache: {method} is not supported here\n"),
        ),
    }
}

fn too_large(st: &AppState) -> Response {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("kiln-cache: bodies are limited to {} bytes\n", st.max_body),
    )
}

/// The `file` field of waf's multipart upload.
async fn waf_upload(req: Request, st: &AppState) -> Result<Bytes, Response> {
    let bad = |m: String| text(StatusCode::BAD_REQUEST, format!("kiln-cache: {m}\n"));
    let mut form = Multipart::from_request(req, st)
        .await
        .map_err(|e| bad(format!("not a multipart upload: {e}")))?;
    loop {
        match form.next_field().await {
            Ok(Some(field)) if field.name() == Some("file") => {
                return field.bytes().await.map_err(|e| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        too_large(st)
                    } else {
                        bad(format!("cannot read the upload: {e}"))
                    }
                });
            }
            Ok(Some(_)) => continue,
            Ok(None) => return Err(bad("the upload has no field named \"file\"".into())),
            Err(e) => return Err(bad(format!("malformed multipart upload: {e}"))),
        }
    }
}

/// What a lookup found.
enum Got {
    Hit(Vec<u8>),
    Miss,
    Failed(String),
}

/// Looks `key` up, counting the hit or miss for `protocol` (and the bytes, unless `head`).
async fn fetch(st: &AppState, key: Digest, protocol: usize, head: bool) -> Got {
    let store = st.store.clone();
    let counts = &st.counts;
    match tokio::task::spawn_blocking(move || store.get(Kind::Blob, &key)).await {
        Ok(Ok(Lookup::Hit(bytes))) => {
            counts.hits[protocol].fetch_add(1, Ordering::Relaxed);
            if !head {
                counts
                    .bytes_served
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            Got::Hit(bytes)
        }
        Ok(Ok(found)) => {
            if matches!(found, Lookup::Corrupt(_)) {
                counts.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            counts.misses[protocol].fetch_add(1, Ordering::Relaxed);
            Got::Miss
        }
        Ok(Err(e)) => Got::Failed(e.to_string()),
        Err(e) => Got::Failed(e.to_string()),
    }
}

/// Stores `body` at `key`, atomically and checksummed; the error says why not (a full disk).
async fn store(st: &AppState, key: Digest, protocol: usize, body: Bytes) -> Result<(), String> {
    let store = st.store.clone();
    let len = body.len() as u64;
    match tokio::task::spawn_blocking(move || store.put(Kind::Blob, &key, &body)).await {
        Ok(Ok(())) => {
            st.counts.puts[protocol].fetch_add(1, Ordering::Relaxed);
            st.counts.bytes_stored.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn get(st: &AppState, key: Digest, protocol: usize, head: bool) -> Response {
    match fetch(st, key, protocol, head).await {
        Got::Hit(bytes) => {
            let len = bytes.len();
            let body = if head {
                Body::empty()
            } else {
                Body::from(bytes)
            };
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len)
                .body(body)
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Got::Miss => StatusCode::NOT_FOUND.into_response(),
        Got::Failed(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("kiln-cache: {e}\n"),
        ),
    }
}

async fn put(st: &AppState, key: Digest, protocol: usize, body: Bytes) -> Response {
    match store(st, key, protocol, body).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => text(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("kiln-cache: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let h = "a".repeat(64);
        let table: &[(&str, Option<Route>)] = &[
            ("/files/abc123/0", Some(Route::Waf("abc123/0".into()))),
            ("/files//abc123/0", Some(Route::Waf("abc123/0".into()))),
            ("/files/abc/0/extra", None),
            ("/files/../0", None),
            (&format!("/ac/{h}"), Some(Route::BazelAc(h.clone()))),
            (&format!("/cas/{h}"), Some(Route::BazelCas(h.clone()))),
            ("/cas/ABC", None),
            ("/ccache/ab/cdef01", Some(Route::Ccache("abcdef01".into()))),
            ("/ccache/abcdef01", Some(Route::Ccache("abcdef01".into()))),
            ("/ccache/", None),
            (
                &format!("/kiln/result/{h}"),
                Some(Route::Kiln("result", h.clone())),
            ),
            (&format!("/kiln/other/{h}"), None),
            ("/ccache/a b", None),
            ("/", None),
            ("/other/x", None),
        ];
        for (path, want) in table {
            assert_eq!(&route(path), want, "{path}");
        }
        assert_ne!(
            Route::Waf("k".into()).key(),
            Route::Ccache("k".into()).key()
        );
    }
}
