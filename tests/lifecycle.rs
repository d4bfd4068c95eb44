//! Daemon lifecycle through the real protocols: systemd notifications on a Unix
//! datagram socket (P15), signals (P12), the cross-process cycle lock (P11), dead
//! and silent links (P13, P18).

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{wait_until, Cluster, Role, Sandbox};

const SIGTERM: i32 = 15;
const SIGINT: i32 = 2;

/// What systemd would receive on NOTIFY_SOCKET, with arrival times.
struct Notifications {
    msgs: Arc<Mutex<Vec<(Instant, String)>>>,
    path: PathBuf,
}

impl Notifications {
    fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notifications::listen(sock, path)
    }

    fn listen(sock: UnixDatagram, path: PathBuf) -> Notifications {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let m = Arc::downgrade(&msgs);
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // Ends when the test drops its Notifications.
            while let Some(m) = m.upgrade() {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    for line in text.lines() {
                        m.lock().unwrap().push((Instant::now(), line.to_string()));
                    }
                }
            }
        });
        Notifications { msgs, path }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.msgs.lock().unwrap().clone()
    }

    fn has(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.all().iter().any(|(_, l)| pred(l))
    }

    fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) {
        assert!(
            wait_until(limit, || self.has(&pred)),
            "no {what} within {limit:?}; got {:?}",
            self.lines()
        );
    }

    fn lines(&self) -> Vec<String> {
        self.all().into_iter().map(|(_, l)| l).collect()
    }

    /// The longest silence between WATCHDOG=1 pings in [from, to], counting the
    /// edges of the window.
    fn max_watchdog_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut last = from;
        let mut max = Duration::ZERO;
        for (t, l) in self.all() {
            if l == "WATCHDOG=1" && t >= from && t <= to {
                max = max.max(t - last);
                last = t;
            }
        }
        max.max(to.saturating_duration_since(last))
    }
}

fn with_notify(s: &mut Sandbox, n: &Notifications, watchdog_usec: u64) {
    s.set("NOTIFY_SOCKET", n.path.display());
    s.set("WATCHDOG_USEC", watchdog_usec);
}

/// P15: READY=1 first, WATCHDOG=1 at least every half WATCHDOG_USEC while the
/// loop runs, STATUS= with the last cycle's summary, STOPPING=1 on SIGTERM, exit 0.
#[test]
fn p15_notifies_ready_watchdog_status_and_stopping() {
    let mut s = Sandbox::new();
    let n = Notifications::bind(&s.dir);
    with_notify(&mut s, &n, 2_000_000);
    let mut d = s.spawn(&["run"]);
    n.wait_for("READY=1", Duration::from_secs(10), |l| l == "READY=1");
    let ready_at = n.all().iter().find(|(_, l)| l == "READY=1").unwrap().0;
    n.wait_for("STATUS= after a cycle", Duration::from_secs(15), |l| {
        l.starts_with("STATUS=last cycle") && l.contains("upload") && l.contains("tenant")
    });
    thread::sleep(Duration::from_secs(3));
    let before_stop = Instant::now();
    d.signal(SIGTERM);
    let code = d.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(Some(0)), "log:\n{}", d.log_text());
    let lines = n.lines();
    assert_eq!(
        lines.first().map(String::as_str),
        Some("READY=1"),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "STOPPING=1"), "{lines:?}");
    let gap = n.max_watchdog_gap(ready_at, before_stop);
    assert!(
        gap <= Duration::from_millis(1000),
        "watchdog silent for {gap:?} (WATCHDOG_USEC 2 s: half is 1 s); {lines:?}"
    );
}

/// sd_notify(3): a NOTIFY_SOCKET starting with '@' is in the abstract namespace;
/// WATCHDOG_PID naming another process means the watchdog is not ours to feed.
#[test]
fn p15_abstract_notify_socket_and_foreign_watchdog_pid() {
    use std::os::linux::net::SocketAddrExt;
    let mut s = Sandbox::new();
    let name = format!("meter-sync-test-{}-{}", std::process::id(), s.local_db);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let n = Notifications::listen(sock, PathBuf::new());
    s.set("NOTIFY_SOCKET", format!("@{name}"));
    s.set("WATCHDOG_USEC", 400_000);
    s.set("WATCHDOG_PID", 1);
    let mut d = s.spawn(&["run"]);
    n.wait_for(
        "READY=1 on the abstract socket",
        Duration::from_secs(10),
        |l| l == "READY=1",
    );
    n.wait_for("STATUS=", Duration::from_secs(15), |l| {
        l.starts_with("STATUS=last cycle")
    });
    thread::sleep(Duration::from_secs(1));
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(Some(0)));
    assert!(
        !n.has(|l| l == "WATCHDOG=1"),
        "fed a watchdog that belongs to pid 1: {:?}",
        n.lines()
    );
}

/// P15: the pings come from the loop's progress. When the loop blocks (here its
/// syslog socket is full: nobody reads it and its queue holds a few datagrams),
/// the pings stop, so systemd would restart the daemon; a free-running timer
/// would hide the hang.
#[test]
fn p15_a_hung_loop_stops_the_watchdog() {
    let mut s = Sandbox::new();
    let n = Notifications::bind(&s.dir);
    with_notify(&mut s, &n, 1_000_000);
    let syslog_path = s.dir.join("syslog.sock");
    let syslog = UnixDatagram::bind(&syslog_path).unwrap();
    s.set("LOG_TARGET", "syslog");
    s.set("LOG_SYSLOG_SOCKET", syslog_path.display());
    s.set("LOG_LEVEL", "debug");
    let _d = s.spawn(&["run"]);
    n.wait_for("READY=1", Duration::from_secs(10), |l| l == "READY=1");
    // The syslog queue fills within a cycle or two; then the loop blocks.
    let silent = wait_until(Duration::from_secs(20), || {
        let last = n
            .all()
            .iter()
            .rev()
            .find(|(_, l)| l == "WATCHDOG=1")
            .map(|(t, _)| *t);
        last.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
    });
    assert!(
        silent,
        "the watchdog kept being fed while the loop was blocked: {:?}",
        n.lines().len()
    );
    // Drain the syslog socket: the loop goes on and the pings come back.
    syslog
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let resumed_after = n.all().len();
    let back = wait_until(Duration::from_secs(10), || {
        let mut buf = [0u8; 16384];
        while syslog.recv(&mut buf).is_ok() {}
        n.all()[resumed_after..]
            .iter()
            .any(|(_, l)| l == "WATCHDOG=1")
    });
    assert!(back, "pings did not resume once the loop could go on");
}

/// P13 + P15: central down at start; the daemon keeps running, backs off with
/// growing caps while feeding the watchdog, and reconnects by itself once central
/// is back.
#[test]
fn p13_central_down_at_start_recovers_without_restart() {
    let _g = support::heavy_lock();
    let central: &'static Cluster = Box::leak(Box::new(Cluster::start(Role::Central)));
    let (local, _) = support::shared();
    let name = format!("p13_{}", std::process::id());
    local.create_db(&name);
    central.create_db(&name);
    let mut s = Sandbox::on(local, central, &name, &name);
    s.migrate();
    central.stop();
    let n = Notifications::bind(&s.dir);
    with_notify(&mut s, &n, 2_000_000);
    s.set("MAX_CONNECTION_RETRIES", 4);
    s.set("DB_CONNECTION_TIMEOUT_MS", 1000);
    let mut d = s.spawn(&["run"]);
    n.wait_for("READY=1", Duration::from_secs(10), |l| l == "READY=1");
    let start = Instant::now();
    // Caps 500, 1000, 2000 ms within one cycle's attempts.
    d.wait_log("backoff cap 2000 ms", Duration::from_secs(30));
    let log = d.log_text();
    let p500 = log.find("backoff cap 500 ms").expect("first cap");
    let p1000 = log.find("backoff cap 1000 ms").expect("second cap");
    assert!(p500 < p1000, "caps do not grow:\n{log}");
    let gap = n.max_watchdog_gap(start, Instant::now());
    assert!(
        gap <= Duration::from_millis(1000),
        "watchdog silent for {gap:?} during backoff"
    );
    // Bring central back; the same process reconnects.
    restart(central);
    let reconnected = wait_until(Duration::from_secs(30), || {
        let mut c = central.admin();
        let rows = c
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND application_name = 'meter-sync'",
                &[&name],
            )
            .unwrap();
        !rows.is_empty()
    });
    assert!(reconnected, "no reconnect to central:\n{}", d.log_text());
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(Some(0)));
}

/// `Cluster::restart` takes `&mut self` but only reads; the cluster is leaked
/// for the test's lifetime, so start it again with pg_ctl's own command line.
fn restart(c: &Cluster) {
    let mut copy = Cluster {
        role: c.role,
        root: c.root.clone(),
        data: c.data.clone(),
        socket_dir: c.socket_dir.clone(),
        port: c.port,
        certs: None,
    };
    copy.restart();
    // Dropping the copy would stop the server again.
    std::mem::forget(copy);
}

/// P11: two daemons on one local database never run cycles at once. A trigger
/// records which backend wrote each sync_logs row; rows come in whole cycles
/// from the lock holder only, and the other daemon says why it waits. When the
/// holder dies, the other takes over.
#[test]
fn p11_two_daemons_never_cycle_at_once() {
    let s = Sandbox::new();
    s.local()
        .batch_execute("ALTER TABLE sync_logs ADD COLUMN backend int DEFAULT pg_backend_pid();")
        .unwrap();
    let mut a = s.spawn(&["run"]);
    a.wait_log("holding the cycle lock", Duration::from_secs(15));
    let mut b = s.spawn(&["run"]);
    b.wait_log("holds the cycle lock", Duration::from_secs(15));
    assert!(
        b.log_text()
            .contains(&format!("meter-sync pid {}", a.pid())),
        "{}",
        b.log_text()
    );
    // `once` refuses as well.
    let once = s.run(&["once"]);
    once.assert_code(1);
    assert!(
        once.stderr.contains("another meter-sync"),
        "{}",
        once.stderr
    );
    thread::sleep(Duration::from_secs(3));
    a.kill9();
    b.wait_log("holding the cycle lock", Duration::from_secs(15));
    thread::sleep(Duration::from_secs(3));
    b.signal(SIGTERM);
    assert_eq!(b.wait_exit(Duration::from_secs(10)), Some(Some(0)));
    let rows: Vec<(String, i32)> = s
        .local()
        .query("SELECT sync_type, backend FROM sync_logs ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Whole cycles, each from one session, and one session's cycles end before the next's begin.
    let mut seen_backends = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let (ty, be) = &rows[i];
        assert_eq!(
            ty, "upload",
            "cycle {i} does not start with upload: {rows:?}"
        );
        for (k, want) in ["meters", "tenant"].iter().enumerate() {
            if let Some((t, b2)) = rows.get(i + 1 + k) {
                // A SIGKILL may cut the holder's last cycle short.
                if t == "upload" {
                    break;
                }
                assert_eq!(
                    (t.as_str(), b2),
                    (*want, be),
                    "interleaved cycles: {rows:?}"
                );
            }
        }
        if seen_backends.last() != Some(be) {
            assert!(!seen_backends.contains(be), "sessions alternate: {rows:?}");
            seen_backends.push(*be);
        }
        i += 1;
        while i < rows.len() && rows[i].0 != "upload" {
            i += 1;
        }
    }
    assert_eq!(
        seen_backends.len(),
        2,
        "expected A's cycles then B's: {rows:?}"
    );
}

/// P11: after the local connection is lost the daemon reconnects and takes the
/// lock again, so `status` still sees it running.
#[test]
fn p11_lock_is_retaken_after_a_local_reconnect() {
    let s = Sandbox::new();
    let d = s.spawn(&["run"]);
    d.wait_log("holding the cycle lock", Duration::from_secs(15));
    let running = || {
        s.run(&["status", "--json"])
            .stdout
            .contains("\"running\": true")
    };
    assert!(running());
    s.local()
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'meter-sync[%'",
            &[],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || {
            d.log_text().matches("holding the cycle lock").count() >= 2
        }),
        "{}",
        d.log_text()
    );
    assert!(running(), "{}", d.log_text());
}

/// P18 + P15: a local link that goes silent (the proxy holds every packet, no
/// RST). The round trip in flight is given up after DB_QUERY_TIMEOUT_MS, the
/// cycle ends, and the watchdog is fed all the while.
#[test]
fn p18_blackholed_link_bounded_and_watchdog_fed() {
    let _g = support::heavy_lock();
    let mut s = Sandbox::new();
    let proxy = Proxy::start(
        format!("127.0.0.1:{}", s.local_cluster().port)
            .parse()
            .unwrap(),
    );
    s.set("POSTGRES_SYNC_PORT", proxy.port());
    s.set("DB_QUERY_TIMEOUT_MS", 1500);
    s.set("DB_CONNECTION_TIMEOUT_MS", 1000);
    s.set("MAX_CONNECTION_RETRIES", 1);
    let n = Notifications::bind(&s.dir);
    with_notify(&mut s, &n, 2_000_000);
    let mut d = s.spawn(&["run"]);
    d.wait_log("cycle finished", Duration::from_secs(15));
    let cycles_before = d.log_text().matches("cycle finished").count()
        + d.log_text().matches("cycle skipped").count();
    proxy.blackhole();
    let t0 = Instant::now();
    // The next thing the daemon does on local hangs; it must give up and go on.
    let gave_up = wait_until(Duration::from_secs(10), || {
        d.log_text().contains("no answer within 1500 ms")
    });
    assert!(gave_up, "a silent link hung the daemon:\n{}", d.log_text());
    // The turn that met the silent link ends (a cycle skipped or finished).
    assert!(
        wait_until(Duration::from_secs(10), || {
            let l = d.log_text();
            l.matches("cycle finished").count() + l.matches("cycle skipped").count() > cycles_before
        }),
        "{}",
        d.log_text()
    );
    let hung_for = t0.elapsed();
    // interval (1 s) + query timeout (1.5 s) + reconnect timeout (1 s) + margin.
    assert!(
        hung_for < Duration::from_millis(1000 + 1500 + 1000 + 1500),
        "took {hung_for:?}"
    );
    let gap = n.max_watchdog_gap(t0, Instant::now());
    assert!(
        gap <= Duration::from_millis(1000),
        "watchdog silent for {gap:?} while a round trip hung"
    );
    proxy.pass();
    d.signal(SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(Some(0)));
}

/// A sandbox whose central connection goes through a proxy.
fn central_via_proxy() -> (Sandbox, Proxy) {
    let mut s = Sandbox::new();
    let proxy = Proxy::start(
        format!("127.0.0.1:{}", s.central_cluster().port)
            .parse()
            .unwrap(),
    );
    s.set("POSTGRES_CLIENT_PORT", proxy.port());
    (s, proxy)
}

/// P12: SIGTERM while the cycle waits on a silent central: exit 0 within the
/// stated bound, DB_QUERY_TIMEOUT_MS + DB_CONNECTION_TIMEOUT_MS.
#[test]
fn p12_sigterm_exits_within_the_bound() {
    let _g = support::heavy_lock();
    let (mut s, proxy) = central_via_proxy();
    s.set("DB_QUERY_TIMEOUT_MS", 2000);
    s.set("DB_CONNECTION_TIMEOUT_MS", 3000);
    proxy.blackhole();
    let mut d = s.spawn(&["run"]);
    d.wait_log("cycle started", Duration::from_secs(15));
    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    d.signal(SIGTERM);
    let code = d.wait_exit(Duration::from_secs(15));
    let took = t0.elapsed();
    assert_eq!(code, Some(Some(0)), "{}", d.log_text());
    assert!(
        took < Duration::from_millis(2000 + 3000 + 500),
        "took {took:?}:\n{}",
        d.log_text()
    );
    assert!(d.log_text().contains("meter-sync stopped"));
}

/// P12: the first signal lets the bounded wait in flight finish (here a
/// connection attempt with a long timeout into a silent link); a second signal
/// ends the process at once, still with exit 0.
#[test]
fn p12_second_signal_exits_at_once() {
    let _g = support::heavy_lock();
    let (mut s, proxy) = central_via_proxy();
    s.set("DB_CONNECTION_TIMEOUT_MS", 60000);
    proxy.blackhole();
    let mut d = s.spawn(&["run"]);
    d.wait_log("cycle started", Duration::from_secs(15));
    thread::sleep(Duration::from_millis(500));
    d.signal(SIGINT);
    thread::sleep(Duration::from_millis(500));
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the first signal should let the wait in flight finish"
    );
    let t1 = Instant::now();
    d.signal(SIGTERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(5)),
        Some(Some(0)),
        "{}",
        d.log_text()
    );
    assert!(
        t1.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t1.elapsed()
    );
    assert!(d.log_text().contains("second signal"));
}

/// P12 during a long drain: SIGTERM stops the drain between batches. Central
/// then holds whole batches only (the oldest readings, a multiple of
/// BATCH_SIZE), local holds exactly the rest, and the exit is quick.
#[test]
fn p12_sigterm_during_drain_leaves_no_partial_batch() {
    let _g = support::heavy_lock();
    let (mut s, proxy) = central_via_proxy();
    const N: i64 = 20_000;
    const BATCH: i64 = 50;
    s.set("BATCH_SIZE", BATCH);
    s.set("UPLOAD_PIPELINE_DEPTH", 2);
    s.insert_readings(N as usize);
    // Slow the link so the drain takes many seconds.
    proxy.delay(Duration::from_millis(15));
    let mut d = s.spawn(&["run"]);
    assert!(
        wait_until(Duration::from_secs(30), || s
            .central_count("meter_readings")
            > 0),
        "drain never started:\n{}",
        d.log_text()
    );
    thread::sleep(Duration::from_millis(700));
    let t0 = Instant::now();
    d.signal(SIGTERM);
    let code = d.wait_exit(Duration::from_secs(15));
    let took = t0.elapsed();
    assert_eq!(code, Some(Some(0)), "{}", d.log_text());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let central = s.central_count("meter_readings");
    let local = s.local_count("meter_readings");
    assert!(
        central < N,
        "the drain finished before the signal; make it longer"
    );
    assert_eq!(
        central % BATCH,
        0,
        "a partial batch reached central ({central})"
    );
    assert_eq!(
        central + local,
        N,
        "central {central} + local {local} != {N}"
    );
    // The uploaded ones are exactly the oldest, and none is in both places.
    let newest_central: String = s
        .central()
        .query_one("SELECT max(\"timestamp\")::text FROM meter_readings", &[])
        .unwrap()
        .get(0);
    let oldest_local: String = s
        .local()
        .query_one("SELECT min(\"timestamp\")::text FROM meter_readings", &[])
        .unwrap()
        .get(0);
    assert!(
        newest_central < oldest_local,
        "{newest_central} >= {oldest_local}"
    );
}
