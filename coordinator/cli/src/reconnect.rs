//! Riding out a coordinator that restarts: calls that fail for a transport
//! reason are retried with exponential backoff and jitter until a deadline,
//! and the person at the terminal hears about it once per outage.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// How long to keep trying: the build's own `--timeout`, or
/// `limits::RECONNECT_SECONDS` for a build without one.
pub fn limit(build_timeout_seconds: Option<u32>) -> Duration {
    match build_timeout_seconds {
        Some(s) if s > 0 => Duration::from_secs(s.into()),
        _ => Duration::from_secs(braid_shared::limits::RECONNECT_SECONDS),
    }
}

fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Whether `status` says the coordinator could not be reached or the
/// connection broke (worth retrying), rather than an answer it gave.
pub fn transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => true,
        // A broken HTTP/2 connection surfaces as Internal with the transport
        // error as its source; an Internal the coordinator sent has none.
        Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// Whether `e` (or one of its causes) says nothing answered at the
/// coordinator's address: refused, reset, timed out, unreachable. A bad URL,
/// a name that does not resolve or a TLS failure is not waited out.
pub fn no_answer(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | TimedOut
                    | BrokenPipe
                    | UnexpectedEof
                    | HostUnreachable
                    | NetworkUnreachable
                    | AddrNotAvailable
            )
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The retry state of one command: an outage starts at the first failure
/// and ends at the next success.
pub struct Patience {
    limit: Duration,
    outage: Option<(Instant, ExponentialBackoff)>,
}

impl Patience {
    pub fn new(limit: Duration) -> Patience {
        Patience { limit, outage: None }
    }

    /// After a transient failure: says so (once per outage) and waits the
    /// next backoff delay; an error once the outage has lasted the limit.
    pub async fn wait(&mut self, error: &(dyn std::fmt::Display + Sync)) -> anyhow::Result<()> {
        let (started, delays) = match &mut self.outage {
            Some(o) => o,
            None => {
                crate::diag::warn(&format!("coordinator unreachable, reconnecting... ({error})"));
                self.outage.insert((Instant::now(), backoff()))
            }
        };
        let left = self.limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            anyhow::bail!("coordinator unreachable for {}s, giving up: {error}", self.limit.as_secs());
        }
        // The iterator never ends (no max times); 5 s is its cap anyway.
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::time::sleep(delay.min(left)).await;
        Ok(())
    }

    /// After a success: ends the outage, saying so if one was announced.
    pub fn recovered(&mut self) {
        if self.outage.take().is_some() {
            crate::diag::warn("coordinator reachable again, resuming");
        }
    }

    /// Runs `call` until it succeeds, fails for a reason that is not
    /// transient, or the outage outlasts the limit.
    pub async fn retry<T, F, Fut>(&mut self, mut call: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        loop {
            match call().await {
                Ok(v) => {
                    self.recovered();
                    return Ok(v);
                }
                Err(e) if transient(&e) => {
                    crate::conn::note_leader(&e);
                    self.wait(&e.message()).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Connects with `connect` until it succeeds; only a transport error
    /// (the coordinator not there yet) is retried.
    pub async fn connect<T, F, Fut>(&mut self, mut connect: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        loop {
            match connect().await {
                Ok(v) => {
                    self.recovered();
                    return Ok(v);
                }
                Err(e) if no_answer(e.as_ref()) => self.wait(&format!("{e:#}")).await?,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_transport_failures_are_transient() {
        assert!(transient(&tonic::Status::unavailable("tcp connect error")));
        assert!(transient(&tonic::Status::unknown("h2 protocol error")));
        assert!(!transient(&tonic::Status::internal("the coordinator hit an i/o error")));
        assert!(!transient(&tonic::Status::not_found("no build \"x\"")));
        assert!(!transient(&tonic::Status::permission_denied("token")));
    }

    #[test]
    fn a_refused_connection_is_waited_out_and_a_bad_address_is_not() {
        let refused = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            .context("connecting to the coordinator");
        assert!(no_answer(refused.as_ref()));
        let tls = anyhow::Error::new(std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid peer certificate"));
        assert!(!no_answer(tls.as_ref()));
        assert!(!no_answer(anyhow::anyhow!("coordinator URL \"x\" must start with https://").as_ref()));
    }

    #[test]
    fn the_limit_is_the_build_timeout_or_the_default() {
        assert_eq!(limit(Some(30)), Duration::from_secs(30));
        assert_eq!(limit(Some(0)), Duration::from_secs(braid_shared::limits::RECONNECT_SECONDS));
        assert_eq!(limit(None), Duration::from_secs(braid_shared::limits::RECONNECT_SECONDS));
    }

    #[tokio::test]
    async fn an_outage_ends_at_the_limit() {
        let mut patience = Patience::new(Duration::from_millis(700));
        let mut calls = 0;
        let out: anyhow::Result<()> = patience
            .retry(|| {
                calls += 1;
                async { Err(tonic::Status::unavailable("down")) }
            })
            .await;
        assert!(out.unwrap_err().to_string().contains("giving up"));
        assert!(calls > 2, "retried {calls} times");
    }
}
