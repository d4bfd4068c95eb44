//! Self-test of the fault-injection proxy against a local echo server, so that a failing
//! daemon test can be blamed on the daemon and not on the proxy it runs through.

#[path = "support/proxy.rs"]
mod proxy;

use proxy::{Action, Aim, Proxy, When};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Echoes every chunk back as it arrives; closes when the client closes.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_nodelay(true);
            thread::spawn(move || {
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// True if the connection is dead: EOF or an error other than a read timeout.
fn is_closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pass_forwards_both_ways() {
    let p = Proxy::start(echo_server());
    assert_ne!(p.port(), 0);
    let mut s = connect(&p);
    round_trip(&mut s, b"hello");
    round_trip(&mut s, &vec![7u8; 200_000]);
    assert_eq!(p.connections_total(), 1);
    wait_for("byte counters", || {
        p.bytes_forwarded() == (200_005, 200_005)
    });
}

#[test]
fn cut_kills_open_connections_promptly_and_keeps_accepting() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    round_trip(&mut s, b"before");
    let t = Instant::now();
    p.cut();
    assert!(is_closed(&mut s), "client still sees an open connection");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );

    let mut s2 = connect(&p);
    round_trip(&mut s2, b"after");
    assert_eq!(p.connections_total(), 2);
}

#[test]
fn blackhole_holds_bytes_without_closing_then_pass_delivers() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    round_trip(&mut s, b"warm");
    p.blackhole();
    s.write_all(b"held").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4];
    let err = s.read(&mut buf).expect_err("bytes got through a blackhole");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );

    // A new connection is accepted but gets nothing through either.
    let mut fresh = connect(&p);
    fresh
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    fresh.write_all(b"new!").unwrap();
    assert!(
        fresh.read(&mut buf).is_err(),
        "bytes got through a blackhole"
    );
    assert_eq!(p.bytes_forwarded(), (4, 4));

    // Still open: more writes succeed and nothing arrives but timeouts.
    s.write_all(b"more").unwrap();
    assert!(!is_closed(&mut s), "blackhole closed the connection");

    p.pass();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut back = [0u8; 8];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"heldmore");
    fresh
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    fresh.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"new!");
}

#[test]
fn delay_is_latency_not_a_bandwidth_cap() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    round_trip(&mut s, b"warm");
    p.delay(Duration::from_millis(100));

    let t = Instant::now();
    round_trip(&mut s, b"ping");
    let rtt = t.elapsed();
    assert!(rtt >= Duration::from_millis(200), "round trip only {rtt:?}");

    // Ten separate chunks in flight at once: all back after about one RTT, not ten.
    let t = Instant::now();
    for i in 0..10u8 {
        s.write_all(&[i; 16]).unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    let mut back = [0u8; 160];
    s.read_exact(&mut back).unwrap();
    let total = t.elapsed();
    assert!(
        total >= Duration::from_millis(200),
        "pipelined only {total:?}"
    );
    // One after another they would take ten round trips (2 s); the margin over one
    // is for the ten writes and their sleeps on a loaded machine, where this
    // bound, at 350 ms, failed now and then.
    assert!(
        total < Duration::from_millis(1000),
        "pipelined took {total:?}"
    );
    for (i, chunk) in back.chunks(16).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8), "out of order");
    }

    p.pass();
    let t = Instant::now();
    round_trip(&mut s, b"fast");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn refuse_closes_new_connections_until_turned_off() {
    let p = Proxy::start(echo_server());
    let mut old = connect(&p);
    // connect() returns before the proxy has accept()ed; a round trip proves it has.
    round_trip(&mut old, b"first");
    p.refuse(true);
    let mut s = connect(&p);
    let t = Instant::now();
    assert!(is_closed(&mut s), "refused connection stayed open");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(p.connections_total(), 2);
    // Connections made before stay up.
    round_trip(&mut old, b"still here");

    p.refuse(false);
    let mut s = connect(&p);
    round_trip(&mut s, b"back");
}

#[test]
fn drop_closes_connections() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    round_trip(&mut s, b"x");
    let t = Instant::now();
    drop(p);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        t.elapsed()
    );
    assert!(is_closed(&mut s));
}

/// One PostgreSQL protocol message: type, then length (itself included), then body.
fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A scripted "server": reads the startup message, answers AuthenticationOk and
/// ReadyForQuery, then answers every Query with an insert's CommandComplete and
/// ReadyForQuery, as central does for an implicit-transaction batch.
fn fake_postgres() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            thread::spawn(move || {
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).is_err() {
                    return;
                }
                let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
                let _ = s.read_exact(&mut rest);
                let mut hello = msg(b'R', &0u32.to_be_bytes());
                hello.extend(msg(b'Z', b"I"));
                let _ = s.write_all(&hello);
                loop {
                    let mut hdr = [0u8; 5];
                    if s.read_exact(&mut hdr).is_err() {
                        return;
                    }
                    let n = u32::from_be_bytes(hdr[1..].try_into().unwrap()) as usize - 4;
                    let mut body = vec![0u8; n];
                    if s.read_exact(&mut body).is_err() {
                        return;
                    }
                    let mut answer = msg(b'C', b"INSERT 0 5\0");
                    answer.extend(msg(b'Z', b"I"));
                    if s.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends a startup message and one insert Query; returns what came back until EOF.
fn converse(p: &Proxy) -> Vec<u8> {
    let mut s = connect(p);
    let mut startup = 8u32.to_be_bytes().to_vec();
    startup.extend_from_slice(&196608u32.to_be_bytes());
    s.write_all(&startup).unwrap();
    thread::sleep(Duration::from_millis(100));
    s.write_all(&msg(b'Q', b"INSERT INTO meter_readings SELECT 1\0"))
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn aimed_faults_go_off_just_before_or_just_after_their_message() {
    let p = Proxy::start(fake_postgres());
    let hello = [msg(b'R', &0u32.to_be_bytes()), msg(b'Z', b"I")].concat();
    let complete = msg(b'C', b"INSERT 0 5\0");

    // Before the insert's CommandComplete: the client never sees it.
    p.arm(Aim::Complete(2), When::Before, Action::Cut, 0);
    assert_eq!(converse(&p), hello);
    assert_eq!(p.fired(), 1);

    // After it: the client sees it, then the link dies before the ReadyForQuery.
    p.arm(Aim::Complete(2), When::After, Action::Cut, 0);
    assert_eq!(converse(&p), [hello.clone(), complete.clone()].concat());

    // The commit's ReadyForQuery, before: everything but it.
    p.arm(Aim::Commit(2), When::Before, Action::Cut, 0);
    assert_eq!(converse(&p), [hello.clone(), complete.clone()].concat());

    // The insert's own ReadyForQuery, after: the client has its whole answer.
    p.arm(Aim::Done(2), When::After, Action::Cut, 0);
    assert_eq!(
        converse(&p),
        [hello.clone(), complete.clone(), msg(b'Z', b"I")].concat()
    );

    // The insert on its way up, before: central never answers it.
    p.arm(Aim::Insert, When::Before, Action::Cut, 0);
    assert_eq!(converse(&p), hello);

    // Too few rows for the aim: nothing happens, and it stays armed.
    p.arm(Aim::Complete(6), When::Before, Action::Cut, 0);
    let mut s = connect(&p);
    let mut startup = 8u32.to_be_bytes().to_vec();
    startup.extend_from_slice(&196608u32.to_be_bytes());
    s.write_all(&startup).unwrap();
    s.write_all(&msg(b'Q', b"INSERT INTO meter_readings SELECT 1\0"))
        .unwrap();
    let want = [hello, complete, msg(b'Z', b"I")].concat();
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
    assert_eq!(p.fired(), 5);
    assert!(p.disarm());
}
