//! SLSA provenance through the real binaries: a two-platform pushed build
//! (arm64 emulated) gets one attestation manifest per platform, read back
//! with `skopeo inspect --raw`, curl and a small reader here (serde_json on
//! the registry's raw answers, nothing of braid's); `mode=max` and v1; the
//! refusals; no attestations when off or exporting; a signed statement that
//! `braid imagetools verify` accepts, and refuses once tampered with.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use braid_tests::{AgentSpec, Farm, Pki, Registry, bin, dockerfile_context, output_text, require_environment};

const SECRET_VALUE: &str = "prov-secret-value-5be1d2";
const PASSWORD: &str = "prov-registry-P4ss-91ac";
const METADATA_KEY: &str = "https://github.com/braid-build/braid@v1#metadata";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    format!("sha256:{}", text(&out.stdout).split_whitespace().next().unwrap())
}

/// A registry's raw answers, optionally with a login: the test's own reader.
struct Reader<'a> {
    addr: &'a str,
    login: Option<String>,
}

impl Reader<'_> {
    fn raw_manifest(&self, repo: &str, reference: &str) -> Vec<u8> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some(login) = &self.login {
            cmd.args(["--creds", login]);
        }
        let sep = if reference.starts_with("sha256:") { "@" } else { ":" };
        let out = cmd.arg(format!("docker://{}/{repo}{sep}{reference}", self.addr)).output().unwrap();
        assert!(out.status.success(), "skopeo inspect {repo}{sep}{reference}: {}", text(&out.stderr));
        out.stdout
    }

    fn manifest(&self, repo: &str, reference: &str) -> Value {
        serde_json::from_slice(&self.raw_manifest(repo, reference)).unwrap()
    }

    fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let mut cmd = Command::new("curl");
        cmd.arg("-fsSL");
        if let Some(login) = &self.login {
            cmd.args(["-u", login]);
        }
        let out = cmd.arg(format!("http://{}/v2/{repo}/blobs/{digest}", self.addr)).output().unwrap();
        assert!(out.status.success(), "blob {digest}: {}", text(&out.stderr));
        assert_eq!(sha256(&out.stdout), digest, "the registry's blob matches its digest");
        out.stdout
    }

    fn put_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let out = Command::new("curl")
            .args(["-fsS", "-X", "POST", "-D", "-", "-o", "/dev/null"])
            .arg(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .output()
            .unwrap();
        let headers = text(&out.stdout);
        let location = headers
            .lines()
            .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
            .unwrap()
            .trim()
            .to_owned();
        let url = if location.starts_with("http") { location } else { format!("http://{}{location}", self.addr) };
        let sep = if url.contains('?') { '&' } else { '?' };
        self.curl_put(&format!("{url}{sep}digest={digest}"), "application/octet-stream", bytes);
        digest
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> String {
        self.curl_put(&format!("http://{}/v2/{repo}/manifests/{reference}", self.addr), media_type, bytes);
        sha256(bytes)
    }

    fn curl_put(&self, url: &str, content_type: &str, bytes: &[u8]) {
        let mut child = Command::new("curl")
            .args(["-fsS", "-X", "PUT", "-H", &format!("Content-Type: {content_type}"), "--data-binary", "@-", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "PUT {url}: {}", output_text(&out));
    }
}

/// One platform's attestation as the index and the registry hold it.
struct Found {
    platform: String,
    digest: String,
    attestation: Value,
    manifest: Value,
    statement: Value,
    statement_text: String,
}

fn platform_of(d: &Value) -> String {
    let p = &d["platform"];
    let base = format!("{}/{}", p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap());
    p["variant"].as_str().map_or(base.clone(), |v| format!("{base}/{v}"))
}

fn is_attestation(d: &Value) -> bool {
    d["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
}

/// Reads every platform's attestation and checks the layout BuildKit uses.
fn attestations(reader: &Reader, repo: &str, index: &Value) -> Vec<Found> {
    let all = index["manifests"].as_array().unwrap();
    let platforms: Vec<&Value> = all.iter().filter(|d| !is_attestation(d)).collect();
    let attests: Vec<&Value> = all.iter().filter(|d| is_attestation(d)).collect();
    assert_eq!(platforms.len(), attests.len(), "one attestation manifest per platform: {index}");
    let mut out = Vec::new();
    for p in platforms {
        let digest = p["digest"].as_str().unwrap().to_owned();
        let a = attests
            .iter()
            .find(|a| a["annotations"]["vnd.docker.reference.digest"] == digest.as_str())
            .unwrap_or_else(|| panic!("no attestation refers to {digest}: {index}"));
        assert_eq!(a["platform"], json!({ "architecture": "unknown", "os": "unknown" }), "{a}");
        assert_eq!(a["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        let raw = reader.raw_manifest(repo, a["digest"].as_str().unwrap());
        assert_eq!(sha256(&raw), a["digest"].as_str().unwrap());
        let manifest: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
        let layer = &manifest["layers"][0];
        assert_eq!(layer["mediaType"], "application/vnd.in-toto+json", "{manifest}");
        let statement_bytes = reader.blob(repo, layer["digest"].as_str().unwrap());
        let statement: Value = serde_json::from_slice(&statement_bytes).unwrap();
        assert_eq!(layer["annotations"]["in-toto.io/predicate-type"], statement["predicateType"]);
        out.push(Found {
            platform: platform_of(p),
            digest,
            attestation: (*a).clone(),
            manifest,
            statement,
            statement_text: text(&statement_bytes),
        });
    }
    out.sort_by(|a, b| a.platform.cmp(&b.platform));
    out
}

fn braid_meta(statement: &Value) -> &Value {
    let p = &statement["predicate"];
    if p["metadata"][METADATA_KEY].is_object() {
        &p["metadata"][METADATA_KEY]
    } else {
        &p["runDetails"]["metadata"][METADATA_KEY]
    }
}

#[test]
fn provenance_is_attached_per_platform_signed_and_verified() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let open = Registry::start(&dir.join("open")).unwrap();
    let base = open.push_base_image("base/busybox:latest").unwrap();
    let base_digest = open.digest_of("base/busybox:latest").unwrap();
    let locked = Registry::start_with_auth(&dir.join("locked"), "dev", PASSWORD).unwrap();

    // The cluster CA and the coordinator's provenance key, as an operator makes them.
    let pki = Pki::init(&dir.join("certs"));
    let issue = Command::new(bin("braid"))
        .args(["certs", "issue", "--kind", "provenance", "--name", "farm-provenance", "--dir"])
        .arg(&pki.dir)
        .output()
        .unwrap();
    assert!(issue.status.success(), "{}", output_text(&issue));
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "insecure_registries = [\"{}\", \"{}\"]\nprovenance_key = \"{}\"\nprovenance_cert = \"{}\"\n",
            open.addr,
            locked.addr,
            pki.dir.join("farm-provenance-key.pem").display(),
            pki.dir.join("farm-provenance.pem").display()
        ),
    )
    .unwrap();
    let farm = Farm::start_with(
        &dir.join("farm"),
        None,
        &[AgentSpec::new("agent", &[])],
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(
        dir,
        "ctx",
        &format!(
            "FROM {base} AS build\nARG V\nRUN --mount=type=secret,id=tok cat /run/secrets/tok | wc -c > /len\nFROM build\n"
        ),
    );
    let secret_file = dir.join("tok.txt");
    std::fs::write(&secret_file, SECRET_VALUE).unwrap();
    let secret = format!("id=tok,src={}", secret_file.display());

    // Refused before anything is built, naming the flags.
    let tag = format!("{}/prov/app:1", open.addr);
    for (args, says) in [
        (vec!["--push", "--format", "docker", "--provenance=true"], "--provenance=true with --format docker"),
        (vec!["--push", "--sbom"], "--sbom=true: no SBOM generator on the agents"),
        (vec!["--push", "--attest", "type=sbom,generator=x"], "--attest type=sbom,generator=x: no SBOM generator"),
        (vec!["--push", "--provenance=mode=full"], "mode=\"full\": expected min or max"),
    ] {
        let mut all = vec!["build", "-t", &tag];
        all.extend(args.iter().copied());
        all.push(&ctx);
        let out = farm.braid(&all).unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = text(&out.stderr);
        assert!(err.contains(says) && !err.contains("#1 context"), "{args:?}: {err}");
    }

    // Default (min, v0.2) on a pushed two-platform build, arm64 emulated.
    let metadata = dir.join("meta.json");
    let out = farm
        .braid(&[
            "build",
            "--progress",
            "plain",
            "--platform",
            "linux/amd64,linux/arm64",
            "--allow-emulation",
            "-t",
            &tag,
            "--push",
            "--build-arg",
            "V=min-mode-arg",
            "--secret",
            &secret,
            "--metadata-file",
            metadata.to_str().unwrap(),
            "--sbom=false",
            &ctx,
        ])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reader = Reader { addr: &open.addr, login: None };
    let index = reader.manifest("prov/app", "1");
    let found = attestations(&reader, "prov/app", &index);
    assert_eq!(found.iter().map(|f| f.platform.as_str()).collect::<Vec<_>>(), ["linux/amd64", "linux/arm64"]);
    for f in &found {
        let s = &f.statement;
        assert_eq!(s["_type"], "https://in-toto.io/Statement/v0.1");
        assert_eq!(s["predicateType"], "https://slsa.dev/provenance/v0.2");
        let subject = &s["subject"][0];
        assert_eq!(format!("sha256:{}", subject["digest"]["sha256"].as_str().unwrap()), f.digest);
        let arch = f.platform.trim_start_matches("linux/");
        assert_eq!(subject["name"], format!("pkg:docker/{}/prov/app@1?platform=linux%2F{arch}", open.addr));
        let p = &s["predicate"];
        assert_eq!(p["buildType"], "https://mobyproject.org/buildkit@v1");
        assert_eq!(p["invocation"]["environment"]["platform"], f.platform.as_str());
        assert_eq!(p["invocation"]["configSource"]["entryPoint"], "Dockerfile");
        assert!(p["invocation"]["parameters"].get("args").is_none(), "min mode records no build args: {s}");
        assert!(!f.statement_text.contains("min-mode-arg"));
        let materials = p["materials"].as_array().unwrap();
        let base_material = materials.iter().find(|m| m["uri"].as_str().unwrap().contains("/base/busybox@latest"));
        let base_material = base_material.unwrap_or_else(|| panic!("the base image is a material: {s}"));
        assert_eq!(format!("sha256:{}", base_material["digest"]["sha256"].as_str().unwrap()), base_digest);
        assert!(
            p["metadata"]["buildStartedOn"].as_str().unwrap() <= p["metadata"]["buildFinishedOn"].as_str().unwrap()
        );
        let meta = braid_meta(s);
        assert_eq!(meta["agent"], "agent");
        assert_eq!(meta["builderName"], "buildah");
        assert!(meta["builderVersion"].as_str().unwrap().starts_with("1."), "{meta}");
        assert_eq!(meta["native"], f.platform == "linux/amd64", "{}: {meta}", f.platform);
        assert!(meta["coordinator"].as_str().unwrap().contains("127.0.0.1:"), "{meta}");
        assert!(!f.statement_text.contains(SECRET_VALUE), "the secret's value is not in the statement");
        // Signed: a second layer, the DSSE envelope over the same statement.
        assert_eq!(f.manifest["layers"][1]["mediaType"], "application/vnd.dsse.envelope.v1+json");
    }
    let meta: Value = serde_json::from_slice(&std::fs::read(&metadata).unwrap()).unwrap();
    for platform in ["linux/amd64", "linux/arm64"] {
        let key = format!("buildx.build.provenance/{platform}");
        assert_eq!(meta[&key]["buildType"], "https://mobyproject.org/buildkit@v1", "{meta}");
        assert_eq!(meta[&key]["invocation"]["environment"]["platform"], platform);
    }

    // braid imagetools verify: one line per platform, the signer named.
    let verify = |reference: &str| {
        let ca = pki.ca();
        farm.braid(&["--ca", ca.to_str().unwrap(), "imagetools", "verify", reference]).unwrap()
    };
    let out = verify(&tag);
    assert!(out.status.success(), "{}", output_text(&out));
    let lines = text(&out.stdout);
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(lines.contains("linux/amd64") && lines.contains("native"), "{lines}");
    assert!(lines.contains("linux/arm64") && lines.contains("emulated"), "{lines}");
    assert!(lines.lines().all(|l| l.contains("agent agent") && l.contains("builder buildah")), "{lines}");
    assert!(lines.lines().all(|l| l.contains("signed by farm-provenance")), "{lines}");
    // Without the CA it cannot verify, and says so.
    let out = farm.braid(&["imagetools", "verify", &tag]).unwrap();
    assert!(!out.status.success() && text(&out.stderr).contains("needs the cluster CA"), "{}", output_text(&out));

    // Tampered: arm64's statement claims native; the envelope no longer matches it.
    let arm = &found[1];
    let mut forged = arm.statement.clone();
    forged["predicate"]["metadata"][METADATA_KEY]["native"] = json!(true);
    let forged_digest = reader.put_blob("prov/app", &serde_json::to_vec(&forged).unwrap());
    let mut manifest = arm.manifest.clone();
    manifest["layers"][0]["digest"] = json!(forged_digest);
    manifest["layers"][0]["size"] = json!(serde_json::to_vec(&forged).unwrap().len());
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let media = "application/vnd.oci.image.manifest.v1+json";
    let new_digest = reader.put_manifest("prov/app", &sha256(&manifest_bytes), media, &manifest_bytes);
    let mut tampered = index.clone();
    for d in tampered["manifests"].as_array_mut().unwrap() {
        if d["digest"] == arm.attestation["digest"] {
            d["digest"] = json!(new_digest);
            d["size"] = json!(manifest_bytes.len());
        }
    }
    let index_media = "application/vnd.oci.image.index.v1+json";
    reader.put_manifest("prov/app", "tampered", index_media, &serde_json::to_vec(&tampered).unwrap());
    let out = verify(&format!("{}/prov/app:tampered", open.addr));
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let err = text(&out.stderr);
    assert!(err.contains("linux/arm64") && err.contains("FAILED"), "{err}");
    assert!(err.contains("provenance does not verify for linux/arm64") && !err.contains("for linux/amd64"), "{err}");
    assert!(text(&out.stdout).contains("linux/amd64"), "the untouched platform still verifies");
    // Missing: the arm64 attestation left out of the index.
    let mut missing = index.clone();
    missing["manifests"].as_array_mut().unwrap().retain(|d| d["digest"] != arm.attestation["digest"]);
    reader.put_manifest("prov/app", "missing", index_media, &serde_json::to_vec(&missing).unwrap());
    let out = verify(&format!("{}/prov/app:missing", open.addr));
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(text(&out.stderr).contains("no attestation manifest refers to it"), "{}", output_text(&out));
    // Wrong subject: amd64's attestation listed as arm64's.
    let mut wrong = index.clone();
    for d in wrong["manifests"].as_array_mut().unwrap() {
        if d["digest"] == found[0].attestation["digest"] {
            d["annotations"]["vnd.docker.reference.digest"] = json!(arm.digest);
        }
    }
    wrong["manifests"].as_array_mut().unwrap().retain(|d| d["digest"] != arm.attestation["digest"]);
    reader.put_manifest("prov/app", "wrong", index_media, &serde_json::to_vec(&wrong).unwrap());
    let out = verify(&format!("{}/prov/app:wrong", open.addr));
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(text(&out.stderr).contains("subject is not"), "{}", output_text(&out));

    // mode=max, version v1, to a registry that wants a login: build args and
    // labels recorded; neither the secret nor the password anywhere in it.
    let docker_config = dir.join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("dev:{PASSWORD}"))
    };
    std::fs::write(
        docker_config.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, locked.addr),
    )
    .unwrap();
    let max_tag = format!("{}/prov/max:1", locked.addr);
    let out = farm
        .braid_env(
            &[
                "build",
                "--platform",
                "linux/amd64",
                "-t",
                &max_tag,
                "--push",
                "--attest",
                "type=provenance,mode=max,version=v1",
                "--build-arg",
                "V=max-mode-arg",
                "--label",
                "team=infra",
                "--secret",
                &secret,
                &ctx,
            ],
            &[("DOCKER_CONFIG", &docker_config)],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let login = Reader { addr: &locked.addr, login: Some(format!("dev:{PASSWORD}")) };
    let found = attestations(&login, "prov/max", &login.manifest("prov/max", "1"));
    let [f] = found.as_slice() else { panic!("one platform") };
    assert_eq!(f.statement["predicateType"], "https://slsa.dev/provenance/v1");
    let definition = &f.statement["predicate"]["buildDefinition"];
    assert_eq!(definition["externalParameters"]["request"]["args"]["build-arg:V"], "max-mode-arg");
    assert_eq!(definition["externalParameters"]["request"]["args"]["label:team"], "infra");
    assert_eq!(definition["externalParameters"]["configSource"]["path"], "Dockerfile");
    let deps = definition["resolvedDependencies"].as_array().unwrap();
    assert!(deps.iter().any(|d| format!("sha256:{}", d["digest"]["sha256"].as_str().unwrap_or("")) == base_digest));
    assert!(f.statement["predicate"]["runDetails"]["metadata"]["startedOn"].is_string());
    assert_eq!(braid_meta(&f.statement)["agent"], "agent");
    for (what, value) in [("the secret", SECRET_VALUE), ("the registry password", PASSWORD)] {
        assert!(!f.statement_text.contains(value), "{what} is in the statement");
        let envelope = login.blob("prov/max", f.manifest["layers"][1]["digest"].as_str().unwrap());
        assert!(!text(&envelope).contains(value), "{what} is in the envelope");
    }

    // --provenance=false: no attestation manifests.
    let off_tag = format!("{}/prov/off:1", open.addr);
    let out = farm
        .braid(&["build", "--platform", "linux/amd64", "-t", &off_tag, "--push", "--provenance=false", &ctx])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let off = reader.manifest("prov/off", "1");
    assert_eq!(off["manifests"].as_array().unwrap().len(), 1, "{off}");
    assert!(!off["manifests"].as_array().unwrap().iter().any(is_attestation));

    // An export makes none by default (as buildx's --load), and asking is refused.
    let archive = dir.join("out.tar");
    let dest = format!("type=oci,dest={}", archive.display());
    let out = farm.braid(&["build", "--platform", "linux/amd64", "--output", &dest, &ctx]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", &format!("oci-archive:{}", archive.display())])
        .output()
        .unwrap();
    let exported: Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(exported["manifests"].as_array().unwrap().len(), 1, "{exported}");
    let out = farm.braid(&["build", "--output", &dest, "--provenance=mode=max", &ctx]).unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--provenance=mode=max needs --push"), "{}", text(&out.stderr));
    check_no_secret_on_disk(&dir.join("farm"));
}

/// The coordinator's data directory (database, journal) holds neither the
/// secret nor the password.
fn check_no_secret_on_disk(dir: &Path) {
    let out = Command::new("grep").args(["-rl", SECRET_VALUE]).arg(dir.join("coordinator")).output().unwrap();
    assert!(text(&out.stdout).is_empty(), "the secret is stored: {}", text(&out.stdout));
    let out = Command::new("grep").args(["-rl", PASSWORD]).arg(dir.join("coordinator")).output().unwrap();
    assert!(text(&out.stdout).is_empty(), "the password is stored: {}", text(&out.stdout));
}
