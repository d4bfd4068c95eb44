//! Where the next download resumes: the local `download_watermark` row of a table
//! (local migration 0003), and central's answer to the probe that precedes every
//! download.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{Row, Transaction};

use crate::config::Side;
use crate::db::{timed, Db};
use crate::error::Result;

/// SQLSTATE 42P01: the local table is missing (the gateway was upgraded without
/// `meter-sync migrate local`).
const UNDEFINED_TABLE: &str = "42P01";

static WARNED_NO_LOCAL_TABLE: AtomicBool = AtomicBool::new(false);

/// The local record of a table's last download.
#[derive(Clone, Debug)]
pub struct Saved {
    pub central_db: String,
    pub watermark: u64,
    /// The last full reconciliation is at least `DOWNLOAD_FULL_EVERY_SECONDS` old.
    pub full_due: bool,
}

/// What the local side knows about a table's last download.
pub enum Local {
    Saved(Saved),
    /// Never downloaded with change tracking.
    None,
    /// No `download_watermark` table: every download is a full one and nothing is
    /// remembered.
    NoTable,
}

/// Reads the table's record. Outside the apply transaction: only this process
/// writes it, under the cycle lock.
pub async fn load(local: &Db, table: &str, full_every: Duration) -> Result<Local> {
    let secs = full_every.as_secs_f64();
    let res = local
        .query(
            "read download_watermark",
            "SELECT central_db, watermark, now() - full_at >= make_interval(secs => $2) \
             FROM download_watermark WHERE table_name = $1",
            &[&table, &secs],
        )
        .await;
    match res {
        Ok(rows) => Ok(match rows.first() {
            Some(r) => Local::Saved(Saved {
                central_db: r.get(0),
                watermark: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                full_due: r.get(2),
            }),
            None => Local::None,
        }),
        Err(e) if e.code() == Some(UNDEFINED_TABLE) => {
            if !WARNED_NO_LOCAL_TABLE.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "local: no download_watermark table (run `meter-sync migrate local`); \
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
    watermark: u64,
    full: bool,
) -> Result<()> {
    let wm = i64::try_from(watermark).unwrap_or(i64::MAX);
    timed(
        Side::Local,
        limit,
        &format!("record the {table} watermark"),
        tx.execute(
            "INSERT INTO download_watermark (table_name, central_db, watermark, full_at) \
             VALUES ($1, $2, $3, now()) \
             ON CONFLICT (table_name) DO UPDATE SET central_db = EXCLUDED.central_db, \
                 watermark = EXCLUDED.watermark, updated_at = now(), \
                 full_at = CASE WHEN $4 THEN now() ELSE download_watermark.full_at END",
            &[&table, &central_db, &wm, &full],
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
    pub xmax: Option<u64>,
    pub central_db: String,
    pub rows: u64,
    pub bytes: u64,
    pub largest: u64,
    /// Row-level security filters the rows this role sees.
    pub rls: bool,
    /// Central has the `change_xid` column (remote migration 0002).
    pub tracked: bool,
}

fn xid(r: &Row, i: usize) -> Option<u64> {
    r.get::<_, Option<String>>(i).and_then(|s| s.parse().ok())
}

impl Probe {
    fn from_row(r: &Row) -> Probe {
        let n = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
        Probe {
            xmin: xid(r, 0),
            xmax: xid(r, 1),
            central_db: r.get(2),
            rows: n(3),
            bytes: n(4),
            largest: n(5),
            rls: r.get(6),
            tracked: r.get(7),
        }
    }

    /// On central outside a transaction: one statement, one snapshot, one round trip.
    pub async fn autocommit(central: &Db, what: &str, sql: &str) -> Result<Probe> {
        let no_params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)] = &[];
        let row = central
            .timed(what, central.client().query_typed_one(sql, no_params))
            .await?;
        Ok(Probe::from_row(&row))
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
