//! How kiln's servers (`kiln-scheduler`, `kiln-builder`, `kiln-cache`) write their logs on
//! stderr: for people by default (colour on a terminal), or one JSON object per line for log
//! shippers (`--log-format json`). What is logged comes from `KILN_LOG`, read by [`filter`] for
//! the servers and for `kiln` alike.
//!
//! A bare level (`KILN_LOG=debug`) is for kiln's own explanations: kiln's crates log at that
//! level and every other crate at `warn` at most, so the network crates' HTTP/2 frame logs (h2,
//! hyper, tonic, rustls, tower) do not bury them. A filter in `tracing`'s target syntax
//! (`debug,h2=trace`) is taken as written, for whoever does want the others.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;

/// The crates whose events are kiln's own (targets are module paths, matched by prefix; every
/// kiln crate's name starts with `kiln`).
const OWN: [&str; 1] = ["kiln"];

/// The filter a `KILN_LOG` value stands for, or why it cannot be read.
pub fn filter(spec: &str) -> Result<Targets, String> {
    let spec = spec.trim();
    if spec.contains(['=', ',']) {
        return spec.parse::<Targets>().map_err(|e| {
            format!(
                "KILN_LOG={spec:?} is not a filter ({e}); e.g. KILN_LOG=debug or \
                 KILN_LOG=debug,h2=trace"
            )
        });
    }
    let level: LevelFilter = spec.parse().map_err(|_| {
        format!("KILN_LOG={spec:?} is not a level: use error, warn, info, debug or trace")
    })?;
    let others = level.min(LevelFilter::WARN);
    Ok(OWN
        .iter()
        .fold(Targets::new().with_default(others), |t, own| {
            t.with_target(*own, level)
        }))
}

/// The two formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (human or json)")),
        }
    }
}

/// [`init`] with the filter `KILN_LOG` gives, the servers' one read of the environment.
pub fn init_from_env(format: LogFormat) {
    #[allow(clippy::disallowed_methods)] // This is the door.
    let spec = std::env::var("KILN_LOG").ok();
    init(format, spec.as_deref());
}

/// Starts logging. `spec` is `KILN_LOG`'s value, if set; info otherwise. A value that cannot
/// be read is said once and treated as `info`.
pub fn init(format: LogFormat, spec: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let targets = filter(spec.unwrap_or("info")).unwrap_or_else(|e| {
        eprintln!("warning: {e}; logging at info");
        Targets::new().with_default(LevelFilter::INFO)
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(targets);
    let _ = match format {
        LogFormat::Human => registry
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt.json().with_current_span(false))
            .try_init(),
    };
}
