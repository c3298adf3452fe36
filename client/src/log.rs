//! `KILN_LOG`: what kiln writes about itself on stderr, read as the servers read it
//! (`kiln_net::logging::filter`): a bare level is for kiln's own explanations (hit, miss,
//! why) and leaves the network crates at `warn`; a target filter is taken as written.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;

/// The rule is the servers' too: one reading of `KILN_LOG` for every kiln program.
pub use kiln_net::logging::filter;

/// Starts logging on stderr when `KILN_LOG` is set. A value that cannot be read is said once
/// and treated as `warn`, so a typo never fails a build.
pub fn init(spec: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let Some(spec) = spec else {
        return;
    };
    let targets = filter(spec).unwrap_or_else(|e| {
        eprintln!("kiln: warning: {e}; logging warnings only");
        Targets::new().with_default(LevelFilter::WARN)
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(targets)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn a_bare_level_is_for_kilns_own_crates() {
        let cases: &[(&str, &str, Level, bool)] = &[
            // (KILN_LOG, target, level, enabled)
            ("debug", "kiln_client::compile", Level::DEBUG, true),
            ("debug", "kiln_cache", Level::DEBUG, true),
            ("debug", "kiln", Level::DEBUG, true),
            ("debug", "kiln_client::compile", Level::TRACE, false),
            ("debug", "h2::codec::framed_read", Level::DEBUG, false),
            ("debug", "hyper_util::client", Level::DEBUG, false),
            ("debug", "tonic::transport", Level::INFO, false),
            ("debug", "rustls::client", Level::WARN, true),
            ("DEBUG", "tower::buffer", Level::DEBUG, false),
            ("trace", "kiln_client::dist", Level::TRACE, true),
            ("trace", "h2::proto", Level::TRACE, false),
            // A quieter level than warn is that level for everyone.
            ("error", "h2", Level::WARN, false),
            ("error", "kiln_client", Level::ERROR, true),
            ("error", "kiln_client", Level::WARN, false),
            // The full syntax is taken as written.
            ("debug,h2=trace", "h2::codec", Level::TRACE, true),
            ("debug,h2=trace", "tonic", Level::DEBUG, true),
            (
                "kiln_client=trace",
                "kiln_client::closure",
                Level::TRACE,
                true,
            ),
            ("kiln_client=trace", "hyper", Level::ERROR, false),
            ("warn,tonic=debug", "tonic::transport", Level::DEBUG, true),
            ("warn,tonic=debug", "kiln_client", Level::INFO, false),
        ];
        for (spec, target, level, enabled) in cases {
            let f = filter(spec).unwrap();
            assert_eq!(
                f.would_enable(target, level),
                *enabled,
                "KILN_LOG={spec}: {target} at {level}"
            );
        }
    }

    #[test]
    fn unreadable_values_say_what_to_write() {
        let e = filter("verbose").unwrap_err();
        assert!(e.contains("\"verbose\"") && e.contains("debug"), "{e}");
        assert!(filter("debug,h2=loud")
            .unwrap_err()
            .contains("KILN_LOG=debug"));
    }
}
