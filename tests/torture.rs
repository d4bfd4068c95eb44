//! P5 under fire: while a collector keeps writing, the daemon is SIGKILLed at
//! random moments, its link to central is cut, refused or blackholed at random, the
//! local PostgreSQL is crashed (SIGKILL of its postmaster) and restarted, central is
//! restarted or crashed, and faults are aimed at the dangerous windows: the fault
//! proxy follows the protocol and cuts the link or kills the daemon just before or
//! just after an insert's Bind goes up, its CommandComplete comes back, or the
//! commit's ReadyForQuery comes back. Afterwards central must hold every reading
//! ever written exactly once, with every column as written, and the gateway must be
//! empty.
//!
//! The central link is plaintext here (sslmode=disable) so that the proxy can read
//! the protocol; TLS has its own tests. Both servers run with synchronous_commit on,
//! so that a crash loses no acknowledged commit (the tests' servers default to off
//! for speed).
//!
//! `TORTURE_KILLS` (default 20) sets the number of daemon lives, `TORTURE_SEED`
//! replays a run (the seed is printed).

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::proxy::{Action, Aim, Proxy, When};
use support::readings::{to_rows, Rows, FULL_ROW};
use support::{Client, Cluster, Role, Sandbox};

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What the collector wrote: rows known as stored, and the reading_uids of inserts
/// whose outcome it never heard (the local server crashed under them).
#[derive(Default)]
struct Written {
    rows: Rows,
    uncertain: std::collections::BTreeSet<String>,
}

/// The collector: small random bursts of readings with the awkward values a real
/// one produces (NaN, long fractions, late timestamps, equal timestamps, jsonb
/// null versus NULL), recording each row exactly as the database stored it. Its
/// uids are derived from (seed, insert number, row), so that after a crash it can
/// look up which rows of the insert it never heard back from were stored.
fn writer(local: &'static Cluster, db: String, stop: Arc<AtomicBool>, seed: u64) -> Written {
    let mut rng = Rng(seed | 1);
    let mut out = Written::default();
    let uid = "md5($2::int8::text || '-' || $3::int8::text || '-' || g)::uuid";
    let insert = format!(
        "INSERT INTO meter_readings (reading_uid, meter_id, \"timestamp\", value, unit, metadata)
         SELECT {uid}, 'meter-' || (random() * 40)::int,
                CASE WHEN random() < 0.1 THEN clock_timestamp() - make_interval(secs => random() * 86400)
                     WHEN random() < 0.2 THEN date_trunc('second', clock_timestamp())
                     ELSE clock_timestamp() END,
                CASE WHEN random() < 0.03 THEN 'NaN'::numeric
                     ELSE round((random() * 1e9 - 1e8)::numeric, (random() * 15)::int) END,
                CASE WHEN random() < 0.5 THEN 'kWh' ELSE 'm³' END,
                CASE (random() * 3)::int WHEN 0 THEN NULL WHEN 1 THEN 'null'::jsonb
                     ELSE jsonb_build_object('g', g, 'note', 'Zähler ☃', 'v', jsonb_build_array(1.50, null)) END
         FROM generate_series(1, $1::int) g
         RETURNING {FULL_ROW}"
    );
    let mut c: Option<Client> = None;
    let mut k: i64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let n = rng.range(1, 20) as i32;
        k += 1;
        let client = c.get_or_insert_with(|| local.connect(&db));
        let tag = (seed % 1_000_000) as i64;
        match client.query(&insert, &[&n, &tag, &k]) {
            Ok(rows) => out.rows.extend(to_rows(&rows)),
            Err(_) => {
                // The server went away under the insert: it may or may not have
                // committed. Reconnect (waiting for the restart) and look.
                c.take();
                let mut again = local.connect(&db);
                let uids: Vec<String> = again
                    .query(
                        &format!("SELECT {uid}::text FROM generate_series(1, $1::int) g"),
                        &[&n, &tag, &k],
                    )
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let stored = again
                    .query(
                        &format!("SELECT {FULL_ROW} FROM meter_readings WHERE reading_uid::text = ANY($1)"),
                        &[&uids],
                    )
                    .unwrap();
                out.rows.extend(to_rows(&stored));
                out.uncertain.extend(uids);
                c = Some(again);
            }
        }
        thread::sleep(rng.ms(5, 40));
    }
    out
}

/// The aimed faults, in the order a run goes through them (then round again): the
/// windows where a reading is deleted too early or sent twice come first.
const AIMED: [(Aim, When, Action); 10] = [
    (Aim::Insert, When::Before, Action::Cut),
    (Aim::Commit(2), When::Before, Action::Kill(0)),
    (Aim::Complete(2), When::After, Action::Cut),
    (Aim::Insert, When::After, Action::Kill(0)),
    (Aim::Commit(2), When::After, Action::Kill(0)),
    (Aim::Insert, When::After, Action::Cut),
    (Aim::Complete(2), When::Before, Action::Kill(0)),
    // The window between an explicit transaction's INSERT and its COMMIT.
    (Aim::Done(2), When::After, Action::Cut),
    (Aim::Insert, When::Before, Action::Kill(0)),
    (Aim::Complete(2), When::After, Action::Kill(0)),
];

/// A cluster of this test's own (it is crashed and restarted), with
/// synchronous_commit on.
fn own(role: Role, hba: &str) -> &'static Cluster {
    let c: &'static Cluster = Box::leak(Box::new(Cluster::start_with(role, hba)));
    c.set_and_reload("synchronous_commit", "on");
    c
}

#[test]
fn p5_every_reading_arrives_exactly_once_through_kills_crashes_and_cut_links() {
    let _heavy = support::heavy_lock();
    let kills = env_u64("TORTURE_KILLS").unwrap_or(20);
    let seed = env_u64("TORTURE_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("torture: {kills} kills, TORTURE_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let started = Instant::now();

    let local = own(Role::Local, "");
    // Password over plaintext TCP, so that the proxy can read the protocol.
    let central = own(
        Role::Central,
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    );
    local.create_db("torture");
    central.create_db("torture");
    let mut s = Sandbox::on(local, central, "torture", "torture");
    s.migrate();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], central.port)));
    s.set("POSTGRES_CLIENT_PORT", proxy.port())
        .set("POSTGRES_CLIENT_SSLMODE", "disable")
        .set("SYNC_INTERVAL_SECONDS", 1)
        .set("BATCH_SIZE", 7)
        .set("UPLOAD_PIPELINE_DEPTH", 4)
        .set("DB_QUERY_TIMEOUT_MS", 1500)
        .set("DB_CONNECTION_TIMEOUT_MS", 1000)
        .set("MAX_CONNECTION_RETRIES", 2);

    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (stop, seed) = (stop.clone(), rng.next());
        thread::spawn(move || writer(local, "torture".into(), stop, seed))
    };

    let (mut faults, mut aimed, mut fired, mut crashes, mut restarts) = (0, 0, 0, 0, 0);
    let mut redelivered = 0;
    for i in 0..kills {
        let mut d = s.spawn(&["run"]);
        let life = rng.ms(200, 2000);
        let t = Instant::now();
        if i % 2 == 0 {
            // Every other life meets an aimed fault, the kinds in turn.
            let (aim, when, action) = AIMED[(i as usize / 2) % AIMED.len()];
            let action = match action {
                Action::Kill(_) => Action::Kill(d.pid()),
                cut => cut,
            };
            aimed += 1;
            proxy.arm(aim, when, action, rng.range(0, 1) as u32);
            let before = proxy.fired();
            support::wait_until(Duration::from_secs(4), || proxy.fired() > before);
            if proxy.fired() > before {
                fired += 1;
            } else {
                proxy.disarm();
            }
        } else {
            // The others: a random fault or none.
            let fault = rng.range(0, 9);
            if fault <= 6 {
                faults += 1;
                thread::sleep(rng.ms(0, life.as_millis() as u64));
            }
            match fault {
                0 => proxy.cut(),
                1 => {
                    proxy.refuse(true);
                    proxy.cut();
                    thread::sleep(rng.ms(100, 1500));
                    proxy.refuse(false);
                }
                2 => {
                    proxy.blackhole();
                    thread::sleep(rng.ms(200, 2500));
                    proxy.pass();
                }
                3 => {
                    // A slow link holds batches in flight most of the time, so the
                    // kill tends to land after central received a batch and before
                    // the gateway heard back: the P4 window, made wide.
                    proxy.delay(rng.ms(50, 300));
                    thread::sleep(rng.ms(300, 1500));
                    d.kill9();
                    thread::sleep(rng.ms(0, 600));
                    proxy.pass();
                }
                4 => {
                    // The local server crashes under the daemon and the collector.
                    crashes += 1;
                    local.kill_postmaster();
                    thread::sleep(rng.ms(0, 500));
                    local.start_after_crash();
                }
                5 => {
                    // Central restarts (fast shutdown: sessions are ended).
                    restarts += 1;
                    central.stop();
                    thread::sleep(rng.ms(0, 800));
                    central.restart();
                }
                6 => {
                    // Central crashes: its postmaster SIGKILLed, or an immediate stop.
                    restarts += 1;
                    if rng.range(0, 1) == 0 {
                        central.kill_postmaster();
                        thread::sleep(rng.ms(0, 500));
                        central.start_after_crash();
                    } else {
                        central.crash();
                        thread::sleep(rng.ms(0, 500));
                        central.restart();
                    }
                }
                _ => {}
            }
        }
        thread::sleep(life.saturating_sub(t.elapsed()));
        d.kill9();
        redelivered += d.log_text().matches("were already in central").count();
    }
    stop.store(true, Ordering::SeqCst);
    let written = collector.join().expect("collector");
    proxy.disarm();
    proxy.pass();
    proxy.refuse(false);

    // Whatever the kills left behind, ordinary cycles finish the job.
    let mut cycles = 0;
    while s.local_count("meter_readings") > 0 && cycles < 10 {
        let run = s.run(&["once"]);
        redelivered += run.stderr.matches("were already in central").count();
        cycles += 1;
    }
    let mut l = s.local();
    let quarantined: Vec<(i64, String)> = l
        .query(
            "SELECT id, sync_error FROM meter_readings WHERE sync_error IS NOT NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        quarantined.is_empty(),
        "valid readings were quarantined: {quarantined:?}"
    );
    assert_eq!(
        s.local_count("meter_readings"),
        0,
        "gateway not empty after {cycles} cycles"
    );

    let mut c = s.central();
    let duplicates: i64 = c
        .query_one(
            "SELECT count(*) - count(DISTINCT reading_uid) FROM meter_readings",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(duplicates, 0, "readings duplicated in central");
    let arrived = to_rows(
        &c.query(&format!("SELECT {FULL_ROW} FROM meter_readings"), &[])
            .unwrap(),
    );
    let lost: Vec<&String> = written
        .rows
        .keys()
        .filter(|k| !arrived.contains_key(*k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} readings lost, e.g. {:?}",
        lost.len(),
        written.rows.len(),
        &lost[..lost.len().min(5)]
    );
    let changed: Vec<String> = written
        .rows
        .iter()
        .filter(|(k, v)| arrived[*k] != **v)
        .map(|(k, v)| format!("{k}: wrote {v:?}, central has {:?}", arrived[k]))
        .take(5)
        .collect();
    assert!(
        changed.is_empty(),
        "readings changed on the way: {changed:#?}"
    );
    let unknown: Vec<&String> = arrived
        .keys()
        .filter(|k| !written.rows.contains_key(*k) && !written.uncertain.contains(*k))
        .take(5)
        .collect();
    assert!(
        unknown.is_empty(),
        "central holds readings never written: {unknown:?}"
    );
    eprintln!(
        "torture: {} readings ({} of uncertain inserts), {kills} daemon lives, {aimed} aimed faults \
         ({fired} went off), {faults} random link faults, {crashes} local crashes, {restarts} central \
         restarts or crashes, {redelivered} cycle(s) found readings already in central, \
         {cycles} final cycle(s), {:?}",
        written.rows.len(),
        written.uncertain.len(),
        started.elapsed()
    );
}
