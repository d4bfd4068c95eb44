//! The readings as the collector writes them and as the tests compare them:
//! collector-style inserts, every column as the text PostgreSQL prints for it
//! (so two rows are equal when every value is: numeric scale, microseconds,
//! jsonb null versus NULL), and central's table partitioned by time as fleets
//! run it.
//!
//! One definition, so that "arrived unchanged" means the same in every test
//! and benchmark.

use std::collections::BTreeMap;

use postgres::{Client, Row};

/// Inserts `n` collector-style readings; `offset` shifts their timestamps so that
/// successive calls never collide.
pub fn insert_readings(c: &mut Client, n: usize, offset: i64) {
    c.execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, metadata)
         SELECT 'meter-' || (g % 200), timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => (g + $2::bigint)::float8),
                (g * 1.5)::numeric, 'kWh',
                CASE WHEN g % 10 = 0 THEN jsonb_build_object('seq', g, 'src', 'collector') END
         FROM generate_series(1, $1::bigint) g",
        &[&(n as i64), &offset],
    )
    .unwrap();
}

/// Every column both sides share, as text, `reading_uid` first.
pub const FULL_ROW: &str = "reading_uid::text, meter_id::text, \"timestamp\"::text, value::text, \
     unit::text, metadata::text, created_at::text, sync_attempts::text";

/// Rows of [`FULL_ROW`] keyed by reading_uid.
pub type Rows = BTreeMap<String, Vec<Option<String>>>;

/// Rows selected as [`FULL_ROW`], keyed by reading_uid.
pub fn to_rows(rows: &[Row]) -> Rows {
    rows.iter()
        .map(|r| {
            let uid: String = r.get(0);
            (uid, (1..8).map(|i| r.get::<_, Option<String>>(i)).collect())
        })
        .collect()
}

/// Full rows of `meter_readings` (then `filter`, e.g. a WHERE clause) keyed by reading_uid.
pub fn rows(c: &mut Client, filter: &str) -> Rows {
    to_rows(
        &c.query(
            &format!("SELECT {FULL_ROW} FROM meter_readings {filter}"),
            &[],
        )
        .unwrap(),
    )
}

/// Central's `meter_readings` partitioned by range of `timestamp`, made before the
/// first migration runs (its `CREATE TABLE IF NOT EXISTS` then leaves it be). The
/// unique key includes the partition key, as PostgreSQL requires; so does the
/// primary key. Partitions are the caller's.
pub const PARTITIONED_READINGS: &str = "
CREATE TABLE meter_readings (
    id            bigserial,
    reading_uid   uuid NOT NULL,
    meter_id      varchar(255) NOT NULL,
    \"timestamp\"   timestamptz NOT NULL,
    value         numeric NOT NULL,
    unit          varchar(50) NOT NULL,
    metadata      jsonb,
    created_at    timestamptz DEFAULT now(),
    sync_attempts integer NOT NULL DEFAULT 0,
    sync_error    text,
    PRIMARY KEY (id, \"timestamp\"),
    CONSTRAINT meter_readings_reading_uid_timestamp_key UNIQUE (reading_uid, \"timestamp\")
) PARTITION BY RANGE (\"timestamp\");
";

/// How many readings each partition of a partitioned `meter_readings` holds, by
/// partition name.
pub fn per_partition(c: &mut Client) -> Vec<(String, i64)> {
    c.query(
        "SELECT tableoid::regclass::text, count(*) FROM meter_readings GROUP BY 1 ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// How many readings `meter_readings` holds, and how many distinct reading_uids:
/// equal when none arrived twice.
pub fn count_and_distinct(c: &mut Client) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT count(*), count(DISTINCT reading_uid) FROM meter_readings",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}
