//! The automatic platform ARGs BuildKit defines for every build.

use crate::platform::Platform;

/// `TARGETPLATFORM`, `TARGETOS`, `TARGETARCH`, `TARGETVARIANT` and the
/// `BUILD*` four, with BuildKit's values: the variant is empty when the
/// platform has none.
pub fn platform_args(target: &Platform, build: &Platform) -> Vec<(String, String)> {
    let mut args = Vec::with_capacity(8);
    for (prefix, p) in [("TARGET", target), ("BUILD", build)] {
        args.push((format!("{prefix}PLATFORM"), p.to_string()));
        args.push((format!("{prefix}OS"), p.os().to_owned()));
        args.push((format!("{prefix}ARCH"), p.arch().to_owned()));
        args.push((format!("{prefix}VARIANT"), p.variant().unwrap_or_default().to_owned()));
    }
    args
}

/// True for the names braid sets itself; a user may not override them.
pub fn is_automatic(name: &str) -> bool {
    matches!(
        name,
        "TARGETPLATFORM"
            | "TARGETOS"
            | "TARGETARCH"
            | "TARGETVARIANT"
            | "BUILDPLATFORM"
            | "BUILDOS"
            | "BUILDARCH"
            | "BUILDVARIANT"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_v7_on_amd64() {
        let args = platform_args(&"linux/arm/v7".parse().unwrap(), &"linux/amd64".parse().unwrap());
        let get = |k: &str| args.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap();
        assert_eq!(get("TARGETPLATFORM"), "linux/arm/v7");
        assert_eq!(get("TARGETARCH"), "arm");
        assert_eq!(get("TARGETVARIANT"), "v7");
        assert_eq!(get("BUILDPLATFORM"), "linux/amd64");
        assert_eq!(get("BUILDVARIANT"), "");
        assert_eq!(args.len(), 8);
        assert!(args.iter().all(|(n, _)| is_automatic(n)));
    }
}
