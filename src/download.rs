//! Download: bring the local `meters` and `tenant` tables in line with central,
//! logging what is new and which fields changed, moving only what changed.
//!
//! # Changes only
//!
//! Central stamps every inserted or updated row with the id of the writing
//! transaction (`change_xid`, remote migration 0002, set by a trigger). After each
//! download the gateway stores a watermark locally (`download_watermark`, local
//! migration 0003): the **xmin of the central snapshot the download read** (the
//! oldest transaction still running when it was taken). The next cycle asks only
//! for rows with `change_xid >= watermark`:
//!
//! - Every transaction whose changes the snapshot did not see was either running
//!   then (its id is at least xmin, by definition of xmin) or started later (its
//!   id is at least the snapshot's xmax, which is at least xmin). So it is found next time however the commits
//!   were ordered: T1 opens and changes A, T2 changes B and commits, a download
//!   takes B (its snapshot's xmin is at most T1's id, T1 still running), T1 commits,
//!   the next download takes A. A watermark that is the largest stamp seen (or a
//!   timestamp or sequence value taken inside the writer) would have moved past
//!   T1's stamp with B and lost A for good.
//! - A delete and a re-insert of the same key in one transaction leave a row
//!   stamped by that transaction: it arrives as an update of the changed fields.
//! - Rows seen before may come again (the watermark is conservative); the diff
//!   below finds them equal and writes nothing, as it does for a jsonb that
//!   differs only in key order or spacing.
//! - Deletes leave no row to stamp: rows gone from central are found, and kept with
//!   a warning, by the full reconciliation.
//!
//! An idle cycle is one small autocommit statement on central per table: is any
//! row past the watermark (an index probe on `change_xid`)? Only when there is
//! does a download open a REPEATABLE READ transaction, probe (count and size the
//! rows) and copy them, all in one snapshot, and store that snapshot's xmin.
//!
//! # Which central the watermark belongs to
//!
//! Transaction ids only order changes within the history of one running central
//! server. A central restored from a backup, or replaced by a promoted standby
//! that lacks some of the old primary's WAL, hands out again ids the watermark has
//! passed: its changes stamped with them are never asked for, and the changes it
//! lost stay on the gateway. Once its counter has passed the watermark (a fleet's
//! traffic does that in minutes) nothing in the ids shows it. Every such server is
//! another postmaster, though (a restore always starts one; a promoted standby is a
//! server of its own), so the watermark is stored with central's
//! `pg_postmaster_start_time()` and the database name, the idle probe returns both,
//! and any difference means a full reconciliation before the watermark is trusted
//! again, unless a digest of central's rows, taken in the download's snapshot
//! and round trip, equals one of the local table (see [`verified`]): then a plain
//! restart of central costs each gateway the digest, not a copy.
//!
//! # Full reconciliation
//!
//! The first download of every process, a table without a watermark (or one
//! recorded for another central database or another central server), and then every
//! `DOWNLOAD_FULL_EVERY_SECONDS`, the
//! whole table is copied and compared: the safety net for anything the stamps
//! cannot see (a row changed with the trigger disabled, a local row edited by
//! hand, rows deleted centrally). A central without migration 0002 gets a full
//! download every cycle and one warning.
//!
//! # One download
//!
//! Each download is one pass, without a round trip per row and without holding the
//! table in the daemon's memory:
//!
//! 1. on central, in one REPEATABLE READ READ ONLY transaction, a probe says how
//!    many rows and bytes are coming (over `DOWNLOAD_MAX_ROWS` or
//!    `DOWNLOAD_MAX_BYTES`, or a single row over [`MAX_ROW_BYTES`], the table fails
//!    here, before a row is sent); then `COPY (SELECT …) TO STDOUT (FORMAT binary)`
//!    is piped, chunk by chunk, into local `COPY pg_temp.tmp_… FROM STDIN` inside
//!    one local transaction;
//! 2. one statement then compares the staged rows with the local table column by
//!    column (`IS DISTINCT FROM`, so jsonb compares by value), inserts the new rows,
//!    updates only the rows that differ, and returns what it did;
//! 3. the watermark is written in that same local transaction, and it commits. A
//!    failure anywhere rolls the whole table back.
//!
//! Rows that exist locally but no longer centrally are kept (the collector may
//! still write readings for them) and reported as a warning.
//!
//! Every wait feeds the systemd watchdog (P15): the stream pings per chunk, the
//! local apply while its statement runs and per row it reports.

mod drift;
mod table;
mod watermark;

use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, Stream, StreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::{CopyOutStream, SimpleQueryMessage, Transaction};

use crate::config::{Config, Side};
use crate::db::{timed, Db};
use crate::error::{Error, Kind, Result};
use crate::lock::LockedLocal;
use crate::report::PhaseResult;

use table::{Digest, Rows, Table, METERS, TENANTS};
use watermark::{Advanced, Changed, Local, Probe};

/// At most this many "new …" / "… updated" lines per table and cycle; the rest are
/// summarised in one line, so that the first sync of a large fleet does not flood
/// syslog.
pub const MAX_DETAIL_LINES: usize = 1000;

/// At most this many ids are named in the warning about rows missing centrally.
pub const MAX_MISSING_IDS: usize = 20;

/// No single central row larger than this is ever sent (the driver holds one row,
/// one COPY message, in memory at a time): a table with such a row fails before
/// its download starts. Far above any real meter configuration.
pub const MAX_ROW_BYTES: u64 = 16 * 1024 * 1024;

/// SQLSTATEs of a central that predates change tracking: no `change_xid` column
/// (42703), or a server without `pg_current_snapshot()` (42883, before PostgreSQL 13).
const UNDEFINED_COLUMN: &str = "42703";
const UNDEFINED_FUNCTION: &str = "42883";

/// The download's bounds and schedule, from the configuration.
#[derive(Clone, Copy, Debug)]
struct Settings {
    /// `DOWNLOAD_FULL_EVERY_SECONDS`.
    full_every: Duration,
    /// `DOWNLOAD_MAX_ROWS`: per table and download.
    max_rows: u64,
    /// `DOWNLOAD_MAX_BYTES`: per table and download.
    max_bytes: u64,
}

impl Settings {
    fn of(cfg: &Config) -> Settings {
        Settings {
            full_every: cfg.download_full_every,
            max_rows: cfg.download_max_rows,
            max_bytes: cfg.download_max_bytes,
        }
    }
}

/// The tables the download keeps in line with central's.
#[derive(Clone, Copy, Debug)]
pub enum Downloaded {
    /// Central `meters` into local `meters` (P8).
    Meters,
    /// Central `tenant` into local `tenant` (P9).
    Tenants,
}

/// Downloads one table (see [`sync`]).
pub async fn sync_table(
    which: Downloaded,
    cfg: &Config,
    local: &mut LockedLocal,
    central: &mut Db,
) -> Result<PhaseResult> {
    let table = match which {
        Downloaded::Meters => &METERS,
        Downloaded::Tenants => &TENANTS,
    };
    sync(table, &Settings::of(cfg), local, central).await
}

/// What one download asks central for.
#[derive(Clone, Copy, Debug)]
enum Fetch {
    /// The whole table; `remember`: a watermark can be stored locally.
    All { remember: bool },
    /// Rows changed since `watermark`, which is valid only on the central server
    /// started at `started`.
    Changes { watermark: u64, started: SystemTime },
    /// Central is another server than the watermark's (`previous`: the start time
    /// recorded with it), and nothing else calls for a full reconciliation: compare
    /// digests first, and copy the whole table only if they differ.
    Verify { previous: Option<SystemTime> },
}

impl Fetch {
    fn rows(self) -> Rows {
        match self {
            Fetch::All { .. } | Fetch::Verify { .. } => Rows::All,
            Fetch::Changes { watermark, .. } => Rows::ChangedSince(watermark),
        }
    }

    fn remember(self) -> bool {
        match self {
            Fetch::All { remember } => remember,
            Fetch::Changes { .. } | Fetch::Verify { .. } => true,
        }
    }
}

/// A central server's start time, for log lines.
fn stamp(t: SystemTime) -> String {
    crate::utc::Utc::of(t).rfc3339()
}

/// What this cycle's download of a table will be.
enum Plan {
    /// Only rows changed since the saved watermark.
    Changes(watermark::Saved),
    /// The whole table; `remember`: a watermark can be stored locally.
    Full { reason: String, remember: bool },
}

fn plan(t: &Table, s: &Settings, local: Local) -> Plan {
    let full = |reason: &str, remember: bool| Plan::Full {
        reason: reason.to_string(),
        remember,
    };
    match local {
        Local::NoTable => full(
            "no local download_watermark table, or one without migration 0004",
            false,
        ),
        Local::None => full("no watermark yet", true),
        Local::Saved(sv) => match reconciled_at(t) {
            None => full("first download since start", true),
            Some(at) if at.elapsed() >= s.full_every => Plan::Full {
                reason: format!("the last one is {} s old", s.full_every.as_secs()),
                remember: true,
            },
            Some(_) => Plan::Changes(sv),
        },
    }
}

/// When this process last reconciled `t` in full. The schedule is kept here, on
/// the monotonic clock, rather than in the local `download_watermark.full_at`: a
/// gateway's wall clock (and its PostgreSQL's `now()`) jumps by years when NTP
/// sets it after a boot without a battery-backed clock. Set back, it left
/// `full_at` in the future and no full reconciliation came until the clock caught
/// up; and every process reconciles in full at its start anyway, so the stored
/// time never decided more than this one does.
fn reconciled_at(t: &Table) -> Option<Instant> {
    *t.reconciled_at.lock().unwrap_or_else(|e| e.into_inner())
}

/// A central that predates change tracking.
fn is_untracked(e: &Error) -> bool {
    matches!(e.code(), Some(UNDEFINED_COLUMN | UNDEFINED_FUNCTION))
}

fn warn_untracked(t: &Table) {
    if !t.warned_untracked.swap(true, Ordering::Relaxed) {
        log::warn!(
            "central: {} has no change tracking (remote migration 0002_change_tracking.sql \
             not applied: run `meter-sync migrate remote`); downloading it whole every cycle",
            t.table
        );
    }
}

async fn sync(
    t: &Table,
    s: &Settings,
    local: &mut LockedLocal,
    central: &mut Db,
) -> Result<PhaseResult> {
    let start = Instant::now();
    let saved = watermark::load(local, t.table).await?;
    let fetch = match plan(t, s, saved) {
        Plan::Full { reason, remember } => {
            log::info!("{}: full reconciliation ({reason})", t.table);
            Fetch::All { remember }
        }
        Plan::Changes(sv) => {
            let from = Advanced::resume(&t.advanced, &sv);
            let sql = t.changed_since_sql(from);
            let what = format!("look for changed {}", t.plural);
            match Changed::ask(central, &what, &sql).await {
                Ok(p) if p.central_db != sv.central_db => {
                    log::info!(
                        "{}: full reconciliation (the watermark is for central database {:?}, this is {:?})",
                        t.table,
                        sv.central_db,
                        p.central_db
                    );
                    Fetch::All { remember: true }
                }
                // Transaction ids order changes only within one server's history:
                // another postmaster (restored from a backup, a promoted standby, or
                // simply restarted) may reuse ids below the watermark. This also
                // covers a counter behind the watermark, which only another server
                // can show (xid8 never wraps).
                //
                // Most often it is the same data on a restarted server, though: a
                // digest comparison (see `verified`) then saves the full copy.
                Ok(p) if sv.central_started != Some(p.started) => Fetch::Verify {
                    previous: sv.central_started,
                },
                Ok(p) if !p.any => {
                    // Nothing to fetch, nothing to write locally; the next probe
                    // starts at this one's snapshot (see `Advanced`).
                    Advanced::record(&t.advanced, &sv, &p);
                    log::debug!(
                        "{}: no rows past watermark {from} ({} ms)",
                        t.table,
                        start.elapsed().as_millis()
                    );
                    return Ok(PhaseResult {
                        records: 0,
                        summary: "up to date (no changes centrally)".into(),
                    });
                }
                Ok(p) => Fetch::Changes {
                    watermark: from,
                    started: p.started,
                },
                Err(e) if is_untracked(&e) => {
                    warn_untracked(t);
                    Fetch::All { remember: false }
                }
                Err(e) => return Err(e),
            }
        }
    };
    match download(t, s, fetch, local, central, start).await {
        // Central's table does not fit the download: say which column.
        Err(e) if e.side() == Some(Side::Central) => Err(drift::central(t, central, e).await),
        done => done,
    }
}

/// The download's view of central: a REPEATABLE READ READ ONLY transaction and
/// the probe taken in its snapshot. `tracked` false: a probe without the snapshot
/// functions, for a server that lacks them. `digest`: the probe also returns the
/// rows' digest.
async fn open_central<'a>(
    t: &Table,
    central: &'a mut Db,
    rows: Rows,
    tracked: bool,
    digest: bool,
) -> Result<(Transaction<'a>, Probe)> {
    let limit = central.timeout();
    let tx = central.begin_snapshot("begin").await?;
    let what = format!("probe {}", t.table);
    let probe = Probe::in_tx(&tx, limit, &what, &t.probe_sql(rows, tracked, digest)).await?;
    Ok((tx, probe))
}

/// A central start time, or its absence, for log lines.
fn started(t: Option<SystemTime>) -> String {
    t.map_or_else(
        || "is not recorded".to_string(),
        |w| format!("started {}", stamp(w)),
    )
}

/// After a central restart: would a full download of `probe`'s snapshot leave
/// the local table as it is (write nothing)? If so, records that snapshot's xmin
/// and server as the watermark, as a full reconciliation would, but leaves
/// `full_at` (the daily net) alone, and returns true. The local digest and the
/// watermark share one local transaction. False, or an error, means: copy in
/// full.
///
/// Digests are sums over rows, so the comparison is of changes: the local
/// table's digest minus what it was right after this process's last full
/// reconciliation equals central's minus what central's was then ([`offset`]).
/// Row by row (each row's text includes its key, and a key is unique on either
/// side) that means every row changed since on either side was changed alike on
/// the other (or, deleted on both), and every other row is still as that full
/// reconciliation left it: equal by value to central's, or kept locally. So a
/// full download would write nothing. A row changed on one side only (a change
/// with the stamps off, a change a restored central lost, a local edit by hand)
/// makes the digests differ: a full copy.
async fn verified(t: &Table, probe: &Probe, local: &mut LockedLocal) -> Result<bool> {
    let (Some(xmin), true) = (probe.xmin, probe.tracked) else {
        return Ok(false);
    };
    let Some(central) = Digest::parse(Some(&probe.rows.to_string()), probe.digest.as_deref())
    else {
        return Ok(false);
    };
    let Some(offset) = offset(t) else {
        return Ok(false);
    };
    let limit = local.timeout();
    let l = Side::Local;
    let tx = timed(l, limit, "begin", local.client_mut().transaction()).await?;
    let what = format!("digest {}", t.table);
    let answer = timed(l, limit, &what, tx.simple_query(&t.local_digest_sql())).await?;
    let mine = first_row(&answer).and_then(|r| Digest::parse(r.get(0), r.get(1)));
    if mine.and_then(|d| d.without(offset)) != Some(central) {
        return Ok(false);
    }
    let db = &probe.central_db;
    watermark::save(&tx, limit, t.table, db, probe.started, xmin, false).await?;
    timed(l, limit, &format!("commit {}", t.table), tx.commit()).await?;
    Ok(true)
}

/// The local digest minus central's after this process's last full
/// reconciliation ([`Table::offset`]).
fn offset(t: &Table) -> Option<Digest> {
    *t.offset.lock().unwrap_or_else(|e| e.into_inner())
}

fn first_row(answer: &[SimpleQueryMessage]) -> Option<&tokio_postgres::SimpleQueryRow> {
    answer.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })
}

/// [`Table::offset_digest_sql`], in a full download's transaction after its
/// apply: the local digest minus the staged (central's) one. In a savepoint: the
/// digest is an optimisation, and a local server that refuses it (md5 not
/// executable by the daemon's role, as under FIPS) must not fail the download;
/// then None, and the next central restart is a full copy. A lost connection
/// still fails it.
async fn offset_now(
    t: &Table,
    tx: &mut Transaction<'_>,
    limit: Duration,
) -> Result<Option<Digest>> {
    let l = Side::Local;
    let what = format!("digest {} after the full download", t.table);
    let sql = t.offset_digest_sql();
    let sp = timed(l, limit, &what, tx.savepoint("kept_digest")).await?;
    let answer = match timed(l, limit, &what, sp.simple_query(&sql)).await {
        Ok(answer) => answer,
        Err(e) if e.is_connection_lost() => return Err(e),
        Err(e) => {
            log::debug!("{e}; the next central restart means a full copy");
            return Ok(None);
        }
    };
    timed(l, limit, &what, sp.commit()).await?;
    Ok(first_row(&answer).and_then(|r| {
        let local = Digest::parse(r.get(0), r.get(1))?;
        local.without(Digest::parse(r.get(2), r.get(3))?)
    }))
}

/// A table over one of its bounds: one line naming the table and the limit.
fn over_bound(t: &Table, s: &Settings, p: &Probe) -> Option<Error> {
    let msg = if p.rows > s.max_rows {
        format!(
            "{}: {} rows to download, more than DOWNLOAD_MAX_ROWS ({})",
            t.table, p.rows, s.max_rows
        )
    } else if p.bytes > s.max_bytes {
        format!(
            "{}: {} bytes to download, more than DOWNLOAD_MAX_BYTES ({})",
            t.table, p.bytes, s.max_bytes
        )
    } else if p.largest > MAX_ROW_BYTES {
        format!(
            "{}: a row of {} bytes, more than the {MAX_ROW_BYTES} bytes one row may have",
            t.table, p.largest
        )
    } else {
        return None;
    };
    Some(Error::new(
        Kind::Other,
        format!("{msg}; the local table is left as it was"),
    ))
}

async fn download(
    t: &Table,
    s: &Settings,
    fetch: Fetch,
    local: &mut LockedLocal,
    central: &mut Db,
    start: Instant,
) -> Result<PhaseResult> {
    let (rows, remember) = (fetch.rows(), fetch.remember());
    let limit = local.timeout();
    let central_limit = central.timeout();
    // Before PostgreSQL 13 there is no pg_current_snapshot(), so no tracking
    // either; such a server answers only the probe without it.
    let tracked = !t.pre_13.load(Ordering::Relaxed);
    let verify = matches!(fetch, Fetch::Verify { .. });
    let first = open_central(t, central, rows, tracked, verify).await;
    if matches!(&first, Err(e) if tracked && e.code() == Some(UNDEFINED_FUNCTION)) {
        drop(first);
        t.pre_13.store(true, Ordering::Relaxed);
        warn_untracked(t);
        let fetch = Fetch::All { remember: false };
        return Box::pin(download(t, s, fetch, local, central, start)).await;
    }
    // The digest is an optimisation: central refusing it (a statement timeout on
    // a huge table, md5 disabled by FIPS) means the full copy it would have saved.
    // A lost connection is not retried here.
    let refused = match &first {
        Err(e) if verify && e.code().is_some() && !e.is_connection_lost() => Some(e.to_string()),
        _ => None,
    };
    if let Some(e) = refused {
        drop(first);
        log::warn!(
            "{}: full reconciliation (central restarted, and its digest failed: {e})",
            t.table
        );
        let fetch = Fetch::All { remember: true };
        return Box::pin(download(t, s, fetch, local, central, start)).await;
    }
    let (ctx, probe) = first?;
    // Central was replaced between the idle probe and this snapshot: the
    // watermark means nothing here, so this download is a verified one.
    if let Fetch::Changes { started, .. } = fetch {
        if probe.started != started {
            drop(ctx);
            let fetch = Fetch::Verify {
                previous: Some(started),
            };
            return Box::pin(download(t, s, fetch, local, central, start)).await;
        }
    }
    if let Fetch::Verify { previous } = fetch {
        let why = match verified(t, &probe, local).await {
            Ok(true) => {
                timed(Side::Central, central_limit, "commit", ctx.commit()).await?;
                let kept = match offset(t).map_or(0, |k| k.rows) {
                    0 => String::new(),
                    n => format!(", and {n} kept locally that central no longer shows"),
                };
                log::info!(
                    "{}: central restarted; local copy verified identical ({} rows{kept}), \
                     no full copy needed",
                    t.table,
                    probe.rows
                );
                return Ok(PhaseResult {
                    records: 0,
                    summary: format!("up to date ({} rows verified by digest)", probe.rows),
                });
            }
            Ok(false) => "the local copy differs".to_string(),
            Err(e) => format!("the local digest failed: {e}"),
        };
        log::info!(
            "{}: full reconciliation (central is not the server this gateway's watermark \
             came from: it started {}, the watermark's {}; restarted, restored from a backup \
             or failed over, and {why})",
            t.table,
            stamp(probe.started),
            started(previous)
        );
    }
    if let Some(e) = over_bound(t, s, &probe) {
        return Err(e);
    }
    // Central first: a missing or unreadable central table fails here, before any
    // local transaction is opened.
    let copy_out_sql = t.copy_out_sql(rows);
    let what = format!("read {}", t.table);
    let stream = timed(
        Side::Central,
        central_limit,
        &what,
        ctx.copy_out(copy_out_sql.as_str()),
    )
    .await?;

    let mut tx = timed(
        Side::Local,
        limit,
        "begin",
        local.client_mut().transaction(),
    )
    .await?;
    // The probe's size is the text form; the binary stream may differ by a few
    // bytes per field. A stream far beyond it means the probe was wrong: stop.
    let stream_limit = probe
        .bytes
        .saturating_mul(2)
        .saturating_add(probe.rows.saturating_mul(64))
        .saturating_add(64 * 1024);
    let staged = stage(t, &tx, limit, stream, central_limit, stream_limit).await?;
    // The snapshot is no longer needed: release it before the local work, so
    // central's vacuum is not held back by a slow gateway.
    timed(Side::Central, central_limit, "commit", ctx.commit()).await?;
    let staging = start.elapsed();
    crate::notify::alive();
    let full = rows == Rows::All;
    // In a savepoint: when it fails, the staged rows are still there to say which
    // column (and row) a local schema drift is about.
    let what = format!("apply {}", t.table);
    let sp = timed(Side::Local, limit, &what, tx.savepoint("apply")).await?;
    let report = match apply(t, &sp, limit, full).await {
        Ok(report) => {
            timed(Side::Local, limit, &what, sp.commit()).await?;
            report
        }
        Err(e) => {
            drop(sp);
            return Err(drift::local(t, &mut tx, limit, e).await);
        }
    };
    // What the local table now holds beyond central's rows, for `verified`.
    let offset = match (full, probe.tracked) {
        (true, true) => Some(offset_now(t, &mut tx, limit).await?),
        _ => None,
    };
    if let (true, true, Some(xmin)) = (remember, probe.tracked, probe.xmin) {
        let db = &probe.central_db;
        watermark::save(&tx, limit, t.table, db, probe.started, xmin, full).await?;
    } else if remember && full && !probe.tracked {
        warn_untracked(t);
    }
    timed(
        Side::Local,
        limit,
        &format!("commit {}", t.table),
        tx.commit(),
    )
    .await?;
    if full {
        *t.reconciled_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    if let Some(o) = offset {
        *t.offset.lock().unwrap_or_else(|e| e.into_inner()) = o;
    }

    // Logged only after the commit: a line must never claim a write that rolled back.
    let unchanged = staged - report.new - report.updated;
    report.log(t, unchanged, probe.rls);
    log::debug!(
        "{}: staged {staged} rows ({}) from central in {} ms, compared and applied in {} ms",
        t.table,
        if full { "all" } else { "changed" },
        staging.as_millis(),
        (start.elapsed() - staging).as_millis()
    );
    let counts = format!(
        "{} new, {} updated, {unchanged} unchanged",
        report.new, report.updated
    );
    Ok(PhaseResult {
        records: report.new + report.updated,
        summary: match (report.new + report.updated, full) {
            (0, true) => format!("up to date ({unchanged} unchanged)"),
            (_, true) => counts,
            (_, false) => format!("changes only: {counts}"),
        },
    })
}

/// What the apply statement reported, with the per-row lines kept only up to
/// [`MAX_DETAIL_LINES`] so that memory does not grow with the table.
#[derive(Default)]
struct Report {
    new: u64,
    updated: u64,
    gone: u64,
    lines: Vec<String>,
    gone_ids: Vec<String>,
}

impl Report {
    fn add(
        &mut self,
        t: &Table,
        kind: &str,
        id: String,
        name: Option<String>,
        changed: Vec<String>,
    ) {
        let line = match kind {
            "new" => {
                self.new += 1;
                format!("new {} {id} ({})", t.noun, name.unwrap_or_default())
            }
            "updated" => {
                self.updated += 1;
                format!("{} {id} updated: {}", t.noun, changed.join(", "))
            }
            _ => {
                self.gone += 1;
                if self.gone_ids.len() < MAX_MISSING_IDS {
                    self.gone_ids.push(id);
                }
                return;
            }
        };
        if self.lines.len() < MAX_DETAIL_LINES {
            self.lines.push(line);
        }
    }

    /// `rls`: row-level security filters what central shows this gateway, so a
    /// row missing there may just be no longer assigned to it.
    fn log(&self, t: &Table, unchanged: u64, rls: bool) {
        for l in &self.lines {
            log::info!("{l}");
        }
        // The lines are ordered all new first, then all updated.
        let shown_new = (self.lines.len() as u64).min(self.new);
        let shown_updated = self.lines.len() as u64 - shown_new;
        if self.new > shown_new {
            log::info!("... and {} more new {}", self.new - shown_new, t.plural);
        }
        if self.updated > shown_updated {
            log::info!(
                "... and {} more updated {}",
                self.updated - shown_updated,
                t.plural
            );
        }
        if self.gone > 0 {
            let more = self.gone - self.gone_ids.len() as u64;
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            let why = if rls {
                "no longer visible to this gateway (unassigned from it, or deleted centrally)"
            } else {
                "no longer in central"
            };
            log::warn!(
                "{} {} {why}, kept locally (the collector may still use them): {}{tail}",
                self.gone,
                t.plural,
                self.gone_ids.join(", ")
            );
        }
        // "Up to date" is said once, in the cycle's result line (see the summary
        // in `sync`): an idle cycle writes two info lines, not eight.
        log::debug!("{}: {unchanged} unchanged", t.plural);
    }
}

/// Pipes central's COPY stream into the staging table; returns the rows staged.
///
/// Nothing is buffered beyond one chunk: each is handed on before the next is
/// read, and both directions are bounded channels in tokio-postgres, so a slow side
/// throttles the other. Each wait on either side is bounded by that side's
/// `DB_QUERY_TIMEOUT_MS`, so a link that goes silent mid-stream fails the table
/// instead of hanging the cycle. Each chunk feeds the watchdog: on a slow uplink
/// a first download streams for minutes, every chunk a sign of progress. More than
/// `max_bytes` from central fails the table.
async fn stage(
    t: &Table,
    tx: &Transaction<'_>,
    limit: Duration,
    stream: CopyOutStream,
    central_limit: Duration,
    max_bytes: u64,
) -> Result<u64> {
    let (l, c) = (Side::Local, Side::Central);
    let what_in = format!("read {}", t.table);
    let what_out = format!("stage {}", t.table);
    // A row lock held by someone else (the collector) should fail this table
    // cleanly (SQLSTATE 55P03, retried next cycle) before the round-trip timeout
    // would declare the connection dead. The COPY lasts as long as central's stream,
    // each wait bounded here, so the session's statement timeout is lifted. The notice that the staging table already
    // exists is noise.
    let setup = format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL client_min_messages = warning; \
         SET LOCAL statement_timeout = 0; {}",
        (limit / 2).max(Duration::from_millis(100)).as_millis(),
        t.create_staging_sql()
    );
    timed(l, limit, &what_out, tx.batch_execute(&setup)).await?;
    let copy_in_sql = t.copy_in_sql();
    let sink = timed(l, limit, &what_out, tx.copy_in(copy_in_sql.as_str())).await?;
    let mut sink = pin!(sink);
    let mut stream = pin!(stream);
    let mut bytes = 0u64;
    while let Some(chunk) = next_alive(c, &what_in, central_limit, &mut stream).await? {
        bytes += chunk.len() as u64;
        if bytes > max_bytes {
            return Err(Error::new(
                Kind::Other,
                format!(
                    "{}: the stream from central passed {max_bytes} bytes, far more than it \
                     announced; the local table is left as it was",
                    t.table
                ),
            ));
        }
        // `feed`, not `send`: the sink coalesces rows into 4 KiB messages instead
        // of flushing the socket once per row.
        timed(l, limit, &what_out, sink.feed(chunk)).await?;
    }
    timed(l, limit, &what_out, sink.as_mut().finish()).await
}

/// The next item of a stream from `side` within `limit`, feeding the watchdog
/// while it waits and when it arrives (progress, however slow); `None` at its end.
async fn next_alive<T, S>(
    side: Side,
    what: &str,
    limit: Duration,
    stream: &mut Pin<&mut S>,
) -> Result<Option<T>>
where
    S: Stream<Item = std::result::Result<T, tokio_postgres::Error>>,
{
    let next = tokio::time::timeout(limit, stream.next());
    match crate::notify::while_bounded(next).await {
        Err(_) => Err(Error::timeout(side, what, limit)),
        Ok(None) => Ok(None),
        Ok(Some(Err(e))) => Err(Error::db(side, what, e)),
        Ok(Some(Ok(item))) => {
            crate::notify::alive();
            Ok(Some(item))
        }
    }
}

/// Runs the compare-and-write statement and collects its report, streaming the
/// returned rows so that a first sync of a large table is not held in memory.
/// The statement itself feeds the watchdog while it runs (it is bounded by the
/// query timeout), and so does each row of its report.
async fn apply(t: &Table, tx: &Transaction<'_>, limit: Duration, full: bool) -> Result<Report> {
    let l = Side::Local;
    let what = format!("apply {}", t.table);
    let sql = t.apply_sql(full);
    let no_params = std::iter::empty::<&(dyn ToSql + Sync)>();
    let rows = timed(l, limit, &what, tx.query_raw(sql.as_str(), no_params)).await?;
    let mut rows = pin!(rows);
    let mut report = Report::default();
    while let Some(row) = next_alive(l, &what, limit, &mut rows).await? {
        let kind: &str = row.get(0);
        let changed: Option<Vec<String>> = row.get(3);
        report.add(t, kind, row.get(1), row.get(2), changed.unwrap_or_default());
    }
    Ok(report)
}
