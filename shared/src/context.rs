//! Build contexts: one deterministic tar hashed while it is written, and an
//! unpacker that never writes outside its directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::dockerignore::DockerIgnore;

/// Bounds on one context, on both the writing and the unpacking side.
#[derive(Debug, Clone, Copy)]
pub struct ContextLimits {
    /// Total bytes of file contents.
    pub max_bytes: u64,
    /// Files, directories and links together.
    pub max_entries: u64,
}

impl Default for ContextLimits {
    fn default() -> Self {
        ContextLimits { max_bytes: crate::limits::CONTEXT_BYTES, max_entries: crate::limits::CONTEXT_ENTRIES }
    }
}

/// What went wrong writing or unpacking a context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("reading {path:?}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing the context: {0}")]
    Write(#[source] io::Error),
    #[error("context is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("context has more than the limit of {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("refused context entry {entry:?}: {reason}")]
    Refused { entry: String, reason: &'static str },
    #[error("reading the context tar: {0}")]
    Tar(#[source] io::Error),
}

/// The result of writing a context tar.
#[derive(Debug, Clone)]
pub struct ContextSummary {
    pub digest: Digest,
    /// Bytes of tar written.
    pub size: u64,
    pub entries: u64,
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest and size of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (Digest::from_hasher(self.hasher), self.written, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the context under `root` as a tar to `out`: entries sorted by name,
/// modes and mtimes kept, owners normalized to 0, files `ignore` excludes left
/// out. Special files (sockets, fifos, devices) are skipped.
pub fn write_tar<W: Write>(
    root: &Path,
    ignore: &DockerIgnore,
    limits: ContextLimits,
    out: W,
) -> Result<ContextSummary, ContextError> {
    let mut builder = tar::Builder::new(HashingWriter::new(out));
    builder.follow_symlinks(false);
    let mut walk = Walk { builder: &mut builder, ignore, limits, bytes: 0, entries: 0 };
    walk.dir(root, "")?;
    let entries = walk.entries;
    let hashing = builder.into_inner().map_err(ContextError::Write)?;
    let (digest, size, mut inner) = hashing.finish();
    inner.flush().map_err(ContextError::Write)?;
    Ok(ContextSummary { digest, size, entries })
}

struct Walk<'a, W: Write> {
    builder: &'a mut tar::Builder<HashingWriter<W>>,
    ignore: &'a DockerIgnore,
    limits: ContextLimits,
    bytes: u64,
    entries: u64,
}

impl<W: Write> Walk<'_, W> {
    fn dir(&mut self, dir: &Path, rel: &str) -> Result<(), ContextError> {
        let read_err = |source| ContextError::Read { path: dir.to_owned(), source };
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        for name in names {
            let Some(name) = name.to_str() else {
                return Err(ContextError::Refused {
                    entry: format!("{rel}{}", name.to_string_lossy()),
                    reason: "file name is not UTF-8",
                });
            };
            let rel_path = if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") };
            self.entry(&dir.join(name), &rel_path)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: &str) -> Result<(), ContextError> {
        let meta = fs::symlink_metadata(path).map_err(|source| ContextError::Read { path: path.to_owned(), source })?;
        let kind = meta.file_type();
        if self.ignore.is_ignored(rel) {
            // A re-included file may sit below an ignored directory.
            if kind.is_dir() && self.ignore.has_exclusions() {
                self.dir(path, rel)?;
            }
            return Ok(());
        }
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ContextError::TooManyEntries { limit: self.limits.max_entries });
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        header.set_uid(0);
        header.set_gid(0);
        let write = ContextError::Write;
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            self.builder.append_data(&mut header, format!("{rel}/"), io::empty()).map_err(write)?;
            self.dir(path, rel)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(path).map_err(|source| ContextError::Read { path: path.to_owned(), source })?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            self.builder.append_link(&mut header, rel, target).map_err(write)?;
        } else if kind.is_file() {
            self.bytes += meta.len();
            if self.bytes > self.limits.max_bytes {
                return Err(ContextError::TooLarge { limit: self.limits.max_bytes });
            }
            let file = fs::File::open(path).map_err(|source| ContextError::Read { path: path.to_owned(), source })?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            self.builder.append_data(&mut header, rel, file.take(meta.len())).map_err(write)?;
        } else {
            self.entries -= 1;
        }
        Ok(())
    }
}

/// What `unpack` wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackSummary {
    pub entries: u64,
    pub bytes: u64,
}

/// Unpacks a context tar into `dest` (which must exist), refusing anything
/// that could write outside it: absolute paths, `..`, writing through a
/// symlink, symlinks or hard links that lead out, and device nodes.
/// Setuid, setgid and sticky bits are dropped.
pub fn unpack<R: Read>(reader: R, dest: &Path, limits: ContextLimits) -> Result<UnpackSummary, ContextError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    let mut summary = UnpackSummary::default();
    let mut dir_modes: BTreeMap<PathBuf, u32> = BTreeMap::new();
    for entry in archive.entries().map_err(ContextError::Tar)? {
        let mut entry = entry.map_err(ContextError::Tar)?;
        let raw_path = entry.path().map_err(ContextError::Tar)?.into_owned();
        let shown = raw_path.to_string_lossy().into_owned();
        let refuse = |reason| ContextError::Refused { entry: shown.clone(), reason };
        let rel = relative_inside(&raw_path).map_err(refuse)?;
        summary.entries += 1;
        if summary.entries > limits.max_entries {
            return Err(ContextError::TooManyEntries { limit: limits.max_entries });
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        if rel.as_os_str().len() > crate::limits::CONTEXT_PATH_BYTES {
            return Err(refuse("path longer than 4096 bytes"));
        }
        ensure_parents(dest, &rel).map_err(refuse)?;
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => return Err(refuse("a directory replaces a file or link")),
                    Err(_) => fs::create_dir(&target).map_err(ContextError::Write)?,
                }
                dir_modes.insert(target, mode | 0o700);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().entry_size().map_err(ContextError::Tar)?;
                summary.bytes += size;
                if summary.bytes > limits.max_bytes {
                    return Err(ContextError::TooLarge { limit: limits.max_bytes });
                }
                remove_non_dir(&target).map_err(refuse)?;
                entry.unpack(&target).map_err(ContextError::Write)?;
            }
            tar::EntryType::Symlink => {
                let link =
                    entry.link_name().map_err(ContextError::Tar)?.ok_or_else(|| refuse("symlink without a target"))?;
                if link.is_absolute() {
                    return Err(refuse("symlink to an absolute path leads out of the context"));
                }
                let parent = rel.parent().unwrap_or(Path::new(""));
                relative_inside(&parent.join(&link)).map_err(|_| refuse("symlink leads out of the context"))?;
                remove_non_dir(&target).map_err(refuse)?;
                std::os::unix::fs::symlink(&link, &target).map_err(ContextError::Write)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(ContextError::Tar)?
                    .ok_or_else(|| refuse("hard link without a target"))?;
                let source_rel = relative_inside(&link).map_err(|_| refuse("hard link leads out of the context"))?;
                ensure_parents(dest, &source_rel).map_err(|_| refuse("hard link leads out of the context"))?;
                let source = dest.join(&source_rel);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if meta.is_file() || meta.is_symlink() => {}
                    _ => return Err(refuse("hard link to something that is not an earlier file")),
                }
                remove_non_dir(&target).map_err(refuse)?;
                fs::hard_link(&source, &target).map_err(ContextError::Write)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => return Err(refuse("device node")),
            tar::EntryType::Fifo => return Err(refuse("named pipe")),
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            _ => return Err(refuse("unsupported entry type")),
        }
    }
    // Directory modes last, so a read-only directory does not block its files.
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(ContextError::Write)?;
    }
    Ok(summary)
}

/// The path with `.` removed, refused if it is absolute or climbs out.
fn relative_inside(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err("path leads out of the context ('..')");
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// Creates the parent directories of `rel` under `dest`, refusing to go
/// through a symlink or a file.
fn ensure_parents(dest: &Path, rel: &Path) -> Result<(), &'static str> {
    let mut current = dest.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        current.push(part);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.is_symlink() => return Err("path goes through a symlink"),
            Ok(_) => return Err("path goes through a file"),
            Err(_) => fs::create_dir(&current).map_err(|_| "cannot create its directory")?,
        }
    }
    Ok(())
}

/// Removes a file or link at `path` so that writing there never follows a link.
fn remove_non_dir(path: &Path) -> Result<(), &'static str> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err("a file replaces a directory"),
        Ok(_) => fs::remove_file(path).map_err(|_| "cannot replace the existing file"),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h
    }

    /// Writes a raw path into the header, bypassing the tar crate's own checks,
    /// as a hostile client would.
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, link: Option<&str>, data: &[u8]) {
        let mut h = header(kind, data.len() as u64, 0o644);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn unpack_refused(tar: Vec<u8>) -> (String, tempfile::TempDir) {
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("job");
        fs::create_dir(&dest).unwrap();
        let err = unpack(&tar[..], &dest, ContextLimits::default()).unwrap_err();
        (err.to_string(), outer)
    }

    /// Nothing but `job/` (and what is inside it) exists next to it.
    fn assert_nothing_outside(outer: &tempfile::TempDir) {
        let names: Vec<_> = fs::read_dir(outer.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("job")]);
    }

    #[test]
    fn hostile_tars_are_refused_and_write_nothing_outside() {
        use tar::EntryType::*;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("absolute", tar_with(|b| raw_entry(b, Regular, "/tmp/evil", None, b"x")), "absolute path"),
            ("dotdot", tar_with(|b| raw_entry(b, Regular, "../evil", None, b"x")), "leads out"),
            ("deep dotdot", tar_with(|b| raw_entry(b, Regular, "a/../../evil", None, b"x")), "leads out"),
            ("symlink out", tar_with(|b| raw_entry(b, Symlink, "link", Some("../../"), b"")), "symlink leads out"),
            ("absolute symlink", tar_with(|b| raw_entry(b, Symlink, "link", Some("/etc"), b"")), "absolute path"),
            (
                "write through symlink",
                tar_with(|b| {
                    raw_entry(b, Symlink, "dir", Some("."), b"");
                    raw_entry(b, Regular, "dir/evil", None, b"x");
                }),
                "through a symlink",
            ),
            ("hardlink out", tar_with(|b| raw_entry(b, Link, "hl", Some("../evil"), b"")), "hard link leads out"),
            (
                "hardlink absolute",
                tar_with(|b| raw_entry(b, Link, "hl", Some("/etc/passwd"), b"")),
                "hard link leads out",
            ),
            ("char device", tar_with(|b| raw_entry(b, Char, "null", None, b"")), "device node"),
            ("block device", tar_with(|b| raw_entry(b, Block, "sda", None, b"")), "device node"),
            ("fifo", tar_with(|b| raw_entry(b, Fifo, "pipe", None, b"")), "named pipe"),
        ];
        for (name, tar, want) in cases {
            let (err, outer) = unpack_refused(tar);
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.starts_with("refused context entry"), "{name}: {err}");
            assert_nothing_outside(&outer);
        }
    }

    #[test]
    fn limits_are_enforced() {
        let tar = tar_with(|b| {
            for i in 0..5 {
                raw_entry(b, tar::EntryType::Regular, &format!("f{i}"), None, b"0123456789");
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let few = ContextLimits { max_bytes: 1 << 20, max_entries: 3 };
        assert!(matches!(unpack(&tar[..], dir.path(), few), Err(ContextError::TooManyEntries { limit: 3 })));
        let dir = tempfile::tempdir().unwrap();
        let small = ContextLimits { max_bytes: 25, max_entries: 100 };
        assert!(matches!(unpack(&tar[..], dir.path(), small), Err(ContextError::TooLarge { limit: 25 })));
    }

    #[test]
    fn round_trip_is_deterministic_and_drops_setuid() {
        let src = tempfile::tempdir().unwrap();
        let root = src.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/file"), "hello").unwrap();
        fs::write(root.join("run.sh"), "#!/bin/sh").unwrap();
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(root.join("secret.env"), "x").unwrap();
        std::os::unix::fs::symlink("a/b/file", root.join("link")).unwrap();
        let ignore = DockerIgnore::parse("*.env").unwrap();

        let mut first = Vec::new();
        let summary = write_tar(root, &ignore, ContextLimits::default(), &mut first).unwrap();
        let mut second = Vec::new();
        write_tar(root, &ignore, ContextLimits::default(), &mut second).unwrap();
        assert_eq!(first, second, "same tree, same tar");
        assert_eq!(summary.digest, Digest::of(&first));
        assert_eq!(summary.entries, 5);

        let names: Vec<String> = tar::Archive::new(&first[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a/", "a/b/", "a/b/file", "link", "run.sh"]);

        let dest = tempfile::tempdir().unwrap();
        unpack(&first[..], dest.path(), ContextLimits::default()).unwrap();
        assert_eq!(fs::read_to_string(dest.path().join("link")).unwrap(), "hello");
        let mode = fs::metadata(dest.path().join("run.sh")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "setuid dropped, exec kept");
        assert!(!dest.path().join("secret.env").exists());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Random bytes never panic the unpacker.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            let outer = tempfile::tempdir().unwrap();
            let dest = outer.path().join("job");
            fs::create_dir(&dest).unwrap();
            let _ = unpack(&bytes[..], &dest, ContextLimits::default());
            assert_nothing_outside(&outer);
        }

        /// Entries with hostile paths and link targets never write outside.
        #[test]
        fn hostile_entries_stay_inside(
            entries in proptest::collection::vec(
                (0u8..4, "(\\.\\./|/|a/|b/|\\./){0,4}[a-c]{1,2}", "(\\.\\./|/|a/|\\./){0,4}[a-c]{0,2}"),
                1..8,
            ),
        ) {
            use tar::EntryType::*;
            let tar = tar_with(|b| {
                for (kind, path, link) in &entries {
                    let (kind, link) = match kind {
                        0 => (Regular, None),
                        1 => (Symlink, Some(link.as_str())),
                        2 => (Link, Some(link.as_str())),
                        _ => (Directory, None),
                    };
                    if path.len() < 90 && link.is_none_or(|l| l.len() < 90) {
                        raw_entry(b, kind, path, link, b"data");
                    }
                }
            });
            let outer = tempfile::tempdir().unwrap();
            let dest = outer.path().join("job");
            fs::create_dir(&dest).unwrap();
            let _ = unpack(&tar[..], &dest, ContextLimits::default());
            assert_nothing_outside(&outer);
        }
    }
}
