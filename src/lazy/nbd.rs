//! `volume serve`: a snapshot as an NBD export, read in place; read-only,
//! or writable through an overlay and its dirty map.
//!
//! The fixed newstyle handshake with `NBD_OPT_GO`, `INFO`, `LIST`,
//! `EXPORT_NAME`, `ABORT`, structured replies and the `base:allocation`
//! meta context; commands `READ`, `BLOCK_STATUS` (holes and zero blocks
//! from the manifest), `FLUSH`, `CACHE` and `DISC`, and `EPERM` for every
//! write. One thread per connection; every field from the network is
//! checked before it is used, and a client that sends garbage or goes
//! away loses its own connection only.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::format::nbd::*;
use crate::id::{AccountId, SnapshotId};
use crate::lazy::disk::Disk;
use crate::lazy::reader::DEFAULT_CACHE;
use crate::ops::access::readable;
use crate::region::catalog::Region;
use crate::sys::LockMode;

/// The largest read a client may ask for in one request.
pub const MAX_IO: u32 = 32 << 20;
/// The one meta context served, by its id.
const ALLOCATION_CONTEXT: u32 = 1;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `HOST:PORT`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: Listen,
    /// The export's name (`nbd://HOST/NAME`); clients asking for the
    /// default export (an empty name) get it too.
    pub name: String,
    /// Bytes of decoded blocks kept in memory.
    pub cache: usize,
    /// Who serves: the snapshot must be theirs, shared with them, or public.
    /// `None`: the region's owner.
    pub caller: Option<AccountId>,
    /// Writable: writes go to this overlay file (and its dirty map,
    /// `FILE.dirty`); `None`: read-only.
    pub overlay: Option<PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: Listen::Tcp("127.0.0.1:10809".into()),
            name: String::new(),
            cache: DEFAULT_CACHE,
            caller: None,
            overlay: None,
        }
    }
}

/// What the server tells as it runs: where it listens (once it does), and
/// each failed read or lost connection, one line each.
pub trait ServeLog: Sync {
    fn listening(&self, uri: &str);
    fn line(&self, line: String);
}

/// Serves snapshot `id` until the process ends. Holds the region lock
/// shared meanwhile, so `store gc` cannot reclaim a chunk it reads.
pub fn serve(
    region: &Arc<Region>,
    id: &SnapshotId,
    opts: &ServeOptions,
    log: &dyn ServeLog,
) -> Result<()> {
    let caller = region.caller(opts.caller.as_ref());
    readable(region, id, &caller, "serve")?;
    if opts.name.len() > MAX_STRING {
        return Err(Error::InvalidArgument(format!(
            "export name of {} bytes: give at most {MAX_STRING}",
            opts.name.len()
        )));
    }
    let _lock = region.lock(LockMode::Shared, "volume serve")?;
    let disk = Disk::open(region, id, opts.overlay.as_deref(), opts.cache)?;
    serve_exports(&opts.listen, &[(opts.name.clone(), &disk)], log)
}

/// Serves `exports` (name, disk) until the process ends; a client asking
/// for the default export (an empty name) gets the first.
pub fn serve_exports(
    listen: &Listen,
    exports: &[(String, &Disk)],
    log: &dyn ServeLog,
) -> Result<()> {
    let server = Exports { list: exports, log };
    let first = exports.first().map(|e| e.0.as_str()).unwrap_or("");
    match listen {
        Listen::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .map_err(|e| Error::InvalidArgument(format!("cannot listen on {addr}: {e}")))?;
            let local = listener.local_addr().ctx("listen", &PathBuf::from(addr))?;
            log.listening(&format!("nbd://{local}/{first}"));
            std::thread::scope(|s| {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let _ = conn.set_nodelay(true);
                    let Ok(reader) = conn.try_clone() else {
                        continue;
                    };
                    let server = &server;
                    s.spawn(move || server.connection(Box::new(reader), Box::new(conn)));
                }
            });
        }
        Listen::Unix(path) => {
            let listener = bind_unix(path)?;
            log.listening(&format!("nbd+unix:///{first}?socket={}", path.display()));
            std::thread::scope(|s| {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let Ok(reader) = conn.try_clone() else {
                        continue;
                    };
                    let server = &server;
                    s.spawn(move || server.connection(Box::new(reader), Box::new(conn)));
                }
            });
        }
    }
    Ok(())
}

/// Binds a Unix socket at `path`, replacing a stale one (left by a server
/// that was killed) but never a live one or anything else.
fn bind_unix(path: &PathBuf) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        let live = UnixStream::connect(path).is_ok();
        if !m.file_type().is_socket() || live {
            return Err(Error::AlreadyExists(format!(
                "{} exists{}: pick another --socket path",
                path.display(),
                if live {
                    " and a server answers there"
                } else {
                    ""
                }
            )));
        }
        std::fs::remove_file(path).ctx("remove stale socket", path)?;
    }
    UnixListener::bind(path).ctx("listen on socket", path)
}

struct Exports<'a> {
    list: &'a [(String, &'a Disk)],
    log: &'a dyn ServeLog,
}

/// What option haggling settled.
struct Session {
    structured: bool,
    allocation: bool,
}

impl Exports<'_> {
    fn connection(&self, r: Box<dyn Read + Send>, w: Box<dyn Write + Send>) {
        let mut conn = Conn {
            r: BufReader::new(r),
            w: BufWriter::new(w),
        };
        if let Err(e) = self.run(&mut conn) {
            // A client that goes away without NBD_CMD_DISC, even in the
            // middle of a reply, is ordinary.
            let gone = [
                io::ErrorKind::UnexpectedEof,
                io::ErrorKind::BrokenPipe,
                io::ErrorKind::ConnectionReset,
            ];
            if !gone.contains(&e.kind()) {
                self.log.line(format!("nbd connection ended: {e}"));
            }
        }
    }

    fn run(&self, c: &mut Conn) -> io::Result<()> {
        c.w.write_all(&NBD_MAGIC.to_be_bytes())?;
        c.w.write_all(&IHAVEOPT.to_be_bytes())?;
        c.w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        c.w.flush()?;
        let client = c.u32()?;
        if client & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(bad("the client does not speak fixed newstyle"));
        }
        let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
        let mut session = Session {
            structured: false,
            allocation: false,
        };
        loop {
            if c.u64()? != IHAVEOPT {
                return Err(bad("an option without its magic"));
            }
            let option = c.u32()?;
            let len = c.u32()?;
            if len > MAX_OPTION_LEN {
                return Err(bad("an option longer than 64 KiB"));
            }
            let mut data = vec![0u8; len as usize];
            c.r.read_exact(&mut data)?;
            match option {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    let Some(disk) = self.find(&name) else {
                        return Err(bad("an unknown export name"));
                    };
                    c.w.write_all(&disk.size().to_be_bytes())?;
                    c.w.write_all(&flags(disk).to_be_bytes())?;
                    if !no_zeroes {
                        c.w.write_all(&[0u8; 124])?;
                    }
                    c.w.flush()?;
                    return self.transmission(c, disk, &session);
                }
                OPT_ABORT => {
                    c.reply(option, REP_ACK, &[])?;
                    return Ok(());
                }
                OPT_LIST => {
                    for (name, _) in self.list {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        c.reply(option, REP_SERVER, &d)?;
                    }
                    c.reply(option, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    if let Some(disk) = self.info(c, option, &data)?
                        && option == OPT_GO
                    {
                        return self.transmission(c, disk, &session);
                    }
                }
                OPT_STRUCTURED_REPLY if data.is_empty() => {
                    session.structured = true;
                    c.reply(option, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(c, option, &data, &mut session)?;
                }
                OPT_STRUCTURED_REPLY => c.reply(option, REP_ERR_INVALID, &[])?,
                _ => c.reply(option, REP_ERR_UNSUP, &[])?,
            }
        }
    }

    /// 0 for success, or `EIO` with one logged line.
    fn done(&self, r: Result<()>) -> u32 {
        match r {
            Ok(()) => 0,
            Err(e) => {
                self.log.line(format!("write failed: {e}"));
                EIO
            }
        }
    }

    /// The export called `name`; the empty name is the first.
    fn find(&self, name: &str) -> Option<&Disk> {
        self.list
            .iter()
            .find(|(n, _)| n == name)
            .or(self.list.first().filter(|_| name.is_empty()))
            .map(|(_, d)| *d)
    }

    /// Answers `NBD_OPT_INFO`/`GO`; the export, if found.
    fn info(&self, c: &mut Conn, option: u32, data: &[u8]) -> io::Result<Option<&Disk>> {
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name = r.string()?;
            let n = r.u16()?;
            let wants: Option<Vec<u16>> = (0..n).map(|_| r.u16()).collect();
            wants?;
            r.is_empty().then_some(name)
        })();
        let Some(name) = parsed else {
            c.reply(option, REP_ERR_INVALID, &[])?;
            return Ok(None);
        };
        let Some(disk) = self.find(&name) else {
            c.reply(option, REP_ERR_UNKNOWN, &[])?;
            return Ok(None);
        };
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&disk.size().to_be_bytes());
        export.extend_from_slice(&flags(disk).to_be_bytes());
        c.reply(option, REP_INFO, &export)?;
        let preferred = disk.block_size().min(MAX_IO);
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, preferred, MAX_IO] {
            sizes.extend_from_slice(&v.to_be_bytes());
        }
        c.reply(option, REP_INFO, &sizes)?;
        c.reply(option, REP_ACK, &[])?;
        Ok(Some(disk))
    }

    fn meta_context(
        &self,
        c: &mut Conn,
        option: u32,
        data: &[u8],
        session: &mut Session,
    ) -> io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name = r.string()?;
            let n = r.u32()?;
            if n as usize > MAX_OPTION_LEN as usize / 4 {
                return None;
            }
            let queries: Option<Vec<String>> = (0..n).map(|_| r.string()).collect();
            r.is_empty().then_some((name, queries?))
        })();
        let Some((name, queries)) = parsed else {
            return c.reply(option, REP_ERR_INVALID, &[]);
        };
        if set && !session.structured {
            return c.reply(option, REP_ERR_INVALID, &[]);
        }
        if self.find(&name).is_none() {
            return c.reply(option, REP_ERR_UNKNOWN, &[]);
        }
        // Listing with no query, or with the namespace `base:`, lists all.
        let matched = queries.iter().any(|q| q == BASE_ALLOCATION)
            || (!set && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
        if matched {
            let mut d = ALLOCATION_CONTEXT.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            c.reply(option, REP_META_CONTEXT, &d)?;
        }
        if set {
            session.allocation = matched;
        }
        c.reply(option, REP_ACK, &[])
    }

    fn transmission(&self, c: &mut Conn, disk: &Disk, session: &Session) -> io::Result<()> {
        let size = disk.size();
        let mut buf = Vec::new();
        loop {
            let mut head = [0u8; REQUEST_LEN];
            c.r.read_exact(&mut head)?;
            let Some(req) = Request::decode(&head) else {
                return Err(bad("a request without its magic"));
            };
            let in_bounds = req
                .offset
                .checked_add(req.length as u64)
                .is_some_and(|end| end <= size);
            match req.kind {
                CMD_DISC => return Ok(()),
                CMD_WRITE => {
                    // The payload follows the request: read it, or give up
                    // on a client that would send more than any write may
                    // hold.
                    if req.length > MAX_IO {
                        return Err(bad("a write larger than 32 MiB"));
                    }
                    buf.resize(req.length as usize, 0);
                    c.r.read_exact(&mut buf)?;
                    let error = if !disk.writable() {
                        EPERM
                    } else if !in_bounds {
                        EINVAL
                    } else {
                        self.done(disk.write_at(req.offset, Some(&buf), req.length as u64))
                    };
                    c.status(session, req.cookie, error)?;
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    let error = if !disk.writable() {
                        EPERM
                    } else if !in_bounds {
                        EINVAL
                    } else {
                        self.done(disk.write_at(req.offset, None, req.length as u64))
                    };
                    c.status(session, req.cookie, error)?;
                }
                CMD_FLUSH => {
                    let error = self.done(disk.flush());
                    c.status(session, req.cookie, error)?;
                }
                CMD_CACHE => c.ok(req.cookie)?,
                CMD_READ if req.length > MAX_IO => c.error(session, req.cookie, EOVERFLOW)?,
                CMD_READ if !in_bounds => c.error(session, req.cookie, EINVAL)?,
                CMD_READ => {
                    buf.resize(req.length as usize, 0);
                    match disk.read_at(req.offset, &mut buf) {
                        Ok(()) => c.data(session, req.cookie, req.offset, &buf)?,
                        Err(e) => {
                            self.log
                                .line(format!("read failed at offset {}: {e}", req.offset));
                            c.error(session, req.cookie, EIO)?
                        }
                    }
                }
                CMD_BLOCK_STATUS if !session.allocation => c.error(session, req.cookie, EINVAL)?,
                CMD_BLOCK_STATUS if !in_bounds || req.length == 0 => {
                    c.error(session, req.cookie, EINVAL)?
                }
                CMD_BLOCK_STATUS => {
                    let Ok(mut runs) = disk.extents(req.offset, req.length as u64) else {
                        c.error(session, req.cookie, EIO)?;
                        continue;
                    };
                    if req.flags & CMD_FLAG_REQ_ONE != 0 {
                        runs.truncate(1);
                    }
                    c.block_status(req.cookie, &runs)?;
                }
                _ => c.error(session, req.cookie, EINVAL)?,
            }
        }
    }
}

/// Transmission flags: read-only or writable (through one shared disk, so
/// a flush on any connection covers all: safe over several connections
/// either way).
fn flags(disk: &Disk) -> u16 {
    let base = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
    if disk.writable() {
        base | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    } else {
        base | FLAG_READ_ONLY
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("protocol error: {what}"),
    )
}

/// One client's buffered stream.
struct Conn {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
}

impl Conn {
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.w
            .write_all(&option_reply(option, kind, data.len() as u32))?;
        self.w.write_all(data)?;
        self.w.flush()
    }

    /// A reply with no data: success, or `error`.
    fn status(&mut self, session: &Session, cookie: u64, error: u32) -> io::Result<()> {
        if error == 0 {
            self.ok(cookie)
        } else {
            self.error(session, cookie, error)
        }
    }

    fn ok(&mut self, cookie: u64) -> io::Result<()> {
        self.w.write_all(&simple_reply(0, cookie))?;
        self.w.flush()
    }

    fn error(&mut self, session: &Session, cookie: u64, error: u32) -> io::Result<()> {
        if session.structured {
            let mut payload = error.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u16.to_be_bytes());
            self.w.write_all(&structured_reply(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                payload.len() as u32,
            ))?;
            self.w.write_all(&payload)?;
        } else {
            self.w.write_all(&simple_reply(error, cookie))?;
        }
        self.w.flush()
    }

    fn data(&mut self, session: &Session, cookie: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        if session.structured {
            self.w.write_all(&structured_reply(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + data.len() as u32,
            ))?;
            self.w.write_all(&offset.to_be_bytes())?;
        } else {
            self.w.write_all(&simple_reply(0, cookie))?;
        }
        self.w.write_all(data)?;
        self.w.flush()
    }

    fn block_status(&mut self, cookie: u64, runs: &[(u64, bool)]) -> io::Result<()> {
        let mut payload = ALLOCATION_CONTEXT.to_be_bytes().to_vec();
        for &(len, data) in runs {
            // A run is within one request, whose length is a u32.
            payload.extend_from_slice(&(len as u32).to_be_bytes());
            let state = if data { 0 } else { STATE_HOLE | STATE_ZERO };
            payload.extend_from_slice(&state.to_be_bytes());
        }
        self.w.write_all(&structured_reply(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            payload.len() as u32,
        ))?;
        self.w.write_all(&payload)?;
        self.w.flush()
    }
}
