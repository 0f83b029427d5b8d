//! The CLI's own diagnostics (errors, warnings, notes) in the `--log-format`
//! every braid binary takes: `pretty` prints `error: ...` lines for a
//! person, `json` one JSON object per line (timestamp, level, message) for a
//! CI system. A build's progress and log lines are output, not diagnostics:
//! `--progress` controls them.

use std::sync::OnceLock;

use braid_shared::telemetry::{self, LogFormat};

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Sets the format once, at start; JSON goes through the shared subscriber.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    if format == LogFormat::Json {
        telemetry::init(format);
    }
}

fn json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// A failure that ends the command.
pub fn error(message: &str) {
    if json() {
        tracing::error!("{message}");
    } else {
        eprintln!("error: {message}");
    }
}

/// Something went wrong and braid carries on.
pub fn warn(message: &str) {
    if json() {
        tracing::warn!("{message}");
    } else {
        eprintln!("{message}");
    }
}

/// What braid did, for the person at the terminal.
pub fn note(message: &str) {
    if json() {
        tracing::info!("{message}");
    } else {
        eprintln!("{message}");
    }
}
