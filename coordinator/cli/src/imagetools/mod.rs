//! `braid imagetools`: read and check images in a registry, as `docker
//! buildx imagetools` does.

pub mod verify;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ImagetoolsCommand {
    /// Check every platform's provenance in an index: an attestation manifest refers to it, its statement's subject
    /// is the platform's digest, and its DSSE signature verifies with a certificate the cluster CA (--ca) issued for
    /// provenance. One line per platform; exits non-zero naming each platform that fails
    Verify(verify::VerifyArgs),
}

pub async fn run(conn: &crate::conn::Conn, command: ImagetoolsCommand) -> anyhow::Result<i32> {
    match command {
        ImagetoolsCommand::Verify(args) => verify::run(conn, args).await,
    }
}
