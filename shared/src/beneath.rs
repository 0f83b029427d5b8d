//! Files under a root directory, every path resolved beneath it: a link
//! may lead anywhere inside, never out (`openat2` with `RESOLVE_BENEATH`
//! where the kernel has it, cap-std's own component-by-component walk
//! elsewhere). A job's context is opened only through these; nothing here
//! takes a path that the operating system would resolve from `/`, except
//! `create_new_file`, which makes a file of the agent's own outside any
//! context and never follows a link.

use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use cap_fs_ext::{DirExt as _, OpenOptionsFollowExt as _};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt as _};

/// Why a path under a root could not be used. The message of each names
/// the path as it was asked for, and says nothing of what lies outside the
/// root: an escape is refused before anything outside is looked at.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    #[error("{path:?} not found")]
    NotFound { path: String },
    #[error("{path:?} refused: it leads out of the directory through a link, loops, or is not a regular file")]
    Refused { path: String },
    #[error("{path:?} is larger than the limit of {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("{path:?}: {source}")]
    Io { path: String, source: io::Error },
}

/// Where a path under a root leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// To something inside the root.
    Inside,
    /// Nowhere: a component is missing (or is not a directory).
    Dangling,
    /// Its links loop, or nest deeper than the kernel follows.
    Loops,
    /// Out of the root (an absolute link, or `..` above the root).
    Outside,
}

/// A directory handle; every path given to it is resolved beneath it.
#[derive(Debug)]
pub struct Root {
    dir: Dir,
}

impl Root {
    /// Opens `path` (the one path resolved the ordinary way: the agent's
    /// own job directory) as a root.
    pub fn open(path: &Path) -> io::Result<Root> {
        Ok(Root { dir: Dir::open_ambient_dir(path, ambient_authority())? })
    }

    /// The handle, for operations this module does not wrap.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Where `rel` leads, following every link on it, never outside.
    pub fn resolve(&self, rel: &Path) -> Resolution {
        match self.dir.metadata(rel) {
            Ok(_) => Resolution::Inside,
            Err(e) => classify(&e),
        }
    }

    /// Reads the regular file at `rel` (links followed inside only), at
    /// most `limit` bytes. A missing file is `NotFound`; anything else that
    /// is not a regular file inside (an escape, a loop, a directory, a
    /// fifo) is `Refused`, whatever lies outside.
    pub fn read_file(&self, rel: &str, limit: u64) -> Result<Vec<u8>, BeneathError> {
        let path = || rel.to_owned();
        let mut options = OpenOptions::new();
        // Non-blocking, so a fifo can never hang the open.
        options.read(true).custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
        let file = self.dir.open_with(rel, &options).map_err(|e| match classify(&e) {
            Resolution::Dangling => BeneathError::NotFound { path: path() },
            _ => BeneathError::Refused { path: path() },
        })?;
        let meta = file.metadata().map_err(|source| BeneathError::Io { path: path(), source })?;
        if !meta.is_file() {
            return Err(BeneathError::Refused { path: path() });
        }
        let mut bytes = Vec::new();
        file.into_std()
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|source| BeneathError::Io { path: path(), source })?;
        if bytes.len() as u64 > limit {
            return Err(BeneathError::TooLarge { path: path(), limit });
        }
        Ok(bytes)
    }

    /// Makes `name` (one component, in the root itself) a regular file
    /// holding `bytes`, whatever was there (a file or a link, which is
    /// replaced, never followed; a directory is an error). The file is
    /// written under a fresh name and renamed over `name`, so the switch is
    /// atomic.
    pub fn replace_file(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        if !is_one_component(name) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a plain file name")));
        }
        let temp = format!(".{name}.braid-new");
        match self.dir.remove_file_or_symlink(&temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = self.dir.open_with(&temp, &new_file_options(mode))?;
        let written = file.write_all(bytes).and_then(|()| file.flush());
        let renamed = written.and_then(|()| self.dir.rename(&temp, &self.dir, name));
        if renamed.is_err() {
            let _ = self.dir.remove_file_or_symlink(&temp);
        }
        renamed
    }
}

/// Options that create a file that did not exist (`O_EXCL`), never
/// following a link (`O_NOFOLLOW`), with `mode`.
fn new_file_options(mode: u32) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true).mode(mode).follow(cap_fs_ext::FollowSymlinks::No);
    options
}

/// Creates `path`, which must not exist yet, holding `bytes` with `mode`:
/// `O_CREAT | O_EXCL | O_NOFOLLOW`, so a link or file already there is an
/// error, never written through. For the agent's own files.
pub fn create_new_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = create_new(path, mode)?;
    file.write_all(bytes)?;
    file.flush()
}

/// Opens `path` for writing as `create_new_file` does.
pub fn create_new(path: &Path, mode: u32) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// What an error resolving a path under a root means.
pub fn classify(e: &io::Error) -> Resolution {
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        return Resolution::Loops;
    }
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Resolution::Dangling,
        // cap-std reports an escape as a permission error of its own; any
        // other failure to resolve is treated as one too.
        _ => Resolution::Outside,
    }
}

fn is_one_component(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none()
}

/// `path` with `.` removed and `..` applied lexically; `None` if it is
/// absolute or climbs above its start.
pub fn lexically_inside(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::symlink;

    /// `outer/{canary, job/}`: the root is `job`, the canary sits beside it.
    fn setup() -> (tempfile::TempDir, Root) {
        let outer = tempfile::tempdir().unwrap();
        std::fs::write(outer.path().join("canary"), "FROM scratch\n").unwrap();
        std::fs::create_dir(outer.path().join("job")).unwrap();
        let root = Root::open(&outer.path().join("job")).unwrap();
        (outer, root)
    }

    #[test]
    fn links_lead_anywhere_inside_and_never_out() {
        let (outer, root) = setup();
        let job = outer.path().join("job");
        std::fs::create_dir(job.join("sub")).unwrap();
        std::fs::write(job.join("sub/file"), "inside").unwrap();
        symlink("sub/file", job.join("to-file")).unwrap();
        symlink("sub", job.join("to-dir")).unwrap();
        symlink("../to-file", job.join("sub/back")).unwrap();
        // The chain of the report: each link lexically inside.
        symlink(".", job.join("l0")).unwrap();
        for i in 1..7 {
            symlink(format!("l{}/..", i - 1), job.join(format!("l{i}"))).unwrap();
        }
        symlink("/", job.join("abs")).unwrap();
        symlink("../canary", job.join("up")).unwrap();
        symlink("loop2", job.join("loop1")).unwrap();
        symlink("loop1", job.join("loop2")).unwrap();

        assert_eq!(root.read_file("to-file", 100).unwrap(), b"inside");
        assert_eq!(root.read_file("to-dir/back", 100).unwrap(), b"inside");
        assert_eq!(root.resolve(Path::new("l0")), Resolution::Inside);
        for path in ["l1", "l6", "l6/canary", "abs", "abs/etc/passwd", "up", "../canary", "sub/../../canary"] {
            assert_eq!(root.resolve(Path::new(path)), Resolution::Outside, "{path}");
            let err = root.read_file(path, 100).unwrap_err();
            assert!(matches!(err, BeneathError::Refused { .. }), "{path}: {err}");
        }
        // Whether the host file exists makes no difference.
        let missing = root.read_file("l6/no-such-file", 100).unwrap_err();
        assert!(matches!(missing, BeneathError::Refused { .. }), "{missing}");
        assert!(matches!(root.read_file("nothing", 100), Err(BeneathError::NotFound { .. })));
        assert!(matches!(root.read_file("sub", 100), Err(BeneathError::Refused { .. })), "a directory");
        assert!(matches!(root.read_file("to-file", 3), Err(BeneathError::TooLarge { .. })));
        assert_eq!(root.resolve(Path::new("loop1")), Resolution::Loops);
    }

    #[test]
    fn replacing_a_link_never_writes_through_it() {
        let (outer, root) = setup();
        let job = outer.path().join("job");
        symlink("../canary", job.join(".dockerignore")).unwrap();
        symlink("../made-outside", job.join("dangling")).unwrap();
        root.replace_file(".dockerignore", b"rules\n", 0o644).unwrap();
        root.replace_file("dangling", b"x", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(outer.path().join("canary")).unwrap(), "FROM scratch\n");
        assert!(!outer.path().join("made-outside").exists());
        assert_eq!(std::fs::read_to_string(job.join(".dockerignore")).unwrap(), "rules\n");
        assert!(std::fs::symlink_metadata(job.join(".dockerignore")).unwrap().is_file());
        std::fs::create_dir(job.join("d")).unwrap();
        assert!(root.replace_file("d", b"x", 0o644).is_err(), "a directory is not replaced");
        assert!(root.replace_file("a/b", b"x", 0o644).is_err(), "one component only");
        assert!(root.replace_file("..", b"x", 0o644).is_err());
    }

    #[test]
    fn a_new_file_never_follows_a_link() {
        let (outer, _root) = setup();
        let link = outer.path().join("job/auth.json");
        symlink("../canary", &link).unwrap();
        assert!(create_new_file(&link, b"secret", 0o600).is_err());
        assert_eq!(std::fs::read_to_string(outer.path().join("canary")).unwrap(), "FROM scratch\n");
        let fresh = outer.path().join("job/fresh");
        create_new_file(&fresh, b"x", 0o600).unwrap();
        assert!(create_new_file(&fresh, b"y", 0o600).is_err(), "exclusive");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Random trees of links and random paths: whatever resolves, it
        /// is never the canary beside the root.
        #[test]
        fn random_links_never_reach_outside(
            links in proptest::collection::vec(("[a-c]{1,2}", "(\\.\\./|/|[a-c]/|\\./|[a-c]{1,2}/){0,5}[a-c.]{0,2}"), 1..10),
            dirs in proptest::collection::vec("[a-c]{1,2}", 0..4),
            paths in proptest::collection::vec("(\\.\\./|[a-c]{1,2}/|\\./){0,6}(canary|[a-c]{1,2})?", 1..8),
        ) {
            let (outer, root) = setup();
            let job = outer.path().join("job");
            for d in &dirs {
                let _ = std::fs::create_dir(job.join(d));
                let _ = std::fs::write(job.join(d).join("canary"), "inside");
            }
            for (name, target) in &links {
                let _ = symlink(target, job.join(name));
            }
            let canary = outer.path().join("canary");
            let before = std::fs::metadata(&canary).unwrap().modified().unwrap();
            for path in &paths {
                if let Ok(bytes) = root.read_file(path, 1 << 10) {
                    proptest::prop_assert_ne!(bytes, b"FROM scratch\n".to_vec(), "{} read the canary", path);
                }
                if let Some(name) = path.rsplit('/').next().filter(|n| is_one_component(n)) {
                    let _ = root.replace_file(name, b"new", 0o644);
                }
            }
            proptest::prop_assert_eq!(std::fs::read_to_string(&canary).unwrap(), "FROM scratch\n");
            proptest::prop_assert_eq!(std::fs::metadata(&canary).unwrap().modified().unwrap(), before);
            let names: Vec<_> = std::fs::read_dir(outer.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            proptest::prop_assert_eq!(names.len(), 2, "{:?}", names);
        }
    }
}
