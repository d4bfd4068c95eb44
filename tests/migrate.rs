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

/// A wave of gateways (or operators' scripts) migrating one database pair at the
/// same moment: every process succeeds, every migration is applied once. Before,
/// about one wave in five had a process fail with `create migration table:
/// duplicate key value violates unique constraint "pg_type_typname_nsp_index"`
/// (the bookkeeping table was created before the migration lock was taken).
#[test]
fn twenty_migrators_at_once_all_succeed_and_apply_each_migration_once() {
    for _wave in 0..4 {
        let s = Sandbox::empty();
        let children: Vec<_> = (0..20)
            .map(|_| {
                s.command(&["migrate", "all"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let failed: Vec<String> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .filter(|o| !o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect();
        assert!(
            failed.is_empty(),
            "{} of 20 failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
        assert_eq!(
            s.local_count("(SELECT DISTINCT version FROM meter_sync_migrations) v"),
            7
        );
        assert_eq!(s.local_count("meter_sync_migrations"), 7);
        assert_eq!(s.central_count("meter_sync_migrations"), 3);
    }
}

/// What a newer release's `migrate local` leaves behind: one more applied
/// migration, which says from which release on the schema can be run against.
fn apply_a_future_local_migration(s: &Sandbox, oldest_compatible: i32) {
    s.local()
        .batch_execute(&format!(
            "ALTER TABLE meter_sync_migrations ADD COLUMN IF NOT EXISTS oldest_compatible integer;
             INSERT INTO meter_sync_migrations (version, name, checksum, oldest_compatible)
             VALUES (99, '0099_from_the_future.sql', '0123456789abcdef', {oldest_compatible})"
        ))
        .unwrap();
}

/// A rollback below what the local schema allows: every command that would write
/// readings refuses with one line naming the migration, exit 78 (systemd does not
/// restart-loop on it), and not one reading moves. Before, the release ran against
/// the schema as if it knew it (`once` exited 0 and uploaded).
#[test]
fn a_local_schema_this_release_cannot_run_against_is_refused_with_78() {
    let s = Sandbox::new();
    s.insert_readings(5);
    apply_a_future_local_migration(&s, 99);
    for args in [
        &["once"][..],
        &["run"],
        &["migrate", "local"],
        &["requeue", "--all"],
        &["resend", "--since", "2026-01-01T00:00:00Z"],
    ] {
        let r = s.run(args);
        assert_eq!(r.code, Some(78), "{args:?}: {}", r.all());
        let errors: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.contains("0099_from_the_future.sql"))
            .collect();
        assert!(!errors.is_empty(), "{args:?}: {}", r.stderr);
        assert!(
            errors[0].contains("newer meter-sync") && errors[0].contains("0007"),
            "{args:?}: {}",
            errors[0]
        );
    }
    assert_eq!(s.local_count("meter_readings WHERE NOT is_synchronized"), 5);
    assert_eq!(s.central_count("meter_readings"), 0);
    // The fleet's operator sees it centrally too.
    let last_error: String = s
        .central()
        .query_one("SELECT last_error FROM gateway_status", &[])
        .unwrap()
        .get(0);
    assert!(
        last_error.contains("0099_from_the_future.sql"),
        "{last_error}"
    );
}

/// A newer release's migration that only added (the rule for this project's
/// migrations): this release runs, says once that the schema is newer, and
/// `migrate` leaves the newer migration alone.
#[test]
fn a_newer_compatible_local_schema_runs_with_a_warning() {
    let s = Sandbox::new();
    s.insert_readings(5);
    apply_a_future_local_migration(&s, 1);
    let r = s.run(&["once"]);
    r.assert_ok();
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("0099_from_the_future.sql")),
        "{}",
        r.stderr
    );
    assert_eq!(s.central_count("meter_readings"), 5);
    let r = s.run(&["migrate", "local"]);
    r.assert_ok();
    assert!(
        r.stderr.contains("0099_from_the_future.sql"),
        "{}",
        r.stderr
    );
    assert_eq!(s.local_count("meter_sync_migrations"), 8);
}

/// src/migrate.rs's checksum (FNV-1a, 64 bit), as the release that applied a file wrote it.
fn fnv1a(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A gateway whose local schema an earlier release left at each of 0001..0006 (the
/// bookkeeping table as those releases made it), with readings waiting, two
/// quarantined, five retained for the resend window (from 0002 on) and a download
/// watermark (from 0003 on), upgraded as the unit does it (`migrate local`, then
/// the daemon): every waiting reading reaches central once, the quarantined and
/// retained ones stay as they were, the counts are right, and a watermark without
/// central's start time (0004) is not trusted: the meter central has is downloaded.
#[test]
fn upgrading_from_each_earlier_local_schema_keeps_every_reading_once() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/local");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    for applied in 1..=6 {
        let mut s = Sandbox::empty();
        s.run(&["migrate", "remote"]).assert_ok();
        s.central()
            .batch_execute(
                "INSERT INTO meters (meter_id, name, meter_type, unit) VALUES ('m-1', 'Meter 1', 'power', 'kWh')",
            )
            .unwrap();
        let mut local = s.local();
        local
            .batch_execute(
                "CREATE TABLE meter_sync_migrations (version integer PRIMARY KEY, name text NOT NULL,
                     checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .unwrap();
        for (i, name) in files.iter().take(applied).enumerate() {
            let sql = std::fs::read_to_string(dir.join(name)).unwrap();
            local.batch_execute(&sql).unwrap();
            local
                .execute(
                    "INSERT INTO meter_sync_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    &[&(i as i32 + 1), name, &fnv1a(&sql)],
                )
                .unwrap();
        }
        s.insert_readings(20);
        local
            .batch_execute(
                "UPDATE meter_readings SET sync_error = 'rejected by central' WHERE id IN (3, 4)",
            )
            .unwrap();
        let retained = if applied >= 2 {
            local
                .batch_execute(
                    "UPDATE meter_readings SET is_synchronized = true, synced_at = now() WHERE id BETWEEN 11 AND 15",
                )
                .unwrap();
            5
        } else {
            0
        };
        if applied >= 3 {
            // A watermark far ahead of central's transactions: trusted, it would
            // make the download skip m-1.
            local
                .batch_execute(
                    "INSERT INTO download_watermark (table_name, central_db, watermark, full_at)
                     VALUES ('meters', current_database(), 1000000000, now())",
                )
                .unwrap();
        }
        s.set("UPLOAD_RETAIN_HOURS", "24");
        s.run(&["migrate", "local"]).assert_ok();
        s.run(&["once"]).assert_ok();
        let waiting = 20 - 2 - retained;
        assert_eq!(
            s.central_count("meter_readings"),
            waiting,
            "schema at {applied:04}"
        );
        assert_eq!(
            s.central_count("(SELECT DISTINCT reading_uid FROM meter_readings) u"),
            waiting
        );
        assert_eq!(
            s.local_count("meter_readings WHERE sync_error IS NOT NULL AND NOT is_synchronized"),
            2
        );
        assert_eq!(
            s.local_count("meter_readings WHERE is_synchronized"),
            waiting + retained
        );
        assert_eq!(
            s.local_count("meters WHERE meter_id = 'm-1'"),
            1,
            "schema at {applied:04}"
        );
        let status = s.run(&["status", "--json"]);
        status.assert_ok();
        let out = status.stdout.replace(' ', "");
        assert!(
            out.contains("\"queue_size\":0") && out.contains("\"quarantined\":2"),
            "schema at {applied:04}: {}",
            status.stdout
        );
    }
}

/// The first install's `migrate` with a gateway's least-privilege central role
/// (docs/security.md): the local schema is made, central's is not the gateway's to
/// change, and the error says who applies it and what a gateway runs. Before, only
/// `central: create migration table: permission denied for schema public`.
#[test]
fn a_gateway_role_that_may_not_migrate_central_is_told_who_does() {
    let mut s = Sandbox::empty();
    s.run(&["migrate", "remote"]).assert_ok();
    let role = format!("gw_{}", s.central_db);
    s.central()
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{}';
             GRANT SELECT, INSERT ON meter_readings TO {role};
             GRANT SELECT ON meters, tenant TO {role};
             GRANT SELECT, INSERT, UPDATE ON gateway_status TO {role};",
            support::CENTRAL_PASSWORD
        ))
        .unwrap();
    s.set("POSTGRES_CLIENT_USER", &role);
    let r = s.run(&["migrate"]);
    assert_eq!(r.code, Some(1), "{}", r.all());
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_default();
    assert!(
        line.contains("permission denied") && line.contains("meter-sync migrate local"),
        "{}",
        r.stderr
    );
    assert_eq!(tables(&mut s.local()).len(), 6);
    s.run(&["migrate", "local"]).assert_ok();
}

/// A `migrate` started while another is applying a long migration (the unit's
/// `ExecStartPre=` at a restart during an operator's `migrate`, the next host of a
/// wave on central) waits for it and then finds nothing to do. Before, it failed
/// after `DB_QUERY_TIMEOUT_MS` with `canceling statement due to statement timeout`.
#[test]
fn a_migrate_waits_for_one_in_progress_instead_of_timing_out() {
    let mut s = Sandbox::new();
    s.set("DB_QUERY_TIMEOUT_MS", 1000);
    // The other migration: its transaction holds the migration lock for 4 s.
    let mut other = s.local();
    other
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({})",
            0x6d65_7465_725f_6d67_i64
        ))
        .unwrap();
    let done = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(4));
        other.batch_execute("COMMIT").unwrap();
    });
    let start = std::time::Instant::now();
    let r = s.run(&["migrate", "local"]);
    done.join().unwrap();
    r.assert_ok();
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(3500),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("waiting for it to finish"),
        "{}",
        r.stderr
    );
}

/// The unit's `ExecStartPre=-… migrate local` fails and is ignored when the local
/// database is not up yet (a reboot, or unattended-upgrades restarting PostgreSQL
/// in the same run that upgrades meter-sync); the daemon then started on the
/// previous release's schema and failed every upload (`column … synced_at does not
/// exist`) until someone restarted it. It applies the local migrations its
/// release needs itself, once it reaches the database.
#[test]
fn a_daemon_on_a_schema_its_migrate_could_not_reach_applies_the_migrations_itself() {
    let s = Sandbox::new();
    // The local schema as the first release left it: 0001 only.
    s.local()
        .batch_execute(
            "DROP TABLE download_watermark;
             DROP INDEX meter_readings_retained_idx;
             DROP INDEX meter_readings_quarantined_idx;
             ALTER TABLE meter_readings DROP COLUMN synced_at;
             DELETE FROM meter_sync_migrations WHERE version > 1",
        )
        .unwrap();
    s.insert_readings(10);
    let mut d = s.spawn(&["run"]);
    let uploaded = support::wait_until(std::time::Duration::from_secs(20), || {
        s.central_count("meter_readings") == 10
    });
    d.signal(15);
    assert_eq!(
        d.wait_exit(std::time::Duration::from_secs(10)),
        Some(Some(0))
    );
    assert!(uploaded, "{}", d.log_text());
    assert_eq!(s.local_count("meter_sync_migrations"), 7);
    assert!(
        d.log_text().contains("applied migrations/local/0007"),
        "{}",
        d.log_text()
    );
}
