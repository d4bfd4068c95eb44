//! Upload: readings leave the gateway batch by batch, each batch one atomic,
//! idempotent statement in central, and are deleted locally only after that
//! statement has committed. Readings central rejects are bisected out and
//! quarantined locally so that they do not hold up the rest.
//!
//! Every value travels as text (`numeric`, `timestamptz` and `jsonb` are cast to
//! `text` when read and back when written), so nothing passes through a float or a
//! time type of ours: what arrives is exactly what the collector wrote.

use std::future::Future;
use std::ops::Range;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

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
    Ok((row.get(0), row.get(1)))
}

/// Output names differ from the column names on purpose: `ORDER BY "timestamp"`
/// would otherwise sort by the text column of the select list (SQL resolves ORDER
/// BY names against the output first), which is not time order for BC dates and
/// cannot use the index.
const COLUMNS: &str = "r.id, r.reading_uid::text AS uid_text, r.meter_id::text AS meter_text, \
     r.\"timestamp\"::text AS ts_text, r.value::text AS value_text, r.unit::text AS unit_text, \
     r.metadata::text AS metadata_text, r.created_at::text AS created_text, r.sync_attempts";

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

const DELETE: &str = "DELETE FROM meter_readings WHERE id = ANY($1)";

const QUARANTINE: &str =
    "UPDATE meter_readings SET sync_error = $2, sync_attempts = sync_attempts + 1 WHERE id = $1";

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

/// The local statements of one drain, prepared once. Central gets none: under
/// PgBouncer's transaction pooling a prepared statement is gone (or belongs to
/// another client) by the next transaction.
struct Statements {
    first: Statement,
    after: Statement,
    delete: Statement,
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
                    "{select} AND (r.\"timestamp\", r.id) > (($2::text)::timestamptz, $3) \
                     ORDER BY r.\"timestamp\", r.id LIMIT $1"
                ),
            )
            .await?,
            delete: prep(local, "prepare batch delete", DELETE.into()).await?,
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

/// What every batch needs: both connections, the statements, the retry budget.
struct Ctx<'a> {
    local: &'a Db,
    central: &'a Db,
    st: &'a Statements,
    retries: u32,
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
/// is bisected and quarantined (see [`is_row_rejection`]).
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
    let mut reader: Option<BoxFuture<'_, Result<Vec<Reading>>>> = None;
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
                limit,
            )));
        }
        if reader.is_none() && inflight.is_empty() {
            break;
        }
        tokio::select! {
            r = async { reader.as_mut().expect("guarded").await }, if reader.is_some() => {
                reader = None;
                match r {
                    Ok(rows) if rows.is_empty() => exhausted = true,
                    Ok(rows) => {
                        let last = rows.last().expect("not empty");
                        key = Some((last.timestamp.clone(), last.id));
                        total.batches += 1;
                        inflight.push(Box::pin(deliver(&ctx, rows)));
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

/// The next batch, oldest `timestamp` first and ties by `id`, after `key` if given.
async fn select_batch(
    local: &Db,
    st: &Statements,
    key: Option<(String, i64)>,
    limit: i64,
) -> Result<Vec<Reading>> {
    let rows = match &key {
        None => {
            local
                .timed("select batch", local.client().query(&st.first, &[&limit]))
                .await?
        }
        Some((ts, id)) => {
            local
                .timed(
                    "select batch",
                    local.client().query(&st.after, &[&limit, ts, id]),
                )
                .await?
        }
    };
    Ok(rows
        .iter()
        .map(|r| Reading {
            id: r.get(0),
            uid: r.get(1),
            meter_id: r.get(2),
            timestamp: r.get(3),
            value: r.get(4),
            unit: r.get(5),
            metadata: r.get(6),
            created_at: r.get(7),
            sync_attempts: r.get(8),
        })
        .collect())
}

/// Delivers one batch: inserts it centrally, then deletes it locally. When central
/// rejects the data, the batch is bisected: each half is tried on its own, halves
/// that commit are deleted, halves that are rejected are split again, and a single
/// rejected reading is quarantined. Finding k bad readings among n costs about
/// 2·k·log2(n) statements, and nothing at all when there are none.
///
/// Returns what it did even when it fails part way, so that the totals stay honest.
async fn deliver(ctx: &Ctx<'_>, batch: Vec<Reading>) -> (Tally, Result<()>) {
    let mut t = Tally::default();
    // Left halves are pushed last so they are tried first: oldest first, still.
    let mut todo: Vec<Range<usize>> = Vec::new();
    todo.push(0..batch.len());
    while let Some(range) = todo.pop() {
        let rows = &batch[range.clone()];
        t.statements += 1;
        match insert(ctx, rows).await {
            Ok(inserted) => {
                if let Err(e) = delete(ctx, rows).await {
                    return (t, Err(e));
                }
                let n = rows.len() as u64;
                t.delivered += n;
                t.already += n.saturating_sub(inserted);
            }
            Err(e) if is_row_rejection(&e) => {
                if rows.len() == 1 {
                    if let Err(e) = quarantine(ctx, &rows[0], &e).await {
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

/// Deletes exactly `rows` locally: one statement, so one local transaction.
async fn delete(ctx: &Ctx<'_>, rows: &[Reading]) -> Result<()> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
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
async fn quarantine(ctx: &Ctx<'_>, r: &Reading, why: &Error) -> Result<()> {
    let msg = why.to_string();
    log::warn!(
        "upload: quarantined reading id {} (reading_uid {}): {msg}",
        r.id,
        r.uid
    );
    let params: [&(dyn ToSql + Sync); 2] = [&r.id, &msg];
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
