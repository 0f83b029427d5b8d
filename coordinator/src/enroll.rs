//! Which agent certificates the coordinator accepts: serials recorded at
//! Join (or the first time an offline-issued certificate is presented),
//! revoked by `braid agents forget` or by a newer certificate of the name.
//!
//! Invariant kept by the store's transactions: a name has at most one
//! unrevoked serial, its current certificate.

use braid_shared::pki::CertInfo;

use crate::error::{CoordinatorError, Result};
pub use crate::model::CertStamp;
use crate::model::{TokenRecord, now_ms};
use crate::store::{CertRow, JoinOutcome, OfflineOutcome};
use crate::stores::Store;

/// An accepted agent certificate.
#[derive(Debug, Clone)]
pub struct AgentCert {
    pub name: String,
    pub stamp: CertStamp,
    /// It was recorded by this call and revoked earlier serials of the name:
    /// a session holding one of those must be closed.
    pub superseded: bool,
}

fn row(info: &CertInfo, source: &str) -> CertRow {
    CertRow {
        serial: info.serial.clone(),
        name: info.name.clone(),
        not_before: info.not_before,
        not_after: info.not_after,
        issued_ms: now_ms(),
        source: source.to_owned(),
        revoked: false,
    }
}

fn accepted(info: &CertInfo, r: &CertRow, superseded: bool) -> Result<AgentCert> {
    if r.revoked {
        return Err(CoordinatorError::Unauthenticated(format!(
            "certificate serial {} of agent {:?} was revoked (braid agents forget, or a newer certificate of that name)",
            r.serial, r.name
        )));
    }
    if r.name != info.name {
        // Serials are random: a clash means a forged or foreign certificate.
        return Err(CoordinatorError::Unauthenticated(format!(
            "certificate serial {} was recorded for agent {:?}, not {:?}",
            r.serial, r.name, info.name
        )));
    }
    Ok(AgentCert {
        name: info.name.clone(),
        stamp: CertStamp { serial: r.serial.clone(), issued_ms: r.issued_ms },
        superseded,
    })
}

/// Checks an agent certificate (already verified against the cluster CA)
/// on every call that presents one. A recorded serial is accepted unless
/// revoked. An unrecorded one was renewed (`Renew`) or issued offline
/// (`braid certs issue`): it
/// is recorded as the name's current certificate if its notBefore is later
/// than the current one's and than the last `forget` of the name, and
/// refused otherwise.
pub fn check_certificate(store: &Store, info: &CertInfo) -> Result<AgentCert> {
    if let Some(known) = store.cert_by_serial(&info.serial)? {
        return accepted(info, &known, false);
    }
    match store.record_offline_cert(&row(info, "offline"))? {
        OfflineOutcome::Recorded { row, revoked } => {
            tracing::info!(agent = %row.name, serial = %row.serial, revoked, "recorded a newer agent certificate (renewed, or issued offline)");
            accepted(info, &row, revoked > 0)
        }
        OfflineOutcome::Known(known) => accepted(info, &known, false),
        OfflineOutcome::NotNewer(current) => Err(CoordinatorError::AlreadyExists(format!(
            "agent {:?} is enrolled with certificate serial {}; certificate serial {} is not newer and was never \
             recorded, so it may not act as that agent (braid agents forget {0} first, or issue a new one)",
            info.name, current.serial, info.serial
        ))),
        OfflineOutcome::Forgotten { at } => Err(CoordinatorError::Unauthenticated(format!(
            "certificate serial {} of agent {:?} was revoked: it was issued before the agent was forgotten at {at} \
             (unix seconds)",
            info.serial, info.name
        ))),
    }
}

/// Records the certificate a Join signed, spending the token: refused if
/// the name is enrolled and the token may not replace it.
pub fn record_join(store: &Store, token: &TokenRecord, cert: &CertInfo) -> Result<u32> {
    let replace = token.replace && token.agent_name.as_deref() == Some(cert.name.as_str());
    match store.enroll_with_token(&token.id, token.single_use, replace, &row(cert, "join"))? {
        JoinOutcome::Enrolled { revoked } => Ok(revoked),
        JoinOutcome::AlreadyEnrolled(current) => {
            Err(already_enrolled(&cert.name, &format!(" (certificate serial {})", current.serial)))
        }
        JoinOutcome::TokenUsed => {
            Err(CoordinatorError::Unauthenticated(format!("token {} was already used", token.id)))
        }
    }
}

/// Refuses a Join of an enrolled name early, before anything is signed. A
/// name counts as enrolled when it has an unrevoked certificate, and also
/// when the farm knows it (`in_farm`: connected, lost or holding jobs) though
/// its certificate was never recorded (one from before serials were kept).
pub fn check_not_enrolled(store: &Store, token: &TokenRecord, name: &str, in_farm: bool) -> Result<()> {
    let replace = token.replace && token.agent_name.as_deref() == Some(name);
    if replace {
        return Ok(());
    }
    match store.current_cert(name)? {
        Some(current) => Err(already_enrolled(name, &format!(" (certificate serial {})", current.serial))),
        None if in_farm => Err(already_enrolled(name, " (it is known to the farm)")),
        None => Ok(()),
    }
}

fn already_enrolled(name: &str, why: &str) -> CoordinatorError {
    CoordinatorError::AlreadyExists(format!(
        "agent {name:?} is already enrolled{why}; to enroll it again, run `braid agents forget {name}` first, \
         or join with a token created with `--name {name} --replace`"
    ))
}

/// Revokes every serial of `name` (`braid agents forget`); returns how many.
pub fn forget(store: &Store, name: &str) -> Result<u32> {
    store.forget_agent(name, now_ms() / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn info(name: &str, serial: &str, not_before: i64) -> CertInfo {
        CertInfo {
            unit: "agent".into(),
            name: name.into(),
            serial: serial.into(),
            not_before,
            not_after: not_before + 86_400,
        }
    }

    fn token(store: &Arc<Store>, single_use: bool, agent_name: Option<&str>, replace: bool) -> TokenRecord {
        let tokens = crate::auth::Tokens::new(store.clone(), true);
        tokens.create(crate::auth::Role::Agent, 0, single_use, "", agent_name, replace).unwrap().0
    }

    fn code(e: CoordinatorError) -> (tonic::Code, String) {
        let s = tonic::Status::from(e);
        (s.code(), s.message().to_owned())
    }

    #[test]
    fn a_name_is_enrolled_once_unless_forgotten_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("braid.db")).unwrap());
        let now = now_ms() / 1000;
        let any = token(&store, false, None, false);
        let first = info("pi-01", "aa01", now - 300);
        assert_eq!(record_join(&store, &any, &first).unwrap(), 0);
        assert!(!check_certificate(&store, &first).unwrap().superseded);

        // A second Join of the name, before and at the recording.
        let second = info("pi-01", "aa02", now - 299);
        let (c, m) = code(check_not_enrolled(&store, &any, "pi-01", false).unwrap_err());
        assert_eq!(c, tonic::Code::AlreadyExists);
        assert!(m.contains("braid agents forget pi-01") && m.contains("--replace"), "{m}");
        let single = token(&store, true, None, false);
        assert_eq!(code(record_join(&store, &single, &second).unwrap_err()).0, tonic::Code::AlreadyExists);
        // Refused, so the single-use token was not spent.
        assert_eq!(record_join(&store, &single, &info("pi-02", "bb01", now)).unwrap(), 0);
        assert_eq!(
            code(record_join(&store, &single, &info("pi-03", "cc01", now)).unwrap_err()).0,
            tonic::Code::Unauthenticated
        );

        // --replace of another name does not replace this one.
        let other = token(&store, false, Some("pi-09"), true);
        assert!(check_not_enrolled(&store, &other, "pi-01", false).is_err());
        // A name the farm knows but never recorded (an agent from before
        // serials were kept) is enrolled too.
        assert_eq!(code(check_not_enrolled(&store, &any, "old-1", true).unwrap_err()).0, tonic::Code::AlreadyExists);
        assert!(check_not_enrolled(&store, &any, "new-1", false).is_ok());
        // --replace for this name does, revoking the first certificate.
        let replace = token(&store, false, Some("pi-01"), true);
        assert_eq!(record_join(&store, &replace, &second).unwrap(), 1);
        let (c, m) = code(check_certificate(&store, &first).unwrap_err());
        assert_eq!(c, tonic::Code::Unauthenticated);
        assert!(m.contains("serial aa01 of agent \"pi-01\" was revoked"), "{m}");
        assert!(check_certificate(&store, &second).is_ok());

        // Forget revokes it; a fresh token enrolls the name again.
        assert_eq!(forget(&store, "pi-01").unwrap(), 1);
        assert_eq!(code(check_certificate(&store, &second).unwrap_err()).0, tonic::Code::Unauthenticated);
        let third = info("pi-01", "aa03", now);
        assert_eq!(record_join(&store, &any, &third).unwrap(), 0);
        assert!(check_certificate(&store, &third).is_ok());
    }

    #[test]
    fn offline_certificates_are_recorded_when_newer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("braid.db")).unwrap());
        let now = now_ms() / 1000;
        let first = info("arm-1", "0a", now - 1000);
        let accepted = check_certificate(&store, &first).unwrap();
        assert!(!accepted.superseded);
        // The same certificate again: the same stamp.
        assert_eq!(check_certificate(&store, &first).unwrap().stamp, accepted.stamp);
        // Older or as old, and unrecorded: refused, the first stays.
        let (c, m) = code(check_certificate(&store, &info("arm-1", "0b", now - 2000)).unwrap_err());
        assert_eq!(c, tonic::Code::AlreadyExists);
        assert!(m.contains("serial 0a") && m.contains("serial 0b"), "{m}");
        assert!(check_certificate(&store, &info("arm-1", "0c", now - 1000)).is_err());
        // Newer: it supersedes the first.
        let newer = check_certificate(&store, &info("arm-1", "0d", now - 10)).unwrap();
        assert!(newer.superseded);
        assert!(check_certificate(&store, &first).is_err());
        // After a forget, one issued before it is refused, one after accepted.
        forget(&store, "arm-1").unwrap();
        assert_eq!(
            code(check_certificate(&store, &info("arm-1", "0e", now - 5)).unwrap_err()).0,
            tonic::Code::Unauthenticated
        );
        assert!(check_certificate(&store, &info("arm-1", "0f", now + 5)).is_ok());
        // A recorded serial presented under another name is refused.
        assert!(check_certificate(&store, &info("arm-2", "0f", now + 5)).is_err());
    }
}
