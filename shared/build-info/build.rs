//! Records the git commit the binaries are built from, so `--version` and
//! `braid_build_info` name it. A crate of its own: a new commit rebuilds
//! this and the binaries, not every library.
//!
//! `BRAID_COMMIT` overrides it (a release built from a source tarball);
//! outside a git checkout the commit is "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=BRAID_COMMIT");
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = std::env::var("BRAID_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        // Rebuild when HEAD moves: HEAD itself, the branch refs, packed refs.
        for (flag, tail) in
            [("--git-dir", "HEAD"), ("--git-common-dir", "refs/heads"), ("--git-common-dir", "packed-refs")]
        {
            if let Some(base) = git(&dir, &["rev-parse", "--path-format=absolute", flag]) {
                let path = Path::new(&base).join(tail);
                if path.exists() {
                    println!("cargo:rerun-if-changed={}", path.display());
                }
            }
        }
        git(&dir, &["rev-parse", "--short=12", "HEAD"])
    });
    println!("cargo:rustc-env=BRAID_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
}
