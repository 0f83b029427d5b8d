//! Sizes as docker's flags take them (`--memory`, `--shm-size`, buildx's
//! `--keep-storage`: go-units' `RAMInBytes`), one reading for every size a
//! braid user types, flag or label, so `2g`, `2GiB` and `2GB` mean the
//! same here as in docker.

/// A number (optionally with a fraction), an optional space, then an
/// optional unit `k`, `m`, `g`, `t` or `p` (powers of 1024, any case),
/// optionally followed by `i` and then `b`: `512m`, `1.5g`, `2GiB`, `10GB`,
/// `100`, `100b`. None if it is not one, or if it is 16 EiB or more.
pub fn parse_ram(raw: &str) -> Option<u64> {
    let s = raw.trim();
    let digits = |t: &str| t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let whole = digits(s);
    if whole == 0 {
        return None;
    }
    let mut end = whole;
    if let Some(fraction) = s[end..].strip_prefix('.') {
        let n = digits(fraction);
        if n == 0 {
            return None;
        }
        end += 1 + n;
    }
    let number: f64 = s[..end].parse().ok()?;
    let mut unit = s[end..].strip_prefix(' ').unwrap_or(&s[end..]).to_ascii_lowercase();
    let shift = match unit.chars().next() {
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('p') => 50,
        _ => 0,
    };
    if shift != 0 {
        unit.remove(0);
    }
    let unit = unit.strip_prefix('i').unwrap_or(&unit);
    if !(unit.is_empty() || unit == "b") {
        return None;
    }
    let bytes = number * 2f64.powi(shift);
    (bytes.is_finite() && bytes < 1.8e19).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_ram;

    #[test]
    fn sizes_read_as_docker_reads_them() {
        for (raw, bytes) in [
            ("512", 512),
            ("100b", 100),
            ("1.5k", 1536),
            ("512m", 512 << 20),
            ("4g", 4 << 30),
            ("4G", 4 << 30),
            ("4GB", 4 << 30),
            ("4GiB", 4 << 30),
            ("4gib", 4 << 30),
            ("1.5 MiB", 3 << 19),
            ("2t", 2 << 40),
            ("1p", 1 << 50),
        ] {
            assert_eq!(parse_ram(raw), Some(bytes), "{raw}");
        }
        for bad in ["", "GiB", "4XB", "-1G", "4GiBs", "1e3", "1.", ".5g", "4  g", "4gb!", "1.2.3", "99999999p"] {
            assert_eq!(parse_ram(bad), None, "{bad}");
        }
    }
}
