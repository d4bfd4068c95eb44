//! Self-test of the fault-injection proxy against a local echo server, so that a failing
//! daemon test can be blamed on the daemon and not on the proxy it runs through.

#[path = "support/proxy.rs"]
mod proxy;

use proxy::Proxy;
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
    assert!(
        total < Duration::from_millis(350),
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
