//! Upload: readings leave the gateway batch by batch, each batch one atomic,
//! idempotent statement in central, and are deleted locally only after that
//! statement has committed (or marked, with a resend window). Readings central
//! rejects are isolated and quarantined locally so that they do not hold up the
//! rest, unless the refusals show that the fault is central's (`verdict.rs`);
//! local rows that cannot be read are quarantined too (P25).
//!
//! Every value travels as text (`numeric`, `timestamptz` and `jsonb` are cast to
//! `text` when read and back when written), so nothing passes through a float or a
//! time type of ours: what arrives is exactly what the collector wrote.

mod verdict;

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use futures_util::future::{join_all, BoxFuture};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Row, Statement};

use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, Kind, Result};
use crate::lock::LockedLocal;
use crate::report::PhaseResult;
use crate::shutdown::Shutdown;

/// The queue: unsynchronized and not quarantined. This predicate is the one of the
/// partial index `meter_readings_pending_idx ("timestamp", id)`, which serves both
/// the count and the ordered, paginated selection.
pub(crate) const PENDING: &str = "NOT is_synchronized AND sync_error IS NULL";

/// Quarantined: central rejected it (P7); waits for `requeue`.
pub(crate) const QUARANTINED: &str = "NOT is_synchronized AND sync_error IS NOT NULL";

/// Readings waiting for upload and readings in quarantine (P7).
pub async fn queue_counts(local: &Db) -> Result<(i64, i64)> {
    let row = local
        .query_one(
            "count the queue",
            &format!(
                "SELECT count(*) FILTER (WHERE {PENDING}), count(*) FILTER (WHERE {QUARANTINED}) \
                 FROM meter_readings WHERE NOT is_synchronized"
            ),
            &[],
        )
        .await?;
    Ok((
        cell(&row, 0, "count the queue")?,
        cell(&row, 1, "count the queue")?,
    ))
}

/// Output names differ from the column names on purpose: `ORDER BY "timestamp"`
/// would otherwise sort by the text column of the select list (SQL resolves ORDER
/// BY names against the output first), which is not time order for BC dates and
/// cannot use the index.
///
/// `id` and `sync_attempts` are cast so that a legacy table with an `integer` id
/// reads the same; every other value is text, and any of them may be NULL in a
/// legacy table with nullable columns (see [`reading`]).
const COLUMNS: &str =
    "r.id::int8 AS id, r.reading_uid::text AS uid_text, r.meter_id::text AS meter_text, \
     r.\"timestamp\"::text AS ts_text, r.value::text AS value_text, r.unit::text AS unit_text, \
     r.metadata::text AS metadata_text, r.created_at::text AS created_text, \
     r.sync_attempts::int4 AS attempts";

/// What is always readable about a row, whatever its text columns hold: used to
/// find the row a selection could not read (see [`read_around`]).
const KEYS: &str =
    "r.id::int8 AS id, r.\"timestamp\"::text AS ts_text, r.reading_uid::text AS uid_text";

/// One statement per batch, so the batch is one implicit transaction: all rows or
/// none. `ON CONFLICT DO NOTHING` on the unique key makes a re-sent reading (we died
/// between the central commit and the local delete) a no-op that still counts as
/// delivered. `unnest` keeps the statement text fixed whatever the batch size (and
/// the parameters few, so sending them typed on the unnamed statement costs nothing;
/// see [`Db::execute_in_transaction`] for why nothing is prepared on central); it works unchanged on a table partitioned by
/// `timestamp` because the key includes it.
const INSERT: &str = "INSERT INTO meter_readings \
     (reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at, sync_attempts) \
     SELECT u::uuid, m, t::timestamptz, v::numeric, un, md::jsonb, c::timestamptz, a \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::text[], $8::int4[]) AS r(u, m, t, v, un, md, c, a) \
     ON CONFLICT (reading_uid, \"timestamp\") DO NOTHING";

const DELETE: &str = "DELETE FROM meter_readings WHERE id = ANY($1::int8[])";

/// With a resend window (`UPLOAD_RETAIN_HOURS` > 0) an uploaded batch is marked
/// instead of deleted: the same one statement, after the same central commit.
const MARK: &str = "UPDATE meter_readings SET is_synchronized = true, synced_at = now() \
     WHERE id = ANY($1::int8[]) AND NOT is_synchronized";

/// Readings purged per statement once their window is over: small, so that the
/// collector's inserts never wait long behind the delete.
const PURGE_BATCH: i64 = 1000;
/// Purge statements per cycle at most: a backlog of retained readings (the window
/// was shortened) is worked off over several cycles rather than holding this one.
const PURGE_ROUNDS: u32 = 20;

const QUARANTINE: &str =
    "UPDATE meter_readings SET sync_error = $2, sync_attempts = sync_attempts + 1 \
     WHERE id = $1::int8 AND sync_error IS NULL";

/// One local reading, every column as the text PostgreSQL prints for it.
struct Reading {
    id: i64,
    uid: String,
    meter_id: String,
    timestamp: String,
    value: String,
    unit: String,
    metadata: Option<String>,
    created_at: Option<String>,
    sync_attempts: i32,
}

/// A local row that cannot be uploaded as it is (P25): what is known of it, and why.
struct Unreadable {
    id: i64,
    uid: Option<String>,
    timestamp: Option<String>,
    why: String,
}

/// The local statements of one drain, prepared once. Central gets none: under
/// PgBouncer's transaction pooling a prepared statement is gone (or belongs to
/// another client) by the next transaction.
struct Statements {
    first: Statement,
    after: Statement,
    keys_first: Statement,
    keys_after: Statement,
    by_ids: Statement,
    delete: Statement,
    mark: Statement,
    quarantine: Statement,
}

/// The types of [`INSERT`]'s parameters, sent with it on the unnamed statement.
const INSERT_TYPES: [Type; 8] = [
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT4_ARRAY,
];

impl Statements {
    async fn prepare(local: &Db) -> Result<Statements> {
        let select = format!("SELECT {COLUMNS} FROM meter_readings r WHERE {PENDING}");
        let keys = format!("SELECT {KEYS} FROM meter_readings r WHERE {PENDING}");
        // Keyset pagination: the next batch starts after the last one read, so
        // it can be read while earlier batches are still in flight.
        let after = " AND (r.\"timestamp\", r.id) > (($2::text)::timestamptz, $3::int8)";
        let order = " ORDER BY r.\"timestamp\", r.id LIMIT $1";
        Ok(Statements {
            first: prep(local, "prepare batch selection", format!("{select}{order}")).await?,
            after: prep(
                local,
                "prepare batch selection",
                format!("{select}{after}{order}"),
            )
            .await?,
            keys_first: prep(local, "prepare key selection", format!("{keys}{order}")).await?,
            keys_after: prep(
                local,
                "prepare key selection",
                format!("{keys}{after}{order}"),
            )
            .await?,
            by_ids: prep(
                local,
                "prepare selection by id",
                format!("{select} AND r.id = ANY($1::int8[]) ORDER BY r.\"timestamp\", r.id"),
            )
            .await?,
            delete: prep(local, "prepare batch delete", DELETE.into()).await?,
            mark: prep(local, "prepare batch mark", MARK.into()).await?,
            quarantine: prep(local, "prepare quarantine", QUARANTINE.into()).await?,
        })
    }
}

async fn prep(db: &Db, what: &str, sql: String) -> Result<Statement> {
    db.timed(what, db.client().prepare(&sql)).await
}

/// What the drain has done so far.
#[derive(Default)]
struct Tally {
    /// Batches selected from the queue.
    batches: u64,
    /// Readings committed centrally (or found there already) and deleted locally.
    delivered: u64,
    /// Of those, readings central already had.
    already: u64,
    /// Insert statements sent, bisection included.
    statements: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.batches += o.batches;
        self.delivered += o.delivered;
        self.already += o.already;
        self.statements += o.statements;
    }
}

/// A single reading central refused, not quarantined yet: whether it will be is
/// decided once the drain is over (see [`verdict::decide`]).
struct Candidate {
    /// (batch number, position in the batch): queue order.
    order: (u64, usize),
    id: i64,
    uid: String,
    code: String,
    message: String,
}

/// What every batch needs: both connections, the statements, the retry budget,
/// and what the batches of this drain have found out about central's refusals.
struct Ctx<'a> {
    local: &'a Db,
    central: &'a Db,
    st: &'a Statements,
    retries: u32,
    /// Mark uploaded readings instead of deleting them (the resend window).
    retain: bool,
    /// Refused single readings, waiting for the drain's decision.
    candidates: Mutex<Vec<Candidate>>,
    /// A batch showed central refusing readings alike: the others stop isolating.
    central_fault: AtomicBool,
    /// One batch is taken apart at a time, so that when central refuses everything
    /// the batches behind the first learn it from the first instead of each
    /// spending its own statements to find out.
    isolating: tokio::sync::Mutex<()>,
    /// Readings quarantined in this drain (the cap counts them all).
    quarantined: AtomicU64,
    /// Unreadable local rows left queued because the cap was reached.
    held_local: AtomicU64,
}

/// Drains the queue until it is empty, shutdown is requested or the time budget is
/// spent; the last two are checked before each new batch, and batches already in
/// flight always run to their end (committed and deleted, or rolled back whole).
///
/// Up to `UPLOAD_PIPELINE_DEPTH` batches are in flight on the central connection
/// at once (tokio-postgres pipelines concurrent queries on one connection, and the
/// server runs them in the order sent, so central receives the readings oldest
/// first). Each batch is still its own statement and transaction, and is deleted
/// locally only once its own commit has been acknowledged.
///
/// A transient failure of a statement on a connection that is still open is
/// retried up to `MAX_QUERY_RETRIES` times (see [`Db::retrying`]); any other
/// failure, and a rejection that is not about the rows (a missing table, a
/// permission), ends the drain with that error once the batches in flight are done:
/// the readings stay queued for the next cycle. Only a rejection of the data itself
/// is isolated and quarantined (see [`is_row_rejection`] and `verdict.rs`).
pub async fn drain(
    cfg: &Config,
    local: &mut LockedLocal,
    central: &mut Db,
    shutdown: &Shutdown,
) -> Result<PhaseResult> {
    let (local, central): (&Db, &Db) = (local, central);
    let start = Instant::now();
    purge_retained(local, cfg.upload_retain).await;
    let queued = count_pending(local).await?;
    // At info only when there is something to do: the cycle's start line has the
    // queue size already, and an idle cycle should cost two info lines.
    let level = if queued > 0 {
        log::Level::Info
    } else {
        log::Level::Debug
    };
    log::log!(level, "upload: {queued} reading(s) queued");
    if queued == 0 {
        return Ok(PhaseResult {
            records: 0,
            summary: "nothing to upload".into(),
        });
    }
    let st = Statements::prepare(local).await?;
    let ctx = Ctx {
        local,
        central,
        st: &st,
        retries: cfg.max_query_retries,
        retain: !cfg.upload_retain.is_zero(),
        candidates: Mutex::new(Vec::new()),
        central_fault: AtomicBool::new(false),
        isolating: tokio::sync::Mutex::new(()),
        quarantined: AtomicU64::new(0),
        held_local: AtomicU64::new(0),
    };
    let depth = cfg.upload_pipeline_depth.max(1);
    let limit = i64::try_from(cfg.batch_size).unwrap_or(i64::MAX);

    let mut total = Tally::default();
    let mut failure: Option<Error> = None;
    let mut stopped: Option<&str> = None;
    // Where the next selection starts: after the last reading read. None starts from
    // the oldest reading, which is how each pass begins.
    let mut key: Option<(String, i64)> = None;
    let mut exhausted = false;
    let mut rescanned = false;
    let mut reader: Option<BoxFuture<'_, Result<Selected>>> = None;
    let mut inflight: FuturesUnordered<BoxFuture<'_, (Tally, Result<()>)>> =
        FuturesUnordered::new();

    loop {
        if stopped.is_none() && failure.is_none() {
            if shutdown.is_requested() {
                stopped = Some("shutdown requested");
            } else if start.elapsed() >= cfg.upload_time_budget {
                stopped = Some("time budget spent");
            }
        }
        let may_start = stopped.is_none() && failure.is_none();
        if may_start && exhausted && inflight.is_empty() && reader.is_none() && !rescanned {
            // The refused readings of this pass are decided before the next pass
            // would read them again.
            if let Err(e) = quarantine_candidates(&ctx, total.delivered).await {
                failure = Some(e);
                continue;
            }
            // The pass reached the newest reading. One more pass from the oldest
            // picks up readings the collector wrote meanwhile with a timestamp
            // behind the pass (a meter catching up on its buffer). Only one: should
            // delivered readings somehow stay queued (a local trigger that cancels
            // the delete), passes would repeat until the time budget ran out.
            key = None;
            exhausted = false;
            rescanned = true;
        }
        if may_start && !exhausted && reader.is_none() && inflight.len() < depth {
            reader = Some(Box::pin(select_batch(&ctx, key.clone(), limit)));
        }
        if reader.is_none() && inflight.is_empty() {
            break;
        }
        tokio::select! {
            r = async { reader.as_mut().expect("guarded").await }, if reader.is_some() => {
                reader = None;
                match r {
                    Ok(sel) if sel.seen == 0 => exhausted = true,
                    Ok(sel) => {
                        if sel.last.is_some() {
                            key = sel.last;
                        } else {
                            // Only rows without a timestamp, which sort last.
                            exhausted = true;
                        }
                        if !sel.readings.is_empty() {
                            total.batches += 1;
                            inflight.push(Box::pin(deliver(&ctx, total.batches, sel.readings)));
                        }
                    }
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            Some((t, r)) = inflight.next(), if !inflight.is_empty() => {
                total.add(&t);
                crate::notify::alive();
                if let Err(e) = r {
                    failure = failure.or(Some(e));
                }
            }
        }
    }
    if failure.is_none() {
        if let Err(e) = quarantine_candidates(&ctx, total.delivered).await {
            failure = Some(e);
        }
    }
    let quarantined = ctx.quarantined.load(Ordering::SeqCst);

    let elapsed = start.elapsed();
    log::debug!(
        "upload: {} insert statement(s) for {} batch(es) in {} ms",
        total.statements,
        total.batches,
        elapsed.as_millis()
    );
    if let Some(e) = failure {
        log::warn!(
            "upload: stopped by an error after delivering {} reading(s) in {} batch(es), {} quarantined",
            total.delivered,
            total.batches,
            quarantined
        );
        return Err(e);
    }
    let remaining = count_pending(local).await?;
    let mut summary = format!(
        "uploaded {} in {} batches, {} quarantined, {} remaining",
        total.delivered, total.batches, quarantined, remaining
    );
    if total.already > 0 {
        summary.push_str(&format!("; {} were already in central", total.already));
    }
    if let Some(why) = stopped {
        log::info!("upload: {why}; {remaining} reading(s) left for the next cycle");
        summary.push_str(&format!("; stopped: {why}"));
    }
    Ok(PhaseResult {
        records: total.delivered,
        summary,
    })
}

async fn count_pending(local: &Db) -> Result<i64> {
    let row = local
        .query_one(
            "count queued readings",
            &format!("SELECT count(*) FROM meter_readings WHERE {PENDING}"),
            &[],
        )
        .await?;
    cell(&row, 0, "count queued readings")
}

/// Column `i` of `row`, or an error naming `what` instead of a panic.
fn cell<'a, T: FromSql<'a>>(row: &'a Row, i: usize, what: &str) -> Result<T> {
    row.try_get(i)
        .map_err(|e| Error::new(Kind::Db, format!("local: {what}: column {i}: {e}")))
}

/// One selection from the queue.
struct Selected {
    /// The readable readings, in queue order.
    readings: Vec<Reading>,
    /// Rows the selection covered, readable or not: 0 means the pass is at its end.
    seen: usize,
    /// The key of the last row covered that has one.
    last: Option<(String, i64)>,
}

/// The next batch, oldest `timestamp` first and ties by `id`, after `key` if given.
/// Rows that cannot be read are quarantined on the spot and left out (P25); when
/// the server cannot even send a row (invalid UTF-8 in a SQL_ASCII database, SQLSTATE
/// 22021), the whole selection fails and [`read_around`] finds the row.
async fn select_batch(ctx: &Ctx<'_>, key: Option<(String, i64)>, limit: i64) -> Result<Selected> {
    let (local, st) = (ctx.local, ctx.st);
    let rows = match &key {
        None => {
            local
                .timed("select batch", local.client().query(&st.first, &[&limit]))
                .await
        }
        Some((ts, id)) => {
            local
                .timed(
                    "select batch",
                    local.client().query(&st.after, &[&limit, ts, id]),
                )
                .await
        }
    };
    match rows {
        Ok(rows) => {
            let mut sel = Selected {
                readings: Vec::with_capacity(rows.len()),
                seen: rows.len(),
                last: None,
            };
            for row in &rows {
                take(ctx, row, &mut sel).await?;
            }
            Ok(sel)
        }
        Err(e) if is_unreadable(&e) => read_around(ctx, key, limit, e).await,
        Err(e) => Err(e),
    }
}

/// Adds one selected row to `sel`, or quarantines it if it cannot be read.
async fn take(ctx: &Ctx<'_>, row: &Row, sel: &mut Selected) -> Result<()> {
    match reading(row)? {
        Ok(r) => {
            sel.last = Some((r.timestamp.clone(), r.id));
            sel.readings.push(r);
        }
        Err(u) => {
            if let Some(ts) = &u.timestamp {
                sel.last = Some((ts.clone(), u.id));
            }
            quarantine_unreadable(ctx, &u).await?;
        }
    }
    Ok(())
}

/// A selected row as a reading, or why it cannot be one. Only an unreadable `id`
/// is an error: without it the row cannot even be set aside.
fn reading(r: &Row) -> Result<std::result::Result<Reading, Unreadable>> {
    let id: i64 = cell(r, 0, "read a reading's id")?;
    let uid: Option<String> = r.try_get(1).ok().flatten();
    let timestamp: Option<String> = r.try_get(3).ok().flatten();
    let unreadable = |why: String| Unreadable {
        id,
        uid: uid.clone(),
        timestamp: timestamp.clone(),
        why,
    };
    // Every value is text (or int4) on the wire, so try_get fails only on a NULL in
    // a column the reading needs: a legacy table with nullable columns.
    let required = |i: usize, name: &str| -> std::result::Result<String, String> {
        match r.try_get::<_, Option<String>>(i) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(format!("{name} is NULL")),
            Err(e) => Err(format!("{name} cannot be read: {e}")),
        }
    };
    let optional = |i: usize, name: &str| -> std::result::Result<Option<String>, String> {
        r.try_get::<_, Option<String>>(i)
            .map_err(|e| format!("{name} cannot be read: {e}"))
    };
    let built = (|| {
        Ok(Reading {
            id,
            uid: required(1, "reading_uid")?,
            meter_id: required(2, "meter_id")?,
            timestamp: required(3, "timestamp")?,
            value: required(4, "value")?,
            unit: required(5, "unit")?,
            metadata: optional(6, "metadata")?,
            created_at: optional(7, "created_at")?,
            sync_attempts: match r.try_get::<_, Option<i32>>(8) {
                Ok(v) => v.unwrap_or(0),
                Err(e) => return Err(format!("sync_attempts cannot be read: {e}")),
            },
        })
    })();
    Ok(built.map_err(unreadable))
}

/// A selection that failed because of what a row holds (class 22: the server
/// cannot convert a value for us), as opposed to a lost connection or a missing
/// table.
fn is_unreadable(e: &Error) -> bool {
    e.kind() == Kind::Db && !e.is_transient() && e.code().is_some_and(|c| c.starts_with("22"))
}

/// The selection after `key` failed on a row the server cannot send (`err`).
/// Reads the same rows' keys (numbers, timestamps and uuids, always readable), then
/// the rows by id, halving the ids that fail, until each unreadable row is found
/// alone and quarantined. Finding k such rows among n costs about 2·k·log2(n)
/// local round trips.
async fn read_around(
    ctx: &Ctx<'_>,
    key: Option<(String, i64)>,
    limit: i64,
    err: Error,
) -> Result<Selected> {
    log::warn!("upload: {err}; reading the batch in parts to find the rows that cannot be read");
    let (local, st) = (ctx.local, ctx.st);
    let rows = match &key {
        None => {
            local
                .timed(
                    "select batch keys",
                    local.client().query(&st.keys_first, &[&limit]),
                )
                .await?
        }
        Some((ts, id)) => {
            local
                .timed(
                    "select batch keys",
                    local.client().query(&st.keys_after, &[&limit, ts, id]),
                )
                .await?
        }
    };
    let mut keys: Vec<(i64, Option<String>, Option<String>)> = Vec::with_capacity(rows.len());
    for r in &rows {
        keys.push((
            cell(r, 0, "read a reading's id")?,
            cell(r, 1, "read a reading's timestamp")?,
            cell(r, 2, "read a reading's uid")?,
        ));
    }
    let mut sel = Selected {
        readings: Vec::with_capacity(keys.len()),
        seen: keys.len(),
        last: keys
            .iter()
            .rev()
            .find_map(|(id, ts, _)| ts.clone().map(|t| (t, *id))),
    };
    let mut todo: Vec<Range<usize>> = Vec::new();
    todo.push(0..keys.len());
    while let Some(range) = todo.pop() {
        let ids: Vec<i64> = keys[range.clone()].iter().map(|k| k.0).collect();
        match local
            .timed(
                "select readings by id",
                local.client().query(&st.by_ids, &[&ids]),
            )
            .await
        {
            Ok(rows) => {
                for row in &rows {
                    match reading(row)? {
                        Ok(r) => sel.readings.push(r),
                        Err(u) => quarantine_unreadable(ctx, &u).await?,
                    }
                }
            }
            Err(e) if is_unreadable(&e) && range.len() == 1 => {
                let (id, ts, uid) = &keys[range.start];
                let u = Unreadable {
                    id: *id,
                    uid: uid.clone(),
                    timestamp: ts.clone(),
                    why: e.to_string(),
                };
                quarantine_unreadable(ctx, &u).await?;
            }
            Err(e) if is_unreadable(&e) => {
                let mid = range.start + range.len() / 2;
                // Left pushed last, so tried first: the readings stay in queue order.
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
            Err(e) => return Err(e),
        }
    }
    // Parts are consecutive in queue order and taken left to right, and each comes
    // back sorted: the readings are in queue order.
    Ok(sel)
}

/// Quarantines a local row that cannot be uploaded, if the cap allows; the cap
/// reached, the row stays queued and the phase fails at its end.
async fn quarantine_unreadable(ctx: &Ctx<'_>, u: &Unreadable) -> Result<()> {
    let msg = format!("local: reading id {} cannot be read: {}", u.id, u.why);
    let uid = u.uid.as_deref().unwrap_or("unknown");
    if !claim_quarantine(ctx) {
        log::warn!("upload: not quarantined, cap reached: reading_uid {uid}: {msg}");
        ctx.held_local.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    quarantine(ctx, u.id, uid, &msg).await
}

/// Takes one place under the cap per cycle, if one is left.
fn claim_quarantine(ctx: &Ctx<'_>) -> bool {
    ctx.quarantined
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < verdict::MAX_QUARANTINED_PER_CYCLE).then_some(n + 1)
        })
        .is_ok()
}

/// Delivers one batch (number `seq` of the drain): inserts it centrally, then
/// deletes it locally. When central rejects the data, [`isolate`] finds out whose
/// fault it is.
///
/// Returns what it did even when it fails part way, so that the totals stay honest.
async fn deliver(ctx: &Ctx<'_>, seq: u64, batch: Vec<Reading>) -> (Tally, Result<()>) {
    let mut t = Tally::default();
    t.statements += 1;
    let r = match insert(ctx, &batch).await {
        Ok(inserted) => settle(ctx, &batch, inserted, &mut t).await,
        Err(e) if is_row_rejection(&e) => isolate(ctx, seq, &batch, e, &mut t).await,
        Err(e) => Err(e),
    };
    (t, r)
}

/// After central committed `rows` (`inserted` of them new there): removes them
/// from the local queue (deleted, or marked for the resend window) and counts them.
async fn settle(ctx: &Ctx<'_>, rows: &[Reading], inserted: u64, t: &mut Tally) -> Result<()> {
    delete(ctx, rows).await?;
    let n = rows.len() as u64;
    t.delivered += n;
    t.already += n.saturating_sub(inserted);
    Ok(())
}

/// Central refused `batch` as a whole with `first`, a rejection of data. Splits it
/// into slices sent together, delivers the slices central accepts, and splits the
/// refused ones again, the leftmost first, until the refused readings stand alone:
/// candidates for quarantine, decided at the end of the drain. As soon as the
/// refused single readings show that central refuses readings alike
/// ([`verdict::batch_fault`]), it stops: nothing of the batch is quarantined, what
/// is left stays queued, and the drain fails with the reason.
///
/// Finding k bad readings among n costs about 16·k·log16(n) statements in
/// log16(n) round trips; a central fault costs about 40 statements.
async fn isolate(
    ctx: &Ctx<'_>,
    seq: u64,
    batch: &[Reading],
    first: Error,
    t: &mut Tally,
) -> Result<()> {
    log::info!(
        "upload: central refused a batch of {} ({first}); taking it apart",
        batch.len()
    );
    let (statements, delivered) = (t.statements, t.delivered);
    let r = take_apart(ctx, seq, batch, first, t).await;
    log::info!(
        "upload: took a batch of {} apart in {} statement(s): {} delivered, {}",
        batch.len(),
        t.statements - statements,
        t.delivered - delivered,
        match &r {
            Ok(n) => format!("{n} refused alone"),
            Err(_) => "stopped (see below)".into(),
        }
    );
    r.map(|_| ())
}

/// [`isolate`]'s search; returns how many readings were refused alone.
async fn take_apart(
    ctx: &Ctx<'_>,
    seq: u64,
    batch: &[Reading],
    first: Error,
    t: &mut Tally,
) -> Result<usize> {
    // The refused single readings of this batch: (position, error), ascending.
    let mut found: Vec<(usize, Error)> = Vec::new();
    // Refused ranges still to take apart; the leftmost on top.
    let mut todo: Vec<(Range<usize>, Error)> = Vec::new();
    let _one_at_a_time = ctx.isolating.lock().await;
    if batch.len() == 1 {
        // Nothing to compare it with here: see verdict::decide.
        found.push((0, first));
    } else if ctx.central_fault.load(Ordering::SeqCst) {
        return Err(Error::new(
            Kind::Db,
            format!(
                "upload: central refused a batch of {} ({first}), and another batch showed \
                 central refusing readings alike; the batch stays queued",
                batch.len()
            ),
        ));
    } else {
        todo.push((0..batch.len(), first));
    }
    while let Some((range, err)) = todo.pop() {
        let parts = verdict::slices(range.clone());
        log::debug!(
            "upload: central refused {} reading(s) ({err}); trying them in {} slices",
            range.len(),
            parts.len()
        );
        t.statements += parts.len() as u64;
        let results = join_all(parts.iter().map(|p| insert(ctx, &batch[p.clone()]))).await;
        let mut refused = Vec::new();
        let mut other: Option<Error> = None;
        for (p, res) in parts.into_iter().zip(results) {
            match res {
                Ok(inserted) => settle(ctx, &batch[p], inserted, t).await?,
                Err(e) if is_row_rejection(&e) && p.len() == 1 => found.push((p.start, e)),
                Err(e) if is_row_rejection(&e) => refused.push((p, e)),
                Err(e) => other = other.or(Some(e)),
            }
        }
        if let Some(e) = other {
            return Err(e);
        }
        todo.extend(refused.into_iter().rev());
        found.sort_by_key(|f| f.0);
        let codes: Vec<verdict::Refused> = found
            .iter()
            .map(|(p, e)| (*p, batch[*p].id, e.code().unwrap_or_default()))
            .collect();
        if verdict::batch_fault(batch.len(), &codes) == verdict::Fault::Central {
            ctx.central_fault.store(true, Ordering::SeqCst);
            return Err(Error::new(
                Kind::Db,
                format!(
                    "upload held: central refused {} reading(s) one by one alike, {} of them in a \
                     row, so the fault is central's, not the readings': {}; nothing quarantined, \
                     the readings stay queued until central is fixed",
                    found.len(),
                    verdict::alike_run(&codes).map_or(found.len(), |r| r.0),
                    found[0].1
                ),
            ));
        }
    }
    for (p, e) in &found {
        candidate(ctx, (seq, *p), &batch[*p], e);
    }
    Ok(found.len())
}

/// Notes a refused single reading for the drain's decision.
fn candidate(ctx: &Ctx<'_>, order: (u64, usize), r: &Reading, why: &Error) {
    let mut c = ctx.candidates.lock().unwrap_or_else(|e| e.into_inner());
    c.push(Candidate {
        order,
        id: r.id,
        uid: r.uid.clone(),
        code: why.code().unwrap_or_default().to_string(),
        message: why.to_string(),
    });
}

/// Decides on the refused readings collected so far ([`verdict::decide`]) and
/// quarantines those it says, oldest first. Fails with the reason when the rest
/// must stay queued (no evidence against them, or the cap).
async fn quarantine_candidates(ctx: &Ctx<'_>, accepted: u64) -> Result<()> {
    let mut cands = std::mem::take(&mut *ctx.candidates.lock().unwrap_or_else(|e| e.into_inner()));
    cands.sort_by_key(|c| c.order);
    let codes: Vec<&str> = cands.iter().map(|c| c.code.as_str()).collect();
    let decision = verdict::decide(&codes, accepted, ctx.quarantined.load(Ordering::SeqCst));
    for c in &cands[..decision.quarantine] {
        if claim_quarantine(ctx) {
            quarantine(ctx, c.id, &c.uid, &c.message).await?;
        }
    }
    let held_local = ctx.held_local.swap(0, Ordering::SeqCst);
    let hold = match (decision.hold, held_local) {
        (Some(h), _) => Some(match cands.first() {
            Some(c) => format!("upload held: {h}; central said: {}", c.message),
            None => format!("upload held: {h}"),
        }),
        (None, 0) => None,
        (None, n) => Some(format!(
            "upload held: quarantine cap reached: at most {} readings are quarantined per \
             cycle; {n} unreadable local row(s) stay queued for the next cycle",
            verdict::MAX_QUARANTINED_PER_CYCLE
        )),
    };
    match hold {
        Some(h) => Err(Error::new(Kind::Db, h)),
        None => Ok(()),
    }
}

/// Inserts `rows` centrally in one statement; returns how many were new there.
async fn insert(ctx: &Ctx<'_>, rows: &[Reading]) -> Result<u64> {
    let uid: Vec<&str> = rows.iter().map(|r| r.uid.as_str()).collect();
    let meter: Vec<&str> = rows.iter().map(|r| r.meter_id.as_str()).collect();
    let ts: Vec<&str> = rows.iter().map(|r| r.timestamp.as_str()).collect();
    let value: Vec<&str> = rows.iter().map(|r| r.value.as_str()).collect();
    let unit: Vec<&str> = rows.iter().map(|r| r.unit.as_str()).collect();
    let metadata: Vec<Option<&str>> = rows.iter().map(|r| r.metadata.as_deref()).collect();
    let created: Vec<Option<&str>> = rows.iter().map(|r| r.created_at.as_deref()).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.sync_attempts).collect();
    let values: [&(dyn ToSql + Sync); 8] = [
        &uid, &meter, &ts, &value, &unit, &metadata, &created, &attempts,
    ];
    let params: Vec<(&(dyn ToSql + Sync), Type)> = values.into_iter().zip(INSERT_TYPES).collect();
    let what = format!("insert batch of {}", rows.len());
    let central = ctx.central;
    central
        .retrying(ctx.retries, || {
            central.execute_in_transaction(&what, INSERT, &params)
        })
        .await
}

/// Deletes exactly `rows` locally, or marks them uploaded when there is a resend
/// window: one statement, so one local transaction.
async fn delete(ctx: &Ctx<'_>, rows: &[Reading]) -> Result<()> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let (what, st) = if ctx.retain {
        (
            format!("mark uploaded batch of {}", rows.len()),
            &ctx.st.mark,
        )
    } else {
        (
            format!("delete uploaded batch of {}", rows.len()),
            &ctx.st.delete,
        )
    };
    let params: [&(dyn ToSql + Sync); 1] = [&ids];
    let n = run(ctx.local, ctx.retries, &what, || {
        ctx.local.client().execute(st, &params)
    })
    .await?;
    if n != ids.len() as u64 {
        // Someone else removed some of them meanwhile; central has them all anyway.
        log::debug!("upload: deleted {n} of {} uploaded readings", ids.len());
    }
    Ok(())
}

/// Keeps reading `id` locally with the reason, out of the queue until `requeue`.
async fn quarantine(ctx: &Ctx<'_>, id: i64, uid: &str, msg: &str) -> Result<()> {
    log::warn!("upload: quarantined reading id {id} (reading_uid {uid}): {msg}");
    let params: [&(dyn ToSql + Sync); 2] = [&id, &msg];
    run(
        ctx.local,
        ctx.retries,
        "quarantine a rejected reading",
        || ctx.local.client().execute(&ctx.st.quarantine, &params),
    )
    .await?;
    Ok(())
}

/// One round trip on `db` with its timeout, retried when transient (see
/// [`Db::retrying`]).
async fn run<T, F, Fut>(db: &Db, retries: u32, what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    db.retrying(retries, || db.timed(what, op())).await
}

/// Whether central may have rejected the rows themselves, so that some reading in
/// the batch would be refused however often it is sent: SQLSTATE class 22 (data
/// exception: a value out of range), 23 (integrity constraint: CHECK, foreign key,
/// NOT NULL, a missing partition), 44 (WITH CHECK OPTION), 54 (a program limit such
/// as an index row too large), P0 (a trigger that raised an exception), and 42501
/// (insufficient privilege), which is also how row-level security refuses a row
/// (`new row violates row-level security policy`: a meter reassigned centrally to
/// another gateway). Such a refusal is isolated; whether it was about the rows or
/// about central (a missing partition for this month, a new NOT NULL column, a
/// revoked INSERT privilege refuse every reading alike) is decided from the
/// answers, see `verdict.rs`.
///
/// Narrower on purpose than "any answer that
/// is not transient": a missing table or column, or an ON CONFLICT without its
/// unique key (the rest of class 42) refuse every statement before looking at a
/// row; they fail the phase at once, and the readings wait for the operator.
pub fn is_row_rejection(e: &Error) -> bool {
    e.kind() == Kind::Db
        && !e.is_transient()
        && e.code().is_some_and(|c| {
            c == "42501"
                || ["22", "23", "44", "54", "P0"]
                    .iter()
                    .any(|p| c.starts_with(p))
        })
}

/// Clears the quarantine of the given readings (all when `ids` is None), so that
/// the next cycle tries them again. Returns how many were released.
pub async fn requeue(local: &Db, ids: Option<&[i64]>) -> Result<u64> {
    let n = match ids {
        None => {
            local
                .execute(
                    "requeue quarantined readings",
                    "UPDATE meter_readings SET sync_error = NULL WHERE sync_error IS NOT NULL",
                    &[],
                )
                .await?
        }
        Some(ids) => {
            let n = local
                .execute(
                    "requeue quarantined readings",
                    "UPDATE meter_readings SET sync_error = NULL \
                     WHERE sync_error IS NOT NULL AND id = ANY($1)",
                    &[&ids],
                )
                .await?;
            if n < ids.len() as u64 {
                log::warn!(
                    "requeue: {} of the {} given id(s) are not quarantined readings",
                    ids.len() as u64 - n,
                    ids.len()
                );
            }
            n
        }
    };
    log::info!("requeue: released {n} quarantined reading(s)");
    Ok(n)
}

/// Deletes retained readings whose resend window (`UPLOAD_RETAIN_HOURS`, counted
/// from the upload) is over, [`PURGE_BATCH`] at a time and at most [`PURGE_ROUNDS`]
/// statements per cycle. With no window, whatever an earlier window retained goes.
/// A failure is logged and left for the next cycle: the purge never holds up the
/// upload.
async fn purge_retained(local: &Db, window: std::time::Duration) {
    let secs = window.as_secs_f64();
    let mut total = 0u64;
    for _ in 0..PURGE_ROUNDS {
        let n = match local
            .execute(
                "purge retained readings",
                "DELETE FROM meter_readings WHERE id IN (
                     SELECT id FROM meter_readings
                     WHERE is_synchronized AND synced_at IS NOT NULL
                       AND synced_at < now() - make_interval(secs => $1::float8)
                     LIMIT $2)",
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

/// `meter-sync resend --since`: queues again the retained readings uploaded at or
/// after `since` (a timestamp PostgreSQL reads), for a central restored from a
/// backup older than them. Central ignores the ones it still has (`ON CONFLICT DO
/// NOTHING` on `reading_uid`), so each arrives once. Returns how many were queued.
pub async fn resend(local: &Db, since: &str) -> Result<u64> {
    let n = local
        .execute(
            "queue retained readings again",
            "UPDATE meter_readings SET is_synchronized = false, synced_at = NULL \
             WHERE is_synchronized AND synced_at IS NOT NULL \
               AND synced_at >= $1::text::timestamptz",
            &[&since],
        )
        .await?;
    log::info!("resend: {n} retained reading(s) uploaded since {since} queued again");
    Ok(n)
}
