//! Telling an archive from a Dockerfile by its first bytes, as BuildKit
//! does for a downloaded context and docker for `docker build -`.

/// What a fetched context or stdin starts with, as BuildKit and docker
/// tell an archive from a Dockerfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Gzip,
    Bzip2,
    Xz,
    Zstd,
    Tar,
    /// Anything else: a Dockerfile.
    Other,
}

/// Bytes to read before `sniff` can decide.
pub const SNIFF_BYTES: usize = 512;

pub fn sniff(head: &[u8]) -> Sniffed {
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        Sniffed::Gzip
    } else if head.starts_with(b"BZh") {
        Sniffed::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Sniffed::Xz
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Sniffed::Zstd
    } else if is_tar_header(head) {
        Sniffed::Tar
    } else {
        Sniffed::Other
    }
}

/// A 512-byte tar header whose checksum is right (what Go's tar reader
/// checks before it takes a header).
fn is_tar_header(head: &[u8]) -> bool {
    let Some(h) = head.get(..512) else { return false };
    let field = String::from_utf8_lossy(&h[148..156]);
    let Ok(stored) = u32::from_str_radix(field.trim_matches(|c: char| c == ' ' || c == '\0'), 8) else {
        return false;
    };
    let sum: u32 = h.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { u32::from(*b) }).sum();
    sum == stored
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn archives_are_told_from_dockerfiles() {
        assert_eq!(sniff(&[0x1f, 0x8b, 0x08, 0]), Sniffed::Gzip);
        assert_eq!(sniff(b"BZh91AY"), Sniffed::Bzip2);
        assert_eq!(sniff(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0]), Sniffed::Xz);
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Sniffed::Zstd);
        assert_eq!(sniff(b"FROM scratch\nCOPY . /\n"), Sniffed::Other);
        assert_eq!(sniff(&[0u8; 512]), Sniffed::Other);
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_cksum();
        b.append_data(&mut h, "Dockerfile", &b"x"[..]).unwrap();
        assert_eq!(sniff(&b.into_inner().unwrap()), Sniffed::Tar);
    }
}
