//! `braid build --secret`: the values read on the client, refused by name
//! before anything is uploaded.

use anyhow::bail;
use braid_shared::proto;

use crate::conn::Conn;

/// `--secret`: parsed and read before anything is uploaded. Errors name the
/// id and the file or variable, never a value.
pub fn read(raw: &[String], conn: &Conn) -> anyhow::Result<(Vec<proto::SecretRef>, Vec<proto::SecretValue>)> {
    use braid_shared::{limits, secrets};
    if raw.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    if raw.len() > limits::SECRETS {
        bail!("--secret: more than the limit of {} secrets", limits::SECRETS);
    }
    if !conn.may_carry_secrets() {
        bail!(
            "--secret: the coordinator is reached over plain HTTP on a non-loopback address; secrets go only over TLS (https://) or to loopback"
        );
    }
    let mut refs = Vec::new();
    let mut values = Vec::new();
    for r in raw {
        let flag = secrets::parse(r)?;
        let value = secrets::read(&flag, |k| std::env::var(k).ok())?;
        refs.push(proto::SecretRef { id: flag.id.clone(), provided: true });
        values.push(proto::SecretValue { id: flag.id, value });
    }
    secrets::check_refs(&refs)?;
    secrets::check_values(&refs, &values)?;
    Ok((refs, values))
}
