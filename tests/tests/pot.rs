//! The farm end to end with `kiln-builder --jail pot`: the dist test's compiles again, on a
//! builder whose jails are pots on potsim, the simulator of FreeBSD's pot, jexec and rctl in
//! jails/tests/potsim (jexec'd commands run chrooted into the pot's tree as the jail's user).
//! Real gcc and g++ through kiln --dist; remote objects must be byte-identical to local ones.
//! What only a real FreeBSD host can prove is listed in docs/freebsd.md.

use kiln_tests::sample::{project, remote_matches_local, stat};
use kiln_tests::{Farm, FarmJail};

#[test]
fn pot_farm_objects_are_byte_identical_to_local_ones() {
    let farm = Farm::start_with(1, 2, FarmJail::PotSim);
    let p = project(&farm);
    let mut n = 0;
    for flags in [
        &["-g", "-O2"][..],
        &["-O0"][..],
        &["-g", "-gsplit-dwarf", "-O1"][..],
    ] {
        let mut args = vec!["gcc", "-c", "src/main.c", "-o", "main.o", "-Iinc"];
        args.extend(flags);
        remote_matches_local(&p, &args, "main.o");
        n += 1;
        // Forget the result so the next round goes to the farm again.
        p.kiln(&["clear"]);
    }
    let args = [
        "g++",
        "-c",
        "src/map.cc",
        "-o",
        "map.o",
        "-Iinc",
        "-g",
        "-O2",
        "-MD",
        "-MF",
        "map.d",
    ];
    remote_matches_local(&p, &args, "map.o");
    n += 1;
    assert_eq!(stat(&p, "dist_compiles"), n, "{}", p.stats());
    assert_eq!(stat(&p, "dist_fallbacks"), 0, "{}", p.stats());

    // A compile error comes back as the compiler's own, through the pot.
    p.write("src/bad.c", "int main(void) { return undeclared; }\n");
    kiln_tests::settle();
    let out = p.kiln(&["gcc", "-c", "src/bad.c", "-o", "bad.o"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("'undeclared' undeclared"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stat(&p, "dist_fallbacks"), 0, "{}", p.stats());

    let status = farm.status();
    let builders = status["builders"].as_array().unwrap();
    assert_eq!(builders.len(), 1);
    assert_eq!(builders[0]["jail"], "pot", "{status}");
}
