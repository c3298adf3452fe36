//! Measures what a jail costs a job, apart from the compiler: taking a pooled container, placing
//! input files, entering the jail and leaving it (with a program that does nothing), reading an
//! output. Run by `bench/jail-overhead.sh`; needs root and gcc (for a static no-op program).
//!
//!     cargo run --release -p kiln-jails --example overhead -- [JOBS] [FILES]

// A test drives the outside world directly: programs, the environment, tasks.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_archive::{Manifest, Source};
use kiln_jails::inroot::{Placer, Root};
use kiln_jails::linux::LinuxJail;
use kiln_jails::{Backend, Limits, Pool, RunSpec};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let jobs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let files: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let dir = match std::env::var_os("OVERHEAD_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let src = dir.path().join("noop.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let noop = dir.path().join("noop");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&noop)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(built.success());
    let mut m = Manifest::default();
    m.add(
        "usr/bin/noop",
        Source::File {
            host: noop,
            executable: true,
        },
    );
    let archive = dir.path().join("tc.tar.gz");
    m.pack(std::fs::File::create(&archive).unwrap()).unwrap();
    let helper = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("kiln-jail");
    let jail = LinuxJail::new(&dir.path().join("work"), &helper, Limits::default()).unwrap();
    let pool = Pool::new(jail, 2, 2);
    let t = Instant::now();
    pool.prepare("noop", archive).await.unwrap();
    println!("image made in {}", ms(t.elapsed()));
    // The builder keeps inputs as plain files by digest and links them into the job's layer.
    let store = dir.path().join("work/store");
    std::fs::create_dir_all(&store).unwrap();
    for f in 0..files {
        std::fs::write(store.join(format!("h{f}")), vec![b'x'; 8 << 10]).unwrap();
    }
    let (mut checkout, mut place, mut run, mut read, mut total) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..jobs {
        // Let the background reset finish, as it does between a builder's jobs.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        let lease = pool.checkout("noop").await.unwrap();
        let t1 = Instant::now();
        let root = Root::open(lease.root()).unwrap();
        let mut placer = Placer::new(&root, pool.backend().links_inputs());
        for f in 0..files {
            placer
                .link_or_copy(
                    Path::new(&format!("/src/inc/h{f}.h")),
                    &store.join(format!("h{f}")),
                    false,
                )
                .unwrap();
        }
        root.chown_dir(Path::new("/src"), 60_999, 60_999).unwrap();
        let t2 = Instant::now();
        let spec = RunSpec {
            argv: vec!["/usr/bin/noop".into()],
            env: vec![],
            cwd: "/src".into(),
            uid: 60_999,
            gid: 60_999,
            limits: Limits::default(),
        };
        let out = pool.run(&lease, spec).await.unwrap();
        assert_eq!(out.exit_code, Some(0), "{out:?}");
        let t3 = Instant::now();
        let _ = Root::open(lease.outputs())
            .unwrap()
            .read_file(Path::new("/src/out.o"), 1 << 20)
            .unwrap();
        let t4 = Instant::now();
        pool.checkin(lease);
        if i > 0 {
            checkout.push(t1 - t0);
            place.push(t2 - t1);
            run.push(t3 - t2);
            read.push(t4 - t3);
            total.push(t4 - t0);
        }
    }
    println!("{jobs} jobs, {files} input files of 8 KiB each; medians:");
    println!("  pooled container ready   {}", ms(median(checkout)));
    println!("  inputs placed            {}", ms(median(place)));
    println!("  jail entered and left    {}", ms(median(run)));
    println!("  output read              {}", ms(median(read)));
    println!("  total per job            {}", ms(median(total)));
    pool.shutdown().await;
}
