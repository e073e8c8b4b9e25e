//! Logging: tracing to stderr. Human lines on a terminal, one JSON object per line
//! otherwise (what journald and log shippers take), and never ANSI colour into a file or a
//! pipe. The `log` crate (libosdp logs through it) is bridged into the same subscriber.
//!
//! What reaches a log line is the caller's business: secrets and PINs are kept out by
//! their types ([`crate::secret::Secret`], [`crate::domain::access::Pin`]), whose `Debug`
//! redacts, and by never logging a request's headers or bodies.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human lines (colour only on a terminal and without `NO_COLOR`).
    Human,
    /// One JSON object per line.
    Json,
}

impl Format {
    /// `log.format`: `human`, `json`, or `auto` (anything else): human when `stderr_tty`.
    pub fn choose(setting: &str, stderr_tty: bool) -> Format {
        match setting {
            "json" => Format::Json,
            "human" => Format::Human,
            _ if stderr_tty => Format::Human,
            _ => Format::Json,
        }
    }
}

/// Whether human lines get ANSI colour: only on a terminal, and never with `NO_COLOR` set
/// to anything non-empty (<https://no-color.org>).
pub fn use_colour(stderr_tty: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_tty && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: `level` is an `EnvFilter` directive (`RUST_LOG` wins
/// when set), `format` is `log.format`. A second call does nothing.
pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let tty = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match Format::choose(format, tty) {
        Format::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
        Format::Human => tracing::subscriber::set_global_default(
            builder
                .with_ansi(use_colour(tty, std::env::var_os("NO_COLOR").as_deref()))
                .finish(),
        ),
    };
    if installed.is_ok() {
        // `log` records (libosdp) become tracing events, filtered like the rest.
        let max = tracing_log::AsLog::as_log(&tracing::level_filters::LevelFilter::current());
        let _ = tracing_log::LogTracer::builder().with_max_level(max).init();
    }
}

/// The span a device's tasks run in, so each of their log lines carries the device.
pub fn device_span(id: &str, kind: &str) -> tracing::Span {
    tracing::info_span!("device", id = %id, kind = %kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn auto_is_json_off_a_terminal() {
        assert_eq!(Format::choose("auto", false), Format::Json);
        assert_eq!(Format::choose("auto", true), Format::Human);
        assert_eq!(Format::choose("human", false), Format::Human);
        assert_eq!(Format::choose("json", true), Format::Json);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }
}
