//! Which column a schema drift is about. When central's table, the types the
//! download casts to and the local table disagree (a central or a gateway whose
//! tables predate the migrations, a column altered by hand), the table's download
//! fails and its local table stays as it was; the server's own words rarely say
//! where (`cannot cast type bytea to jsonb`, `operator does not exist: text =
//! jsonb`, `value too long for type character varying(255)`). These run only
//! after such a failure and turn it into one line naming the table and the
//! column (and, for a value that does not fit, the row), keeping the SQLSTATE and
//! the server's message.

use std::time::Duration;

use tokio_postgres::Transaction;

use super::table::Table;
use crate::config::Side;
use crate::db::{timed, Db};
use crate::error::Error;

/// SQLSTATE class 42 (syntax error or access rule violation) covers what a
/// mismatched schema raises at planning: an undefined column (42703), a cast
/// that does not exist (42846), an operator that does not exist (42883). Not a
/// missing table (42P01: the error names it) nor a missing privilege (42501).
fn is_schema_error(e: &Error) -> bool {
    e.code()
        .is_some_and(|c| c.starts_with("42") && c != "42P01" && c != "42501")
}

/// SQLSTATE 22001: a value too long for a local `varchar(n)` column.
const TOO_LONG: &str = "22001";

/// Every column the download copies, key first, with the type it is staged as.
fn downloaded(t: &Table) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
    std::iter::once((t.key, "text")).chain(t.columns.iter().copied())
}

/// Each column of `table`: (name, type as written, the longest text it takes
/// for `varchar(n)` and `char(n)`).
fn columns_sql(table: &str) -> String {
    format!(
        "SELECT attname::text, format_type(atttypid, atttypmod), \
                CASE WHEN atttypid IN (1042, 1043) AND atttypmod > 4 THEN atttypmod - 4 END \
         FROM pg_attribute \
         WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped"
    )
}

type Columns = Vec<(String, String, Option<i32>)>;

/// The rows of [`columns_sql`].
fn columns(rows: &[tokio_postgres::Row]) -> Columns {
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn find<'a>(cols: &'a Columns, name: &str) -> Option<&'a (String, String, Option<i32>)> {
    cols.iter().find(|c| c.0 == name)
}

fn left_as_it_was(e: Error, about: Option<String>) -> Error {
    match about {
        Some(a) => e.with_context(format!("{a}; the local table is left as it was")),
        None => e,
    }
}

/// Central's probe failed with `e`: if it is a schema error, names the column
/// of central's table that is missing or cannot be read as the download's
/// type. One catalog query, then one `SELECT column::type … LIMIT 0` (planned,
/// never run over the rows) per column of a type the download does not take
/// as it is.
pub async fn central(t: &Table, central: &Db, e: Error) -> Error {
    if !is_schema_error(&e) {
        return e;
    }
    let about = central_column(t, central).await;
    left_as_it_was(e, about)
}

async fn central_column(t: &Table, central: &Db) -> Option<String> {
    let what = format!("describe {}", t.table);
    let rows = central
        .query(&what, &columns_sql(t.table), &[])
        .await
        .ok()?;
    let cols = columns(&rows);
    for (c, ty) in downloaded(t) {
        let Some((_, have, _)) = find(&cols, c) else {
            return Some(format!("{}.{c} does not exist on central", t.table));
        };
        // Everything can be read as text.
        if ty == "text" || have == ty {
            continue;
        }
        let sql = format!("SELECT {c}::{ty} FROM {} LIMIT 0", t.table);
        match central.query(&what, &sql, &[]).await {
            Err(e) if is_schema_error(&e) => {
                return Some(format!(
                    "{}.{c} is {have} on central, which the download cannot read as {ty}",
                    t.table
                ))
            }
            Err(_) => return None,
            Ok(_) => {}
        }
    }
    None
}

/// The local apply failed with `e`, in `tx` (rolled back to before the apply:
/// the staged rows are still there): if it is a schema error or a value too
/// long, names the local column that is missing, cannot take the download's
/// type, or is too short for a staged value, and then the row. Each check runs
/// in a savepoint of its own.
pub async fn local(t: &Table, tx: &mut Transaction<'_>, limit: Duration, e: Error) -> Error {
    if !is_schema_error(&e) && e.code() != Some(TOO_LONG) {
        return e;
    }
    let about = local_column(t, tx, limit).await;
    left_as_it_was(e, about)
}

/// Runs `sql` in a savepoint of `tx`: its rows, or its error.
async fn checked(
    tx: &mut Transaction<'_>,
    limit: Duration,
    what: &str,
    sql: &str,
) -> Result<Vec<tokio_postgres::Row>, Error> {
    let l = Side::Local;
    let sp = timed(l, limit, what, tx.savepoint("drift")).await?;
    let rows = timed(l, limit, what, sp.query(sql, &[])).await?;
    timed(l, limit, what, sp.commit()).await?;
    Ok(rows)
}

async fn local_column(t: &Table, tx: &mut Transaction<'_>, limit: Duration) -> Option<String> {
    let what = format!("describe {}", t.table);
    let rows = checked(tx, limit, &what, &columns_sql(t.table))
        .await
        .ok()?;
    let cols = columns(&rows);
    let (table, key, stg) = (t.table, t.key, t.staging());
    let wanted = downloaded(t).chain(std::iter::once(("synced_at", "timestamptz")));
    for (c, ty) in wanted {
        let Some((_, have, max_chars)) = find(&cols, c) else {
            return Some(format!("{table}.{c} does not exist locally"));
        };
        if c != "synced_at" {
            let sql =
                format!("SELECT l.{c} IS DISTINCT FROM s.{c} FROM {table} l, {stg} s LIMIT 0");
            match checked(tx, limit, &what, &sql).await {
                Err(e) if is_schema_error(&e) => {
                    return Some(format!(
                        "{table}.{c} is {have} locally, which cannot take the {ty} \
                         the download brings"
                    ));
                }
                Err(_) => return None,
                Ok(_) => {}
            }
        }
        if let Some(n) = max_chars {
            let sql = format!(
                "SELECT s.{key}::text, char_length(s.{c}::text) FROM {stg} s \
                 WHERE char_length(s.{c}::text) > {n} ORDER BY 1 LIMIT 1"
            );
            match checked(tx, limit, &what, &sql).await {
                Ok(rows) => {
                    if let Some(r) = rows.first() {
                        let (id, len): (String, i32) = (r.get(0), r.get(1));
                        return Some(format!(
                            "{table}.{c} is {have} locally, too short for {} {id}: its {c} \
                             from central has {len} characters",
                            t.noun
                        ));
                    }
                }
                Err(_) => return None,
            }
        }
    }
    None
}
