//! The plumbing kiln's servers and clients share beside the wire itself: TLS listeners and
//! client endpoints (`tls`), tokens and their files (`auth`), Prometheus text (`metrics`), the
//! `KILN_LOG` filter (`logging`), the one door to spawning tasks (`task`), and the shutdown
//! signal. Kept apart from `kiln-proto` so a crate that only speaks the protocol, or only
//! unpacks archives, does not pull in a server stack.

pub mod auth;
pub mod logging;
pub mod metrics;
pub mod task;
pub mod tls;

/// For the servers: resolves on SIGINT or SIGTERM. The handlers are installed by the call,
/// not on the first poll, so a signal that arrives while a server starts is not lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail in a fresh runtime");
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .expect("installing a SIGINT handler cannot fail in a fresh runtime");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    }
}
