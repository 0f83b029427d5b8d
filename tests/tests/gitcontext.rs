//! Every context form buildx takes, through the real binaries on one farm
//! (one buildah agent, linux/amd64): a git repository served on loopback by
//! a real `git daemon` and by `git http-backend` behind a small HTTP server
//! that asks for a password, at a branch, a tag, a commit and a
//! subdirectory (with its own Dockerfile and .dockerignore); an http
//! tarball; a Dockerfile URL; a Dockerfile on stdin; git and http
//! `--build-context` values. The index carries the source and revision
//! annotations, and the password is nowhere: not in the output, the events
//! or the stored build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use braid_tests::{AgentSpec, Farm, Proc, Registry, eventually, free_port, require, require_environment};

const PASSWORD: &str = "s3cretpass";

/// `git http-backend` as CGI behind Python's HTTP server, Basic auth on
/// /git/ (user:PASSWORD), plain files under /files/.
const HTTP_SERVER: &str = r#"
import base64, http.server, os, subprocess, sys
root, files, port, user, pw = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
want = 'Basic ' + base64.b64encode(f'{user}:{pw}'.encode()).decode()

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write(self.requestline + '\n')
        sys.stderr.flush()

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def serve(self):
        path, _, query = self.path.partition('?')
        if path.startswith('/files/'):
            name = os.path.join(files, os.path.basename(path))
            if not os.path.isfile(name):
                return self.reply(404, [], b'not found')
            with open(name, 'rb') as f:
                return self.reply(200, [('Content-Type', 'application/octet-stream')], f.read())
        if not path.startswith('/git/'):
            return self.reply(404, [], b'not found')
        if self.headers.get('Authorization') != want:
            return self.reply(401, [('WWW-Authenticate', 'Basic realm="git"')], b'')
        length = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(length) if length else b''
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL='1', PATH_INFO=path[len('/git'):],
                   QUERY_STRING=query, REQUEST_METHOD=self.command, REMOTE_USER=user, REMOTE_ADDR='127.0.0.1',
                   CONTENT_TYPE=self.headers.get('Content-Type', ''), CONTENT_LENGTH=str(len(body)))
        for h in ('Content-Encoding', 'Git-Protocol'):
            if self.headers.get(h):
                env['HTTP_' + h.upper().replace('-', '_')] = self.headers.get(h)
        out = subprocess.run(['git', 'http-backend'], input=body, env=env, capture_output=True, timeout=60).stdout
        sep = b'\r\n\r\n' if b'\r\n\r\n' in out else b'\n\n'
        head, _, rest = out.partition(sep)
        status, headers = 200, []
        for line in head.decode().splitlines():
            k, _, v = line.partition(':')
            if k.lower() == 'status':
                status = int(v.strip().split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.reply(status, headers, rest)

http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler).serve_forever()
"#;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=braid", "-c", "user.email=braid@example.invalid", "-c", "init.defaultBranch=main"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn write(root: &Path, path: &str, contents: &str) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, contents).unwrap();
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The test repository: `main` with three commits (the last adds `app/`,
/// a subdirectory with its own Dockerfile and .dockerignore), an annotated
/// tag `v2` on the second, a branch `feature` past main. Returns the
/// commits (first, v2, main, feature), served bare from `serve/repo.git`.
fn make_repo(dir: &Path) -> [String; 4] {
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    write(&work, "Dockerfile", "FROM scratch\nCOPY . /ctx/\n");
    write(&work, "version.txt", "one\n");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "one"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    write(&work, "version.txt", "two\n");
    git(&work, &["commit", "-qam", "two"]);
    let v2 = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["tag", "-a", "v2", "-m", "release two"]);
    write(&work, "version.txt", "three\n");
    write(&work, "app/Dockerfile", "FROM scratch\nCOPY . /app/\n");
    write(&work, "app/alt.Dockerfile", "FROM scratch\nCOPY . /alt/\n");
    write(&work, "app/.dockerignore", "ignored.txt\n");
    write(&work, "app/kept.txt", "kept\n");
    write(&work, "app/ignored.txt", "ignored\n");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "three"]);
    let main = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["checkout", "-qb", "feature"]);
    write(&work, "version.txt", "feature\n");
    git(&work, &["commit", "-qam", "feature"]);
    let feature = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["checkout", "-q", "main"]);
    std::fs::create_dir_all(dir.join("serve")).unwrap();
    git(dir, &["clone", "-q", "--bare", work.to_str().unwrap(), dir.join("serve/repo.git").to_str().unwrap()]);
    [first, v2, main, feature]
}

fn listening(port: u16) -> Option<()> {
    std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
}

struct Case<'a> {
    farm: &'a Farm,
    registry: &'a Registry,
    scratch: &'a Path,
}

impl Case<'_> {
    /// `braid build --push -t REG/git/NAME:1 ARGS...` (one platform); its output.
    fn build(&self, name: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let tag = format!("{}/git/{name}:1", self.registry.addr);
        let mut all = vec!["build", "--platform", "linux/amd64", "--push", "--progress", "plain", "-t", &tag];
        all.extend_from_slice(args);
        let out = match stdin {
            Some(s) => self.farm.braid_with_stdin(&all, s.as_bytes().to_vec()).unwrap(),
            None => self.farm.braid(&all).unwrap(),
        };
        assert!(!text(&out).contains(PASSWORD), "{name}: the password was printed:\n{}", text(&out));
        out
    }

    fn built(&self, name: &str, args: &[&str], stdin: Option<&str>) -> (serde_json::Value, String) {
        let out = self.build(name, args, stdin);
        assert!(out.status.success(), "{name}: {}", text(&out));
        let index = self.registry.manifest(&format!("git/{name}:1")).expect("index pushed");
        (index, text(&out))
    }

    fn file(&self, name: &str, index: &serde_json::Value, path: &str) -> String {
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        self.registry.read_file(&format!("git/{name}"), digest, path, self.scratch).unwrap().trim().to_owned()
    }

    fn files(&self, name: &str, index: &serde_json::Value) -> Vec<String> {
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        self.registry.list_files(&format!("git/{name}"), digest, self.scratch).unwrap()
    }
}

fn annotation(index: &serde_json::Value, key: &str) -> String {
    index["annotations"][key].as_str().unwrap_or_default().to_owned()
}

#[test]
fn git_http_and_stdin_contexts_build_like_buildx() {
    require_environment();
    require("git", "apt-get install git");
    require("python3", "apt-get install python3");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let [first, v2, main, feature] = make_repo(dir);
    let serve = dir.join("serve");

    let daemon_port = free_port();
    let _daemon = Proc::spawn(
        "git-daemon",
        Command::new("git").args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--informative-errors",
            "--listen=127.0.0.1",
            &format!("--port={daemon_port}"),
            &format!("--base-path={}", serve.display()),
            serve.to_str().unwrap(),
        ]),
        &dir.join("git-daemon.log"),
    )
    .unwrap();
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(dir.join("serve_git.py"), HTTP_SERVER).unwrap();
    let http_port = free_port();
    let _http = Proc::spawn(
        "http",
        Command::new("python3").arg(dir.join("serve_git.py")).args([
            serve.to_str().unwrap(),
            files.to_str().unwrap(),
            &http_port.to_string(),
            "braid",
            PASSWORD,
        ]),
        &dir.join("http.log"),
    )
    .unwrap();
    eventually(Duration::from_secs(20), "git daemon and the HTTP server", || {
        listening(daemon_port).and(listening(http_port))
    })
    .unwrap();

    let registry = Registry::start(&dir.join("registry")).unwrap();
    let farm = Farm::start(dir, &registry, &[AgentSpec::new("amd64-agent", &[])]).unwrap();
    farm.wait_for_agents(1).unwrap();
    let scratch = dir.join("scratch");
    let case = Case { farm: &farm, registry: &registry, scratch: &scratch };
    let daemon = format!("git://127.0.0.1:{daemon_port}/repo.git");
    let http_git = format!("http://127.0.0.1:{http_port}/git/repo.git");
    let with_password = format!("http://braid:{PASSWORD}@127.0.0.1:{http_port}/git/repo.git");

    // --- A branch, over git://: its files, and the index says where they came from.
    let (index, out) = case.built("branch", &[&format!("{daemon}#feature")], None);
    assert_eq!(case.file("branch", &index, "ctx/version.txt"), "feature");
    assert_eq!(annotation(&index, "org.opencontainers.image.source"), daemon);
    assert_eq!(annotation(&index, "org.opencontainers.image.revision"), feature);
    assert!(out.contains(&feature), "{out}");

    // --- The same commit again: content-addressed, nothing uploaded.
    let (_, out) = case.built("branch-again", &[&format!("{daemon}#feature")], None);
    assert!(out.contains("nothing uploaded"), "{out}");

    // --- An annotated tag, in BuildKit's query form; an explicit annotation wins over the default.
    let (index, _) = case.built(
        "tag",
        &["--annotation", "index:org.opencontainers.image.source=mine", &format!("{daemon}?tag=v2")],
        None,
    );
    assert_eq!(case.file("tag", &index, "ctx/version.txt"), "two");
    assert_eq!(annotation(&index, "org.opencontainers.image.revision"), v2);
    assert_eq!(annotation(&index, "org.opencontainers.image.source"), "mine");

    // --- An older commit by a short id (no server sends that alone: a full fetch, then the commit).
    let (index, _) = case.built("commit", &[&format!("{daemon}#{}", &first[..10])], None);
    assert_eq!(case.file("commit", &index, "ctx/version.txt"), "one");
    assert_eq!(annotation(&index, "org.opencontainers.image.revision"), first);

    // --- By full id in the query form, over http, keeping the .git directory.
    let (index, _) = case.built("keep-git-dir", &[&format!("{with_password}?commit={first}&keep-git-dir=true")], None);
    let listed = case.files("keep-git-dir", &index);
    assert!(
        listed.contains(&"ctx/.git/HEAD".to_owned()) && listed.contains(&"ctx/version.txt".to_owned()),
        "{listed:?}"
    );
    let config = case.file("keep-git-dir", &index, "ctx/.git/config");
    assert!(config.contains(&http_git) && !config.contains(PASSWORD), "{config}");

    // --- Over http with a password in the URL: a subdirectory is the context, its
    // .dockerignore applies and -f is relative to it. The password reaches git only.
    let (index, out) = case.built("subdir", &["-f", "alt.Dockerfile", &format!("{with_password}#main:app")], None);
    let listed = case.files("subdir", &index);
    assert!(listed.contains(&"alt/kept.txt".to_owned()), "{listed:?}");
    assert!(!listed.iter().any(|f| f.contains("ignored.txt")), "{listed:?}");
    assert_eq!(annotation(&index, "org.opencontainers.image.source"), http_git);
    assert_eq!(annotation(&index, "org.opencontainers.image.revision"), main);
    let build_id = out
        .lines()
        .find_map(|l| l.strip_prefix("#2 build ")?.strip_suffix(" submitted"))
        .expect("a build id")
        .to_owned();
    for what in [vec!["logs", build_id.as_str()], vec!["inspect", "--format", "json", build_id.as_str()]] {
        let out = farm.braid(&what).unwrap();
        assert!(out.status.success(), "{what:?}: {}", text(&out));
        assert!(!text(&out).contains(PASSWORD), "{what:?} shows the password: {}", text(&out));
    }
    for log in ["coordinator", "amd64-agent", "git-daemon", "http"] {
        assert!(!farm.log(log).contains(PASSWORD), "{log} logged the password");
    }

    // --- A wrong password fails before anything is submitted, and is not shown either.
    let wrong = format!("http://braid:wrongpass9@127.0.0.1:{http_port}/git/repo.git#main");
    let out = case.build("wrong", &[&wrong], None);
    assert!(!out.status.success());
    assert!(text(&out).contains("git fetch failed") && !text(&out).contains("wrongpass9"), "{}", text(&out));
    // And without any: git's own (absent) credentials, refused by the server.
    let out = case.build("anonymous", &[&format!("{http_git}#main")], None);
    assert!(!out.status.success() && text(&out).contains(&http_git), "{}", text(&out));

    // --- No git on this machine: refused before anything is sent, naming the package.
    let no_git = dir.join("no-git-bin");
    std::fs::create_dir_all(&no_git).unwrap();
    let out = farm
        .braid_env(&["build", "--platform", "linux/amd64", &format!("{daemon}#main")], &[("PATH", &no_git)])
        .unwrap();
    assert!(!out.status.success() && text(&out).contains("install the git package"), "{}", text(&out));

    // --- A gzip tarball over http(s): unpacked as the context.
    let tarball = dir.join("tarball");
    write(&tarball, "Dockerfile", "FROM scratch\nCOPY . /tar/\n");
    write(&tarball, "data/payload.txt", "from a tarball\n");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(files.join("ctx.tar.gz"))
        .arg("-C")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let (index, out) = case.built("tarball", &[&format!("http://127.0.0.1:{http_port}/files/ctx.tar.gz")], None);
    assert_eq!(case.file("tarball", &index, "tar/data/payload.txt"), "from a tarball");
    assert!(out.contains("gzip tarball"), "{out}");

    // --- A URL of a plain Dockerfile: an empty context, and an http --build-context
    // (the downloaded file, named "context", as BuildKit).
    write(&files, "Dockerfile.txt", "FROM scratch\nCOPY --from=web context /web/hello.txt\n");
    write(&files, "hello.txt", "hello over http\n");
    let (index, _) = case.built(
        "dockerfile-url",
        &[
            "--build-context",
            &format!("web=http://127.0.0.1:{http_port}/files/hello.txt"),
            &format!("http://127.0.0.1:{http_port}/files/Dockerfile.txt"),
        ],
        None,
    );
    assert_eq!(case.file("dockerfile-url", &index, "web/hello.txt"), "hello over http");

    // --- `-` with a Dockerfile on stdin, and a git --build-context (with a password).
    let (index, _) = case.built(
        "stdin",
        &["--build-context", &format!("src={with_password}#v2"), "-"],
        Some("FROM scratch\nCOPY --from=src version.txt /named/version.txt\n"),
    );
    assert_eq!(case.file("stdin", &index, "named/version.txt"), "two");
    assert!(index["annotations"].get("org.opencontainers.image.source").is_none(), "{index}");
}
