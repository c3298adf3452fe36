//! TLS for every kiln endpoint, with rustls: the server side (certificate, key, and optionally a
//! CA whose client certificates are accepted), an accept loop that handshakes each connection in
//! its own task, an HTTP server over it for axum routers, and the client side for tonic channels.
//!
//! Plain text is a choice the caller makes explicitly ([`Listen::Insecure`]); nothing here falls
//! back to it.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS file that cannot be used, naming the file and the flag or setting it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {}: no PEM {kind} in it", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the TLS settings are inconsistent: {0}")]
    Config(String),
}

/// The files a server's TLS is made of.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// A CA (PEM) whose client certificates are accepted. Presenting one stays optional: a peer
    /// without a certificate may still authenticate with a token.
    pub client_ca: Option<PathBuf>,
}

/// Reads a certificate chain, refusing a file with none.
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            what,
            path: path.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.into(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

fn read_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what,
            path: path.into(),
            kind: "private key",
        },
        e => TlsError::Invalid {
            what,
            path: path.into(),
            reason: e.to_string(),
        },
    })
}

fn roots(what: &'static str, path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in read_certs(what, path)? {
        store.add(cert).map_err(|e| TlsError::Invalid {
            what,
            path: path.into(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration from `files`, offering HTTP/2 (gRPC) and HTTP/1.1.
pub fn server_config(files: &ServerFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs("certificate", &files.cert)?;
    let key = read_key("private key", &files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("client CA", ca)?),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Invalid {
            what: "private key",
            path: files.key.clone(),
            reason: format!(
                "does not match the certificate {}: {e}",
                files.cert.display()
            ),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How a server listens: with TLS, or in plain text because its operator said `--insecure`.
#[derive(Clone)]
pub enum Listen {
    Tls(Arc<rustls::ServerConfig>),
    Insecure,
}

impl std::fmt::Debug for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Listen::Tls(_) => "Listen::Tls",
            Listen::Insecure => "Listen::Insecure",
        })
    }
}

impl Listen {
    /// TLS from `files` if given; plain text only when `insecure`; otherwise an error that says
    /// which flags the server needs (`cert_flag`, such as `--tls-cert`).
    pub fn choose(
        files: Option<ServerFiles>,
        insecure: bool,
        server: &str,
    ) -> Result<Listen, TlsError> {
        match (files, insecure) {
            (Some(files), _) => Ok(Listen::Tls(server_config(&files)?)),
            (None, true) => {
                tracing::warn!(
                    "{server} serves in plain text (--insecure): anyone on the network can read and change its traffic"
                );
                Ok(Listen::Insecure)
            }
            (None, false) => Err(TlsError::Config(format!(
                "{server} needs --tls-cert and --tls-key (kiln-scheduler init writes them), \
                 or --insecure to serve in plain text"
            ))),
        }
    }

    /// `https` or `http`, for the addresses a server prints.
    pub fn scheme(&self) -> &'static str {
        match self {
            Listen::Tls(_) => "https",
            Listen::Insecure => "http",
        }
    }
}

/// Who is on the other end of a connection, as handlers see it in a request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The client certificate chain, when the peer presented one that verified against the
    /// server's client CA.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A connection accepted by [`incoming`], handshaken if the listener has TLS.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn peer(&self) -> Peer {
        match self {
            Conn::Plain(s) => Peer {
                addr: s.peer_addr().ok(),
                certs: None,
            },
            Conn::Tls(s) => {
                let (tcp, session) = s.get_ref();
                Peer {
                    addr: tcp.peer_addr().ok(),
                    certs: session
                        .peer_certificates()
                        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())),
                }
            }
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The connections `listener` accepts, with TCP_NODELAY set (jobs are conversations of small
/// messages) and, under TLS, handshaken in a task of their own so that a slow or hostile peer
/// holds up nobody. A failed handshake (plain text sent to a TLS port, a certificate that does
/// not verify) is logged and the connection dropped; the stream never ends on its account.
pub fn incoming(
    listener: TcpListener,
    listen: Listen,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Ends when the stream it feeds is dropped.
    crate::task::detach("accept loop", async move {
        let acceptor = match &listen {
            Listen::Tls(config) => Some(tokio_rustls::TlsAcceptor::from(config.clone())),
            Listen::Insecure => None,
        };
        loop {
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: pause rather than spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            match &acceptor {
                None => {
                    if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    crate::task::detach("TLS handshake", async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(Conn::Tls(Box::new(tls)))).await;
                            }
                            Ok(Err(e)) => tracing::info!(%addr, "TLS handshake refused: {e}"),
                            Err(_) => tracing::info!(%addr, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `app` (HTTP/1.1 and HTTP/2, so gRPC routes too) on `listener` until `shutdown`
/// resolves, then lets open requests finish. Each request carries the connection's [`Peer`].
pub async fn serve_http(
    listener: TcpListener,
    listen: Listen,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> io::Result<()> {
    use tokio_stream::StreamExt;
    let mut conns = incoming(listener, listen);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let server = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            conn = conns.next() => match conn {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        let peer = conn.peer();
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(peer.clone());
                tower::ServiceExt::oneshot(app.clone(), request)
            },
        );
        let connection = server
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(conn), service)
            .into_owned();
        let watched = graceful.watch(connection);
        // The graceful shutdown below waits for it.
        crate::task::detach("HTTP connection", async move {
            if let Err(e) = watched.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(conns);
    // Requests in flight get a few seconds; a stuck client does not hold up the shutdown.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

/// What a client needs to reach a kiln endpoint over `https://`.
#[derive(Debug, Clone, Default)]
pub struct ClientFiles {
    /// The CA the server's certificate must chain to; without one, the system's roots.
    pub ca: Option<PathBuf>,
    /// A certificate and key to present (mutual TLS), such as a builder's.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A tonic endpoint for `url`: `https://` verifies the server against `files`, `http://` is
/// plain text and is only accepted when the caller allows it.
pub fn endpoint(url: &str, files: &ClientFiles) -> Result<tonic::transport::Endpoint, TlsError> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| TlsError::Config(format!("{url} is not a URL: {e}")))?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match &files.ca {
        Some(ca) => {
            // Parsed here first, so a bad file is named rather than failing every connection.
            read_certs("CA", ca)?;
            let pem = std::fs::read(ca).map_err(|source| TlsError::Read {
                what: "CA",
                path: ca.clone(),
                source,
            })?;
            tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    };
    if let Some((cert, key)) = &files.identity {
        read_certs("certificate", cert)?;
        read_key("private key", key)?;
        let read = |what, path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.clone(),
                source,
            })
        };
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read("certificate", cert)?,
            read("private key", key)?,
        ));
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// What to do about a failed handshake, given the error's text (tonic hands the client rustls's
/// verdict only as text): `None` when there is nothing to add.
pub fn handshake_hint(error: &str) -> Option<&'static str> {
    // rustls's words for a certificate whose extended key usage does not allow serving.
    if error.contains("extended key usage for server authentication")
        || error.contains("InvalidPurpose")
    {
        return Some(
            "the server presented a certificate that may not serve (no serverAuth usage), such \
             as a builder's: kiln refuses it, since a builder's key could otherwise pose as the \
             scheduler or the cache; start the server with the server.pem and server.key that \
             kiln-scheduler init wrote",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};

    /// A CA, and a certificate for 127.0.0.1 signed by it with `usages` only; both PEM files
    /// are written into `dir`, as `ca.pem`, `leaf.pem` and `leaf.key`.
    fn issue(dir: &Path, usages: Vec<ExtendedKeyUsagePurpose>) {
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        leaf.extended_key_usages = usages;
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("leaf.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("leaf.key"), key.serialize_pem()).unwrap();
    }

    /// Serves `dir/leaf.pem` and connects to it as kiln's clients do, trusting `dir/ca.pem`.
    async fn connect(dir: &Path) -> Result<(), String> {
        let listen = Listen::Tls(
            server_config(&ServerFiles {
                cert: dir.join("leaf.pem"),
                key: dir.join("leaf.key"),
                client_ca: None,
            })
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = crate::task::spawn(
            "test server",
            serve_http(listener, listen, axum::Router::new(), async {
                let _ = stopped.await;
            }),
        );
        let files = ClientFiles {
            ca: Some(dir.join("ca.pem")),
            identity: None,
        };
        let result = endpoint(&format!("https://{addr}"), &files)
            .unwrap()
            .connect()
            .await
            .map(drop)
            .map_err(|e| {
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text = format!("{text}: {c}");
                    cause = c.source();
                }
                text
            });
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        result
    }

    #[tokio::test]
    async fn clients_refuse_a_server_whose_certificate_may_not_serve() {
        // The same CA and names either way: only the extended key usage differs, so the
        // refusal can only come from the serverAuth check.
        let serving = tempfile::tempdir().unwrap();
        issue(serving.path(), vec![ExtendedKeyUsagePurpose::ServerAuth]);
        connect(serving.path()).await.unwrap();

        let client_only = tempfile::tempdir().unwrap();
        issue(
            client_only.path(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        let error = connect(client_only.path()).await.unwrap_err();
        assert!(
            error.contains("extended key usage for server authentication"),
            "{error}"
        );
        assert!(handshake_hint(&error).is_some(), "{error}");
    }
}
