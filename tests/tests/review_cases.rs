//! Cases where an earlier kiln served a result the compiler would not have produced, each
//! checked against the bare compiler.

use kiln_tests::{ok, require, settle, Project};

#[test]
fn a_precompiled_header_is_left_to_the_compiler() {
    require("gcc");
    let p = Project::new();
    p.write("pre.h", "static const int pv = 1;\n");
    p.write("m.c", "int m(void) { return pv; }\n");
    ok(&p.bare(&["gcc", "-x", "c-header", "pre.h", "-o", "pre.h.gch"]));
    settle();
    let args = ["gcc", "-c", "m.c", "-include", "pre.h", "-o", "m.o"];
    ok(&p.kiln(&args));
    p.write("pre.h", "static const int pv = 2;\n");
    ok(&p.bare(&["gcc", "-x", "c-header", "pre.h", "-o", "pre.h.gch"]));
    settle();
    p.kiln_matches_bare(&args, "m.o");
    assert_eq!(p.reason("precompiled_header"), 2);
    // gcc also uses a .gch for the first #include of a source.
    p.write("n.c", "#include \"pre.h\"\nint n(void) { return pv; }\n");
    settle();
    ok(&p.kiln(&["gcc", "-c", "n.c", "-o", "n.o"]));
    assert_eq!(p.reason("precompiled_header"), 3);
}

#[test]
fn a_header_beside_its_includer_or_on_cpath_shadows() {
    require("gcc");
    let p = Project::new();
    p.write("m.c", "#include \"sub/a.h\"\nint m(void) { return B; }\n");
    p.write("inc/sub/a.h", "#include \"b.h\"\n");
    p.write("inc2/b.h", "#define B 2\n");
    settle();
    let args = ["gcc", "-c", "m.c", "-o", "m.o", "-Iinc", "-Iinc2"];
    ok(&p.kiln(&args));
    // gcc looks in the including file's directory first.
    p.write("inc/sub/b.h", "#define B 3\n");
    settle();
    p.kiln_matches_bare(&args, "m.o");
    assert_eq!((p.stat("hits"), p.stat("misses")), (0, 2));

    let mut q = Project::new();
    q.env.push((
        "CPATH".into(),
        format!("{}:{}", q.path("a").display(), q.path("b").display()),
    ));
    q.write("b/x.h", "#define X 1\n");
    q.write("x.c", "#include <x.h>\nint x(void) { return X; }\n");
    settle();
    let args = ["gcc", "-c", "x.c", "-o", "x.o"];
    ok(&q.kiln(&args));
    q.write("a/x.h", "#define X 9\n");
    settle();
    q.kiln_matches_bare(&args, "x.o");
    assert_eq!(q.stat("misses"), 2);
}

#[test]
fn time_macros_and_source_date_epoch() {
    require("gcc");
    require("clang");
    let mut p = Project::new();
    p.env.push(("SOURCE_DATE_EPOCH".into(), "1000000".into()));
    p.write("ts.c", "const char *ts = __TIMESTAMP__;\n");
    p.write("t.c", "const char *t = __TIME__;\n");
    settle();
    for _ in 0..2 {
        // __TIMESTAMP__ is the file's own time, whatever SOURCE_DATE_EPOCH says.
        ok(&p.kiln(&["gcc", "-c", "ts.c"]));
        // clang 14 does not honour SOURCE_DATE_EPOCH for __TIME__.
        ok(&p.kiln(&["clang", "-c", "t.c"]));
    }
    assert_eq!(p.reason("time_macros"), 4);
    assert_eq!(p.stat("hits"), 0);
}

#[test]
fn the_profile_read_and_the_directory_recorded_are_in_the_key() {
    require("gcc");
    let p = Project::new();
    p.write("f.c", "int f(int x) { return x * 3; }\n");
    std::fs::create_dir_all(p.path("prof")).unwrap();
    settle();
    // gcc reads DIR/<mangled absolute output path>.gcda: another output, another profile.
    let prof = format!("-fprofile-use={}", p.path("prof").display());
    ok(&p.kiln(&["gcc", "-O2", &prof, "-c", "f.c", "-o", "a.o"]));
    ok(&p.kiln(&["gcc", "-O2", &prof, "-c", "f.c", "-o", "b.o"]));
    assert_eq!(p.stat("misses"), 2);

    // Assembler debug info records the working directory.
    for d in ["d1", "d2"] {
        p.write(&format!("{d}/s.S"), ".text\n.globl s\ns: ret\n");
    }
    settle();
    for d in ["d1", "d2"] {
        let out = p
            .command(kiln_tests::kiln_bin())
            .current_dir(p.path(d))
            .args(["gcc", "-Wa,-g", "-c", "s.S"])
            .output()
            .unwrap();
        ok(&out);
        let cached = p.read(&format!("{d}/s.o"));
        ok(&p
            .command("gcc")
            .current_dir(p.path(d))
            .args(["-Wa,-g", "-c", "s.S"])
            .output()
            .unwrap());
        assert_eq!(cached, p.read(&format!("{d}/s.o")), "{d}");
    }
}

#[test]
fn a_huge_response_file_still_compiles() {
    require("clang");
    let p = Project::new();
    let defines: String = (0..120_000)
        .map(|i| format!("-DKILN_DEFINE_NUMBER_{i}=1\n"))
        .collect();
    p.write("big.rsp", &defines);
    p.write("a.c", "int a(void) { return KILN_DEFINE_NUMBER_7; }\n");
    settle();
    ok(&p.kiln(&["clang", "@big.rsp", "-c", "a.c", "-o", "a.o"]));
    ok(&p.kiln(&["clang", "@big.rsp", "-c", "a.c", "-o", "a.o"]));
    assert_eq!(p.stat("hits"), 1);
}

#[test]
fn base_dir_shares_only_what_the_output_cannot_show() {
    require("gcc");
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let checkout = |name: &str| {
        let mut p = Project::new();
        p.cache = cache.clone();
        p.env
            .push(("KILN_BASE_DIR".into(), root.path().display().to_string()));
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        p.dir = tempfile::TempDir::new_in(&dir).unwrap();
        p.write("x.c", "const char *f = __FILE__;\n");
        p
    };
    let (a, b) = (checkout("a"), checkout("b"));
    settle();
    // The absolute source path is in __FILE__: the other checkout must not be served a.
    for p in [&a, &b] {
        let src = p.path("x.c").display().to_string();
        p.kiln_matches_bare(&["gcc", "-c", &src, "-o", "x.o"], "x.o");
    }
    assert_eq!(b.stat("hits"), 0);
}
