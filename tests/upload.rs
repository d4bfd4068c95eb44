//! SPEC §5 P1–P7 and P19: readings reach central in order, in atomic batches,
//! exactly once and exactly as written; poison readings are quarantined and the rest
//! go through. Real servers, the real binary, faults injected by central triggers.

mod support;

use std::time::Duration;
use support::readings::{per_partition, rows, Rows, PARTITIONED_READINGS};

use support::{Client, Sandbox};

/// The local queue in the order the spec prescribes: oldest timestamp, then id.
fn queue_order(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT reading_uid::text FROM meter_readings
         WHERE NOT is_synchronized AND sync_error IS NULL ORDER BY \"timestamp\", id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Central readings in arrival order with the transaction that wrote each.
fn central_arrivals(c: &mut Client) -> Vec<(String, String)> {
    c.query(
        "SELECT reading_uid::text, xmin::text FROM meter_readings ORDER BY id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Readings that central holds more than once.
fn central_duplicates(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM (SELECT reading_uid FROM meter_readings
         GROUP BY reading_uid HAVING count(*) > 1) d",
        &[],
    )
    .unwrap()
    .get(0)
}

/// The `sync_logs` rows of the upload phase: (success, records, error).
fn upload_logs(s: &Sandbox) -> Vec<(bool, i32, Option<String>)> {
    s.local()
        .query(
            "SELECT success, records_processed, error_message FROM sync_logs
             WHERE sync_type = 'upload' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn last_upload_log(s: &Sandbox) -> (bool, i32, Option<String>) {
    upload_logs(s).pop().expect("an upload row in sync_logs")
}

/// A central trigger that fails the insert of any reading listed in `poison`
/// with that row's SQLSTATE. `deferred` fires it at commit instead of at the row.
fn install_poison(c: &mut Client, deferred: bool) {
    c.batch_execute(
        "CREATE TABLE poison (uid uuid PRIMARY KEY, code text NOT NULL);
         CREATE FUNCTION poison_check() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE c text;
         BEGIN
             SELECT code INTO c FROM poison WHERE uid = NEW.reading_uid;
             IF c IS NOT NULL THEN
                 RAISE EXCEPTION 'injected failure for %', NEW.reading_uid USING ERRCODE = c;
             END IF;
             RETURN NEW;
         END $$;",
    )
    .unwrap();
    c.batch_execute(if deferred {
        "CREATE CONSTRAINT TRIGGER poison_check AFTER INSERT ON meter_readings
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION poison_check()"
    } else {
        "CREATE TRIGGER poison_check BEFORE INSERT ON meter_readings
         FOR EACH ROW EXECUTE FUNCTION poison_check()"
    })
    .unwrap();
}

fn poison(c: &mut Client, uid: &str, code: &str) {
    c.execute(
        "INSERT INTO poison VALUES ($1::text::uuid, $2)",
        &[&uid, &code],
    )
    .unwrap();
}

/// Readings whose timestamps run against their ids and repeat, so that ordering by
/// id alone or by timestamp alone both give a different order than the spec's.
fn insert_shuffled(c: &mut Client, n: i64) {
    c.execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
         SELECT 'meter-' || g, timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => ((g * 7) % 11)::float8),
                g, 'kWh'
         FROM generate_series(1, $1::bigint) g",
        &[&n],
    )
    .unwrap();
}

#[test]
fn p1_batches_hold_at_most_batch_size_oldest_first() {
    for depth in [1, 4] {
        let mut s = Sandbox::new();
        s.set("BATCH_SIZE", 3).set("UPLOAD_PIPELINE_DEPTH", depth);
        let mut l = s.local();
        insert_shuffled(&mut l, 20);
        // Text order is not time order before Christ: 44 BC sorts before 100 BC.
        l.batch_execute(
            "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit) VALUES
                 ('bc-44', '0044-03-15 00:00:00+00 BC', 1, 'kWh'),
                 ('bc-100', '0100-07-12 00:00:00+00 BC', 1, 'kWh')",
        )
        .unwrap();
        // Older than everything, but not in the queue: never uploaded, never deleted.
        l.batch_execute(
            "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, sync_error)
                 VALUES ('quarantined', '2020-01-01Z', 1, 'kWh', 'rejected earlier');
             INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, is_synchronized)
                 VALUES ('synchronized', '2020-01-01Z', 1, 'kWh', true);",
        )
        .unwrap();
        let expected = queue_order(&mut l);
        assert_eq!(expected.len(), 22);

        let run = s.run(&["once"]);
        assert!(
            run.stderr.contains("upload: 22 reading(s) queued"),
            "{}",
            run.stderr
        );
        let arrivals = central_arrivals(&mut s.central());
        let order: Vec<String> = arrivals.iter().map(|a| a.0.clone()).collect();
        assert_eq!(order, expected, "depth {depth}: central arrival order");
        // One transaction per batch: consecutive runs of the same xmin.
        let mut sizes: Vec<usize> = Vec::new();
        for (i, a) in arrivals.iter().enumerate() {
            if i > 0 && arrivals[i - 1].1 == a.1 {
                *sizes.last_mut().unwrap() += 1;
            } else {
                sizes.push(1);
            }
        }
        assert_eq!(
            sizes,
            [3, 3, 3, 3, 3, 3, 3, 1],
            "depth {depth}: batch sizes"
        );
        let left: Vec<String> = l
            .query("SELECT meter_id::text FROM meter_readings ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(left, ["quarantined", "synchronized"]);
        assert_eq!(upload_logs(&s), [(true, 22, None)], "one sync_logs row");
    }
}

#[test]
fn p2_a_batch_reaches_central_whole_or_not_at_all() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 10)
        .set("UPLOAD_PIPELINE_DEPTH", 1)
        .set("MAX_QUERY_RETRIES", 1);
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, 30, 0);
    let order = queue_order(&mut l);
    install_poison(&mut c, false);
    // The 15th reading fails half way through the second batch, after the trigger let
    // its first four rows in. A transient code, so that nothing is bisected away:
    // what central shows is exactly what that one statement left behind.
    poison(&mut c, &order[14], "40001");

    s.run(&["once"]);
    let (ok, _, err) = last_upload_log(&s);
    assert!(!ok, "the upload phase must report the failure");
    assert!(err.unwrap().contains("40001"));
    let central: Vec<String> = central_arrivals(&mut c).into_iter().map(|a| a.0).collect();
    assert_eq!(central, order[..10], "only the first batch, and all of it");
    assert_eq!(
        queue_order(&mut l),
        order[10..],
        "the failed batch stays queued"
    );
    assert_eq!(
        s.local_count("meter_readings WHERE sync_error IS NOT NULL"),
        0,
        "a transient failure never quarantines"
    );

    c.batch_execute("DELETE FROM poison").unwrap();
    s.run(&["once"]);
    assert_eq!(s.central_count("meter_readings"), 30);
    assert_eq!(s.local_count("meter_readings"), 0);
}

#[test]
fn p3_readings_are_deleted_locally_only_after_the_central_commit() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 10)
        .set("UPLOAD_PIPELINE_DEPTH", 1)
        .set("MAX_QUERY_RETRIES", 0);
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, 30, 0);
    let before = rows(&mut l, "");
    let order = queue_order(&mut l);
    // Fails at COMMIT, after the insert statement itself went through: deleting on
    // anything short of the commit acknowledgement would lose the second batch.
    install_poison(&mut c, true);
    poison(&mut c, &order[14], "40001");

    s.run(&["once"]);
    assert!(!last_upload_log(&s).0);
    assert_eq!(s.central_count("meter_readings"), 10);
    let after = rows(&mut l, "");
    let expected: Rows = before
        .iter()
        .filter(|(uid, _)| order[10..].contains(uid))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(after, expected, "exactly the committed batch was deleted");

    c.batch_execute("DELETE FROM poison").unwrap();
    s.run(&["once"]);
    assert_eq!(
        rows(&mut c, ""),
        before,
        "central holds every reading as written"
    );
    assert_eq!(s.local_count("meter_readings"), 0);
}

#[test]
fn p4_readings_already_in_central_are_not_duplicated_and_are_removed_locally() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 4);
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, 25, 0);
    let before = rows(&mut l, "");
    // As if a previous run had committed these centrally and died before deleting
    // them locally: scattered so that they share batches with new readings.
    for (uid, r) in before.iter().step_by(3) {
        c.execute(
            "INSERT INTO meter_readings (reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at, sync_attempts)
             VALUES ($1::text::uuid, $2, $3::text::timestamptz, $4::text::numeric, $5, $6::text::jsonb, $7::text::timestamptz, $8::text::int)",
            &[uid, &r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]],
        )
        .unwrap();
    }
    let run = s.run(&["once"]);
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(rows(&mut c, ""), before);
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(last_upload_log(&s), (true, 25, None));
    assert!(
        run.stderr.contains("9 were already in central"),
        "{}",
        run.stderr
    );
}

/// (uid suffix, meter_id, timestamp, value, unit, metadata, created_at, sync_attempts)
type Written<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    i32,
);

#[test]
fn p5_every_column_arrives_exactly_as_written() {
    let s = Sandbox::new();
    let mut l = s.local();
    let long_meter = "Ж".repeat(254) + "x";
    let long_unit = "€".repeat(50);
    let nested =
        r#"{"nested": {"a": [1, 2.50, {"b": null}]}, "big": 12345678901234567890.123456789}"#;
    let unicode = r#"{"unicode": "Zähler ☃ 電気 😀", "escapes": "q\"uote back\\slash\n\ttab", "empty": "", "list": []}"#;
    let readings: [Written; 8] = [
        (
            "1",
            "big",
            "2026-02-03 04:05:06.123456+00",
            "12345678901234567890.123456789",
            "kWh",
            Some(nested),
            Some("2026-02-03 04:05:07.000001+00"),
            0,
        ),
        (
            "2",
            "nan",
            "2026-02-03 04:05:06.123457+00",
            "NaN",
            "kWh",
            Some("null"),
            None,
            2,
        ),
        (
            "3",
            "tiny",
            "1999-12-31 23:59:59.999999+00",
            "-0.000001",
            "m³",
            None,
            Some("2000-01-01 00:00:00+00"),
            0,
        ),
        (
            "4",
            &long_meter,
            "2026-06-30 22:00:00.5+02",
            "0.10",
            &long_unit,
            Some(unicode),
            Some("2026-06-30 20:00:00.000001+00"),
            7,
        ),
        (
            "5",
            "huge",
            "0044-03-15 12:00:00+00 BC",
            "1000000000000000000000000000000000000000.000000000000000000000000000001",
            "x",
            Some("{}"),
            None,
            0,
        ),
        ("6", "inf", "infinity", "Infinity", "x", Some("[]"), None, 0),
        (
            "7",
            "ninf",
            "-infinity",
            "-Infinity",
            "x",
            Some(r#""a string""#),
            None,
            0,
        ),
        (
            "8",
            "zero",
            "2026-02-03 04:05:06.123456+00",
            "-0",
            "x",
            Some("true"),
            None,
            0,
        ),
    ];
    for (n, meter, ts, value, unit, md, created, attempts) in readings {
        l.execute(
            "INSERT INTO meter_readings (reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at, sync_attempts)
             VALUES (('00000000-0000-4000-8000-00000000000' || $1)::uuid, $2, $3::text::timestamptz, $4::text::numeric,
                     $5, $6::text::jsonb, $7::text::timestamptz, $8)",
            &[&n, &meter, &ts, &value, &unit, &md, &created, &attempts],
        )
        .unwrap();
    }
    let before = rows(&mut l, "");
    assert_eq!(before.len(), 8);
    assert_eq!(
        before["00000000-0000-4000-8000-000000000004"][0]
            .as_ref()
            .unwrap()
            .chars()
            .count(),
        255
    );
    s.run(&["once"]);
    let mut c = s.central();
    assert_eq!(rows(&mut c, ""), before);
    // Text equality above already covers it; these make the intent explicit.
    let exact: bool = c
        .query_one(
            "SELECT value = 12345678901234567890.123456789 AND metadata->'big' = '12345678901234567890.123456789'::jsonb
             FROM meter_readings WHERE meter_id = 'big'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(exact);
    let nulls: (bool, bool) = c
        .query_one(
            "SELECT (SELECT metadata = 'null'::jsonb FROM meter_readings WHERE meter_id = 'nan'),
                    (SELECT metadata IS NULL FROM meter_readings WHERE meter_id = 'tiny')",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        nulls,
        (true, true),
        "jsonb null stays jsonb null, SQL NULL stays NULL"
    );
    assert_eq!(s.local_count("meter_readings"), 0);
}

#[test]
fn p6_a_large_backlog_drains_in_one_cycle_within_the_time_budget() {
    let mut s = Sandbox::new();
    s.insert_readings(50_000);
    // A budget too short for the backlog: the phase stops between batches, succeeds,
    // and says what is left.
    s.set("UPLOAD_TIME_BUDGET_SECONDS", 1)
        .set("BATCH_SIZE", 5)
        .set("UPLOAD_PIPELINE_DEPTH", 1);
    let run = s.run(&["once"]);
    let (ok, first, _) = last_upload_log(&s);
    assert!(ok, "{}", run.stderr);
    assert!(first > 0 && first < 50_000, "delivered {first}");
    assert!(run.stderr.contains("time budget spent"), "{}", run.stderr);
    assert_eq!(
        s.central_count("meter_readings") + s.local_count("meter_readings"),
        50_000
    );

    s.unset("UPLOAD_TIME_BUDGET_SECONDS")
        .unset("BATCH_SIZE")
        .unset("UPLOAD_PIPELINE_DEPTH");
    let t = std::time::Instant::now();
    let run = s.run(&["once"]);
    let took = t.elapsed();
    let rest = 50_000 - first as i64;
    assert!(
        run.stderr
            .contains(&format!("upload: {rest} reading(s) queued")),
        "{}",
        run.stderr
    );
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(s.central_count("meter_readings"), 50_000);
    assert_eq!(central_duplicates(&mut s.central()), 0);
    assert_eq!(last_upload_log(&s), (true, rest as i32, None));
    assert_eq!(upload_logs(&s).len(), 2, "one sync_logs row per cycle");
    eprintln!("drained {rest} readings (BATCH_SIZE 100, depth 8) in one cycle: {took:?}");
}

#[test]
fn p7_check_constraint_rejects_are_quarantined_and_the_rest_arrive() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 10);
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, 40, 0);
    l.batch_execute("UPDATE meter_readings SET value = -value WHERE id IN (3, 17, 18, 40)")
        .unwrap();
    let before = rows(&mut l, "");
    c.batch_execute("ALTER TABLE meter_readings ADD CONSTRAINT non_negative CHECK (value >= 0)")
        .unwrap();

    let run = s.run(&["once"]);
    assert_eq!(last_upload_log(&s), (true, 36, None), "{}", run.stderr);
    assert!(run.stderr.contains("4 quarantined"), "{}", run.stderr);
    let held: Vec<(i64, String, String, i32)> = l
        .query(
            "SELECT id, reading_uid::text, sync_error, sync_attempts FROM meter_readings ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        held.iter().map(|h| h.0).collect::<Vec<_>>(),
        [3, 17, 18, 40]
    );
    for (id, uid, err, attempts) in &held {
        assert!(
            err.contains("non_negative") && err.contains("23514"),
            "{err}"
        );
        assert_eq!(*attempts, 1);
        assert!(
            run.stderr
                .contains(&format!("quarantined reading id {id} (reading_uid {uid})")),
            "{}",
            run.stderr
        );
    }
    assert_eq!(s.central_count("meter_readings"), 36);

    // Quarantined readings wait for the operator.
    s.run(&["once"]);
    assert_eq!(s.local_count("meter_readings WHERE sync_attempts = 1"), 4);
    assert_eq!(s.central_count("meter_readings"), 36);

    c.batch_execute("ALTER TABLE meter_readings DROP CONSTRAINT non_negative")
        .unwrap();
    let rq = s.run(&["requeue", "--all"]);
    rq.assert_ok();
    assert!(rq.stdout.contains("requeued 4"), "{}", rq.all());
    s.run(&["once"]);
    assert_eq!(s.local_count("meter_readings"), 0);
    // They arrive as they were when sent: with the one failed attempt on record.
    let mut expected = before;
    for (_, r) in expected.iter_mut() {
        if r[2].as_deref().unwrap().starts_with('-') {
            r[6] = Some("1".into());
        }
    }
    assert_eq!(rows(&mut c, ""), expected);
}

#[test]
fn p7_foreign_key_rejects_and_requeue_by_id() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 7).set("UPLOAD_PIPELINE_DEPTH", 3);
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, 50, 0);
    // Known meters are meter-0 .. meter-49; two readings name unknown meters.
    l.batch_execute(
        "UPDATE meter_readings SET meter_id = 'ghost-a' WHERE id = 5;
         UPDATE meter_readings SET meter_id = 'ghost-b' WHERE id = 44;",
    )
    .unwrap();
    c.batch_execute(
        "INSERT INTO meters (meter_id, name, meter_type, unit)
             SELECT 'meter-' || g, 'M' || g, 'electricity', 'kWh' FROM generate_series(0, 199) g;
         ALTER TABLE meter_readings ADD CONSTRAINT known_meter
             FOREIGN KEY (meter_id) REFERENCES meters (meter_id);",
    )
    .unwrap();

    s.run(&["once"]);
    assert_eq!(last_upload_log(&s), (true, 48, None));
    let held: Vec<(i64, String)> = l
        .query("SELECT id, sync_error FROM meter_readings ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(held.len(), 2);
    assert_eq!((held[0].0, held[1].0), (5, 44));
    assert!(held.iter().all(|h| h.1.contains("23503")), "{held:?}");

    c.batch_execute(
        "INSERT INTO meters (meter_id, name, meter_type, unit) VALUES ('ghost-a', 'A', 'water', 'm3')",
    )
    .unwrap();
    let rq = s.run(&["requeue", "5", "999999"]);
    rq.assert_ok();
    assert!(rq.stdout.contains("requeued 1"), "{}", rq.all());
    s.run(&["once"]);
    let left: Vec<i64> = l
        .query("SELECT id FROM meter_readings", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, [44], "only the released reading was retried");
    assert_eq!(s.central_count("meter_readings"), 49);
}

#[test]
fn p7_errors_that_are_not_about_the_rows_never_quarantine() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 5)
        .set("UPLOAD_PIPELINE_DEPTH", 1)
        .set("MAX_QUERY_RETRIES", 0);
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, 12, 0);
    let order = queue_order(&mut l);
    install_poison(&mut c, false);
    // A server shutting down, a deadlock, a missing column: all refuse any row, so
    // bisecting them would quarantine readings that are perfectly fine. (42501 is
    // isolated, as row-level security refuses single rows with it: see p24_.)
    for code in ["57P01", "40P01", "42703"] {
        c.batch_execute("DELETE FROM poison").unwrap();
        poison(&mut c, &order[0], code);
        s.run(&["once"]);
        let (ok, _, err) = last_upload_log(&s);
        assert!(!ok && err.unwrap().contains(code));
        assert_eq!(
            s.local_count("meter_readings WHERE sync_error IS NULL"),
            12,
            "{code}: nothing quarantined, nothing lost"
        );
        assert_eq!(s.central_count("meter_readings"), 0);
    }
}

#[test]
fn p19_upload_works_unchanged_against_a_partitioned_central_table() {
    let s = Sandbox::empty();
    let mut c = s.central();
    c.batch_execute(PARTITIONED_READINGS).unwrap();
    c.batch_execute(
        "CREATE TABLE meter_readings_2026_01 PARTITION OF meter_readings
             FOR VALUES FROM ('2026-01-01Z') TO ('2026-01-02Z');
         CREATE TABLE meter_readings_2026_01_02 PARTITION OF meter_readings
             FOR VALUES FROM ('2026-01-02Z') TO ('2026-02-01Z');
         CREATE TABLE meter_readings_rest PARTITION OF meter_readings DEFAULT;",
    )
    .unwrap();
    s.migrate();
    let mut l = s.local();
    // A day and a half of readings, one a minute, across two partitions.
    l.execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
         SELECT 'meter-' || (g % 5), timestamptz '2026-01-01Z' + make_interval(mins => g), g, 'kWh'
         FROM generate_series(0, 2159) g",
        &[],
    )
    .unwrap();
    let before = rows(&mut l, "");
    s.run(&["once"]);
    assert_eq!(rows(&mut c, ""), before);
    assert_eq!(s.local_count("meter_readings"), 0);
    let per_partition = per_partition(&mut c);
    assert_eq!(
        per_partition,
        [
            ("meter_readings_2026_01".to_string(), 1440),
            ("meter_readings_2026_01_02".to_string(), 720)
        ]
    );
    // Re-sent readings are recognised through the partitioned unique key as well.
    let mut again = s.local();
    for (uid, r) in before.iter().take(50) {
        again
            .execute(
                "INSERT INTO meter_readings (reading_uid, meter_id, \"timestamp\", value, unit, created_at)
                 VALUES ($1::text::uuid, $2, $3::text::timestamptz, $4::text::numeric, $5, $6::text::timestamptz)",
                &[uid, &r[0], &r[1], &r[2], &r[3], &r[5]],
            )
            .unwrap();
    }
    s.run(&["once"]);
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(s.central_count("meter_readings"), 2160);
    assert_eq!(s.local_count("meter_readings"), 0);
}

#[test]
fn requeue_of_nothing_releases_nothing() {
    let s = Sandbox::new();
    let rq = s.run(&["requeue", "--all"]);
    rq.assert_ok();
    assert!(rq.stdout.contains("requeued 0"), "{}", rq.all());
}

/// Pipelining: over a link with a 200 ms round trip, 20 batches one after another
/// cannot take less than 4 s; with 8 in flight they take a fraction of that.
#[test]
fn pipelined_batches_share_round_trips() {
    let _heavy = support::heavy_lock();
    let mut took = Vec::new();
    for depth in [1, 8] {
        let mut s = Sandbox::new();
        let central = std::net::SocketAddr::from(([127, 0, 0, 1], s.central_cluster().port));
        let proxy = support::proxy::Proxy::start(central);
        proxy.delay(std::time::Duration::from_millis(100));
        s.set("POSTGRES_CLIENT_PORT", proxy.port())
            .set("BATCH_SIZE", 100)
            .set("UPLOAD_PIPELINE_DEPTH", depth);
        s.insert_readings(2000);
        s.run(&["once"]);
        assert_eq!(s.local_count("meter_readings"), 0);
        assert_eq!(s.central_count("meter_readings"), 2000);
        let ms: i64 = s
            .local()
            .query_one(
                "SELECT duration_ms FROM sync_logs WHERE sync_type = 'upload'",
                &[],
            )
            .unwrap()
            .get(0);
        took.push(ms);
    }
    eprintln!(
        "20 batches over a 200 ms round trip: depth 1 {} ms, depth 8 {} ms",
        took[0], took[1]
    );
    assert!(took[0] >= 4000, "the delay did not apply: {took:?}");
    assert!(took[1] * 2 < took[0], "pipelining saved nothing: {took:?}");
}

/// `n` readings queued on the sandbox's gateway, of which those matching `poison`
/// (a condition on the local row) carry a value that central, given a new
/// `CHECK (value >= 0)`, refuses. Returns the local connection.
fn poisoned(s: &Sandbox, n: usize, poison: &str) -> Client {
    let mut l = s.local();
    support::insert_readings(&mut l, n, 0);
    l.batch_execute(&format!(
        "UPDATE meter_readings SET value = -1 WHERE {poison}"
    ))
    .unwrap();
    s.central()
        .batch_execute("ALTER TABLE meter_readings ADD CONSTRAINT non_negative CHECK (value >= 0)")
        .unwrap();
    l
}

/// Quarantined readings (id order) and their sync_error.
fn quarantined(c: &mut Client) -> Vec<(i64, String)> {
    c.query(
        "SELECT id, sync_error FROM meter_readings WHERE sync_error IS NOT NULL ORDER BY id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Statements sent to take refused batches apart in a run, from the daemon's
/// "took a batch of N apart in S statement(s)" lines.
fn slice_statements(stderr: &str) -> usize {
    stderr
        .split(" apart in ")
        .skip(1)
        .map(|rest| rest.split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum()
}

/// Central's table partitioned by month with last month's partition only, migrated.
fn central_without_this_months_partition(s: &Sandbox) -> Client {
    let mut c = s.central();
    c.batch_execute(PARTITIONED_READINGS).unwrap();
    c.batch_execute(
        "DO $$ BEGIN
             EXECUTE format('CREATE TABLE meter_readings_last PARTITION OF meter_readings
                             FOR VALUES FROM (%L) TO (%L)',
                            date_trunc('month', now()) - interval '1 month',
                            date_trunc('month', now()));
         END $$;",
    )
    .unwrap();
    s.migrate();
    c
}

/// What the operator does to mend [`central_without_this_months_partition`].
fn add_this_months_partition(c: &mut Client) {
    c.batch_execute(
        "DO $$ BEGIN
             EXECUTE format('CREATE TABLE meter_readings_this PARTITION OF meter_readings
                             FOR VALUES FROM (%L) TO (%L)',
                            date_trunc('month', now()), date_trunc('month', now()) + interval '1 month');
         END $$;",
    )
    .unwrap();
}

/// After `run` against [`central_without_this_months_partition`]: the phase failed
/// for 23514 with nothing quarantined, `arrived` readings are in central and
/// exactly the `queued` of this month wait locally.
fn assert_held_for_this_month(
    s: &Sandbox,
    run: &support::Run,
    l: &mut Client,
    arrived: i64,
    queued: i64,
) {
    let (ok, _, err) = last_upload_log(s);
    let err = err.unwrap_or_default();
    assert!(!ok, "{}", run.stderr);
    assert!(
        err.contains("23514") && err.contains("nothing quarantined"),
        "{err}\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("23514"), "{}", run.stderr);
    assert_eq!(quarantined(l), [], "{}", run.stderr);
    assert_eq!(s.central_count("meter_readings"), arrived);
    assert_eq!(
        s.local_count(
            "meter_readings WHERE sync_error IS NULL AND \"timestamp\" >= date_trunc('month', now())"
        ),
        queued,
        "this month's readings stay queued"
    );
    assert_eq!(s.local_count("meter_readings"), queued);
}

/// P24: central's table is partitioned by month and has no partition for this one.
/// The readings of last month go in, this month's stay queued, none is quarantined,
/// and the phase fails saying why: also across the batch that holds the boundary.
#[test]
fn p24_no_partition_for_this_month_quarantines_nothing() {
    let s = Sandbox::empty();
    let mut c = central_without_this_months_partition(&s);
    let mut l = s.local();
    // 150 readings of the last day of last month, then 450 of this month: the
    // second batch of 100 holds the boundary.
    l.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             SELECT 'meter-' || (g % 7), date_trunc('month', now()) - make_interval(secs => 151 - g), g, 'kWh'
             FROM generate_series(1, 150) g;
         INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             SELECT 'meter-' || (g % 7), date_trunc('month', now()) + make_interval(secs => g), g, 'kWh'
             FROM generate_series(0, 449) g;",
    )
    .unwrap();

    let run = s.run(&["once"]);
    assert_held_for_this_month(&s, &run, &mut l, 150, 450);

    // The next cycle costs a few dozen statements, not one per reading.
    let run = s.run(&["once"]);
    assert!(!last_upload_log(&s).0);
    let n = slice_statements(&run.stderr);
    eprintln!(
        "450 readings of a month without a partition: {n} statements to find it is central's fault"
    );
    assert!((16..=60).contains(&n), "{n} statements:\n{}", run.stderr);
    assert_eq!(quarantined(&mut l), []);

    // The operator adds the partition: everything arrives, exactly once.
    add_this_months_partition(&mut c);
    s.run(&["once"]).assert_ok();
    assert_eq!(s.central_count("meter_readings"), 600);
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// P24 when the collector writes each meter's readings as a block: 30 readings of
/// meter-a on the last day of last month, then 100 of meter-a this month, then 100
/// of meter-b this month 30 s after meter-a's. In queue order (timestamp, id) this
/// month's readings alternate between the two blocks of ids (31, 131, 32, 132, …),
/// so no two refused readings have consecutive ids. Central has no partition for
/// this month: last month's readings arrive, none is quarantined, this month's stay
/// queued and the phase fails saying why. (Found in review: 100 were quarantined.)
#[test]
fn p24_no_partition_with_interleaved_ids_quarantines_nothing() {
    let mut s = Sandbox::empty();
    s.set("BATCH_SIZE", 100);
    let mut c = central_without_this_months_partition(&s);
    let mut l = s.local();
    l.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             SELECT 'meter-a', date_trunc('month', now()) - make_interval(secs => 60 * (31 - g)), g, 'kWh'
             FROM generate_series(1, 30) g ORDER BY g;
         INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             SELECT 'meter-a', date_trunc('month', now()) + make_interval(secs => 60 * g), g, 'kWh'
             FROM generate_series(0, 99) g ORDER BY g;
         INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
             SELECT 'meter-b', date_trunc('month', now()) + make_interval(secs => 60 * g + 30), g, 'kWh'
             FROM generate_series(0, 99) g ORDER BY g;",
    )
    .unwrap();
    // The premise: this month's readings interleave two blocks of ids.
    let ids: Vec<i64> = l
        .query(
            "SELECT id FROM meter_readings WHERE \"timestamp\" >= date_trunc('month', now())
             ORDER BY \"timestamp\", id LIMIT 4",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [31, 131, 32, 132]);

    let run = s.run(&["once"]);
    assert_held_for_this_month(&s, &run, &mut l, 30, 200);
    assert!(
        run.stderr.contains("nothing quarantined") && run.stderr.contains("0 quarantined"),
        "{}",
        run.stderr
    );

    // The operator adds the partition: everything arrives, exactly once.
    add_this_months_partition(&mut c);
    s.run(&["once"]).assert_ok();
    assert_eq!(s.central_count("meter_readings"), 230);
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// P24: a NOT NULL column added centrally refuses every reading alike (23502).
#[test]
fn p24_a_new_not_null_column_centrally_quarantines_nothing() {
    let s = Sandbox::new();
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, 500, 0);
    c.batch_execute("ALTER TABLE meter_readings ADD COLUMN site text NOT NULL")
        .unwrap();

    let run = s.run(&["once"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let (ok, _, err) = last_upload_log(&s);
    let err = err.unwrap_or_default();
    assert!(!ok);
    assert!(err.contains("23502") && err.contains("site"), "{err}");
    assert!(run.stderr.contains("nothing quarantined"), "{}", run.stderr);
    assert_eq!(quarantined(&mut l), []);
    assert_eq!(s.local_count("meter_readings"), 500);
    assert_eq!(s.central_count("meter_readings"), 0);

    c.batch_execute("ALTER TABLE meter_readings DROP COLUMN site")
        .unwrap();
    s.run(&["once"]).assert_ok();
    assert_eq!(s.central_count("meter_readings"), 500);
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// P7 still holds inside P24's rules: one poison reading among good ones, in a
/// batch of the default size, is quarantined alone.
#[test]
fn p24_one_poison_reading_among_good_ones_is_quarantined_alone() {
    let s = Sandbox::new();
    let mut l = poisoned(&s, 300, "id = 137");

    let run = s.run(&["once"]);
    run.assert_ok();
    let q = quarantined(&mut l);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].0, 137);
    assert!(q[0].1.contains("non_negative"), "{}", q[0].1);
    assert_eq!(s.central_count("meter_readings"), 299);
    assert_eq!(s.local_count("meter_readings"), 1);
    assert!(run.stderr.contains("1 quarantined"), "{}", run.stderr);
}

/// A central role for a gateway, allowed to insert readings of any meter but
/// `forbidden` (row-level security), with or without the INSERT privilege.
fn gateway_role(c: &mut Client, role: &str, forbidden: &str, insert: bool) {
    c.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{pw}';
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
         ALTER TABLE meter_readings ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_meters ON meter_readings FOR INSERT TO {role}
             WITH CHECK (meter_id <> '{forbidden}');
         CREATE POLICY read_all ON meter_readings FOR SELECT TO {role} USING (true);",
        pw = support::CENTRAL_PASSWORD
    ))
    .unwrap();
    if insert {
        c.batch_execute(&format!("GRANT INSERT ON meter_readings TO {role}"))
            .unwrap();
    }
}

/// P24 and row-level security: a meter reassigned centrally to another gateway
/// while this one still has readings of it queued. Central refuses just those rows
/// (42501, "new row violates row-level security policy"): they are quarantined,
/// the rest arrive.
#[test]
fn p24_row_level_security_refusals_quarantine_just_those_rows() {
    let mut s = Sandbox::new();
    let mut l = s.local();
    let mut c = s.central();
    let role = format!("gw_rls_{}", s.central_db);
    gateway_role(&mut c, &role, "meter-moved", true);
    s.set("POSTGRES_CLIENT_USER", &role);
    support::insert_readings(&mut l, 600, 0);
    // Every tenth reading is of the reassigned meter.
    l.batch_execute("UPDATE meter_readings SET meter_id = 'meter-moved' WHERE id % 10 = 3")
        .unwrap();

    let run = s.run(&["once"]);
    let (ok, records, err) = last_upload_log(&s);
    assert!(ok, "{err:?}\n{}", run.stderr);
    assert_eq!(records, 540);
    assert_eq!(s.central_count("meter_readings"), 540);
    assert_eq!(
        s.central_count("meter_readings WHERE meter_id = 'meter-moved'"),
        0
    );
    let q = quarantined(&mut l);
    assert_eq!(q.len(), 60);
    assert!(q.iter().all(|(id, _)| id % 10 == 3), "{q:?}");
    assert!(
        q.iter()
            .all(|(_, e)| e.contains("row-level security") && e.contains("42501")),
        "{q:?}"
    );
    assert_eq!(s.local_count("meter_readings"), 60);
}

/// P24: a gateway role without the INSERT privilege is refused every reading with
/// the same 42501: the phase fails, nothing is quarantined.
#[test]
fn p24_a_missing_insert_privilege_fails_the_phase_and_quarantines_nothing() {
    let mut s = Sandbox::new();
    let mut l = s.local();
    let mut c = s.central();
    let role = format!("gw_noins_{}", s.central_db);
    gateway_role(&mut c, &role, "meter-moved", false);
    s.set("POSTGRES_CLIENT_USER", &role);
    support::insert_readings(&mut l, 300, 0);

    let run = s.run(&["once"]);
    let (ok, _, err) = last_upload_log(&s);
    let err = err.unwrap_or_default();
    assert!(!ok, "{}", run.stderr);
    assert!(
        err.contains("42501") && err.contains("permission denied"),
        "{err}"
    );
    assert_eq!(quarantined(&mut l), []);
    assert_eq!(s.local_count("meter_readings"), 300);
    assert_eq!(s.central_count("meter_readings"), 0);

    c.batch_execute(&format!("GRANT INSERT ON meter_readings TO {role}"))
        .unwrap();
    s.run(&["once"]);
    assert!(last_upload_log(&s).0);
    assert_eq!(s.central_count("meter_readings"), 300);
}

/// P24: a reading alone in the queue that central refuses, with nothing else
/// accepted, is no evidence against the reading: it stays queued. Once other
/// readings go through beside it, it is quarantined.
#[test]
fn p24_a_lone_refused_reading_waits_for_evidence() {
    let s = Sandbox::new();
    let mut l = poisoned(&s, 1, "true");
    s.run(&["once"]);
    let (ok, _, err) = last_upload_log(&s);
    assert!(!ok);
    assert!(err.unwrap().contains("no evidence"));
    assert_eq!(quarantined(&mut l), []);

    support::insert_readings(&mut l, 20, 100);
    s.run(&["once"]).assert_ok();
    assert_eq!(quarantined(&mut l).len(), 1);
    assert_eq!(s.central_count("meter_readings"), 20);
}

/// P24: the cap on quarantines per cycle. 110 readings refused one by one (every
/// tenth) are quarantined 100 in the first cycle, which fails saying so, and the
/// rest in the next; the good readings all arrive in the first.
#[test]
fn p24_quarantines_per_cycle_are_capped() {
    let s = Sandbox::new();
    let mut l = poisoned(&s, 1100, "id % 10 = 0");
    let run = s.run(&["once"]);
    let (ok, _, err) = last_upload_log(&s);
    assert!(!ok, "{}", run.stderr);
    assert!(err.unwrap().contains("cap"));
    assert_eq!(quarantined(&mut l).len(), 100);
    assert_eq!(s.central_count("meter_readings"), 990);
    // The ten left are all the queue holds: with nothing accepted beside them,
    // there is no evidence against them (they might as well be central's fault).
    s.run(&["once"]);
    let (ok, _, err) = last_upload_log(&s);
    assert!(!ok && err.unwrap().contains("no evidence"));
    assert_eq!(quarantined(&mut l).len(), 100);
    // The collector writes on; beside readings that go through, they are judged.
    support::insert_readings(&mut l, 50, 5000);
    s.run(&["once"]).assert_ok();
    assert_eq!(quarantined(&mut l).len(), 110);
    assert_eq!(s.local_count("meter_readings"), 110);
    assert_eq!(s.central_count("meter_readings"), 1040);
}

/// P24: poison readings left over past the cap stand in a row at the head of the
/// next cycle's queue, whole batches of them refused alike, like central refusing
/// everything. The newest readings, which central takes, tell them apart: they are
/// quarantined (up to the cap), not held as central's fault, and the queue behind
/// them moves. (What consecutive ids used to protect.)
#[test]
fn p24_leftovers_past_the_cap_are_not_taken_for_centrals_fault() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 50);
    let mut l = poisoned(&s, 2000, "id % 10 = 0");
    let run = s.run(&["once"]);
    assert!(!last_upload_log(&s).0, "{}", run.stderr);
    assert_eq!(quarantined(&mut l).len(), 100);
    assert_eq!(s.central_count("meter_readings"), 1800);

    support::insert_readings(&mut l, 50, 5000);
    let run = s.run(&["once"]);
    run.assert_ok();
    assert!(!run.stderr.contains("central's"), "{}", run.stderr);
    assert_eq!(quarantined(&mut l).len(), 200, "{}", run.stderr);
    assert_eq!(s.central_count("meter_readings"), 1850);
    assert_eq!(s.local_count("meter_readings"), 200);
}

/// P7 with many poison readings: a broken meter among five (every fifth reading
/// refused) is not mistaken for central's fault.
#[test]
fn p24_a_broken_meter_among_five_is_quarantined_and_the_rest_arrive() {
    let s = Sandbox::new();
    let mut l = poisoned(&s, 200, "id % 5 = 0");
    let run = s.run(&["once"]);
    run.assert_ok();
    let q = quarantined(&mut l);
    assert_eq!(q.len(), 40);
    assert!(q.iter().all(|(id, _)| id % 5 == 0));
    assert_eq!(s.central_count("meter_readings"), 160);
}

/// P25: a legacy local table whose `unit` is nullable, with a NULL in one reading.
/// Reading it must not panic (the release build aborts on a panic, in every cycle):
/// the reading is quarantined with a clear sync_error and the rest arrive.
#[test]
fn p25_a_null_in_a_legacy_nullable_column_is_quarantined_not_a_crash() {
    let s = Sandbox::new();
    let mut l = s.local();
    support::insert_readings(&mut l, 100, 0);
    l.batch_execute(
        "ALTER TABLE meter_readings ALTER COLUMN unit DROP NOT NULL;
         UPDATE meter_readings SET unit = NULL WHERE id = 42;",
    )
    .unwrap();
    let run = s.run(&["once"]);
    run.assert_ok();
    assert_eq!(last_upload_log(&s), (true, 99, None));
    let q = quarantined(&mut l);
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].0, 42);
    assert!(
        q[0].1.contains("reading id 42") && q[0].1.contains("unit is NULL"),
        "{}",
        q[0].1
    );
    assert_eq!(s.central_count("meter_readings"), 99);
    assert!(run.stderr.contains("1 quarantined"), "{}", run.stderr);
}

/// P25: a SQL_ASCII local database (no encoding checks on the way in) holding the
/// Latin-1 byte of "m³" in one unit. The server refuses to send that row to a
/// UTF-8 client (SQLSTATE 22021) and so fails the whole SELECT of its batch: the
/// row is found among the others, quarantined, and the other 99 arrive.
#[test]
fn p25_invalid_utf8_in_a_sql_ascii_database_is_isolated_and_quarantined() {
    let (local, central) = support::shared();
    let name = format!("ascii_{}", std::process::id());
    local
        .admin()
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ))
        .unwrap();
    central.create_db(&name);
    let s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    let mut l = s.local();
    support::insert_readings(&mut l, 100, 0);
    l.batch_execute(
        "UPDATE meter_readings SET unit = convert_from('\\x6db3'::bytea, 'SQL_ASCII') WHERE id = 57",
    )
    .unwrap();
    let run = s.run(&["once"]);
    run.assert_ok();
    assert_eq!(last_upload_log(&s), (true, 99, None), "{}", run.stderr);
    let q = quarantined(&mut l);
    assert_eq!(q.len(), 1, "{}", run.stderr);
    assert_eq!(q[0].0, 57);
    assert!(
        q[0].1.contains("reading id 57 cannot be read") && q[0].1.contains("22021"),
        "{}",
        q[0].1
    );
    assert_eq!(s.central_count("meter_readings"), 99);
    assert_eq!(s.local_count("meter_readings"), 1);
}

/// The resend window (SPEC §8, UPLOAD_RETAIN_HOURS): uploaded readings are kept,
/// marked, after the central commit; central is restored from a backup older than
/// the last upload and has lost those readings; `resend --since` queues the
/// retained ones again and each arrives exactly once, as written.
#[test]
fn resend_brings_back_what_a_restored_central_lost_each_exactly_once() {
    let mut s = Sandbox::new();
    s.set("UPLOAD_RETAIN_HOURS", 24);
    let mut l = s.local();
    let mut c = s.central();
    let t0: String = l.query_one("SELECT now()::text", &[]).unwrap().get(0);
    support::insert_readings(&mut l, 100, 0);
    s.run(&["once"]).assert_ok();
    // The backup is taken here; then 200 more readings are uploaded.
    let backup: String = l
        .query_one("SELECT clock_timestamp()::text", &[])
        .unwrap()
        .get(0);
    support::insert_readings(&mut l, 200, 1000);
    let written = rows(&mut l, "");
    s.run(&["once"]).assert_ok();
    assert_eq!(s.central_count("meter_readings"), 300);
    assert_eq!(
        s.local_count("meter_readings WHERE is_synchronized AND synced_at IS NOT NULL"),
        300,
        "uploaded readings are retained, not deleted"
    );
    assert_eq!(s.local_count("meter_readings WHERE NOT is_synchronized"), 0);

    // Central comes back from the backup: the last 200 are gone.
    c.execute(
        "DELETE FROM meter_readings WHERE \"timestamp\" > timestamptz '2026-01-01 00:00:00+00' + interval '900 seconds'",
        &[],
    )
    .unwrap();
    assert_eq!(s.central_count("meter_readings"), 100);

    let since = chrono_like(&backup);
    let rs = s.run(&["resend", "--since", &since]);
    rs.assert_ok();
    assert!(rs.stdout.contains("queued 200 retained"), "{}", rs.all());
    s.run(&["once"]).assert_ok();
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(rows(&mut c, ""), written, "every reading back, as written");

    // Resending everything since before the first upload is harmless.
    let rs = s.run(&["resend", "--since", &chrono_like(&t0)]);
    assert!(rs.stdout.contains("queued 300 retained"), "{}", rs.all());
    let run = s.run(&["once"]);
    run.assert_ok();
    assert!(
        run.stderr.contains("300 were already in central"),
        "{}",
        run.stderr
    );
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(s.central_count("meter_readings"), 300);
}

/// PostgreSQL's `now()::text` ("2026-12-01 09:30:00.123456+00") in the form an
/// operator would type (RFC 3339).
fn chrono_like(pg: &str) -> String {
    format!("{}:00", pg.replacen(' ', "T", 1))
}

/// Retained readings are purged once their window (counted from the upload) is
/// over; with the window back at 0 whatever was retained goes. Readings marked
/// synchronized by something else (no synced_at) are left alone.
#[test]
fn retained_readings_are_purged_after_the_window() {
    let mut s = Sandbox::new();
    s.set("UPLOAD_RETAIN_HOURS", 2);
    let mut l = s.local();
    support::insert_readings(&mut l, 50, 0);
    l.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, is_synchronized)
         VALUES ('legacy', '2020-01-01Z', 1, 'kWh', true)",
    )
    .unwrap();
    s.run(&["once"]).assert_ok();
    assert_eq!(s.local_count("meter_readings"), 51);
    // Twenty of them were uploaded three hours ago.
    l.batch_execute(
        "UPDATE meter_readings SET synced_at = now() - interval '3 hours'
         WHERE id IN (SELECT id FROM meter_readings WHERE synced_at IS NOT NULL ORDER BY id LIMIT 20)",
    )
    .unwrap();
    let run = s.run(&["once"]);
    run.assert_ok();
    assert!(run.stderr.contains("purged 20 retained"), "{}", run.stderr);
    assert_eq!(s.local_count("meter_readings"), 31);

    s.unset("UPLOAD_RETAIN_HOURS");
    support::insert_readings(&mut l, 10, 500);
    s.run(&["once"]).assert_ok();
    let left: Vec<String> = l
        .query("SELECT meter_id::text FROM meter_readings", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["legacy"]);
    assert_eq!(s.central_count("meter_readings"), 60);
}

/// Readings uploaded while the gateway's clock ran ahead (no battery-backed clock,
/// set back by NTP later) have `synced_at` in the future. The purge waited for the
/// clock to catch up with them: three years of retention for a window of hours, and
/// not even `UPLOAD_RETAIN_HOURS=0`, which purges whatever was retained, removed
/// them. Such a reading's window now starts when the purge first finds it in the
/// future: it is kept the whole window (a central restored from a backup may still
/// need it), then purged.
#[test]
fn retained_readings_marked_while_the_clock_ran_ahead_are_purged_after_the_window() {
    let mut s = Sandbox::new();
    s.set("UPLOAD_RETAIN_HOURS", 2);
    let mut l = s.local();
    support::insert_readings(&mut l, 30, 0);
    s.run(&["once"]).assert_ok();
    // Twenty were uploaded while the clock was three years ahead.
    let ahead = "UPDATE meter_readings SET synced_at = now() + interval '3 years'
                 WHERE id IN (SELECT id FROM meter_readings WHERE synced_at IS NOT NULL
                              ORDER BY id LIMIT 20)";
    l.batch_execute(ahead).unwrap();
    s.run(&["once"]).assert_ok();
    assert_eq!(
        s.local_count("meter_readings"),
        30,
        "kept within the window"
    );
    // Three hours later every one of them is past its window.
    l.batch_execute("UPDATE meter_readings SET synced_at = synced_at - interval '3 hours'")
        .unwrap();
    let run = s.run(&["once"]);
    run.assert_ok();
    assert!(run.stderr.contains("purged 30 retained"), "{}", run.stderr);
    assert_eq!(s.local_count("meter_readings"), 0);

    // With the window switched off, whatever was retained goes at once.
    support::insert_readings(&mut l, 10, 100);
    s.run(&["once"]).assert_ok();
    l.batch_execute(ahead).unwrap();
    s.unset("UPLOAD_RETAIN_HOURS");
    let run = s.run(&["once"]);
    run.assert_ok();
    assert!(run.stderr.contains("purged 10 retained"), "{}", run.stderr);
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(s.central_count("meter_readings"), 40);
}

/// `resend`: a bad timestamp is a usage error (64) in one line naming it; an
/// unreachable local database exits 1.
#[test]
fn resend_refuses_a_bad_timestamp_and_reports_an_unreachable_local() {
    let mut s = Sandbox::new();
    let r = s.run(&["resend", "--since", "2026-02-30"]);
    r.assert_code(64);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("2026-02-30"), "{}", r.stderr);
    s.run(&["resend"]).assert_code(64);
    // There is no year 0000 (PostgreSQL refused it, exit 1, after connecting).
    s.run(&["resend", "--since", "0000-01-01"]).assert_code(64);
    s.set("POSTGRES_SYNC_PORT", support::free_port())
        .set("MAX_CONNECTION_RETRIES", 1);
    s.run(&["resend", "--since", "2026-11-30T00:00:00Z"])
        .assert_code(1);
}

/// P15 while a refused batch is taken apart (P24): every round of slices is a round
/// trip, and over a slow uplink a batch with poison readings spread through it takes
/// many, longer than the watchdog's interval all told. The daemon must keep feeding
/// the watchdog meanwhile (at least every half of WATCHDOG_USEC), or systemd would
/// kill it in the middle of every such cycle. Two things feed it there: the wait for
/// each central round trip (`Pipeline::timed`) and each round of slices
/// (`take_apart`); either alone suffices at this round trip, with neither the
/// watchdog is silent for the whole isolation (8 s when tried).
#[test]
fn the_watchdog_is_fed_while_a_refused_batch_is_taken_apart() {
    let _heavy = support::heavy_lock();
    let mut s = Sandbox::new();
    let target = format!("127.0.0.1:{}", s.central_cluster().port);
    let proxy = support::proxy::Proxy::start(target.parse().unwrap());
    proxy.delay(std::time::Duration::from_millis(150));
    let n = support::notify::Notifications::bind(&s.dir);
    let watchdog = std::time::Duration::from_secs(2);
    s.set("POSTGRES_CLIENT_PORT", proxy.port())
        .set("NOTIFY_SOCKET", n.path.display())
        .set("WATCHDOG_USEC", watchdog.as_micros())
        .set("BATCH_SIZE", 1000)
        .set("DB_QUERY_TIMEOUT_MS", 30_000);
    // Twelve poison readings, each in a slice of its own at the first split (83 is
    // more than 1000/16): 1 + 12 + 12 rounds of slices, 25 round trips of 300 ms.
    poisoned(&s, 1000, "id % 83 = 0");

    let d = s.spawn(&["run"]);
    assert!(
        support::wait_until(std::time::Duration::from_secs(120), || d
            .log_text()
            .contains("cycle finished:")),
        "the first cycle never finished:\n{}",
        d.log_text()
    );
    let end = std::time::Instant::now();
    let log = d.log_text();
    let ready = n.first("READY=1").expect("READY=1 was sent");
    let gap = n.max_watchdog_gap(ready, end);
    let took = end - ready;
    eprintln!("cycle of {took:?} over a 300 ms round trip; longest watchdog silence {gap:?}");
    assert!(
        log.contains("took a batch of 1000 apart in")
            && log.contains("988 delivered, 12 refused alone"),
        "{log}"
    );
    assert_eq!(s.central_count("meter_readings"), 988);
    assert!(
        took > 2 * watchdog,
        "the isolation was not long enough to prove anything: {took:?}"
    );
    assert!(
        gap <= watchdog / 2,
        "watchdog silent for {gap:?} while a batch was taken apart, more than half of WATCHDOG_USEC ({watchdog:?}):\n{log}"
    );
}

/// A legacy local table whose `id` is `integer`: the keyset bound and `requeue`'s
/// ids are bound as 64-bit and cast on the server. Without the cast the second
/// batch's SELECT failed in the client ("cannot convert between the Rust type i64
/// and the Postgres type int4") and each cycle moved one batch.
#[test]
fn a_legacy_integer_id_drains_in_one_cycle_and_requeues() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 100);
    let mut l = s.local();
    l.batch_execute("ALTER TABLE meter_readings ALTER COLUMN id TYPE integer")
        .unwrap();
    support::insert_readings(&mut l, 250, 0);
    let run = s.run(&["once"]);
    run.assert_ok();
    assert_eq!(s.central_count("meter_readings"), 250, "{}", run.stderr);
    assert_eq!(s.local_count("meter_readings"), 0);

    support::insert_readings(&mut l, 3, 500);
    let id: i32 = l
        .query_one("UPDATE meter_readings SET sync_error = 'test' WHERE id = (SELECT min(id) FROM meter_readings) RETURNING id", &[])
        .unwrap()
        .get(0);
    let rq = s.run(&["requeue", &id.to_string(), &id.to_string()]);
    rq.assert_ok();
    assert!(!rq.all().contains("not quarantined"), "{}", rq.all());
    assert_eq!(s.local_count("meter_readings WHERE sync_error IS NULL"), 3);
}

/// The purge of the resend window must not delete a reading that `resend` queues
/// again while the purge waits for its row lock: PostgreSQL re-checks only the
/// outer DELETE's condition against the new row version, and the purge's condition
/// was all in its subquery. Planted back (the outer condition removed), the five
/// readings are gone and this fails.
#[test]
fn the_purge_never_deletes_what_resend_has_just_queued_again() {
    let mut s = Sandbox::new();
    s.set("UPLOAD_RETAIN_HOURS", 1);
    let mut l = s.local();
    support::insert_readings(&mut l, 20, 0);
    s.run(&["once"]).assert_ok();
    l.batch_execute("UPDATE meter_readings SET synced_at = now() - interval '3 hours'")
        .unwrap();
    // resend's own statement, held open on five of them.
    let mut r = s.local();
    let mut tx = r.transaction().unwrap();
    tx.batch_execute(
        "UPDATE meter_readings SET is_synchronized = false, synced_at = NULL
         WHERE id IN (SELECT id FROM meter_readings ORDER BY id LIMIT 5)",
    )
    .unwrap();
    let mut d = s.spawn(&["once"]);
    let mut probe = s.local();
    let purge_waits = support::wait_until(Duration::from_secs(30), || {
        probe
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM meter_readings%'",
                &[],
            )
            .unwrap()
            .get(0)
    });
    assert!(purge_waits, "the purge never waited: {}", d.log_text());
    tx.commit().unwrap();
    assert_eq!(
        d.wait_exit(Duration::from_secs(60)),
        Some(Some(0)),
        "{}",
        d.log_text()
    );
    assert_eq!(
        s.local_count("meter_readings"),
        5,
        "the five queued again must stay: {}",
        d.log_text()
    );
    assert_eq!(s.central_count("meter_readings"), 20);
}

/// `resend` of a large window queues it in batches, each its own short transaction
/// committed at once, rather than in one UPDATE of every retained reading: a day's
/// readings on a busy gateway (a million rows took 22 s here) ran into the local
/// statement timeout, and `resend` failed with nothing queued. Here one retained
/// reading, the newest, is locked by someone else: the batches before it are
/// queued and visible while `resend` waits for it (one UPDATE had queued none).
/// A reading marked while the gateway's clock was ahead is queued as well (the
/// batches leave out only what was marked after the resend started).
#[test]
fn resend_queues_a_large_window_in_short_transactions() {
    let mut s = Sandbox::new();
    s.set("UPLOAD_RETAIN_HOURS", 24);
    let mut l = s.local();
    l.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, is_synchronized, synced_at)
         SELECT 'meter-' || (g % 50), timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second',
                g, 'kWh', true, now() - interval '1 hour' + g * interval '1 millisecond'
         FROM generate_series(1, 12000) g;
         -- Uploaded while the gateway's clock was a year ahead.
         INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, is_synchronized, synced_at)
         VALUES ('ahead', '2026-01-01 00:00:00+00', 1, 'kWh', true, now() + interval '1 year');",
    )
    .unwrap();
    let mut other = s.local();
    let mut tx = other.transaction().unwrap();
    tx.batch_execute(
        "SELECT 1 FROM meter_readings WHERE id = (SELECT max(id) FROM meter_readings WHERE meter_id <> 'ahead') FOR UPDATE",
    )
    .unwrap();
    let mut d = s.spawn(&["resend", "--since", "2026-01-01"]);
    let mut probe = s.local();
    let waits = support::wait_until(Duration::from_secs(30), || {
        probe
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE meter_readings%'
                   AND application_name LIKE 'meter-sync%' AND datname = current_database()",
                &[],
            )
            .unwrap()
            .get(0)
    });
    assert!(
        waits,
        "resend never waited for the locked reading: {}",
        d.log_text()
    );
    let queued = s.local_count("meter_readings WHERE NOT is_synchronized");
    assert!(
        queued >= 10_000,
        "while resend waits for the last reading, only {queued} of the 12000 are queued: \
         one transaction for the whole window"
    );
    tx.commit().unwrap();
    assert_eq!(
        d.wait_exit(Duration::from_secs(60)),
        Some(Some(0)),
        "{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("12001 retained reading(s)"),
        "{}",
        d.log_text()
    );
    assert_eq!(
        s.local_count("meter_readings WHERE NOT is_synchronized"),
        12_001
    );
    assert_eq!(
        s.local_count("meter_readings WHERE synced_at IS NOT NULL"),
        0
    );
}

/// A central `meter_readings` an operator created by hand without the unique key
/// (reading_uid, "timestamp"): COPY never needs it, so a batch sent twice (resend,
/// or a crash between central's commit and the local delete) was stored twice,
/// silently. The upload now fails with the readings queued and says why; with the
/// key added it drains, each reading once.
#[test]
fn a_central_table_without_the_unique_key_holds_the_upload() {
    let s = Sandbox::new();
    let mut c = s.central();
    c.batch_execute(
        "ALTER TABLE meter_readings DROP CONSTRAINT meter_readings_reading_uid_timestamp_key",
    )
    .unwrap();
    let mut l = s.local();
    support::insert_readings(&mut l, 30, 0);
    let run = s.run(&["once"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("no unique key on (reading_uid"),
        "{}",
        run.stderr
    );
    assert_eq!(s.central_count("meter_readings"), 0);
    assert_eq!(s.local_count("meter_readings WHERE sync_error IS NULL"), 30);
    c.batch_execute(
        "ALTER TABLE meter_readings ADD CONSTRAINT meter_readings_reading_uid_timestamp_key
         UNIQUE (reading_uid, \"timestamp\")",
    )
    .unwrap();
    s.run(&["once"]).assert_ok();
    assert_eq!(s.central_count("meter_readings"), 30);
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// The daemon `d` meets the local refusal `sqlstate` after central committed, then
/// three more cycles upload the same readings again: central holds some of the `n`
/// queued readings, none twice, and the daemon still runs. How many batches went
/// up before the first refused delete depends on timing (the drain's local round
/// trips go one at a time and it stops at the first error). Returns the log.
fn refused_locally_for_three_cycles(
    s: &Sandbox,
    d: &mut support::Daemon,
    sqlstate: &str,
    n: i64,
) -> String {
    d.wait_log(sqlstate, Duration::from_secs(30));
    let cycles = |d: &support::Daemon| d.log_text().matches("cycle finished").count();
    let now = cycles(d);
    assert!(
        support::wait_until(Duration::from_secs(30), || cycles(d) >= now + 3),
        "{}",
        d.log_text()
    );
    assert_eq!(central_duplicates(&mut s.central()), 0);
    let central = s.central_count("meter_readings");
    assert!(
        central > 0 && central <= n,
        "{central} of {n}: {}",
        d.log_text()
    );
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
    d.log_text()
}

/// The local disk fills (or a write is otherwise refused locally) just when a
/// batch has committed centrally: the local DELETE fails (here a trigger raises
/// 53100 disk_full, as PostgreSQL does when it cannot extend a file). Nothing is
/// lost, nothing quarantined, the daemon runs on and says why, and the cycles
/// that upload the same readings again while the disk stays full make no second
/// central row; once local can write again the queue empties, still once each.
#[test]
fn a_local_delete_refused_after_the_central_commit_loses_and_duplicates_nothing() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 10);
    let mut l = s.local();
    l.batch_execute(
        "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'
               USING ERRCODE = 'disk_full'; END $$;
         CREATE TRIGGER disk_full BEFORE DELETE ON meter_readings
             FOR EACH STATEMENT EXECUTE FUNCTION disk_full();",
    )
    .unwrap();
    support::insert_readings(&mut l, 50, 0);
    let before = rows(&mut l, "");
    let mut d = s.spawn(&["run"]);
    let log = refused_locally_for_three_cycles(&s, &mut d, "53100", 50);
    let mut c = s.central();
    assert_eq!(s.local_count("meter_readings"), 50);
    assert_eq!(quarantined(&mut l), vec![]);
    assert!(
        log.contains("delete uploaded batch of 10") && log.contains("No space left on device"),
        "{log}"
    );

    l.batch_execute("DROP TRIGGER disk_full ON meter_readings")
        .unwrap();
    assert!(
        support::wait_until(Duration::from_secs(30), || s.local_count("meter_readings")
            == 0),
        "{}",
        d.log_text()
    );
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(rows(&mut c, ""), before);
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

/// Central refuses writes (25006: a standby not yet promoted, or an operator's
/// `default_transaction_read_only = on`) behind a single host. That is transient:
/// the readings stay queued, nothing is quarantined, the daemon tries once per
/// cycle (no hot loop of reconnects), and when central accepts writes again the
/// queue drains, each reading once.
#[test]
fn a_read_only_central_holds_the_queue_and_quarantines_nothing() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 10);
    let mut c = s.central();
    let db = s.central_db.clone();
    let end_sessions = |c: &mut Client| {
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'meter-sync'",
            &[&db],
        )
        .unwrap();
    };
    c.batch_execute(&format!(
        "ALTER DATABASE {db} SET default_transaction_read_only = on"
    ))
    .unwrap();
    support::insert_readings(&mut s.local(), 30, 0);
    let before = rows(&mut s.local(), "");
    let mut d = s.spawn(&["run"]);
    d.wait_log("25006", Duration::from_secs(30));
    let cycles = |d: &support::Daemon| d.log_text().matches("cycle finished").count();
    let now = cycles(&d);
    assert!(
        support::wait_until(Duration::from_secs(30), || cycles(&d) >= now + 4),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert_eq!(s.central_count("meter_readings"), 0);
    assert_eq!(s.local_count("meter_readings WHERE sync_error IS NULL"), 30);
    assert!(!log.contains("quarantined reading"), "{log}");
    // One upload attempt per cycle, and no reconnect storm: a few connects per cycle
    // at most (upload, heartbeat), never a loop within the cycle.
    let (fails, finished) = (
        log.matches("upload phase failed").count(),
        log.matches("cycle finished").count(),
    );
    assert!(
        fails <= finished + 1,
        "{fails} failures in {finished} cycles:\n{log}"
    );
    let read_only_lines = log.lines().filter(|l| l.contains("25006")).count();
    assert!(
        read_only_lines <= 4 * (finished + 1),
        "{read_only_lines} lines about 25006 in {finished} cycles:\n{log}"
    );

    c.batch_execute(&format!(
        "ALTER DATABASE {db} RESET default_transaction_read_only"
    ))
    .unwrap();
    end_sessions(&mut c);
    assert!(
        support::wait_until(Duration::from_secs(30), || s.local_count("meter_readings")
            == 0),
        "{}",
        d.log_text()
    );
    assert_eq!(rows(&mut s.central(), ""), before);
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

/// The local database turns read-only (an operator's `default_transaction_read_only
/// = on`, or a full disk remounted read-only) while readings are queued: the
/// central commit succeeds, the local DELETE is refused (25006). Nothing is lost or
/// duplicated, nothing quarantined, the daemon runs on and says why; once local
/// accepts writes again the queue empties, each reading once.
#[test]
fn a_read_only_local_database_loses_and_duplicates_nothing() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 10);
    let db = s.local_db.clone();
    support::insert_readings(&mut s.local(), 30, 0);
    let before = rows(&mut s.local(), "");
    let set_read_only = |on: bool| {
        s.local_cluster()
            .admin()
            .batch_execute(&format!(
                "ALTER DATABASE {db} SET default_transaction_read_only = {}",
                if on { "on" } else { "off" }
            ))
            .unwrap();
    };
    set_read_only(true);
    let mut d = s.spawn(&["run"]);
    let log = refused_locally_for_three_cycles(&s, &mut d, "25006", 30);
    let mut c = s.central();
    assert_eq!(s.local_count("meter_readings WHERE sync_error IS NULL"), 30);
    assert!(
        log.contains("read-only transaction (SQLSTATE 25006)"),
        "{log}"
    );

    set_read_only(false);
    assert!(
        support::wait_until(Duration::from_secs(30), || s.local_count("meter_readings")
            == 0),
        "{}",
        d.log_text()
    );
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(rows(&mut c, ""), before);
}

/// P7 and P19 with the values a broken collector writes: a timestamp of
/// `-infinity`, `infinity` and the year 2199 (a clock gone wrong), a `NaN` value,
/// a unit with control characters. Central, partitioned by month with no default
/// partition, has nowhere to put the three timestamps (23514): those three are
/// quarantined with central's message, everything else arrives exactly as written
/// in the same cycle, nothing stays stuck in the queue, and the log stays one line
/// per line.
#[test]
fn p7_readings_central_has_no_partition_for_are_quarantined_and_the_rest_arrive() {
    let s = Sandbox::empty();
    let mut c = s.central();
    c.batch_execute(PARTITIONED_READINGS).unwrap();
    c.batch_execute(
        "CREATE TABLE meter_readings_2026_01 PARTITION OF meter_readings
             FOR VALUES FROM ('2026-01-01Z') TO ('2026-02-01Z');",
    )
    .unwrap();
    s.migrate();
    let mut l = s.local();
    support::insert_readings(&mut l, 300, 0);
    l.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit) VALUES
             ('m-ninf', '-infinity', 1, 'kWh'),
             ('m-inf', 'infinity', 2, 'kWh'),
             ('m-2199', '2199-01-01 00:00:00+00', 3, 'kWh'),
             ('m-nan', '2026-01-05 00:00:00+00', 'NaN', E'k\\nWh\\u001b[31m\\t');",
    )
    .unwrap();
    let good = rows(
        &mut l,
        "WHERE meter_id NOT IN ('m-ninf', 'm-inf', 'm-2199')",
    );
    assert_eq!(good.len(), 301);
    let run = s.run(&["once"]);
    assert_eq!(rows(&mut c, ""), good, "{}", run.stderr);
    let q: Vec<String> = l
        .query(
            "SELECT meter_id FROM meter_readings WHERE sync_error LIKE '%partition%' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(q, ["m-ninf", "m-inf", "m-2199"], "{}", run.stderr);
    assert_eq!(s.local_count("meter_readings"), 3);
    assert_eq!(
        s.local_count("meter_readings WHERE NOT is_synchronized AND sync_error IS NULL"),
        0
    );
    assert!(
        run.stderr.lines().all(|l| l.starts_with("20")),
        "a log line was split:\n{}",
        run.stderr
    );
}

/// P25 and the NUL escape: jsonb refuses `\u0000`, but a legacy local table whose
/// `metadata` is `json` (stored as text) keeps it, and the cast to jsonb on the way
/// out fails for that row alone (22P05). The row is quarantined with the reason,
/// the other readings arrive, and the queue is not stuck on it.
#[test]
fn p25_a_nul_escape_in_legacy_json_metadata_is_quarantined_not_a_stuck_queue() {
    let s = Sandbox::new();
    let mut l = s.local();
    support::insert_readings(&mut l, 100, 0);
    l.batch_execute(
        "ALTER TABLE meter_readings ALTER COLUMN metadata TYPE json USING metadata::json;
         UPDATE meter_readings SET metadata = '{\"note\": \"a\\u0000b\"}' WHERE id = 33;",
    )
    .unwrap();
    let run = s.run(&["once"]);
    run.assert_ok();
    assert_eq!(last_upload_log(&s), (true, 99, None), "{}", run.stderr);
    let q = quarantined(&mut l);
    assert_eq!(q.len(), 1, "{}", run.stderr);
    assert_eq!(q[0].0, 33);
    assert!(q[0].1.contains("cannot be read"), "{}", q[0].1);
    assert_eq!(s.central_count("meter_readings"), 99);
    // The next cycle has nothing left to try: the queue is empty, not stuck.
    s.run(&["once"]).assert_ok();
    assert_eq!(last_upload_log(&s), (true, 0, None));
}

/// Central maintenance that blocks inserts for a while (a `CREATE INDEX` without
/// `CONCURRENTLY`, `VACUUM FULL`, an `ALTER TABLE`: here `LOCK TABLE … IN SHARE MODE`)
/// is a wait for a lock, not a batch too large: the batches give up on the lock
/// (55P03, transient) before `statement_timeout` would cancel them (57014, which
/// reads as a batch too large), so the batch size is kept, nothing is quarantined,
/// and the queue drains at full size once the lock is gone. (Before, every batch
/// was halved down to one reading while the lock was held, and the next cycles
/// started from there.)
#[test]
fn a_central_lock_held_for_maintenance_is_waited_out_without_shrinking_batches() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 20);
    s.set("DB_QUERY_TIMEOUT_MS", 2000);
    s.set("MAX_QUERY_RETRIES", 1);
    s.set("SYNC_INTERVAL_SECONDS", 1);
    support::insert_readings(&mut s.local(), 200, 0);
    let before = rows(&mut s.local(), "");
    let mut c = s.central();
    let mut maintenance = c.transaction().unwrap();
    maintenance
        .batch_execute("LOCK TABLE meter_readings IN SHARE MODE")
        .unwrap();
    let mut d = s.spawn(&["run"]);
    let cycles = |d: &support::Daemon| d.log_text().matches("cycle finished").count();
    assert!(
        support::wait_until(Duration::from_secs(60), || cycles(&d) >= 2),
        "{}",
        d.log_text()
    );
    maintenance.rollback().unwrap();
    assert!(
        support::wait_until(Duration::from_secs(60), || s.local_count("meter_readings")
            == 0),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(!log.contains("because of its size"), "{log}");
    assert!(log.contains("55P03"), "{log}");
    // A lock held that long is not retried within the cycle: each retry would
    // wait for it as long again.
    assert!(
        !log.lines()
            .any(|l| l.contains("55P03") && l.contains("retry")),
        "{log}"
    );
    assert!(!log.contains("quarantined reading"), "{log}");
    assert_eq!(rows(&mut s.central(), ""), before);
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

/// The collector's maintenance takes `ACCESS EXCLUSIVE` on the local
/// `meter_readings` (VACUUM FULL, an ALTER TABLE) while batches are in flight:
/// their local deletes wait for it. Each gives up with 55P03 at the session's
/// `lock_timeout`, the drain stops, the rest of the cycle runs on the same
/// connection, and nothing is lost or duplicated once the lock is gone. Before,
/// the first delete ran into the statement timeout (retried three times) and those
/// pipelined behind it into the round-trip timeout ("no answer within 3000 ms"):
/// the connection was given up while its backend still waited, holding the cycle
/// lock, so the meters and tenant phases failed with "another meter-sync took the
/// cycle lock".
#[test]
fn a_local_lock_held_by_the_collectors_maintenance_fails_only_the_upload() {
    let mut s = Sandbox::new();
    s.set("DB_QUERY_TIMEOUT_MS", 3000).set("BATCH_SIZE", 100);
    let mut c = s.central();
    // Each batch takes half a second centrally: several are in flight at the lock.
    c.batch_execute(
        "CREATE FUNCTION slow_batch() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$;
         CREATE TRIGGER slow_batch AFTER INSERT ON meter_readings
           FOR EACH STATEMENT EXECUTE FUNCTION slow_batch();",
    )
    .unwrap();
    let mut l = s.local();
    support::insert_readings(&mut l, 1000, 0);
    let written = rows(&mut l, "");
    let mut d = s.spawn(&["once"]);
    let in_central = support::wait_until(Duration::from_secs(30), || {
        c.query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event = 'PgSleep'
             AND datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0)
    });
    assert!(in_central, "no batch reached central: {}", d.log_text());
    let mut maintenance = s.local();
    let mut tx = maintenance.transaction().unwrap();
    tx.batch_execute("LOCK TABLE meter_readings IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let code = d.wait_exit(Duration::from_secs(60));
    tx.commit().unwrap();
    let log = d.log_text();
    assert_eq!(code, Some(Some(1)), "{log}");
    assert!(
        log.contains("upload phase failed") && log.contains("SQLSTATE 55P03"),
        "{log}"
    );
    assert!(
        !log.contains("took the cycle lock") && !log.contains("no answer within"),
        "{log}"
    );
    let downloads: i64 = l
        .query_one(
            "SELECT count(*) FROM sync_logs WHERE sync_type IN ('meters', 'tenant') AND success",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(downloads, 2, "the downloads must run as usual:\n{log}");

    c.batch_execute("DROP TRIGGER slow_batch ON meter_readings")
        .unwrap();
    s.run(&["once"]).assert_ok();
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(rows(&mut c, ""), written, "every reading once, as written");
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// A collector's own, older table with other types than SPEC §4: a `double
/// precision` value arrives with every digit it holds (the cast to numeric kept 15
/// significant digits: 0.1 + 0.2 arrived as 0.3), NaN and infinities included; a
/// `timestamp without time zone` is uploaded as UTC, and the daemon says so once,
/// with the ALTER TABLE that fixes a collector writing local time.
#[test]
fn legacy_float_values_keep_every_digit_and_a_zoneless_timestamp_is_said() {
    let s = Sandbox::new();
    let mut l = s.local();
    l.batch_execute(
        "ALTER TABLE meter_readings ALTER COLUMN value TYPE double precision,
                                   ALTER COLUMN \"timestamp\" TYPE timestamp;
         INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
         SELECT 'm-' || g, timestamp '2026-01-01 12:00:00' + g * interval '1 minute', v, 'kWh'
         FROM unnest(ARRAY[0.1::float8 + 0.2::float8, 1234567.891234567, 2.0 / 3.0, 1e-300,
                           1.7976931348623157e308, 'NaN', '-Infinity', -0.0]) WITH ORDINALITY AS t(v, g)",
    )
    .unwrap();
    let want: Vec<(String, String)> = l
        .query(
            "SELECT meter_id::text, value::text::numeric::text FROM meter_readings ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let run = s.run(&["once"]);
    run.assert_ok();
    let mut c = s.central();
    let got: Vec<(String, String)> = c
        .query(
            "SELECT meter_id::text, value::text FROM meter_readings ORDER BY \"timestamp\"",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, want);
    assert_eq!(got[0].1, "0.30000000000000004");
    let first: String = c
        .query_one(
            "SELECT (min(\"timestamp\") AT TIME ZONE 'UTC')::text FROM meter_readings",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(first, "2026-01-01 12:01:00");
    assert_eq!(
        run.stderr.matches("is timestamp without time zone").count(),
        1,
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("TYPE timestamptz USING"),
        "{}",
        run.stderr
    );
}

/// A collector's own table whose `is_synchronized` is nullable, and a collector
/// that writes NULL there (an ORM writing every mapped column): those readings
/// were never uploaded, counted or purged (NULL is neither true nor false). After
/// `migrate` the ones already written and the ones written later arrive.
#[test]
fn readings_a_legacy_collector_writes_with_a_null_is_synchronized_are_uploaded() {
    let s = Sandbox::empty();
    let mut l = s.local();
    l.batch_execute(
        "CREATE TABLE meter_readings (
             id serial PRIMARY KEY, meter_id text NOT NULL, \"timestamp\" timestamptz NOT NULL,
             value numeric NOT NULL, unit text NOT NULL, metadata jsonb,
             created_at timestamptz DEFAULT now(), is_synchronized boolean DEFAULT false
         );
         INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, is_synchronized)
         VALUES ('before', '2026-01-01 10:00:00+00', 1, 'kWh', NULL);",
    )
    .unwrap();
    s.migrate();
    l.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, metadata, is_synchronized)
         VALUES ('after', '2026-01-01 10:01:00+00', 2, 'kWh', NULL, NULL)",
    )
    .unwrap();
    let status = s.run(&["status"]);
    assert!(
        status.stdout.contains("2 reading(s) waiting"),
        "{}",
        status.all()
    );
    s.run(&["once"]).assert_ok();
    assert_eq!(s.central_count("meter_readings"), 2);
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// A collector's own, older table without `metadata` and `created_at` (and with
/// an extra column, another column order, a `serial` id and a `text` meter id):
/// `migrate` adds what the upload reads, and the readings arrive. Before, the table
/// migrated cleanly and every upload failed with "column r.metadata does not exist".
#[test]
fn a_legacy_table_without_metadata_or_created_at_is_migrated_and_uploads() {
    let s = Sandbox::empty();
    let mut l = s.local();
    l.batch_execute(
        "CREATE TABLE meter_readings (
             id              serial PRIMARY KEY,
             quality         integer,
             unit            text NOT NULL,
             \"timestamp\"     timestamptz NOT NULL,
             meter_id        text NOT NULL,
             value           numeric NOT NULL,
             is_synchronized boolean NOT NULL DEFAULT false
         );
         INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, quality)
         VALUES ('old-1', '2026-01-01 10:00:00+00', 1.5, 'kWh', 3),
                ('old-2', '2026-01-01 10:01:00+00', 2.5, 'kWh', 3);",
    )
    .unwrap();
    s.migrate();
    // The legacy collector goes on writing the columns it knows.
    l.batch_execute(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
         SELECT 'new-' || g, timestamptz '2026-01-01 00:00:00+00' + g * interval '1 second', g, 'kWh'
         FROM generate_series(1, 3) g",
    )
    .unwrap();
    let run = s.run(&["once"]);
    run.assert_ok();
    let mut c = s.central();
    let got: Vec<(String, String, bool)> = c
        .query(
            "SELECT meter_id::text, value::text, created_at IS NULL FROM meter_readings
             ORDER BY \"timestamp\"",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got.len(), 5, "{}", run.stderr);
    assert_eq!(
        &got[3..],
        [
            ("old-1".to_string(), "1.5".to_string(), true),
            ("old-2".to_string(), "2.5".to_string(), true),
        ]
    );
    assert!(
        got[..3].iter().all(|(_, _, no_created)| !no_created),
        "{got:?}"
    );
    assert_eq!(s.local_count("meter_readings"), 0);
}

/// The resend window under a fault between the central commit and the local mark
/// (the daemon's local session is terminated while batches are in flight): the
/// batches central committed but local did not mark go again as no-ops, every
/// reading ends up retained and marked exactly once centrally, and the cycles after
/// that upload nothing: a retained reading goes again only by `resend`.
#[test]
fn retained_readings_survive_a_lost_local_session_after_the_central_commit() {
    let mut s = Sandbox::new();
    s.set("UPLOAD_RETAIN_HOURS", 24)
        .set("BATCH_SIZE", 100)
        .set("SYNC_INTERVAL_SECONDS", 1);
    let mut c = s.central();
    c.batch_execute(
        "CREATE FUNCTION slow_batch() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
         CREATE TRIGGER slow_batch AFTER INSERT ON meter_readings
           FOR EACH STATEMENT EXECUTE FUNCTION slow_batch();",
    )
    .unwrap();
    let mut l = s.local();
    support::insert_readings(&mut l, 600, 0);
    let written = rows(&mut l, "");
    let d = s.spawn(&["run"]);
    assert!(
        support::wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            >= 100),
        "{}",
        d.log_text()
    );
    l.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'meter-sync[%'",
        &[],
    )
    .unwrap();
    // The drain's summary, which says what central had already, comes after its
    // last mark: waited for as well, not read the moment the queue is empty.
    let settled = support::wait_until(Duration::from_secs(60), || {
        s.local_count("meter_readings WHERE NOT is_synchronized") == 0
            && d.log_text().contains("were already in central")
    });
    assert!(settled, "{}", d.log_text());
    let log = d.log_text();
    let cycles = log.matches("cycle finished").count();
    assert!(
        support::wait_until(Duration::from_secs(30), || d
            .log_text()
            .matches("cycle finished")
            .count()
            >= cycles + 2),
        "{}",
        d.log_text()
    );
    assert_eq!(central_duplicates(&mut c), 0);
    assert_eq!(rows(&mut c, ""), written, "every reading once, as written");
    assert_eq!(
        s.local_count("meter_readings WHERE is_synchronized AND synced_at IS NOT NULL"),
        600
    );
    let uploads: i64 = l
        .query_one(
            "SELECT coalesce(sum(records_processed), 0)::bigint FROM sync_logs WHERE sync_type = 'upload'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        uploads <= 600 + 800,
        "retained readings were uploaded again and again: {uploads} delivered\n{}",
        d.log_text()
    );
    let last = d.log_text();
    let tail = &last[last.rfind("cycle started").unwrap()..];
    assert!(tail.contains("0 reading(s) waiting"), "{tail}");
}

/// Central's disk fills while a backlog drains (53100 disk_full, which PostgreSQL
/// raises when it cannot extend the table's file; here a central trigger raises it
/// from the fourth batch on, as a tablespace on a full file system did by hand).
/// Each batch then in flight fails once: none is sent again within the cycle (100
/// ms do not free a disk, and each retry wrote the batch into it again, with a
/// warning per batch and retry); nothing is quarantined; the three batches central
/// took before count in `sync_logs` and the metrics although the phase failed; and
/// once central has room the queue drains, each reading once.
#[test]
fn a_central_disk_that_fills_mid_drain_is_not_retried_in_place_and_its_uploads_count() {
    let mut s = Sandbox::new();
    let metrics = s.dir.join("meter-sync.prom");
    s.set("BATCH_SIZE", 10)
        .set("UPLOAD_PIPELINE_DEPTH", 8)
        .set("MAX_QUERY_RETRIES", 3)
        .set("METRICS_TEXTFILE", metrics.display());
    let mut c = s.central();
    c.batch_execute(
        "CREATE SEQUENCE copies;
         CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF nextval('copies') > 3 THEN
                   RAISE EXCEPTION 'could not extend file: No space left on device'
                   USING ERRCODE = 'disk_full';
               END IF;
               RETURN NULL; END $$;
         CREATE TRIGGER disk_full BEFORE INSERT ON meter_readings
             FOR EACH STATEMENT EXECUTE FUNCTION disk_full();",
    )
    .unwrap();
    support::insert_readings(&mut s.local(), 200, 0);
    let before = rows(&mut s.local(), "");
    let run = s.run(&["once"]);
    run.assert_code(1);
    let copies: i64 = c
        .query_one("SELECT last_value FROM copies", &[])
        .unwrap()
        .get(0);
    assert!(
        copies - 3 <= 8,
        "central was sent {} batches into a full disk in one cycle (at most the 8 in \
         flight when the first failed):\n{}",
        copies - 3,
        run.stderr
    );
    assert!(
        !run.stderr
            .lines()
            .any(|l| l.contains("53100") && l.contains("retry")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("No space left on device"),
        "{}",
        run.stderr
    );
    assert_eq!(quarantined(&mut s.local()), vec![]);
    assert_eq!(s.central_count("meter_readings"), 30);
    assert_eq!(s.local_count("meter_readings"), 170);
    let (ok, records, error) = last_upload_log(&s);
    assert!(!ok && error.is_some_and(|e| e.contains("53100")));
    assert_eq!(records, 30, "readings central took before its disk filled");
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains("meter_sync_readings_uploaded_total 30\n"),
        "{text}"
    );

    c.batch_execute("DROP TRIGGER disk_full ON meter_readings")
        .unwrap();
    s.run(&["once"]).assert_ok();
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(rows(&mut s.central(), ""), before);
    let synced: i64 = upload_logs(&s).iter().map(|l| i64::from(l.1)).sum();
    assert_eq!(synced, 200, "{:?}", upload_logs(&s));
}

/// A maintenance window on central: from the 31st reading on, a central trigger
/// refuses every reading (P0001, as an operator's "read-only for maintenance"
/// trigger does), then the window closes. With a full pipeline, the readings taken
/// before arrive, none is quarantined, and the held cycle says so once: one batch is
/// taken apart, the seven behind it are not (each added two info lines before,
/// "taking it apart" and "took a batch of 10 apart in 0 statement(s)", every cycle
/// of the window). Once the window is over the queue drains, each reading once.
#[test]
fn p24_a_maintenance_window_refusing_every_reading_is_said_once_and_quarantines_nothing() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 10).set("UPLOAD_PIPELINE_DEPTH", 8);
    let mut c = s.central();
    c.batch_execute(
        "CREATE TABLE window_open (open boolean NOT NULL);
         INSERT INTO window_open VALUES (true);
         CREATE SEQUENCE rows_seen;
         CREATE FUNCTION maintenance() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF nextval('rows_seen') > 30 AND (SELECT open FROM window_open) THEN
                   RAISE EXCEPTION 'central is in a maintenance window';
               END IF;
               RETURN NEW; END $$;
         CREATE TRIGGER maintenance BEFORE INSERT ON meter_readings
             FOR EACH ROW EXECUTE FUNCTION maintenance();",
    )
    .unwrap();
    support::insert_readings(&mut s.local(), 300, 0);
    let before = rows(&mut s.local(), "");
    let run = s.run(&["once"]);
    run.assert_code(1);
    let (ok, records, err) = last_upload_log(&s);
    let err = err.unwrap_or_default();
    assert!(
        !ok && err.contains("P0001") && err.contains("nothing quarantined"),
        "{err}"
    );
    assert_eq!(records, 30);
    assert_eq!(quarantined(&mut s.local()), vec![]);
    let said = |what: &str| run.stderr.matches(what).count();
    assert_eq!(said("taking it apart"), 1, "{}", run.stderr);
    assert_eq!(said("apart in 0 statement(s)"), 0, "{}", run.stderr);

    c.batch_execute("UPDATE window_open SET open = false")
        .unwrap();
    s.run(&["once"]).assert_ok();
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(rows(&mut s.central(), ""), before);
}

/// A refusal window that closes while a batch is taken apart: central's trigger
/// refuses every reading for its first 19 statements (a maintenance window), then
/// none. The first batch of 32 is refused, its 16 slices too, and the two readings
/// of its first slice alone; then the window closes and central takes the rest.
/// Those two were refused for central's moment, not for what they hold: asked
/// again before quarantine, they are delivered, nothing is quarantined (before,
/// both waited for `requeue`), and the cycle succeeds with every reading once.
#[test]
fn p7_readings_refused_just_before_a_window_closes_are_asked_again_not_quarantined() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 32).set("UPLOAD_PIPELINE_DEPTH", 1);
    let mut c = s.central();
    c.batch_execute(
        "CREATE SEQUENCE refusals;
         CREATE FUNCTION maintenance() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF nextval('refusals') <= 19 THEN
                   RAISE EXCEPTION 'central is in a maintenance window';
               END IF;
               RETURN NEW; END $$;
         CREATE TRIGGER maintenance BEFORE INSERT ON meter_readings
             FOR EACH ROW EXECUTE FUNCTION maintenance();",
    )
    .unwrap();
    support::insert_readings(&mut s.local(), 200, 0);
    let before = rows(&mut s.local(), "");
    let run = s.run(&["once"]);
    assert!(
        run.stderr.contains("P0001"),
        "the window was met: {}",
        run.stderr
    );
    assert_eq!(quarantined(&mut s.local()), vec![], "{}", run.stderr);
    assert_eq!(last_upload_log(&s), (true, 200, None), "{}", run.stderr);
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(rows(&mut s.central(), ""), before);
}
