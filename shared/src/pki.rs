//! The cluster's small PKI: a CA, the coordinator's server certificate, and
//! client certificates whose subject says who holds them (`OU=agent` or
//! `OU=client`, `CN=<name>`).

use std::path::Path;

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path:?}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

/// What a client certificate lets its holder be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Agent,
    Client,
}

impl Kind {
    fn unit(self) -> &'static str {
        match self {
            Kind::Agent => "agent",
            Kind::Client => "client",
        }
    }
}

/// A certificate and its private key, both PEM.
pub struct Pem {
    pub cert: String,
    pub key: zeroize::Zeroizing<String>,
}

fn validity(params: &mut CertificateParams, days: i64) {
    validity_for(params, Duration::days(days));
}

/// Valid for `lifetime`, from a little earlier (clocks differ): five
/// minutes, or a tenth of a short lifetime, so "renew at two thirds of its
/// life" still falls after the certificate was issued.
fn validity_for(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5).min(lifetime / 10);
    params.not_after = now + lifetime;
}

/// A new cluster CA.
pub fn new_ca(cluster: &str, days: i64) -> Result<Pem, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("braid cluster CA {cluster}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem().into() })
}

fn issuer(ca: &Pem) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&ca.key)?;
    Ok(Issuer::from_ca_cert_pem(&ca.cert, key)?)
}

/// The coordinator's server certificate, valid for `hosts` (names or IPs).
pub fn issue_server(ca: &Pem, hosts: &[String], days: i64) -> Result<Pem, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hosts.first().cloned().unwrap_or_else(|| "braid-coordinator".into()));
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer(ca)?)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem().into() })
}

/// A random 128-bit serial (RFC 5280: positive, at most 20 bytes), so the
/// coordinator can record and revoke one certificate of a name without
/// confusing it with another issued for the same key or name.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive, and never a leading zero byte that DER would strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn client_params(kind: Kind, name: &str, days: i64) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationalUnitName, kind.unit());
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, days);
    Ok(params)
}

/// A client certificate for an agent or an operator's client.
pub fn issue_client(ca: &Pem, kind: Kind, name: &str, days: i64) -> Result<Pem, PkiError> {
    let key = KeyPair::generate()?;
    let cert = client_params(kind, name, days)?.signed_by(&key, &issuer(ca)?)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem().into() })
}

/// The subject unit of a provenance signing certificate: a verifier takes
/// a signature only from a certificate of this unit (an agent's or a
/// client's certificate, signed by the same CA, cannot sign provenance).
pub const PROVENANCE_UNIT: &str = "provenance";

/// A coordinator's provenance signing certificate (`OU=provenance`,
/// digital signature, code signing), for DSSE envelopes.
pub fn issue_provenance(ca: &Pem, name: &str, days: i64) -> Result<Pem, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = client_params(Kind::Client, name, days)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationalUnitName, PROVENANCE_UNIT);
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let cert = params.signed_by(&key, &issuer(ca)?)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem().into() })
}

/// A key and a signing request for an agent that joins with a token.
pub fn new_agent_request(name: &str) -> Result<(String, zeroize::Zeroizing<String>), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = client_params(Kind::Agent, name, 1)?;
    // The coordinator picks the serial when it signs; a request carries none.
    params.serial_number = None;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem().into()))
}

/// Signs a joining or renewing agent's request as an agent certificate for
/// `name`, valid `lifetime_seconds`; only the request's public key is used,
/// never its claimed subject or extensions.
pub fn sign_agent_request(ca: &Pem, csr_pem: &str, name: &str, lifetime_seconds: i64) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let mut params = client_params(Kind::Agent, name, 1)?;
    validity_for(&mut params, Duration::seconds(lifetime_seconds));
    let cert = params.signed_by(&csr.public_key, &issuer(ca)?)?;
    Ok(cert.pem())
}

/// (OU, CN) of a DER certificate, as presented by a peer.
pub fn identity(der: &[u8]) -> Result<(String, String), PkiError> {
    let info = inspect(der)?;
    Ok((info.unit, info.name))
}

/// What the coordinator reads from a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's OU: `agent` or `client`.
    pub unit: String,
    /// The subject's CN: the agent's or client's name.
    pub name: String,
    /// The serial number, lowercase hex of its DER bytes.
    pub serial: String,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Subject, serial and validity of a DER certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let subject = cert.subject();
    let first = |attrs: Option<&x509_parser::x509::AttributeTypeAndValue>| {
        attrs.and_then(|a| a.as_str().ok()).unwrap_or_default().to_owned()
    };
    let validity = cert.validity();
    Ok(CertInfo {
        unit: first(subject.iter_organizational_unit().next()),
        name: first(subject.iter_common_name().next()),
        serial: hex::encode(cert.raw_serial()),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// [`inspect`] of the first certificate of a PEM text.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, PkiError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Invalid(e.to_string()))?;
    inspect(&p.contents)
}

/// Writes a private key readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io { path: path.to_owned(), source };
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io)?;
    // The mode applies only on creation; tighten an existing file too.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)
}

pub fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

pub fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_and_reads_back_identities() {
        let ca = new_ca("test", 10).unwrap();
        let agent = issue_client(&ca, Kind::Agent, "pi-01", 10).unwrap();
        let der = pem_to_der(&agent.cert);
        assert_eq!(identity(&der).unwrap(), ("agent".into(), "pi-01".into()));

        let (csr, _key) = new_agent_request("board-7").unwrap();
        // The name the coordinator signs is its own choice, not the request's.
        let signed = sign_agent_request(&ca, &csr, "board-7", 86400).unwrap();
        assert_eq!(identity(&pem_to_der(&signed)).unwrap(), ("agent".into(), "board-7".into()));
        assert!(sign_agent_request(&ca, "not a csr", "x", 1).is_err());
    }

    #[test]
    fn serials_are_random_and_read_back() {
        let ca = new_ca("test", 10).unwrap();
        let (csr, _key) = new_agent_request("board-7").unwrap();
        let a = inspect_pem(&sign_agent_request(&ca, &csr, "board-7", 10 * 86400).unwrap()).unwrap();
        let b = inspect_pem(&sign_agent_request(&ca, &csr, "board-7", 10 * 86400).unwrap()).unwrap();
        // The same key and name signed twice still gives two serials.
        assert_ne!(a.serial, b.serial);
        assert_eq!(a.serial.len(), 32, "{}", a.serial);
        assert_eq!((a.unit.as_str(), a.name.as_str()), ("agent", "board-7"));
        // Ten days, back-dated five minutes for clock skew.
        assert_eq!(a.not_after - a.not_before, 10 * 86_400 + 300);
        // A short life is back-dated a tenth of it, so two thirds falls after issue.
        let short = inspect_pem(&sign_agent_request(&ca, &csr, "board-7", 60).unwrap()).unwrap();
        assert_eq!(short.not_after - short.not_before, 66);
        let offline = inspect_pem(&issue_client(&ca, Kind::Agent, "board-7", 10).unwrap().cert).unwrap();
        assert_ne!(offline.serial, a.serial);
        assert!(inspect_pem("not a certificate").is_err());
    }

    #[test]
    fn private_keys_are_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, "secret").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }
}
