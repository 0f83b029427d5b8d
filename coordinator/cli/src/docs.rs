//! `braid completion SHELL` and `braid man --dir DIR`: generated from the
//! same clap definitions the CLI parses with, so they cannot drift.

use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;

/// Writes the completion script for `shell` to stdout.
pub fn completion(shell: clap_complete::Shell) -> anyhow::Result<i32> {
    let mut command = crate::Cli::command();
    // Rendered first: clap_complete panics on a failed write (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "braid", &mut script);
    write_stdout(&script)
}

/// A closed pipe (`| head`) ends the output quietly, as `cat` does.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<i32> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// Writes `braid.1` and one page per subcommand (`braid-build.1`, ...) to `dir`.
pub fn man(dir: &Path) -> anyhow::Result<i32> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let command = crate::Cli::command().version(braid_build_info::LONG_VERSION);
    let mut written = Vec::new();
    write_pages(&command, "braid", dir, &mut written)?;
    let listing: String = written.iter().map(|name| format!("{}\n", dir.join(name).display())).collect();
    write_stdout(listing.as_bytes())
}

fn write_pages(command: &clap::Command, name: &str, dir: &Path, written: &mut Vec<String>) -> anyhow::Result<()> {
    let page = command.clone().name(name.to_owned());
    let mut bytes = Vec::new();
    clap_mangen::Man::new(page).render(&mut bytes).context("rendering a man page")?;
    let file = format!("{name}.1");
    std::fs::write(dir.join(&file), bytes).with_context(|| format!("writing {}", dir.join(&file).display()))?;
    written.push(file);
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn man_pages_cover_every_subcommand_and_completions_name_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        man(dir.path()).unwrap();
        let build = std::fs::read_to_string(dir.path().join("braid-build.1")).unwrap();
        assert!(build.contains("platform") && build.contains("cache"), "{}", &build[..build.len().min(400)]);
        assert!(dir.path().join("braid-agents-forget.1").exists());
        assert!(dir.path().join("braid-token-create.1").exists());
        let mut command = crate::Cli::command();
        let mut script = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut command, "braid", &mut script);
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("--allow-emulation") && script.contains("inspect"), "bash completion");
    }
}
