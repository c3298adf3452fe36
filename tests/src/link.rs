//! A TCP relay standing for the network between a client and the farm: it counts the
//! connections made through it and the bytes each way, and can delay every byte by a fixed
//! one-way latency and cap each direction's rate, as a WAN link would (this kernel has no
//! netem). Tests use it to count connections; `bench/laptop.sh` runs it as a slow link through
//! the `slowlink` example.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the link is like.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// Added to every byte, each way: half the round trip.
    pub one_way: Duration,
    /// Bytes per second each way; 0 for no cap.
    pub rate: u64,
}

/// What went through the link so far.
#[derive(Debug, Default)]
pub struct Counts {
    pub connections: AtomicU64,
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
}

impl Counts {
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Acquire)
    }
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Acquire)
    }
}

/// Relays connections made to `listener` to `target`, shaped as `shape`, until the runtime
/// that runs it stops.
pub async fn relay(listener: TcpListener, target: SocketAddr, shape: Shape, counts: Arc<Counts>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        counts.connections.fetch_add(1, Ordering::AcqRel);
        let counts = counts.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = tokio::spawn(pipe(client_read, server_write, shape, counts.clone(), true));
            let down = pipe(server_read, client_write, shape, counts, false);
            down.await;
            up.abort();
        });
    }
}

/// One direction: bytes read are released to the writer `one_way` later, no faster than the
/// rate allows, in order.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Shape,
    counts: Arc<Counts>,
    upward: bool,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        // When the link is next free to start sending, at its rate.
        let mut free_at = Instant::now();
        while let Some((due, data)) = rx.recv().await {
            let start = due.max(free_at);
            if shape.rate > 0 {
                free_at = start + Duration::from_secs_f64(data.len() as f64 / shape.rate as f64);
            }
            // A byte arrives when the link has carried it: its delay, then its serialisation.
            tokio::time::sleep_until(free_at.max(due)).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let counter = if upward { &counts.up } else { &counts.down };
                counter.fetch_add(n as u64, Ordering::AcqRel);
                if tx
                    .send((Instant::now() + shape.one_way, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
