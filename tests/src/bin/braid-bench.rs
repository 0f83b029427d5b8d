//! braid's benchmarks. Run them all with `bash tests/bench.sh` (it builds
//! release binaries first); each prints a table and ratios against a
//! baseline measured in the same run. Nothing here fails on a number.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use braid_shared::context::{self, ContextLimits, HashingWriter};
use braid_shared::dockerignore::DockerIgnore;
use braid_tests::Farm;

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if matches!(which.as_str(), "all" | "context") {
        context_bench()?;
    }
    Ok(())
}

/// A tree of about 256 MiB: source-like text and incompressible blobs, in
/// nested directories, like a real repository with some assets.
fn make_tree(root: &Path) -> anyhow::Result<u64> {
    let mut total = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for d in 0..40 {
        let dir = root.join(format!("pkg{d}/src/mod{}", d % 7));
        std::fs::create_dir_all(&dir)?;
        for f in 0..50 {
            let text: String = (0..1500).map(|i| format!("fn item_{d}_{f}_{i}() -> u32 {{ {} }}\n", i * 7)).collect();
            std::fs::write(dir.join(format!("file{f}.rs")), &text)?;
            total += text.len() as u64;
        }
        let blob: Vec<u8> = (0..(2 << 20) / 8).flat_map(|_| rand().to_le_bytes()).collect();
        std::fs::write(dir.join("asset.bin"), &blob)?;
        total += blob.len() as u64;
    }
    Ok(total)
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = None;
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let v = f();
        let took = start.elapsed();
        best = Some(best.map_or(took, |b: Duration| b.min(took)));
        last = Some(v);
    }
    (best.unwrap(), last.unwrap())
}

fn context_bench() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree)?;
    let bytes = make_tree(&tree)?;
    // Warm the page cache so both sides read from memory.
    Command::new("tar").arg("-cf").arg("/dev/null").arg("-C").arg(&tree).arg(".").status()?;

    let (baseline, _) = best_of(3, || {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("tar -cf - -C '{}' . | sha256sum > /dev/null", tree.display()))
            .status()
            .unwrap();
        assert!(status.success());
    });
    let ignore = DockerIgnore::default();
    let (tar_hash, summary) =
        best_of(3, || context::write_tar(&tree, &ignore, ContextLimits::default(), std::io::sink()).unwrap());
    let (tar_hash_zstd, compressed) = best_of(3, || {
        let counter = HashingWriter::new(std::io::sink());
        let mut encoder = zstd::stream::write::Encoder::new(counter, 3).unwrap();
        context::write_tar(&tree, &ignore, ContextLimits::default(), &mut encoder).unwrap();
        let (_, n, _) = encoder.finish().unwrap().finish();
        n
    });
    let rate = |d: Duration| bytes as f64 / MIB / d.as_secs_f64();
    println!("## Context path ({:.0} MiB of files, {} entries)\n", bytes as f64 / MIB, summary.entries);
    println!("| what | seconds | MiB/s | vs baseline |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| baseline: tar -cf - . \\| sha256sum | {:.3} | {:.0} | 1.00 |", baseline.as_secs_f64(), rate(baseline));
    for (name, d) in [("braid: tar + sha256", tar_hash), ("braid: tar + sha256 + zstd -3", tar_hash_zstd)] {
        println!("| {name} | {:.3} | {:.0} | {:.2} |", d.as_secs_f64(), rate(d), rate(d) / rate(baseline));
    }
    println!(
        "\nzstd: {:.1} MiB tar -> {:.1} MiB on the wire ({:.2}x)\n",
        summary.size as f64 / MIB,
        compressed as f64 / MIB,
        summary.size as f64 / compressed as f64
    );

    // Bytes sent, measured at a real coordinator. Each size gets its own
    // context (version.txt differs); the resubmission touches nothing.
    std::fs::write(tree.join("Dockerfile"), "FROM scratch\nCOPY . /\n")?;
    let farm = Farm::start_with(&tmp.path().join("farm"), None, &[], &[])?;
    let mut rows = Vec::new();
    for platforms in [1usize, 3, 5] {
        std::fs::write(tree.join("version.txt"), format!("{platforms}"))?;
        let list =
            ["linux/riscv64", "linux/s390x", "linux/ppc64le", "linux/mips64le", "linux/loong64"][..platforms].join(",");
        let before = farm.metric("braid_context_bytes_received_total");
        submit_and_cancel(&farm, &tree, &list)?;
        rows.push((
            format!("{platforms} platform(s)"),
            farm.metric("braid_context_bytes_received_total") - before,
            platforms,
        ));
    }
    let before = farm.metric("braid_context_bytes_received_total");
    submit_and_cancel(&farm, &tree, "linux/riscv64,linux/s390x,linux/ppc64le,linux/mips64le,linux/loong64")?;
    rows.push(("resubmission, 5 platforms".into(), farm.metric("braid_context_bytes_received_total") - before, 5));
    println!("| build | braid bytes sent | one upload per platform (buildx) | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, sent, platforms) in rows {
        let per_node = summary.size as f64 * platforms as f64;
        println!("| {name} | {:.0} | {:.0} | {:.3} |", sent, per_node, sent / per_node);
    }
    Ok(())
}

/// Submits a build nobody can run (so only the context moves), then cancels it.
fn submit_and_cancel(farm: &Farm, tree: &Path, platforms: &str) -> anyhow::Result<()> {
    let (mut child, lines) =
        farm.braid_spawn(&["build", "--platform", platforms, "--progress", "plain", tree.to_str().unwrap()])?;
    let mut id = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while id.is_none() && Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(1))
            && let Some(rest) = line.strip_prefix("#2 build ")
        {
            id = rest.split_whitespace().next().map(str::to_owned);
        }
    }
    let id = id.ok_or_else(|| anyhow::anyhow!("no build id printed"))?;
    farm.braid(&["cancel", &id])?;
    let _ = child.wait();
    Ok(())
}
