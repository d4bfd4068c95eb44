//! SPEC §4: migrations create exactly the specified schema, are idempotent, and
//! refuse an applied migration that was edited.

mod support;

use support::Sandbox;

/// (table, column, data_type, is_nullable, default contains) from information_schema.
fn columns(c: &mut support::Client) -> Vec<(String, String, String, String, String)> {
    c.query(
        "SELECT table_name::text, column_name::text,
                CASE WHEN character_maximum_length IS NOT NULL
                     THEN data_type || '(' || character_maximum_length || ')' ELSE data_type END,
                is_nullable::text, coalesce(column_default, '')
         FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> 'meter_sync_migrations'
         ORDER BY table_name, ordinal_position",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

fn tables(c: &mut support::Client) -> Vec<String> {
    c.query(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn check(
    cols: &[(String, String, String, String, String)],
    table: &str,
    expect: &[(&str, &str, &str, &str)],
) {
    let got: Vec<_> = cols.iter().filter(|c| c.0 == table).collect();
    let names: Vec<&str> = got.iter().map(|c| c.1.as_str()).collect();
    let want: Vec<&str> = expect.iter().map(|e| e.0).collect();
    assert_eq!(names, want, "{table}: columns");
    for (g, (name, ty, nullable, default)) in got.iter().zip(expect) {
        assert_eq!(g.2, *ty, "{table}.{name}: type");
        assert_eq!(g.3, *nullable, "{table}.{name}: nullable");
        assert!(
            g.4.contains(default),
            "{table}.{name}: default {:?} lacks {default:?}",
            g.4
        );
    }
}

type Col = (&'static str, &'static str, &'static str, &'static str);

const TS: &str = "timestamp with time zone";

/// The spec's meter_readings; local adds `is_synchronized` and a default for `reading_uid`.
fn readings_cols(local: bool) -> Vec<Col> {
    let mut v: Vec<Col> = vec![
        ("id", "bigint", "NO", "nextval"),
        (
            "reading_uid",
            "uuid",
            "NO",
            if local { "gen_random_uuid()" } else { "" },
        ),
        ("meter_id", "character varying(255)", "NO", ""),
        ("timestamp", TS, "NO", ""),
        ("value", "numeric", "NO", ""),
        ("unit", "character varying(50)", "NO", ""),
        ("metadata", "jsonb", "YES", ""),
        ("created_at", TS, "YES", "now()"),
        ("sync_attempts", "integer", "NO", "0"),
        ("sync_error", "text", "YES", ""),
    ];
    if local {
        v.insert(7, ("is_synchronized", "boolean", "NO", "false"));
        // When central acknowledged it: the resend window (local 0002).
        v.push(("synced_at", TS, "YES", ""));
    }
    v
}

/// `meters` and `tenant`: local adds `synced_at`.
/// Local adds `synced_at`; central adds `change_xid`, the stamp the download's
/// changes-only query uses (remote migration 0002).
fn with_synced_at(mut v: Vec<Col>, local: bool) -> Vec<Col> {
    if local {
        v.push(("synced_at", TS, "YES", ""));
    } else {
        v.push(("change_xid", "xid8", "NO", "pg_current_xact_id()"));
    }
    v
}

fn meters_cols(local: bool) -> Vec<Col> {
    with_synced_at(
        vec![
            ("meter_id", "character varying(255)", "NO", ""),
            ("name", "character varying(255)", "NO", ""),
            ("location_id", "character varying(255)", "YES", ""),
            ("meter_type", "character varying(50)", "NO", ""),
            ("unit", "character varying(50)", "NO", ""),
            ("configuration", "jsonb", "YES", ""),
            ("updated_at", TS, "YES", ""),
        ],
        local,
    )
}

fn tenant_cols(local: bool) -> Vec<Col> {
    with_synced_at(
        vec![
            ("tenant_id", "character varying(255)", "NO", ""),
            ("name", "character varying(255)", "NO", ""),
            ("configuration", "jsonb", "YES", ""),
            ("metadata", "jsonb", "YES", ""),
            ("updated_at", TS, "YES", ""),
        ],
        local,
    )
}

#[test]
fn migrate_creates_exactly_the_specified_local_schema() {
    let s = Sandbox::new();
    let mut c = s.local();
    assert_eq!(
        tables(&mut c),
        [
            "download_watermark",
            "meter_readings",
            "meter_sync_migrations",
            "meters",
            "sync_logs",
            "tenant"
        ]
    );
    let cols = columns(&mut c);
    check(&cols, "meter_readings", &readings_cols(true));
    check(&cols, "meters", &meters_cols(true));
    check(&cols, "tenant", &tenant_cols(true));
    check(
        &cols,
        "sync_logs",
        &[
            ("id", "bigint", "NO", "nextval"),
            ("sync_type", "character varying(20)", "NO", ""),
            ("success", "boolean", "NO", ""),
            ("records_processed", "integer", "NO", "0"),
            ("error_message", "text", "YES", ""),
            ("duration_ms", "bigint", "YES", ""),
            ("timestamp", "timestamp with time zone", "YES", "now()"),
        ],
    );
    // Primary keys and the one unique key.
    let keys: Vec<(String, String)> = c
        .query(
            "SELECT tc.table_name::text || '.' || string_agg(kcu.column_name::text, ',' ORDER BY kcu.ordinal_position),
                    tc.constraint_type::text
             FROM information_schema.table_constraints tc
             JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name)
             WHERE tc.table_schema = 'public' AND tc.constraint_type IN ('PRIMARY KEY', 'UNIQUE')
               AND tc.table_name <> 'meter_sync_migrations'
             GROUP BY tc.table_name, tc.constraint_name, tc.constraint_type ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let keys: Vec<(&str, &str)> = keys.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        keys,
        [
            ("download_watermark.table_name", "PRIMARY KEY"),
            ("meter_readings.id", "PRIMARY KEY"),
            ("meter_readings.reading_uid", "UNIQUE"),
            ("meters.meter_id", "PRIMARY KEY"),
            ("sync_logs.id", "PRIMARY KEY"),
            ("tenant.tenant_id", "PRIMARY KEY"),
        ]
    );
    // The pending-queue index is partial and ordered as the upload reads.
    let idx: String = c
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'meter_readings_pending_idx'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        idx.contains("(\"timestamp\", id)")
            && idx.contains("WHERE ((NOT is_synchronized) AND (sync_error IS NULL))"),
        "{idx}"
    );
    let idx: i64 = c
        .query_one("SELECT count(*) FROM pg_indexes WHERE tablename = 'sync_logs' AND indexdef LIKE '%(\"timestamp\")%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(idx, 1, "sync_logs is indexed by timestamp");
    // The planner uses the index for the upload's query.
    let plan: Vec<String> = c
        .query(
            "EXPLAIN SELECT id FROM meter_readings WHERE NOT is_synchronized AND sync_error IS NULL ORDER BY \"timestamp\", id LIMIT 100",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|l| l.contains("meter_readings_pending_idx")),
        "{plan:?}"
    );
}

#[test]
fn migrate_creates_exactly_the_specified_central_schema() {
    let s = Sandbox::new();
    let mut c = s.central();
    assert_eq!(
        tables(&mut c),
        [
            "gateway_status",
            "meter_readings",
            "meter_sync_migrations",
            "meters",
            "tenant"
        ]
    );
    let cols = columns(&mut c);
    check(&cols, "meter_readings", &readings_cols(false));
    // SPEC §8's fleet heartbeat, column by column.
    check(
        &cols,
        "gateway_status",
        &[
            ("gateway_id", "text", "NO", ""),
            ("version", "text", "YES", ""),
            ("last_cycle_at", TS, "YES", ""),
            ("last_cycle_ok", "boolean", "YES", ""),
            ("last_error", "text", "YES", ""),
            ("queue_size", "bigint", "YES", ""),
            ("oldest_pending_at", TS, "YES", ""),
            ("quarantined", "bigint", "YES", ""),
            ("cert_expires_at", TS, "YES", ""),
            ("bytes_up", "bigint", "YES", ""),
            ("bytes_down", "bigint", "YES", ""),
            ("updated_at", TS, "YES", ""),
        ],
    );
    let uid_default: String = c
        .query_one(
            "SELECT coalesce(column_default, '') FROM information_schema.columns WHERE table_name = 'meter_readings' AND column_name = 'reading_uid'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(uid_default, "", "central reading_uid has no default");
    check(&cols, "meters", &meters_cols(false));
    check(&cols, "tenant", &tenant_cols(false));
    let unique: String = c
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'meter_readings'::regclass AND contype = 'u'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unique, "UNIQUE (reading_uid, \"timestamp\")");
}

fn schema_fingerprint(c: &mut support::Client) -> String {
    c.query_one(
        "SELECT string_agg(table_name || '.' || column_name || ':' || data_type, ',' ORDER BY table_name, column_name)
         || '|' || (SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public')
         || '|' || (SELECT count(*) FROM meter_sync_migrations)
         || '|' || (SELECT string_agg(applied_at::text, ',') FROM meter_sync_migrations)
         FROM information_schema.columns WHERE table_schema = 'public'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_second_migrate_changes_nothing() {
    let s = Sandbox::new();
    let before = (
        schema_fingerprint(&mut s.local()),
        schema_fingerprint(&mut s.central()),
    );
    s.run(&["migrate", "all"]).assert_ok();
    s.run(&["migrate", "local"]).assert_ok();
    s.run(&["migrate", "remote"]).assert_ok();
    let after = (
        schema_fingerprint(&mut s.local()),
        schema_fingerprint(&mut s.central()),
    );
    assert_eq!(before, after);
}

#[test]
fn migrate_targets_only_the_named_side() {
    let s = Sandbox::empty();
    s.run(&["migrate", "local"]).assert_ok();
    assert_eq!(tables(&mut s.local()).len(), 6);
    assert!(tables(&mut s.central()).is_empty());
    s.run(&["migrate", "remote"]).assert_ok();
    assert_eq!(tables(&mut s.central()).len(), 5);
}

#[test]
fn an_edited_applied_migration_is_refused_by_name() {
    let s = Sandbox::new();
    s.local()
        .execute(
            "UPDATE meter_sync_migrations SET checksum = 'deadbeefdeadbeef' WHERE version = 1",
            &[],
        )
        .unwrap();
    let r = s.run(&["migrate", "local"]);
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr.contains("migrations/local/0001_initial.sql"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("changed"), "{}", r.stderr);
}

#[test]
fn the_collector_writes_only_its_five_columns() {
    let s = Sandbox::new();
    s.insert_readings(3);
    let row = s
        .local()
        .query_one(
            "SELECT count(*) FILTER (WHERE reading_uid IS NOT NULL AND NOT is_synchronized AND sync_attempts = 0
                                     AND sync_error IS NULL AND created_at IS NOT NULL),
                    count(DISTINCT reading_uid)
             FROM meter_readings",
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (3, 3));
}

#[test]
fn migrate_works_over_the_local_unix_socket() {
    let mut s = Sandbox::empty();
    let dir = s.local_cluster().socket_dir.display().to_string();
    s.set("POSTGRES_SYNC_HOST", dir);
    s.run(&["migrate", "local"]).assert_ok();
    assert_eq!(tables(&mut s.local()).len(), 6);
}
