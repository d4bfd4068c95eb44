//! The upload's fast path (binary COPY per batch) and its batch sizing, against real
//! servers: a re-sent batch falls back to ON CONFLICT and arrives once; a batch too
//! large for central's statement_timeout is retried smaller until the queue drains.
//! (P1–P7 and P19 themselves are in tests/upload.rs, and hold on the fast path.)

mod support;

use support::{Client, Sandbox, CENTRAL_PASSWORD};

/// Every row and column both sides share, as text, in reading_uid order (central's
/// own `id` aside).
fn rows(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT concat_ws('|', reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at, sync_attempts)
         FROM meter_readings ORDER BY reading_uid",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn upload_ok(s: &Sandbox) -> Option<(bool, i32)> {
    s.local()
        .query_opt(
            "SELECT success, records_processed FROM sync_logs WHERE sync_type = 'upload' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

/// As if an earlier run had committed some batches centrally and died before the
/// local delete: the COPY of a batch that holds any of them fails whole on the
/// unique key, and that batch, and only it, goes again by INSERT … ON CONFLICT.
#[test]
fn a_resent_batch_falls_back_to_on_conflict_and_every_reading_arrives_once() {
    // Readings 101–150 (the third batch) and one reading of the seventh batch are
    // already central.
    let log = resend(50, 8, 400, |i| (100..150).contains(&i) || i == 321);
    assert!(log.contains("; 51 were already in central"), "{log}");
    assert_eq!(
        log.matches("again with ON CONFLICT DO NOTHING").count(),
        2,
        "exactly the two batches holding re-sent readings fall back: {log}"
    );
    assert!(!log.contains("quarantined reading"), "{log}");
}

/// A batch of 1000 goes as three COPYs of 333–334 in one transaction (upload.rs,
/// `copy_parts`): every part arrives, and a reading central already has in the last
/// part rolls back the two before it, so that the batch falls back whole.
#[test]
fn a_batch_in_several_copies_arrives_whole_and_falls_back_whole() {
    // In the second batch's third COPY (positions 1667–1999).
    let log = resend(1000, 4, 2600, |i| i == 1900);
    assert!(log.contains("; 1 were already in central"), "{log}");
    assert_eq!(
        log.matches("sending these 1000 reading(s) again with ON CONFLICT DO NOTHING")
            .count(),
        1,
        "the second batch, whole, and only it falls back: {log}"
    );
}

/// One cycle over `n` readings in batches of `batch` at `depth`, after the readings
/// at the positions `pick` chooses were copied to central (see [`already_central`]).
/// Asserts that every reading arrived once, as written, and left the queue; returns
/// the log.
fn resend(batch: usize, depth: usize, n: usize, pick: impl Fn(usize) -> bool) -> String {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", batch)
        .set("UPLOAD_PIPELINE_DEPTH", depth);
    let mut l = s.local();
    let mut c = s.central();
    support::insert_readings(&mut l, n, 0);
    let before = rows(&mut l);
    already_central(&mut l, &mut c, pick);

    let log = s.run(&["once"]).all();
    assert_eq!(upload_ok(&s), Some((true, n as i32)), "{log}");
    assert_eq!(rows(&mut c), before, "every reading once, as written");
    assert_eq!(s.local_count("meter_readings"), 0);
    log
}

/// Copies the local readings at the positions `pick` chooses (in upload order) to
/// central, as an earlier run that died before its local delete would have left them.
fn already_central(l: &mut Client, c: &mut Client, pick: impl Fn(usize) -> bool) {
    let copied: Vec<(String, String)> = l
        .query(
            "SELECT reading_uid::text, \"timestamp\"::text FROM meter_readings ORDER BY \"timestamp\", id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .enumerate()
        .filter(|(i, _)| pick(*i))
        .map(|(_, v)| v)
        .collect();
    for (uid, ts) in &copied {
        let r = l
            .query_one(
                "SELECT meter_id, value::text, unit, metadata::text, created_at::text, sync_attempts
                 FROM meter_readings WHERE reading_uid = $1::text::uuid",
                &[uid],
            )
            .unwrap();
        c.execute(
            "INSERT INTO meter_readings (reading_uid, meter_id, \"timestamp\", value, unit, metadata, created_at, sync_attempts)
             VALUES ($1::text::uuid, $2, $3::text::timestamptz, $4::text::numeric, $5, $6::text::jsonb, $7::text::timestamptz, $8)",
            &[
                uid,
                &r.get::<_, String>(0),
                ts,
                &r.get::<_, String>(1),
                &r.get::<_, String>(2),
                &r.get::<_, Option<String>>(3),
                &r.get::<_, Option<String>>(4),
                &r.get::<_, i32>(5),
            ],
        )
        .unwrap();
    }
}

/// Makes the sandbox's gateway log in to central as a role whose
/// `statement_timeout` is `timeout`, into a `meter_readings` whose insert
/// statements each run `slow` (PL/pgSQL, with the inserted rows as `new_rows`)
/// first. Returns an administrator's connection to central.
fn slow_central(s: &mut Sandbox, timeout: &str, slow: &str) -> Client {
    let role = format!("gw_{}", s.central_db);
    let mut admin = s.central();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{CENTRAL_PASSWORD}';
             ALTER ROLE {role} SET statement_timeout = '{timeout}';
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
             CREATE FUNCTION slow_ingest() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN {slow}; RETURN NULL; END $$;
             CREATE TRIGGER slow_ingest AFTER INSERT ON meter_readings
                 REFERENCING NEW TABLE AS new_rows
                 FOR EACH STATEMENT EXECUTE FUNCTION slow_ingest();"
        ))
        .unwrap();
    s.set("POSTGRES_CLIENT_USER", &role);
    admin
}

/// A gateway role whose central `statement_timeout` a 1,000-reading batch exceeds
/// (a statement trigger that takes 4 ms per row) and a 250-reading batch does not:
/// the batches that fail are halved, not retried unchanged, and the queue drains in
/// the same cycle; central holds every reading once.
///
/// The role's timeout (1.8 s) is also what the daemon sets per transaction for a
/// `DB_QUERY_TIMEOUT_MS` of 2 s (a little under it), so the test means the same
/// whether central's timeout comes from the role or from the daemon's `SET LOCAL`.
#[test]
fn batches_too_large_for_centrals_statement_timeout_are_halved_until_the_queue_drains() {
    let mut s = Sandbox::new();
    let mut admin = slow_central(
        &mut s,
        "1800ms",
        "PERFORM pg_sleep((SELECT count(*) FROM new_rows) * 0.004)",
    );
    s.set("BATCH_SIZE", 1000)
        .set("UPLOAD_PIPELINE_DEPTH", 8)
        .set("DB_QUERY_TIMEOUT_MS", 2000);
    let mut l = s.local();
    support::insert_readings(&mut l, 1000, 0);
    let before = rows(&mut l);

    let run = s.run(&["once"]);
    let log = run.all();
    assert_eq!(upload_ok(&s), Some((true, 1000)), "{log}");
    assert_eq!(rows(&mut admin), before);
    assert_eq!(s.local_count("meter_readings"), 0);
    assert!(
        log.contains("statement timeout"),
        "the timeout was met: {log}"
    );
    assert!(log.contains("batch size halved to 500"), "{log}");
    assert!(log.contains("batch size halved to 250"), "{log}");
    assert!(
        !log.contains("halved to 125"),
        "250 passes, so no smaller batch is needed: {log}"
    );
}

/// At one reading per batch there is nothing smaller to try: the phase fails and
/// the readings stay queued (P24: never quarantined for their size).
#[test]
fn a_single_reading_that_central_always_cancels_fails_the_phase_and_stays_queued() {
    let mut s = Sandbox::new();
    slow_central(&mut s, "900ms", "PERFORM pg_sleep(3)");
    // 900 ms is also what the daemon sets per transaction for a 1 s query timeout.
    s.set("BATCH_SIZE", 4).set("DB_QUERY_TIMEOUT_MS", 1000);
    s.insert_readings(4);
    let run = s.run(&["once"]);
    let log = run.all();
    assert_eq!(upload_ok(&s).map(|r| r.0), Some(false), "{log}");
    assert!(log.contains("already at 1 reading per batch"), "{log}");
    assert_eq!(s.central_count("meter_readings"), 0);
    assert_eq!(
        s.local_count("meter_readings WHERE sync_error IS NULL AND NOT is_synchronized"),
        4,
        "nothing quarantined, everything still queued"
    );
}

/// An operator cancels one of the gateway's statements on central
/// (`pg_cancel_backend`: 57014, as a statement timeout, but long before the timeout
/// could have run out; here the third batch's trigger cancels its own backend): the
/// batch is sent again as it was, not taken for too large (no halving, nothing
/// quarantined), and the cycle uploads every reading, each once.
#[test]
fn a_batch_an_operator_cancels_is_sent_again_not_halved() {
    let mut s = Sandbox::new();
    let mut admin = s.central();
    admin
        .batch_execute(
            "CREATE SEQUENCE copies;
             CREATE FUNCTION cancelled() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF nextval('copies') = 3 THEN
                       PERFORM pg_cancel_backend(pg_backend_pid());
                       PERFORM pg_sleep(5);
                   END IF;
                   RETURN NULL; END $$;
             CREATE TRIGGER cancelled BEFORE INSERT ON meter_readings
                 FOR EACH STATEMENT EXECUTE FUNCTION cancelled();",
        )
        .unwrap();
    s.set("BATCH_SIZE", 10)
        .set("UPLOAD_PIPELINE_DEPTH", 8)
        .set("DB_QUERY_TIMEOUT_MS", 10000);
    let mut l = s.local();
    support::insert_readings(&mut l, 200, 0);
    let before = rows(&mut l);
    let run = s.run(&["once"]);
    let log = run.all();
    assert_eq!(upload_ok(&s), Some((true, 200)), "{log}");
    assert!(
        log.contains("due to user request"),
        "the cancel was met: {log}"
    );
    assert!(
        !log.contains("because of its size") && !log.contains("halved"),
        "{log}"
    );
    assert_eq!(rows(&mut admin), before);
    assert_eq!(s.local_count("meter_readings"), 0);
    let copies: i64 = admin
        .query_one("SELECT last_value FROM copies", &[])
        .unwrap()
        .get(0);
    assert_eq!(copies, 21, "20 batches and the cancelled one again: {log}");
}

/// The drain's second pass (P6): a reading the collector writes during the drain with
/// a timestamp behind the pass (a meter catching up on its buffer) is still uploaded
/// in the same cycle, although the second pass now runs only when the queue holds a
/// reading newer than every one the first pass read. Here the "collector" is a local
/// trigger that writes one such reading when the first uploaded batch is deleted.
#[test]
fn a_reading_written_behind_the_pass_during_the_drain_is_uploaded_in_the_same_cycle() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 100);
    let mut l = s.local();
    support::insert_readings(&mut l, 500, 0);
    l.batch_execute(
        "CREATE TABLE late_written (at timestamptz);
         CREATE FUNCTION write_late() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NOT EXISTS (SELECT 1 FROM late_written) THEN
                 INSERT INTO late_written VALUES (now());
                 INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit)
                 VALUES ('late-meter', '2020-06-01 00:00:00+00', 1, 'kWh');
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER write_late AFTER DELETE ON meter_readings
             FOR EACH ROW EXECUTE FUNCTION write_late();",
    )
    .unwrap();

    let run = s.run(&["once"]);
    run.assert_ok();
    assert!(
        run.all().contains("upload: 500 reading(s) queued"),
        "{}",
        run.all()
    );
    assert_eq!(upload_ok(&s), Some((true, 501)), "{}", run.all());
    assert_eq!(s.central_count("meter_readings"), 501);
    assert_eq!(s.local_count("meter_readings"), 0);
    assert_eq!(
        s.central_count("meter_readings WHERE meter_id = 'late-meter'"),
        1
    );
}

/// Counting the queue is a scan of all of it (seconds on a gateway with a week's
/// backlog), so a cycle that drains it counts it twice: as it starts (the start
/// line, which the upload reuses) and after it (heartbeat and metrics file), not
/// again at the upload's start and end.
#[test]
fn a_cycle_that_drains_its_queue_counts_it_once_before_and_once_after() {
    let mut s = Sandbox::new();
    s.set("BATCH_SIZE", 100).set("LOG_LEVEL", "debug");
    s.insert_readings(500);

    let run = s.run(&["once"]);
    run.assert_ok();
    let log = run.all();
    assert!(log.contains("upload: 500 reading(s) queued"), "{log}");
    assert_eq!(s.local_count("meter_readings"), 0);
    // The driver logs every statement it prepares at debug.
    let counts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("preparing query") && l.contains("count(*)"))
        .collect();
    assert_eq!(counts.len(), 2, "{counts:#?}");
}

/// The local delete of a batch central has committed does not wait for the
/// gateway's WAL flush (a lost delete is a re-send, P4): against a local server
/// that flushes at every commit that asks for it, as a gateway's does, draining
/// 60 batches costs far fewer WAL flushes than 60.
#[test]
fn deleting_uploaded_batches_does_not_wait_for_the_local_wal_flush() {
    use support::{Cluster, Role};
    let local: &'static Cluster = Box::leak(Box::new(Cluster::start(Role::Local)));
    let (_, central) = support::shared();
    let name = format!("flush_{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    // As a gateway's server runs (the test clusters' own settings skip both). The
    // WAL writer flushes what asynchronous commits leave once per wal_writer_delay:
    // every 10 s, its count does not grow with how long the drain takes on a
    // loaded machine.
    for (name, value) in [
        ("fsync", "on"),
        ("synchronous_commit", "on"),
        ("wal_writer_delay", "10s"),
    ] {
        local.set_and_reload(name, value);
    }
    let mut s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    const BATCHES: i64 = 60;
    let n = BATCHES as usize * 20;
    s.insert_readings(n);
    s.set("BATCH_SIZE", 20);
    // WAL flushes of the whole server: counted once the backends that did them
    // have exited and reported (PostgreSQL 14+).
    let flushes = |s: &Sandbox| -> i64 {
        let mut c = s.local();
        assert!(
            support::wait_until(std::time::Duration::from_secs(10), || {
                c.query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'meter-sync%'",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0)
                    == 0
            }),
            "meter-sync's local session outlived the process"
        );
        c.query_one("SELECT wal_sync FROM pg_stat_wal", &[])
            .unwrap()
            .get(0)
    };
    let before = flushes(&s);
    let run = s.run(&["once"]);
    run.assert_ok();
    assert_eq!(s.central_count("meter_readings"), n as i64, "{}", run.all());
    assert_eq!(s.local_count("meter_readings"), 0, "{}", run.all());
    let spent = flushes(&s) - before;
    assert!(
        spent < BATCHES / 2,
        "{spent} local WAL flushes for {BATCHES} deleted batches:\n{}",
        run.all()
    );
}
