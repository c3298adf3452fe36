//! A slow link for benchmarks: relays TCP connections from `--listen` to `--target` with a
//! round-trip time and a rate cap each way (the harness's `link` relay; this kernel has no
//! netem), and keeps `--stats FILE` up to date with the connections and bytes it carried, as
//! one JSON object rewritten every 200 ms. `bench/dist.py --link` runs it between kiln and the
//! scheduler.
//!
//! ```text
//! slowlink --listen 127.0.0.1:7000 --target 127.0.0.1:7878 --rtt-ms 60 --mbit 50 --stats FILE
//! ```

use std::sync::Arc;
use std::time::Duration;

use kiln_tests::link::{relay, Counts, Shape};

fn main() {
    let mut listen = None;
    let mut target = None;
    let mut rtt_ms = 0u64;
    let mut mbit = 0f64;
    let mut stats = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--listen" => listen = Some(value()),
            "--target" => target = Some(value()),
            "--rtt-ms" => {
                rtt_ms = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--rtt-ms: a whole number"))
            }
            "--mbit" => {
                mbit = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--mbit: a number"))
            }
            "--stats" => stats = Some(std::path::PathBuf::from(value())),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let listen = listen.unwrap_or_else(|| usage("--listen is required"));
    let target: std::net::SocketAddr = target
        .unwrap_or_else(|| usage("--target is required"))
        .parse()
        .unwrap_or_else(|_| usage("--target: an IP address and port"));
    let shape = Shape {
        one_way: Duration::from_micros(rtt_ms * 500),
        rate: (mbit * 1e6 / 8.0) as u64,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .unwrap_or_else(|e| usage(&format!("listening on {listen}: {e}")));
        let counts = Arc::new(Counts::default());
        if let Some(path) = stats {
            let counts = counts.clone();
            tokio::spawn(async move {
                loop {
                    let text = format!(
                        "{{\"connections\": {}, \"bytes_up\": {}, \"bytes_down\": {}}}\n",
                        counts.connections(),
                        counts.up(),
                        counts.down()
                    );
                    let tmp = path.with_extension("tmp");
                    if std::fs::write(&tmp, text).is_ok() {
                        let _ = std::fs::rename(&tmp, &path);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        relay(listener, target, shape, counts).await;
    });
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "slowlink: {problem}\nusage: slowlink --listen ADDR --target ADDR [--rtt-ms N] [--mbit M] [--stats FILE]"
    );
    std::process::exit(2)
}
