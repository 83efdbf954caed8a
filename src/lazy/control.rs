//! The control socket of a process serving writable lazy volumes: `snapshot
//! create` and `image create --instance` ask it to snapshot what it serves
//! (it alone may pause its writers), `instance terminate` asks it to stop.
//! The socket lives in the abstract namespace, named by a digest of the
//! served overlay's or instance's canonical path, so it needs no file and
//! cannot go stale; only the same user (or root) is answered.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::format::control::{CONTROL_VERSION, MAX_MESSAGE, Op, Request, Response, Taken};
use crate::lazy::overlay::Overlay;
use crate::lazy::reader::DEFAULT_CACHE;
use crate::lazy::snapshot::{LazySnapshot, LazySnapshotOptions, snapshot_overlay};
use crate::region::catalog::Region;

/// What a control socket does with a request.
pub type Handler = dyn Fn(&Op) -> std::result::Result<Vec<Taken>, String> + Send + Sync;

/// The abstract socket name for what is served at `path`.
fn address(path: &Path) -> Result<SocketAddr> {
    let canonical = std::fs::canonicalize(path).ctx("resolve", path)?;
    let digest = blake3::hash(canonical.as_os_str().as_encoded_bytes());
    let name = format!("blocksnap/{}", &digest.to_hex()[..32]);
    SocketAddr::from_abstract_name(name.as_bytes()).ctx("name control socket for", path)
}

/// Listens for requests about what is served at `path`, handling each on
/// a thread of its own, until the process ends.
pub fn listen(path: &Path, handler: Arc<Handler>) -> Result<()> {
    let listener = UnixListener::bind_addr(&address(path)?).map_err(|e| {
        Error::AlreadyExists(format!(
            "{} is already served by another blocksnap ({e})",
            path.display()
        ))
    })?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || answer(conn, &*handler));
        }
    });
    Ok(())
}

/// Listens for requests about the writable overlay a `volume serve`
/// holds: a snapshot of it.
pub fn listen_overlay(overlay: &Arc<Overlay>) -> Result<()> {
    let target = overlay.clone();
    let source = std::fs::canonicalize(overlay.path())
        .ctx("resolve", overlay.path())?
        .display()
        .to_string();
    let handler = move |op: &Op| -> std::result::Result<Vec<Taken>, String> {
        match op {
            Op::Snapshot { .. } => {
                let region = target.base().region().clone();
                let s = snapshot_overlay(&region, &target, source.clone(), &options(op))
                    .map_err(|e| e.to_string())?;
                Ok(vec![Taken {
                    volume: source.clone(),
                    snapshot_id: s.meta.id,
                    blocks_read: s.blocks_read,
                    blocks_taken: s.blocks_taken,
                }])
            }
            Op::Stop => std::process::exit(0),
        }
    };
    listen(overlay.path(), Arc::new(handler))
}

/// The snapshot options a `Snapshot` request carries.
pub fn options(op: &Op) -> LazySnapshotOptions {
    match op {
        Op::Snapshot {
            devices: _,
            description,
            tags,
            owner,
            threads,
            no_delta,
        } => LazySnapshotOptions {
            description: description.clone(),
            tags: tags.clone(),
            owner: owner.clone(),
            threads: *threads,
            no_delta: *no_delta,
        },
        Op::Stop => LazySnapshotOptions::default(),
    }
}

fn answer(conn: UnixStream, handler: &Handler) {
    let same_user =
        crate::sys::peer_uid(&conn).is_ok_and(|uid| uid == 0 || uid == crate::sys::effective_uid());
    let mut line = String::new();
    let read = BufReader::new(&conn).take(MAX_MESSAGE).read_line(&mut line);
    let response = match (same_user, read) {
        (false, _) => failure("only the user who serves these volumes may control them".into()),
        (true, Err(e)) => failure(format!("cannot read the request: {e}")),
        (true, Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(r) if r.version > CONTROL_VERSION => failure(format!(
                "the request is of control version {}, written by a newer blocksnap: use the \
                 same version for both",
                r.version
            )),
            Ok(r) => match handler(&r.op) {
                Ok(snapshots) => Response {
                    version: CONTROL_VERSION,
                    error: None,
                    snapshots,
                },
                Err(e) => failure(e),
            },
            Err(e) => failure(format!("malformed request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&response).expect("response serializes");
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}

fn failure(error: String) -> Response {
    Response {
        version: CONTROL_VERSION,
        error: Some(error),
        snapshots: Vec::new(),
    }
}

/// Asks the process serving `path` to do `op`; `Ok(None)` when none
/// serves it.
pub fn request(path: &Path, op: Op) -> Result<Option<Vec<Taken>>> {
    let conn = match UnixStream::connect_addr(&address(path)?) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(e).ctx("connect to the server of", path),
    };
    // A stop is answered by the server going away.
    let stop = op == Op::Stop;
    let mut line = serde_json::to_vec(&Request {
        version: CONTROL_VERSION,
        op,
    })
    .expect("request serializes");
    line.push(b'\n');
    if let Err(e) = (&conn).write_all(&line) {
        // A server told to stop before is going: it was still accepting
        // connections, and closed this one as it went.
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        if stop && matches!(e.kind(), BrokenPipe | ConnectionReset) {
            return Ok(Some(Vec::new()));
        }
        return Err(e).ctx("send a request to the server of", path);
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(3600)));
    let mut reply = String::new();
    let read = BufReader::new(&conn)
        .take(MAX_MESSAGE)
        .read_line(&mut reply);
    // A server told to stop may go before it answers.
    if stop && (read.is_err() || reply.is_empty()) {
        return Ok(Some(Vec::new()));
    }
    read.ctx("read the answer of the server of", path)?;
    if reply.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the server of {} went away without answering: see its log",
            path.display()
        )));
    }
    let r: Response = serde_json::from_str(&reply).map_err(|e| {
        Error::InvalidArgument(format!(
            "the server of {} answered garbage ({e}): is it the same blocksnap version?",
            path.display()
        ))
    })?;
    match r.error {
        Some(e) => Err(Error::InvalidArgument(format!(
            "the server of {}: {e}",
            path.display()
        ))),
        None => Ok(Some(r.snapshots)),
    }
}

/// Snapshots the overlay at `path`: through the process serving it
/// (`volume serve --writable`, `volume mount --writable`) when one does,
/// else here.
pub fn snapshot_overlay_path(
    region: &Arc<Region>,
    path: &Path,
    opts: &LazySnapshotOptions,
) -> Result<LazySnapshot> {
    let op = Op::Snapshot {
        devices: Vec::new(),
        description: opts.description.clone(),
        tags: opts.tags.clone(),
        owner: opts.owner.clone(),
        threads: opts.threads,
        no_delta: opts.no_delta,
    };
    let remote = match request(path, op.clone())? {
        Some(t) => t,
        None => match Overlay::open(path, region.clone(), None, DEFAULT_CACHE) {
            Ok(overlay) => {
                let source = std::fs::canonicalize(path)
                    .ctx("resolve", path)?
                    .display()
                    .to_string();
                return snapshot_overlay(region, &Arc::new(overlay), source, opts);
            }
            // Served meanwhile: ask the server.
            Err(Error::AlreadyExists(m)) => request(path, op)?.ok_or(Error::AlreadyExists(m))?,
            Err(e) => return Err(e),
        },
    };
    let t = remote.into_iter().next().ok_or_else(|| {
        Error::InvalidArgument(format!("the server of {} took no snapshot", path.display()))
    })?;
    let meta = region.read_snapshot_meta(&t.snapshot_id).map_err(|_| {
        Error::InvalidArgument(format!(
            "the server of {} wrote {} into another store or region: give the same --store and \
             --region as it",
            path.display(),
            t.snapshot_id
        ))
    })?;
    Ok(LazySnapshot {
        meta,
        blocks_read: t.blocks_read,
        blocks_taken: t.blocks_taken,
    })
}
