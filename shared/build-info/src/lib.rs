//! What braid's binaries were built from, for `--version`, the agents'
//! hello and `braid_build_info`.
#![forbid(unsafe_code)]

/// The release version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit, abbreviated (uncommitted changes are not marked:
/// they would not trigger a rebuild); "unknown" when built outside a checkout without `BRAID_COMMIT`.
pub const COMMIT: &str = env!("BRAID_COMMIT");

/// What `--version` prints after the program's name.
pub const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BRAID_COMMIT"), ")");
