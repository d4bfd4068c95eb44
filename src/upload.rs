//! Upload: readings leave the gateway batch by batch, each batch one atomic,
//! idempotent statement in central, and are deleted locally only after that
//! statement has committed (or marked, with a resend window). Readings central
//! rejects are isolated and quarantined locally so that they do not hold up the
//! rest, unless the refusals show that the fault is central's (`verdict.rs`);
//! local rows that cannot be read are quarantined too (P25).
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
mod verdict;
mod window;

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture};
use futures_util::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Row, Statement};

use crate::config::{Config, Side, UploadMethod};
use crate::db::Db;
use crate::error::{Error, Kind, Result};
use crate::lock::LockedLocal;
use crate::report::{PhaseFailed, PhaseResult};
use crate::shutdown::Shutdown;
use batch::{Batch, Builder, Encoded, Raw, CENTRAL_COLUMNS};
use pace::{is_size_failure, AfterSizeFailure, Pace, Pipeline, POOLER_TURN};
pub use window::resend;

/// The queue: unsynchronized and not quarantined. This predicate is the one of the
/// partial index `meter_readings_pending_idx ("timestamp", id)`, which serves both
/// the count and the ordered, paginated selection.
pub(crate) const PENDING: &str = "NOT is_synchronized AND sync_error IS NULL";

/// Quarantined: central rejected it (P7); waits for `requeue`.
pub(crate) const QUARANTINED: &str = "NOT is_synchronized AND sync_error IS NOT NULL";

/// The queue's two counts as columns `pending` and `quarantined`, each counted
/// through its own partial index (`meter_readings_pending_idx`,
/// `meter_readings_quarantined_idx`), so that neither reads the readings retained
/// for the resend window: one `count(*) … WHERE NOT is_synchronized` with
/// filters read the whole table, a day's readings on a busy gateway, at every
/// cycle's start, after every cycle and in every `status`.
pub(crate) fn counts_sql() -> String {
    format!(
        "(SELECT count(*) FROM meter_readings WHERE {PENDING}) AS pending, \
         (SELECT count(*) FROM meter_readings WHERE {QUARANTINED}) AS quarantined"
    )
}

/// Readings waiting for upload and readings in quarantine (P7).
pub async fn queue_counts(local: &Db) -> Result<(i64, i64)> {
    let row = local
        .query_one("count the queue", &format!("SELECT {}", counts_sql()), &[])
        .await?;
    Ok((
        cell(&row, 0, "count the queue")?,
        cell(&row, 1, "count the queue")?,
    ))
}

/// The local `id`, then the columns central gets ([`CENTRAL_COLUMNS`]), each in the
/// server's binary format (tokio-postgres asks for binary results). Each is cast to
/// its SPEC §4 type ([`batch::ELEMENT_TYPES`]; a no-op on a table created by our
/// migrations), so that a legacy table with an `integer` id or `text` columns still
/// yields exactly the binary encoding central's columns expect. `value` is the
/// expression that reads the local `value` as numeric (see [`value_as_numeric`]).
fn columns(value: &str) -> String {
    format!(
        "r.id::int8, r.reading_uid::uuid, r.meter_id::varchar, \
         r.\"timestamp\"::timestamptz, {value}, r.unit::varchar, r.metadata::jsonb, \
         r.created_at::timestamptz, r.sync_attempts::int4"
    )
}

/// The expression that reads a legacy local `value` of type `local_type` as
/// numeric with every digit it holds. A `real` or `double precision` column goes
/// through its text form, which PostgreSQL prints with as many digits as tell the
/// value apart: the cast to numeric keeps 15 significant digits only (0.1 + 0.2,
/// stored as 0.30000000000000004, arrived as 0.3).
fn value_as_numeric(local_type: &str) -> &'static str {
    match local_type {
        "real" | "double precision" => "r.value::text::numeric",
        _ => "r.value::numeric",
    }
}

/// Reads the local types of `timestamp` and `value`, which a collector's own,
/// older table may have otherwise than SPEC §4, and says once per process what a
/// zoneless timestamp means for the upload. Returns the expression for `value`.
async fn legacy_columns(local: &Db) -> Result<&'static str> {
    let what = "look up the local column types";
    let row = local
        .query_one(
            what,
            "SELECT (SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
                     WHERE attrelid = 'meter_readings'::regclass AND attname = 'timestamp' \
                       AND NOT attisdropped), \
                    (SELECT format_type(atttypid, NULL) FROM pg_attribute \
                     WHERE attrelid = 'meter_readings'::regclass AND attname = 'value' \
                       AND NOT attisdropped)",
            &[],
        )
        .await?;
    let ts: Option<String> = cell(&row, 0, what)?;
    let value: Option<String> = cell(&row, 1, what)?;
    if ts
        .as_deref()
        .is_some_and(|t| t.starts_with("timestamp without time zone"))
    {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            log::warn!(
                "upload: the local meter_readings.\"timestamp\" is timestamp without time zone \
                 (SPEC: timestamptz), so its values are uploaded as UTC times; a collector that \
                 writes local time (now(), or times with an offset, on a server whose TimeZone \
                 is not UTC) gets its readings shifted by that offset. Convert the column once: \
                 ALTER TABLE meter_readings ALTER COLUMN \"timestamp\" TYPE timestamptz USING \
                 \"timestamp\" AT TIME ZONE '<the collector's time zone>'"
            )
        });
    }
    Ok(value_as_numeric(value.as_deref().unwrap_or("numeric")))
}

/// What is always readable about a row, whatever its other columns hold: used to
/// find the row a selection could not read (see [`read_around`]). The timestamp is
/// binary (the keyset key), the uid text (for the quarantine message).
const KEYS: &str = "r.id::int8, r.\"timestamp\"::timestamptz, r.reading_uid::text";

/// Columns of [`columns`] a reading cannot do without (position in the row, name):
/// a NULL in one of them (a legacy table with nullable columns) makes the row
/// unreadable (P25) rather than something to send.
const REQUIRED: [(usize, &str); 5] = [
    (1, "reading_uid"),
    (2, "meter_id"),
    (3, "timestamp"),
    (4, "value"),
    (5, "unit"),
];

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

const DELETE: &str = "DELETE FROM meter_readings WHERE id = ANY($1::int8[])";

/// With a resend window (`UPLOAD_RETAIN_HOURS` > 0) an uploaded batch is marked
/// instead of deleted: the same one statement, after the same central commit.
const MARK: &str = "UPDATE meter_readings SET is_synchronized = true, synced_at = now() \
     WHERE id = ANY($1::int8[]) AND NOT is_synchronized";

const QUARANTINE: &str =
    "UPDATE meter_readings SET sync_error = $2, sync_attempts = sync_attempts + 1 \
     WHERE id = $1::int8 AND sync_error IS NULL";

/// A local row that cannot be uploaded as it is (P25): what is known of it, and why.
struct Unreadable {
    id: i64,
    uid: Option<String>,
    why: String,
}

/// The local statements of one drain, prepared once. Central gets only unnamed
/// statements (PgBouncer in transaction pooling mode keeps no prepared statement
/// from one transaction to the next).
struct Statements {
    /// Whole readings, a batch at a time.
    rows: Keyset,
    /// Only the keys (id, uid), to take a batch apart without reading it whole.
    keys: Keyset,
    by_ids: Statement,
    /// The newest readings queued after a given (timestamp, id), newest first: what
    /// confirms central's fault ([`refuses_the_newest`]).
    newest: Statement,
    delete: Statement,
    mark: Statement,
    quarantine: Statement,
    copy: String,
}

/// The queue in upload order, a page at a time: `first` from the oldest reading,
/// `after` from just past a given (timestamp, id). Keyset pagination, so the next
/// batch can be read while earlier ones are still in flight.
struct Keyset {
    first: Statement,
    after: Statement,
}

impl Keyset {
    async fn prepare(local: &Db, what: &str, select: &str) -> Result<Keyset> {
        let order = "ORDER BY r.\"timestamp\", r.id LIMIT $1";
        Ok(Keyset {
            first: prep(local, what, format!("{select} {order}")).await?,
            after: prep(
                local,
                what,
                format!(
                    "{select} AND (r.\"timestamp\", r.id) > ($2::timestamptz, $3::int8) {order}"
                ),
            )
            .await?,
        })
    }
}

impl Statements {
    async fn prepare(local: &Db) -> Result<Statements> {
        let value = legacy_columns(local).await?;
        let select = format!(
            "SELECT {} FROM meter_readings r WHERE {PENDING}",
            columns(value)
        );
        let keys = format!("SELECT {KEYS} FROM meter_readings r WHERE {PENDING}");
        Ok(Statements {
            rows: Keyset::prepare(local, "prepare batch selection", &select).await?,
            keys: Keyset::prepare(local, "prepare key selection", &keys).await?,
            by_ids: prep(
                local,
                "prepare selection by id",
                format!("{select} AND r.id = ANY($1::int8[]) ORDER BY r.\"timestamp\", r.id"),
            )
            .await?,
            newest: prep(
                local,
                "prepare selection of the newest readings",
                format!(
                    "{select} AND (r.\"timestamp\", r.id) > ($2::timestamptz, $3) \
                     ORDER BY r.\"timestamp\" DESC, r.id DESC LIMIT $1"
                ),
            )
            .await?,
            delete: prep(local, "prepare batch delete", DELETE.into()).await?,
            mark: prep(local, "prepare batch mark", MARK.into()).await?,
            quarantine: prep(local, "prepare quarantine", QUARANTINE.into()).await?,
            copy: copy_sql(),
        })
    }
}

async fn prep(db: &Db, what: &str, sql: String) -> Result<Statement> {
    db.timed(what, db.client().prepare(&sql)).await
}

/// Why a drain stopped before the end of the queue, with readings still queued.
enum Stop {
    Shutdown,
    /// `UPLOAD_TIME_BUDGET_SECONDS` spent.
    Budget,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::Shutdown => "shutdown requested",
            Stop::Budget => "time budget spent",
        })
    }
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
    /// Insert statements sent, isolation included.
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

/// What every batch needs: both connections, the statements, the retry budget, the
/// order of the central statements in flight (for their timeouts), and what the
/// batches of this drain have found out about central's refusals.
struct Ctx<'a> {
    local: &'a Db,
    central: &'a Db,
    st: &'a Statements,
    retries: u32,
    pipe: Pipeline,
    /// `UPLOAD_METHOD=copy`, until central refuses COPY for this drain (see
    /// [`insert`]); atomic because the batches in flight share the context.
    copy: AtomicBool,
    /// Mark uploaded readings instead of deleting them (the resend window).
    retain: bool,
    /// Refused single readings, waiting for the drain's decision.
    candidates: Mutex<Vec<Candidate>>,
    /// A batch showed central refusing readings alike: the others stop isolating.
    central_fault: AtomicBool,
    /// Central accepted one of the newest readings in this drain: no refusal of
    /// this drain is "from here on", so no batch asks again.
    newest_taken: AtomicBool,
    /// The last reading central accepted, in queue order (batch number, position),
    /// for [`verdict::decide`].
    last_accepted: Mutex<Option<(u64, usize)>>,
    /// One batch is taken apart at a time, so that when central refuses everything
    /// the batches behind the first learn it from the first instead of each
    /// spending its own statements to find out.
    isolating: tokio::sync::Mutex<()>,
    /// Readings quarantined in this drain (the cap counts them all).
    quarantined: AtomicU64,
    /// Unreadable local rows left queued because the cap was reached.
    held_local: AtomicU64,
    /// The local connection, one round trip at a time (see [`Ctx::on_local`]);
    /// holds why the drain's local statements stopped, once they have.
    local_turn: tokio::sync::Mutex<Option<String>>,
}

impl Ctx<'_> {
    /// Runs `fut`, one local round trip of the drain (`what`), once the local
    /// statements before it have been answered, so that its timeout counts its own
    /// wait only. Pipelined like central's, a delete queued behind one that waited
    /// for the collector's lock ran into our round-trip timeout although it had not
    /// even started: the connection was given up while its backend, still holding
    /// the cycle lock, went on waiting (see `lock::acquire`).
    ///
    /// After a statement of the drain waited out its lock (55P03) or lost the
    /// connection, the later ones are not sent: each would wait as long again, for
    /// batches central already has, which the next cycle sends again as no-ops (P4).
    async fn on_local<T>(&self, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let mut stopped = self.local_turn.lock().await;
        if let Some(why) = stopped.as_ref() {
            return Err(Error::new(
                Kind::Db,
                format!("{what}: not sent, since {why}; the readings stay queued"),
            )
            .with_side(Side::Local));
        }
        let r = fut.await;
        match r {
            Err(e) if e.code() == Some(crate::error::LOCK_NOT_AVAILABLE) => {
                *stopped = Some("a local statement waited out its lock".into());
                Err(e.with_context(format!(
                    "{what}: meter_readings is locked by another session (VACUUM FULL, ALTER \
                     TABLE, a long transaction of the collector's) for longer than {} ms; the \
                     readings stay queued and are sent again once it is free",
                    self.local.lock_wait().as_millis()
                )))
            }
            Err(e) if e.is_connection_lost() => {
                *stopped = Some("the local connection was lost".into());
                Err(e)
            }
            other => other,
        }
    }

    /// [`Ctx::on_local`] for one round trip within the local timeout.
    async fn on_local_timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        self.on_local(what, self.local.timed(what, fut)).await
    }
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
/// the rows (a missing table), ends the drain with that error once the batches in
/// flight are done: the readings stay queued for the next cycle. Only a rejection
/// that may be about the data is isolated and quarantined (see [`is_row_rejection`]
/// and `verdict.rs`).
///
/// `queued` is the queue's size if the cycle counted it as it started; the drain
/// counts it only when not, and afterwards only when it stopped at its time budget
/// (each count is a scan of the whole queue, seconds on a gateway with a week's
/// backlog; the heartbeat and the metrics file count it after the cycle anyway).
///
/// A drain that fails says how many readings it delivered before
/// ([`PhaseFailed::records`]): those are in central and gone from the queue, and
/// count in `sync_logs` and the metrics like those of a drain that succeeded (a
/// drain of a week's backlog that central's restart cut short counted 0 there).
pub async fn drain(
    cfg: &Config,
    local: &mut LockedLocal,
    central: &mut Db,
    shutdown: &Shutdown,
    queued: Option<i64>,
) -> Result<PhaseResult, PhaseFailed> {
    let (local, central): (&Db, &Db) = (local, central);
    let start = Instant::now();
    window::purge_retained(local, central, cfg.upload_retain).await;
    let queued = match queued {
        Some(n) => n,
        None => count_pending(local).await?,
    };
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
    check_central_key(central).await?;
    let st = Statements::prepare(local).await?;
    let ctx = Ctx {
        local,
        central,
        st: &st,
        retries: cfg.max_query_retries,
        pipe: Pipeline::default(),
        copy: AtomicBool::new(use_copy(cfg.upload_method, central)),
        retain: !cfg.upload_retain.is_zero(),
        candidates: Mutex::new(Vec::new()),
        central_fault: AtomicBool::new(false),
        newest_taken: AtomicBool::new(false),
        last_accepted: Mutex::new(None),
        isolating: tokio::sync::Mutex::new(()),
        quarantined: AtomicU64::new(0),
        held_local: AtomicU64::new(0),
        local_turn: tokio::sync::Mutex::new(None),
    };
    let depth = cfg.upload_pipeline_depth.max(1);
    let mut pace = Pace::resume(cfg.batch_size);
    // A batch failed because of its size: no new batch until those in flight are
    // done, then the queue is read again from the oldest, in smaller batches.
    let mut restart = false;

    let mut total = Tally::default();
    let mut failure: Option<Error> = None;
    let mut stopped: Option<Stop> = None;
    // Where the next selection starts: after the last reading read. None starts from
    // the oldest reading, which is how each pass begins.
    let mut key: Option<(Option<Bytes>, i64)> = None;
    let mut exhausted = false;
    let mut rescanned = false;
    // The largest local id this drain has read: what the collector writes later gets
    // a larger one.
    let mut max_id: Option<i64> = None;
    let mut reader: Option<BoxFuture<'_, Result<Selected>>> = None;
    // Each batch in flight yields what it did, how it ended, and how many readings
    // it had.
    let mut inflight: FuturesUnordered<BoxFuture<'_, (Tally, Result<()>, usize)>> =
        FuturesUnordered::new();
    // Since when batches have been in flight without a break: behind a pooler the
    // pipeline runs dry after POOLER_TURN, so that the pooler can take its server
    // connection back (see there).
    let pooled = central.behind_pooler();
    let mut busy_since: Option<Instant> = None;

    loop {
        if stopped.is_none() && failure.is_none() {
            if shutdown.is_requested() {
                stopped = Some(Stop::Shutdown);
            } else if start.elapsed() >= cfg.upload_time_budget {
                stopped = Some(Stop::Budget);
            }
        }
        let may_start = stopped.is_none() && failure.is_none();
        if restart && inflight.is_empty() && reader.is_none() {
            // The refused readings found so far are decided before the smaller
            // batches read them again (else they would be candidates twice).
            restart = false;
            key = None;
            exhausted = false;
            if let Err(e) = quarantine_candidates(&ctx, &mut total).await {
                failure = failure.or(Some(e));
                continue;
            }
        }
        let may_start = may_start && !restart;
        if may_start && exhausted && inflight.is_empty() && reader.is_none() && !rescanned {
            // The refused readings of this pass are decided before the next pass
            // would read them again.
            if let Err(e) = quarantine_candidates(&ctx, &mut total).await {
                failure = Some(e);
                continue;
            }
            // The pass reached the newest reading. One more pass from the oldest
            // picks up readings the collector wrote meanwhile with a timestamp
            // behind the pass (a meter catching up on its buffer). Only one: should
            // delivered readings somehow stay queued (a local trigger that cancels
            // the delete), passes would repeat until the time budget ran out.
            rescanned = true;
            match written_since(&ctx, max_id).await {
                Ok(true) => {
                    key = None;
                    exhausted = false;
                }
                Ok(false) => {}
                Err(e) => {
                    failure = Some(e);
                    continue;
                }
            }
        }
        let turn_over = pooled && busy_since.is_some_and(|t| t.elapsed() >= POOLER_TURN);
        if may_start && !turn_over && !exhausted && reader.is_none() && inflight.len() < depth {
            reader = Some(Box::pin(select_batch(&ctx, key.clone(), pace.size())));
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
                    Ok(sel) if sel.seen == 0 => exhausted = true,
                    Ok(sel) => {
                        max_id = max_id.max(sel.max_id);
                        // Past unreadable rows too: one held by the cap stays queued
                        // and must not be read again in this pass.
                        key = sel.last;
                        if !sel.batch.is_empty() {
                            total.batches += 1;
                            busy_since.get_or_insert_with(Instant::now);
                            let (ctx, seq, rows) = (&ctx, total.batches, sel.batch);
                            inflight.push(Box::pin(async move {
                                let n = rows.len();
                                let (t, r) = deliver(ctx, seq, rows).await;
                                (t, r, n)
                            }));
                        }
                    }
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            Some((t, r, n)) = inflight.next(), if !inflight.is_empty() => {
                if inflight.is_empty() {
                    busy_since = None;
                }
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

    if failure.is_none() {
        if let Err(e) = quarantine_candidates(&ctx, &mut total).await {
            failure = Some(e);
        }
    }
    let quarantined = ctx.quarantined.load(Ordering::SeqCst);
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
            quarantined
        );
        return Err(PhaseFailed {
            records: total.delivered,
            error: e,
        });
    }
    let mut summary = format!(
        "uploaded {} in {} batches, {} quarantined",
        total.delivered, total.batches, quarantined
    );
    if total.already > 0 {
        summary.push_str(&format!("; {} were already in central", total.already));
    }
    match stopped {
        Some(why @ Stop::Budget) => {
            let remaining = count_pending(local).await.map_err(|error| PhaseFailed {
                records: total.delivered,
                error,
            })?;
            log::info!("upload: {why}; {remaining} reading(s) left for the next cycle");
            summary.push_str(&format!("; stopped: {why}, {remaining} remaining"));
        }
        // No count on the way out: the stop has a deadline.
        Some(why @ Stop::Shutdown) => summary.push_str(&format!("; stopped: {why}")),
        None => {}
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
    let size = pace.size();
    let next = pace.failed_by_size(rows);
    let retry =
        next == AfterSizeFailure::RetrySmaller && !e.is_connection_lost() && !central.is_closed();
    // Said by the failure that changed something. When a timeout gives the
    // connection up, every other batch in the pipeline fails with it at once
    // (selected at the old size, they halve nothing): one warning each said the
    // same thing again, eight per dead link at the default depth.
    let level = if pace.size() < size || next == AfterSizeFailure::GiveUp {
        log::Level::Warn
    } else {
        log::Level::Debug
    };
    log::log!(
        level,
        "upload: a batch of {rows} failed because of its size ({e}); {}",
        match (next, retry) {
            (AfterSizeFailure::GiveUp, _) => "already at 1 reading per batch".to_string(),
            (_, true) => format!("retrying in batches of {}", pace.size()),
            (_, false) => format!("the next cycle starts with batches of {}", pace.size()),
        }
    );
    retry
}

/// Whether the queue holds a reading with an id above `max_id` (the largest this
/// drain read), that is one the collector wrote during the pass. Without one the
/// second pass is skipped: starting from the oldest, it would walk the index
/// entries of every reading the drain deleted (VACUUM has not removed them yet; 86
/// ms for 200,000 on PostgreSQL 15, in the drain's last, unpipelined step) to find
/// nothing. The probe walks the primary key from `max_id` up, where only new
/// readings are. A reading written during the pass with a smaller id (its
/// transaction took the id before the pass read a later one, and committed after)
/// is not seen by the probe; the next cycle uploads it.
async fn written_since(ctx: &Ctx<'_>, max_id: Option<i64>) -> Result<bool> {
    let Some(max_id) = max_id else {
        return Ok(true);
    };
    let rows = ctx
        .local
        .query(
            "look for readings written during the upload",
            &format!(
                "SELECT r.id FROM meter_readings r WHERE r.id > $1::int8 AND {PENDING} \
                 ORDER BY r.id LIMIT 1"
            ),
            &[&max_id],
        )
        .await?;
    Ok(!rows.is_empty())
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
    batch: Batch,
    /// Rows the selection covered, readable or not: 0 means the pass is at its end.
    seen: usize,
    /// The keyset position of the last row covered.
    last: Option<(Option<Bytes>, i64)>,
    /// The largest id among the rows covered.
    max_id: Option<i64>,
}

/// The next batch, oldest `timestamp` first and ties by `id`, after `key` if given,
/// encoded row by row as it streams in (see [`batch`]). Rows that cannot be read
/// are quarantined once the selection is in and left out (P25); when the server
/// cannot even send a row (invalid UTF-8 in a SQL_ASCII database, SQLSTATE 22021),
/// the whole selection fails and [`read_around`] finds the row.
async fn select_batch(
    ctx: &Ctx<'_>,
    key: Option<(Option<Bytes>, i64)>,
    size: usize,
) -> Result<Selected> {
    let (local, st) = (ctx.local, ctx.st);
    let limit = i64::try_from(size).unwrap_or(i64::MAX);
    let read = async {
        let rows = match &key {
            None => {
                let params: [&(dyn ToSql + Sync); 1] = [&limit];
                local.client().query_raw(&st.rows.first, params).await?
            }
            Some((ts, id)) => {
                let ts = ts.as_deref().map(Encoded);
                let params: [&(dyn ToSql + Sync); 3] = [&limit, &ts, id];
                local.client().query_raw(&st.rows.after, params).await?
            }
        };
        let mut rows = std::pin::pin!(rows);
        let mut c = Collect::new(size);
        while let Some(row) = rows.try_next().await? {
            c.take(&row);
        }
        Ok(c)
    };
    match ctx.on_local_timed("select batch", read).await {
        Ok(c) => c.finish(ctx).await,
        Err(e) if is_unreadable(&e) => read_around(ctx, key, limit, e).await,
        Err(e) => Err(e),
    }
}

/// Rows of a selection sorted into readable ones (encoded into a [`Builder`]) and
/// unreadable ones (quarantined once the selection is in: the local connection is
/// busy streaming it until then).
struct Collect {
    b: Builder,
    unreadable: Vec<Unreadable>,
    /// A row whose id could not be read: it cannot even be set aside.
    broken: Option<String>,
    seen: usize,
    last: Option<(Option<Bytes>, i64)>,
    max_id: Option<i64>,
}

impl Collect {
    fn new(size: usize) -> Collect {
        Collect {
            b: Builder::with_capacity(size),
            unreadable: Vec::new(),
            broken: None,
            seen: 0,
            last: None,
            max_id: None,
        }
    }

    fn take(&mut self, row: &Row) {
        self.seen += 1;
        let id = match row.try_get::<_, Option<i64>>(0) {
            Ok(Some(id)) => id,
            _ => {
                self.broken = self
                    .broken
                    .take()
                    .or(Some("a reading without a valid id".into()));
                return;
            }
        };
        let ts = match row.try_get::<_, Option<Raw>>(3) {
            Ok(Some(Raw(b))) => Some(Bytes::copy_from_slice(b)),
            _ => None,
        };
        self.last = Some((ts, id));
        self.max_id = self.max_id.max(Some(id));
        let missing = REQUIRED
            .iter()
            .find(|(i, _)| !matches!(row.try_get::<_, Option<Raw>>(*i), Ok(Some(_))));
        if let Some((_, name)) = missing {
            self.unreadable.push(Unreadable {
                id,
                uid: Some(uid_text(row)),
                why: format!("{name} is NULL"),
            });
            return;
        }
        if let Err(u) = self.b.push(row) {
            self.broken = self.broken.take().or(Some(u.0));
        }
    }

    async fn finish(self, ctx: &Ctx<'_>) -> Result<Selected> {
        if let Some(why) = self.broken {
            return Err(Error::new(
                Kind::Other,
                format!("local: select batch: {why}"),
            ));
        }
        for u in &self.unreadable {
            quarantine_unreadable(ctx, u).await?;
        }
        let batch = self
            .b
            .finish()
            .map_err(|u| Error::new(Kind::Other, format!("local: select batch: {}", u.0)))?;
        Ok(Selected {
            batch,
            seen: self.seen,
            last: self.last,
            max_id: self.max_id,
        })
    }
}

/// The `reading_uid` of a selected row as text (for messages).
fn uid_text(row: &Row) -> String {
    match row.try_get::<_, Option<Raw>>(1) {
        Ok(Some(Raw(b))) => batch::uuid_text(b),
        // NULL (a legacy nullable column).
        _ => None,
    }
    .unwrap_or_else(|| "unknown".into())
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
    key: Option<(Option<Bytes>, i64)>,
    limit: i64,
    err: Error,
) -> Result<Selected> {
    log::warn!("upload: {err}; reading the batch in parts to find the rows that cannot be read");
    let (local, st) = (ctx.local, ctx.st);
    let rows = match &key {
        None => {
            let params: [&(dyn ToSql + Sync); 1] = [&limit];
            let keys = local.client().query(&st.keys.first, &params);
            ctx.on_local_timed("select batch keys", keys).await?
        }
        Some((ts, id)) => {
            let ts = ts.as_deref().map(Encoded);
            let params: [&(dyn ToSql + Sync); 3] = [&limit, &ts, id];
            let keys = local.client().query(&st.keys.after, &params);
            ctx.on_local_timed("select batch keys", keys).await?
        }
    };
    let mut keys: Vec<(i64, Option<Bytes>, Option<String>)> = Vec::with_capacity(rows.len());
    for r in &rows {
        let ts: Option<Raw> = cell(r, 1, "read a reading's timestamp")?;
        keys.push((
            cell(r, 0, "read a reading's id")?,
            ts.map(|Raw(b)| Bytes::copy_from_slice(b)),
            cell(r, 2, "read a reading's uid")?,
        ));
    }
    let mut c = Collect::new(keys.len());
    let mut todo: Vec<Range<usize>> = Vec::new();
    todo.push(0..keys.len());
    while let Some(range) = todo.pop() {
        let ids: Vec<i64> = keys[range.clone()].iter().map(|k| k.0).collect();
        let params: [&(dyn ToSql + Sync); 1] = [&ids];
        let by_ids = local.client().query(&st.by_ids, &params);
        match ctx.on_local_timed("select readings by id", by_ids).await {
            Ok(rows) => {
                for row in &rows {
                    c.take(row);
                }
            }
            Err(e) if is_unreadable(&e) && range.len() == 1 => {
                let (id, _, uid) = &keys[range.start];
                c.unreadable.push(Unreadable {
                    id: *id,
                    uid: uid.clone(),
                    why: e.to_string(),
                });
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
    // `take` moved `last` to the last row read; the keyset goes on after the last key.
    c.seen = keys.len();
    c.last = keys.last().map(|(id, ts, _)| (ts.clone(), *id));
    c.max_id = keys.iter().map(|k| k.0).max();
    // Parts are consecutive in queue order and taken left to right, and each comes
    // back sorted: the readings are in queue order.
    c.finish(ctx).await
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
async fn deliver(ctx: &Ctx<'_>, seq: u64, batch: Batch) -> (Tally, Result<()>) {
    let mut t = Tally::default();
    t.statements += 1;
    let all = 0..batch.len();
    let r = match insert(ctx, &batch, all.clone()).await {
        Ok(inserted) => settle(ctx, seq, &batch, all, inserted, &mut t).await,
        Err(e) if is_row_rejection(&e) => isolate(ctx, seq, &batch, e, &mut t).await,
        Err(e) => Err(e),
    };
    (t, r)
}

/// After central committed `rows` of `batch` (number `seq` of the drain, `inserted`
/// of them new there): removes them from the local queue (deleted, or marked for
/// the resend window) and counts them.
async fn settle(
    ctx: &Ctx<'_>,
    seq: u64,
    batch: &Batch,
    rows: Range<usize>,
    inserted: u64,
    t: &mut Tally,
) -> Result<()> {
    let n = rows.len() as u64;
    if let Some(last) = rows.end.checked_sub(1) {
        let mut a = ctx.last_accepted.lock().unwrap_or_else(|e| e.into_inner());
        *a = (*a).max(Some((seq, last)));
    }
    delete(ctx, batch, rows).await?;
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
/// log16(n) round trips; a central fault costs about 55 statements (16 of them to
/// ask about the newest readings, see [`refuses_the_newest`]).
async fn isolate(
    ctx: &Ctx<'_>,
    seq: u64,
    batch: &Batch,
    first: Error,
    t: &mut Tally,
) -> Result<()> {
    let _one_at_a_time = ctx.isolating.lock().await;
    if batch.len() > 1 && ctx.central_fault.load(Ordering::SeqCst) {
        // Said once, by the batch that found it: with a full pipeline, the batches
        // behind it added two info lines each for nothing they did, every cycle
        // for as long as central's fault lasted.
        log::debug!(
            "upload: central refused a batch of {} ({first}) as well; not taken apart",
            batch.len()
        );
        return Err(Error::new(
            Kind::Db,
            format!(
                "upload: central refused a batch of {} ({first}), and another batch showed \
                 central refusing readings alike; the batch stays queued",
                batch.len()
            ),
        ));
    }
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

/// [`isolate`]'s search, one batch at a time (the caller holds `isolating`);
/// returns how many readings were refused alone.
async fn take_apart(
    ctx: &Ctx<'_>,
    seq: u64,
    batch: &Batch,
    first: Error,
    t: &mut Tally,
) -> Result<usize> {
    // The refused single readings of this batch: (position, error), ascending.
    let mut found: Vec<(usize, Error)> = Vec::new();
    // Whether this batch asked central about the newest readings already.
    let mut asked = false;
    // Refused ranges still to take apart; the leftmost on top.
    let mut todo: Vec<(Range<usize>, Error)> = Vec::new();
    if batch.len() == 1 {
        // Nothing to compare it with here: see verdict::decide.
        found.push((0, first));
    } else {
        todo.push((0..batch.len(), first));
    }
    while let Some((range, err)) = todo.pop() {
        // Taking a large batch apart can outlast the watchdog's interval.
        crate::notify::alive();
        let parts = verdict::slices(range.clone());
        log::debug!(
            "upload: central refused {} reading(s) ({err}); trying them in {} slices",
            range.len(),
            parts.len()
        );
        t.statements += parts.len() as u64;
        let results = join_all(parts.iter().map(|p| insert(ctx, batch, p.clone()))).await;
        let mut refused = Vec::new();
        let mut other: Option<Error> = None;
        for (p, res) in parts.into_iter().zip(results) {
            match res {
                Ok(inserted) => settle(ctx, seq, batch, p, inserted, t).await?,
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
            .map(|(p, e)| (*p, e.code().unwrap_or_default()))
            .collect();
        if !asked
            && !ctx.newest_taken.load(Ordering::SeqCst)
            && verdict::batch_fault(batch.len(), &codes) == verdict::Fault::Central
        {
            asked = true;
            let (run, code) =
                verdict::alike_run(&codes).unwrap_or_else(|| (found.len(), codes[0].1.to_string()));
            let last = (seq, found[found.len() - 1].0);
            if let Some(newest) = refuses_the_newest(ctx, batch, last, &code, t).await? {
                ctx.central_fault.store(true, Ordering::SeqCst);
                return Err(Error::new(
                    Kind::Db,
                    format!(
                        "upload held: central refused {} reading(s) one by one alike, {run} of \
                         them in a row, and the newest {newest} queued reading(s) alike too, so \
                         the fault is central's, not the readings': {}; nothing quarantined, the \
                         readings stay queued until central is fixed",
                        found.len(),
                        found[0].1
                    ),
                ));
            }
        }
    }
    for (p, e) in &found {
        candidate(ctx, (seq, *p), batch.ids(*p..*p + 1)[0], batch.uid(*p), e);
    }
    Ok(found.len())
}

/// A batch looks like central's fault (see [`verdict::batch_fault`]), refused alike
/// with `code` up to its reading `last` (batch number, position): sends the newest
/// [`verdict::FANOUT`] readings queued after the batch, each alone in one round
/// trip, and returns how many there were when central refused every one of them
/// alike ([`verdict::newest_refused_alike`]) and accepted no reading after `last`
/// in this drain either (a batch behind it in the pipeline may have been
/// delivered, and so be gone from the queue, before the newest are read). Those
/// it accepts are delivered (out of queue order: central keys them by uid, so a
/// batch in flight that holds one too finds it there).
///
/// Why ask at all: within one batch, poison readings left over from an earlier
/// cycle (past the cap, their good neighbours gone through) look exactly like
/// central refusing everything; held as central's fault, they would stop the queue
/// behind them in every cycle. Newer readings that central takes tell them apart.
/// Nothing queued after the batch confirms nothing: the batch is taken apart and
/// the drain's decision judges it.
async fn refuses_the_newest(
    ctx: &Ctx<'_>,
    batch: &Batch,
    last: (u64, usize),
    code: &str,
    t: &mut Tally,
) -> Result<Option<usize>> {
    let taken_after = || {
        let a = *ctx.last_accepted.lock().unwrap_or_else(|e| e.into_inner());
        a > Some(last)
    };
    if taken_after() {
        ctx.newest_taken.store(true, Ordering::SeqCst);
        return Ok(None);
    }
    let Some((ts, id)) = batch.last_key() else {
        return Ok(None);
    };
    let limit = verdict::FANOUT as i64;
    let ts = ts.as_deref().map(Encoded);
    let params: [&(dyn ToSql + Sync); 3] = [&limit, &ts, &id];
    let newest = ctx.local.client().query(&ctx.st.newest, &params);
    let rows = match ctx
        .on_local_timed("select the newest readings", newest)
        .await
    {
        Ok(rows) => rows,
        // A row the server cannot send: no confirmation from these.
        Err(e) if is_unreadable(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    // Unreadable rows are left out here; the drain quarantines them when it
    // reaches them.
    let mut c = Collect::new(rows.len());
    for row in &rows {
        c.take(row);
    }
    let newest = match (c.broken, c.b.finish()) {
        (None, Ok(b)) if !b.is_empty() => b,
        _ => return Ok(None),
    };
    log::info!(
        "upload: central refuses a run of readings alike (SQLSTATE {code}); trying the newest {} \
         queued reading(s) alone to tell central's fault from readings left over",
        newest.len()
    );
    let singles: Vec<Range<usize>> = (0..newest.len()).map(|i| i..i + 1).collect();
    t.statements += singles.len() as u64;
    let results = join_all(singles.iter().map(|r| insert(ctx, &newest, r.clone()))).await;
    let mut answers: Vec<Option<String>> = Vec::with_capacity(singles.len());
    for (r, res) in singles.into_iter().zip(results) {
        match res {
            // After every batch of this drain in queue order.
            Ok(inserted) => {
                settle(ctx, u64::MAX, &newest, r, inserted, t).await?;
                answers.push(None);
            }
            Err(e) if is_row_rejection(&e) => answers.push(e.code().map(str::to_string)),
            Err(e) => return Err(e),
        }
    }
    let answers: Vec<Option<&str>> = answers.iter().map(|a| a.as_deref()).collect();
    // Settled before it is deleted locally: a reading the selection above missed
    // because it was just delivered shows here.
    let taken = answers.iter().any(Option::is_none) || taken_after();
    if taken {
        ctx.newest_taken.store(true, Ordering::SeqCst);
    } else if verdict::newest_refused_alike(code, &answers) {
        return Ok(Some(answers.len()));
    }
    Ok(None)
}

/// Notes a refused single reading for the drain's decision.
fn candidate(ctx: &Ctx<'_>, order: (u64, usize), id: i64, uid: String, why: &Error) {
    let mut c = ctx.candidates.lock().unwrap_or_else(|e| e.into_inner());
    c.push(Candidate {
        order,
        id,
        uid,
        code: why.code().unwrap_or_default().to_string(),
        message: why.to_string(),
    });
}

/// Decides on the refused readings collected so far ([`verdict::decide`]) and
/// quarantines those it says, oldest first, once central has refused each of them
/// again ([`ask_again`]); what it takes then is delivered and counted in `t`.
/// Fails with the reason when the rest must stay queued (no evidence against
/// them, or the cap).
async fn quarantine_candidates(ctx: &Ctx<'_>, t: &mut Tally) -> Result<()> {
    let accepted = t.delivered;
    let mut cands = std::mem::take(&mut *ctx.candidates.lock().unwrap_or_else(|e| e.into_inner()));
    cands.sort_by_key(|c| c.order);
    let codes: Vec<&str> = cands.iter().map(|c| c.code.as_str()).collect();
    let last = *ctx.last_accepted.lock().unwrap_or_else(|e| e.into_inner());
    let after = cands
        .iter()
        .rev()
        .take_while(|c| Some(c.order) > last)
        .count();
    let decision = verdict::decide(
        &codes,
        after,
        accepted,
        ctx.quarantined.load(Ordering::SeqCst),
    );
    for (c, message) in ask_again(ctx, &cands[..decision.quarantine], t).await? {
        if claim_quarantine(ctx) {
            quarantine(ctx, c.id, &c.uid, &message).await?;
        }
    }
    let held_local = ctx.held_local.swap(0, Ordering::SeqCst);
    let hold = match (decision.hold, held_local) {
        // Central's message for the first of those that stay queued.
        (Some(h), _) => Some(match cands.get(decision.quarantine).or(cands.first()) {
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

/// Sends each of `cands` alone once more, all in one round trip, before they are
/// quarantined: a refusal that was central's for a moment (a maintenance trigger
/// switched off while a batch was taken apart, a referenced table reloaded) is
/// delivered now, where it waited for `requeue` before (the readings refused just
/// before the window closed were quarantined, the rest of the batch delivered).
/// Returns those refused again, with central's message. Costs a statement per
/// reading about to be quarantined, at most the cap per cycle.
async fn ask_again<'c>(
    ctx: &Ctx<'_>,
    cands: &'c [Candidate],
    t: &mut Tally,
) -> Result<Vec<(&'c Candidate, String)>> {
    if cands.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = cands.iter().map(|c| c.id).collect();
    let rows = ctx
        .local
        .timed(
            "select refused readings again",
            ctx.local.client().query(&ctx.st.by_ids, &[&ids]),
        )
        .await?;
    let mut c = Collect::new(rows.len());
    for row in &rows {
        c.take(row);
    }
    let batch = c.finish(ctx).await?.batch;
    let read = batch.ids(0..batch.len());
    let at: Vec<usize> = cands
        .iter()
        .map(|c| read.iter().position(|&id| id == c.id).unwrap_or(usize::MAX))
        .collect();
    let sent: Vec<usize> = at.iter().copied().filter(|&p| p != usize::MAX).collect();
    t.statements += sent.len() as u64;
    let results = join_all(sent.iter().map(|&p| insert(ctx, &batch, p..p + 1))).await;
    let mut answers: std::collections::HashMap<usize, Result<u64>> =
        sent.into_iter().zip(results).collect();
    let mut again = Vec::new();
    for (cand, p) in cands.iter().zip(at) {
        // Gone from the queue meanwhile (or no longer readable, quarantined by
        // finish above): nothing to decide.
        let Some(answer) = answers.remove(&p) else {
            continue;
        };
        match answer {
            Ok(inserted) => {
                delete(ctx, &batch, p..p + 1).await?;
                t.delivered += 1;
                t.already += 1 - inserted.min(1);
                log::info!(
                    "upload: central took reading id {} (reading_uid {}) when asked again; \
                     not quarantined",
                    cand.id,
                    cand.uid
                );
            }
            Err(e) if is_row_rejection(&e) => again.push((cand, e.to_string())),
            Err(e) => return Err(e),
        }
    }
    Ok(again)
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
/// fails with is what the caller sees (a rejected reading is isolated as before).
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

/// `UPLOAD_METHOD=auto` takes COPY unless central answers through a connection
/// pooler: PgBouncer before 1.21 returns the server connection to its pool at the
/// first ReadyForQuery after a COPY ends, while the batches pipelined behind it are
/// still on their way (they then meet another client's session, or time out).
/// INSERTs pipeline through any pooler. Said once per process, at info.
fn use_copy(method: UploadMethod, central: &Db) -> bool {
    match method {
        UploadMethod::Copy => true,
        UploadMethod::Insert => false,
        UploadMethod::Auto if !central.behind_pooler() => true,
        UploadMethod::Auto => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                log::info!(
                    "upload: central answers through a connection pooler; batches go as \
                     pipelined INSERTs, not COPY (UPLOAD_METHOD=auto)"
                )
            });
            false
        }
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

/// `rows` of `batch` as binary `COPY … FROM STDIN` in one transaction, sent with
/// its data in one go so that it pipelines behind the batches before it
/// (vendor/README.md); as several COPYs of [`copy_parts`], each with its share of
/// the statement timeout ([`Db::in_transaction_of`]).
async fn copy(ctx: &Ctx<'_>, batch: &Batch, rows: Range<usize>) -> Result<u64> {
    let what = format!("copy batch of {}", rows.len());
    let parts = copy_parts(rows);
    let answered = AtomicBool::new(false);
    central_call(ctx, &what, parts.len() as u32, &answered, || {
        let data = parts.iter().map(|r| batch.copy_data(r.clone())).collect();
        ctx.central.in_transaction_of(
            parts.len() as u32,
            noting(
                &answered,
                ctx.central.client().copy_in_all(&ctx.st.copy, data),
            ),
        )
    })
    .await
}

/// `statement`, noting in `answered` when its answer has come back (see
/// [`central_call`]). Sends on its first poll as `statement` does.
async fn noting<T>(answered: &AtomicBool, statement: impl Future<Output = T>) -> T {
    let r = statement.await;
    answered.store(true, Ordering::SeqCst);
    r
}

/// At most this many rows per COPY statement for a batch of [`CHUNKED_FROM`] to
/// [`CHUNKED_UP_TO`] rows.
const COPY_PART_MAX: usize = 400;
/// Smaller batches go as one COPY: two statements would cost more than they save.
const CHUNKED_FROM: usize = 600;
/// Larger batches go as one COPY too.
const CHUNKED_UP_TO: usize = 1400;

/// How the rows of one batch are split into COPY statements of its transaction:
/// into equal parts of at most [`COPY_PART_MAX`] rows for a batch of
/// [`CHUNKED_FROM`]–[`CHUNKED_UP_TO`] rows (three of 333–334 for 1000), else one.
///
/// Why split at all: PostgreSQL up to 16 buffers up to 1000 rows of a COPY, each in a
/// slot that pins the table's row type in the statement's resource owner, and with
/// every entry the same, each pin and unpin searches through the ones before it:
/// the cost grows with the square of the rows one COPY buffers, about 1.3 ms for a
/// COPY of 1000 rows on PostgreSQL 15, against about 0.2 ms for a COPY statement
/// itself (docs/upload.md, "Why a batch of 1000 is three COPYs"). Below
/// [`CHUNKED_FROM`] rows the square is too small to pay for a statement more; a COPY
/// of more than 1000 rows reuses its 1000 slots, so past [`CHUNKED_UP_TO`] the
/// statements parts add cost more than they save.
fn copy_parts(rows: Range<usize>) -> Vec<Range<usize>> {
    let n = rows.len();
    if !(CHUNKED_FROM..=CHUNKED_UP_TO).contains(&n) {
        return vec![rows];
    }
    let parts = n.div_ceil(COPY_PART_MAX);
    // The first n % parts parts take one row more.
    let (size, longer) = (n / parts, n % parts);
    let mut start = rows.start;
    (0..parts)
        .map(|i| {
            let end = start + size + usize::from(i < longer);
            let part = start..end;
            start = end;
            part
        })
        .collect()
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
    let answered = AtomicBool::new(false);
    central_call(ctx, &what, 1, &answered, || {
        ctx.central.in_transaction(noting(
            &answered,
            ctx.central.client().execute_typed(INSERT, &params),
        ))
    })
    .await
}

/// One central round trip of a transaction of `statements` statements, timed from
/// when it reaches the head of the pipeline (see [`Pipeline`]), retried like
/// [`Db::retrying`] when transient, except after a failure that may be about the
/// batch's size: that one is retried smaller by the drain, not unchanged here.
///
/// A cancel (57014) that comes back sooner after the round trip was sent than a
/// statement of it may run ([`Db::statement_timeout_of`]) cannot be central's
/// `statement_timeout`, whatever the server's language says: someone cancelled it
/// ([`Error::cancelled_by_someone`]), and it is retried as it is. Taken for a
/// timeout, an operator's `pg_cancel_backend` halved the batches ("failed because
/// of its size") for a batch central had not found too large at all.
///
/// Likewise a round trip that timed out after its statement was answered (`op`
/// sets `answered` then, see [`noting`]) waited only for the COMMIT
/// ([`Error::commit_unanswered`]): a synchronous standby that does not confirm.
/// Taken for a batch too large, it halved the batches cycle after cycle down to
/// one reading while the standby was away, each cycle with the wrong reason.
async fn central_call<T, F, Fut>(
    ctx: &Ctx<'_>,
    what: &str,
    statements: u32,
    answered: &AtomicBool,
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    let db = ctx.central;
    let mut n = 0;
    loop {
        answered.store(false, Ordering::SeqCst);
        let fut = op();
        let sent = Instant::now();
        let r = ctx
            .pipe
            .timed(
                db.timeout(),
                async { fut.await.map_err(|e| Error::db(db.side(), what, e)) },
                || Error::timeout(db.side(), what, db.timeout()),
            )
            .await
            .map_err(|e| {
                let e = if answered.load(Ordering::SeqCst) {
                    e.commit_unanswered()
                } else {
                    e
                };
                if sent.elapsed() < db.statement_timeout_of(statements) {
                    e.cancelled_by_someone()
                } else {
                    e
                }
            });
        match r {
            Err(e)
                if e.is_worth_retrying_now()
                    && !is_size_failure(&e)
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

/// Deletes exactly `rows` locally, or marks them uploaded when there is a resend
/// window: one statement, so one local transaction.
async fn delete(ctx: &Ctx<'_>, batch: &Batch, rows: Range<usize>) -> Result<()> {
    let ids: &[i64] = batch.ids(rows.clone());
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
    let n = ctx
        .on_local(
            &what,
            run(ctx.local, ctx.retries, &what, || {
                ctx.local.client().execute(st, &params)
            }),
        )
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
    let what = "quarantine a rejected reading";
    ctx.on_local(
        what,
        run(ctx.local, ctx.retries, what, || {
            ctx.local.client().execute(&ctx.st.quarantine, &params)
        }),
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
                    // Through meter_readings_quarantined_idx, past the retained readings.
                    &format!("UPDATE meter_readings SET sync_error = NULL WHERE {QUARANTINED}"),
                    &[],
                )
                .await?
        }
        Some(ids) => {
            // `requeue 7 7` releases one reading, and is no warning.
            let mut ids = ids.to_vec();
            ids.sort_unstable();
            ids.dedup();
            let n = local
                .execute(
                    "requeue quarantined readings",
                    "UPDATE meter_readings SET sync_error = NULL \
                     WHERE sync_error IS NOT NULL AND id = ANY($1::int8[])",
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

/// Fails the phase, readings queued, when central's `meter_readings` lacks the unique
/// key on (`reading_uid`, `timestamp`). COPY never needs it, so without this a table
/// an operator created by hand without it would take every resent batch (after a
/// crash between central's commit and the local delete, or `resend`) a second time,
/// silently; the fallback's `ON CONFLICT` needs exactly that key. Once per connection.
async fn check_central_key(central: &Db) -> Result<()> {
    if central.upload_table_checked() {
        return Ok(());
    }
    let row = central
        .query_one(
            "check central's unique key",
            "SELECT EXISTS (
                 SELECT 1 FROM pg_index i
                 WHERE i.indrelid = 'meter_readings'::regclass
                   AND i.indisunique AND i.indpred IS NULL AND i.indnkeyatts = 2
                   AND ARRAY(SELECT a.attname::text
                             FROM pg_attribute a
                             WHERE a.attrelid = i.indrelid
                               AND a.attnum = ANY ((i.indkey::int2[])[0:1])
                             ORDER BY 1) = ARRAY['reading_uid', 'timestamp'])",
            &[],
        )
        .await?;
    if !cell::<bool>(&row, 0, "check central's unique key")? {
        return Err(Error::new(
            Kind::Other,
            "central: meter_readings has no unique key on (reading_uid, \"timestamp\"); \
             uploads wait, since without it a reading sent twice would be stored twice \
             (docs/central.md)",
        ));
    }
    central.mark_upload_table_checked();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_parts_cover_the_rows_in_order_and_split_only_mid_sized_batches() {
        for (rows, want) in [
            (0..100, vec![(0, 100)]),
            (0..400, vec![(0, 400)]),
            (0..599, vec![(0, 599)]),
            (0..600, vec![(0, 300), (300, 600)]),
            (0..1000, vec![(0, 334), (334, 667), (667, 1000)]),
            (10..1210, vec![(10, 410), (410, 810), (810, 1210)]),
            (
                0..1400,
                vec![(0, 350), (350, 700), (700, 1050), (1050, 1400)],
            ),
            (0..1401, vec![(0, 1401)]),
            (0..5000, vec![(0, 5000)]),
        ] {
            let got: Vec<(usize, usize)> = copy_parts(rows.clone())
                .iter()
                .map(|r| (r.start, r.end))
                .collect();
            assert_eq!(got, want, "{rows:?}");
        }
    }
}
