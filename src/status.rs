//! `meter-sync status [--json]` (R12): is a daemon running, how the last cycles
//! went, the queue, and whether both databases answer.
//!
//! Meant to be quick enough for a login banner or a monitoring probe: one
//! connection attempt per database (no retries, `DB_CONNECTION_TIMEOUT_MS` each,
//! both at once; behind a pooler the connect's pooler check may queue for a
//! server up to `DB_QUERY_TIMEOUT_MS`, as under a `PAUSE` on PgBouncer), a
//! handful of indexed queries on local, none on central.

use std::fmt::Write as _;

use crate::config::{Config, DbConfig};
use crate::db::Db;
use crate::error::Result;
use crate::heartbeat::queue_state;
use crate::lock::{self, LockHolder};
use crate::report::Phase;

/// `timestamptz` as RFC 3339 in UTC, and its age in seconds.
const TS: &str = "to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, as [`TS`] writes it in SQL.
fn rfc3339(t: std::time::SystemTime) -> String {
    crate::utc::Utc::of(t).rfc3339()
}

fn ts(column: &str) -> String {
    TS.replace("{c}", column)
}

struct Link {
    target: String,
    error: Option<String>,
}

struct PhaseRow {
    phase: String,
    last_run_at: Option<String>,
    last_ok: Option<bool>,
    last_records: Option<i32>,
    last_duration_ms: Option<i64>,
    last_error: Option<String>,
    last_success_at: Option<String>,
    last_success_records: Option<i32>,
    last_success_duration_ms: Option<i64>,
}

struct LastCycle {
    finished_at: String,
    age_seconds: i64,
    upload_records: i32,
    meters_records: i32,
    tenant_records: i32,
    duration_ms: i64,
}

/// Everything read from the local database.
struct Local {
    holder: Option<LockHolder>,
    pending: i64,
    quarantined: i64,
    /// The oldest waiting reading's `timestamp` (RFC 3339) and age in seconds.
    oldest_pending: Option<(String, i64)>,
    readings_synced: i64,
    meters: i64,
    tenants: i64,
    last_cycle: Option<LastCycle>,
    phases: Vec<PhaseRow>,
}

/// One connection attempt and one round trip: reachable means answering queries.
async fn probe(db: &DbConfig, cfg: &Config) -> (Option<Db>, Link) {
    let target = db.describe();
    let attempt = async {
        let c = Db::connect(db, cfg).await?;
        c.query_one("probe", "SELECT 1", &[]).await?;
        Ok::<_, crate::error::Error>(c)
    };
    match attempt.await {
        Ok(c) => (
            Some(c),
            Link {
                target,
                error: None,
            },
        ),
        Err(e) => (
            None,
            Link {
                target,
                error: Some(e.to_string()),
            },
        ),
    }
}

async fn read_local(db: &Db) -> Result<Local> {
    let holder = lock::holder(db).await?;
    let queue = queue_state(db).await?;
    let counts = db
        .query_one(
            "count meters, tenants and synced readings",
            "SELECT (SELECT count(*) FROM meters), (SELECT count(*) FROM tenant), \
                    (SELECT coalesce(sum(records_processed), 0)::bigint FROM sync_logs \
                     WHERE sync_type = 'upload')",
            &[],
        )
        .await?;
    // A cycle writes its three rows in a row (the cycle lock keeps other writers
    // out), so the last successful cycle is the latest successful tenant row whose
    // two predecessors are a successful meters and upload row. Walking back by id
    // with index lookups stays fast however long sync_logs has grown.
    let last = db
        .query(
            "find the last successful cycle",
            &format!(
                "SELECT {t_ts}, extract(epoch FROM now() - t.\"timestamp\")::bigint, \
                        u.records_processed, m.records_processed, t.records_processed, \
                        coalesce(u.duration_ms, 0) + coalesce(m.duration_ms, 0) + coalesce(t.duration_ms, 0) \
                 FROM sync_logs t \
                 JOIN LATERAL (SELECT * FROM sync_logs p WHERE p.id < t.id ORDER BY p.id DESC LIMIT 1) m \
                   ON m.sync_type = 'meters' AND m.success \
                 JOIN LATERAL (SELECT * FROM sync_logs p WHERE p.id < m.id ORDER BY p.id DESC LIMIT 1) u \
                   ON u.sync_type = 'upload' AND u.success \
                 WHERE t.sync_type = 'tenant' AND t.success \
                 ORDER BY t.id DESC LIMIT 1",
                t_ts = ts("t.\"timestamp\"")
            ),
            &[],
        )
        .await?;
    // The last run is the last row written (the largest id), not the latest
    // timestamp: rows stamped while the gateway's clock ran ahead would otherwise
    // stand for the last run until the clock, set right since, caught up with them.
    let phases = db
        .query(
            "read the last run of each phase",
            &format!(
                "SELECT k.t, {r_ts}, r.success, r.records_processed, r.duration_ms, r.error_message, \
                        {s_ts}, s.records_processed, s.duration_ms \
                 FROM unnest($1::text[]) WITH ORDINALITY k(t, n) \
                 LEFT JOIN LATERAL (SELECT * FROM sync_logs WHERE sync_type = k.t \
                                    ORDER BY id DESC LIMIT 1) r ON true \
                 LEFT JOIN LATERAL (SELECT * FROM sync_logs WHERE sync_type = k.t AND success \
                                    ORDER BY id DESC LIMIT 1) s ON true \
                 ORDER BY k.n",
                r_ts = ts("r.\"timestamp\""),
                s_ts = ts("s.\"timestamp\"")
            ),
            &[&Phase::ALL.map(Phase::as_str).to_vec()],
        )
        .await?;
    Ok(Local {
        holder,
        pending: queue.pending,
        quarantined: queue.quarantined,
        oldest_pending: queue.oldest_pending_at.map(|at| {
            let age = queue.oldest_pending_age.unwrap_or_default().as_secs();
            (rfc3339(at), i64::try_from(age).unwrap_or(i64::MAX))
        }),
        meters: counts.get(0),
        tenants: counts.get(1),
        readings_synced: counts.get(2),
        last_cycle: last.first().map(|r| LastCycle {
            finished_at: r.get(0),
            age_seconds: r.get(1),
            upload_records: r.get(2),
            meters_records: r.get(3),
            tenant_records: r.get(4),
            duration_ms: r.get(5),
        }),
        phases: phases
            .iter()
            .map(|r| PhaseRow {
                phase: r.get(0),
                last_run_at: r.get(1),
                last_ok: r.get(2),
                last_records: r.get(3),
                last_duration_ms: r.get(4),
                last_error: r.get(5),
                last_success_at: r.get(6),
                last_success_records: r.get(7),
                last_success_duration_ms: r.get(8),
            })
            .collect(),
    })
}

/// Prints the status; returns the exit code: 0, or 1 when the local database
/// cannot be reached or read. Central being away is a state to report, not a failure.
pub async fn print(cfg: &Config, json: bool) -> Result<u8> {
    let ((local_db, mut local_link), (central_db, central_link)) =
        tokio::join!(probe(&cfg.local, cfg), probe(&cfg.central, cfg));
    drop(central_db);
    // A local database that answers but cannot be read (not migrated, no
    // privilege) is reported like one that does not answer: the report is still
    // printed, so that a monitoring probe always gets its JSON.
    let local = match &local_db {
        Some(db) => match read_local(db).await {
            Ok(l) => Some(l),
            Err(e) => {
                local_link.error = Some(e.to_string());
                None
            }
        },
        None => None,
    };
    drop(local_db);
    let out = if json {
        render_json(local.as_ref(), &local_link, &central_link)
    } else {
        render_text(local.as_ref(), &local_link, &central_link)
    };
    print!("{out}");
    Ok(if local.is_some() { 0 } else { 1 })
}

fn render_text(local: Option<&Local>, l: &Link, c: &Link) -> String {
    let mut o = String::new();
    let link = |k: &Link| match &k.error {
        None => format!("reachable ({})", k.target),
        Some(e) => format!("UNREACHABLE ({}): {e}", k.target),
    };
    let Some(s) = local else {
        let _ = writeln!(o, "daemon:     unknown (local database unreachable)");
        let _ = writeln!(o, "local:      {}", link(l));
        let _ = writeln!(o, "central:    {}", link(c));
        return o;
    };
    let daemon = match &s.holder {
        Some(h) => format!("running ({})", h.describe()),
        None => "not running".into(),
    };
    let _ = writeln!(o, "daemon:     {daemon}");
    let _ = writeln!(o, "local:      {}", link(l));
    let _ = writeln!(o, "central:    {}", link(c));
    let _ = writeln!(
        o,
        "queue:      {} reading(s) waiting, {} quarantined",
        s.pending, s.quarantined
    );
    if let Some((at, age)) = &s.oldest_pending {
        let _ = writeln!(
            o,
            "oldest:     {at} ({age} s ago) is the oldest waiting reading"
        );
    }
    let _ = writeln!(o, "synced:     {} reading(s) uploaded", s.readings_synced);
    let _ = writeln!(
        o,
        "local data: {} meter(s), {} tenant(s)",
        s.meters, s.tenants
    );
    match &s.last_cycle {
        Some(lc) => {
            let _ = writeln!(
                o,
                "last successful cycle: {} ({} s ago): upload {}, meters {}, tenant {} record(s) in {} ms",
                lc.finished_at,
                lc.age_seconds,
                lc.upload_records,
                lc.meters_records,
                lc.tenant_records,
                lc.duration_ms
            );
        }
        None => {
            let _ = writeln!(o, "last successful cycle: none recorded");
        }
    }
    for p in &s.phases {
        let last = match (&p.last_run_at, p.last_ok) {
            (Some(at), Some(true)) => format!(
                "last run {at} ok, {} record(s) in {} ms",
                p.last_records.unwrap_or(0),
                p.last_duration_ms.unwrap_or(0)
            ),
            (Some(at), _) => format!(
                "last run {at} FAILED: {}",
                p.last_error.as_deref().unwrap_or("(no message)")
            ),
            _ => "never run".into(),
        };
        let success = match (&p.last_success_at, p.last_ok) {
            (Some(at), Some(false)) => format!("; last success {at}"),
            (None, Some(false)) => "; never succeeded".into(),
            _ => String::new(),
        };
        let _ = writeln!(o, "{:<11} {last}{success}", format!("{}:", p.phase));
    }
    o
}

/// A JSON value, written by hand: the output is small and fixed, and a JSON
/// library would be the only user of its bytes on the gateway.
enum J {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Obj(Vec<(&'static str, J)>),
}

impl J {
    fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> J) -> J {
        v.map_or(J::Null, f)
    }

    fn write(&self, o: &mut String, indent: usize) {
        match self {
            J::Null => o.push_str("null"),
            J::Bool(b) => o.push_str(if *b { "true" } else { "false" }),
            J::Int(i) => {
                let _ = write!(o, "{i}");
            }
            J::Str(s) => {
                o.push('"');
                for ch in s.chars() {
                    match ch {
                        '"' => o.push_str("\\\""),
                        '\\' => o.push_str("\\\\"),
                        '\n' => o.push_str("\\n"),
                        '\r' => o.push_str("\\r"),
                        '\t' => o.push_str("\\t"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(o, "\\u{:04x}", c as u32);
                        }
                        c => o.push(c),
                    }
                }
                o.push('"');
            }
            J::Obj(fields) => {
                if fields.is_empty() {
                    o.push_str("{}");
                    return;
                }
                o.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    let _ = write!(o, "{:width$}\"{k}\": ", "", width = indent + 2);
                    v.write(o, indent + 2);
                    o.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                let _ = write!(o, "{:width$}}}", "", width = indent);
            }
        }
    }
}

fn link_json(k: &Link) -> J {
    J::Obj(vec![
        ("reachable", J::Bool(k.error.is_none())),
        ("target", J::Str(k.target.clone())),
        ("error", J::opt(k.error.clone(), J::Str)),
    ])
}

fn render_json(local: Option<&Local>, l: &Link, c: &Link) -> String {
    let int = |v: i64| J::Int(v);
    let mut fields = vec![
        ("running", J::opt(local, |s| J::Bool(s.holder.is_some()))),
        (
            "daemon_pid",
            J::opt(local.and_then(|s| s.holder.as_ref()?.daemon_pid()), |p| {
                J::Int(i64::from(p))
            }),
        ),
        ("local", link_json(l)),
        ("central", link_json(c)),
        ("queue_size", J::opt(local.map(|s| s.pending), int)),
        ("quarantined", J::opt(local.map(|s| s.quarantined), int)),
        (
            "oldest_pending_at",
            J::opt(local.and_then(|s| s.oldest_pending.clone()), |(at, _)| {
                J::Str(at)
            }),
        ),
        (
            "oldest_pending_age_seconds",
            J::opt(local.and_then(|s| s.oldest_pending.clone()), |(_, age)| {
                J::Int(age)
            }),
        ),
        (
            "readings_synced",
            J::opt(local.map(|s| s.readings_synced), int),
        ),
        ("meters", J::opt(local.map(|s| s.meters), int)),
        ("tenants", J::opt(local.map(|s| s.tenants), int)),
    ];
    fields.push((
        "last_successful_cycle",
        J::opt(local.and_then(|s| s.last_cycle.as_ref()), |lc| {
            J::Obj(vec![
                ("finished_at", J::Str(lc.finished_at.clone())),
                ("age_seconds", J::Int(lc.age_seconds)),
                ("duration_ms", J::Int(lc.duration_ms)),
                ("upload_records", J::Int(i64::from(lc.upload_records))),
                ("meters_records", J::Int(i64::from(lc.meters_records))),
                ("tenant_records", J::Int(i64::from(lc.tenant_records))),
            ])
        }),
    ));
    let phase = |p: &PhaseRow| {
        J::Obj(vec![
            ("last_run_at", J::opt(p.last_run_at.clone(), J::Str)),
            ("last_run_ok", J::opt(p.last_ok, J::Bool)),
            (
                "last_run_records",
                J::opt(p.last_records, |v| J::Int(i64::from(v))),
            ),
            ("last_run_duration_ms", J::opt(p.last_duration_ms, J::Int)),
            ("last_error", J::opt(p.last_error.clone(), J::Str)),
            ("last_success_at", J::opt(p.last_success_at.clone(), J::Str)),
            (
                "last_success_records",
                J::opt(p.last_success_records, |v| J::Int(i64::from(v))),
            ),
            (
                "last_success_duration_ms",
                J::opt(p.last_success_duration_ms, J::Int),
            ),
        ])
    };
    let phase_key = |name: &str| -> &'static str {
        match name {
            "upload" => "upload",
            "meters" => "meters",
            _ => "tenant",
        }
    };
    fields.push((
        "phases",
        J::opt(local, |s| {
            J::Obj(
                s.phases
                    .iter()
                    .map(|p| (phase_key(&p.phase), phase(p)))
                    .collect(),
            )
        }),
    ));
    let mut o = String::new();
    J::Obj(fields).write(&mut o, 0);
    o.push('\n');
    o
}

#[cfg(test)]
mod tests {
    use super::{rfc3339, J};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        for (millis, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_767_226_601_000, "2026-01-01T00:16:41.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
        ] {
            assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(millis)), text);
        }
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_millis(1)),
            "1969-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut o = String::new();
        J::Obj(vec![
            ("e", J::Str("a\"b\\c\nd\u{1}é".into())),
            ("n", J::Null),
        ])
        .write(&mut o, 0);
        assert_eq!(
            o,
            "{\n  \"e\": \"a\\\"b\\\\c\\nd\\u0001é\",\n  \"n\": null\n}"
        );
    }
}
