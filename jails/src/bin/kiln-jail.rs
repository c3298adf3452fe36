//! `kiln-jail`: enters a Linux jail for one job. Started by `kiln-builder`, never by hand.

fn main() -> std::process::ExitCode {
    kiln_jails::linux::helper::main()
}
