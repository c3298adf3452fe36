//! How kiln's servers (`kiln-scheduler`, `kiln-builder`, `kiln-cache`) write their logs on
//! stderr: for people by default (colour on a terminal), or one JSON object per line for log
//! shippers (`--log-format json`). The level comes from `KILN_LOG` (`error` … `trace`).

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

/// Starts logging. `level` is `KILN_LOG`'s value, if set; info otherwise.
pub fn init(format: LogFormat, level: Option<&str>) {
    let level = level
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    let fmt = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Human => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt.json().with_current_span(false).init(),
    }
}
