//! Leases: which receiver of a fleet owns a source server, decided by S3 conditional writes.
//!
//! One object per server, `leases/<server>.json`, holding who owns it and where agents reach
//! that receiver. The rules:
//!
//! - **Take a free lease** with `If-None-Match: *` (no object yet) or `If-Match` on the ETag of
//!   a released one: of receivers racing for it, S3 lets exactly one write win.
//! - **Renew** with `If-Match` on the ETag of the holder's last write, every third of the lease
//!   period. A renewal that fails in any way (refused, timed out, an error) ends the holding at
//!   once: the holder stops acknowledging that server before it knows whether it lost.
//! - **Take over** a lease whose ETag has not changed for a whole lease period as seen by the
//!   taker's own monotonic clock, with `If-Match` on that ETag (so again one taker wins).
//!   No receiver's wall clock is trusted: the body's times are for people.
//! - **Release** by writing a released body with `If-Match`, never by a blind delete.
//!
//! Why it is safe: the holder counts its lease valid until `sent + period − margin`, where
//! `sent` is when it sent its last successful renewal; the write took effect after `sent`, so a
//! taker first saw that ETag after `sent` and waits a whole period from then. Monotonic clocks
//! run at nearly one rate (NTP slews them within 500 ppm), which the margin covers.
//!
//! The decisions ([`decide`]) are pure and tested without a bucket; [`Leases`] does the I/O.

use crate::aws::retry::CallError;
use crate::aws::s3::{Condition, PutError, S3};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// A moment on the boot-time clock (`CLOCK_BOOTTIME`): monotonic like `Instant`, and unlike it
/// still counting while the machine is suspended, so a receiver resumed after a long suspend
/// sees that its leases ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Moment(Duration);

impl Moment {
    pub fn now() -> Moment {
        Moment(crate::sys::boottime())
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn duration_since(&self, earlier: Moment) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn saturating_duration_since(&self, earlier: Moment) -> Duration {
        self.duration_since(earlier)
    }
}

impl std::ops::Add<Duration> for Moment {
    type Output = Moment;
    fn add(self, d: Duration) -> Moment {
        Moment(self.0.saturating_add(d))
    }
}

impl std::ops::Sub<Duration> for Moment {
    type Output = Moment;
    fn sub(self, d: Duration) -> Moment {
        Moment(self.0.saturating_sub(d))
    }
}

/// What a lease object says (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseBody {
    /// The receiver holding it ("" once released).
    pub holder: String,
    /// Which run of that receiver: a process of its own, or a clone of its machine with the
    /// same id, is another holder, never "us".
    pub incarnation: String,
    /// Where agents reach that receiver (host:port).
    pub address: String,
    /// The lease period the holder keeps, milliseconds.
    pub period_ms: u64,
    /// The holder's wall clock at the write (for people only).
    pub written_unix_ms: u64,
}

/// The lease of a server as the bucket has it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Current {
    Absent,
    Present { etag: String, body: LeaseBody },
}

/// When this receiver first saw a lease's ETag (its own monotonic clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub etag: String,
    pub since: Moment,
}

/// What to do about a server's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write ours under this condition.
    Write(Condition),
    /// Someone else holds it: the agent belongs there.
    Owned {
        holder: String,
        address: String,
        /// When it becomes takeable if nothing changes.
        takeable_at: Moment,
    },
}

/// Longest period a lease body may claim: a garbled or hostile one cannot hold a server
/// forever (or overflow the clock).
const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// The decision for `me` (receiver id, incarnation) given the lease as read now and what was
/// observed of it before. `observed` is updated: a new ETag restarts the wait.
pub fn decide(
    me: (&str, &str),
    current: &Current,
    observed: &mut Option<Observed>,
    now: Moment,
    period: Duration,
) -> Decision {
    match current {
        Current::Absent => {
            *observed = None;
            Decision::Write(Condition::Absent)
        }
        Current::Present { etag, body } => {
            if body.holder.is_empty() || (body.holder == me.0 && body.incarnation == me.1) {
                // Released, or ours from before (a restart): write over exactly this version.
                *observed = None;
                return Decision::Write(Condition::ETag(etag.clone()));
            }
            let since = match observed {
                Some(o) if o.etag == *etag => o.since,
                _ => {
                    *observed = Some(Observed {
                        etag: etag.clone(),
                        since: now,
                    });
                    now
                }
            };
            // The holder's own period if longer than ours: never take a lease early because
            // two receivers were configured differently.
            let wait = period.max(Duration::from_millis(body.period_ms).min(MAX_PERIOD));
            if now.duration_since(since) >= wait {
                Decision::Write(Condition::ETag(etag.clone()))
            } else {
                Decision::Owned {
                    holder: body.holder.clone(),
                    address: body.address.clone(),
                    takeable_at: since + wait,
                }
            }
        }
    }
}

/// A lease this receiver holds.
#[derive(Clone, Debug)]
pub struct Held {
    pub etag: String,
    /// Until when it may act for the server (monotonic).
    pub valid_until: Moment,
}

impl Held {
    pub fn valid(&self, now: Moment) -> bool {
        now < self.valid_until
    }
}

/// The outcome of [`Leases::acquire`].
#[derive(Clone, Debug)]
pub enum Acquired {
    Held(Held),
    Owned {
        holder: String,
        address: String,
        takeable_at: Moment,
    },
    /// Another receiver's conditional write won the race.
    Lost,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease of server {server}: {source}")]
    Call { server: String, source: CallError },
    #[error("lease of server {server}: the object is not a lease ({why})")]
    Garbled { server: String, why: String },
}

/// The leases of one receiver in one bucket.
pub struct Leases {
    s3: S3,
    me: String,
    incarnation: String,
    address: String,
    period: Duration,
    observed: Mutex<HashMap<String, Observed>>,
}

impl Leases {
    /// `me`: this receiver's id (unique in the fleet); `address`: where agents reach it.
    pub fn new(s3: S3, me: &str, address: &str, period: Duration) -> Leases {
        Leases {
            s3,
            me: me.to_string(),
            incarnation: hex::encode(rand::random::<[u8; 8]>()),
            address: address.to_string(),
            period,
            observed: Default::default(),
        }
    }

    /// Where agents reach this receiver (what its lease bodies say).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// This receiver's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// This run of this receiver (see [`LeaseBody::incarnation`]).
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// Ends a lease whose holder stopped renewing it (a fleet sweep waits for no dead
    /// holder): a released body written over exactly the version `etag`, so the holder's
    /// next renewal fails. False if it changed meanwhile (its holder renewed it after all).
    pub async fn end_stale(&self, server: &str, etag: &str) -> Result<bool, LeaseError> {
        match self
            .s3
            .put(
                &Self::key(server),
                self.body(""),
                &Condition::ETag(etag.to_string()),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(PutError::Lost | PutError::Conflict) => Ok(false),
            Err(PutError::Failed(source)) => Err(LeaseError::Call {
                server: server.to_string(),
                source,
            }),
        }
    }

    /// Room left for clock-rate differences and the request's own time.
    fn margin(&self) -> Duration {
        self.period / 10
    }

    fn key(server: &str) -> String {
        format!("leases/{server}.json")
    }

    fn body(&self, holder: &str) -> Vec<u8> {
        let b = LeaseBody {
            holder: holder.to_string(),
            incarnation: self.incarnation.clone(),
            address: self.address.clone(),
            // Rounded up: a taker never waits less than the holder counts.
            period_ms: self.period.as_micros().div_ceil(1000).min(u64::MAX as u128) as u64,
            written_unix_ms: crate::status::now_ms(),
        };
        // A plain struct of strings and integers always serializes.
        serde_json::to_vec_pretty(&b).unwrap_or_default()
    }

    /// The lease as the bucket has it.
    pub async fn current(&self, server: &str) -> Result<Current, LeaseError> {
        let got = self
            .s3
            .get(&Self::key(server))
            .await
            .map_err(|source| LeaseError::Call {
                server: server.to_string(),
                source,
            })?;
        match got {
            None => Ok(Current::Absent),
            Some((raw, etag)) => {
                let body = serde_json::from_slice(&raw).map_err(|e| LeaseError::Garbled {
                    server: server.to_string(),
                    why: e.to_string(),
                })?;
                Ok(Current::Present { etag, body })
            }
        }
    }

    /// Takes the server's lease if it is free, released, ours, or unchanged for a whole period.
    pub async fn acquire(&self, server: &str) -> Result<Acquired, LeaseError> {
        let current = self.current(server).await?;
        let now = Moment::now();
        let decision = {
            let mut map = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            let mut o = map.remove(server);
            let d = decide(
                (&self.me, &self.incarnation),
                &current,
                &mut o,
                now,
                self.period,
            );
            if let Some(o) = o {
                map.insert(server.to_string(), o);
            }
            d
        };
        match decision {
            Decision::Owned {
                holder,
                address,
                takeable_at,
            } => Ok(Acquired::Owned {
                holder,
                address,
                takeable_at,
            }),
            Decision::Write(cond) => self.write(server, &cond).await,
        }
    }

    /// Renews a held lease. Any failure ends it: the caller must stop acting for the server.
    pub async fn renew(&self, server: &str, held: &Held) -> Result<Held, LeaseError> {
        match self
            .write(server, &Condition::ETag(held.etag.clone()))
            .await?
        {
            Acquired::Held(h) => Ok(h),
            _ => Err(LeaseError::Call {
                server: server.to_string(),
                source: CallError::Permanent {
                    op: "PutObject",
                    what: self.s3.url(&Self::key(server)),
                    status: Some(412),
                    code: Some("PreconditionFailed".into()),
                    message: "another receiver took the lease".into(),
                },
            }),
        }
    }

    /// Gives the lease up (a released body, written only over our own version).
    pub async fn release(&self, server: &str, held: &Held) -> Result<(), LeaseError> {
        let r = self
            .s3
            .put(
                &Self::key(server),
                self.body(""),
                &Condition::ETag(held.etag.clone()),
            )
            .await;
        match r {
            Ok(_) | Err(PutError::Lost | PutError::Conflict) => Ok(()),
            Err(PutError::Failed(source)) => Err(LeaseError::Call {
                server: server.to_string(),
                source,
            }),
        }
    }

    async fn write(&self, server: &str, cond: &Condition) -> Result<Acquired, LeaseError> {
        let sent = Moment::now();
        match self
            .s3
            .put(&Self::key(server), self.body(&self.me), cond)
            .await
        {
            Ok(etag) => Ok(Acquired::Held(Held {
                etag,
                valid_until: sent + self.period.saturating_sub(self.margin()),
            })),
            Err(PutError::Lost | PutError::Conflict) => Ok(Acquired::Lost),
            Err(PutError::Failed(source)) => Err(LeaseError::Call {
                server: server.to_string(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, etag: &str) -> Current {
        Current::Present {
            etag: etag.into(),
            body: LeaseBody {
                holder: holder.into(),
                incarnation: "i1".into(),
                address: "10.0.0.1:7443".into(),
                period_ms: 30_000,
                written_unix_ms: 0,
            },
        }
    }

    #[test]
    fn a_lease_is_taken_only_after_a_whole_period_without_change() {
        let p = Duration::from_secs(30);
        let t0 = Moment::now();
        let mut o = None;
        assert_eq!(
            decide(("b", "i1"), &Current::Absent, &mut o, t0, p),
            Decision::Write(Condition::Absent)
        );
        let cur = held_by("a", "e1");
        assert!(matches!(
            decide(("b", "i1"), &cur, &mut o, t0, p),
            Decision::Owned { takeable_at, .. } if takeable_at == t0 + p
        ));
        assert!(matches!(
            decide(
                ("b", "i1"),
                &cur,
                &mut o,
                t0 + p - Duration::from_millis(1),
                p
            ),
            Decision::Owned { .. }
        ));
        // A renewal (a new ETag) restarts the wait.
        let renewed = held_by("a", "e2");
        let t1 = t0 + Duration::from_secs(20);
        assert!(matches!(
            decide(("b", "i1"), &renewed, &mut o, t1, p),
            Decision::Owned { .. }
        ));
        assert!(matches!(
            decide(("b", "i1"), &renewed, &mut o, t0 + p, p),
            Decision::Owned { .. }
        ));
        assert_eq!(
            decide(("b", "i1"), &renewed, &mut o, t1 + p, p),
            Decision::Write(Condition::ETag("e2".into()))
        );
    }

    #[test]
    fn released_and_own_leases_are_written_over_their_version_and_longer_periods_are_kept() {
        let p = Duration::from_secs(10);
        let t0 = Moment::now();
        let mut o = None;
        assert_eq!(
            decide(("a", "i1"), &held_by("a", "e1"), &mut o, t0, p),
            Decision::Write(Condition::ETag("e1".into()))
        );
        assert_eq!(
            decide(("b", "i1"), &held_by("", "e3"), &mut o, t0, p),
            Decision::Write(Condition::ETag("e3".into()))
        );
        // The holder keeps 30 s; a taker configured with 10 s still waits 30.
        let cur = held_by("a", "e4");
        let _ = decide(("b", "i1"), &cur, &mut o, t0, p);
        assert!(matches!(
            decide(("b", "i1"), &cur, &mut o, t0 + Duration::from_secs(29), p),
            Decision::Owned { .. }
        ));
        assert!(matches!(
            decide(("b", "i1"), &cur, &mut o, t0 + Duration::from_secs(30), p),
            Decision::Write(_)
        ));
    }

    #[test]
    fn our_id_in_another_incarnation_and_absurd_periods_are_someone_else() {
        let p = Duration::from_secs(10);
        let t0 = Moment::now();
        let mut o = None;
        // A clone of this machine (same id, another run) holds it: wait like for anyone.
        assert!(matches!(
            decide(("a", "i2"), &held_by("a", "e1"), &mut o, t0, p),
            Decision::Owned { .. }
        ));
        let mut greedy = held_by("x", "e9");
        if let Current::Present { body, .. } = &mut greedy {
            body.period_ms = u64::MAX;
        }
        let mut o = None;
        let _ = decide(("b", "i1"), &greedy, &mut o, t0, p);
        assert!(matches!(
            decide(("b", "i1"), &greedy, &mut o, t0 + MAX_PERIOD, p),
            Decision::Write(_)
        ));
    }

    #[test]
    fn a_holder_counts_its_lease_shorter_than_any_taker_waits() {
        let held = Held {
            etag: "e".into(),
            valid_until: Moment::now() + Duration::from_secs(27),
        };
        assert!(held.valid(Moment::now()));
        assert!(!held.valid(Moment::now() + Duration::from_secs(28)));
    }
}
