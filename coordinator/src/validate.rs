//! Every field of a submitted build checked, with a message naming the field
//! and the limit.

use std::collections::HashMap;

use braid_shared::{ImageRef, Platform, buildargs, buildflags, limits, proto};

use crate::error::CoordinatorError;

/// A spec that passed validation, with its parsed parts.
#[derive(Debug)]
pub struct ValidSpec {
    pub spec: proto::BuildSpec,
    pub platforms: Vec<Platform>,
    pub tags: Vec<ImageRef>,
    /// What it needs of an agent's builder (also in `spec.needs`).
    pub needs: braid_shared::capability::CapSet,
}

fn invalid(message: String) -> CoordinatorError {
    CoordinatorError::InvalidArgument(message)
}

fn too_many(field: &str, limit: usize) -> CoordinatorError {
    CoordinatorError::ResourceExhausted(format!("{field}: more than the limit of {limit}"))
}

/// A Dockerfile ARG name.
fn is_arg_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A Dockerfile stage name, as `FROM ... AS name` accepts it.
fn is_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A label or annotation key: builders take `--label key=value` and split
/// at the first `=`, and a control character (NUL, newline) breaks the
/// argument or the log line that shows it.
fn is_label_key(key: &str) -> bool {
    !key.is_empty() && !key.chars().any(|c| c == '=' || c.is_control())
}

fn check_map(
    field: &str,
    map: &HashMap<String, String>,
    key_ok: impl Fn(&str) -> bool,
    expected: &str,
) -> Result<(), CoordinatorError> {
    if map.len() > limits::BUILD_ARGS {
        return Err(too_many(field, limits::BUILD_ARGS));
    }
    for (k, v) in map {
        if k.len() > limits::ARG_KEY_BYTES || !key_ok(k) {
            return Err(invalid(format!(
                "{field}: invalid name {:?}: expected {expected}, at most {} bytes",
                braid_shared::shorten(k, 80),
                limits::ARG_KEY_BYTES
            )));
        }
        if v.contains('\0') {
            return Err(invalid(format!("{field}: value of {k:?} contains a NUL byte")));
        }
        if v.len() > limits::ARG_VALUE_BYTES {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "{field}: value of {k:?} is longer than the limit of {} bytes",
                limits::ARG_VALUE_BYTES
            )));
        }
    }
    Ok(())
}

/// Forwarded registry credentials: bounded, one per registry.
pub fn credentials(raw: &[proto::RegistryCredential]) -> Result<Vec<braid_shared::oci::Credential>, CoordinatorError> {
    if raw.len() > 16 {
        return Err(too_many("credentials", 16));
    }
    let mut out: Vec<braid_shared::oci::Credential> = Vec::new();
    for c in raw {
        let host_ok = c.registry.len() <= 255 && braid_shared::reference::is_registry_host(&c.registry);
        if !host_ok {
            return Err(invalid(format!("credentials: invalid registry {:?}", braid_shared::shorten(&c.registry, 80))));
        }
        if c.username.len() > 256 || c.password.len() > 8192 || c.username.contains('\0') {
            return Err(invalid(format!(
                "credentials for {}: username at most 256 bytes, password at most 8 KiB",
                c.registry
            )));
        }
        if out.iter().any(|o| o.registry == c.registry) {
            return Err(invalid(format!("credentials: {} given twice", c.registry)));
        }
        out.push(c.into());
    }
    Ok(out)
}

/// Validates a submitted spec; the context's presence is checked by the caller.
pub fn spec(mut spec: proto::BuildSpec) -> Result<ValidSpec, CoordinatorError> {
    if spec.platforms.is_empty() {
        return Err(invalid("platforms: at least one platform is required".into()));
    }
    if spec.platforms.len() > limits::PLATFORMS {
        return Err(too_many("platforms", limits::PLATFORMS));
    }
    let mut platforms: Vec<Platform> = Vec::new();
    for raw in &spec.platforms {
        let p: Platform = raw.parse().map_err(|e| invalid(format!("platforms: {e}")))?;
        if !platforms.contains(&p) {
            platforms.push(p);
        }
    }
    spec.platforms = platforms.iter().map(ToString::to_string).collect();
    let flag = |field: &str, e: braid_shared::buildflags::FlagError| invalid(format!("{field}: {e}"));
    let requirements = braid_shared::placement::check_requirements(&spec.requirements, &platforms)
        .map_err(|e| flag("requirements", e))?;
    spec.requirements = requirements.iter().map(ToString::to_string).collect();
    braid_shared::placement::check_memory_limit(spec.memory_limit_bytes).map_err(|e| flag("memory_limit_bytes", e))?;
    braid_shared::placement::check_cpus(spec.cpu_millis).map_err(|e| flag("cpu_millis", e))?;

    if spec.tags.len() > limits::TAGS {
        return Err(too_many("tags", limits::TAGS));
    }
    let mut tags = Vec::new();
    for raw in &spec.tags {
        let t: ImageRef = raw.parse().map_err(|e| invalid(format!("tags: {e}")))?;
        if t.digest().is_some() {
            return Err(invalid(format!("tags: {raw:?} has a digest; a tag names where to push")));
        }
        let t = t.with_default_tag();
        if !tags.contains(&t) {
            tags.push(t);
        }
    }
    if spec.push && tags.is_empty() {
        return Err(invalid("tags: --push needs at least one tag (-t)".into()));
    }
    spec.tags = tags.iter().map(ToString::to_string).collect();

    spec.context_digest.parse::<braid_shared::Digest>().map_err(|e| invalid(format!("context_digest: {e}")))?;

    if spec.dockerfile_inline.len() > limits::DOCKERFILE_BYTES {
        return Err(CoordinatorError::ResourceExhausted(format!(
            "dockerfile_inline: larger than the limit of {} bytes",
            limits::DOCKERFILE_BYTES
        )));
    }
    if !spec.dockerfile_inline.is_empty() && !spec.dockerfile_path.is_empty() {
        return Err(invalid("dockerfile_path and dockerfile_inline: give one, not both".into()));
    }
    if spec.dockerfile_inline.is_empty() {
        if spec.dockerfile_path.is_empty() {
            spec.dockerfile_path = "Dockerfile".into();
        }
        let path = &spec.dockerfile_path;
        let cleaned = braid_shared::dockerignore::clean(path);
        if path.len() > limits::CONTEXT_PATH_BYTES
            || path.starts_with('/')
            || cleaned == "."
            || cleaned.starts_with("../")
            || cleaned == ".."
            || path.contains('\0')
        {
            return Err(invalid(format!(
                "dockerfile_path: {:?} must be a relative path inside the context",
                braid_shared::shorten(path, 200)
            )));
        }
        spec.dockerfile_path = cleaned;
    }

    check_map("build_args", &spec.build_args, is_arg_name, "a letter or '_', then letters, digits or '_'")?;
    if let Some(name) = spec.build_args.keys().find(|k| buildargs::is_automatic(k)) {
        return Err(invalid(format!(
            "build_args: {name} is set by braid from each job's platform and cannot be given"
        )));
    }
    check_map("labels", &spec.labels, is_label_key, "a non-empty key without '=' or control characters")?;
    if spec.annotations.len() > limits::BUILD_ARGS {
        return Err(too_many("annotations", limits::BUILD_ARGS));
    }
    for a in &mut spec.annotations {
        if !matches!(a.level.as_str(), "index" | "manifest" | "manifest-descriptor") {
            return Err(invalid(format!(
                "annotations: level {:?} is not index, manifest or manifest-descriptor",
                braid_shared::shorten(&a.level, 40)
            )));
        }
        if !a.platform.is_empty() {
            if a.level == "index" {
                return Err(invalid("annotations: an index annotation takes no platform".into()));
            }
            let p: Platform = a.platform.parse().map_err(|e| invalid(format!("annotations: {e}")))?;
            a.platform = p.to_string();
        }
        let key_ok =
            a.key.len() <= limits::ARG_KEY_BYTES && is_label_key(&a.key) && !a.key.contains(char::is_whitespace);
        if !key_ok {
            return Err(invalid(format!(
                "annotations: invalid key {:?}: expected a non-empty key without '=', spaces or control characters",
                braid_shared::shorten(&a.key, 80)
            )));
        }
        if a.value.contains('\0') {
            return Err(invalid(format!("annotations: value of {:?} contains a NUL byte", a.key)));
        }
        if a.value.len() > limits::ARG_VALUE_BYTES {
            return Err(CoordinatorError::ResourceExhausted(format!(
                "annotations: value of {:?} is longer than the limit of {} bytes",
                a.key,
                limits::ARG_VALUE_BYTES
            )));
        }
    }
    if !matches!(spec.format.as_str(), "" | "oci" | "docker") {
        return Err(invalid(format!("format: {:?} is not oci or docker", braid_shared::shorten(&spec.format, 40))));
    }
    if spec.format == "docker" && !spec.annotations.is_empty() {
        return Err(invalid(
            "annotations: Docker manifest lists and schema 2 manifests have no annotations; use --format oci".into(),
        ));
    }
    if spec.timeout_seconds > limits::BUILD_TIMEOUT_SECONDS {
        return Err(invalid(format!(
            "timeout_seconds: {} is more than the limit of {} (7 days)",
            spec.timeout_seconds,
            limits::BUILD_TIMEOUT_SECONDS
        )));
    }
    if !spec.target.is_empty() && !is_stage_name(&spec.target) {
        return Err(invalid(format!("target: invalid stage name {:?}", braid_shared::shorten(&spec.target, 80))));
    }
    run_flags(&spec)?;
    braid_shared::ssh::check_ids(spec.ssh_ids.iter().map(String::as_str))
        .map_err(|e| invalid(format!("ssh_ids: {e}")))?;
    if spec.secrets.len() > limits::SECRETS {
        return Err(too_many("secrets", limits::SECRETS));
    }
    braid_shared::secrets::check_refs(&spec.secrets).map_err(|e| invalid(format!("secrets: {e}")))?;
    cache_entries(&mut spec, &platforms)?;
    let needs = crate::needs::complete(&mut spec)?;
    Ok(ValidSpec { spec, platforms, tags, needs })
}

/// `--secret` values sent with a submit (or again after a restart): one for
/// each id the spec lists as provided, within the limits. Errors name ids,
/// never values.
pub fn secret_values(spec: &proto::BuildSpec, values: &[proto::SecretValue]) -> Result<(), CoordinatorError> {
    if values.len() > limits::SECRETS {
        return Err(too_many("secrets", limits::SECRETS));
    }
    braid_shared::secrets::check_values(&spec.secrets, values).map_err(|e| invalid(e.to_string()))
}

/// `--network`, `--add-host`, `--ulimit`, `--shm-size`: checked as the CLI
/// checks them, the message naming the field.
fn run_flags(spec: &proto::BuildSpec) -> Result<(), CoordinatorError> {
    fn field(name: &'static str) -> impl Fn(buildflags::FlagError) -> CoordinatorError {
        move |e| invalid(format!("{name}: {e}"))
    }
    buildflags::check_network(&spec.network).map_err(field("network"))?;
    if spec.add_hosts.len() > limits::ADD_HOSTS {
        return Err(too_many("add_hosts", limits::ADD_HOSTS));
    }
    for m in &spec.add_hosts {
        buildflags::check_host_mapping(m).map_err(field("add_hosts"))?;
    }
    buildflags::check_ulimits(&spec.ulimits).map_err(field("ulimits"))?;
    if spec.shm_size_bytes != 0 {
        buildflags::check_shm_size(spec.shm_size_bytes)
            .map_err(|e| invalid(format!("shm_size_bytes: {}: {e}", spec.shm_size_bytes)))?;
    }
    Ok(())
}

/// `--cache-from`, `--cache-to`: checked as the CLI checks them, the
/// message naming the field and the entry; what they need of a builder is
/// added to `needs`, for placement.
fn cache_entries(spec: &mut proto::BuildSpec, platforms: &[Platform]) -> Result<(), CoordinatorError> {
    use braid_shared::cache::{self, Direction};
    for (direction, entries) in [(Direction::From, &spec.cache_from), (Direction::To, &spec.cache_to)] {
        cache::check(direction, entries, platforms).map_err(|e| invalid(format!("{}: {e}", direction.field())))?;
    }
    for need in cache::needs(spec) {
        if !spec.needs.iter().any(|n| n == need.name()) {
            spec.needs.push(need.name().to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> proto::BuildSpec {
        proto::BuildSpec {
            platforms: vec!["linux/amd64".into(), "linux/aarch64".into(), "linux/arm64/v8".into()],
            tags: vec!["127.0.0.1:5000/app:1".into()],
            context_digest: format!("sha256:{}", "0".repeat(64)),
            push: true,
            ..Default::default()
        }
    }

    fn cache_option(kind: &str, attrs: &[(&str, &str)]) -> proto::CacheOption {
        proto::CacheOption {
            r#type: kind.into(),
            attrs: attrs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    #[test]
    fn cache_entries_add_what_they_need() {
        let s = proto::BuildSpec {
            cache_from: vec![cache_option("registry", &[("ref", "r.io/cache/app")])],
            cache_to: vec![cache_option("registry", &[("ref", "r.io/cache/app"), ("mode", "max")])],
            needs: vec!["registry-cache-import".into()],
            ..base()
        };
        let v = spec(s).unwrap();
        assert_eq!(v.spec.needs, ["registry-cache-import", "registry-cache-export"]);
    }

    #[test]
    fn secrets_are_bounded_and_match_the_spec() {
        let r = |id: &str| proto::SecretRef { id: id.into(), provided: true };
        let mut spec = base();
        spec.secrets = (0..65).map(|i| r(&format!("s{i}"))).collect();
        let e = self::spec(spec).unwrap_err();
        assert!(
            matches!(&e, CoordinatorError::ResourceExhausted(m) if m == "secrets: more than the limit of 64"),
            "{e}"
        );
        let mut spec = base();
        spec.secrets = vec![r("a b")];
        assert!(self::spec(spec).unwrap_err().to_string().contains("secrets: --secret id \"a b\""));
        let mut spec = base();
        spec.secrets = vec![r("tok")];
        let valid = self::spec(spec).unwrap().spec;
        let v = |id: &str, n: usize| proto::SecretValue { id: id.into(), value: vec![b'x'; n] };
        assert!(secret_values(&valid, &[v("tok", 3)]).is_ok());
        let e = secret_values(&valid, &[]).unwrap_err().to_string();
        assert!(e.contains("no value for id tok"), "{e}");
        let e = secret_values(&valid, &[v("tok", 1), v("other", 1)]).unwrap_err().to_string();
        assert!(e.contains("id other that the spec does not list"), "{e}");
        let e = secret_values(&valid, &[v("tok", limits::SECRET_BYTES + 1)]).unwrap_err().to_string();
        assert!(e.contains("id=tok: larger than the limit of 500 KiB") && !e.contains("xxx"), "{e}");
    }

    #[test]
    fn credentials_are_bounded() {
        let cred = |registry: &str| proto::RegistryCredential {
            registry: registry.into(),
            username: "u".into(),
            password: "p".into(),
        };
        assert!(credentials(&[cred("ghcr.io"), cred("127.0.0.1:5000")]).is_ok());
        let too_many: Vec<_> = (0..17).map(|i| cred(&format!("r{i}.io"))).collect();
        assert!(credentials(&too_many).unwrap_err().to_string().contains("credentials: more than the limit of 16"));
        assert!(credentials(&[cred("a/b")]).unwrap_err().to_string().contains("invalid registry"));
        assert!(credentials(&[cred("r.io:0")]).unwrap_err().to_string().contains("invalid registry \"r.io:0\""));
        assert!(credentials(&[cred("[::1]:5000"), cred("localhost:65535")]).is_ok());
        assert!(credentials(&[cred("x.io"), cred("x.io")]).unwrap_err().to_string().contains("given twice"));
        let mut long = cred("x.io");
        long.password = "p".repeat(8193);
        let e = credentials(&[long]).unwrap_err().to_string();
        assert!(e.contains("password at most 8 KiB") && !e.contains("ppp"), "{e}");
    }

    #[test]
    fn provenance_is_refused_where_the_index_cannot_carry_it() {
        let with = |mode: &str, version: &str, format: &str, push: bool| {
            let (mode, version) = (mode.into(), version.into());
            spec(proto::BuildSpec {
                provenance_mode: mode,
                provenance_version: version,
                format: format.into(),
                push,
                ..base()
            })
        };
        assert!(with("min", "", "", true).is_ok());
        assert!(with("max", "v1", "oci", true).is_ok());
        for (mode, version, format, push, says) in [
            ("min", "", "docker", true, "with --format docker"),
            ("min", "", "", false, "needs --push"),
            ("all", "", "", true, "expected min or max"),
            ("min", "v3", "", true, "expected v0.2 or v1"),
            ("", "v1", "", true, "a version without a mode"),
        ] {
            let Err(CoordinatorError::InvalidArgument(m)) = with(mode, version, format, push) else {
                panic!("{mode} {version} {format} accepted")
            };
            assert!(m.starts_with("provenance_mode: ") && m.contains(says), "{m}");
        }
    }

    #[test]
    fn ssh_ids_are_checked_by_name() {
        let with =
            |ids: &[&str]| spec(proto::BuildSpec { ssh_ids: ids.iter().map(|s| s.to_string()).collect(), ..base() });
        assert!(with(&["default", "gh.deploy_key-1"]).is_ok());
        let e = with(&["a=b"]).err().unwrap().to_string();
        assert!(e.contains("ssh_ids: invalid id \"a=b\""), "{e}");
        assert!(with(&["x", "x"]).err().unwrap().to_string().contains("ssh_ids: id \"x\" given twice"));
        let many: Vec<String> = (0..=limits::SSH_IDS).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(with(&refs).err().unwrap().to_string().contains("ssh_ids: more than the limit of 16 ids"));
    }

    #[test]
    fn normalizes_and_dedups() {
        let v = spec(base()).unwrap();
        assert_eq!(v.spec.platforms, ["linux/amd64", "linux/arm64"]);
        assert_eq!(v.spec.dockerfile_path, "Dockerfile");
        let flags = proto::BuildSpec {
            pull: true,
            network: "none".into(),
            add_hosts: vec![proto::HostMapping { host: "db.local".into(), ip: "fe80::1".into() }],
            ulimits: vec![proto::Ulimit { name: "nofile".into(), soft: 512, hard: -1 }],
            shm_size_bytes: 64 << 20,
            ..base()
        };
        assert!(spec(flags).is_ok());
        // An inline Dockerfile is scanned here: its needs are stored with the flags'.
        let inline = proto::BuildSpec {
            dockerfile_inline: b"FROM a\nRUN --mount=type=ssh x\n".to_vec(),
            add_hosts: vec![proto::HostMapping { host: "db".into(), ip: "::1".into() }],
            ..base()
        };
        assert_eq!(spec(inline).unwrap().spec.needs, ["ssh", "add-hosts"]);
    }

    #[test]
    fn names_the_field() {
        type Mutation = Box<dyn Fn(&mut proto::BuildSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.platforms.clear()), "platforms: at least one"),
            (Box::new(|s| s.platforms.push("linux/arm/v9".into())), "platforms: invalid platform \"linux/arm/v9\""),
            (Box::new(|s| s.platforms = vec!["linux/amd64".into(); 33]), "platforms: more than the limit of 32"),
            (Box::new(|s| s.tags = vec!["Bad".into()]), "tags: invalid image reference \"Bad\""),
            (Box::new(|s| s.tags.clear()), "--push needs at least one tag"),
            (Box::new(|s| s.context_digest = "x".into()), "context_digest: invalid digest"),
            (Box::new(|s| s.dockerfile_path = "../Dockerfile".into()), "dockerfile_path"),
            (Box::new(|s| s.dockerfile_path = "/etc/passwd".into()), "dockerfile_path"),
            (
                Box::new(|s| {
                    s.build_args.insert("1X".into(), "v".into());
                }),
                "build_args: invalid name",
            ),
            (
                Box::new(|s| {
                    s.build_args.insert("TARGETARCH".into(), "v".into());
                }),
                "set by braid",
            ),
            (
                Box::new(|s| {
                    s.build_args.insert("X".into(), "v".repeat(20000));
                }),
                "longer than the limit",
            ),
            (Box::new(|s| s.target = "-x".into()), "target: invalid stage name"),
            (Box::new(|s| s.dockerfile_inline = vec![b'x'; (1 << 20) + 1]), "dockerfile_inline"),
            (
                Box::new(|s| s.tags = (0..65).map(|i| format!("reg.io/app:{i}")).collect()),
                "tags: more than the limit of 64",
            ),
            (
                Box::new(|s| s.build_args = (0..257).map(|i| (format!("A{i}"), "v".into())).collect()),
                "build_args: more than the limit of 256",
            ),
            (
                Box::new(|s| s.labels = (0..257).map(|i| (format!("l{i}"), "v".into())).collect()),
                "labels: more than the limit of 256",
            ),
            (
                Box::new(|s| {
                    s.build_args.insert("K".repeat(257), "v".into());
                }),
                "build_args: invalid name",
            ),
            (
                Box::new(|s| {
                    s.labels.insert("k".into(), "v".repeat(16385));
                }),
                "labels: value of \"k\" is longer than the limit",
            ),
            (Box::new(|s| s.dockerfile_path = "a".repeat(4097)), "dockerfile_path"),
            (Box::new(|s| s.target = "t".repeat(129)), "target: invalid stage name"),
            (Box::new(|s| s.timeout_seconds = 8 * 24 * 3600), "timeout_seconds: 691200 is more than the limit"),
            (Box::new(|s| s.timeout_seconds = 1 << 40), "timeout_seconds: 1099511627776 is more than the limit"),
            (Box::new(|s| s.timeout_seconds = u64::MAX), "timeout_seconds: 18446744073709551615"),
            (
                Box::new(|s| {
                    s.labels.insert("a=b".into(), "c".into());
                }),
                "labels: invalid name \"a=b\"",
            ),
            (
                Box::new(|s| {
                    s.labels.insert(String::new(), "c".into());
                }),
                "labels: invalid name \"\"",
            ),
            (
                Box::new(|s| {
                    s.labels.insert("a\rb".into(), "c".into());
                }),
                "labels: invalid name \"a\\rb\"",
            ),
            (
                Box::new(|s| {
                    s.labels.insert("k".into(), "a\0b".into());
                }),
                "labels: value of \"k\" contains a NUL byte",
            ),
            (
                Box::new(|s| {
                    s.build_args.insert("A=B".into(), "c".into());
                }),
                "build_args: invalid name \"A=B\"",
            ),
            (
                Box::new(|s| {
                    s.build_args.insert("A".into(), "\0".into());
                }),
                "build_args: value of \"A\" contains a NUL byte",
            ),
            (
                Box::new(|s| {
                    s.annotations.push(proto::Annotation {
                        level: "manifest".into(),
                        key: "a=b".into(),
                        ..Default::default()
                    })
                }),
                "annotations: invalid key \"a=b\"",
            ),
            (
                Box::new(|s| {
                    s.annotations.push(proto::Annotation {
                        level: "manifest".into(),
                        platform: "linux/../etc".into(),
                        key: "k".into(),
                        ..Default::default()
                    })
                }),
                "annotations: invalid platform \"linux/../etc\"",
            ),
            (Box::new(|s| s.platforms = vec!["../../etc".into()]), "platforms: invalid platform \"../../etc\""),
            (Box::new(|s| s.tags = vec!["host:0/app".into()]), "tags: invalid image reference \"host:0/app\""),
            (Box::new(|s| s.tags = vec!["host:99999/app".into()]), "tags: invalid image reference \"host:99999/app\""),
            (Box::new(|s| s.tags = vec![format!("reg.io/app@sha256:{}", "a".repeat(64))]), "has a digest"),
            (Box::new(|s| s.format = "v2s1".into()), "format: \"v2s1\" is not oci or docker"),
            (
                Box::new(|s| {
                    s.format = "docker".into();
                    s.annotations.push(proto::Annotation {
                        level: "index".into(),
                        key: "k".into(),
                        ..Default::default()
                    });
                }),
                "have no annotations; use --format oci",
            ),
            (
                Box::new(|s| s.network = "bridge".into()),
                "network: --network \"bridge\": expected default, none or host",
            ),
            (
                Box::new(|s| s.add_hosts = vec![proto::HostMapping { host: "a\nb".into(), ip: "1.2.3.4".into() }]),
                "add_hosts: --add-host \"a\\nb\": invalid host name",
            ),
            (
                Box::new(|s| s.add_hosts = vec![proto::HostMapping { host: "db".into(), ip: "1.2.3".into() }]),
                "add_hosts: --add-host db:\"1.2.3\": invalid IP address",
            ),
            (
                Box::new(|s| {
                    s.add_hosts = vec![proto::HostMapping { host: "db".into(), ip: "::1".into() }; 65];
                }),
                "add_hosts: more than the limit of 64",
            ),
            (
                Box::new(|s| s.ulimits = vec![proto::Ulimit { name: "files".into(), soft: 1, hard: 1 }]),
                "ulimits: --ulimit \"files=1:1\": unknown name \"files\"",
            ),
            (
                Box::new(|s| s.ulimits = vec![proto::Ulimit { name: "nofile".into(), soft: 9, hard: 1 }]),
                "ulimits: --ulimit \"nofile=9:1\": the soft limit is above the hard limit",
            ),
            (
                Box::new(|s| s.ulimits = vec![proto::Ulimit { name: "nofile".into(), soft: 1, hard: 1 }; 2]),
                "ulimits: --ulimit: nofile given twice",
            ),
            (Box::new(|s| s.shm_size_bytes = (64 << 30) + 1), "shm_size_bytes: 68719476737: more than the limit"),
            (
                Box::new(|s| s.needs = vec!["heredocs".into(), "jetpack".into()]),
                "needs: unknown builder capability \"jetpack\"",
            ),
            (Box::new(|s| s.needs = vec!["ssh".into(); 20]), "needs: more than the 19 known capabilities"),
            (
                Box::new(|s| s.build_contexts = vec![proto::NamedContext { name: "a b".into(), value: "x".into() }]),
                "build_contexts: --build-context \"a b\": invalid name",
            ),
            (Box::new(|s| s.no_cache_filter = vec!["x;y".into()]), "no_cache_filter: --no-cache-filter \"x;y\""),
            (
                Box::new(|s| s.cache_to = vec![cache_option("gha", &[("token", "t0ken")])]),
                "cache_to: --cache-to \"type=gha,token=...\": type=gha: the GitHub Actions cache needs",
            ),
            (
                Box::new(|s| s.cache_from = vec![cache_option("local", &[("src", "/c")])]),
                "cache_from: --cache-from \"type=local,src=...\": type=local",
            ),
            (
                Box::new(|s| s.cache_from = vec![cache_option("registry", &[("ref", "r.io/a:Up")])]),
                "cache_from: --cache-from \"type=registry,ref=r.io/a:Up\": ref r.io/a:Up: braid keeps each platform's",
            ),
            (
                Box::new(|s| s.cache_to = vec![cache_option("registry", &[("ref", "r.io/a"), ("mode", "all")])]),
                "cache_to: --cache-to \"type=registry,mode=all,ref=r.io/a\": mode \"all\"",
            ),
            (
                Box::new(|s| {
                    s.cache_from = (0..17).map(|i| cache_option("registry", &[("ref", &format!("r.io/{i}"))])).collect()
                }),
                "cache_from: --cache-from: more than the limit of 16 entries",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = base();
            mutate(&mut s);
            let e = spec(s).unwrap_err().to_string();
            assert!(e.contains(want), "{e} does not contain {want}");
        }
    }
}
