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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
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

/// One connection: a stream and the next request's cookie.
struct Conn {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    cookie: u64,
}

/// A run of a meta context: offset, length, state.
pub type Extent = (u64, u64, u32);

/// A connected export.
pub struct NbdClient {
    uri: String,
    size: u64,
    flags: u16,
    /// Meta contexts the server agreed to, by name.
    contexts: HashMap<String, u32>,
    conns: Vec<Mutex<Conn>>,
    /// Where a caller that finds every connection busy waits next.
    next: AtomicUsize,
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
            conns: vec![Mutex::new(first.conn)],
            next: AtomicUsize::new(0),
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
                client.conns.push(Mutex::new(more.conn));
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

    /// A free connection, or the first to come free.
    fn conn(&self) -> MutexGuard<'_, Conn> {
        for c in &self.conns {
            if let Ok(g) = c.try_lock() {
                return g;
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].lock().unwrap_or_else(|p| p.into_inner())
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

    /// Fills `buf` from `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        for (k, part) in buf.chunks_mut(MAX_REQUEST as usize).enumerate() {
            let at = offset + k as u64 * MAX_REQUEST as u64;
            let mut c = self.conn();
            self.read_one(&mut c, at, part)
                .map_err(|e| self.io_fail("read", e))??;
        }
        Ok(())
    }

    fn io_fail(&self, op: &'static str, e: io::Error) -> Error {
        let reason = match e.kind() {
            io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
            _ => e.to_string(),
        };
        self.fail(op, reason)
    }

    /// One read request; the outer error is the connection's, the inner
    /// the server's answer.
    fn read_one(&self, c: &mut Conn, offset: u64, buf: &mut [u8]) -> io::Result<Result<()>> {
        let cookie = send(c, CMD_READ, 0, offset, buf.len() as u32, &[])?;
        // Which bytes arrived: every byte must, exactly once.
        let mut covered = 0u64;
        loop {
            let header = read_header(c)?;
            match header {
                ReplyHeader::Simple { error, cookie: k } => {
                    if k != cookie {
                        return Err(bad_reply("a reply to another request"));
                    }
                    if error != 0 {
                        return Ok(Err(
                            self.fail("read", format!("the server answered error {error}"))
                        ));
                    }
                    c.r.read_exact(buf)?;
                    return Ok(Ok(()));
                }
                ReplyHeader::Structured {
                    flags,
                    kind,
                    cookie: k,
                    len,
                } => {
                    if k != cookie {
                        return Err(bad_reply("a reply to another request"));
                    }
                    if len > MAX_PAYLOAD {
                        return Err(bad_reply("a reply chunk over 64 MiB"));
                    }
                    match kind {
                        REPLY_TYPE_OFFSET_DATA => {
                            let mut head = [0u8; 8];
                            if len < 8 {
                                return Err(bad_reply("a data chunk without its offset"));
                            }
                            c.r.read_exact(&mut head)?;
                            let at = u64::from_be_bytes(head);
                            let n = (len - 8) as u64;
                            let from = at.checked_sub(offset).filter(|f| {
                                f.checked_add(n).is_some_and(|end| end <= buf.len() as u64)
                            });
                            let Some(from) = from else {
                                return Err(bad_reply("data outside the request"));
                            };
                            c.r.read_exact(&mut buf[from as usize..(from + n) as usize])?;
                            covered += n;
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let mut p = [0u8; 12];
                            if len != 12 {
                                return Err(bad_reply("a hole chunk of the wrong length"));
                            }
                            c.r.read_exact(&mut p)?;
                            let at = u64::from_be_bytes(p[..8].try_into().expect("8"));
                            let n = u32::from_be_bytes(p[8..].try_into().expect("4")) as u64;
                            let from = at.checked_sub(offset).filter(|f| {
                                f.checked_add(n).is_some_and(|end| end <= buf.len() as u64)
                            });
                            let Some(from) = from else {
                                return Err(bad_reply("a hole outside the request"));
                            };
                            buf[from as usize..(from + n) as usize].fill(0);
                            covered += n;
                        }
                        REPLY_TYPE_NONE if len == 0 => {}
                        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                            let mut p = vec![0u8; len as usize];
                            c.r.read_exact(&mut p)?;
                            let (error, msg) = decode_error(&p)
                                .ok_or_else(|| bad_reply("a malformed error chunk"))?;
                            // The rest of the reply still follows.
                            if flags & REPLY_FLAG_DONE == 0 {
                                drain(c, cookie)?;
                            }
                            return Ok(Err(self.fail(
                                "read",
                                format!("the server answered error {error}: {msg}"),
                            )));
                        }
                        _ => return Err(bad_reply("a reply chunk of a type a read never gets")),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        if covered != buf.len() as u64 {
                            return Err(bad_reply("a read answered short"));
                        }
                        return Ok(Ok(()));
                    }
                }
            }
        }
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range("write", offset, data.len() as u64)?;
        for (k, part) in data.chunks(MAX_REQUEST as usize).enumerate() {
            let at = offset + k as u64 * MAX_REQUEST as u64;
            self.simple_command("write", CMD_WRITE, 0, at, part.len() as u32, part)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: `WRITE_ZEROES` where
    /// the server offers it (letting it punch a hole), else written zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range("write zeros to", offset, len)?;
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(MAX_REQUEST as u64) as u32;
            if self.flags & FLAG_SEND_WRITE_ZEROES != 0 {
                self.simple_command("write zeros to", CMD_WRITE_ZEROES, 0, at, n, &[])?;
            } else {
                self.simple_command("write", CMD_WRITE, 0, at, n, &vec![0u8; n as usize])?;
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Asks the server to make every write durable.
    pub fn flush(&self) -> Result<()> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        // Each connection's own writes.
        for c in &self.conns {
            let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
            let r = (|| {
                let cookie = send(&mut c, CMD_FLUSH, 0, 0, 0, &[])?;
                self.status_reply(&mut c, cookie, "flush")
            })();
            r.map_err(|e| self.io_fail("flush", e))??;
        }
        Ok(())
    }

    fn simple_command(
        &self,
        op: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<()> {
        let mut c = self.conn();
        let r = (|| {
            let cookie = send(&mut c, kind, flags, offset, len, payload)?;
            self.status_reply(&mut c, cookie, op)
        })();
        r.map_err(|e| self.io_fail(op, e))?
    }

    /// The reply to a command without data: success or an error.
    fn status_reply(&self, c: &mut Conn, cookie: u64, op: &'static str) -> io::Result<Result<()>> {
        loop {
            match read_header(c)? {
                ReplyHeader::Simple { error, cookie: k } if k == cookie => {
                    return Ok(if error == 0 {
                        Ok(())
                    } else {
                        Err(self.fail(op, format!("the server answered error {error}")))
                    });
                }
                ReplyHeader::Structured {
                    flags,
                    kind,
                    cookie: k,
                    len,
                } if k == cookie => {
                    if len > MAX_PAYLOAD {
                        return Err(bad_reply("a reply chunk over 64 MiB"));
                    }
                    let mut p = vec![0u8; len as usize];
                    c.r.read_exact(&mut p)?;
                    if kind == REPLY_TYPE_ERROR || kind == REPLY_TYPE_ERROR_OFFSET {
                        let (error, msg) =
                            decode_error(&p).ok_or_else(|| bad_reply("a malformed error chunk"))?;
                        if flags & REPLY_FLAG_DONE == 0 {
                            drain(c, cookie)?;
                        }
                        return Ok(Err(
                            self.fail(op, format!("the server answered error {error}: {msg}"))
                        ));
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(Ok(()));
                    }
                }
                _ => return Err(bad_reply("a reply to another request")),
            }
        }
    }

    /// The extents of meta context `context` over `[offset, offset + len)`:
    /// (offset, length, state), in order and covering the range (the
    /// server may answer a request in part: it is asked again from where
    /// its answer ended).
    pub fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, u32)>> {
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
            let mut c = self.conn();
            let got = self
                .block_status_one(&mut c, id, at, n)
                .map_err(|e| self.io_fail("query", e))??;
            drop(c);
            let mut pos = at;
            for (l, state) in got {
                let l = (l as u64).min(end - pos);
                out.push((pos, l, state));
                pos += l;
                if pos >= end {
                    break;
                }
            }
            if pos == at {
                return Err(self.fail("query", "an empty block status answer".into()));
            }
            at = pos;
        }
        Ok(out)
    }

    fn block_status_one(
        &self,
        c: &mut Conn,
        id: u32,
        offset: u64,
        len: u32,
    ) -> io::Result<Result<Vec<(u32, u32)>>> {
        let cookie = send(c, CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut extents = Vec::new();
        loop {
            match read_header(c)? {
                ReplyHeader::Simple { error, cookie: k } if k == cookie => {
                    // A simple reply to BLOCK_STATUS can only be an error.
                    return Ok(Err(
                        self.fail("query", format!("the server answered error {error}"))
                    ));
                }
                ReplyHeader::Structured {
                    flags,
                    kind,
                    cookie: k,
                    len,
                } if k == cookie => {
                    if len > MAX_PAYLOAD {
                        return Err(bad_reply("a reply chunk over 64 MiB"));
                    }
                    let mut p = vec![0u8; len as usize];
                    c.r.read_exact(&mut p)?;
                    match kind {
                        REPLY_TYPE_BLOCK_STATUS => {
                            let (ctx, e) = decode_block_status(&p)
                                .ok_or_else(|| bad_reply("a malformed block status chunk"))?;
                            if ctx == id {
                                extents = e;
                            }
                        }
                        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                            let (error, msg) = decode_error(&p)
                                .ok_or_else(|| bad_reply("a malformed error chunk"))?;
                            if flags & REPLY_FLAG_DONE == 0 {
                                drain(c, cookie)?;
                            }
                            return Ok(Err(self.fail(
                                "query",
                                format!("the server answered error {error}: {msg}"),
                            )));
                        }
                        REPLY_TYPE_NONE => {}
                        _ => {
                            return Err(bad_reply(
                                "a reply chunk of a type block status never gets",
                            ));
                        }
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        if extents.is_empty() {
                            return Err(bad_reply("block status without the context asked for"));
                        }
                        return Ok(Ok(extents));
                    }
                }
                _ => return Err(bad_reply("a reply to another request")),
            }
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        for c in &self.conns {
            if let Ok(mut c) = c.lock() {
                let _ = send(&mut c, CMD_DISC, 0, 0, 0, &[]);
            }
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

fn bad_reply(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the server sent {what}"),
    )
}

fn send(
    c: &mut Conn,
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> io::Result<u64> {
    c.cookie += 1;
    let req = Request {
        flags,
        kind,
        cookie: c.cookie,
        offset,
        length,
    };
    c.w.write_all(&req.encode())?;
    c.w.write_all(payload)?;
    c.w.flush()?;
    Ok(c.cookie)
}

fn read_header(c: &mut Conn) -> io::Result<ReplyHeader> {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    c.r.read_exact(&mut b[..4])?;
    let rest = ReplyHeader::rest_len(b[..4].try_into().expect("4"))
        .ok_or_else(|| bad_reply("a reply without its magic"))?;
    c.r.read_exact(&mut b[4..4 + rest])?;
    ReplyHeader::decode(&b[..4 + rest]).ok_or_else(|| bad_reply("a malformed reply header"))
}

/// Reads and drops the remaining chunks of reply `cookie`.
fn drain(c: &mut Conn, cookie: u64) -> io::Result<()> {
    loop {
        match read_header(c)? {
            ReplyHeader::Structured {
                flags,
                cookie: k,
                len,
                ..
            } if k == cookie && len <= MAX_PAYLOAD => {
                io::copy(&mut (&mut c.r).take(len as u64), &mut io::sink())?;
                if flags & REPLY_FLAG_DONE != 0 {
                    return Ok(());
                }
            }
            _ => return Err(bad_reply("a reply to another request")),
        }
    }
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
    let mut conn = Conn {
        r: BufReader::with_capacity(1 << 20, r),
        w: BufWriter::new(w),
        cookie: 0,
    };
    handshake(&mut conn, uri, contexts)
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
        .map(|(size, flags, contexts)| Negotiated {
            conn,
            size,
            flags,
            contexts,
        })
}

/// The handshake: the outer error is the connection's, the inner the
/// server's refusal.
type Handshake = std::result::Result<(u64, u16, HashMap<String, u32>), String>;

fn handshake(c: &mut Conn, uri: &NbdUri, contexts: &[String]) -> io::Result<Handshake> {
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
fn option_reply(c: &mut Conn, option: u32) -> io::Result<(u32, Vec<u8>)> {
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
    let conn = Conn {
        r: BufReader::new(Box::new(io::Cursor::new(server.to_vec()))),
        w: BufWriter::new(Box::new(io::sink())),
        cookie: 0,
    };
    let client = NbdClient {
        uri: "nbd://fuzz".into(),
        size: 1 << 30,
        flags: FLAG_HAS_FLAGS,
        contexts: HashMap::from([(BASE_ALLOCATION.to_string(), 1)]),
        conns: vec![Mutex::new(conn)],
        next: AtomicUsize::new(0),
    };
    let mut buf = vec![0u8; 64 << 10];
    let read = client.read(0, &mut buf);
    let status = client.block_status(BASE_ALLOCATION, 0, 1 << 20);
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
