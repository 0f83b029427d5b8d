//! Build contexts: one deterministic tar hashed while it is written, and an
//! unpacker that never writes outside its directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cap_fs_ext::{DirExt as _, OpenOptionsFollowExt as _};
use cap_std::fs::{Dir, OpenOptionsExt as _};
use sha2::{Digest as _, Sha256};

use crate::beneath::{self, Resolution, Root};

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
            // Never through a link: it was a regular file a moment ago.
            let file = {
                use std::os::unix::fs::OpenOptionsExt as _;
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(path)
                    .map_err(|source| ContextError::Read { path: path.to_owned(), source })?
            };
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
/// that could write or lead outside it. Every entry is made through a
/// directory handle on `dest`: its parent is walked one real directory at a
/// time (never through a link or a file), the entry itself is created
/// afresh (a file or link already there is removed, never written through),
/// absolute paths and `..` above `dest` are refused, and so are symlinks
/// whose text leads out, hard links to anything but an earlier regular
/// file, and device nodes. Once every entry is written, each symlink is
/// resolved physically beneath `dest`; one that leads out refuses the whole
/// context (so a chain such as `a -> x/..` then `x -> .` is caught whatever
/// the order). Setuid, setgid and sticky bits are dropped.
pub fn unpack<R: Read>(reader: R, dest: &Path, limits: ContextLimits) -> Result<UnpackSummary, ContextError> {
    let root = Root::open(dest).map_err(ContextError::Write)?;
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        root: &root,
        limits,
        summary: UnpackSummary::default(),
        dir_modes: BTreeMap::new(),
        links: Vec::new(),
        last_parent: None,
    };
    for entry in archive.entries().map_err(ContextError::Tar)? {
        let mut entry = entry.map_err(ContextError::Tar)?;
        let raw_path = entry.path().map_err(ContextError::Tar)?.into_owned();
        let shown = raw_path.to_string_lossy().into_owned();
        unpacker.entry(&mut entry, &raw_path).map_err(|e| e.into_error(&shown))?;
    }
    unpacker.check_links()?;
    // Directory modes last, so a read-only directory does not block its files.
    for (dir, mode) in unpacker.dir_modes.iter().rev() {
        root.dir()
            .set_permissions(dir, cap_std::fs::Permissions::from_std(fs::Permissions::from_mode(*mode)))
            .map_err(ContextError::Write)?;
    }
    Ok(unpacker.summary)
}

/// An entry's failure: a refusal (named after the entry by the caller) or
/// an error of its own.
enum EntryError {
    Refused(&'static str),
    Other(ContextError),
}

impl EntryError {
    fn into_error(self, entry: &str) -> ContextError {
        match self {
            EntryError::Refused(reason) => ContextError::Refused { entry: entry.to_owned(), reason },
            EntryError::Other(e) => e,
        }
    }
}

impl From<&'static str> for EntryError {
    fn from(reason: &'static str) -> Self {
        EntryError::Refused(reason)
    }
}

fn write_err(e: io::Error) -> EntryError {
    EntryError::Other(ContextError::Write(e))
}

fn tar_err(e: io::Error) -> EntryError {
    EntryError::Other(ContextError::Tar(e))
}

struct Unpacker<'a> {
    root: &'a Root,
    limits: ContextLimits,
    summary: UnpackSummary,
    dir_modes: BTreeMap<PathBuf, u32>,
    /// Every symlink made, in order, with its name in the tar.
    links: Vec<(PathBuf, String)>,
    /// The last parent directory opened, reused by its next entries.
    last_parent: Option<(PathBuf, Dir)>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, raw_path: &Path) -> Result<(), EntryError> {
        let rel = beneath::lexically_inside(raw_path).ok_or_else(|| {
            if raw_path.has_root() { "absolute path" } else { "path leads out of the context ('..')" }
        })?;
        self.summary.entries += 1;
        if self.summary.entries > self.limits.max_entries {
            return Err(EntryError::Other(ContextError::TooManyEntries { limit: self.limits.max_entries }));
        }
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() || matches!(kind, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            return Ok(());
        }
        if rel.as_os_str().len() > crate::limits::CONTEXT_PATH_BYTES {
            return Err("path longer than 4096 bytes".into());
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match kind {
            tar::EntryType::Directory => {
                let (parent, name) = self.parent(&rel, true)?;
                match parent.symlink_metadata(&name) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => return Err("a directory replaces a file or link".into()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => parent.create_dir(&name).map_err(write_err)?,
                    Err(e) => return Err(write_err(e)),
                }
                self.dir_modes.insert(rel, mode | 0o700);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().entry_size().map_err(tar_err)?;
                self.summary.bytes += size;
                if self.summary.bytes > self.limits.max_bytes {
                    return Err(EntryError::Other(ContextError::TooLarge { limit: self.limits.max_bytes }));
                }
                let mtime = entry.header().mtime().unwrap_or(0);
                let (parent, name) = self.parent(&rel, true)?;
                remove_non_dir(&parent, &name, "a file replaces a directory")?;
                let mut options = cap_std::fs::OpenOptions::new();
                options.write(true).create_new(true).mode(0o600).follow(cap_fs_ext::FollowSymlinks::No);
                let mut file = parent.open_with(&name, &options).map_err(write_err)?.into_std();
                io::copy(&mut entry.take(size), &mut file).map_err(write_err)?;
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(write_err)?;
                // An mtime the system cannot hold is not worth refusing.
                if let Some(mtime) = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(mtime)) {
                    let _ = file.set_modified(mtime);
                }
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(tar_err)?.ok_or("symlink without a target")?.into_owned();
                if link.as_os_str().is_empty() {
                    return Err("symlink without a target".into());
                }
                if link.has_root() {
                    return Err("symlink to an absolute path leads out of the context".into());
                }
                let parent_rel = rel.parent().unwrap_or(Path::new(""));
                beneath::lexically_inside(&parent_rel.join(&link)).ok_or("symlink leads out of the context")?;
                let (parent, name) = self.parent(&rel, true)?;
                remove_non_dir(&parent, &name, "a symlink replaces a directory")?;
                parent.symlink(&link, &name).map_err(write_err)?;
                self.links.push((rel, raw_path.to_string_lossy().into_owned()));
            }
            tar::EntryType::Link => {
                let link = entry.link_name().map_err(tar_err)?.ok_or("hard link without a target")?.into_owned();
                let source_rel = beneath::lexically_inside(&link).ok_or("hard link leads out of the context")?;
                if source_rel == rel {
                    return Err("hard link to itself".into());
                }
                let (source_parent, source_name) = self
                    .parent(&source_rel, false)
                    .map_err(|_| "hard link to something that is not an earlier file")?;
                match source_parent.symlink_metadata(&source_name) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(meta) if meta.is_symlink() => return Err("hard link to a symlink".into()),
                    Ok(meta) if meta.is_dir() => return Err("hard link to a directory".into()),
                    _ => return Err("hard link to something that is not an earlier file".into()),
                }
                let (parent, name) = self.parent(&rel, true)?;
                remove_non_dir(&parent, &name, "a hard link replaces a directory")?;
                source_parent.hard_link(&source_name, &parent, &name).map_err(write_err)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => return Err("device node".into()),
            tar::EntryType::Fifo => return Err("named pipe".into()),
            _ => return Err("unsupported entry type".into()),
        }
        Ok(())
    }

    /// The directory holding `rel` (walked from the root one real directory
    /// at a time, made when `create`) and `rel`'s last component.
    fn parent(&mut self, rel: &Path, create: bool) -> Result<(Dir, std::ffi::OsString), EntryError> {
        let name = rel.file_name().ok_or("path has no name")?.to_owned();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        if let Some((path, dir)) = &self.last_parent
            && path == parent_rel
        {
            return Ok((dir.try_clone().map_err(write_err)?, name));
        }
        let mut dir = self.root.dir().try_clone().map_err(write_err)?;
        for part in parent_rel.components() {
            let part = part.as_os_str();
            match dir.symlink_metadata(part) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.is_symlink() => return Err("path goes through a symlink".into()),
                Ok(_) => return Err("path goes through a file".into()),
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                    dir.create_dir(part).map_err(|_| "cannot create its directory")?
                }
                Err(_) => return Err("path goes through something missing".into()),
            }
            dir = dir.open_dir_nofollow(part).map_err(|_| "path goes through a symlink")?;
        }
        self.last_parent = Some((parent_rel.to_owned(), dir.try_clone().map_err(write_err)?));
        Ok((dir, name))
    }

    /// Resolves every symlink made, physically and beneath the root, now
    /// that the whole tree is there.
    fn check_links(&self) -> Result<(), ContextError> {
        for (rel, shown) in &self.links {
            let refuse = |reason| ContextError::Refused { entry: shown.clone(), reason };
            match self.root.resolve(rel) {
                Resolution::Inside | Resolution::Dangling => {}
                Resolution::Loops => return Err(refuse("symlink loops or nests too deeply")),
                Resolution::Outside => return Err(refuse("symlink leads out of the context")),
            }
        }
        Ok(())
    }
}

/// Removes a file or link called `name` in `dir`, so that writing there
/// never follows a link; a directory is refused with `reason`.
fn remove_non_dir(dir: &Dir, name: &std::ffi::OsStr, reason: &'static str) -> Result<(), EntryError> {
    match dir.symlink_metadata(name) {
        Ok(meta) if meta.is_dir() => Err(reason.into()),
        Ok(_) => dir.remove_file_or_symlink(name).map_err(|_| "cannot replace the existing file".into()),
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

    const CANARY: &str = "FROM busybox\nRUN echo canary\n";

    /// `outer/{job/, canary}`: unpacks into `job`, a canary file beside it.
    fn unpack_into_job(tar: &[u8]) -> (Result<UnpackSummary, ContextError>, tempfile::TempDir) {
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("job");
        fs::create_dir(&dest).unwrap();
        fs::write(outer.path().join("canary"), CANARY).unwrap();
        let result = unpack(tar, &dest, ContextLimits::default());
        (result, outer)
    }

    fn unpack_refused(tar: Vec<u8>) -> (String, tempfile::TempDir) {
        let (result, outer) = unpack_into_job(&tar);
        (result.unwrap_err().to_string(), outer)
    }

    /// Nothing but `job/` (and what is inside it) and the untouched canary
    /// exist next to it.
    fn assert_nothing_outside(outer: &tempfile::TempDir) {
        let mut names: Vec<_> = fs::read_dir(outer.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("canary"), std::ffi::OsString::from("job")]);
        assert_eq!(fs::read_to_string(outer.path().join("canary")).unwrap(), CANARY);
    }

    /// The chain of the report: `l0 -> .`, `l1 -> l0/..`, ... `l6 -> l5/..`,
    /// each lexically inside, `l6` physically six levels above.
    fn chain(b: &mut tar::Builder<Vec<u8>>) {
        raw_entry(b, tar::EntryType::Symlink, "l0", Some("."), b"");
        for i in 1..7 {
            raw_entry(b, tar::EntryType::Symlink, &format!("l{i}"), Some(&format!("l{}/..", i - 1)), b"");
        }
    }

    #[test]
    fn hostile_trees_are_refused_naming_the_entry() {
        use tar::EntryType::*;
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            ("link chain", tar_with(chain), "l1", "symlink leads out"),
            (
                "write through the chain",
                tar_with(|b| {
                    chain(b);
                    raw_entry(b, Regular, "l6/tmp/x", None, b"x");
                }),
                "l6/tmp/x",
                "through a symlink",
            ),
            (
                "link to a link out",
                tar_with(|b| {
                    raw_entry(b, Symlink, "x", Some("."), b"");
                    raw_entry(b, Symlink, "y", Some("x/.."), b"");
                    raw_entry(b, Symlink, "z", Some("y"), b"");
                }),
                "y",
                "symlink leads out",
            ),
            (
                "hard link to a symlink",
                tar_with(|b| {
                    raw_entry(b, Regular, "f", None, b"x");
                    raw_entry(b, Symlink, "s", Some("f"), b"");
                    raw_entry(b, Link, "h", Some("s"), b"");
                }),
                "h",
                "hard link to a symlink",
            ),
            (
                "hard link to the chain",
                tar_with(|b| {
                    chain(b);
                    raw_entry(b, Link, "h", Some("l6"), b"");
                }),
                "h",
                "hard link to a symlink",
            ),
            (
                "hard link through the chain",
                tar_with(|b| {
                    chain(b);
                    raw_entry(b, Link, "h", Some("l6/canary"), b"");
                }),
                "h",
                "not an earlier file",
            ),
            (
                "hard link to a directory",
                tar_with(|b| {
                    raw_entry(b, Directory, "d", None, b"");
                    raw_entry(b, Link, "h", Some("d"), b"");
                }),
                "h",
                "hard link to a directory",
            ),
            ("hard link to itself", tar_with(|b| raw_entry(b, Link, "h", Some("./h"), b"")), "h", "itself"),
            (
                "a directory re-sent as a symlink",
                tar_with(|b| {
                    raw_entry(b, Directory, "d", None, b"");
                    raw_entry(b, Symlink, "d", Some("."), b"");
                }),
                "d",
                "a symlink replaces a directory",
            ),
            (
                "a symlink re-sent as a directory",
                tar_with(|b| {
                    raw_entry(b, Symlink, "d", Some("."), b"");
                    raw_entry(b, Directory, "d", None, b"");
                }),
                "d",
                "a directory replaces a file or link",
            ),
            (
                "order-dependent chain",
                tar_with(|b| {
                    raw_entry(b, Symlink, "a", Some("x/.."), b"");
                    raw_entry(b, Symlink, "x", Some("."), b"");
                }),
                "a",
                "symlink leads out",
            ),
            (
                "order-dependent chain, a file on top",
                tar_with(|b| {
                    raw_entry(b, Symlink, "a", Some("x/.."), b"");
                    raw_entry(b, Symlink, "x", Some("."), b"");
                    raw_entry(b, Regular, "a/canary", None, b"x");
                }),
                "a/canary",
                "through a symlink",
            ),
            (
                "a link replaced by a link out",
                tar_with(|b| {
                    raw_entry(b, Symlink, "x", Some("."), b"");
                    raw_entry(b, Symlink, "a", Some("x"), b"");
                    raw_entry(b, Symlink, "a", Some("x/.."), b"");
                }),
                "a",
                "symlink leads out",
            ),
            ("absolute root link", tar_with(|b| raw_entry(b, Symlink, "r", Some("/"), b"")), "r", "absolute path"),
            ("empty link", tar_with(|b| raw_entry(b, Symlink, "e", None, b"")), "e", "symlink without a target"),
            (
                "loop",
                tar_with(|b| {
                    raw_entry(b, Symlink, "p", Some("q"), b"");
                    raw_entry(b, Symlink, "q", Some("p"), b"");
                }),
                "p",
                "loops",
            ),
        ];
        for (name, tar, entry, want) in cases {
            let (err, outer) = unpack_refused(tar);
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.starts_with(&format!("refused context entry {entry:?}")), "{name}: {err}");
            assert_nothing_outside(&outer);
        }
    }

    #[test]
    fn dotdot_in_link_targets_at_every_depth() {
        for depth in 0..7 {
            let dir = (0..depth).map(|i| format!("d{i}/")).collect::<String>();
            let up = "../".repeat(depth);
            // One `..` more than the depth leads out, lexically.
            let tar = tar_with(|b| {
                raw_entry(b, tar::EntryType::Symlink, &format!("{dir}out"), Some(&format!("{up}../canary")), b"")
            });
            let (err, outer) = unpack_refused(tar);
            assert!(err.contains("symlink leads out"), "depth {depth}: {err}");
            assert_nothing_outside(&outer);
            // Through a link to the directory itself, the same `..` count
            // leads out physically.
            let tar = tar_with(|b| {
                raw_entry(b, tar::EntryType::Symlink, &format!("{dir}self"), Some("."), b"");
                raw_entry(b, tar::EntryType::Symlink, &format!("{dir}out"), Some(&format!("self/{up}..")), b"");
            });
            let (result, outer) = unpack_into_job(&tar);
            let err = result.unwrap_err().to_string();
            assert!(err.contains(&format!("{dir}out")) && err.contains("symlink leads out"), "depth {depth}: {err}");
            assert_nothing_outside(&outer);
            // Exactly the depth stays inside.
            let tar = tar_with(|b| {
                raw_entry(b, tar::EntryType::Regular, "top", None, b"top");
                raw_entry(b, tar::EntryType::Symlink, &format!("{dir}in"), Some(&format!("{up}top")), b"");
            });
            let (result, outer) = unpack_into_job(&tar);
            result.unwrap();
            assert_eq!(fs::read_to_string(outer.path().join("job").join(format!("{dir}in"))).unwrap(), "top");
            assert_nothing_outside(&outer);
        }
    }

    #[test]
    fn links_inside_are_kept() {
        use tar::EntryType::*;
        let tar = tar_with(|b| {
            raw_entry(b, Directory, "sub/", None, b"");
            raw_entry(b, Regular, "sub/file", None, b"hello");
            raw_entry(b, Symlink, "to-file", Some("sub/file"), b"");
            raw_entry(b, Symlink, "to-dir", Some("sub"), b"");
            raw_entry(b, Symlink, "to-link", Some("to-file"), b"");
            raw_entry(b, Symlink, "sub/up", Some("../to-dir/file"), b"");
            raw_entry(b, Symlink, "dangling", Some("missing/.."), b"");
            raw_entry(b, Link, "hard", Some("sub/file"), b"");
            // A link re-sent as a file replaces the link, not its target.
            raw_entry(b, Symlink, "was-link", Some("sub/file"), b"");
            raw_entry(b, Regular, "was-link", None, b"new");
        });
        let (result, outer) = unpack_into_job(&tar);
        result.unwrap();
        let job = outer.path().join("job");
        for link in ["to-file", "to-dir/file", "to-link", "sub/up", "hard"] {
            assert_eq!(fs::read_to_string(job.join(link)).unwrap(), "hello", "{link}");
        }
        assert_eq!(fs::read_to_string(job.join("was-link")).unwrap(), "new");
        assert!(fs::symlink_metadata(job.join("dangling")).unwrap().is_symlink());
        assert_nothing_outside(&outer);
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
            let (_, outer) = unpack_into_job(&bytes);
            assert_nothing_outside(&outer);
        }

        /// Entries with hostile paths and link targets never write outside,
        /// and a context that is accepted holds no link that leads out: no
        /// path opened beneath it reaches the canary beside it.
        #[test]
        fn hostile_entries_stay_inside(
            entries in proptest::collection::vec(
                (0u8..4, "(\\.\\./|/|a/|b/|\\./){0,4}[a-c]{1,2}", "(\\.\\./|/|[a-c]/|[a-c]{1,2}/\\.\\./|\\./){0,5}[a-c.]{0,2}"),
                1..10,
            ),
            opens in proptest::collection::vec("([a-c]{1,2}/|\\.\\./|\\./){0,6}(canary|[a-c]{1,2})?", 1..6),
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
            let (result, outer) = unpack_into_job(&tar);
            assert_nothing_outside(&outer);
            if result.is_ok() {
                let root = Root::open(&outer.path().join("job")).unwrap();
                for (_, path, _) in &entries {
                    if let Some(rel) = beneath::lexically_inside(Path::new(path)) {
                        proptest::prop_assert_ne!(root.resolve(&rel), Resolution::Outside, "{} leads out", path);
                    }
                }
                for path in &opens {
                    if let Ok(bytes) = root.read_file(path, 1 << 10) {
                        proptest::prop_assert_ne!(bytes, CANARY.as_bytes().to_vec(), "{} read the canary", path);
                    }
                }
            }
        }
    }
}
