//! Download: bring the local `meters` and `tenant` tables in line with central,
//! logging what is new and which fields changed.
//!
//! Each table is one pass, without a round trip per row and without holding the
//! table in the daemon's memory:
//!
//! 1. central `COPY (SELECT …) TO STDOUT (FORMAT binary)` is piped, chunk by chunk,
//!    into local `COPY tmp_… FROM STDIN` inside one local transaction;
//! 2. one statement then compares the staged rows with the local table column by
//!    column (`IS DISTINCT FROM`, so jsonb compares by value), inserts the new rows,
//!    updates only the rows that differ, and returns what it did;
//! 3. commit. A failure anywhere rolls the whole table back.
//!
//! Rows that exist locally but no longer centrally are kept (the collector may
//! still write readings for them) and reported as a warning.

use std::pin::pin;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::{CopyOutStream, Transaction};

use crate::config::Side;
use crate::db::{timed, Db};
use crate::error::{Error, Result};
use crate::lock::LockedLocal;
use crate::report::PhaseResult;

/// At most this many "new …" / "… updated" lines per table and cycle; the rest are
/// summarised in one line, so that the first sync of a large fleet does not flood
/// syslog.
pub const MAX_DETAIL_LINES: usize = 1000;

/// At most this many ids are named in the warning about rows missing centrally.
pub const MAX_MISSING_IDS: usize = 20;

/// One downloaded table: its key and the columns compared and copied (the key
/// excluded), each with the type it is staged as. Central values are cast to these
/// types so that the binary COPY format matches whatever central declared
/// (`text` and `varchar` alike).
struct Table {
    table: &'static str,
    key: &'static str,
    /// "meter", "tenant": for log lines about one row.
    noun: &'static str,
    /// "meters", "tenants": for log lines about the table.
    plural: &'static str,
    columns: &'static [(&'static str, &'static str)],
}

const METERS: Table = Table {
    table: "meters",
    key: "meter_id",
    noun: "meter",
    plural: "meters",
    columns: &[
        ("name", "text"),
        ("location_id", "text"),
        ("meter_type", "text"),
        ("unit", "text"),
        ("configuration", "jsonb"),
        ("updated_at", "timestamptz"),
    ],
};

const TENANTS: Table = Table {
    table: "tenant",
    key: "tenant_id",
    noun: "tenant",
    plural: "tenants",
    columns: &[
        ("name", "text"),
        ("configuration", "jsonb"),
        ("metadata", "jsonb"),
        ("updated_at", "timestamptz"),
    ],
};

/// Downloads central `meters` into local `meters` (P8).
pub async fn sync_meters(local: &mut LockedLocal, central: &mut Db) -> Result<PhaseResult> {
    sync(&METERS, local, central).await
}

/// Downloads central `tenant` into local `tenant` (P9).
pub async fn sync_tenants(local: &mut LockedLocal, central: &mut Db) -> Result<PhaseResult> {
    sync(&TENANTS, local, central).await
}

impl Table {
    fn staging(&self) -> String {
        format!("tmp_{}", self.table)
    }

    fn all_columns(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(self.key).chain(self.columns.iter().map(|c| c.0))
    }

    fn column_list(&self, prefix: &str) -> String {
        self.all_columns()
            .map(|c| format!("{prefix}{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Central's rows, cast to the staging types.
    fn copy_out_sql(&self) -> String {
        let cols = std::iter::once(format!("{}::text", self.key))
            .chain(self.columns.iter().map(|(c, t)| format!("{c}::{t}")))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "COPY (SELECT {cols} FROM {}) TO STDOUT (FORMAT binary)",
            self.table
        )
    }

    /// The staging table lives as long as the connection and is emptied at every
    /// commit: creating and dropping it every cycle would write a dozen catalog rows
    /// (and their WAL) to the gateway's flash each minute for nothing. Its rows are
    /// never WAL-logged. The primary key turns a duplicate id on central (a table
    /// without its key) into a clear error rather than an arbitrary pick.
    fn create_staging_sql(&self) -> String {
        let cols = std::iter::once(format!("{} text PRIMARY KEY", self.key))
            .chain(self.columns.iter().map(|(c, t)| format!("{c} {t}")))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({cols}) ON COMMIT DELETE ROWS",
            self.staging()
        )
    }

    fn copy_in_sql(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            self.staging(),
            self.column_list("")
        )
    }

    /// Compares, writes, and reports in one statement. `diff` is computed from the
    /// local table as it was before this statement (all CTEs share one snapshot),
    /// so the changed-field list describes old against new. Unchanged rows are not
    /// touched at all: no dead tuples, no WAL. Returns one row per new, updated and
    /// locally-only id: (kind, id, name, changed fields).
    fn apply_sql(&self) -> String {
        let (table, key, stg) = (self.table, self.key, self.staging());
        let changed = self
            .columns
            .iter()
            .map(|(c, _)| format!("CASE WHEN l.{c} IS DISTINCT FROM s.{c} THEN '{c}' END"))
            .collect::<Vec<_>>()
            .join(", ");
        let set = self
            .columns
            .iter()
            .map(|(c, _)| format!("{c} = s.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cols = self.column_list("");
        let s_cols = self.column_list("s.");
        format!(
            "WITH diff AS (
                 SELECT s.{key} AS id, s.name, l.{key} IS NULL AS is_new,
                        array_remove(ARRAY[{changed}]::text[], NULL) AS changed
                 FROM {stg} s LEFT JOIN {table} l ON l.{key} = s.{key}
             ), ins AS (
                 INSERT INTO {table} ({cols}, synced_at)
                 SELECT {s_cols}, now() FROM {stg} s JOIN diff d ON d.id = s.{key}
                 WHERE d.is_new
             ), upd AS (
                 UPDATE {table} l SET {set}, synced_at = now()
                 FROM {stg} s JOIN diff d ON d.id = s.{key}
                 WHERE l.{key} = s.{key} AND NOT d.is_new AND cardinality(d.changed) > 0
             )
             SELECT 'new' AS kind, id, name, changed FROM diff WHERE is_new
             UNION ALL
             SELECT 'updated', id, name, changed FROM diff
             WHERE NOT is_new AND cardinality(changed) > 0
             UNION ALL
             SELECT 'gone', l.{key}::text, l.name::text, NULL FROM {table} l
             WHERE NOT EXISTS (SELECT 1 FROM {stg} s WHERE s.{key} = l.{key})
             ORDER BY 1, 2"
        )
    }
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

    fn log(&self, t: &Table, unchanged: u64) {
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
            log::warn!(
                "{} {} no longer in central, kept locally (the collector may still use them): {}{tail}",
                self.gone,
                t.plural,
                self.gone_ids.join(", ")
            );
        }
        if self.new == 0 && self.updated == 0 {
            log::info!("{} up to date ({unchanged} unchanged)", t.plural);
        }
    }
}

async fn sync(t: &Table, local: &mut LockedLocal, central: &mut Db) -> Result<PhaseResult> {
    let start = Instant::now();
    let limit = local.timeout();

    // Central first: a missing or unreadable central table fails here, before any
    // local transaction is opened.
    let copy_out_sql = t.copy_out_sql();
    let what = format!("read {}", t.table);
    let stream = central
        .timed(&what, central.client().copy_out(copy_out_sql.as_str()))
        .await?;

    let tx = timed(
        Side::Local,
        limit,
        "begin",
        local.client_mut().transaction(),
    )
    .await?;
    let staged = stage(t, &tx, limit, stream, central.timeout()).await?;
    let staging = start.elapsed();
    crate::notify::alive();
    let report = apply(t, &tx, limit).await?;
    timed(
        Side::Local,
        limit,
        &format!("commit {}", t.table),
        tx.commit(),
    )
    .await?;

    // Logged only after the commit: a line must never claim a write that rolled back.
    let unchanged = staged - report.new - report.updated;
    report.log(t, unchanged);
    log::debug!(
        "{}: staged {staged} rows from central in {} ms, compared and applied in {} ms",
        t.table,
        staging.as_millis(),
        (start.elapsed() - staging).as_millis()
    );
    Ok(PhaseResult {
        records: report.new + report.updated,
        summary: format!(
            "{} new, {} updated, {unchanged} unchanged",
            report.new, report.updated
        ),
    })
}

/// Pipes central's COPY stream into the staging table; returns the rows staged.
///
/// Nothing is buffered beyond one chunk: each is handed on before the next is
/// read, and both directions are bounded channels in tokio-postgres, so a slow side
/// throttles the other. Each wait on either side is bounded by that side's
/// `DB_QUERY_TIMEOUT_MS`, so a link that goes silent mid-stream fails the table
/// instead of hanging the cycle.
async fn stage(
    t: &Table,
    tx: &Transaction<'_>,
    limit: Duration,
    stream: CopyOutStream,
    central_limit: Duration,
) -> Result<u64> {
    let (l, c) = (Side::Local, Side::Central);
    let what_in = format!("read {}", t.table);
    let what_out = format!("stage {}", t.table);
    // A row lock held by someone else (the collector) should fail this table
    // cleanly (SQLSTATE 55P03, retried next cycle) before the round-trip timeout
    // would declare the connection dead. The notice that the staging table already
    // exists is noise.
    let setup = format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL client_min_messages = warning; {}",
        (limit / 2).max(Duration::from_millis(100)).as_millis(),
        t.create_staging_sql()
    );
    timed(l, limit, &what_out, tx.batch_execute(&setup)).await?;
    let copy_in_sql = t.copy_in_sql();
    let sink = timed(l, limit, &what_out, tx.copy_in(copy_in_sql.as_str())).await?;
    let mut sink = pin!(sink);
    let mut stream = pin!(stream);
    loop {
        let chunk = match tokio::time::timeout(central_limit, stream.next()).await {
            Err(_) => return Err(Error::timeout(c, what_in, central_limit)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Error::db(c, what_in, e)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        // `feed`, not `send`: the sink coalesces rows into 4 KiB messages instead
        // of flushing the socket once per row.
        timed(l, limit, &what_out, sink.feed(chunk)).await?;
    }
    timed(l, limit, &what_out, sink.as_mut().finish()).await
}

/// Runs the compare-and-write statement and collects its report, streaming the
/// returned rows so that a first sync of a large table is not held in memory.
async fn apply(t: &Table, tx: &Transaction<'_>, limit: Duration) -> Result<Report> {
    let l = Side::Local;
    let what = format!("apply {}", t.table);
    let sql = t.apply_sql();
    let no_params = std::iter::empty::<&(dyn ToSql + Sync)>();
    let rows = timed(l, limit, &what, tx.query_raw(sql.as_str(), no_params)).await?;
    let mut rows = pin!(rows);
    let mut report = Report::default();
    loop {
        let row = match tokio::time::timeout(limit, rows.next()).await {
            Err(_) => return Err(Error::timeout(l, what, limit)),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Error::db(l, what, e)),
            Ok(Some(Ok(row))) => row,
        };
        let kind: &str = row.get(0);
        let changed: Option<Vec<String>> = row.get(3);
        report.add(t, kind, row.get(1), row.get(2), changed.unwrap_or_default());
    }
    Ok(report)
}
