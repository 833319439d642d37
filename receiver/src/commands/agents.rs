//! `agents`: every server's identity (certificate, token or revoked), its host and its last
//! contact, and the enrolment codes not used yet.

use super::{fmt_age, fmt_utc, print_table};
use crate::catalog::Catalog;
use crate::identities::{self, Record};
use crate::status::{now_ms, ServerStatus};
use std::collections::BTreeMap;
use std::path::Path;

pub fn run(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let now = now_ms();
    let catalog = Catalog::new(state_dir);
    let mut records: BTreeMap<String, Option<Record>> = BTreeMap::new();
    for r in Record::all(state_dir)? {
        records.insert(r.server.clone(), Some(r));
    }
    for s in catalog.servers()? {
        records.entry(s).or_insert(None);
    }
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (server, record) in &records {
        let st = ServerStatus::load(&catalog.server_dir(server));
        let auth = match record {
            Some(r) if r.revoked_unix_ms.is_some() => "revoked",
            Some(_) => "certificate",
            None => "token",
        };
        let host = match (record, &st) {
            (_, Some(st)) if !st.hostname.is_empty() => st.hostname.clone(),
            (Some(r), _) => r.hostname.clone(),
            _ => String::new(),
        };
        let contact = match &st {
            Some(st) if st.connected => "connected".to_string(),
            Some(st) if st.last_seen_unix_ms > 0 => {
                format!("{} ago", fmt_age(now.saturating_sub(st.last_seen_unix_ms)))
            }
            _ => "never".to_string(),
        };
        let r = record.as_ref();
        let valid_until = r
            .filter(|r| !r.certificate_sha256.is_empty())
            .map(|r| fmt_utc(r.not_after_unix_ms));
        rows.push(vec![
            server.clone(),
            auth.to_string(),
            host.clone(),
            r.filter(|r| r.enrolled_unix_ms > 0)
                .map_or("-".into(), |r| fmt_utc(r.enrolled_unix_ms)),
            valid_until.clone().unwrap_or_else(|| "-".into()),
            contact.clone(),
        ]);
        out.push(serde_json::json!({
            "server": server,
            "auth": auth,
            "hostname": host,
            "certificate_sha256": r.map(|r| r.certificate_sha256.clone()).filter(|c| !c.is_empty()),
            "enrolled_unix_ms": r.map(|r| r.enrolled_unix_ms).filter(|t| *t > 0),
            "certificate_not_after_unix_ms": r.map(|r| r.not_after_unix_ms).filter(|t| *t > 0),
            "revoked_unix_ms": r.and_then(|r| r.revoked_unix_ms),
            "connected": st.as_ref().is_some_and(|s| s.connected),
            "last_contact_unix_ms": st.as_ref().map(|s| s.last_seen_unix_ms).filter(|t| *t > 0),
        }));
    }
    let pending = identities::pending_codes(state_dir, now);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "agents": out,
                "pending_codes": pending
                    .iter()
                    .map(|c| serde_json::json!({
                        "server": c.server,
                        "expires_unix_ms": c.expires_unix_ms,
                    }))
                    .collect::<Vec<_>>(),
            }))?
        );
        return Ok(());
    }
    if rows.is_empty() {
        println!("no agents yet (enrol one: lifeboat-receiver enroll --server <id>)");
    } else {
        print_table(
            &[
                "SERVER",
                "AUTH",
                "HOST",
                "ENROLLED (UTC)",
                "CERTIFICATE UNTIL (UTC)",
                "LAST CONTACT",
            ],
            &rows,
        );
    }
    for c in &pending {
        println!(
            "code pending for server {}: expires {} UTC",
            c.server,
            fmt_utc(c.expires_unix_ms)
        );
    }
    Ok(())
}
