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
//!
//! Aimed faults ([`Proxy::arm`]): on a plaintext PostgreSQL connection (sslmode=disable) the
//! proxy follows the protocol's message framing in both directions and can cut the link, or
//! SIGKILL a process, just before or just after a chosen message: the Bind of an insert on its
//! way to central, the insert's CommandComplete or the commit's ReadyForQuery on their way
//! back. Random faults rarely land in those windows; these land there every time.
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
    /// The aimed fault waiting for its message, if any.
    armed: Mutex<Option<Aimed>>,
    /// Aimed faults that went off.
    fired: AtomicUsize,
}

/// Which message an aimed fault waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aim {
    /// Client to server: the Bind (extended protocol) of a prepared INSERT or COPY into
    /// `meter_readings`, or a simple Query starting with one: the batch has not reached central.
    Insert,
    /// Server to client: a CommandComplete `INSERT 0 n` or `COPY n` with n at least the given
    /// number (so that one-row upserts of other tables, such as a heartbeat, do not match):
    /// central has executed the batch (and, in an implicit transaction, committed it).
    Complete(u64),
    /// Server to client: the ReadyForQuery right after such a CommandComplete, idle or still in
    /// a transaction: where the client learns that its insert statement is done (inside an
    /// explicit transaction, before the COMMIT).
    Done(u64),
    /// Server to client: the first ReadyForQuery with status idle after such a CommandComplete
    /// (in an explicit transaction, the one that answers its COMMIT): the commit's
    /// acknowledgement.
    Commit(u64),
    /// Client to server: a Parse or simple Query whose SQL contains this text.
    Statement(&'static str),
}

/// Before: the message is not delivered (the action comes first). After: it is delivered, then
/// the action follows at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

/// What an aimed fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Kill the connection (both sides see it end).
    Cut,
    /// SIGKILL this process (the daemon), then kill the connection.
    Kill(i32),
    /// Hold every chunk from here on, this one included, as [`Proxy::blackhole`] does.
    Blackhole,
}

#[derive(Clone, Copy, Debug)]
struct Aimed {
    aim: Aim,
    when: When,
    action: Action,
    /// Matches to let pass before firing.
    skip: u32,
}

struct Conn {
    client: TcpStream,
    server: TcpStream,
    dead: AtomicBool,
    to_server: Pipe,
    to_client: Pipe,
    /// Message framing of each direction, for aimed faults.
    up_scan: Mutex<Scan>,
    down_scan: Mutex<Scan>,
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
    /// Done by the sender when it reaches this chunk, before writing its bytes.
    act: Option<Action>,
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

    /// Arms one aimed fault: after `skip` matching messages have passed, the next one sets it
    /// off (see [`Aim`], [`When`], [`Action`]); then it is disarmed. Replaces an armed one.
    /// Works on plaintext connections only (a TLS connection is passed through untouched).
    pub fn arm(&self, aim: Aim, when: When, action: Action, skip: u32) {
        *lock(&self.shared.armed) = Some(Aimed {
            aim,
            when,
            action,
            skip,
        });
    }

    /// Disarms a fault that has not gone off; returns whether one was armed.
    pub fn disarm(&self) -> bool {
        lock(&self.shared.armed).take().is_some()
    }

    /// How many aimed faults have gone off so far.
    pub fn fired(&self) -> usize {
        self.shared.fired.load(SeqCst)
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
        up_scan: Mutex::new(Scan::new(Dir::Up)),
        down_scan: Mutex::new(Scan::new(Dir::Down)),
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
        // An aimed fault splits the chunk where it goes off: the bytes before are sent,
        // then the action, then the rest.
        let scan = match dir {
            Dir::Up => &conn.up_scan,
            Dir::Down => &conn.down_scan,
        };
        let hit = lock(scan).feed(&buf[..n], sh);
        let mut queue = lock(&pipe.queue);
        queue.bytes += n;
        match hit {
            Some((at, action)) => {
                // An empty chunk would be an EOF.
                if at > 0 {
                    queue.chunks.push_back(Chunk {
                        due,
                        bytes: buf[..at].to_vec(),
                        act: None,
                    });
                }
                queue.chunks.push_back(Chunk {
                    due,
                    bytes: buf[at..n].to_vec(),
                    act: Some(action),
                });
            }
            None => queue.chunks.push_back(Chunk {
                due,
                bytes: buf[..n].to_vec(),
                act: None,
            }),
        }
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
        if let Some(Action::Blackhole) = chunk.act {
            sh.blackhole.store(true, SeqCst);
            queue = lock(&pipe.queue);
            queue.bytes += chunk.bytes.len();
            queue.chunks.push_front(Chunk { act: None, ..chunk });
            continue;
        }
        if let Some(action) = chunk.act {
            if let Action::Kill(pid) = action {
                // SIGKILL takes effect before the process runs another instruction of its
                // own, so nothing sent after this is read by it.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            conn.kill();
            return;
        }
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

/// Follows the PostgreSQL protocol's framing in one direction, to find the messages aimed
/// faults wait for. Gives up (passes everything through) on TLS.
struct Scan {
    dir: Dir,
    opaque: bool,
    /// Untyped messages still expected at the start of the client's stream (SSLRequest,
    /// StartupMessage).
    untyped: u8,
    /// The server's stream has begun (its first byte may be the answer to an SSLRequest).
    began: bool,
    hdr: Vec<u8>,
    ty: u8,
    /// Body bytes still to come of the current message.
    left: usize,
    /// The first bytes of the current body.
    body: Vec<u8>,
    /// Where the current message started in the chunk being fed, if it did.
    start: Option<usize>,
    /// Prepared statements (name) that insert readings.
    inserts: std::collections::HashMap<Vec<u8>, bool>,
    /// Rows inserted in the transaction in progress, until it ends.
    completed: Option<u64>,
    /// Rows of an insert's CommandComplete that was the last message.
    just: Option<u64>,
}

/// Body bytes kept per message: enough for a statement name and the start of its SQL.
const KEEP: usize = 512;

impl Scan {
    fn new(dir: Dir) -> Scan {
        Scan {
            dir,
            opaque: false,
            untyped: 1,
            began: false,
            hdr: Vec::new(),
            ty: 0,
            left: 0,
            body: Vec::new(),
            start: None,
            inserts: Default::default(),
            completed: None,
            just: None,
        }
    }

    /// Feeds one chunk; returns where in it to split and what to do, when an armed fault
    /// goes off.
    fn feed(&mut self, data: &[u8], sh: &Shared) -> Option<(usize, Action)> {
        let mut i = 0;
        while i < data.len() && !self.opaque {
            if let Dir::Down = self.dir {
                if !self.began {
                    self.began = true;
                    match data[i] {
                        b'S' => {
                            self.opaque = true;
                            return None;
                        }
                        b'N' => {
                            i += 1;
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            if self.left == 0 && self.hdr.is_empty() {
                self.start = Some(i);
            }
            let typed = !(matches!(self.dir, Dir::Up) && self.untyped > 0);
            let need = if typed { 5 } else { 4 };
            if self.hdr.len() < need {
                if !typed && self.hdr.is_empty() && data[i] == 0x16 {
                    // A TLS ClientHello where the startup message should be.
                    self.opaque = true;
                    return None;
                }
                self.hdr.push(data[i]);
                i += 1;
                if self.hdr.len() == need {
                    let len_bytes: [u8; 4] = self.hdr[need - 4..].try_into().unwrap();
                    let len = u32::from_be_bytes(len_bytes) as usize;
                    self.ty = if typed { self.hdr[0] } else { 0 };
                    self.left = len.saturating_sub(4);
                    self.body.clear();
                    if self.left == 0 {
                        if let Some(hit) = self.message_done(i, sh) {
                            return Some(hit);
                        }
                    }
                }
                continue;
            }
            let take = self.left.min(data.len() - i);
            let keep = take.min(KEEP.saturating_sub(self.body.len()));
            self.body.extend_from_slice(&data[i..i + keep]);
            i += take;
            self.left -= take;
            if self.left == 0 {
                if let Some(hit) = self.message_done(i, sh) {
                    return Some(hit);
                }
            }
        }
        None
    }

    /// A whole message has been seen, ending at `end` in the current chunk.
    fn message_done(&mut self, end: usize, sh: &Shared) -> Option<(usize, Action)> {
        let start = self.start.take().unwrap_or(0);
        let typed = !(matches!(self.dir, Dir::Up) && self.untyped > 0);
        self.hdr.clear();
        if !typed {
            // SSLRequest and GSSENCRequest are followed by another untyped message.
            let code = self
                .body
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
            if !matches!(code, Some(80877103) | Some(80877104)) {
                self.untyped -= 1;
            }
            return None;
        }
        let cstr = |b: &[u8]| -> (Vec<u8>, usize) {
            let n = b.iter().position(|c| *c == 0).unwrap_or(b.len());
            (b[..n].to_vec(), (n + 1).min(b.len()))
        };
        let inserts_readings = |sql: &[u8]| {
            let s = String::from_utf8_lossy(sql)
                .trim_start()
                .to_ascii_uppercase();
            s.starts_with("INSERT INTO METER_READINGS") || s.starts_with("COPY METER_READINGS")
        };
        // The armed statement, if this SQL contains its text.
        let names_armed = |sql: &[u8]| {
            let armed = *lock(&sh.armed);
            match armed?.aim {
                Aim::Statement(text) if String::from_utf8_lossy(sql).contains(text) => {
                    Some(Aim::Statement(text))
                }
                _ => None,
            }
        };
        let just = self.just.take();
        let event = match (self.dir, self.ty) {
            (Dir::Up, b'P') => {
                let (name, at) = cstr(&self.body);
                let sql = &self.body[at..];
                self.inserts.insert(name, inserts_readings(sql));
                names_armed(sql)
            }
            (Dir::Up, b'B') => {
                let (_, at) = cstr(&self.body);
                let (stmt, _) = cstr(&self.body[at..]);
                self.inserts
                    .get(&stmt)
                    .copied()
                    .unwrap_or(false)
                    .then_some(Aim::Insert)
            }
            (Dir::Up, b'Q') => names_armed(&self.body)
                .or_else(|| inserts_readings(&self.body).then_some(Aim::Insert)),
            (Dir::Down, b'C') => {
                let (tag, _) = cstr(&self.body);
                let tag = String::from_utf8_lossy(&tag).to_string();
                let rows: Option<u64> = (tag.starts_with("INSERT ") || tag.starts_with("COPY "))
                    .then(|| tag.rsplit(' ').next().and_then(|n| n.parse().ok()))
                    .flatten();
                if let Some(n) = rows {
                    self.completed = Some(self.completed.unwrap_or(0).max(n));
                }
                self.just = rows;
                rows.map(Aim::Complete)
            }
            (Dir::Down, b'Z') => match self.body.first() {
                // Idle again: the transaction that held the insert (implicit, or ended by
                // COMMIT) has committed.
                Some(b'I') => {
                    let commit = self.completed.take().map(Aim::Commit);
                    // Both a Done and a Commit (an implicit transaction): the armed aim
                    // decides which. The guard is dropped before `fire` locks again.
                    let armed = *lock(&sh.armed);
                    if let (Some(n), Some(a)) = (just, armed) {
                        if matches!(a.aim, Aim::Done(_)) {
                            return self.fire(Aim::Done(n), start, end, sh);
                        }
                    }
                    commit
                }
                // Still in the transaction: the commit is yet to come.
                Some(b'T') => just.map(Aim::Done),
                // Failed: it will be rolled back.
                _ => {
                    self.completed = None;
                    None
                }
            },
            _ => None,
        };
        self.fire(event?, start, end, sh)
    }

    /// Sets the armed fault off if `event` is what it waits for.
    fn fire(
        &mut self,
        event: Aim,
        start: usize,
        end: usize,
        sh: &Shared,
    ) -> Option<(usize, Action)> {
        let mut armed = lock(&sh.armed);
        let a = (*armed)?;
        let matches = match (a.aim, event) {
            (Aim::Insert, Aim::Insert) => true,
            (Aim::Complete(min), Aim::Complete(rows)) => rows >= min,
            (Aim::Commit(min), Aim::Commit(rows)) => rows >= min,
            (Aim::Done(min), Aim::Done(rows)) => rows >= min,
            (Aim::Statement(want), Aim::Statement(seen)) => want == seen,
            _ => false,
        };
        if !matches {
            return None;
        }
        if a.skip > 0 {
            armed.as_mut().unwrap().skip -= 1;
            return None;
        }
        *armed = None;
        sh.fired.fetch_add(1, SeqCst);
        Some((
            match a.when {
                When::Before => start,
                When::After => end,
            },
            a.action,
        ))
    }
}
