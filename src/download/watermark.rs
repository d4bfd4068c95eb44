//! Where the next download resumes: the local `download_watermark` row of a table
//! (local migrations 0003 and 0004), and central's answer to the probe that precedes every
//! download.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;
use tokio_postgres::{Row, Transaction};

use crate::config::Side;
use crate::db::{timed, Db};
use crate::error::Result;

/// SQLSTATE 42P01: the local table is missing (the gateway was upgraded without
/// `meter-sync migrate local`).
const UNDEFINED_TABLE: &str = "42P01";

/// SQLSTATE 42703: the table lacks `central_started` (local migration 0004 not
/// applied).
const UNDEFINED_COLUMN: &str = "42703";

static WARNED_NO_LOCAL_TABLE: AtomicBool = AtomicBool::new(false);

/// The local record of a table's last download.
#[derive(Clone, Debug)]
pub struct Saved {
    pub central_db: String,
    /// `pg_postmaster_start_time()` of the central server the watermark was read
    /// from: its transaction ids mean nothing on another server (a restored backup,
    /// a promoted standby). None: not recorded (written before migration 0004).
    pub central_started: Option<SystemTime>,
    pub watermark: u64,
}

/// What the local side knows about a table's last download.
pub enum Local {
    Saved(Saved),
    /// Never downloaded with change tracking.
    None,
    /// No `download_watermark` table, or one without `central_started`: every
    /// download is a full one and nothing is remembered.
    NoTable,
}

/// Reads the table's record. Outside the apply transaction: only this process
/// writes it, under the cycle lock.
pub async fn load(local: &Db, table: &str) -> Result<Local> {
    let res = local
        .query(
            "read download_watermark",
            "SELECT central_db, watermark, central_started \
             FROM download_watermark WHERE table_name = $1",
            &[&table],
        )
        .await;
    match res {
        Ok(rows) => Ok(match rows.first() {
            Some(r) => Local::Saved(Saved {
                central_db: r.get(0),
                watermark: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                central_started: r.get(2),
            }),
            None => Local::None,
        }),
        Err(e) if matches!(e.code(), Some(UNDEFINED_TABLE | UNDEFINED_COLUMN)) => {
            if !WARNED_NO_LOCAL_TABLE.swap(true, Ordering::Relaxed) {
                let what = if e.code() == Some(UNDEFINED_TABLE) {
                    "no download_watermark table"
                } else {
                    "download_watermark has no central_started column (migration 0004)"
                };
                log::warn!(
                    "local: {what} (run `meter-sync migrate local`); \
                     meters and tenants are downloaded whole every cycle until then"
                );
            }
            Ok(Local::NoTable)
        }
        Err(e) => Err(e),
    }
}

/// Records where the next download resumes, in the transaction that applied the
/// rows: a crash can never advance the watermark past rows that were not applied.
pub async fn save(
    tx: &Transaction<'_>,
    limit: Duration,
    table: &str,
    central_db: &str,
    central_started: SystemTime,
    watermark: u64,
    full: bool,
) -> Result<()> {
    let wm = i64::try_from(watermark).unwrap_or(i64::MAX);
    timed(
        Side::Local,
        limit,
        &format!("record the {table} watermark"),
        tx.execute(
            "INSERT INTO download_watermark \
                 (table_name, central_db, watermark, full_at, central_started) \
             VALUES ($1, $2, $3, now(), $5) \
             ON CONFLICT (table_name) DO UPDATE SET central_db = EXCLUDED.central_db, \
                 watermark = EXCLUDED.watermark, updated_at = now(), \
                 central_started = EXCLUDED.central_started, \
                 full_at = CASE WHEN $4 THEN now() ELSE download_watermark.full_at END",
            &[&table, &central_db, &wm, &full, &central_started],
        ),
    )
    .await?;
    Ok(())
}

/// Central's answer to [`super::table::Table::probe_sql`].
#[derive(Clone, Debug)]
pub struct Probe {
    /// The snapshot's xmin: the next watermark (None without tracking).
    pub xmin: Option<u64>,
    pub central_db: String,
    /// Central's `pg_postmaster_start_time()`: which server (history) the xmin belongs to.
    pub started: SystemTime,
    pub rows: u64,
    pub bytes: u64,
    pub largest: u64,
    /// Row-level security filters the rows this role sees.
    pub rls: bool,
    /// Central has the `change_xid` column (remote migration 0002).
    pub tracked: bool,
    /// The rows' digest ([`super::table::Table::digest_sql`]), when it was asked
    /// for.
    pub digest: Option<String>,
}

fn xid(r: &Row, i: usize) -> Option<u64> {
    r.get::<_, Option<String>>(i).and_then(|s| s.parse().ok())
}

impl Probe {
    fn from_row(r: &Row) -> Probe {
        let n = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
        Probe {
            xmin: xid(r, 0),
            central_db: r.get(1),
            rows: n(2),
            bytes: n(3),
            largest: n(4),
            rls: r.get(5),
            tracked: r.get(6),
            started: r.get(7),
            digest: if r.len() > 8 { r.get(8) } else { None },
        }
    }

    /// Inside the download's REPEATABLE READ transaction: the same snapshot the
    /// COPY then reads.
    pub async fn in_tx(
        tx: &Transaction<'_>,
        limit: Duration,
        what: &str,
        sql: &str,
    ) -> Result<Probe> {
        let no_params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)] = &[];
        let row = timed(
            Side::Central,
            limit,
            what,
            tx.query_typed_one(sql, no_params),
        )
        .await?;
        Ok(Probe::from_row(&row))
    }
}

/// Central's answer to [`super::table::Table::changed_since_sql`].
#[derive(Clone, Debug)]
pub struct Changed {
    pub central_db: String,
    /// Central's `pg_postmaster_start_time()`.
    pub started: SystemTime,
    pub any: bool,
    /// The statement's snapshot xmin.
    pub xmin: Option<u64>,
}

/// A watermark moved forward by an idle probe, in memory.
///
/// Under row-level security the probe's `change_xid >= watermark` passes every row
/// any gateway changed since then and filters each through the policy. A probe
/// that finds none visible downloads nothing, so the saved watermark stayed put
/// until this gateway's own rows changed or the daily full reconciliation ran, and
/// every idle probe passed the whole fleet's changes since: with 1,000,000 of them,
/// 560 ms and 15,600 buffers on central for a gateway that sees 50 rows, twice a
/// cycle per gateway. The probe's snapshot xmin is a watermark as good as a
/// download's: every change below it was committed, hence visible, when the probe
/// ran, and the probe saw none at or past the old watermark.
///
/// Kept in memory rather than written locally, so that an idle cycle still writes
/// nothing on the gateway: the first download of every process is a full one,
/// which stores a watermark of its own, so a restart loses nothing by forgetting
/// it. It applies only to the saved record it was taken over (same central
/// database and server).
#[derive(Clone, Debug)]
pub struct Advanced {
    central_db: String,
    central_started: SystemTime,
    watermark: u64,
}

impl Advanced {
    /// Where the next probe over `saved` starts.
    pub fn resume(this: &Mutex<Option<Advanced>>, saved: &Saved) -> u64 {
        Advanced::over(&this.lock().unwrap_or_else(|p| p.into_inner()), saved)
    }

    fn over(this: &Option<Advanced>, saved: &Saved) -> u64 {
        match this {
            Some(a)
                if a.central_db == saved.central_db
                    && saved.central_started == Some(a.central_started) =>
            {
                a.watermark.max(saved.watermark)
            }
            _ => saved.watermark,
        }
    }

    /// After an idle probe over `saved` (its database and server checked).
    pub fn record(this: &Mutex<Option<Advanced>>, saved: &Saved, probe: &Changed) {
        let Some(xmin) = probe.xmin else { return };
        let mut a = this.lock().unwrap_or_else(|p| p.into_inner());
        let from = Advanced::over(&a, saved);
        if xmin > from {
            *a = Some(Advanced {
                central_db: probe.central_db.clone(),
                central_started: probe.started,
                watermark: xmin,
            });
        }
    }
}

impl Changed {
    /// On central outside a transaction: one statement, one snapshot, one round trip.
    pub async fn ask(central: &Db, what: &str, sql: &str) -> Result<Changed> {
        let no_params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)] = &[];
        let r = central
            .timed(what, central.client().query_typed_one(sql, no_params))
            .await?;
        Ok(Changed {
            central_db: r.get(0),
            started: r.get(1),
            any: r.get(2),
            xmin: xid(&r, 3),
        })
    }
}
