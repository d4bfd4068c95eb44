//! The resend window (`UPLOAD_RETAIN_HOURS`, `meter-sync resend --since`): readings
//! an upload marked instead of deleting are purged once their window is over, and
//! queued again on demand. The window is counted on the gateway's clock, which is
//! checked against central's before anything is purged (docs/operating.md, "The
//! gateway's clock").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};

use super::cell;
use crate::db::Db;
use crate::error::Result;

/// Readings purged per statement once their window is over: small, so that the
/// collector's inserts never wait long behind the delete.
const PURGE_BATCH: i64 = 1000;
/// Purge statements per cycle at most: a backlog of retained readings (the window
/// was shortened) is worked off over several cycles rather than holding this one.
const PURGE_ROUNDS: u32 = 20;

/// How far the gateway's clock may be from central's for the purge to trust it: far
/// below any window (an hour at least), far above what NTP leaves or a round trip
/// adds.
const CLOCK_TOLERANCE: Duration = Duration::from_secs(300);

/// Whether the last purge found the gateway's clock off central's (said once).
static CLOCK_OFF: AtomicBool = AtomicBool::new(false);

/// Deletes retained readings whose resend window (`UPLOAD_RETAIN_HOURS`, counted
/// from the upload) is over, [`PURGE_BATCH`] at a time and at most [`PURGE_ROUNDS`]
/// statements per cycle. With no window, whatever an earlier window retained goes.
/// A failure is logged and left for the next cycle: the purge never holds up the
/// upload.
///
/// The window is counted on the gateway's clock, which jumps by years on a gateway
/// without a battery-backed clock. So when there is something to purge or re-time,
/// the purge first compares that clock with central's (one small statement on
/// central, only then) and does nothing while they differ by more than
/// [`CLOCK_TOLERANCE`]: a clock stepped ahead would purge every retained reading
/// at once, one set back re-time them wrongly. Then readings marked "in the future"
/// get their window restarted ([`restart_future_windows`]).
pub(super) async fn purge_retained(local: &Db, central: &Db, window: Duration) {
    if !window.is_zero() {
        match clock_agrees(local, central, window).await {
            Ok(Some(future)) => {
                if future && !restart_future_windows(local).await {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                log::warn!("upload: {e}; retained readings are purged in a later cycle");
                return;
            }
        }
    }
    let secs = window.as_secs_f64();
    let mut total = 0u64;
    for _ in 0..PURGE_ROUNDS {
        let n = match local
            .execute(
                "purge retained readings",
                // The condition twice: a row that `resend` queues again while this
                // waits for its lock is re-checked against the outer one only
                // (PostgreSQL's EvalPlanQual), and must then stay.
                // A window of 0 takes every retained reading, also one marked
                // "in the future".
                "DELETE FROM meter_readings WHERE id IN (
                     SELECT id FROM meter_readings
                     WHERE is_synchronized AND synced_at IS NOT NULL
                       AND ($1::float8 = 0 OR synced_at < now() - make_interval(secs => $1::float8))
                     LIMIT $2)
                   AND is_synchronized AND synced_at IS NOT NULL
                   AND ($1::float8 = 0 OR synced_at < now() - make_interval(secs => $1::float8))",
                &[&secs, &PURGE_BATCH],
            )
            .await
        {
            Ok(n) => n,
            Err(e) => {
                log::warn!("upload: {e}; retained readings are purged in a later cycle");
                break;
            }
        };
        total += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    if total > 0 {
        log::info!("upload: purged {total} retained reading(s) past the resend window");
    }
}

/// Whether the purge may go on: None when there is nothing to purge or re-time, or
/// when the gateway's clock is off central's (said at warn when it starts to be, at
/// info when it no longer is); else whether readings are marked in the future.
async fn clock_agrees(local: &Db, central: &Db, window: Duration) -> Result<Option<bool>> {
    let what = "look for retained readings to purge";
    let row = local
        .query_one(
            what,
            "SELECT now(),
                    EXISTS (SELECT 1 FROM meter_readings WHERE is_synchronized AND synced_at > now()),
                    EXISTS (SELECT 1 FROM meter_readings WHERE is_synchronized
                              AND synced_at < now() - make_interval(secs => $1::float8))",
            &[&window.as_secs_f64()],
        )
        .await?;
    let mine: std::time::SystemTime = cell(&row, 0, what)?;
    let future: bool = cell(&row, 1, what)?;
    let expired: bool = cell(&row, 2, what)?;
    if !future && !expired {
        return Ok(None);
    }
    let no_params: &[(&(dyn ToSql + Sync), Type)] = &[];
    let theirs: std::time::SystemTime = central
        .timed(
            "read central's clock",
            central.client().query_typed_one("SELECT now()", no_params),
        )
        .await?
        .get(0);
    let off = theirs.duration_since(mine).unwrap_or_else(|e| e.duration());
    let stamp = |t| crate::utc::Utc::of(t).rfc3339();
    if off > CLOCK_TOLERANCE {
        if !CLOCK_OFF.swap(true, Ordering::Relaxed) {
            log::warn!(
                "upload: the gateway's clock ({}) is {} s off central's ({}); retained readings \
                 are neither purged nor re-timed until it is right (NTP)",
                stamp(mine),
                off.as_secs(),
                stamp(theirs)
            );
        }
        return Ok(None);
    }
    if CLOCK_OFF.swap(false, Ordering::Relaxed) {
        log::info!(
            "upload: the gateway's clock agrees with central's again; purging retained readings"
        );
    }
    Ok(Some(future))
}

/// Readings marked uploaded "in the future" (`synced_at` after the local `now()`)
/// were marked while the gateway's clock ran ahead, which NTP has set back since
/// (a gateway without a battery-backed clock boots at whatever date its image or
/// RTC gives it). When they were really uploaded is not known, only that it was no
/// later than now; so their window starts now, as if uploaded at this moment, and
/// they are kept for the whole of it, no longer. Left as they were, the purge
/// waited for the clock to catch up with them: years of retention for a window of
/// hours. [`PURGE_BATCH`] per statement, at most [`PURGE_ROUNDS`] statements per
/// cycle, like the purge. False: the local database failed (logged), purge later.
async fn restart_future_windows(local: &Db) -> bool {
    let mut total = 0u64;
    for _ in 0..PURGE_ROUNDS {
        let n = match local
            .execute(
                "restart the resend window of readings marked in the future",
                // The condition twice, for the reason given in purge_retained.
                "UPDATE meter_readings SET synced_at = now() WHERE id IN (
                     SELECT id FROM meter_readings
                     WHERE is_synchronized AND synced_at > now() LIMIT $1)
                   AND is_synchronized AND synced_at > now()",
                &[&PURGE_BATCH],
            )
            .await
        {
            Ok(n) => n,
            Err(e) => {
                log::warn!("upload: {e}; retained readings are purged in a later cycle");
                return false;
            }
        };
        total += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    if total > 0 {
        log::warn!(
            "upload: {total} retained reading(s) were marked uploaded in the future (the \
             gateway's clock was ahead and has been set back); their resend window starts now"
        );
    }
    true
}

/// Retained readings `resend` queues again per statement: each statement is its own
/// short transaction, as the purge's are. One UPDATE of a day's readings on a busy
/// gateway (a million rows: 22 s on the development machine, minutes on a
/// gateway's flash) ran into the local `statement_timeout`, so that `resend`
/// failed with nothing queued, and it wrote the whole table's worth of WAL in one
/// transaction.
const RESEND_BATCH: i64 = 5000;

/// `meter-sync resend --since`: queues again the retained readings uploaded at or
/// after `since` (a timestamp PostgreSQL reads), for a central restored from a
/// backup older than them. Central ignores the ones it still has (`ON CONFLICT DO
/// NOTHING` on `reading_uid`), so each arrives once. Returns how many were queued.
///
/// [`RESEND_BATCH`] readings at a time, oldest upload first, each batch committed
/// at once: a resend cut short (the database went away) has queued the oldest,
/// and running it again queues the rest. Readings marked between the start of the
/// resend and each batch are not taken: a running daemon uploads and marks what
/// the first batches queued, and those must not be queued again by the later ones
/// (the loop would chase the daemon's uploads). Readings marked "in the future"
/// (the gateway's clock was ahead when they were uploaded, then corrected) are.
pub async fn resend(local: &Db, since: &str) -> Result<u64> {
    let started: std::time::SystemTime = cell(
        &local
            .query_one("start the resend", "SELECT statement_timestamp()", &[])
            .await?,
        0,
        "start the resend",
    )?;
    // Retained, uploaded at or after `since` ($1), and not marked since the resend
    // started ($2), unless "in the future".
    let resendable = "is_synchronized AND synced_at IS NOT NULL \
         AND synced_at >= $1::text::timestamptz \
         AND (synced_at < $2 OR synced_at > statement_timestamp())";
    let sql = format!(
        "WITH picked AS (
             SELECT id FROM meter_readings WHERE {resendable} ORDER BY synced_at LIMIT $3),
         queued AS (
             UPDATE meter_readings SET is_synchronized = false, synced_at = NULL
             WHERE id IN (SELECT id FROM picked) AND {resendable}
             RETURNING 1)
         SELECT (SELECT count(*) FROM picked), (SELECT count(*) FROM queued)"
    );
    let mut total = 0u64;
    loop {
        // The condition stands in the UPDATE as well: a row the purge or another
        // resend changed while this waited for its lock is re-checked against it
        // (see purge_retained). `picked` says whether more may be left, `queued`
        // how many this batch took.
        let row = local
            .query_one(
                "queue retained readings again",
                &sql,
                &[&since, &started, &RESEND_BATCH],
            )
            .await
            .map_err(|e| {
                e.with_context(format!(
                    "queue retained readings again ({total} queued before this; \
                     the same resend again queues the rest)"
                ))
            })?;
        let picked: i64 = cell(&row, 0, "queue retained readings again")?;
        let queued: i64 = cell(&row, 1, "queue retained readings again")?;
        total += queued as u64;
        if picked < RESEND_BATCH {
            break;
        }
    }
    log::info!("resend: {total} retained reading(s) uploaded since {since} queued again");
    Ok(total)
}
