//! The two downloaded tables and the SQL built from their column lists.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

/// One downloaded table: its key and the columns compared and copied (the key
/// excluded), each with the type it is staged as. Central values are cast to these
/// types so that the binary COPY format matches whatever central declared
/// (`text` and `varchar` alike).
pub struct Table {
    pub table: &'static str,
    pub key: &'static str,
    /// "meter", "tenant": for log lines about one row.
    pub noun: &'static str,
    /// "meters", "tenants": for log lines about the table.
    pub plural: &'static str,
    pub columns: &'static [(&'static str, &'static str)],
    /// When this process last reconciled the table in full (None: not yet, so the
    /// first download of every process is a full one). Monotonic: the next one is
    /// due `DOWNLOAD_FULL_EVERY_SECONDS` later whatever the gateway's wall clock does
    /// (see `plan` in download.rs).
    pub reconciled_at: Mutex<Option<Instant>>,
    /// Set once the "central has no change tracking" warning was logged.
    pub warned_untracked: AtomicBool,
    /// Central lacks the snapshot functions (before PostgreSQL 13).
    pub pre_13: AtomicBool,
    /// The local table's digest minus central's, as this process's last full
    /// reconciliation left them (see [`Table::offset_digest_sql`]); None before it.
    pub offset: Mutex<Option<Digest>>,
    /// Where this process's last idle probe moved the watermark (see
    /// [`super::watermark::Advanced`]); kept in memory only.
    pub advanced: Mutex<Option<super::watermark::Advanced>>,
}

/// A value of [`Table::digest_sql`] with its row count. Digests are sums, so the
/// digest of a set of rows minus that of a subset is the digest of the rest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub rows: u64,
    left: i128,
    right: i128,
}

impl Digest {
    /// `rows` and `sums` as the digest statements return them (`left:right`).
    pub fn parse(rows: Option<&str>, sums: Option<&str>) -> Option<Digest> {
        let (l, r) = sums?.split_once(':')?;
        Some(Digest {
            rows: rows?.parse().ok()?,
            left: l.parse().ok()?,
            right: r.parse().ok()?,
        })
    }

    /// This digest without the rows of `part`; None if `part` holds more rows.
    pub fn without(self, part: Digest) -> Option<Digest> {
        Some(Digest {
            rows: self.rows.checked_sub(part.rows)?,
            left: self.left - part.left,
            right: self.right - part.right,
        })
    }
}

pub static METERS: Table = Table {
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
    reconciled_at: Mutex::new(None),
    warned_untracked: AtomicBool::new(false),
    pre_13: AtomicBool::new(false),
    offset: Mutex::new(None),
    advanced: Mutex::new(None),
};

pub static TENANTS: Table = Table {
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
    reconciled_at: Mutex::new(None),
    warned_untracked: AtomicBool::new(false),
    pre_13: AtomicBool::new(false),
    offset: Mutex::new(None),
    advanced: Mutex::new(None),
};

/// Which central rows one download asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Every row (a full reconciliation).
    All,
    /// Rows whose `change_xid` is at or past this watermark.
    ChangedSince(u64),
}

impl Rows {
    /// The WHERE clause on central. The watermark is a number we parsed, so
    /// inlining it cannot inject anything; a literal keeps the COPY a single
    /// unparameterised statement.
    fn filter(self) -> String {
        match self {
            Rows::All => String::new(),
            Rows::ChangedSince(wm) => format!(" WHERE change_xid >= '{wm}'::xid8"),
        }
    }
}

impl Table {
    /// Always schema-qualified: a permanent table that happens to carry the same
    /// name can never be written instead.
    pub fn staging(&self) -> String {
        format!("pg_temp.tmp_{}", self.table)
    }

    fn all_columns(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(self.key).chain(self.columns.iter().map(|c| c.0))
    }

    /// `f` of each compared column (the key not included), comma-separated.
    fn each_column(&self, f: impl Fn(&str) -> String) -> String {
        let parts: Vec<String> = self.columns.iter().map(|(c, _)| f(c)).collect();
        parts.join(", ")
    }

    fn column_list(&self, prefix: &str) -> String {
        self.all_columns()
            .map(|c| format!("{prefix}{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The downloaded columns cast to the staging types, as central selects them.
    fn central_columns(&self) -> String {
        std::iter::once(format!("{}::text", self.key))
            .chain(self.columns.iter().map(|(c, t)| format!("{c}::{t}")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One statement on central that says what a download of `rows` would bring
    /// and where the next one resumes: the snapshot's xmin (the next watermark),
    /// which database this is, how many rows, their size (the text
    /// form of the downloaded columns: close to what the binary COPY carries) and
    /// the largest row; whether row-level security filters what this role sees,
    /// and whether central has the `change_xid` column. With `tracked` false (a central without migration 0002)
    /// the snapshot functions are not used at all, so any server version answers.
    ///
    /// With `digest`, a ninth column: [`Table::digest_sql`] of the same rows, in
    /// the same snapshot (a restart is verified in the round trip the probe costs
    /// anyway, and a mismatch goes on to the full copy in that very snapshot).
    pub fn probe_sql(&self, rows: Rows, tracked: bool, digest: bool) -> String {
        let snapshot = if tracked {
            "pg_snapshot_xmin(pg_current_snapshot())::text"
        } else {
            "NULL::text"
        };
        // Each row's text is rendered once, for its size and the digest alike.
        let size = "octet_length(row_text.r)";
        let (digest, join) = if digest {
            (format!(", {}", self.digest_sql()), self.digest_join())
        } else {
            (String::new(), self.row_text_join())
        };
        format!(
            "SELECT {snapshot}, current_database()::text, count(*), \
                    coalesce(sum({size}), 0)::bigint, coalesce(max({size}), 0)::bigint, \
                    row_security_active('{table}'), \
                    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{table}'::regclass \
                            AND attname = 'change_xid' AND NOT attisdropped), \
                    pg_postmaster_start_time(){digest} \
             FROM {table}{join}{filter}",
            table = self.table,
            filter = rows.filter()
        )
    }

    /// An aggregate over this table's rows (joined with [`Table::digest_join`])
    /// that is equal on central and locally exactly when a full download would
    /// copy the same rows as the local table holds, up to a 2^-128 chance: each
    /// row's md5 of the downloaded columns, cast to the staging types as the COPY
    /// casts them, as one row's text; its two 64-bit halves summed separately
    /// (as numeric: no overflow). A sum does not depend on row order (so neither
    /// on the two servers' collations nor on a sort), and needs constant memory
    /// where `string_agg` would build the whole table's text on central. The key
    /// is unique on both sides, so no two rows can cancel out. `0:0` for no rows.
    ///
    /// The text forms depend only on TimeZone and DateStyle (timestamptz), which
    /// central's transactions set to UTC and ISO and the local session has from its
    /// start (the local digest sets them again, see `local_digest_sql`); text and
    /// jsonb (whose numbers are numeric) do not depend on any setting. A float
    /// column would add extra_float_digits to that list. Anything else that makes
    /// the forms differ (another server encoding, another major version's jsonb
    /// text) only makes the digests differ: a full copy, never a false match.
    pub fn digest_sql(&self) -> String {
        let half = |side: &str| {
            format!("coalesce(sum(('x' || {side}(digest.h, 16))::bit(64)::bigint), 0)::text")
        };
        format!("{} || ':' || {}", half("left"), half("right"))
    }

    /// Each row's text (`row_text.r`), as the download copies its columns.
    /// `OFFSET 0` keeps the planner from inlining the subquery, which would render
    /// the text once per use: rendered once, the probe with the digest took less
    /// time than the probe that rendered it for its sum and its maximum (20,000
    /// meters of 2.2 KB: about 0.50 s against 0.57 s).
    fn row_text_join(&self) -> String {
        format!(
            " CROSS JOIN LATERAL (SELECT ROW({})::text AS r OFFSET 0) row_text",
            self.central_columns()
        )
    }

    /// [`Table::row_text_join`] and each row's md5 (`digest.h`), for
    /// [`Table::digest_sql`].
    fn digest_join(&self) -> String {
        format!(
            "{} CROSS JOIN LATERAL (SELECT md5(row_text.r) AS h OFFSET 0) digest",
            self.row_text_join()
        )
    }

    /// The same digest of the local table, with the settings its text depends on
    /// set as central's transactions set them: (rows, digest).
    pub fn local_digest_sql(&self) -> String {
        format!(
            "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; \
             SELECT count(*)::text, {} FROM {}{}",
            self.digest_sql(),
            self.table,
            self.digest_join()
        )
    }

    /// Right after a full download's apply, in its transaction: the digests of the
    /// local table and of the staged rows (central's, as copied): (rows, digest)
    /// of each. They differ by the rows the gateway keeps (gone centrally) and by
    /// the rows it did not write because they are equal by value but not in text
    /// (a jsonb number spelled `1.5` centrally, `1.50` locally). A central restart
    /// is verified against the local digest minus that difference: otherwise
    /// one such row would make every later restart a full copy, for ever.
    pub fn offset_digest_sql(&self) -> String {
        let (digest, join) = (self.digest_sql(), self.digest_join());
        format!(
            "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO'; \
             SELECT l.n, l.d, s.n, s.d \
             FROM (SELECT count(*)::text AS n, {digest} AS d FROM {table}{join}) l, \
                  (SELECT count(*)::text AS n, {digest} AS d FROM {stg}{join}) s",
            table = self.table,
            stg = self.staging()
        )
    }

    /// The idle cycle's statement, kept small because it is most of an idle
    /// cycle's bytes: is any row stamped at or past `watermark`, plus the
    /// database name and the server's start time (the checks that the watermark
    /// is this central's: the same database, in the same server's history; the
    /// start time comes back as 8 binary bytes). An index probe on `change_xid`.
    /// Also the statement's snapshot xmin: when no row is past the watermark, the
    /// next probe may start there (see [`super::watermark::Advanced`]).
    pub fn changed_since_sql(&self, watermark: u64) -> String {
        format!(
            "SELECT current_database()::text, pg_postmaster_start_time(), \
                    EXISTS (SELECT FROM {}{}), \
                    pg_snapshot_xmin(pg_current_snapshot())::text AS xmin",
            self.table,
            Rows::ChangedSince(watermark).filter()
        )
    }

    /// Central's rows, cast to the staging types.
    pub fn copy_out_sql(&self, rows: Rows) -> String {
        format!(
            "COPY (SELECT {} FROM {}{}) TO STDOUT (FORMAT binary)",
            self.central_columns(),
            self.table,
            rows.filter()
        )
    }

    /// The staging table lives as long as the connection and is emptied at every
    /// commit: creating and dropping it every cycle would write a dozen catalog rows
    /// (and their WAL) to the gateway's flash each minute for nothing. Its rows are
    /// never WAL-logged. The primary key turns a duplicate id on central (a table
    /// without its key) into a clear error rather than an arbitrary pick.
    pub fn create_staging_sql(&self) -> String {
        let cols = std::iter::once(format!("{} text PRIMARY KEY", self.key))
            .chain(self.columns.iter().map(|(c, t)| format!("{c} {t}")))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "CREATE TEMP TABLE IF NOT EXISTS {} ({cols}) ON COMMIT DELETE ROWS",
            self.staging()
        )
    }

    pub fn copy_in_sql(&self) -> String {
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
    /// (with `report_gone`, for a full download only: a changes-only download
    /// stages just the changed rows) locally-only id: (kind, id, name, changed
    /// fields).
    pub fn apply_sql(&self, report_gone: bool) -> String {
        let (table, key, stg) = (self.table, self.key, self.staging());
        let changed =
            self.each_column(|c| format!("CASE WHEN l.{c} IS DISTINCT FROM s.{c} THEN '{c}' END"));
        let set = self.each_column(|c| format!("{c} = s.{c}"));
        let cols = self.column_list("");
        let s_cols = self.column_list("s.");
        let gone = if report_gone {
            format!(
                "UNION ALL
                 SELECT 'gone', l.{key}::text, l.name::text, NULL FROM {table} l
                 WHERE NOT EXISTS (SELECT 1 FROM {stg} s WHERE s.{key} = l.{key})"
            )
        } else {
            String::new()
        };
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
             {gone}
             ORDER BY 1, 2"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_always_in_pg_temp() {
        for t in [&METERS, &TENANTS] {
            for sql in [t.create_staging_sql(), t.copy_in_sql(), t.apply_sql(true)] {
                assert!(sql.contains("pg_temp.tmp_"), "{sql}");
                assert!(
                    !sql.replace("pg_temp.tmp_", "").contains("tmp_"),
                    "unqualified staging name in {sql}"
                );
            }
        }
    }

    #[test]
    fn central_and_local_digest_the_same_expression() {
        for t in [&METERS, &TENANTS] {
            let (digest, join) = (t.digest_sql(), t.digest_join());
            let local = t.local_digest_sql();
            let central = t.probe_sql(Rows::All, true, true);
            for sql in [&local, &central] {
                assert!(sql.contains(&digest) && sql.contains(&join), "{sql}");
            }
            assert!(!t.probe_sql(Rows::All, true, false).contains("md5"));
            assert!(t.offset_digest_sql().contains(&digest));
        }
    }

    #[test]
    fn a_digest_without_its_kept_rows() {
        let all = Digest::parse(Some("3"), Some("10:-4")).unwrap();
        let kept = Digest::parse(Some("1"), Some("-5:6")).unwrap();
        let rest = Digest::parse(Some("2"), Some("15:-10")).unwrap();
        assert_eq!(all.without(kept), Some(rest));
        assert_eq!(all.without(Digest::default()), Some(all));
        assert_eq!(kept.without(all), None);
        assert_eq!(Digest::parse(Some("1"), Some("5")), None);
        assert_eq!(Digest::parse(None, Some("0:0")), None);
    }

    #[test]
    fn a_changes_only_download_filters_on_the_watermark() {
        let sql = METERS.copy_out_sql(Rows::ChangedSince(1234));
        assert!(sql
            .ends_with("FROM meters WHERE change_xid >= '1234'::xid8) TO STDOUT (FORMAT binary)"));
        assert!(!METERS.copy_out_sql(Rows::All).contains("WHERE"));
        assert!(!METERS.apply_sql(false).contains("'gone'"));
        assert!(METERS.apply_sql(true).contains("'gone'"));
    }
}
