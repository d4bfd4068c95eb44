//! The fleet heartbeat (SPEC §8): after every cycle, this gateway's row in
//! central's `gateway_status`, upserted in one round trip.
//!
//! **Architecture Invariant**: the heartbeat never fails a cycle. Whatever goes
//! wrong (central away, the table missing, a privilege revoked, a row-level
//! security policy that refuses the row) is logged once at warn, then at debug
//! until a heartbeat is delivered again, and the cycle's outcome, exit code and
//! `sync_logs` rows are what they would have been without it.
//!
//! Through PgBouncer in transaction pooling mode: the upsert is one statement in
//! its own implicit transaction, sent with `execute_typed` (the unnamed
//! statement, parameter types given, so no Describe round trip and nothing named
//! that could outlive the transaction on a server connection shared with others).
//!
//! Columns whose values come from the gateway's clock (`last_cycle_at`,
//! `oldest_pending_at`) are facts about the gateway; `updated_at` is central's
//! `now()`, so "silent for an hour" is judged by one clock for the whole fleet.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio_postgres::types::{ToSql, Type};

use crate::config::{DbConfig, Side, SslMode};
use crate::db::Db;
use crate::error::Result;
use crate::report::{CycleReport, Phase};
use crate::tls::Traffic;

/// SQLSTATE undefined_table: central has not been migrated to this release yet.
const UNDEFINED_TABLE: &str = "42P01";

/// The longest `last_error` sent: enough for every phase's one-line error, short
/// enough that 10,000 rows stay small.
const MAX_ERROR_CHARS: usize = 2000;

/// Sent every cycle by every gateway, so kept short: the SET list reuses the
/// parameters instead of naming `EXCLUDED.column` (about 300 bytes less on the
/// link per cycle); the column list stays, so the statement does not depend on
/// the table's column order.
const UPSERT: &str = "INSERT INTO gateway_status(gateway_id,version,last_cycle_at,last_cycle_ok,\
     last_error,queue_size,oldest_pending_at,quarantined,cert_expires_at,bytes_up,bytes_down,\
     updated_at)VALUES($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,now())ON CONFLICT(gateway_id)DO UPDATE \
     SET version=$2,last_cycle_at=$3,last_cycle_ok=$4,last_error=$5,queue_size=$6,\
     oldest_pending_at=$7,quarantined=$8,cert_expires_at=$9,bytes_up=$10,bytes_down=$11,\
     updated_at=now()";

/// The local queue as one query sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Waiting for upload: not synchronized, not quarantined.
    pub pending: i64,
    pub quarantined: i64,
    /// The `timestamp` of the oldest waiting reading (None when none waits): the
    /// next reading the upload sends, and how far central's copy is complete.
    pub oldest_pending_at: Option<SystemTime>,
    /// `now() - oldest_pending_at` on the local server's clock, in whole seconds,
    /// never negative (a meter whose clock runs ahead does not make it so).
    pub oldest_pending_age: Option<Duration>,
}

/// Counts the queue and finds its oldest reading, in one local round trip.
///
/// The oldest reading is `min("timestamp")` of the waiting readings rather than
/// of `created_at`: it is the first entry of `meter_readings_pending_idx` (one
/// index probe, however long a week offline made the queue), it is the reading
/// the upload sends next, and it says up to when central's data is complete.
/// `created_at` has no index and may be null for a collector's own rows.
///
/// A reading stamped `-infinity` or `infinity` (PostgreSQL accepts both) has no
/// age and says nothing about how far behind central is: it is counted in the
/// queue but never taken as the oldest. Taken, it made `now() - ts` an error
/// before PostgreSQL 17 (22008), and with it `status` and every cycle's count.
pub async fn queue_state(local: &Db) -> Result<QueueState> {
    use crate::upload::{counts_sql, PENDING};
    let row = local
        .query_one(
            "count the queue",
            &format!(
                "SELECT q.pending, q.quarantined, o.ts, \
                        greatest(0, floor(extract(epoch FROM now() - o.ts)))::bigint \
                 FROM (SELECT {}) q \
                 LEFT JOIN LATERAL (SELECT \"timestamp\" AS ts FROM meter_readings \
                                    WHERE {PENDING} AND isfinite(\"timestamp\") \
                                    ORDER BY \"timestamp\", id LIMIT 1) o ON true",
                counts_sql()
            ),
            &[],
        )
        .await?;
    let age: Option<i64> = row.get(3);
    Ok(QueueState {
        pending: row.get(0),
        quarantined: row.get(1),
        oldest_pending_at: row.get(2),
        oldest_pending_age: age.map(|s| Duration::from_secs(s.max(0) as u64)),
    })
}

/// What one heartbeat says about the cycle that just ended.
#[derive(Clone, Debug)]
pub struct Beat {
    /// When the cycle ended (gateway clock).
    pub at: SystemTime,
    /// Every phase ran and succeeded.
    pub ok: bool,
    /// The failed phases' errors, each after its phase's name.
    pub error: Option<String>,
    /// None when the local database could not be read.
    pub queue: Option<QueueState>,
}

impl Beat {
    /// A beat for a cycle whose phases ended as `phases` says: (name, error).
    /// `complete` is false when the cycle did not run all of its phases (shutdown).
    pub fn of_phases<'a>(
        phases: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
        complete: bool,
        queue: Option<QueueState>,
    ) -> Beat {
        let failed: Vec<String> = phases
            .into_iter()
            .filter_map(|(name, err)| err.map(|e| format!("{name}: {e}")))
            .collect();
        Beat {
            at: SystemTime::now(),
            ok: failed.is_empty() && complete,
            error: (!failed.is_empty()).then(|| truncate(&failed.join("; "), MAX_ERROR_CHARS)),
            queue,
        }
    }

    /// A beat for the cycle `report` describes.
    pub fn of_report(report: &CycleReport, queue: Option<QueueState>) -> Beat {
        Beat::of_phases(
            report
                .phases
                .iter()
                .map(|p| (p.phase.as_str(), p.error.as_deref())),
            report.phases.len() == Phase::ALL.len(),
            queue,
        )
    }

    /// A beat for a cycle that could not start (`why`: the local database is
    /// unreachable, say): central still learns that this gateway is alive and stuck.
    pub fn not_started(why: &str) -> Beat {
        Beat {
            at: SystemTime::now(),
            ok: false,
            error: Some(truncate(&format!("cycle: {why}"), MAX_ERROR_CHARS)),
            queue: None,
        }
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        None => s.to_string(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

/// Where the last heartbeat left things; decides what is worth a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing sent yet, or the last one was delivered.
    Delivering,
    /// Central has no `gateway_status` (not migrated to this release).
    NoTable,
    /// The last one failed otherwise.
    Failing,
}

/// The client certificate's expiry, re-read when the file changes (a renewal is
/// picked up at the next connection, so the heartbeat follows it).
struct CertExpiry {
    db: DbConfig,
    path: Option<PathBuf>,
    modified: Option<SystemTime>,
    expires: Option<SystemTime>,
}

impl CertExpiry {
    fn new(db: &DbConfig) -> CertExpiry {
        let mut c = CertExpiry {
            db: db.clone(),
            path: db.sslcert.clone(),
            modified: None,
            expires: None,
        };
        c.refresh();
        c
    }

    /// One stat per cycle; parses only when the modification time moved.
    fn refresh(&mut self) -> Option<SystemTime> {
        let path = self.path.as_ref()?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified != self.modified || self.expires.is_none() {
            self.modified = modified;
            self.expires = match crate::tls::client_cert_expiry(&self.db) {
                Ok(e) => e,
                Err(e) => {
                    // The configuration refused a bad file at start; a file broken
                    // since then breaks the connection too, which says so.
                    log::debug!("heartbeat: client certificate expiry unknown: {e}");
                    None
                }
            };
        }
        self.expires
    }
}

/// The heartbeat of one daemon: its gateway id, the state of the last delivery,
/// and the byte counts at the start of the cycle.
pub struct Heartbeat {
    gateway_id: String,
    state: State,
    cert: CertExpiry,
    /// Byte counts of central's TLS connections when the cycle started; None when
    /// the central connection is not TLS (sslmode=disable), so none are counted.
    cycle_start: Option<Traffic>,
}

impl Heartbeat {
    /// `central` is the central database's configuration (its client certificate
    /// and sslmode).
    pub fn new(gateway_id: impl Into<String>, central: &DbConfig) -> Heartbeat {
        Heartbeat {
            gateway_id: gateway_id.into(),
            state: State::Delivering,
            cert: CertExpiry::new(central),
            cycle_start: (central.sslmode != SslMode::Disable)
                .then(|| crate::tls::traffic(Side::Central)),
        }
    }

    /// Marks the start of a cycle: `bytes_up` and `bytes_down` count from here.
    pub fn cycle_started(&mut self) {
        if self.cycle_start.is_some() {
            self.cycle_start = Some(crate::tls::traffic(Side::Central));
        }
    }

    /// Upserts this gateway's row on `central`. Logs a failure as the module doc
    /// says and returns it only so that the caller can drop a lost connection;
    /// the caller must not fail anything because of it.
    pub async fn send(&mut self, central: &Db, beat: &Beat) -> Result<()> {
        let traffic = self
            .cycle_start
            .map(|start| crate::tls::traffic(Side::Central).since(start));
        let cert = self.cert.refresh();
        let version = env!("CARGO_PKG_VERSION");
        let queue = beat.queue;
        let pending = queue.map(|q| q.pending);
        let oldest = queue.and_then(|q| q.oldest_pending_at);
        let quarantined = queue.map(|q| q.quarantined);
        let up = traffic.map(|t| i64::try_from(t.up).unwrap_or(i64::MAX));
        let down = traffic.map(|t| i64::try_from(t.down).unwrap_or(i64::MAX));
        let params: [(&(dyn ToSql + Sync), Type); 11] = [
            (&self.gateway_id, Type::TEXT),
            (&version, Type::TEXT),
            (&beat.at, Type::TIMESTAMPTZ),
            (&beat.ok, Type::BOOL),
            (&beat.error, Type::TEXT),
            (&pending, Type::INT8),
            (&oldest, Type::TIMESTAMPTZ),
            (&quarantined, Type::INT8),
            (&cert, Type::TIMESTAMPTZ),
            (&up, Type::INT8),
            (&down, Type::INT8),
        ];
        let before = crate::tls::traffic(Side::Central);
        // In a transaction of its own, like every central statement, for its
        // `statement_timeout`: a heartbeat waiting on a lock (maintenance on
        // gateway_status) is then cancelled by central just before we would give
        // up on the connection. Without it the backend went on waiting after we
        // had dropped the connection, one stranded session per gateway per cycle.
        // Costs about 300 bytes on the link, in the same round trip.
        let result = central
            .timed(
                "heartbeat: upsert gateway_status",
                central.in_transaction(central.client().execute_typed(UPSERT, &params)),
            )
            .await;
        match result {
            Ok(_) => {
                if self.state != State::Delivering {
                    log::info!(
                        "heartbeat: delivered to central's gateway_status again (gateway {})",
                        self.gateway_id
                    );
                } else {
                    let cost = crate::tls::traffic(Side::Central).since(before);
                    log::debug!(
                        "heartbeat delivered (gateway {}; {} bytes up, {} down on TLS)",
                        self.gateway_id,
                        cost.up,
                        cost.down
                    );
                }
                self.state = State::Delivering;
                Ok(())
            }
            Err(e) => {
                let next = if e.code() == Some(UNDEFINED_TABLE) {
                    State::NoTable
                } else {
                    State::Failing
                };
                let msg = match next {
                    State::NoTable => format!(
                        "heartbeat skipped: central has no gateway_status table yet (an operator \
                         applies this release's central migrations with `meter-sync migrate remote`); \
                         the cycles go on ({e})"
                    ),
                    _ => format!(
                        "heartbeat failed; the cycles go on and this is not repeated until one is \
                         delivered: {e}"
                    ),
                };
                if next != self.state {
                    log::warn!("{msg}");
                } else {
                    log::debug!("{msg}");
                }
                self.state = next;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_names_each_failed_phase() {
        let b = Beat::of_phases(
            [
                ("upload", Some("central: insert batch of 100: boom")),
                ("meters", None),
                ("tenant", Some("local: gone")),
            ],
            true,
            None,
        );
        assert!(!b.ok);
        assert_eq!(
            b.error.as_deref(),
            Some("upload: central: insert batch of 100: boom; tenant: local: gone")
        );
        let ok = Beat::of_phases(
            [("upload", None), ("meters", None), ("tenant", None)],
            true,
            None,
        );
        assert!(ok.ok && ok.error.is_none());
        // A cycle cut short by shutdown did not succeed, though nothing failed.
        let cut = Beat::of_phases([("upload", None)], false, None);
        assert!(!cut.ok && cut.error.is_none());
        let down = Beat::not_started("local: connect to 127.0.0.1:5432/postgres: refused");
        assert_eq!(
            down.error.as_deref(),
            Some("cycle: local: connect to 127.0.0.1:5432/postgres: refused")
        );
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        let long = "é".repeat(3000);
        let b = Beat::of_phases([("upload", Some(long.as_str()))], true, None);
        let e = b.error.unwrap();
        assert_eq!(e.chars().count(), MAX_ERROR_CHARS + 1);
        assert!(e.starts_with("upload: é") && e.ends_with('…'));
    }
}
