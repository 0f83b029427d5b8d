//! Hostile and oversized requests against the real coordinator: each limit
//! answers with a precise status, and the server keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use braid_shared::proto::{self, builds_client::BuildsClient};
use braid_tests::{AgentSpec, Farm, Registry, dockerfile_context, eventually, require_environment};
use tonic::Code;

fn spec() -> proto::BuildSpec {
    proto::BuildSpec {
        platforms: vec!["linux/amd64".into()],
        context_digest: format!("sha256:{}", "0".repeat(64)),
        ..Default::default()
    }
}

#[test]
fn every_limit_answers_precisely() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let farm = Farm::start(tmp.path(), &registry, &[]).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = BuildsClient::connect(farm.url.clone()).await.unwrap().max_encoding_message_size(64 << 20);
        let submit = |s: proto::BuildSpec| proto::SubmitRequest { spec: Some(s), credentials: vec![], secrets: vec![] };
        let cases: Vec<(proto::BuildSpec, Code, &str)> = vec![
            (proto::BuildSpec { platforms: vec![], ..spec() }, Code::InvalidArgument, "platforms: at least one"),
            (
                proto::BuildSpec { platforms: vec!["linux/amd64".into(); 33], ..spec() },
                Code::ResourceExhausted,
                "platforms: more than the limit of 32",
            ),
            (
                proto::BuildSpec { tags: (0..65).map(|i| format!("r.io/a:{i}")).collect(), ..spec() },
                Code::ResourceExhausted,
                "tags: more than the limit of 64",
            ),
            (
                proto::BuildSpec { build_args: (0..257).map(|i| (format!("A{i}"), "v".into())).collect(), ..spec() },
                Code::ResourceExhausted,
                "build_args: more than the limit of 256",
            ),
            (
                proto::BuildSpec { labels: [("k".to_owned(), "v".repeat(20_000))].into(), ..spec() },
                Code::ResourceExhausted,
                "labels: value of \"k\" is longer than the limit",
            ),
            (proto::BuildSpec { dockerfile_path: "../x".into(), ..spec() }, Code::InvalidArgument, "dockerfile_path"),
            (
                proto::BuildSpec { dockerfile_inline: vec![b'#'; 2 << 20], ..spec() },
                Code::ResourceExhausted,
                "dockerfile_inline: larger than the limit",
            ),
            (spec(), Code::FailedPrecondition, "has not been uploaded"),
        ];
        for (s, code, message) in cases {
            let status = client.submit(submit(s)).await.unwrap_err();
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(status.message().contains(message), "{:?} lacks {message:?}", status.message());
        }
        // A message over the 8 MiB limit is refused by the transport.
        let huge = proto::BuildSpec { labels: [("k".to_owned(), "v".repeat(9 << 20))].into(), ..spec() };
        let status = client.submit(submit(huge)).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
        // A context whose bytes do not match its digest is refused, and kept nowhere.
        let chunk = zstd::encode_all(&b"not what the digest says"[..], 3).unwrap();
        let digest = format!("sha256:{}", "1".repeat(64));
        let put = proto::PutContextRequest { digest: digest.clone(), chunk };
        let status = client.put_context(tokio_stream::iter(vec![put])).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("context digest mismatch"), "{}", status.message());
        let stat = client.stat_context(proto::StatContextRequest { digest }).await.unwrap().into_inner();
        assert!(!stat.present);
        // Garbage ids and digests.
        let status = client.get(proto::GetBuildRequest { build_id: "../../etc".into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = client.stat_context(proto::StatContextRequest { digest: "md5:x".into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        // Still serving.
        assert!(client.list(proto::ListBuildsRequest { limit: 5, state: 0 }).await.is_ok());
    });
}

#[test]
fn the_builder_cache_is_cleared_past_its_bound() {
    require_environment();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let base = registry.push_base_image("base/busybox:latest").unwrap();
    // A bound of one byte: every storage is over it once its job ends.
    let agents = [AgentSpec::new("tiny-cache", &["linux/arm64", "linux/arm/v7"]).env("BRAID_BUILDER_CACHE_BYTES", "1")];
    let farm = Farm::start(dir, &registry, &agents).unwrap();
    farm.wait_for_agents(1).unwrap();
    let ctx = dockerfile_context(dir, "ctx", &format!("FROM {base}\nRUN uname -m > /arch\n"));
    let tag = format!("{}/cache/app:1", registry.addr);
    let storage = dir.join("tiny-cache").join("storage");
    let out = farm.braid(&["build", "--platform", "linux/arm64", "-t", &tag, "--push", &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(Duration::from_secs(30), "the arm64 storage to be cleared", || {
        let left = std::fs::read_dir(&storage).map(|d| d.count()).unwrap_or(0);
        (left == 0).then_some(())
    })
    .unwrap();
    assert!(farm.log("tiny-cache").contains("builder cache cleared"), "{}", farm.log("tiny-cache"));

    // Builds go on from an empty cache.
    let out = farm.braid(&["build", "--platform", "linux/arm64,linux/arm/v7", "-t", &tag, "--push", &ctx]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index = registry.manifest("cache/app:1").unwrap();
    let seen = registry.per_platform("cache/app", &index, &["arch"], &dir.join("scratch")).unwrap();
    assert_eq!(seen, ["arm/v7 armv7l", "arm64 aarch64"]);
}
