//! The cluster's small PKI: a CA, the coordinator's server certificate, and
//! client certificates whose subject says who holds them (`OU=agent` or
//! `OU=client`, `CN=<name>`).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
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
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(days);
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

fn client_params(kind: Kind, name: &str, days: i64) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
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

/// A key and a signing request for an agent that joins with a token.
pub fn new_agent_request(name: &str) -> Result<(String, zeroize::Zeroizing<String>), PkiError> {
    let key = KeyPair::generate()?;
    let csr = client_params(Kind::Agent, name, 1)?.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem().into()))
}

/// Signs a joining agent's request as an agent certificate for `name`; only
/// the request's public key is used, never its claimed extensions.
pub fn sign_agent_request(ca: &Pem, csr_pem: &str, name: &str, days: i64) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let cert = client_params(Kind::Agent, name, days)?.signed_by(&csr.public_key, &issuer(ca)?)?;
    Ok(cert.pem())
}

/// (OU, CN) of a DER certificate, as presented by a peer.
pub fn identity(der: &[u8]) -> Result<(String, String), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let subject = cert.subject();
    let first = |attrs: Option<&x509_parser::x509::AttributeTypeAndValue>| {
        attrs.and_then(|a| a.as_str().ok()).unwrap_or_default().to_owned()
    };
    Ok((first(subject.iter_organizational_unit().next()), first(subject.iter_common_name().next())))
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
        let signed = sign_agent_request(&ca, &csr, "board-7", 10).unwrap();
        assert_eq!(identity(&pem_to_der(&signed)).unwrap(), ("agent".into(), "board-7".into()));
        assert!(sign_agent_request(&ca, "not a csr", "x", 1).is_err());
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
