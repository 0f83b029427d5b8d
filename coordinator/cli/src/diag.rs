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
        errln!("error: {message}");
    }
}

/// Something went wrong and braid carries on.
pub fn warn(message: &str) {
    if json() {
        tracing::warn!("{message}");
    } else {
        errln!("{message}");
    }
}

/// What braid did, for the person at the terminal.
pub fn note(message: &str) {
    if json() {
        tracing::info!("{message}");
    } else {
        errln!("{message}");
    }
}

/// An error and its causes, `: `-separated as `{:#}` prints them, but a
/// coordinator's refusal is its message alone, not tonic's "code: '...',
/// message: ..." wrapping.
pub fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|cause| match cause.downcast_ref::<tonic::Status>() {
            Some(status) if !status.message().is_empty() => status.message().to_owned(),
            Some(status) => status.code().description().to_owned(),
            None => cause.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_as_its_message() {
        let refused = anyhow::Error::new(tonic::Status::failed_precondition("linux/arm/v7: heredocs need buildah"));
        assert_eq!(describe(&refused), "linux/arm/v7: heredocs need buildah");
        let wrapped = refused.context("submitting the build");
        assert_eq!(describe(&wrapped), "submitting the build: linux/arm/v7: heredocs need buildah");
        assert_eq!(
            describe(&anyhow::Error::new(tonic::Status::unavailable(""))),
            "The service is currently unavailable"
        );
    }
}
