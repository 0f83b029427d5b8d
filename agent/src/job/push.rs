//! Pushing a job's image to its repositories by digest, riding out
//! registry outages.

use std::path::Path;
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;

use braid_shared::oci::{ImageDescriptor, Registry};
use braid_shared::{ImageRef, proto};

use super::{JobEnv, Outcome, build_failure, infra, log_lines};

/// Pushes to every repository, retrying registry errors with backoff.
pub(super) async fn push_everywhere(env: &JobEnv, a: &proto::Assignment, layout: &Path, registry: Registry) -> Outcome {
    let mut descriptor = None;
    let patience = Duration::from_secs(env.settings.settings.push_retry_seconds.into());
    for raw in &a.push_repositories {
        let repository: ImageRef = match raw.parse() {
            Ok(r) => r,
            Err(e) => return build_failure(e),
        };
        match push_with_retries(env, a, layout, &registry, &repository, patience).await {
            Ok(d) => {
                log_lines(env, a, vec![format!("pushed {} to {}", d.digest, repository.name())]);
                descriptor = Some(d);
            }
            Err(outcome) => return outcome,
        }
    }
    match descriptor {
        Some(d) => Outcome::Image(d, None),
        None => infra("no repository to push to"),
    }
}

/// Pushes to one repository, retrying a registry that cannot be reached (or
/// answers 5xx, 408, 429) with exponential backoff and jitter for up to
/// `patience`: an outage shorter than that costs no attempt of the job. A
/// registry's refusal (401, 403, another 4xx) will not change by waiting or
/// on another agent: it fails the build at once, with its message.
async fn push_with_retries(
    env: &JobEnv,
    a: &proto::Assignment,
    layout: &Path,
    registry: &Registry,
    repository: &ImageRef,
    patience: Duration,
) -> Result<ImageDescriptor, Outcome> {
    let started = Instant::now();
    let mut delays = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 1;
    loop {
        let e = match registry.push_layout(layout, repository).await {
            Ok(d) => return Ok(d),
            Err(e) => e,
        };
        if !e.is_transient() {
            return Err(build_failure(format!("pushing to {}: {e}", repository.name())));
        }
        let left = patience.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(infra(format!(
                "pushing to {}: registry {} unreachable for {}s ({attempt} tries): {e}",
                repository.name(),
                repository.registry(),
                patience.as_secs()
            )));
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(30)).min(left);
        log_lines(
            env,
            a,
            vec![format!(
                "registry {} unreachable, retrying (attempt {attempt}, next in {:.1}s): {e}",
                repository.registry(),
                delay.as_secs_f64()
            )],
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}
