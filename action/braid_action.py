#!/usr/bin/env python3
"""braid's GitHub Action: docker/build-push-action's inputs, built on a braid farm.

Every input comes as an INPUT_<NAME> environment variable, upper case with the
dashes kept (INPUT_BUILD-ARGS), as GitHub passes them; action.yml sets them
explicitly (a composite action's steps get none). Lists are parsed as
build-push-action parses them (@docker/actions-toolkit's Util.getInputList):
CSV records with relaxed quotes, one item per line, and a single-column
line split on commas unless the input takes whole lines (build-args, labels,
...). The script installs the braid CLI (or uses the one on PATH), runs
`braid build`, forwards SIGINT and SIGTERM to it (either cancels the build
on the farm), and writes $GITHUB_OUTPUT and $GITHUB_STEP_SUMMARY, so it also
runs outside GitHub. Secret values never reach argv or the log: they are
masked, written to 0600 files, or passed in braid's environment.

Standard library only: it runs with the python3 of GitHub's runners.
"""

import csv
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import uuid

RELEASES_URL = "https://github.com/braid-build/braid/releases"

# Release targets by the runner's architecture (RUNNER_ARCH, or uname -m).
TARGETS = {
    "X64": "x86_64-unknown-linux-musl",
    "x86_64": "x86_64-unknown-linux-musl",
    "ARM64": "aarch64-unknown-linux-musl",
    "aarch64": "aarch64-unknown-linux-musl",
    "ARM": "armv7-unknown-linux-musleabihf",
    "armv7l": "armv7-unknown-linux-musleabihf",
}

# build-push-action's inputs: how each is read and the `braid build` flag it
# becomes. kind: "list" (comma- and newline-separated), "lines" (one item per
# line or CSV record: ignoreComma), "raw" (outputs: no CSV quoting), "value",
# "bool". "refused" inputs fail the step when set.
FLAGS = {
    "add-hosts": ("list", "--add-host"),
    "allow": ("list", None),
    "annotations": ("lines", "--annotation"),
    "attests": ("lines", "--attest"),
    "build-args": ("lines", "--build-arg"),
    "build-contexts": ("lines", "--build-context"),
    "builder": ("value", "refused"),
    "cache-from": ("lines", "--cache-from"),
    "cache-to": ("lines", "--cache-to"),
    "call": ("value", None),
    "cgroup-parent": ("value", "refused"),
    "context": ("value", None),
    "file": ("value", "--file"),
    "github-token": ("value", None),
    "labels": ("lines", "--label"),
    "load": ("bool", "--load"),
    "network": ("value", "--network"),
    "no-cache": ("bool", "--no-cache"),
    "no-cache-filters": ("list", "--no-cache-filter"),
    "outputs": ("raw", "--output"),
    "platforms": ("list", "--platform"),
    "provenance": ("value", "--provenance"),
    "pull": ("bool", "--pull"),
    "push": ("bool", "--push"),
    "sbom": ("value", "--sbom"),
    "secret-envs": ("list", "--secret"),
    "secret-files": ("lines", "--secret"),
    "secrets": ("lines", "--secret"),
    "shm-size": ("value", "--shm-size"),
    "ssh": ("list", "--ssh"),
    "tags": ("list", "--tag"),
    "target": ("value", "--target"),
    "ulimit": ("lines", "--ulimit"),
}

# braid's own inputs.
BRAID_INPUTS = {
    "coordinator": "BRAID_COORDINATOR",
    "token": "BRAID_TOKEN",
    "ca": "BRAID_CA",
    "allow-emulation": "--allow-emulation",
    "timeout": "--timeout",
    "version": None,
    "releases-url": None,
    "dashboard-url": None,
}


class Refused(Exception):
    """An input the action cannot honour: the step fails naming it."""

    def __init__(self, name, why):
        super().__init__(f'input "{name}": {why}')
        self.name = name


def get_input(name):
    """core.getInput: the variable GitHub sets, trimmed."""
    return os.environ.get("INPUT_" + name.replace(" ", "_").upper(), "").strip()


def get_bool(name):
    """core.getBooleanInput: YAML 1.2 core schema booleans only."""
    value = get_input(name)
    if value in ("true", "True", "TRUE"):
        return True
    if value in ("false", "False", "FALSE", ""):
        return False
    raise Refused(name, f"{value!r} is not a boolean (true | True | TRUE | false | False | FALSE)")


def parse_list(text, ignore_comma=False, quote=True):
    """Util.getList: CSV records (relaxed quotes, empty lines skipped); a
    one-column record is split on commas unless ignore_comma; items empty
    before trimming are dropped, the rest trimmed."""
    if text == "":
        return []
    quoting = csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE
    items = []
    for record in csv.reader(io.StringIO(text), quoting=quoting, strict=False):
        if not record:
            continue
        if len(record) == 1:
            items.extend([record[0]] if ignore_comma else record[0].split(","))
        elif ignore_comma:
            items.append(",".join(record))
        else:
            items.extend(record)
    return [item.strip() for item in items if item]


def get_list(name):
    kind = FLAGS[name][0]
    return parse_list(get_input(name), ignore_comma=kind in ("lines", "raw"), quote=kind != "raw")


def command(name, value):
    """A workflow command; values escaped as @actions/core escapes them."""
    value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    print(f"::{name}::{value}", flush=True)


def mask(value):
    for line in value.splitlines():
        if line.strip():
            command("add-mask", line)


def split_kv(name, entry, index):
    """KEY=VALUE, refused naming the entry's position or key, never its value."""
    key, sep, value = entry.partition("=")
    if not sep or not key.strip() or not value:
        shown = f"key {key.strip()!r}" if sep and key.strip() else f"entry {index + 1}"
        raise Refused(name, f"{shown} is not KEY=VALUE")
    return key.strip(), value


class Plan:
    """What the inputs make: braid's argv, its environment, temp files."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.args = ["build", "--progress", "plain"]
        self.env = {}
        self.context = "."
        self.notes = []

    def flag(self, flag, value=None):
        self.args += [flag] if value is None else [flag, value]

    def private_file(self, name, data):
        path = os.path.join(self.tmp, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return path


def plan_build(tmp):
    plan = Plan(tmp)
    for name in ("tags", "labels", "build-args", "annotations", "attests", "add-hosts", "ulimit",
                 "cache-from", "cache-to", "outputs", "ssh", "build-contexts", "no-cache-filters"):
        for item in get_list(name):
            plan.flag(FLAGS[name][1], item)
    platforms = get_list("platforms")
    if platforms:
        plan.flag("--platform", ",".join(platforms))
    for name in ("target", "network", "shm-size"):
        if get_input(name):
            plan.flag(FLAGS[name][1], get_input(name))
    for name in ("provenance", "sbom"):
        if get_input(name):
            plan.args.append(f"{FLAGS[name][1]}={get_input(name)}")
    for name in ("push", "load", "no-cache", "pull"):
        if get_bool(name):
            plan.flag(FLAGS[name][1])
    if get_bool("allow-emulation"):
        plan.flag("--allow-emulation")
    if get_input("timeout"):
        plan.flag("--timeout", get_input("timeout"))
    plan_refusals(plan)
    plan_secrets(plan)
    plan_connection(plan)
    plan_context(plan)
    return plan


def plan_refusals(plan):
    if get_input("builder"):
        raise Refused("builder", "braid builds on the farm the coordinator input names; there is no buildx builder")
    if get_input("cgroup-parent"):
        raise Refused("cgroup-parent", "braid's agents place RUN steps in their own cgroups")
    if get_input("call") not in ("", "build"):
        raise Refused("call", f"{get_input('call')!r}: braid only builds (call: build)")
    for entitlement in get_list("allow"):
        if entitlement != "network.host":
            raise Refused("allow", f"{entitlement!r}: braid grants no entitlement but network.host")
        plan.notes.append("allow: network.host is decided by the agents (allow_network_host)")


def plan_secrets(plan):
    """secrets: inline values to 0600 files; secret-files: paths;
    secret-envs: variable names. braid reads each, never from argv."""
    for i, entry in enumerate(get_list("secrets")):
        key, value = split_kv("secrets", entry, i)
        mask(value)
        path = plan.private_file(f"secret-{i}", value)
        plan.flag("--secret", f"id={key},src={path}")
    for i, entry in enumerate(get_list("secret-files")):
        key, path = split_kv("secret-files", entry, i)
        if not os.path.isfile(path):
            raise Refused("secret-files", f"{key}: no file {path!r}")
        plan.flag("--secret", f"id={key},src={path}")
    for i, entry in enumerate(get_list("secret-envs")):
        key, var = split_kv("secret-envs", entry, i)
        plan.flag("--secret", f"id={key},env={var}")


def plan_connection(plan):
    if get_input("coordinator"):
        plan.env["BRAID_COORDINATOR"] = get_input("coordinator")
    token = get_input("token")
    if token:
        mask(token)
        plan.env["BRAID_TOKEN"] = token
    ca = get_input("ca")
    if "-----BEGIN" in ca:
        plan.env["BRAID_CA"] = plan.private_file("ca.pem", ca + "\n")
    elif ca:
        if not os.path.isfile(ca):
            raise Refused("ca", f"neither PEM text nor a file: no file {ca!r}")
        plan.env["BRAID_CA"] = ca


def plan_context(plan):
    """context: a path or URL as given; empty, as build-push-action's Git
    context, the workflow's commit (fetched here, with github-token, when
    the workflow runs on GitHub; the working directory otherwise)."""
    context, file = get_input("context"), get_input("file")
    if not context and os.environ.get("GITHUB_REPOSITORY") and os.environ.get("GITHUB_SHA"):
        context = fetch_commit(plan.tmp)
        if file and not os.path.isabs(file):
            file = os.path.join(context, file)
    if file:
        plan.flag("--file", file)
    plan.context = context or "."


def fetch_commit(tmp):
    server = os.environ.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
    url = f"{server}/{os.environ['GITHUB_REPOSITORY']}.git"
    sha = os.environ["GITHUB_SHA"]
    env = dict(os.environ)
    token = get_input("github-token")
    if token and server.startswith("https://"):
        import base64

        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        mask(token)
        mask(basic)
        # Through git's environment, not argv (visible in ps).
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"http.{server}/.extraheader",
                   GIT_CONFIG_VALUE_0=f"AUTHORIZATION: basic {basic}")
    where = os.path.join(tmp, "context")
    for args in (["init", "-q", where], ["-C", where, "remote", "add", "origin", url],
                 ["-C", where, "fetch", "-q", "--depth", "1", "--no-tags", "origin", sha],
                 ["-C", where, "checkout", "-q", "FETCH_HEAD"]):
        done = subprocess.run(["git", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise Refused("context", f"fetching {url} at {sha} (empty context: the workflow's commit): "
                          f"{done.stderr.strip()}")
    print(f"context: {url} at {sha}", flush=True)
    return where


# ---------------------------------------------------------------- the CLI

def install(version, tmp):
    """The braid binary: from PATH for `version: path`, else the release
    asset for this runner, checked against its .sha256 and kept in the tool
    cache."""
    if version == "path":
        found = shutil.which("braid")
        if not found:
            raise Refused("version", "path: no braid on PATH (install it, or give a release version)")
        return found
    arch = os.environ.get("RUNNER_ARCH") or platform.machine()
    system = os.environ.get("RUNNER_OS") or platform.system()
    target = TARGETS.get(arch)
    if system != "Linux" or target is None:
        raise Refused("version", f"no braid release asset for {system}/{arch}: releases are for x86_64, "
                      "aarch64 and armv7 Linux; install braid on the runner and set version: path")
    base = (get_input("releases-url") or os.environ.get("BRAID_RELEASES_URL") or RELEASES_URL).rstrip("/")
    if version in ("", "latest"):
        version = latest_version(base)
    version = version.removeprefix("v")
    cache = os.environ.get("RUNNER_TOOL_CACHE") or os.path.join(tempfile.gettempdir(), "braid-tool-cache")
    where = os.path.join(cache, "braid", version, arch)
    binary = os.path.join(where, "braid")
    if os.path.exists(where + ".complete") and os.access(binary, os.X_OK):
        print(f"braid {version} from the tool cache ({where})", flush=True)
        return binary
    asset = f"braid-{version}-{target}.tar.gz"
    url = f"{base}/download/v{version}/{asset}"
    data = download("version", url)
    listed = download("version", url + ".sha256").decode(errors="replace").split()
    digest = hashlib.sha256(data).hexdigest()
    if not listed or listed[0].lower() != digest:
        raise Refused("version", f"{asset}: sha256 {digest} does not match {url}.sha256 "
                      f"({listed[0] if listed else 'empty'}); not installed")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and os.path.basename(m.name) == "braid"), None)
        if member is None:
            raise Refused("version", f"{asset} holds no braid binary")
        content = tar.extractfile(member).read()
    os.makedirs(where, exist_ok=True)
    with open(binary + ".part", "wb") as f:
        f.write(content)
    os.chmod(binary + ".part", 0o755)
    os.replace(binary + ".part", binary)
    open(where + ".complete", "w").close()
    print(f"braid {version} installed from {url} (sha256 {digest})", flush=True)
    return binary


def download(name, url):
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise Refused(name, f"downloading {url}: HTTP {e.code} (no such release asset?)") from None
    except (urllib.error.URLError, OSError) as e:
        raise Refused(name, f"downloading {url}: {e}") from None


def latest_version(base):
    """The newest release: GitHub redirects releases/latest to its tag."""
    try:
        with urllib.request.urlopen(f"{base}/latest", timeout=60) as response:
            final = response.geturl()
    except (urllib.error.URLError, OSError) as e:
        raise Refused("version", f"finding the latest release at {base}/latest: {e}") from None
    tag = final.rstrip("/").rsplit("/", 1)[-1]
    if not tag.startswith("v"):
        raise Refused("version", f"{base}/latest led to {final}, not a release tag; set version")
    return tag


def run_braid(binary, plan):
    """Runs braid, forwarding SIGINT and SIGTERM (either cancels the farm
    build); returns its exit code and the end of its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INPUT_")}
    env.update(plan.env)
    argv = [binary, *plan.args, plan.context]
    print("braid " + " ".join(plan.args + [plan.context]), flush=True)
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)

    def forward(signum, _frame):
        proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    tail = []
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        sys.stderr.flush()
        tail = (tail + [line.rstrip("\n")])[-50:]
    code = proc.wait()
    return (128 - code if code < 0 else code), tail


def is_set(name):
    kind = FLAGS[name][0] if name in FLAGS else "value"
    return get_bool(name) if kind == "bool" or name == "allow-emulation" else bool(get_input(name))


def explain_refusal(tail):
    """braid refused before submitting: name the input behind the flag."""
    errors = [line for line in tail if line.startswith("error:")] or tail[-1:]
    message = errors[-1].removeprefix("error: ") if errors else "braid build failed"
    flags = {}
    for name, (_, flag) in FLAGS.items():
        if flag and flag.startswith("--"):
            flags.setdefault(flag, []).append(name)
    flags["--allow-emulation"], flags["--timeout"] = ["allow-emulation"], ["timeout"]
    named = []
    for flag, names in flags.items():
        if flag in message:
            named += [n for n in names if n not in named and is_set(n)]
    if "context" in message and not named:
        named.append("context")
    prefix = " and ".join(f'input "{n}"' for n in named)
    command("error title=braid", f"{prefix}: {message}" if prefix else message)


# ---------------------------------------------------------------- results

def set_output(name, value):
    path = os.environ.get("GITHUB_OUTPUT")
    if not path:
        print(f"output {name}: {value}")
        return
    delimiter = f"ghadelimiter_{uuid.uuid4()}"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def summarize(meta, code):
    build_id = meta.get("braid.build.id", "")
    platforms = meta.get("braid.platforms", {})
    digest = meta.get("containerimage.digest", "")
    word = "succeeded" if code == 0 else "failed"
    lines = [f"### braid build `{build_id}` {word}", "",
             "| Platform | Agent | Built | Seconds | Digest |", "| --- | --- | --- | --- | --- |"]
    for name, p in sorted(platforms.items()):
        how = "emulated" if p.get("emulated") else "native"
        shown = f"`{p['digest']}`" if p.get("digest") else "-"
        lines.append(f"| {name} | {p.get('agent') or '-'} | {how} | {p.get('seconds', 0):.1f} | {shown} |")
    if digest:
        lines.append(f"| index | | | | `{digest}` |")
    if meta.get("image.name"):
        lines += ["", "Tags: " + ", ".join(f"`{t}`" for t in meta["image.name"].split(","))]
    dashboard = get_input("dashboard-url").rstrip("/")
    if dashboard and build_id:
        lines += ["", f"[Build {build_id} on the dashboard]({dashboard}/builds/{build_id})"]
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def report(tmp, code):
    """The outputs and the summary, from braid's metadata file."""
    try:
        with open(os.path.join(tmp, "metadata.json"), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    meta = json.loads(text)
    try:
        with open(os.path.join(tmp, "iid"), encoding="utf-8") as f:
            imageid = f.read().strip()
    except FileNotFoundError:
        imageid = ""
    set_output("build-id", meta.get("braid.build.id", ""))
    set_output("digest", meta.get("containerimage.digest", ""))
    set_output("imageid", imageid)
    set_output("metadata", text)
    set_output("platforms", json.dumps(meta.get("braid.platforms", {}), sort_keys=True))
    summarize(meta, code)
    return True


def main():
    tmp = tempfile.mkdtemp(prefix="braid-action-", dir=os.environ.get("RUNNER_TEMP") or None)
    try:
        plan = plan_build(tmp)
        plan.flag("--metadata-file", os.path.join(tmp, "metadata.json"))
        plan.flag("--iidfile", os.path.join(tmp, "iid"))
        for note in plan.notes:
            command("notice title=braid", note)
        if os.environ.get("BRAID_ACTION_DRY_RUN") == "1":
            print(json.dumps({"args": plan.args, "context": plan.context, "env": sorted(plan.env)}))
            return 0
        binary = install(get_input("version"), tmp)
        code, tail = run_braid(binary, plan)
        if not report(tmp, code) and code != 0:
            explain_refusal(tail)
        return code
    except Refused as e:
        command("error title=braid", str(e))
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
