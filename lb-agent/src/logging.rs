//! The agent's logs: `tracing` events written by `tracing-subscriber`, as text for people or
//! as one JSON object per line for log shippers. `log` records (the libraries', and the
//! agent's plain messages) join the same stream through tracing-log. The level comes from
//! `RUST_LOG`, else `agent.log_level`, else info; `lb-agent log-level` changes it at runtime.

use std::{io::IsTerminal, sync::OnceLock};

use tracing_subscriber::{
    fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Layer as _,
};

/// How log lines are written (`--log-format`, `agent.log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-24T06:48:03.123Z  INFO message key=value`.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message, the event's fields, its span.
    Json,
}

impl LogFormat {
    /// The name the config file and the command line use.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The level when neither RUST_LOG nor the config says.
pub const DEFAULT_LEVEL: &str = "info";

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Set once by `init`: what `set_level` changes.
static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// `--log-format` as given on the command line, for `lb-agent restart` to pass on.
static CLI_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Records the command line's `--log-format` (see `format_from_cli`).
pub fn set_format_from_cli(f: LogFormat) {
    let _ = CLI_FORMAT.set(f);
}

/// The command line's `--log-format`, if it had one.
pub fn format_from_cli() -> Option<LogFormat> {
    CLI_FORMAT.get().copied()
}

/// `RUST_LOG`, when set and not empty: it wins over the config, as operators expect.
fn from_env() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// Checks a level or a filter such as `info,lb_agent::health=debug`.
pub fn parse_level(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| format!("{directives:?} is not a log level: {e}"))
}

/// Installs the subscriber on stderr. `level` is the config's, used unless RUST_LOG is set.
/// Later calls do nothing (tests, a second `run`).
pub fn init(format: LogFormat, level: Option<&str>) {
    let directives = from_env()
        .or_else(|| level.map(str::to_string))
        .unwrap_or_else(|| DEFAULT_LEVEL.to_string());
    let filter = parse_level(&directives).unwrap_or_else(|e| {
        eprintln!("lb-agent: {e}; logging at {DEFAULT_LEVEL}");
        EnvFilter::new(DEFAULT_LEVEL)
    });
    let (filter, handle) = reload::Layer::new(filter);
    let out = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            // Colours only for a person at a terminal, never in journald or a file.
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(out)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the level at runtime; the answer says what it now is. RUST_LOG no longer
/// applies after this: the operator asked for this level.
pub fn set_level(directives: &str) -> Result<String, String> {
    let filter = parse_level(directives)?;
    let handle = FILTER
        .get()
        .ok_or_else(|| "logging is not set up in this process".to_string())?;
    handle
        .reload(filter)
        .map_err(|e| format!("changing the log level: {e}"))?;
    Ok(format!("log level: {directives}"))
}

/// Whether RUST_LOG decides the level (then `agent.log_level` does not).
pub fn level_from_env() -> bool {
    from_env().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters_parse_and_nonsense_does_not() {
        for ok in ["info", "debug", "warn,lb_agent::health=debug", "off"] {
            parse_level(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let e = parse_level("lb_agent=loud").unwrap_err();
        assert!(e.contains("\"lb_agent=loud\" is not a log level"), "{e}");
    }
}
