//! The cgroups of the Linux jail's containers (needs root and a memory or pids controller): a
//! builder that shuts down removes its own, and one that starts removes what a dead builder
//! left. A test binary of its own, so that no other test's containers share this process's id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_archive::{Manifest, Source};
use kiln_jails::inroot::Root;
use kiln_jails::linux::LinuxJail;
use kiln_jails::{Backend, Limits, Pool, RunSpec};

/// Where kiln makes cgroups on this machine: the v2 tree, or v1's memory and pids trees.
fn kiln_cgroup_parents() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        vec![root.join("kiln")]
    } else {
        ["memory", "pids"]
            .iter()
            .map(|c| root.join(c).join("kiln"))
            .filter(|d| d.parent().is_some_and(Path::is_dir))
            .collect()
    }
}

/// This process's containers' cgroups.
fn ours() -> Vec<PathBuf> {
    let prefix = format!("{}-", std::process::id());
    kiln_cgroup_parents()
        .iter()
        .filter_map(|p| std::fs::read_dir(p).ok())
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

#[tokio::test]
async fn cgroups_go_with_their_containers_and_a_dead_builders_are_cleaned_up() {
    if kiln_cgroup_parents().is_empty() || !nix::unistd::geteuid().is_root() {
        panic!("this test needs root and a cgroup memory or pids controller");
    }
    let dir = tempfile::tempdir().unwrap();
    let true_ = std::fs::canonicalize("/bin/true").unwrap();
    let mut m = Manifest::default();
    m.add(
        "usr/bin/true",
        Source::File {
            host: true_,
            executable: true,
        },
    );
    let archive = dir.path().join("t.tar.gz");
    m.pack(std::fs::File::create(&archive).unwrap()).unwrap();
    let work = dir.path().join("work");
    let helper = Path::new(env!("CARGO_BIN_EXE_kiln-jail"));
    let limits = Limits {
        disk: 16 << 20,
        ..Limits::default()
    };
    let pool = Pool::new(LinuxJail::new(&work, helper, limits).unwrap(), 2, 2);
    pool.prepare("t", archive.clone()).await.unwrap();
    let lease = pool.checkout("t").await.unwrap();
    let root = Root::open(lease.root()).unwrap();
    let (uid, gid) = pool.backend().owner(64_200);
    root.chown_dir(Path::new("/w"), uid, gid).unwrap();
    let spec = RunSpec {
        argv: vec!["/usr/bin/true".into()],
        env: vec![],
        cwd: "/w".into(),
        uid: 64_200,
        gid: 64_200,
        limits: Limits {
            timeout: Duration::from_secs(20),
            ..limits
        },
    };
    // How the command ends does not matter here (the image has no C library): its cgroups do.
    let _ = pool.run(&lease, spec).await;
    pool.checkin(lease);
    assert!(!ours().is_empty(), "no cgroup was made: nothing to test");
    pool.shutdown().await;
    assert_eq!(
        ours(),
        Vec::<PathBuf>::new(),
        "a shut-down pool left cgroups"
    );

    // A builder that died leaves an empty cgroup; the next one removes it.
    let stale = kiln_cgroup_parents()[0].join(format!("{}-999999", std::process::id()));
    std::fs::create_dir_all(&stale).unwrap();
    let jail = LinuxJail::new(&work, helper, limits).unwrap();
    assert!(jail.cleanup_leftovers().unwrap() >= 1);
    assert!(!stale.exists(), "{} was left", stale.display());
}
