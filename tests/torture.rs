//! P5 under fire: while a collector keeps writing, the daemon is SIGKILLed at
//! random moments and its link to central is cut, refused or blackholed at random.
//! Afterwards central must hold every reading ever written exactly once, with every
//! column as written, and the gateway must be empty.
//!
//! `TORTURE_KILLS` (default 20) sets the number of kills, `TORTURE_SEED` replays a
//! run (the seed is printed).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{Client, Sandbox};

const FULL_ROW: &str = "reading_uid::text, meter_id::text, \"timestamp\"::text, value::text, \
     unit::text, metadata::text, created_at::text, sync_attempts::text";

type Rows = BTreeMap<String, Vec<Option<String>>>;

fn to_rows(rows: &[postgres::Row]) -> Rows {
    rows.iter()
        .map(|r| {
            let uid: String = r.get(0);
            (uid, (1..8).map(|i| r.get::<_, Option<String>>(i)).collect())
        })
        .collect()
}

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

/// The collector: small random bursts of readings with the awkward values a real
/// one produces (NaN, long fractions, late timestamps, equal timestamps, jsonb
/// null versus NULL), recording each row exactly as the database stored it.
fn writer(mut c: Client, stop: Arc<AtomicBool>, seed: u64) -> Rows {
    let mut rng = Rng(seed | 1);
    let mut all = Rows::new();
    let insert = format!(
        "INSERT INTO meter_readings (meter_id, \"timestamp\", value, unit, metadata)
         SELECT 'meter-' || (random() * 40)::int,
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
    while !stop.load(Ordering::SeqCst) {
        let n = rng.range(1, 20) as i32;
        let rows = c.query(&insert, &[&n]).expect("collector insert");
        all.extend(to_rows(&rows));
        thread::sleep(rng.ms(5, 40));
    }
    all
}

#[test]
fn p5_every_reading_arrives_exactly_once_through_kills_and_cut_links() {
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

    let mut s = Sandbox::new();
    let central = SocketAddr::from(([127, 0, 0, 1], s.central_cluster().port));
    let proxy = Proxy::start(central);
    s.set("POSTGRES_CLIENT_PORT", proxy.port())
        .set("SYNC_INTERVAL_SECONDS", 1)
        .set("BATCH_SIZE", 7)
        .set("UPLOAD_PIPELINE_DEPTH", 4)
        .set("DB_QUERY_TIMEOUT_MS", 1500)
        .set("DB_CONNECTION_TIMEOUT_MS", 1000)
        .set("MAX_CONNECTION_RETRIES", 2);

    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let (c, stop, seed) = (s.local(), stop.clone(), rng.next());
        thread::spawn(move || writer(c, stop, seed))
    };

    let mut faults = 0;
    let mut redelivered = 0;
    for i in 0..kills {
        let mut d = s.spawn(&["run"]);
        let life = rng.ms(200, 2000);
        let t = Instant::now();
        // Every fifth kill lands on a slow link (see below); of the others, half
        // meet a random fault.
        let fault = if i % 5 == 4 {
            Some(4)
        } else {
            (rng.range(0, 1) == 1).then(|| rng.range(0, 3))
        };
        if let Some(fault) = fault {
            faults += 1;
            thread::sleep(rng.ms(0, life.as_millis() as u64));
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
                    // Killed while the link is dead: the server is left with a
                    // session that never hears from this client again.
                    proxy.blackhole();
                    thread::sleep(rng.ms(50, 500));
                    d.kill9();
                    proxy.pass();
                }
                _ => {
                    // A slow link holds batches in flight most of the time, so the
                    // kill tends to land after central received a batch and before
                    // the gateway heard back: the P4 window, made wide.
                    proxy.delay(rng.ms(50, 300));
                    thread::sleep(rng.ms(300, 1500));
                    d.kill9();
                    thread::sleep(rng.ms(0, 600));
                    proxy.pass();
                }
            }
        }
        thread::sleep(life.saturating_sub(t.elapsed()));
        d.kill9();
        redelivered += d.log_text().matches("were already in central").count();
    }
    stop.store(true, Ordering::SeqCst);
    let written = collector.join().expect("collector");
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
        .keys()
        .filter(|k| !arrived.contains_key(*k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} readings lost, e.g. {:?}",
        lost.len(),
        written.len(),
        &lost[..lost.len().min(5)]
    );
    let changed: Vec<String> = written
        .iter()
        .filter(|(k, v)| arrived[*k] != **v)
        .map(|(k, v)| format!("{k}: wrote {v:?}, central has {:?}", arrived[k]))
        .take(5)
        .collect();
    assert!(
        changed.is_empty(),
        "readings changed on the way: {changed:#?}"
    );
    assert_eq!(
        arrived.len(),
        written.len(),
        "central holds readings never written"
    );
    eprintln!(
        "torture: {} readings, {kills} kills, {faults} link faults, {redelivered} cycle(s) found readings already in central, \
         {cycles} final cycle(s), {:?}",
        written.len(),
        started.elapsed()
    );
}
