//! DSSE envelopes over provenance statements: signed by the coordinator's
//! provenance key (ECDSA P-256, SHA-256, over DSSE's pre-authentication
//! encoding), carrying the signing certificate so a verifier needs only
//! the cluster CA.
//!
//! An envelope is DSSE's JSON (`payloadType`, `payload`, `signatures[]` of
//! `keyid` and `sig`), with the signer's PEM certificate in each
//! signature's `cert` field (an extension DSSE verifiers ignore).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rcgen::{KeyPair, SigningKey as _};
use serde::{Deserialize, Serialize};

use crate::pki::{self, PROVENANCE_UNIT, PkiError};

/// DSSE's pre-authentication encoding: what is signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 of the payload bytes.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    /// Base64 of the ASN.1 DER ECDSA signature over [`pae`].
    pub sig: String,
    /// The signer's certificate, PEM.
    #[serde(default)]
    pub cert: String,
}

/// The coordinator's provenance key and certificate.
pub struct Signer {
    key: KeyPair,
    cert: String,
    keyid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("keyid", &self.keyid).finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from PEM texts: the certificate must be a provenance
    /// certificate for this key.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Signer, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let info = pki::inspect_pem(cert_pem)?;
        if info.unit != PROVENANCE_UNIT {
            return Err(PkiError::Invalid(format!(
                "the provenance certificate's OU is {:?}, not {PROVENANCE_UNIT:?} (issue one with braid certs issue \
                 --kind provenance)",
                info.unit
            )));
        }
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| PkiError::Invalid(e.to_string()))?;
        let cert = pem.parse_x509().map_err(|e| PkiError::Invalid(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::Invalid("the provenance certificate is not for this key".into()));
        }
        let keyid = keyid(cert.public_key().raw);
        Ok(Signer { key, cert: cert_pem.to_owned(), keyid })
    }

    /// Reads a signer from its key and certificate files.
    pub fn load(key: &std::path::Path, cert: &std::path::Path) -> Result<Signer, PkiError> {
        let key_pem = zeroize::Zeroizing::new(pki::read(key)?);
        Signer::from_pem(&key_pem, &pki::read(cert)?)
    }

    /// The envelope over `payload`, as JSON bytes.
    pub fn sign(&self, payload_type: &str, payload: &[u8]) -> Result<Vec<u8>, PkiError> {
        let sig = self.key.sign(&pae(payload_type, payload))?;
        let envelope = Envelope {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: vec![Signature { keyid: self.keyid.clone(), sig: B64.encode(sig), cert: self.cert.clone() }],
        };
        serde_json::to_vec(&envelope).map_err(|e| PkiError::Invalid(e.to_string()))
    }
}

/// `sha256:` of a certificate's subject public key info.
fn keyid(spki: &[u8]) -> String {
    format!("sha256:{}", crate::Digest::of(spki).hex())
}

/// A verified envelope: its payload and who signed it.
#[derive(Debug)]
pub struct Verified {
    pub payload_type: String,
    pub payload: Vec<u8>,
    /// The signing certificate's CN and serial.
    pub signer: String,
}

/// Checks an envelope against the cluster CA (PEM): one signature by a
/// provenance certificate the CA issued, valid now, over the payload.
pub fn verify(envelope: &[u8], ca_pem: &str) -> Result<Verified, String> {
    let envelope: Envelope = serde_json::from_slice(envelope).map_err(|e| format!("not a DSSE envelope: {e}"))?;
    let payload = B64.decode(&envelope.payload).map_err(|e| format!("payload: {e}"))?;
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).map_err(|e| format!("the CA: {e}"))?;
    let ca = ca.parse_x509().map_err(|e| format!("the CA: {e}"))?;
    let mut why = "no signature".to_owned();
    for s in &envelope.signatures {
        match check_signature(s, &ca, &pae(&envelope.payload_type, &payload)) {
            Ok(signer) => return Ok(Verified { payload_type: envelope.payload_type, payload, signer }),
            Err(e) => why = e,
        }
    }
    Err(why)
}

fn check_signature(
    s: &Signature,
    ca: &x509_parser::certificate::X509Certificate<'_>,
    signed: &[u8],
) -> Result<String, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(s.cert.as_bytes()).map_err(|e| format!("signer certificate: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| format!("signer certificate: {e}"))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| "the signer's certificate was not issued by the cluster CA".to_owned())?;
    if !cert.validity().is_valid() {
        return Err("the signer's certificate is expired or not yet valid".into());
    }
    let info = pki::inspect(pem.contents.as_slice()).map_err(|e| e.to_string())?;
    if info.unit != PROVENANCE_UNIT {
        return Err(format!("the signer's certificate is not a provenance certificate (OU={:?})", info.unit));
    }
    let sig = B64.decode(&s.sig).map_err(|e| format!("signature: {e}"))?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(signed, &sig).map_err(|_| "the signature does not match the statement".to_owned())?;
    Ok(format!("{} (serial {})", info.name, info.serial))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pki::{Kind, issue_client, new_ca};

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(pae("a/b", b"hello"), b"DSSEv1 3 a/b 5 hello");
    }

    #[test]
    fn signs_and_verifies_against_the_ca_only() {
        let ca = new_ca("test", 10).unwrap();
        let issued = pki::issue_provenance(&ca, "coordinator", 10).unwrap();
        let signer = Signer::from_pem(&issued.key, &issued.cert).unwrap();
        let envelope = signer.sign("application/vnd.in-toto+json", b"{\"a\":1}").unwrap();
        let ok = verify(&envelope, &ca.cert).unwrap();
        assert_eq!(ok.payload, b"{\"a\":1}");
        assert!(ok.signer.starts_with("coordinator (serial "), "{}", ok.signer);

        // Another CA, a changed payload, a changed type: refused.
        let other = new_ca("other", 10).unwrap();
        assert!(verify(&envelope, &other.cert).unwrap_err().contains("not issued by the cluster CA"));
        let mut e: Envelope = serde_json::from_slice(&envelope).unwrap();
        e.payload = B64.encode(b"{\"a\":2}");
        let err = verify(&serde_json::to_vec(&e).unwrap(), &ca.cert).unwrap_err();
        assert!(err.contains("does not match"), "{err}");

        // An agent's certificate from the same CA cannot sign provenance.
        let agent = issue_client(&ca, Kind::Agent, "pi-01", 10).unwrap();
        assert!(Signer::from_pem(&agent.key, &agent.cert).unwrap_err().to_string().contains("OU is \"agent\""));
        let key = KeyPair::from_pem(&agent.key).unwrap();
        let forged = Envelope {
            payload_type: "t".into(),
            payload: B64.encode(b"x"),
            signatures: vec![Signature {
                keyid: String::new(),
                sig: B64.encode(key.sign(&pae("t", b"x")).unwrap()),
                cert: agent.cert.clone(),
            }],
        };
        let err = verify(&serde_json::to_vec(&forged).unwrap(), &ca.cert).unwrap_err();
        assert!(err.contains("not a provenance certificate"), "{err}");
        // A key with someone else's certificate is refused at load.
        assert!(Signer::from_pem(&agent.key, &issued.cert).unwrap_err().to_string().contains("not for this key"));
    }
}
