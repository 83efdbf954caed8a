//! Volumes behind an NBD server (`qemu-nbd`, `nbdkit`, `volume serve`):
//! the URIs qemu uses, `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`, and a client for the fixed newstyle
//! handshake with `NBD_OPT_GO`, structured replies and meta contexts.
//!
//! Several connections are opened when the server allows it
//! (`NBD_FLAG_CAN_MULTI_CONN`), one otherwise; each carries one request
//! at a time, so parallel readers use them side by side. Every length and
//! offset from the network is checked before it is used, and a reply that
//! does not fit its request is an error naming the URI, never bytes used.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::format::nbd::*;

/// The default NBD port.
const DEFAULT_PORT: u16 = 10809;
/// The longest chunk payload accepted (a read's data, an error message,
/// block status extents).
const MAX_PAYLOAD: u32 = 64 << 20;
/// The most bytes one request asks for.
pub const MAX_REQUEST: u32 = 32 << 20;
/// How long one reply may take before the server counts as gone.
const IO_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the handshake of an extra connection may take.
const EXTRA_HANDSHAKE: Duration = Duration::from_millis(500);

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub text: String,
    pub endpoint: Endpoint,
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(String),
}

/// Whether `s` is meant as an NBD URI (whether or not it is a valid one).
pub fn is_nbd_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}

impl NbdUri {
    /// Parses `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| {
            Error::InvalidArgument(format!(
                "{s} is not an NBD URI ({why}): give nbd://HOST[:PORT]/EXPORT or \
                 nbd+unix:///EXPORT?socket=PATH"
            ))
        };
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or_else(|| bad("no ?socket="))?;
            let export = path.strip_prefix('/').unwrap_or(path);
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("no socket= in its query"))?;
            return Ok(NbdUri {
                text: s.to_string(),
                endpoint: Endpoint::Unix(socket.to_string()),
                export: export.to_string(),
            });
        }
        let rest = s
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("no nbd:// scheme"))?;
        let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let host = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !host.ends_with(']')
        {
            host.to_string()
        } else {
            format!("{host}:{DEFAULT_PORT}")
        };
        if export.len() > MAX_STRING {
            return Err(bad("the export name is too long"));
        }
        Ok(NbdUri {
            text: s.to_string(),
            endpoint: Endpoint::Tcp(host),
            export: export.to_string(),
        })
    }
}

/// A run of a meta context: offset, length, state.
pub type Extent = (u64, u64, u32);

/// One piece of a reply: a simple reply (with a read's data), or one
/// structured chunk.
#[derive(Debug)]
enum Piece {
    Simple {
        error: u32,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        kind: u16,
        payload: Vec<u8>,
    },
}

/// A request waiting for its reply: the data a successful simple reply
/// carries (a read's length, else 0), and where its pieces go.
struct Waiter {
    read_len: usize,
    tx: mpsc::Sender<Piece>,
}

/// The requests of one connection that wait for replies; set `dead` (with
/// why) once the connection is lost, after which nothing waits.
#[derive(Default)]
struct Waiting {
    waiters: HashMap<u64, Waiter>,
    dead: Option<String>,
}

/// One connection: its writing half with the next cookie, and the
/// requests its reader thread delivers replies to. Requests are
/// pipelined: any number may be in flight, their replies in any order.
struct Conn {
    w: Mutex<(BufWriter<Box<dyn Write + Send>>, u64)>,
    waiting: Arc<Mutex<Waiting>>,
}

/// A connected export.
pub struct NbdClient {
    uri: String,
    size: u64,
    flags: u16,
    /// Meta contexts the server agreed to, by name.
    contexts: HashMap<String, u32>,
    conns: Vec<Conn>,
    /// The connection the next request goes to.
    next: AtomicUsize,
    /// Whether `WRITE_ZEROES` still goes with `FAST_ZERO`.
    fast_zero: AtomicBool,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdClient({})", self.uri)
    }
}

/// What a handshake settled.
struct Negotiated {
    conn: Conn,
    size: u64,
    flags: u16,
    contexts: HashMap<String, u32>,
}

impl NbdClient {
    /// Connects to `uri`, asking for the meta `contexts` (those the server
    /// lacks are simply not there: see [`NbdClient::has_context`]), with up
    /// to `connections` connections when the server allows several.
    pub fn connect(uri: &NbdUri, contexts: &[String], connections: usize) -> Result<NbdClient> {
        let first = negotiate(uri, contexts, IO_TIMEOUT)?;
        let mut client = NbdClient {
            uri: uri.text.clone(),
            size: first.size,
            flags: first.flags,
            contexts: first.contexts,
            conns: vec![first.conn],
            next: AtomicUsize::new(0),
            fast_zero: AtomicBool::new(true),
        };
        if client.flags & FLAG_CAN_MULTI_CONN != 0 {
            // A server may allow several connections yet serve one client
            // at a time (qemu-nbd without --shared): one that does not
            // answer promptly leaves us with the connections we have.
            for _ in 1..connections.max(1) {
                let Ok(more) = negotiate(uri, contexts, EXTRA_HANDSHAKE) else {
                    break;
                };
                if more.size != client.size {
                    return Err(
                        client.fail("connect to", "a second connection saw another size".into())
                    );
                }
                client.conns.push(more.conn);
            }
        }
        Ok(client)
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.contains_key(name)
    }

    fn fail(&self, op: &'static str, reason: String) -> Error {
        failure(&self.uri, op, reason)
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(self.fail(
                op,
                format!(
                    "{len} bytes at {offset} lie past the export's end ({})",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Sends a request on the next connection; its reply's pieces arrive
    /// on the returned channel (closed, with the reason in the
    /// connection's `waiting`, if the connection is lost).
    fn request(
        &self,
        op: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(mpsc::Receiver<Piece>, &Conn)> {
        let c = &self.conns[self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len()];
        let (tx, rx) = mpsc::channel();
        let read_len = if kind == CMD_READ { length as usize } else { 0 };
        let mut w = c.w.lock().unwrap_or_else(|p| p.into_inner());
        w.1 += 1;
        let cookie = w.1;
        {
            let mut waiting = c.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(why) = &waiting.dead {
                return Err(self.fail(op, why.clone()));
            }
            waiting.waiters.insert(cookie, Waiter { read_len, tx });
        }
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        let sent =
            w.0.write_all(&req.encode())
                .and_then(|()| w.0.write_all(payload))
                .and_then(|()| w.0.flush());
        if let Err(e) = sent {
            c.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .waiters
                .remove(&cookie);
            return Err(self.fail(op, lost(&e)));
        }
        Ok((rx, c))
    }

    /// The next piece of a reply, or why none will come.
    fn piece(&self, op: &'static str, rx: &mpsc::Receiver<Piece>, c: &Conn) -> Result<Piece> {
        rx.recv().map_err(|_| {
            let why = c
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dead
                .clone();
            self.fail(
                op,
                why.unwrap_or_else(|| "the server closed the connection".into()),
            )
        })
    }

    /// Fills `buf` from `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        for (k, part) in buf.chunks_mut(MAX_REQUEST as usize).enumerate() {
            let at = offset + k as u64 * MAX_REQUEST as u64;
            let (rx, c) = self.request("read", CMD_READ, 0, at, part.len() as u32, &[])?;
            self.read_reply(&rx, c, at, part)?;
        }
        Ok(())
    }

    /// A read's reply into `buf`: every byte must arrive exactly once,
    /// inside the request.
    fn read_reply(
        &self,
        rx: &mpsc::Receiver<Piece>,
        c: &Conn,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let bad = |what: &str| self.fail("read", format!("the server sent {what}"));
        let mut covered = 0u64;
        loop {
            match self.piece("read", rx, c)? {
                Piece::Simple { error: 0, data } => {
                    if data.len() != buf.len() {
                        return Err(bad("a read answered short"));
                    }
                    buf.copy_from_slice(&data);
                    return Ok(());
                }
                Piece::Simple { error, .. } => {
                    return Err(self.fail("read", format!("the server answered error {error}")));
                }
                Piece::Chunk {
                    flags,
                    kind,
                    payload,
                } => {
                    match kind {
                        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                            let mut r = Reader::new(&payload);
                            let at = r.u64().ok_or_else(|| bad("a chunk without its offset"))?;
                            let (n, data) = if kind == REPLY_TYPE_OFFSET_DATA {
                                let data = r.rest();
                                (data.len() as u64, Some(data))
                            } else {
                                let n = r.u32().filter(|_| r.is_empty());
                                (n.ok_or_else(|| bad("a malformed hole chunk"))? as u64, None)
                            };
                            let from = at.checked_sub(offset).filter(|f| {
                                f.checked_add(n).is_some_and(|end| end <= buf.len() as u64)
                            });
                            let Some(from) = from else {
                                return Err(bad("data outside the request"));
                            };
                            let part = &mut buf[from as usize..(from + n) as usize];
                            match data {
                                Some(d) => part.copy_from_slice(d),
                                None => part.fill(0),
                            }
                            covered += n;
                        }
                        REPLY_TYPE_NONE if payload.is_empty() => {}
                        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                            return Err(self.error_chunk("read", &payload));
                        }
                        _ => return Err(bad("a reply chunk of a type a read never gets")),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        if covered != buf.len() as u64 {
                            return Err(bad("a read answered short"));
                        }
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The error an error chunk carries.
    fn error_chunk(&self, op: &'static str, payload: &[u8]) -> Error {
        match decode_error(payload) {
            Some((error, msg)) => {
                self.fail(op, format!("the server answered error {error}: {msg}"))
            }
            None => self.fail(op, "the server sent a malformed error chunk".into()),
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range("write", offset, data.len() as u64)?;
        for (k, part) in data.chunks(MAX_REQUEST as usize).enumerate() {
            let at = offset + k as u64 * MAX_REQUEST as u64;
            self.command("write", CMD_WRITE, at, part.len() as u32, part)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: `WRITE_ZEROES` where
    /// the server offers it (letting it punch a hole; with
    /// `NBD_CMD_FLAG_FAST_ZERO` where offered, until the server says it
    /// cannot zero fast, then without), else written zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        const OP: &str = "write zeros to";
        self.check_range(OP, offset, len)?;
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(MAX_REQUEST as u64) as u32;
            if self.flags & FLAG_SEND_WRITE_ZEROES != 0 {
                let fast =
                    self.flags & FLAG_SEND_FAST_ZERO != 0 && self.fast_zero.load(Ordering::Relaxed);
                let error = if fast {
                    self.command_status(OP, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, at, n, &[])?
                } else {
                    ENOTSUP
                };
                match error {
                    0 => {}
                    ENOTSUP => {
                        self.fast_zero.store(false, Ordering::Relaxed);
                        self.command(OP, CMD_WRITE_ZEROES, at, n, &[])?;
                    }
                    e => return Err(self.fail(OP, format!("the server answered error {e}"))),
                }
            } else {
                self.command("write", CMD_WRITE, at, n, &vec![0u8; n as usize])?;
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Asks the server to make every write durable, on every connection.
    pub fn flush(&self) -> Result<()> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        for _ in 0..self.conns.len() {
            self.command("flush", CMD_FLUSH, 0, 0, &[])?;
        }
        Ok(())
    }

    /// A command whose reply carries no data: success or an error.
    fn command(
        &self,
        op: &'static str,
        kind: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<()> {
        match self.command_status(op, kind, 0, offset, len, payload)? {
            0 => Ok(()),
            error => Err(self.fail(op, format!("the server answered error {error}"))),
        }
    }

    /// A command whose reply carries no data: the server's error number
    /// (0 for success); `Err` only when the connection or reply fails.
    fn command_status(
        &self,
        op: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u32> {
        let (rx, c) = self.request(op, kind, flags, offset, len, payload)?;
        loop {
            match self.piece(op, &rx, c)? {
                Piece::Simple { error, .. } => return Ok(error),
                Piece::Chunk { kind, payload, .. }
                    if kind == REPLY_TYPE_ERROR || kind == REPLY_TYPE_ERROR_OFFSET =>
                {
                    return match decode_error(&payload) {
                        Some((error, _)) if error != 0 => Ok(error),
                        _ => Err(self.error_chunk(op, &payload)),
                    };
                }
                Piece::Chunk { flags, .. } if flags & REPLY_FLAG_DONE != 0 => return Ok(0),
                Piece::Chunk { .. } => {}
            }
        }
    }

    /// The extents of meta context `context` over `[offset, offset + len)`:
    /// (offset, length, state), in order and covering the range (the
    /// server may answer a request in part: it is asked again from where
    /// its answer ended).
    pub fn block_status(&self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range("query", offset, len)?;
        let id = *self.contexts.get(context).ok_or_else(|| {
            self.fail(
                "query",
                format!("the server does not offer the meta context {context}"),
            )
        })?;
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(u32::MAX as u64 / 2) as u32;
            let got = self.block_status_one(id, at, n)?;
            let mut pos = at;
            for (l, state) in got {
                let l = (l as u64).min(end - pos);
                out.push((pos, l, state));
                pos += l;
                if pos >= end {
                    break;
                }
            }
            at = pos;
        }
        Ok(out)
    }

    fn block_status_one(&self, id: u32, offset: u64, len: u32) -> Result<Vec<(u32, u32)>> {
        let (rx, c) = self.request("query", CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        self.block_status_reply(&rx, c, id)
    }

    /// A block status reply: the extents of context `id`.
    fn block_status_reply(
        &self,
        rx: &mpsc::Receiver<Piece>,
        c: &Conn,
        id: u32,
    ) -> Result<Vec<(u32, u32)>> {
        let bad = |what: &str| self.fail("query", format!("the server sent {what}"));
        let mut extents = Vec::new();
        loop {
            match self.piece("query", rx, c)? {
                // A simple reply to BLOCK_STATUS can only be an error.
                Piece::Simple { error, .. } => {
                    return Err(self.fail("query", format!("the server answered error {error}")));
                }
                Piece::Chunk {
                    flags,
                    kind,
                    payload,
                } => {
                    match kind {
                        REPLY_TYPE_BLOCK_STATUS => {
                            let (ctx, e) = decode_block_status(&payload)
                                .ok_or_else(|| bad("a malformed block status chunk"))?;
                            if ctx == id {
                                extents = e;
                            }
                        }
                        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                            return Err(self.error_chunk("query", &payload));
                        }
                        REPLY_TYPE_NONE => {}
                        _ => return Err(bad("a reply chunk of a type block status never gets")),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        if extents.is_empty() {
                            return Err(bad("block status without the context asked for"));
                        }
                        return Ok(extents);
                    }
                }
            }
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        for c in &self.conns {
            let mut w = c.w.lock().unwrap_or_else(|p| p.into_inner());
            w.1 += 1;
            let disc = Request {
                flags: 0,
                kind: CMD_DISC,
                cookie: w.1,
                offset: 0,
                length: 0,
            };
            let _ = w.0.write_all(&disc.encode()).and_then(|()| w.0.flush());
        }
    }
}

fn failure(uri: &str, op: &'static str, reason: String) -> Error {
    Error::Remote {
        op,
        location: uri.to_string(),
        reason,
        kind: ErrorKind::Other,
        source: None,
    }
}

/// Why a connection was lost, in words.
fn lost(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => {
            "the server closed the connection".into()
        }
        WouldBlock | TimedOut => "the server did not answer within 300 s".into(),
        _ => e.to_string(),
    }
}

fn bad_reply(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the server sent {what}"),
    )
}

fn read_header(r: &mut impl Read) -> io::Result<ReplyHeader> {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    r.read_exact(&mut b[..4])?;
    let rest = ReplyHeader::rest_len(b[..4].try_into().expect("4"))
        .ok_or_else(|| bad_reply("a reply without its magic"))?;
    r.read_exact(&mut b[4..4 + rest])?;
    ReplyHeader::decode(&b[..4 + rest]).ok_or_else(|| bad_reply("a malformed reply header"))
}

/// Reads replies off a connection and hands each piece to the request it
/// answers, until the connection ends; then every waiting request learns
/// why (its channel closes, `dead` says why).
fn demux(mut r: impl Read, waiting: &Mutex<Waiting>) {
    let why = loop {
        if let Err(e) = next_piece(&mut r, waiting) {
            break lost(&e);
        }
    };
    let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
    w.dead = Some(why);
    w.waiters.clear();
}

/// Reads one reply piece and delivers it.
fn next_piece(r: &mut impl Read, waiting: &Mutex<Waiting>) -> io::Result<()> {
    let header = loop {
        match read_header(r) {
            // Idle: nothing asked, nothing owed.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .waiters
                    .is_empty() => {}
            other => break other?,
        }
    };
    let lookup = |cookie: u64, remove: bool| {
        let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
        let found = if remove {
            w.waiters.remove(&cookie).map(|w| (w.read_len, w.tx))
        } else {
            w.waiters.get(&cookie).map(|w| (w.read_len, w.tx.clone()))
        };
        found.ok_or_else(|| bad_reply("a reply to no request"))
    };
    match header {
        ReplyHeader::Simple { error, cookie } => {
            let (read_len, tx) = lookup(cookie, true)?;
            let mut data = vec![0u8; if error == 0 { read_len } else { 0 }];
            r.read_exact(&mut data)?;
            // A requester that gave up is no error.
            let _ = tx.send(Piece::Simple { error, data });
        }
        ReplyHeader::Structured {
            flags,
            kind,
            cookie,
            len,
        } => {
            if len > MAX_PAYLOAD {
                return Err(bad_reply("a reply chunk over 64 MiB"));
            }
            let (_, tx) = lookup(cookie, flags & REPLY_FLAG_DONE != 0)?;
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload)?;
            let _ = tx.send(Piece::Chunk {
                flags,
                kind,
                payload,
            });
        }
    }
    Ok(())
}

/// Connects and negotiates one connection.
fn negotiate(uri: &NbdUri, contexts: &[String], handshake_timeout: Duration) -> Result<Negotiated> {
    let fail = |reason: String| failure(&uri.text, "connect to", reason);
    let restore: Box<dyn Fn()>;
    let (r, w): (Box<dyn Read + Send>, Box<dyn Write + Send>) = match &uri.endpoint {
        Endpoint::Tcp(addr) => {
            let s = TcpStream::connect(addr).map_err(|e| fail(e.to_string()))?;
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(handshake_timeout));
            let reset = s.try_clone().map_err(|e| fail(e.to_string()))?;
            restore = Box::new(move || {
                let _ = reset.set_read_timeout(Some(IO_TIMEOUT));
            });
            (
                Box::new(s.try_clone().map_err(|e| fail(e.to_string()))?),
                Box::new(s),
            )
        }
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| fail(format!("{path}: {e}")))?;
            let _ = s.set_read_timeout(Some(handshake_timeout));
            let reset = s.try_clone().map_err(|e| fail(e.to_string()))?;
            restore = Box::new(move || {
                let _ = reset.set_read_timeout(Some(IO_TIMEOUT));
            });
            (
                Box::new(s.try_clone().map_err(|e| fail(e.to_string()))?),
                Box::new(s),
            )
        }
    };
    let mut stream = Stream {
        r: BufReader::with_capacity(1 << 20, r),
        w: BufWriter::new(w),
    };
    handshake(&mut stream, uri, contexts)
        .map_err(|e| {
            fail(match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    "the server closed the connection during the handshake".into()
                }
                _ => e.to_string(),
            })
        })?
        .map_err(fail)
        .map(|(size, flags, contexts)| {
            restore();
            (size, flags, contexts)
        })
        .map(|(size, flags, contexts)| {
            let waiting = Arc::new(Mutex::new(Waiting::default()));
            let reader = (stream.r, waiting.clone());
            std::thread::spawn(move || demux(reader.0, &reader.1));
            Negotiated {
                conn: Conn {
                    w: Mutex::new((stream.w, 0)),
                    waiting,
                },
                size,
                flags,
                contexts,
            }
        })
}

/// A connection during its handshake: both halves, read in step.
struct Stream {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
}

/// The handshake: the outer error is the connection's, the inner the
/// server's refusal.
type Handshake = std::result::Result<(u64, u16, HashMap<String, u32>), String>;

fn handshake(c: &mut Stream, uri: &NbdUri, contexts: &[String]) -> io::Result<Handshake> {
    let mut hello = [0u8; 18];
    c.r.read_exact(&mut hello)?;
    let mut r = Reader::new(&hello);
    if r.u64() != Some(NBD_MAGIC) || r.u64() != Some(IHAVEOPT) {
        return Ok(Err("it does not speak newstyle NBD".into()));
    }
    let server = r.u16().unwrap_or(0);
    if server & FLAG_FIXED_NEWSTYLE == 0 {
        return Ok(Err("it does not speak fixed newstyle NBD".into()));
    }
    let mut client = FLAG_C_FIXED_NEWSTYLE;
    if server & FLAG_NO_ZEROES != 0 {
        client |= FLAG_C_NO_ZEROES;
    }
    c.w.write_all(&client.to_be_bytes())?;

    c.w.write_all(&option_request(OPT_STRUCTURED_REPLY, &[]))?;
    c.w.flush()?;
    let (kind, _) = option_reply(c, OPT_STRUCTURED_REPLY)?;
    if kind != REP_ACK {
        return Ok(Err("it does not offer structured replies".into()));
    }

    let name = |s: &str| {
        let mut d = (s.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(s.as_bytes());
        d
    };
    let mut agreed = HashMap::new();
    if !contexts.is_empty() {
        let mut d = name(&uri.export);
        d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for q in contexts {
            d.extend_from_slice(&name(q));
        }
        c.w.write_all(&option_request(OPT_SET_META_CONTEXT, &d))?;
        c.w.flush()?;
        loop {
            let (kind, data) = option_reply(c, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT => {
                    let mut r = Reader::new(&data);
                    let id = r
                        .u32()
                        .ok_or_else(|| bad_reply("a malformed meta context"))?;
                    let n = String::from_utf8_lossy(r.rest()).into_owned();
                    if contexts.contains(&n) {
                        agreed.insert(n, id);
                    }
                }
                REP_ACK => break,
                REP_ERR_UNKNOWN => return Ok(Err(format!("it has no export {:?}", uri.export))),
                // No meta contexts at all: reads still work.
                _ => break,
            }
        }
    }

    let mut d = name(&uri.export);
    d.extend_from_slice(&0u16.to_be_bytes());
    c.w.write_all(&option_request(OPT_GO, &d))?;
    c.w.flush()?;
    let mut export: Option<(u64, u16)> = None;
    loop {
        let (kind, data) = option_reply(c, OPT_GO)?;
        match kind {
            REP_INFO => {
                let mut r = Reader::new(&data);
                if r.u16() == Some(INFO_EXPORT) {
                    match (r.u64(), r.u16()) {
                        (Some(size), Some(flags)) => export = Some((size, flags)),
                        _ => return Err(bad_reply("a malformed export description")),
                    }
                }
            }
            REP_ACK => break,
            REP_ERR_UNKNOWN => return Ok(Err(format!("it has no export {:?}", uri.export))),
            k if k & (1 << 31) != 0 => {
                return Ok(Err(format!(
                    "it refused the export: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            _ => {}
        }
    }
    let Some((size, flags)) = export else {
        return Ok(Err("it never said the export's size".into()));
    };
    Ok(Ok((size, flags, agreed)))
}

/// One reply to `option`: its type and data.
fn option_reply(c: &mut Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    c.r.read_exact(&mut h)?;
    let (opt, kind, len) =
        decode_option_reply(&h).ok_or_else(|| bad_reply("an option reply without its magic"))?;
    if opt != option {
        return Err(bad_reply("a reply to another option"));
    }
    if len > MAX_OPTION_LEN {
        return Err(bad_reply("an option reply over 64 KiB"));
    }
    let mut data = vec![0u8; len as usize];
    c.r.read_exact(&mut data)?;
    Ok((kind, data))
}

/// Runs the client's reply parsing over `server` as everything a server
/// answered: a 64 KiB read at offset 0 (cookie 1), then block status of
/// `base:allocation` (context 1) over the first MiB (cookie 2). For the
/// fuzz target and the corpus replay: it must return, never panic.
pub fn parse_replies(server: &[u8]) -> (Result<()>, Result<Vec<Extent>>) {
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    let client = NbdClient {
        uri: "nbd://fuzz".into(),
        size: 1 << 30,
        flags: FLAG_HAS_FLAGS,
        contexts: HashMap::from([(BASE_ALLOCATION.to_string(), 1)]),
        conns: vec![Conn {
            w: Mutex::new((BufWriter::new(Box::new(io::sink())), 2)),
            waiting: waiting.clone(),
        }],
        next: AtomicUsize::new(0),
        fast_zero: AtomicBool::new(true),
    };
    // Both requests wait before any reply is read, as on a wire.
    let (tx1, rx1) = mpsc::channel();
    let (tx2, rx2) = mpsc::channel();
    {
        let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
        w.waiters.insert(
            1,
            Waiter {
                read_len: 64 << 10,
                tx: tx1,
            },
        );
        w.waiters.insert(
            2,
            Waiter {
                read_len: 0,
                tx: tx2,
            },
        );
    }
    demux(io::Cursor::new(server), &waiting);
    let c = &client.conns[0];
    let mut buf = vec![0u8; 64 << 10];
    let read = client.read_reply(&rx1, c, 0, &mut buf);
    let status = client.block_status_reply(&rx2, c, 1).map(|extents| {
        let mut at = 0u64;
        extents
            .into_iter()
            .map(|(len, state)| {
                at += len as u64;
                (at - len as u64, len as u64, state)
            })
            .collect()
    });
    (read, status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_and_lies_are_refused() {
        let data = |cookie: u64, offset: u64, len: usize| {
            let mut p = offset.to_be_bytes().to_vec();
            p.extend(std::iter::repeat_n(7u8, len));
            structured(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &p)
        };
        let mut status = 1u32.to_be_bytes().to_vec();
        status.extend_from_slice(&(1u32 << 20).to_be_bytes());
        status.extend_from_slice(&STATE_ZERO.to_be_bytes());
        let status = structured(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 2, &status);
        let good = [data(1, 0, 64 << 10), status.clone()].concat();
        let (read, extents) = parse_replies(&good);
        read.unwrap();
        assert_eq!(extents.unwrap(), [(0, 1 << 20, STATE_ZERO)]);
        // Short, outside, another cookie, truncated.
        for bad in [
            data(1, 0, 4096),
            data(1, 1 << 20, 64 << 10),
            data(9, 0, 64 << 10),
            data(1, 0, 64 << 10)[..100].to_vec(),
        ] {
            let (read, _) = parse_replies(&[bad, status.clone()].concat());
            assert!(read.is_err());
        }
    }

    fn structured(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = structured_reply(flags, kind, cookie, payload.len() as u32).to_vec();
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn uris_parse_as_qemu_writes_them() {
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/a.sock").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/a.sock".into()));
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd://127.0.0.1/golden").unwrap();
        assert_eq!(u.endpoint, Endpoint::Tcp("127.0.0.1:10809".into()));
        assert_eq!(u.export, "golden");
        let u = NbdUri::parse("nbd://host:1234").unwrap();
        assert_eq!(
            (u.endpoint, u.export),
            (Endpoint::Tcp("host:1234".into()), String::new())
        );
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("nbd:///x").is_err());
        assert!(is_nbd_uri("nbd://h/x") && !is_nbd_uri("disk.img"));
    }
}
