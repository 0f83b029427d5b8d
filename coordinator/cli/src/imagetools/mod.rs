//! `braid imagetools`: read and combine multi-platform images in a
//! registry, as `docker buildx imagetools` does. The CLI talks to the
//! registry directly, with the Docker config's logins; no coordinator.

mod create;
mod inspect;
pub mod verify;

use clap::{Args, Subcommand};

use braid_shared::ImageRef;
use braid_shared::oci::{Credential, Registry};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show an image or index in a registry: each platform's manifest digest,
    /// size and the platform its config declares, attestation manifests, and
    /// who built each platform (braid's provenance), like `docker buildx
    /// imagetools inspect`
    Inspect(inspect::InspectArgs),
    /// Combine images and indexes of one registry into a new index under one
    /// or more tags, like `docker buildx imagetools create`
    Create(create::CreateArgs),
    /// Check every platform's provenance in an index: an attestation manifest refers to it, its statement's subject
    /// is the platform's digest, and its DSSE signature verifies with a certificate the cluster CA (--ca) issued for
    /// provenance. One line per platform; exits non-zero naming each platform that fails
    Verify(verify::VerifyArgs),
}

pub async fn run(conn: &crate::conn::Conn, command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Inspect(args) => inspect::run(args).await,
        Command::Create(args) => create::run(args).await,
        Command::Verify(args) => verify::run(conn, args).await,
    }
}

/// How the registries are reached.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to this registry (repeatable); registries on a
    /// loopback address (localhost, 127.0.0.0/8, [::1]) always are, as
    /// Docker treats them
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
}

/// Whether a registry host (`host[:port]`) is on a loopback address.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A registry client for `refs`: the Docker config's credentials for their
/// registries, plain HTTP for loopback and `--insecure-registry` ones.
pub fn registry_for(refs: &[&ImageRef], args: &RegistryArgs) -> anyhow::Result<Registry> {
    for r in &args.insecure_registries {
        if !braid_shared::reference::is_registry_host(r) {
            anyhow::bail!("--insecure-registry {r:?}: expected HOST[:PORT]");
        }
    }
    let mut registries: Vec<String> = Vec::new();
    for r in refs {
        if !registries.iter().any(|x| x == r.registry()) {
            registries.push(r.registry().to_owned());
        }
    }
    let mut insecure = args.insecure_registries.clone();
    insecure.extend(registries.iter().filter(|r| is_loopback(r)).cloned());
    let credentials = crate::dockerconfig::credentials_for(&registries)?;
    Ok(Registry::with_credentials(&insecure, credentials.iter().map(Credential::from).collect()))
}

/// An image reference from the command line, naming the argument on error.
fn parse_ref(what: &str, raw: &str) -> anyhow::Result<ImageRef> {
    raw.parse().map_err(|e| anyhow::anyhow!("{what} {raw:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http() {
        for r in ["localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000", "localhost"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["docker.io", "registry.example:5000", "10.0.0.1:5000", "localhost.example"] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
