//! TCP fault-injection proxy for integration tests.
//!
//! Several meter-sync properties (P13 retry with backoff, P18 silent links) are about surviving
//! a bad uplink: resets, refused connects, links that go silent, high latency. Stopping
//! PostgreSQL cannot produce most of those, nor at a chosen moment, so tests point the daemon at
//! this proxy and switch its mode while the daemon runs.
//!
//! It is std-only and thread-based so that any test binary can use it (sync `postgres` tests as
//! well as a daemon running in a child process) without pulling in a runtime.
//!
//! Limits to keep in mind when writing a test:
//! - During [`Proxy::blackhole`] the proxy's own kernel still ACKs what the client sends, so the
//!   client's TCP keepalive and retransmission timers never fire. Only an application-level
//!   timeout (`DB_QUERY_TIMEOUT_MS`) can notice, which is exactly what P18 asks for.
//! - [`Proxy::cut`] closes with FIN on both sides, not a true RST: SO_LINGER 0 needs an
//!   unstable std API. The driver still sees EOF on read and EPIPE/ECONNRESET on a later write.
//! - The upstream connection is opened as soon as a client is accepted, even in a blackhole.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long any thread may take to notice a mode change or shutdown: short enough that tests
/// never wait on it noticeably, long enough that idle threads cost no CPU on a 2-core runner.
const POLL: Duration = Duration::from_millis(50);
const CHUNK: usize = 64 * 1024;
/// Past this many bytes queued in one direction the reader stops reading, so a slow or stalled
/// peer pushes back on the sender through TCP as it would without the proxy, instead of the
/// proxy buffering without bound. Large enough not to cap throughput under `delay`.
const MAX_QUEUED: usize = 4 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A listening proxy in front of one target address. Dropping it tears everything down, so a
/// test that fails half way never leaves threads or sockets behind to disturb the next test.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

/// Mode flags are atomics rather than one locked state because every reader and sender checks
/// them on each chunk; only the connection and thread lists need a lock.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    refuse: AtomicBool,
    blackhole: AtomicBool,
    delay_ns: AtomicU64,
    /// Bytes per second per direction and connection; 0: unlimited. See [`Proxy::throttle`].
    rate: AtomicU64,
    total: AtomicUsize,
    up: AtomicU64,
    down: AtomicU64,
    /// Weak so that a finished connection closes its sockets at once instead of at Drop.
    conns: Mutex<Vec<Weak<Conn>>>,
    /// Kept so Drop can join every thread and guarantee none outlives the proxy.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Conn {
    client: TcpStream,
    server: TcpStream,
    dead: AtomicBool,
    to_server: Pipe,
    to_client: Pipe,
}

/// One direction's queue between its reader and its sender. Splitting reading from sending is
/// what makes `delay` a latency rather than a bandwidth cap: the reader keeps reading while
/// earlier chunks wait for their due time, so many chunks are in flight at once.
#[derive(Default)]
struct Pipe {
    queue: Mutex<Queue>,
    cv: Condvar,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    bytes: usize,
}

/// An empty `bytes` is the peer's EOF: it goes through the queue so that the half-close reaches
/// the other side in order and after the same delay as the data before it.
struct Chunk {
    due: Instant,
    bytes: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
}

/// The read timeout expiring (or a signal) just means "check the mode flags and read again".
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Tests must be able to tear down after a panic elsewhere, so a poisoned lock is still used.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Proxy {
    /// Binds to loopback on an ephemeral port so parallel tests never collide on a port.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy: local_addr");
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        let listener = thread::spawn(move || accept_loop(sh, listener, target));
        Proxy {
            addr,
            shared,
            listener: Some(listener),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Back to a healthy link: clears blackhole and delay (not `refuse`, which has its own
    /// switch). Bytes held by a blackhole are then delivered, as a link that comes back would.
    pub fn pass(&self) {
        self.shared.delay_ns.store(0, SeqCst);
        self.shared.blackhole.store(false, SeqCst);
        self.shared.wake_all();
    }

    /// Kills the connections open now but keeps accepting, which is what a reset uplink or a
    /// restarted server looks like: the daemon must notice and reconnect.
    pub fn cut(&self) {
        for conn in self.shared.live() {
            conn.kill();
        }
    }

    /// Accept-then-close rather than not listening, so the client gets an immediate failure
    /// on connect (like a server that is down or out of slots) instead of a hang.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, SeqCst);
    }

    /// A dead cellular link: nothing arrives and nothing is closed, so only the client's own
    /// timeouts can detect it (P18). Bytes are held, not dropped, until `pass`.
    pub fn blackhole(&self) {
        self.shared.blackhole.store(true, SeqCst);
    }

    /// Each chunk is delivered `one_way` after it was read, so a round trip grows by twice that.
    /// Applies to chunks read from now on.
    pub fn delay(&self, one_way: Duration) {
        let ns = u64::try_from(one_way.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_ns.store(ns, SeqCst);
        self.shared.wake_all();
    }

    /// Lets a test prove that the daemon reconnected (or did not) rather than guess from timing.
    pub fn connections_total(&self) -> usize {
        self.shared.total.load(SeqCst)
    }

    /// (client->server, server->client) bytes actually written to the far side, so a test can
    /// tell whether traffic flowed during a fault.
    pub fn bytes_forwarded(&self) -> (u64, u64) {
        (self.shared.up.load(SeqCst), self.shared.down.load(SeqCst))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        for conn in self.shared.live() {
            conn.kill();
        }
        // std's accept() has no timeout; a throwaway connection is the portable way to wake it.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
        // Connection threads may still be spawning their helpers, so drain until none are left.
        loop {
            let handles = std::mem::take(&mut *lock(&self.shared.threads));
            if handles.is_empty() {
                break;
            }
            for h in handles {
                let _ = h.join();
            }
        }
    }
}

impl Shared {
    fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let handle = thread::spawn(f);
        let mut threads = lock(&self.threads);
        threads.retain(|h| !h.is_finished());
        threads.push(handle);
    }

    fn live(&self) -> Vec<Arc<Conn>> {
        lock(&self.conns).iter().filter_map(Weak::upgrade).collect()
    }

    /// Senders sleep until a chunk is due; a mode change must not wait out the old schedule.
    fn wake_all(&self) {
        for conn in self.live() {
            conn.wake();
        }
    }

    fn counter(&self, dir: Dir) -> &AtomicU64 {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }

    fn halted(&self, conn: &Conn) -> bool {
        conn.dead.load(SeqCst) || self.stop.load(SeqCst)
    }
}

impl Conn {
    /// (read from, write to, queue between them) for one direction.
    fn ends(&self, dir: Dir) -> (&TcpStream, &TcpStream, &Pipe) {
        match dir {
            Dir::Up => (&self.client, &self.server, &self.to_server),
            Dir::Down => (&self.server, &self.client, &self.to_client),
        }
    }

    /// shutdown(Both) on both sockets: the client sees EOF at once, and any thread blocked in a
    /// read or write on them returns immediately, so teardown never waits on a peer.
    fn kill(&self) {
        self.dead.store(true, SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
        self.wake();
    }

    fn wake(&self) {
        self.to_server.cv.notify_all();
        self.to_client.cv.notify_all();
    }
}

fn accept_loop(sh: Arc<Shared>, listener: TcpListener, target: SocketAddr) {
    for stream in listener.incoming() {
        if sh.stop.load(SeqCst) {
            break;
        }
        let Ok(client) = stream else {
            // E.g. out of file descriptors: back off instead of spinning on the error.
            thread::sleep(POLL);
            continue;
        };
        sh.total.fetch_add(1, SeqCst);
        if sh.refuse.load(SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let sh2 = Arc::clone(&sh);
        sh.spawn(move || serve(sh2, client, target));
    }
}

/// Runs in its own thread so a slow upstream connect never holds up the accept loop.
fn serve(sh: Arc<Shared>, client: TcpStream, target: SocketAddr) {
    let server = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(_) => {
            // Upstream down: the client should see that, not a connection that hangs.
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    for s in [&client, &server] {
        // Readers wake this often to notice blackhole/cut/stop without a busy loop.
        let _ = s.set_read_timeout(Some(POLL));
        // Nagle plus delayed ACK would add tens of ms to round trips and distort `delay`.
        let _ = s.set_nodelay(true);
    }
    let conn = Arc::new(Conn {
        client,
        server,
        dead: AtomicBool::new(false),
        to_server: Pipe::default(),
        to_client: Pipe::default(),
    });
    {
        // Checked under the same lock Drop takes, so a connection accepted during Drop is
        // either seen and killed by Drop or kills itself here.
        let mut conns = lock(&sh.conns);
        if sh.stop.load(SeqCst) {
            conn.kill();
            return;
        }
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
    }
    for dir in [Dir::Up, Dir::Down] {
        let (s, c) = (Arc::clone(&sh), Arc::clone(&conn));
        sh.spawn(move || deliver(&s, &c, dir));
    }
    let (s, c) = (Arc::clone(&sh), Arc::clone(&conn));
    sh.spawn(move || pump(&s, &c, Dir::Down));
    pump(&sh, &conn, Dir::Up);
}

/// Reader half of one direction: socket -> queue, stamping each chunk with its due time.
fn pump(sh: &Shared, conn: &Conn, dir: Dir) {
    let (mut src, _, pipe) = conn.ends(dir);
    let mut buf = vec![0u8; CHUNK];
    while !sh.halted(conn) {
        if sh.blackhole.load(SeqCst) {
            // Not reading leaves the bytes in the kernel, so nothing is lost when `pass`
            // resumes, and EOF or an error from the peer stays hidden as on a dead link.
            thread::sleep(POLL);
            continue;
        }
        {
            let queue = lock(&pipe.queue);
            if queue.bytes >= MAX_QUEUED {
                let _ = pipe.cv.wait_timeout(queue, POLL);
                continue;
            }
        }
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e) if is_transient(&e) => continue,
            Err(_) => {
                // A reset from either peer kills the whole connection, as it would end to end.
                conn.kill();
                return;
            }
        };
        let due = Instant::now() + Duration::from_nanos(sh.delay_ns.load(SeqCst));
        let mut queue = lock(&pipe.queue);
        queue.bytes += n;
        queue.chunks.push_back(Chunk {
            due,
            bytes: buf[..n].to_vec(),
        });
        pipe.cv.notify_all();
        if n == 0 {
            return;
        }
    }
}

/// Sender half of one direction: queue -> socket, each chunk no earlier than its due time.
fn deliver(sh: &Shared, conn: &Conn, dir: Dir) {
    let (_, mut dst, pipe) = conn.ends(dir);
    let mut queue = lock(&pipe.queue);
    loop {
        if sh.halted(conn) {
            return;
        }
        let wait = match queue.chunks.front() {
            None => POLL,
            Some(_) if sh.blackhole.load(SeqCst) => POLL,
            Some(c) => c.due.saturating_duration_since(Instant::now()).min(POLL),
        };
        if !wait.is_zero() {
            queue = pipe
                .cv
                .wait_timeout(queue, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let chunk = queue.chunks.pop_front().expect("front was Some");
        queue.bytes -= chunk.bytes.len();
        pipe.cv.notify_all(); // the reader may be waiting for queue space
        drop(queue);
        if chunk.bytes.is_empty() {
            // Pass the half-close on so the far side sees the same EOF the peer sent.
            let _ = dst.shutdown(Shutdown::Write);
            return;
        }
        if write_paced(sh, conn, &mut dst, &chunk.bytes).is_err() {
            conn.kill();
            return;
        }
        sh.counter(dir).fetch_add(chunk.bytes.len() as u64, SeqCst);
        queue = lock(&pipe.queue);
    }
}

// ---------------------------------------------------------------------------------------
// Bandwidth cap (a slow cellular uplink)
// ---------------------------------------------------------------------------------------

/// Pieces a throttled chunk is written in, so the cap holds over short windows too.
const PACE_PIECE: usize = 4 * 1024;

impl Proxy {
    /// Caps each direction of each connection at `bytes_per_second` (0: no cap), from the
    /// next chunk on: what a slow uplink does to a long download. Latency is unchanged.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.shared.rate.store(bytes_per_second, SeqCst);
        self.shared.wake_all();
    }
}

/// Writes `bytes` at no more than the throttle rate: piece by piece, each followed by the
/// pause its size costs at that rate. Stops early when the connection is killed.
fn write_paced(
    sh: &Shared,
    conn: &Conn,
    dst: &mut &TcpStream,
    bytes: &[u8],
) -> std::io::Result<()> {
    let rate = sh.rate.load(SeqCst);
    if rate == 0 {
        return dst.write_all(bytes);
    }
    for piece in bytes.chunks(PACE_PIECE) {
        if sh.halted(conn) {
            return Err(std::io::Error::from(ErrorKind::ConnectionAborted));
        }
        dst.write_all(piece)?;
        thread::sleep(Duration::from_secs_f64(piece.len() as f64 / rate as f64));
    }
    Ok(())
}
