//! The systemd units and example settings in contrib/systemd: `systemd-analyze verify` accepts
//! each unit run against the workspace's own programs, and every flag the examples pass is
//! one the program knows.

use std::path::Path;
use std::process::Command;

const UNITS: [(&str, &str, &str); 3] = [
    ("kiln-scheduler.service", "kiln-scheduler", "scheduler.env"),
    ("kiln-builder.service", "kiln-builder", "builder.env"),
    ("kiln-cache.service", "kiln-cache", "cache.env"),
];

fn contrib() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd")
}

#[test]
fn units_verify_with_systemd() {
    let dir = tempfile::tempdir().unwrap();
    for (unit, program, _) in UNITS {
        let text = std::fs::read_to_string(contrib().join(unit)).unwrap();
        let installed = format!("/usr/local/bin/{program}");
        assert!(text.contains(&installed), "{unit} does not run {installed}");
        let here = kiln_tests::program(program);
        let text = text.replace(&installed, here.to_str().unwrap());
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(UNITS.iter().map(|(unit, _, _)| dir.path().join(unit)))
        .output()
        .expect("systemd-analyze (Debian's systemd package; scripts/test.sh installs it)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn example_settings_name_only_flags_the_programs_have() {
    for (unit, program, env) in UNITS {
        let help = Command::new(kiln_tests::program(program))
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let unit_text = std::fs::read_to_string(contrib().join(unit)).unwrap();
        let env_text = std::fs::read_to_string(contrib().join(env)).unwrap();
        let mut flags = 0;
        for word in unit_text
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .chain(env_text.lines().filter(|l| !l.starts_with('#')))
            .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == '='))
            .filter(|w| w.starts_with("--"))
        {
            flags += 1;
            assert!(
                help.contains(&format!("{word} ")) || help.contains(&format!("{word}\n")),
                "{program} has no {word} (from {unit} or {env})"
            );
        }
        assert!(flags >= 3, "{unit}: no flags found");
    }
}
