//! Upload: readings leave the gateway batch by batch, each batch one atomic,
//! idempotent statement in central, and are deleted locally only after that
//! statement has committed. Readings central rejects are bisected out and
//! quarantined locally so that they do not hold up the rest.
//!
//! Every value travels in PostgreSQL's binary format exactly as the local server
//! sent it (see [`batch`]), so nothing passes through a float, a time type or a text
//! rendering of ours: what arrives is exactly what the collector wrote. A batch goes
//! to central as one binary `COPY … FROM STDIN`, the same path and the same bytes as
//! a `COPY` pipe between the two servers; only a batch that meets a reading central
//! already has (a re-send after a crash between the central commit and the local
//! delete) goes again as `INSERT … ON CONFLICT DO NOTHING` (see [`insert`]).

mod batch;
mod pace;

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use crate::config::{Config, Side};
use crate::db::Db;
use crate::error::{Error, Kind, Result};
use crate::lock::LockedLocal;
use crate::report::PhaseResult;
use crate::shutdown::Shutdown;
use batch::{Batch, Builder, Encoded, CENTRAL_COLUMNS};
use pace::{is_size_failure, AfterSizeFailure, Pace, Pipeline};

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
    Ok((row.get(0), row.get(1)))
}

/// The local `id`, then the columns central gets ([`CENTRAL_COLUMNS`]), each in the
/// server's binary format (tokio-postgres asks for binary results). Each is cast to
/// its SPEC §4 type ([`batch::ELEMENT_TYPES`]; a no-op on a table created by our
/// migrations), so that a legacy table with an `integer` id or `text` columns still
/// yields exactly the binary encoding central's columns expect.
const COLUMNS: &str = "r.id::int8, r.reading_uid::uuid, r.meter_id::varchar, \
     r.\"timestamp\"::timestamptz, r.value::numeric, r.unit::varchar, r.metadata::jsonb, \
     r.created_at::timestamptz, r.sync_attempts::int4";

/// The fast path: one statement per batch, so one implicit transaction, all rows or
/// none. It works unchanged on a table partitioned by `timestamp` (COPY routes each
/// row to its partition).
fn copy_sql() -> String {
    format!("COPY meter_readings ({CENTRAL_COLUMNS}) FROM STDIN (FORMAT binary)")
}

/// The fallback for a batch that meets a reading central already has: `ON CONFLICT
/// DO NOTHING` on the unique key makes each re-sent reading a no-op that still
/// counts as delivered. The values are the batch's binary bytes again, as one
/// binary array per column; one statement, so one implicit transaction as well.
const INSERT: &str = "INSERT INTO meter_readings \
     (reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at, sync_attempts) \
     SELECT * FROM unnest($1::uuid[], $2::varchar[], $3::timestamptz[], $4::numeric[], \
                          $5::varchar[], $6::jsonb[], $7::timestamptz[], $8::int4[]) \
     ON CONFLICT (reading_uid, \"timestamp\") DO NOTHING";

const DELETE: &str = "DELETE FROM meter_readings WHERE id = ANY($1)";

const QUARANTINE: &str =
    "UPDATE meter_readings SET sync_error = $2, sync_attempts = sync_attempts + 1 WHERE id = $1";

/// The local statements of one drain, prepared once. Central gets only unnamed
/// statements (PgBouncer in transaction pooling mode keeps no prepared statement
/// from one transaction to the next).
struct Statements {
    first: Statement,
    after: Statement,
    delete: Statement,
    quarantine: Statement,
    copy: String,
}

impl Statements {
    async fn prepare(local: &Db) -> Result<Statements> {
        let select = format!("SELECT {COLUMNS} FROM meter_readings r WHERE {PENDING}");
        Ok(Statements {
            first: prep(
                local,
                "prepare batch selection",
                format!("{select} ORDER BY r.\"timestamp\", r.id LIMIT $1"),
            )
            .await?,
            // Keyset pagination: the next batch starts after the last one read, so
            // it can be read while earlier batches are still in flight.
            after: prep(
                local,
                "prepare batch selection",
                format!(
                    "{select} AND (r.\"timestamp\", r.id) > ($2::timestamptz, $3) \
                     ORDER BY r.\"timestamp\", r.id LIMIT $1"
                ),
            )
            .await?,
            delete: prep(local, "prepare batch delete", DELETE.into()).await?,
            quarantine: prep(local, "prepare quarantine", QUARANTINE.into()).await?,
            copy: copy_sql(),
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
    quarantined: u64,
    /// Insert statements sent, bisection included.
    statements: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.batches += o.batches;
        self.delivered += o.delivered;
        self.already += o.already;
        self.quarantined += o.quarantined;
        self.statements += o.statements;
    }
}

/// What every batch needs: both connections, the statements, the retry budget, and
/// the order of the central statements in flight (for their timeouts).
struct Ctx<'a> {
    local: &'a Db,
    central: &'a Db,
    st: &'a Statements,
    retries: u32,
    pipe: Pipeline,
    /// `UPLOAD_METHOD=copy`, until central refuses COPY for this drain (see
    /// [`insert`]); atomic because the batches in flight share the context.
    copy: AtomicBool,
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
/// retried up to `MAX_QUERY_RETRIES` times (see [`Db::retrying`]); a batch that
/// failed because of its size (see [`pace::is_size_failure`]) is not retried as it
/// was: the batch size is halved, the batches in flight finish, and the queue is
/// read again from its oldest reading in smaller batches (growing back after
/// successes, see [`Pace`]). Any other failure, and a rejection that is not about
/// the rows (a missing table, a permission), ends the drain with that error once the
/// batches in flight are done: the readings stay queued for the next cycle. Only a
/// rejection of the data itself is bisected and quarantined (see
/// [`is_row_rejection`]).
pub async fn drain(
    cfg: &Config,
    local: &mut LockedLocal,
    central: &mut Db,
    shutdown: &Shutdown,
) -> Result<PhaseResult> {
    let (local, central): (&Db, &Db) = (local, central);
    let start = Instant::now();
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
        pipe: Pipeline::default(),
        copy: AtomicBool::new(cfg.upload_copy),
    };
    let depth = cfg.upload_pipeline_depth.max(1);
    let mut pace = Pace::resume(cfg.batch_size);
    // A batch failed because of its size: no new batch until those in flight are
    // done, then the queue is read again from the oldest, in smaller batches.
    let mut restart = false;

    let mut total = Tally::default();
    let mut failure: Option<Error> = None;
    let mut stopped: Option<&str> = None;
    // Where the next selection starts: after the last reading read. None starts from
    // the oldest reading, which is how each pass begins.
    let mut key: Option<(Option<Bytes>, i64)> = None;
    let mut exhausted = false;
    let mut rescanned = false;
    let mut reader: Option<BoxFuture<'_, Result<Batch>>> = None;
    // Each batch in flight yields what it did, how it ended, and how many readings
    // it had.
    let mut inflight: FuturesUnordered<BoxFuture<'_, (Tally, Result<()>, usize)>> =
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
        if restart && inflight.is_empty() && reader.is_none() {
            restart = false;
            key = None;
            exhausted = false;
        }
        let may_start = may_start && !restart;
        if may_start && exhausted && inflight.is_empty() && reader.is_none() && !rescanned {
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
            reader = Some(Box::pin(select_batch(
                ctx.local,
                ctx.st,
                key.clone(),
                pace.size(),
            )));
        }
        if reader.is_none() && inflight.is_empty() {
            break;
        }
        tokio::select! {
            r = async { reader.as_mut().expect("guarded").await }, if reader.is_some() => {
                reader = None;
                match r {
                    // Read at the old size: the restart reads these again.
                    Ok(_) if restart => {}
                    Ok(rows) if rows.is_empty() => exhausted = true,
                    Ok(rows) => {
                        key = rows.last_key();
                        total.batches += 1;
                        let ctx = &ctx;
                        inflight.push(Box::pin(async move {
                            let n = rows.len();
                            let (t, r) = deliver(ctx, rows).await;
                            (t, r, n)
                        }));
                    }
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            Some((t, r, n)) = inflight.next(), if !inflight.is_empty() => {
                total.add(&t);
                crate::notify::alive();
                match r {
                    Ok(()) => pace.succeeded(n),
                    Err(e) => {
                        if after_failure(&mut pace, &e, n, central) {
                            restart = true;
                        } else {
                            failure = failure.or(Some(e));
                        }
                    }
                }
            }
        }
    }

    pace.remember();
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
            total.quarantined
        );
        return Err(e);
    }
    let remaining = count_pending(local).await?;
    let mut summary = format!(
        "uploaded {} in {} batches, {} quarantined, {} remaining",
        total.delivered, total.batches, total.quarantined, remaining
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

/// Whether the drain can go on after a batch of `rows` failed with `e`: only when
/// it failed because of its size on a central connection that is still open, and a
/// smaller batch is left to try. The halving is kept even when the drain ends (a
/// client-side timeout gives the connection up), for the next cycle.
fn after_failure(pace: &mut Pace, e: &Error, rows: usize, central: &Db) -> bool {
    if e.side() != Some(Side::Central) || !is_size_failure(e) {
        return false;
    }
    let next = pace.failed_by_size(rows);
    let retry =
        next == AfterSizeFailure::RetrySmaller && !e.is_connection_lost() && !central.is_closed();
    log::warn!(
        "upload: a batch of {rows} failed because of its size ({e}); {}",
        match (next, retry) {
            (AfterSizeFailure::GiveUp, _) => "already at 1 reading per batch".to_string(),
            (_, true) => format!("retrying in batches of {}", pace.size()),
            (_, false) => format!("the next cycle starts with batches of {}", pace.size()),
        }
    );
    retry
}

async fn count_pending(local: &Db) -> Result<i64> {
    let row = local
        .query_one(
            "count queued readings",
            &format!("SELECT count(*) FROM meter_readings WHERE {PENDING}"),
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The next batch, oldest `timestamp` first and ties by `id`, after `key` if given,
/// encoded row by row as it streams in (see [`batch`]).
async fn select_batch(
    local: &Db,
    st: &Statements,
    key: Option<(Option<Bytes>, i64)>,
    size: usize,
) -> Result<Batch> {
    let limit = i64::try_from(size).unwrap_or(i64::MAX);
    let read = async {
        let rows = match &key {
            None => {
                let params: [&(dyn ToSql + Sync); 1] = [&limit];
                local.client().query_raw(&st.first, params).await?
            }
            Some((ts, id)) => {
                let ts = ts.as_deref().map(Encoded);
                let params: [&(dyn ToSql + Sync); 3] = [&limit, &ts, id];
                local.client().query_raw(&st.after, params).await?
            }
        };
        let mut rows = std::pin::pin!(rows);
        let mut b = Builder::with_capacity(size);
        while let Some(row) = rows.try_next().await? {
            if let Err(u) = b.push(&row) {
                return Ok(Err(u));
            }
        }
        Ok(Ok(b))
    };
    match local.timed("select batch", read).await? {
        Ok(b) => b
            .finish()
            .map_err(|u| Error::new(Kind::Other, format!("local: select batch: {}", u.0))),
        Err(u) => Err(Error::new(
            Kind::Other,
            format!("local: select batch: {}", u.0),
        )),
    }
}

/// Delivers one batch: inserts it centrally, then deletes it locally. When central
/// rejects the data, the batch is bisected: each half is tried on its own, halves
/// that commit are deleted, halves that are rejected are split again, and a single
/// rejected reading is quarantined. Finding k bad readings among n costs about
/// 2·k·log2(n) statements, and nothing at all when there are none.
///
/// Returns what it did even when it fails part way, so that the totals stay honest.
async fn deliver(ctx: &Ctx<'_>, batch: Batch) -> (Tally, Result<()>) {
    let mut t = Tally::default();
    // Left halves are pushed last so they are tried first: oldest first, still.
    let mut todo: Vec<Range<usize>> = Vec::new();
    todo.push(0..batch.len());
    while let Some(range) = todo.pop() {
        let rows = range.clone();
        t.statements += 1;
        match insert(ctx, &batch, rows.clone()).await {
            Ok(inserted) => {
                if let Err(e) = delete(ctx, &batch, rows.clone()).await {
                    return (t, Err(e));
                }
                let n = rows.len() as u64;
                t.delivered += n;
                t.already += n.saturating_sub(inserted);
            }
            Err(e) if is_row_rejection(&e) => {
                if rows.len() == 1 {
                    if let Err(e) = quarantine(ctx, &batch, rows.start, &e).await {
                        return (t, Err(e));
                    }
                    t.quarantined += 1;
                } else {
                    let mid = range.start + rows.len() / 2;
                    log::info!(
                        "upload: central rejected a batch of {} ({e}); bisecting",
                        rows.len()
                    );
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
            }
            Err(e) => return (t, Err(e)),
        }
    }
    (t, Ok(()))
}

/// Inserts `rows` of `batch` centrally in one statement; returns how many were new
/// there.
///
/// The fast path is one binary COPY. COPY has no ON CONFLICT, so a batch holding a
/// reading central already has (we died between the central commit and the local
/// delete, and this is the re-send) fails whole with 23505 and nothing of it is
/// kept; that batch, and only it, is sent again as `INSERT … ON CONFLICT DO
/// NOTHING` with the same bytes. 22P03 (binary data central cannot read as its
/// column type: a central column of another type than SPEC §4's) takes the same
/// fallback, whose casts convert where a conversion exists. Whatever the fallback
/// fails with is what the caller sees (a rejected reading is bisected as before).
///
/// A central that refuses COPY itself (0A000: a table under row-level security,
/// where PostgreSQL has no COPY FROM) gets every later batch of this drain as the
/// INSERT directly, said once.
///
/// With `UPLOAD_METHOD=insert` every batch takes the INSERT directly.
async fn insert(ctx: &Ctx<'_>, batch: &Batch, rows: Range<usize>) -> Result<u64> {
    if !ctx.copy.load(Ordering::Relaxed) {
        return insert_on_conflict(ctx, batch, rows).await;
    }
    match copy(ctx, batch, rows.clone()).await {
        Err(e) if copy_refused(&e) => {
            if ctx.copy.swap(false, Ordering::Relaxed) {
                log::warn!(
                    "upload: {e}; sending batches as INSERT … ON CONFLICT for the rest of this drain \
                     (UPLOAD_METHOD=insert says so from the start)"
                );
            }
            insert_on_conflict(ctx, batch, rows).await
        }
        Err(e) if needs_fallback(&e) => {
            log::info!(
                "upload: {e}; sending these {} reading(s) again with ON CONFLICT DO NOTHING",
                rows.len()
            );
            insert_on_conflict(ctx, batch, rows).await
        }
        other => other,
    }
}

/// See [`insert`].
fn copy_refused(e: &Error) -> bool {
    e.kind() == Kind::Db && e.code() == Some("0A000")
}

/// See [`insert`].
fn needs_fallback(e: &Error) -> bool {
    e.kind() == Kind::Db && matches!(e.code(), Some("23505" | "22P03"))
}

/// `rows` of `batch` as one binary `COPY … FROM STDIN`, sent with its data in one
/// go so that it pipelines behind the batches before it (vendor/README.md).
async fn copy(ctx: &Ctx<'_>, batch: &Batch, rows: Range<usize>) -> Result<u64> {
    let what = format!("copy batch of {}", rows.len());
    central_call(ctx, &what, || {
        ctx.central.in_transaction(
            ctx.central
                .client()
                .copy_in_all(&ctx.st.copy, batch.copy_data(rows.clone())),
        )
    })
    .await
}

async fn insert_on_conflict(ctx: &Ctx<'_>, batch: &Batch, rows: Range<usize>) -> Result<u64> {
    let arrays = batch.arrays(rows.clone());
    let encoded: Vec<Encoded> = arrays.iter().map(|(a, _)| Encoded(a)).collect();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = encoded
        .iter()
        .zip(&arrays)
        .map(|(e, (_, t))| (e as &(dyn ToSql + Sync), t.clone()))
        .collect();
    let what = format!("insert batch of {} with ON CONFLICT DO NOTHING", rows.len());
    central_call(ctx, &what, || {
        ctx.central
            .in_transaction(ctx.central.client().execute_typed(INSERT, &params))
    })
    .await
}

/// One central round trip, timed from when it reaches the head of the pipeline (see
/// [`Pipeline`]), retried like [`Db::retrying`] when transient, except after a
/// failure that may be about the batch's size: that one is retried smaller by the
/// drain, not unchanged here.
async fn central_call<T, F, Fut>(ctx: &Ctx<'_>, what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    let db = ctx.central;
    let mut n = 0;
    loop {
        let fut = op();
        let r = ctx
            .pipe
            .timed(
                db.timeout(),
                async { fut.await.map_err(|e| Error::db(db.side(), what, e)) },
                || Error::timeout(db.side(), what, db.timeout()),
            )
            .await;
        match r {
            Err(e)
                if e.is_transient()
                    && !is_size_failure(&e)
                    && !e.is_connection_lost()
                    && !db.is_closed()
                    && n < ctx.retries =>
            {
                n += 1;
                log::warn!("{e}; retry {n}/{}", ctx.retries);
                tokio::time::sleep(Duration::from_millis(100 << (n - 1).min(6))).await;
            }
            other => return other,
        }
    }
}

/// Deletes exactly `rows` locally: one statement, so one local transaction.
async fn delete(ctx: &Ctx<'_>, batch: &Batch, rows: Range<usize>) -> Result<()> {
    let ids: &[i64] = batch.ids(rows.clone());
    let what = format!("delete uploaded batch of {}", rows.len());
    let params: [&(dyn ToSql + Sync); 1] = [&ids];
    let n = run(ctx.local, ctx.retries, &what, || {
        ctx.local.client().execute(&ctx.st.delete, &params)
    })
    .await?;
    if n != ids.len() as u64 {
        // Someone else removed some of them meanwhile; central has them all anyway.
        log::debug!("upload: deleted {n} of {} uploaded readings", ids.len());
    }
    Ok(())
}

/// Keeps `r` locally with central's reason, out of the queue until `requeue`.
async fn quarantine(ctx: &Ctx<'_>, batch: &Batch, i: usize, why: &Error) -> Result<()> {
    let msg = why.to_string();
    let id = batch.ids(i..i + 1)[0];
    log::warn!(
        "upload: quarantined reading id {id} (reading_uid {}): {msg}",
        batch.uid(i)
    );
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

/// Whether central rejected the rows themselves, so that some reading in the batch
/// will be refused however often it is sent: SQLSTATE class 22 (data exception: a
/// value out of range), 23 (integrity constraint: CHECK, foreign key, NOT NULL),
/// 44 (WITH CHECK OPTION), 54 (a program limit such as an index row too large), or
/// P0 (a trigger that raised an exception about a row).
///
/// Narrower on purpose than "any answer that is not transient": a missing table or
/// column, a missing privilege, an ON CONFLICT without its unique key (class 42)
/// refuse every reading alike, and
/// bisecting those would quarantine the whole queue. They fail the phase instead,
/// and the readings wait for the operator to fix central.
pub fn is_row_rejection(e: &Error) -> bool {
    e.kind() == Kind::Db
        && !e.is_transient()
        && e.code().is_some_and(|c| {
            ["22", "23", "44", "54", "P0"]
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
