//! The local cache with real gcc and clang: byte-identical results, hits, misses for the
//! right reasons, and robustness under parallel builds, damage and kills.

use std::process::Output;

use kiln_tests::{ok, require, settle, Project};

const MAIN_C: &str = r#"#include <stdio.h>
#include "util.h"
int helper(void) { int unused; return 0; }
int main(void) { printf("%s %d\n", GREETING, twice(21)); return helper(); }
"#;

fn sample(p: &Project, ext: &str) -> String {
    p.write("inc1/config.h", "#define GREETING \"hello\"\n");
    p.write(
        "inc2/util.h",
        "#include \"config.h\"\nstatic inline int twice(int x) { return 2 * x; }\n",
    );
    let src = format!("src/main.{ext}");
    p.write(&src, MAIN_C);
    std::fs::create_dir_all(p.path("obj")).unwrap();
    settle();
    src
}

fn remove_outputs(p: &Project) {
    for f in ["obj/main.o", "obj/main.d", "obj/main.dwo"] {
        let _ = std::fs::remove_file(p.path(f));
    }
}

/// The outputs of one compile: object, dependency file, split DWARF, stderr, exit status.
type Outputs = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>, Option<i32>);

fn outputs(p: &Project, out: &Output) -> Outputs {
    let opt = |f: &str| std::fs::read(p.path(f)).unwrap_or_default();
    (
        p.read("obj/main.o"),
        opt("obj/main.d"),
        opt("obj/main.dwo"),
        out.stderr.clone(),
        out.status.code(),
    )
}

#[test]
fn results_are_byte_identical_to_the_bare_compiler() {
    for (cc, ext) in [
        ("gcc", "c"),
        ("g++", "cpp"),
        ("clang", "c"),
        ("clang++", "cpp"),
    ] {
        require(cc);
        let p = Project::new();
        let src = sample(&p, ext);
        let args = [
            cc,
            "-c",
            &src,
            "-o",
            "obj/main.o",
            "-Iinc1",
            "-I",
            "inc2",
            "-MD",
            "-g",
            "-gsplit-dwarf",
            "-Wall",
            "-O1",
        ];
        let bare = ok(&p.bare(&args)).clone();
        let expected = outputs(&p, &bare);
        assert!(
            !expected.1.is_empty() && !expected.2.is_empty(),
            "{cc}: no .d or .dwo from the bare compile"
        );
        assert!(
            String::from_utf8_lossy(&expected.3).contains("unused"),
            "{cc}: expected a warning"
        );

        remove_outputs(&p);
        let miss = ok(&p.kiln(&args)).clone();
        assert_eq!(
            outputs(&p, &miss),
            expected,
            "{cc}: miss differs from the bare compiler"
        );

        remove_outputs(&p);
        let hit = ok(&p.kiln(&args)).clone();
        assert_eq!(
            outputs(&p, &hit),
            expected,
            "{cc}: hit differs from the bare compiler"
        );
        assert_eq!((p.stat("hits"), p.stat("misses")), (1, 1), "{cc}");
    }
}

#[test]
fn editing_a_header_is_a_miss() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    let args = ["gcc", "-c", &src, "-o", "obj/main.o", "-Iinc1", "-Iinc2"];
    ok(&p.kiln(&args));
    ok(&p.kiln(&args));
    assert_eq!((p.stat("hits"), p.stat("misses")), (1, 1));

    p.write("inc1/config.h", "#define GREETING \"changed\"\n");
    settle();
    ok(&p.kiln(&args));
    let cached = p.read("obj/main.o");
    assert_eq!((p.stat("hits"), p.stat("misses")), (1, 2));
    ok(&p.bare(&args));
    assert_eq!(cached, p.read("obj/main.o"));
    ok(&p.kiln(&args));
    assert_eq!(p.stat("hits"), 2);
}

#[test]
fn a_shadowing_header_earlier_on_the_include_path_is_a_miss() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    let args = ["gcc", "-c", &src, "-o", "obj/main.o", "-Iinc1", "-Iinc2"];
    ok(&p.kiln(&args));
    // inc1 comes before inc2: a util.h there now wins.
    p.write(
        "inc1/util.h",
        "#include \"config.h\"\nstatic inline int twice(int x) { return 3 * x; }\n",
    );
    settle();
    p.kiln_matches_bare(&args, "obj/main.o");
    assert_eq!((p.stat("hits"), p.stat("misses")), (0, 2));
    // And the source directory comes first of all for quoted includes.
    p.write("src/config.h", "#define GREETING \"nearest\"\n");
    settle();
    ok(&p.kiln(&args));
    assert_eq!(p.stat("misses"), 3);
}

#[test]
fn two_parallel_batches_of_fifty() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    for i in 0..50 {
        p.write(
            &format!("many/f{i}.c"),
            &format!("#include \"util.h\"\nint f{i}(int x) {{ return twice(x) + {i}; }}\n"),
        );
    }
    settle();
    ok(&p.bare(&["gcc", "-c", &src, "-o", "obj/bare.o", "-Iinc1", "-Iinc2"]));
    let bare = p.read("obj/bare.o");

    // The same file fifty times at once, each to its own output.
    std::thread::scope(|s| {
        for i in 0..50 {
            let (p, src) = (&p, &src);
            s.spawn(move || {
                let out = format!("obj/same{i}.o");
                ok(&p.kiln(&["gcc", "-c", src, "-o", &out, "-Iinc1", "-Iinc2"]));
            });
        }
    });
    for i in 0..50 {
        assert_eq!(
            p.read(&format!("obj/same{i}.o")),
            bare,
            "same{i}.o is wrong"
        );
    }
    // Fifty different files at once.
    std::thread::scope(|s| {
        for i in 0..50 {
            let p = &p;
            s.spawn(move || {
                ok(&p.kiln(&[
                    "gcc",
                    "-c",
                    &format!("many/f{i}.c"),
                    "-o",
                    &format!("obj/f{i}.o"),
                    "-Iinc1",
                    "-Iinc2",
                ]));
            });
        }
    });
    let s = p.stats();
    assert_eq!(s["requests"], 100, "{s}");
    assert_eq!(
        s["hits"].as_i64().unwrap() + s["misses"].as_i64().unwrap(),
        100,
        "{s}"
    );
    assert_eq!(
        (s["errors"].as_i64(), s["uncacheable"].as_i64()),
        (Some(0), Some(0)),
        "{s}"
    );
    // Everything is now served from the cache, byte for byte.
    for i in 0..50 {
        let out = format!("obj/f{i}.o");
        let fresh = p.read(&out);
        ok(&p.kiln(&[
            "gcc",
            "-c",
            &format!("many/f{i}.c"),
            "-o",
            &out,
            "-Iinc1",
            "-Iinc2",
        ]));
        assert_eq!(p.read(&out), fresh);
    }
    assert_eq!(p.stat("hits") - s["hits"].as_i64().unwrap(), 50);
}

#[test]
fn a_corrupt_entry_is_detected_and_replaced() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    let args = ["gcc", "-c", &src, "-o", "obj/main.o", "-Iinc1", "-Iinc2"];
    ok(&p.kiln(&args));
    let good = p.read("obj/main.o");
    let results = p.entries('R');
    assert_eq!(results.len(), 1);
    let mut bytes = std::fs::read(&results[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&results[0], bytes).unwrap();

    ok(&p.kiln(&args));
    assert_eq!(p.read("obj/main.o"), good);
    assert_eq!(
        (p.stat("hits"), p.stat("misses"), p.stat("corrupt_entries")),
        (0, 2, 1)
    );
    ok(&p.kiln(&args));
    assert_eq!(p.stat("hits"), 1);
    assert_eq!(p.read("obj/main.o"), good);
}

#[test]
fn eviction_keeps_the_cache_under_a_small_cap() {
    require("gcc");
    let mut p = Project::new();
    p.env.push(("KILN_CACHE_SIZE".into(), "48K".into()));
    for i in 0..60 {
        p.write(
            &format!("e/f{i}.c"),
            &format!("int f{i}(int x) {{ return x * {i}; }}\nint g{i}(void) {{ return {i}; }}\n"),
        );
    }
    settle();
    for i in 0..60 {
        ok(&p.kiln(&[
            "gcc",
            "-c",
            &format!("e/f{i}.c"),
            "-o",
            &format!("e/f{i}.o"),
        ]));
    }
    let s = p.stats();
    assert!(s["cache_size_bytes"].as_i64().unwrap() <= 48 * 1024, "{s}");
    let on_disk: u64 = p
        .entries('R')
        .iter()
        .chain(&p.entries('M'))
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 48 * 1024, "{on_disk} bytes on disk");
    assert!(!p.entries('R').is_empty());
    // The most recent compile is still a hit.
    ok(&p.kiln(&["gcc", "-c", "e/f59.c", "-o", "e/f59.o"]));
    assert_eq!(p.stat("hits"), 1);
}

#[test]
fn uncacheable_commands_and_failures_pass_through() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    // Linking runs the compiler unchanged.
    ok(&p.kiln(&["gcc", &src, "-Iinc1", "-Iinc2", "-o", "app"]));
    let run = p.command(p.path("app")).output().unwrap();
    assert_eq!(run.stdout, b"hello 42\n");
    assert_eq!(p.reason("link"), 1);

    // A failing compile: same status and diagnostics as the compiler, never cached.
    p.write("bad.c", "int main(void) { return missing; }\n");
    let bare = p.bare(&["gcc", "-c", "bad.c", "-o", "bad.o"]);
    for n in 1..=2 {
        let out = p.kiln(&["gcc", "-c", "bad.c", "-o", "bad.o"]);
        assert_eq!(out.status.code(), bare.status.code());
        assert_eq!(out.stderr, bare.stderr);
        assert_eq!(p.stat("compile_failed"), n);
    }
    assert!(p.entries('R').is_empty());

    ok(&p.kiln(&["gcc", "-E", &src, "-Iinc1", "-Iinc2", "-o", "pre.i"]));
    assert!(p.path("pre.i").exists());
    assert_eq!(p.reason("preprocess"), 1);
    assert_eq!(p.stat("requests"), 4);
}

#[test]
fn masquerade_link_and_launcher_forms() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    let bin = p.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(kiln_tests::kiln_bin(), bin.join("gcc")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    for _ in 0..2 {
        let out = p
            .command("gcc")
            .env("PATH", &path)
            .args(["-c", &src, "-o", "obj/main.o", "-Iinc1", "-Iinc2"])
            .output()
            .unwrap();
        ok(&out);
    }
    assert_eq!((p.stat("hits"), p.stat("misses")), (1, 1));
    // A directory linking gcc but not cc: `make` would bypass kiln, and kiln stats says so.
    let text = String::from_utf8_lossy(&ok(&p.kiln(&["stats"])).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "the masquerade directory {} has no cc or c++ link",
            bin.display()
        )) && text.contains("kiln masquerade"),
        "{text}"
    );
    // The launcher form, with the compiler by absolute path (CMAKE_C_COMPILER_LAUNCHER=kiln).
    let gcc = String::from_utf8(p.bare(&["which", "gcc"]).stdout).unwrap();
    ok(&p.kiln(&[
        gcc.trim(),
        "-c",
        &src,
        "-o",
        "obj/main.o",
        "-Iinc1",
        "-Iinc2",
    ]));
    assert_eq!(p.stat("hits"), 2);
    // A compiler that does not exist is a clear error.
    let out = p.kiln(&["no-such-cc", "-c", &src]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot find the compiler"));
}

#[test]
fn time_macros() {
    require("gcc");
    let p = Project::new();
    p.write("t.c", "const char *t = __TIME__;\n");
    p.write("d.c", "const char *d = __DATE__;\n");
    p.write("h.h", "#define STAMP __TIMESTAMP__\n");
    p.write("th.c", "#include \"h.h\"\nconst char *s = STAMP;\n");
    settle();
    for _ in 0..2 {
        ok(&p.kiln(&["gcc", "-c", "t.c"]));
        ok(&p.kiln(&["gcc", "-c", "th.c"]));
        ok(&p.kiln(&["gcc", "-c", "d.c"]));
    }
    assert_eq!(p.reason("time_macros"), 4);
    assert_eq!(
        (p.stat("hits"), p.stat("misses")),
        (1, 1),
        "__DATE__ is cached for the day"
    );
    // With SOURCE_DATE_EPOCH the expansion is fixed, so __TIME__ is cacheable.
    let mut p2 = Project::new();
    p2.env
        .push(("SOURCE_DATE_EPOCH".into(), "1700000000".into()));
    p2.write("t.c", "const char *t = __TIME__;\n");
    settle();
    ok(&p2.kiln(&["gcc", "-c", "t.c"]));
    ok(&p2.kiln(&["gcc", "-c", "t.c"]));
    assert_eq!(p2.stat("hits"), 1);
}

#[test]
fn dependency_file_forms() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    let forms: [&[&str]; 4] = [
        &["-MMD"],
        &["-MD", "-MT", "custom-target", "-MP"],
        &["-Wp,-MD,obj/main.d"],
        &["-MD", "-MF", "obj/main.d", "-MQ", "$(OBJ)"],
    ];
    for (n, extra) in forms.iter().enumerate() {
        let mut args = vec!["gcc", "-c", &src, "-o", "obj/main.o", "-Iinc1", "-Iinc2"];
        args.extend_from_slice(extra);
        remove_outputs(&p);
        let bare = ok(&p.bare(&args)).clone();
        let expected = outputs(&p, &bare);
        assert!(!expected.1.is_empty(), "{extra:?}: no dependency file");
        for _ in 0..2 {
            remove_outputs(&p);
            let out = ok(&p.kiln(&args)).clone();
            assert_eq!(outputs(&p, &out), expected, "{extra:?}");
        }
        assert_eq!(p.stat("hits"), n as i64 + 1, "{extra:?}");
    }
    // -MMD leaves system headers out of the user's file, but kiln still tracks them: the
    // manifest knows stdio.h.
    assert!(!String::from_utf8_lossy(&{
        remove_outputs(&p);
        ok(&p.kiln(&[
            "gcc",
            "-c",
            &src,
            "-o",
            "obj/main.o",
            "-Iinc1",
            "-Iinc2",
            "-MMD",
        ]));
        p.read("obj/main.d")
    })
    .contains("stdio.h"));
    let manifests: Vec<u8> = p
        .entries('M')
        .iter()
        .flat_map(|m| std::fs::read(m).unwrap())
        .collect();
    assert!(String::from_utf8_lossy(&manifests).contains("stdio.h"));
}

#[test]
fn response_files_are_expanded() {
    require("clang");
    let p = Project::new();
    let src = sample(&p, "c");
    p.write(
        "args.rsp",
        &format!("-c {src} -o obj/main.o -Iinc1\n-Iinc2 -O2\n"),
    );
    ok(&p.kiln(&["clang", "@args.rsp"]));
    let first = p.read("obj/main.o");
    ok(&p.kiln(&["clang", "@args.rsp"]));
    assert_eq!(p.stat("hits"), 1);
    ok(&p.bare(&["clang", "@args.rsp"]));
    assert_eq!(p.read("obj/main.o"), first);
}

#[test]
fn debug_info_records_the_directory_unless_mapped() {
    require("gcc");
    // Two checkouts of the same tree.
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let mk = |name: &str| {
        let mut p = Project::new();
        p.cache = cache.clone();
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        p.dir = tempfile::TempDir::new_in(&dir).unwrap();
        sample(&p, "c");
        p
    };
    let (a, b) = (mk("a"), mk("b"));
    let plain = [
        "gcc",
        "-c",
        "src/main.c",
        "-o",
        "obj/main.o",
        "-Iinc1",
        "-Iinc2",
        "-g",
    ];
    ok(&a.kiln(&plain));
    ok(&b.kiln(&plain));
    assert_eq!(
        b.stat("hits"),
        0,
        "-g records the directory: another checkout must miss"
    );
    let in_b = b.read("obj/main.o");
    ok(&b.bare(&plain));
    assert_eq!(in_b, b.read("obj/main.o"));

    // With the directory mapped away and a base directory, the checkouts share results.
    let run = |p: &Project| {
        let map = format!("-ffile-prefix-map={}=.", p.dir.path().display());
        let mut cmd = p.command(kiln_tests::kiln_bin());
        cmd.env("KILN_BASE_DIR", root.path()).args([
            "gcc",
            "-c",
            "src/main.c",
            "-o",
            "obj/main.o",
            "-Iinc1",
            "-Iinc2",
            "-g",
            &map,
        ]);
        ok(&cmd.output().unwrap());
        let cached = p.read("obj/main.o");
        ok(&p.bare(&[
            "gcc",
            "-c",
            "src/main.c",
            "-o",
            "obj/main.o",
            "-Iinc1",
            "-Iinc2",
            "-g",
            &map,
        ]));
        assert_eq!(
            cached,
            p.read("obj/main.o"),
            "mapped object differs from the compiler's"
        );
    };
    run(&a);
    run(&b);
    assert_eq!(b.stat("hits"), 1);
}

#[test]
fn killed_compiles_never_leave_an_entry_that_serves_wrong_bytes() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    let args = [
        "gcc",
        "-c",
        &src,
        "-o",
        "obj/main.o",
        "-Iinc1",
        "-Iinc2",
        "-O2",
        "-g",
    ];
    for i in 0..12u64 {
        let mut child = p
            .command(kiln_tests::kiln_bin())
            .args(args)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis((i * 13) % 70));
        let _ = child.kill();
        let _ = child.wait();
        if i % 4 == 3 {
            let _ = std::fs::remove_dir_all(&p.cache);
        }
    }
    ok(&p.bare(&args));
    let expected = p.read("obj/main.o");
    for _ in 0..2 {
        let _ = std::fs::remove_file(p.path("obj/main.o"));
        ok(&p.kiln(&args));
        assert_eq!(p.read("obj/main.o"), expected);
    }
}

#[test]
fn has_include_in_a_project_header_is_followed() {
    require("gcc");
    let p = Project::new();
    p.write(
        "inc/cfg.h",
        "#if __has_include(\"local.h\")\n#include \"local.h\"\n#else\n#define LOCAL 0\n#endif\n",
    );
    p.write(
        "src/x.c",
        "#include \"cfg.h\"\nint local(void) { return LOCAL; }\n",
    );
    settle();
    let args = ["gcc", "-c", "src/x.c", "-o", "x.o", "-Iinc"];
    ok(&p.kiln(&args));
    ok(&p.kiln(&args));
    assert_eq!((p.stat("hits"), p.stat("misses")), (1, 1));
    // local.h appears where __has_include looks: no dependency list ever named it.
    p.write("inc/local.h", "#define LOCAL 7\n");
    settle();
    p.kiln_matches_bare(&args, "x.o");
    assert_eq!(
        p.stat("misses"),
        2,
        "a file __has_include now finds must be a miss"
    );
    ok(&p.kiln(&args));
    assert_eq!(p.stat("hits"), 2);
    // When the file goes away again, the first result (made without it) is right again.
    std::fs::remove_file(p.path("inc/local.h")).unwrap();
    settle();
    p.kiln_matches_bare(&args, "x.o");
    assert_eq!((p.stat("hits"), p.stat("misses")), (3, 2));

    // A probe kiln cannot read literally falls back to the preprocessor's output: still right.
    p.write(
        "inc/m.h",
        "#define PROBE \"opt.h\"\n#if __has_include(PROBE)\n#include PROBE\n#else\n#define OPT 0\n#endif\n",
    );
    p.write(
        "src/y.c",
        "#include \"m.h\"\nint opt(void) { return OPT; }\n",
    );
    settle();
    let args = ["gcc", "-c", "src/y.c", "-o", "y.o", "-Iinc"];
    ok(&p.kiln(&args));
    ok(&p.kiln(&args));
    assert_eq!((p.stat("hits"), p.stat("misses")), (4, 3));
    p.write("inc/opt.h", "#define OPT 5\n");
    settle();
    p.kiln_matches_bare(&args, "y.o");
    assert_eq!(p.stat("misses"), 4);
}

#[test]
fn profile_data_is_part_of_the_key() {
    require("gcc");
    let p = Project::new();
    p.write(
        "src/pgo.c",
        "#include <stdio.h>\nint main(int argc, char **argv) {\n  long s = 0;\n  for (int i = 0; i < argc * 100000; i++) s += i % 7 ? i : -i;\n  printf(\"%ld\\n\", s);\n  return 0;\n}\n",
    );
    std::fs::create_dir_all(p.path("obj")).unwrap();
    ok(&p.bare(&[
        "gcc",
        "-O2",
        "-fprofile-generate",
        "-c",
        "src/pgo.c",
        "-o",
        "obj/pgo.o",
    ]));
    ok(&p.bare(&["gcc", "-fprofile-generate", "obj/pgo.o", "-o", "pgo"]));
    ok(&p.command(p.path("pgo")).output().unwrap());
    assert!(p.path("obj/pgo.gcda").exists(), "no profile written");
    settle();
    let args = [
        "gcc",
        "-O2",
        "-fprofile-use",
        "-c",
        "src/pgo.c",
        "-o",
        "obj/pgo.o",
    ];
    ok(&p.kiln(&args));
    ok(&p.kiln(&args));
    assert_eq!((p.stat("hits"), p.stat("misses")), (1, 1));
    // New profile data: the object may change, so this must be a miss.
    ok(&p
        .command(p.path("pgo"))
        .args(["more", "arguments", "here"])
        .output()
        .unwrap());
    settle();
    p.kiln_matches_bare(&args, "obj/pgo.o");
    assert_eq!(p.stat("misses"), 2);
}

#[test]
fn a_full_cache_disk_never_fails_the_build() {
    require("gcc");
    let mut p = Project::new();
    let disk = kiln_tests::TinyDisk::mount(p.path("tiny"), "96k");
    p.cache = disk.path.clone();
    // Big enough objects that the disk fills after a few.
    for i in 0..12 {
        let body: String = (0..300)
            .map(|j| format!("int f{i}_{j}(int x) {{ return x * {j} + {i}; }}\n"))
            .collect();
        p.write(&format!("big/f{i}.c"), &body);
    }
    std::fs::create_dir_all(p.path("obj")).unwrap();
    settle();
    for round in 0..2 {
        for i in 0..12 {
            let (src, out) = (format!("big/f{i}.c"), format!("obj/f{i}.o"));
            let _ = std::fs::remove_file(p.path(&out));
            let kiln = ok(&p.kiln(&["gcc", "-c", &src, "-o", &out])).clone();
            assert!(
                kiln.stderr.is_empty(),
                "round {round}: kiln wrote to stderr: {}",
                String::from_utf8_lossy(&kiln.stderr)
            );
            let cached = p.read(&out);
            ok(&p.bare(&["gcc", "-c", &src, "-o", &out]));
            assert_eq!(cached, p.read(&out), "round {round}: f{i}.o differs");
        }
    }
    // Some results did fit and were served; the ones that did not were counted as errors.
    let s = p.stats();
    assert!(s["hits"].as_i64().unwrap() > 0, "{s}");
    assert!(
        s["errors"].as_i64().unwrap() > 0,
        "the disk never filled: {s}"
    );
}

#[test]
fn device_and_link_outputs_are_left_to_the_compiler() {
    require("gcc");
    let p = Project::new();
    let src = sample(&p, "c");
    for _ in 0..2 {
        ok(&p.kiln(&["gcc", "-c", &src, "-Iinc1", "-Iinc2", "-o", "/dev/null"]));
        ok(&p.kiln(&[
            "gcc",
            "-c",
            &src,
            "-Iinc1",
            "-Iinc2",
            "-o",
            "obj/m.o",
            "-MD",
            "-MF",
            "/dev/null",
        ]));
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device(),
        "/dev/null was replaced"
    );
    assert_eq!(p.reason("special_output"), 4);

    // An output that is a symbolic link is left to the compiler: whatever it does with the link
    // (GNU as replaces it) happens exactly as without kiln.
    std::fs::write(p.path("real.o"), b"old").unwrap();
    std::os::unix::fs::symlink(p.path("real.o"), p.path("obj/link.o")).unwrap();
    ok(&p.kiln(&["gcc", "-c", &src, "-Iinc1", "-Iinc2", "-o", "obj/link.o"]));
    assert_eq!(p.reason("special_output"), 5);
    let (through_kiln, real) = (p.read("obj/link.o"), p.read("real.o"));
    std::fs::remove_file(p.path("obj/link.o")).unwrap();
    std::fs::write(p.path("real.o"), b"old").unwrap();
    std::os::unix::fs::symlink(p.path("real.o"), p.path("obj/link.o")).unwrap();
    ok(&p.bare(&["gcc", "-c", &src, "-Iinc1", "-Iinc2", "-o", "obj/link.o"]));
    assert_eq!(
        (through_kiln, real),
        (p.read("obj/link.o"), p.read("real.o"))
    );

    // A missing source is the compiler's error to report, in its own words.
    let bare = p.bare(&["gcc", "-c", "nope.c"]);
    let out = p.kiln(&["gcc", "-c", "nope.c"]);
    assert_eq!(
        (out.status.code(), &out.stderr),
        (bare.status.code(), &bare.stderr)
    );
    assert_eq!(p.reason("no_source"), 1);
    assert_eq!(p.stat("errors"), 0);
}

#[test]
fn cmake_launcher_rebuild_is_served_from_the_cache() {
    require("cmake");
    require("gcc");
    let p = Project::new();
    p.write(
        "CMakeLists.txt",
        "cmake_minimum_required(VERSION 3.16)\nproject(demo C CXX)\nadd_library(demo STATIC a.c b.c c.cpp)\ntarget_include_directories(demo PRIVATE include)\n",
    );
    p.write("include/d.h", "#define D 3\n");
    p.write("a.c", "#include \"d.h\"\nint a(void) { return D; }\n");
    p.write(
        "b.c",
        "#include <string.h>\nint b(const char *s) { return (int)strlen(s); }\n",
    );
    p.write(
        "c.cpp",
        "#include <vector>\nint c() { return (int)std::vector<int>(3).size(); }\n",
    );
    settle();
    let launcher = format!(
        "-DCMAKE_C_COMPILER_LAUNCHER={}",
        kiln_tests::kiln_bin().display()
    );
    let cxx_launcher = format!(
        "-DCMAKE_CXX_COMPILER_LAUNCHER={}",
        kiln_tests::kiln_bin().display()
    );
    ok(&p
        .command("cmake")
        .args([
            "-S",
            ".",
            "-B",
            "build",
            "-G",
            "Ninja",
            &launcher,
            &cxx_launcher,
        ])
        .output()
        .unwrap());
    ok(&p
        .command("cmake")
        .args(["--build", "build"])
        .output()
        .unwrap());
    assert_eq!((p.stat("hits"), p.stat("misses")), (0, 3));
    ok(&p
        .command("cmake")
        .args(["--build", "build", "--target", "clean"])
        .output()
        .unwrap());
    ok(&p
        .command("cmake")
        .args(["--build", "build"])
        .output()
        .unwrap());
    assert_eq!((p.stat("hits"), p.stat("misses")), (3, 3));
    assert!(p.path("build/libdemo.a").exists());
}

/// A CMake project whose header and source are written by `add_custom_command` right before
/// the compiles that read them, as protobuf, bison or moc outputs are (issue 15): they are
/// complete before each compile starts, so a second build from a clean build directory is
/// served from the cache. Both builds regenerate them, so compiles start within milliseconds
/// of the writes.
#[test]
fn a_header_generated_just_before_its_compiles_is_cached() {
    require("cmake");
    require("ninja");
    require("gcc");
    let p = Project::new();
    p.write(
        "CMakeLists.txt",
        r##"cmake_minimum_required(VERSION 3.16)
project(gen C)
add_custom_command(
  OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/gen.h ${CMAKE_CURRENT_BINARY_DIR}/gen.c
  COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/gen.sh ${CMAKE_CURRENT_BINARY_DIR}
  DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/gen.sh)
add_library(gen STATIC a.c b.c c.c ${CMAKE_CURRENT_BINARY_DIR}/gen.c)
target_include_directories(gen PRIVATE ${CMAKE_CURRENT_BINARY_DIR})
"##,
    );
    // The generator, as protoc or bison would: it writes a header and a source afresh on
    // every build.
    p.write(
        "gen.sh",
        "printf '#define ANSWER 42\\n' > \"$1/gen.h\"\n\
         printf '#include \"gen.h\"\\nint gen(void) { return ANSWER; }\\n' > \"$1/gen.c\"\n",
    );
    for name in ["a", "b", "c"] {
        p.write(
            &format!("{name}.c"),
            &format!("#include \"gen.h\"\nint {name}(void) {{ return ANSWER; }}\n"),
        );
    }
    settle();
    let launcher = format!(
        "-DCMAKE_C_COMPILER_LAUNCHER={}",
        kiln_tests::kiln_bin().display()
    );
    let build = || {
        let _ = std::fs::remove_dir_all(p.path("build"));
        ok(&p
            .command("cmake")
            .args(["-S", ".", "-B", "build", "-G", "Ninja", &launcher])
            .output()
            .unwrap());
        ok(&p
            .command("cmake")
            .args(["--build", "build"])
            .output()
            .unwrap());
        p.read("build/libgen.a")
    };
    let first = build();
    let s = p.stats();
    assert_eq!((p.stat("hits"), p.stat("misses")), (0, 4), "{s}");
    let second = build();
    let s = p.stats();
    assert_eq!((p.stat("hits"), p.stat("misses")), (4, 4), "{s}");
    assert_eq!(first, second, "the library from cached objects differs");
}

/// A header that really changes while the compiler runs: a compiler wrapper compiles, then
/// rewrites the header before it exits (ordered by the script, not by timing). kiln must not
/// store a result keyed by the new content for an object made from the old one.
#[test]
fn a_header_rewritten_during_the_compile_is_not_stored() {
    require("gcc");
    let p = Project::new();
    p.write("inc/h.h", "#define V 1\n");
    p.write("main.c", "#include \"h.h\"\nint v(void) { return V; }\n");
    let wrapper = p.path("bin/cc-rewrites");
    p.write(
        "bin/cc-rewrites",
        "#!/bin/sh\ngcc \"$@\" || exit\ncase \"$*\" in *-c*) echo '#define V 2' > inc/h.h;; esac\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    settle();
    let args = [
        wrapper.to_str().unwrap(),
        "-c",
        "main.c",
        "-o",
        "main.o",
        "-Iinc",
    ];
    let out = p
        .command(kiln_tests::kiln_bin())
        .env("KILN_LOG", "debug")
        .args(args)
        .output()
        .unwrap();
    ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(p.reason("modified_during_compile"), 1, "{}", p.stats());
    assert!(
        log.contains("inc/h.h") && log.contains("changed during the compile"),
        "the debug line names the header: {log}"
    );
    assert!(p.entries('R').is_empty(), "a result was stored");
}

/// `KILN_LOG=debug` says which file and which argument made a compile uncacheable or put it in
/// preprocessor mode, and `gcc --version` is counted as what it is (issue 15).
#[test]
fn debug_lines_name_the_file_and_the_argument() {
    require("gcc");
    let p = Project::new();
    p.write(
        "inc/m.h",
        "#define PROBE \"opt.h\"\n#if __has_include(PROBE)\n#include PROBE\n#endif\n",
    );
    p.write("src/y.c", "#include \"m.h\"\nint y(void) { return 1; }\n");
    p.write("src/t.c", "#include \"t.h\"\n");
    p.write("inc/t.h", "const char *t = __TIME__;\n");
    settle();
    let debug = |args: &[&str]| {
        let out = p
            .command(kiln_tests::kiln_bin())
            .env("KILN_LOG", "debug")
            .args(args)
            .output()
            .unwrap();
        ok(&out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let log = debug(&["gcc", "--version"]);
    assert!(
        log.contains("uncacheable (not_a_compile)") && log.contains("`--version`"),
        "{log}"
    );
    assert_eq!(p.reason("not_a_compile"), 1, "{}", p.stats());
    assert_eq!(p.reason("nondeterministic"), 0, "{}", p.stats());
    let log = debug(&["gcc", "-c", "src/y.c", "-o", "y.o", "-Iinc", "-v"]);
    assert!(
        log.contains("uncacheable (nondeterministic): src/y.c, because of `-v`"),
        "{log}"
    );
    let log = debug(&["gcc", "-c", "src/t.c", "-o", "t.o", "-Iinc"]);
    assert!(
        log.contains("not stored: uncacheable (time_macros): inc/t.h"),
        "{log}"
    );
    let args = ["gcc", "-c", "src/y.c", "-o", "y.o", "-Iinc"];
    for _ in 0..2 {
        let log = debug(&args);
        assert!(
            log.contains("preprocessor mode: inc/m.h uses `__has_include(PROBE)`"),
            "{log}"
        );
    }
    assert_eq!(p.stat("hits"), 1, "{}", p.stats());
}

/// `kiln config` says where each value came from, `kiln --help` names the variables a farm
/// client needs with the scheme the scheduler speaks, and `kiln stats` says its saved time is
/// a sum (issue 15).
#[test]
fn config_help_and_stats_say_what_they_show() {
    let p = Project::new();
    p.write("kiln.toml", "max_files = 500\nhash_dir = false\n");
    let out = p
        .command(kiln_tests::kiln_bin())
        .env("KILN_CONFIG", p.path("kiln.toml"))
        .env("KILN_CACHE_SIZE", "0")
        .arg("config")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok(&out).stdout).into_owned();
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    assert!(row("max_size").contains("no limit"), "{text}");
    assert!(row("max_size").ends_with("(env KILN_CACHE_SIZE)"), "{text}");
    assert!(row("max_files").ends_with("(file)"), "{text}");
    assert!(row("hash_dir").ends_with("(file)"), "{text}");
    assert!(row("dir").ends_with("(env KILN_DIR)"), "{text}");
    assert!(row("scheduler").ends_with("(default)"), "{text}");

    let help = String::from_utf8_lossy(&ok(&p.kiln(&["--help"])).stdout).into_owned();
    for needed in [
        "KILN_SCHEDULER      the farm's scheduler, https://",
        "KILN_CA_FILE",
        "KILN_TOKEN_FILE",
        "KILN_CROSS_CHECK",
        "0 for no limit",
    ] {
        assert!(help.contains(needed), "--help lacks {needed:?}:\n{help}");
    }
    assert!(!help.contains("KILN_SCHEDULER=http://"), "{help}");

    // Saved time is summed over compiles, which the line says rather than pass for wall time.
    let stats = String::from_utf8_lossy(&ok(&p.kiln(&["stats"])).stdout).into_owned();
    assert!(
        stats.contains("Compile time saved") && stats.contains("summed over compiles"),
        "{stats}"
    );
}

/// `kiln masquerade DIR` links the names build tools call, `cc` included: a plain `make`, whose
/// built-in rule runs `cc`, is then served from the cache (issue 15).
#[test]
fn kiln_masquerade_links_cc_so_plain_make_is_cached() {
    require("gcc");
    require("cc");
    require("c++");
    require("make");
    let p = Project::new();
    p.write("hello.c", "int hello(void) { return 42; }\n");
    // No Makefile rule of our own: make's built-in `%.o: %.c` calls `cc`.
    p.write("Makefile", "all: hello.o\n");
    settle();
    let links = p.path("links");
    let out = p.kiln(&["masquerade", links.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&ok(&out).stdout).into_owned();
    assert!(
        text.contains("cc") && text.contains("export PATH="),
        "{text}"
    );
    for name in ["gcc", "cc"] {
        let target = std::fs::read_link(links.join(name)).unwrap();
        assert_eq!(target, kiln_tests::kiln_bin(), "{name}");
    }
    let path = format!("{}:{}", links.display(), std::env::var("PATH").unwrap());
    for _ in 0..2 {
        let _ = std::fs::remove_file(p.path("hello.o"));
        ok(&p.command("make").env("PATH", &path).output().unwrap());
        assert!(p.path("hello.o").exists());
    }
    assert_eq!((p.stat("hits"), p.stat("misses")), (1, 1), "{}", p.stats());
    // Run again, it changes nothing and says so; stats has no hint, as cc and c++ are linked.
    let out = p.kiln(&["masquerade", links.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&ok(&out).stdout).contains("already linked"));
    let stats = String::from_utf8_lossy(&ok(&p.kiln(&["stats"])).stdout).into_owned();
    assert!(!stats.contains("Hint"), "{stats}");
}
