//! `blocksnap serve`: an HTTP server that owns the store and answers AWS's
//! own protocols, so that every request is made by an account that proved
//! it holds a key (AWS Signature Version 4), and AWS's clients work
//! against blocksnap.
//!
//! One tokio runtime accepts connections (at most `max_connections` at
//! once; headers must arrive within `header_timeout`, bodies within
//! `body_timeout` and at most `MAX_BODY` bytes), and each request's work,
//! which reads and writes the store, runs on the blocking pool through the
//! same library calls the CLI makes: permissions are checked by one
//! implementation. SIGTERM or SIGINT stops accepting, lets requests in
//! flight finish (at most `drain`), and returns.

pub mod accounts;
pub mod client;
mod ebs;
mod ec2;
mod query;
pub mod remote;
pub mod sigv4;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::id::{AccountId, SnapshotId};
use crate::region::catalog::{DEFAULT_REGION, Region};

use accounts::{Account, Accounts, FileVersion};
use ebs::Uploads;

/// The largest request body: one 512 KiB block and room for its framing.
pub const MAX_BODY: usize = (512 << 10) + (64 << 10);

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: String,
    pub max_connections: usize,
    /// A client must send a request's headers within this.
    pub header_timeout: Duration,
    /// ... and its body within this.
    pub body_timeout: Duration,
    /// On SIGTERM, how long requests in flight may take to finish.
    pub drain: Duration,
    /// Serve HTTPS with this certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: "127.0.0.1:8080".into(),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// One line per request: who, what, how it ended, how long it took.
#[derive(Debug, Clone)]
pub struct RequestLog {
    pub remote: SocketAddr,
    pub account: Option<AccountId>,
    pub operation: &'static str,
    pub status: u16,
    pub error: Option<&'static str>,
    pub elapsed: Duration,
}

impl std::fmt::Display for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} account={} op={} status={}",
            self.remote,
            self.account.as_ref().map_or("-", |a| a.as_str()),
            self.operation,
            self.status
        )?;
        if let Some(e) = self.error {
            write!(f, " error={e}")?;
        }
        write!(f, " ms={:.1}", self.elapsed.as_secs_f64() * 1e3)
    }
}

type Log = Arc<dyn Fn(&RequestLog) + Send + Sync>;

/// What the server shares between requests.
struct State {
    root: PathBuf,
    accounts: Accounts,
    /// The key file as last read, and its fingerprint.
    keys: Mutex<(Option<FileVersion>, Vec<Account>)>,
    regions: Mutex<HashMap<String, Arc<Region>>>,
    uploads: Uploads,
    copies: ec2::CopyTokens,
}

impl State {
    /// The account and secret of access key `id`, from the key file as it
    /// is now.
    fn secret_of(&self, id: &str) -> Result<Option<(AccountId, String)>> {
        let version = self.accounts.version();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.0 != version || version.is_none() {
            *keys = (version, self.accounts.list()?);
        }
        Ok(accounts::find_key(&keys.1, id).map(|(a, k)| (a, k.secret_access_key)))
    }

    fn region(&self, name: &str) -> Result<Arc<Region>> {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = regions.get(name) {
            return Ok(r.clone());
        }
        // As in the CLI, only the default region is created on first use.
        let opened = if name == DEFAULT_REGION {
            Region::open_or_create(&self.root, name)
        } else {
            Region::open(&self.root, name)
        };
        let r = Arc::new(opened.map_err(|e| match e {
            Error::NotFound(_) => Error::InvalidArgument(format!(
                "this server has no region {name}: sign requests for one of its regions \
                 (blocksnap region list)"
            )),
            e => e,
        })?);
        regions.insert(name.to_string(), r.clone());
        Ok(r)
    }
}

/// Serves the store at `store_root` until SIGTERM or SIGINT. `ready` is
/// called with the address listened on once connections are accepted;
/// `log` with each request's line.
pub fn serve(
    store_root: &Path,
    opts: &ServeOptions,
    ready: &dyn Fn(SocketAddr),
    log: Log,
) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.clamp(2, 8))
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .ctx("start the server's runtime", store_root)?;
    let _serving = serving_lock(store_root)?;
    let state = Arc::new(State {
        root: store_root.to_path_buf(),
        accounts: Accounts::of_store(store_root),
        keys: Mutex::new((None, Vec::new())),
        regions: Mutex::new(HashMap::new()),
        uploads: Uploads::journaled(store_root.join("server").join("uploads")),
        copies: ec2::CopyTokens::default(),
    });
    // Uploads a killed server left carry on, before anyone can ask.
    for line in state.uploads.recover(&|name| state.region(name)) {
        eprintln!("blocksnap: {line}");
    }
    runtime.block_on(run(state, opts.clone(), ready, log))
}

/// One server to a store, for as long as it runs: a second would take up
/// the uploads the first is writing as its own (both appending to their
/// journals, each completing or expiring them), so it is refused.
fn serving_lock(root: &Path) -> Result<std::fs::File> {
    use crate::region::backend::{holder_of, open_lock_file, try_flock};
    // The directory of the key file: made private, as `account create`
    // makes it.
    let dir = root.join("server");
    accounts::private_dir(&dir)?;
    let path = dir.join("serve.lock");
    let mut file = open_lock_file(&path)?;
    if !try_flock(
        &mut file,
        &path,
        crate::sys::LockMode::Exclusive,
        "blocksnap serve",
    )? {
        return Err(Error::Conflict(format!(
            "store {} is served already ({}): stop that server first, or serve another store",
            root.display(),
            holder_of(&mut file)
        )));
    }
    Ok(file)
}

async fn run(
    state: Arc<State>,
    opts: ServeOptions,
    ready: &dyn Fn(SocketAddr),
    log: Log,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let tls = match &opts.tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| Error::InvalidArgument(format!("cannot listen on {}: {e}", opts.listen)))?;
    let addr = listener
        .local_addr()
        .ctx("read the address of", Path::new(&opts.listen))?;
    let mut term = signal(SignalKind::terminate()).ctx("catch SIGTERM", Path::new("serve"))?;
    let mut int = signal(SignalKind::interrupt()).ctx("catch SIGINT", Path::new("serve"))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Uploads past their Timeout are dropped; their chunks await gc.
    let expiring = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let s = expiring.clone();
            let _ = tokio::task::spawn_blocking(move || s.uploads.expire(Instant::now())).await;
        }
    });
    ready(addr);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let (stream, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                // Out of descriptors, say: wait a moment, do not spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let log = log.clone();
        let opts = opts.clone();
        let stop = stop_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                // The handshake, too, must end within the header timeout.
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(opts.header_timeout, acceptor.accept(stream)).await;
                    if let Ok(Ok(stream)) = accepted {
                        connection(stream, remote, state, opts, log, stop).await;
                    }
                }
                None => connection(stream, remote, state, opts, log, stop).await,
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Wait for the connections to finish, at most `drain`.
    let all = opts.max_connections as u32;
    let _ = tokio::time::timeout(opts.drain, slots.acquire_many(all)).await;
    Ok(())
}

/// Serves one connection's requests until it ends, or finishes the one in
/// flight once `stop` changes.
async fn connection<I>(
    io: I,
    remote: SocketAddr,
    state: Arc<State>,
    opts: ServeOptions,
    log: Log,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let body_timeout = opts.body_timeout;
    let service = hyper::service::service_fn(move |req| {
        handle(state.clone(), req, remote, body_timeout, log.clone())
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout)
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// TLS from a PEM certificate chain and private key, TLS 1.2 and 1.3.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        Error::InvalidArgument(format!(
            "cannot read the TLS {what} {}: {e} (give a PEM file)",
            path.display()
        ))
    };
    // A FIFO or a device would block or never end: only regular files.
    for (what, path) in [("certificate", cert), ("private key", key)] {
        if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            return Err(bad(what, path, &"it is not a regular file"));
        }
    }
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("certificate", cert, &e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad("certificate", cert, &e))?;
    if certs.is_empty() {
        return Err(bad("certificate", cert, &"no certificate in it"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("private key", key, &e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "the TLS certificate {} and key {} do not make a server: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    remote: SocketAddr,
    body_timeout: Duration,
    log: Log,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let too_large = || {
        Reply::error(
            413,
            "RequestEntityTooLarge",
            &format!("a request body is at most {MAX_BODY} bytes"),
        )
    };
    // A body declared too large is refused before any of it is read: the
    // connection is not held for a body that could never be taken.
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let collected = match declared {
        Some(n) if n > MAX_BODY as u64 => None,
        _ => Some(tokio::time::timeout(body_timeout, Limited::new(body, MAX_BODY).collect()).await),
    };
    let (reply, account, operation) = match collected {
        None => (too_large(), None, "-"),
        Some(Err(_)) => (
            Reply::error(
                408,
                "RequestTimeout",
                "the request body did not arrive in time",
            ),
            None,
            "-",
        ),
        Some(Ok(Err(e))) if e.is::<http_body_util::LengthLimitError>() => (too_large(), None, "-"),
        Some(Ok(Err(_))) => (
            Reply::error(400, "IncompleteBody", "the request body was cut short"),
            None,
            "-",
        ),
        Some(Ok(Ok(body))) => {
            let body = body.to_bytes();
            let s = state.clone();
            match tokio::task::spawn_blocking(move || dispatch(&s, &parts, &body)).await {
                Ok(r) => r,
                Err(_) => (
                    Reply::error(500, "InternalFailure", "the request's handler failed"),
                    None,
                    "-",
                ),
            }
        }
    };
    log(&RequestLog {
        remote,
        account,
        operation,
        status: reply.status,
        error: reply.code,
        elapsed: started.elapsed(),
    });
    Ok(reply.into_response())
}

/// An operation, from the request's method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    StartSnapshot,
    PutSnapshotBlock(String, String),
    CompleteSnapshot(String),
    ListSnapshotBlocks(String),
    GetSnapshotBlock(String, String),
    ListChangedBlocks(String),
    /// EC2's Query API: the action is a parameter.
    Ec2,
}

impl Route {
    fn of(method: &Method, path: &str) -> Option<Route> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let s = |i: usize| segs[i].to_string();
        Some(match (method.as_str(), segs.as_slice()) {
            ("POST", ["snapshots"]) => Route::StartSnapshot,
            ("PUT", ["snapshots", _, "blocks", _]) => Route::PutSnapshotBlock(s(1), s(3)),
            ("POST", ["snapshots", "completion", _]) => Route::CompleteSnapshot(s(2)),
            ("GET", ["snapshots", _, "blocks"]) => Route::ListSnapshotBlocks(s(1)),
            ("GET", ["snapshots", _, "blocks", _]) => Route::GetSnapshotBlock(s(1), s(3)),
            ("GET", ["snapshots", _, "changedblocks"]) => Route::ListChangedBlocks(s(1)),
            ("POST" | "GET", [""]) => Route::Ec2,
            _ => return None,
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Route::StartSnapshot => "StartSnapshot",
            Route::PutSnapshotBlock(..) => "PutSnapshotBlock",
            Route::CompleteSnapshot(_) => "CompleteSnapshot",
            Route::ListSnapshotBlocks(_) => "ListSnapshotBlocks",
            Route::GetSnapshotBlock(..) => "GetSnapshotBlock",
            Route::ListChangedBlocks(_) => "ListChangedBlocks",
            Route::Ec2 => "ec2",
        }
    }

    /// The service a request for this route must be signed for.
    fn service(&self) -> &'static str {
        match self {
            Route::Ec2 => "ec2",
            _ => "ebs",
        }
    }
}

/// Authenticates and answers one request.
fn dispatch(
    state: &State,
    parts: &http::request::Parts,
    body: &[u8],
) -> (Reply, Option<AccountId>, &'static str) {
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let route = Route::of(&parts.method, path);
    // An EC2 action is named by its parameters: the form body of a POST,
    // the query of a GET.
    let ec2_params = (route == Some(Route::Ec2)).then(|| {
        let mut p = parse_params(query);
        if parts.method == Method::POST {
            p.extend(parse_params(&String::from_utf8_lossy(body)));
        }
        p
    });
    let op = match (&route, &ec2_params) {
        (_, Some(p)) => ec2_action_name(p),
        (Some(r), None) => r.name(),
        (None, None) => "-",
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let req = sigv4::Request {
        method: parts.method.as_str(),
        path,
        query,
        headers: &parts.headers,
        body,
    };
    let mut lookup_failed = None;
    let verified = sigv4::verify(
        &req,
        now,
        matches!(route, Some(Route::PutSnapshotBlock(..))),
        |id| match state.secret_of(id) {
            Ok(found) => found,
            Err(e) => {
                lookup_failed = Some(e);
                None
            }
        },
    );
    if let Some(e) = lookup_failed {
        return (Reply::from_error(&e), None, op);
    }
    let caller = match verified {
        Ok(c) => c,
        Err(e) => {
            let status = match e {
                sigv4::AuthError::PayloadHashMismatch => 400,
                _ => 403,
            };
            // Each protocol's clients parse errors in its own shape.
            let reply = if route == Some(Route::Ec2) {
                ec2::error(status, e.code(), &e.message())
            } else {
                Reply::error(status, e.code(), &e.message())
            };
            return (reply, None, op);
        }
    };
    let account = Some(caller.account.clone());
    let Some(route) = route else {
        return (
            Reply::error(
                404,
                "UnknownOperationException",
                &format!("no operation answers {} {path}", parts.method),
            ),
            account,
            op,
        );
    };
    // STS's one call shares EC2's `POST /` and form.
    let service = match op {
        "GetCallerIdentity" => "sts",
        _ => route.service(),
    };
    if caller.service != service {
        let message = format!(
            "{op} is an operation of service {service}, and the request was signed for {}",
            caller.service
        );
        let reply = match route {
            Route::Ec2 => ec2::error(403, "AuthFailure", &message),
            _ => Reply::error(403, "SignatureDoesNotMatch", &message),
        };
        return (reply, account, op);
    }
    if let Some(p) = ec2_params {
        let reply = match state.region(&caller.region) {
            Ok(region) => ec2::answer(
                &region,
                &state.uploads,
                &caller.account,
                &p,
                &state.copies,
                &|name| state.region(name),
            )
            .unwrap_or_else(|e| e),
            Err(e) => ec2::error(400, "InvalidParameterValue", &e.to_string()),
        };
        return (reply, account, op);
    }
    let reply = answer(state, &caller, route, &parts.headers, query, body)
        .unwrap_or_else(|e| Reply::from_error(&e));
    (reply, account, op)
}

fn answer(
    state: &State,
    caller: &sigv4::Caller,
    route: Route,
    headers: &HeaderMap,
    query: &str,
    body: &[u8],
) -> Result<Reply> {
    let region = state.region(&caller.region)?;
    let who = &caller.account;
    let query = parse_params(query);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let snap = |s: &str| s.parse::<SnapshotId>().map_err(Error::from);
    let index = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| Error::InvalidArgument(format!("BlockIndex {s:?} is not a whole number")))
    };
    let uploads = &state.uploads;
    match route {
        Route::StartSnapshot => ebs::start_snapshot(uploads, region, who, body),
        Route::PutSnapshotBlock(id, i) => {
            let block = ebs::Body {
                data: body,
                sha256: caller.body_sha256,
            };
            ebs::put_snapshot_block(uploads, who, &snap(&id)?, index(&i)?, &header, block)
        }
        Route::CompleteSnapshot(id) => {
            ebs::complete_snapshot(uploads, &region, who, &snap(&id)?, &header)
        }
        Route::ListSnapshotBlocks(id) => {
            ebs::list_snapshot_blocks(&region, who, &snap(&id)?, &query)
        }
        Route::GetSnapshotBlock(id, i) => {
            ebs::get_snapshot_block(&region, who, &snap(&id)?, index(&i)?, &query)
        }
        Route::ListChangedBlocks(id) => ebs::list_changed_blocks(&region, who, &snap(&id)?, &query),
        Route::Ec2 => unreachable!("EC2 actions are answered in dispatch"),
    }
}

/// Everything the server does with a request's bytes before it trusts
/// them — the route, EC2's form parameters, the signature's parse and
/// check (against one fixed key) — on a request written as text: a line
/// `METHOD PATH[?QUERY]`, header lines `name: value`, an empty line, the
/// body. Returns whether the signature held. For the fuzz target and the
/// replay of its corpus: any bytes must return, never panic.
pub fn examine_untrusted(data: &[u8]) -> bool {
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    let split = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(data.len());
    let (head, body) = data.split_at(split);
    let body = body.get(2..).unwrap_or_default();
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let first = lines.next().unwrap_or_default();
    let (method, target) = first.split_once(' ').unwrap_or((first, "/"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            http::header::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) {
            headers.append(n, v);
        }
    }
    if let Ok(m) = method.parse::<Method>() {
        let _ = Route::of(&m, path).map(|r| (r.name(), r.service()));
    }
    for params in [
        parse_params(query),
        parse_params(&String::from_utf8_lossy(body)),
    ] {
        let _ = ec2_action_name(&params);
        // What EC2's Describe… make of them: unknown parameters, filters
        // matched against values taken from the request itself, a page.
        let _ = query::unknown(&params, &["Filter.N.Name", "Filter.N.Value.N"]);
        let _ = query::gap(&params);
        if let Ok(filters) = query::Filters::of(&params, &["name"]) {
            let attrs: Vec<(String, String)> = params
                .iter()
                .map(|(k, v)| (format!("tag:{k}"), v.clone()))
                .chain(params.values().map(|v| ("name".to_string(), v.clone())))
                .collect();
            let _ = filters.pass(|| attrs);
        }
        let _ = query::page(&params, params.keys().collect());
    }
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let _ = sigv4::parse_authorization(v);
    }
    let req = sigv4::Request {
        method,
        path,
        query,
        headers: &headers,
        body,
    };
    let now = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .and_then(sigv4::parse_amz_date)
        .unwrap_or(0);
    sigv4::verify(&req, now, true, |id| {
        let account = "123456789012".parse().expect("a valid account id");
        (id == "AKIDEXAMPLE").then(|| (account, SECRET.to_string()))
    })
    .is_ok()
}

/// The name of the EC2 action in `p`, for the log: only actions this
/// server knows are named (a client's string never reaches the log).
fn ec2_action_name(p: &Params) -> &'static str {
    const KNOWN: [&str; 13] = [
        "GetCallerIdentity",
        "CreateTags",
        "DeleteTags",
        "RegisterImage",
        "CopyImage",
        "DescribeSnapshots",
        "DeleteSnapshot",
        "DescribeSnapshotAttribute",
        "ModifySnapshotAttribute",
        "DescribeImages",
        "DescribeImageAttribute",
        "ModifyImageAttribute",
        "DeregisterImage",
    ];
    let action = p.get("Action").map(String::as_str).unwrap_or_default();
    KNOWN.into_iter().find(|k| *k == action).unwrap_or("ec2")
}

/// A request's parameters, decoded.
pub type Params = std::collections::BTreeMap<String, String>;

/// Parses a query string or a form body (`a=1&b=x+y`: `+` is a space, as
/// in any form; SigV4 clients send `%20`).
fn parse_params(text: &str) -> Params {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let d = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

/// A response, before it is one.
pub struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    /// The error code, for the log.
    code: Option<&'static str>,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(serde_json::to_vec(&v).expect("JSON serialises")),
            code: None,
        }
    }

    fn xml(status: u16, xml: String) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "text/xml;charset=UTF-8".into())],
            body: Bytes::from(xml),
            code: None,
        }
    }

    fn bytes(status: u16, data: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/octet-stream".into())],
            body: Bytes::from(data),
            code: None,
        }
    }

    fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            code: None,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// A REST-JSON error as AWS's services write it.
    fn error(status: u16, code: &'static str, message: &str) -> Reply {
        let mut r = Reply::json(status, json!({ "Message": message }));
        r.headers.push(("x-amzn-ErrorType", code.into()));
        r.code = Some(code);
        r
    }

    fn from_error(e: &Error) -> Reply {
        let (status, code) = match e.kind() {
            ErrorKind::Usage => (400, "ValidationException"),
            ErrorKind::NotFound => (404, "ResourceNotFoundException"),
            ErrorKind::Permission => (403, "AccessDeniedException"),
            ErrorKind::Conflict => (409, "ConflictException"),
            ErrorKind::Integrity | ErrorKind::Other => (500, "InternalServerException"),
        };
        Reply::error(status, code, &e.to_string())
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(self.body));
        *r.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let h = r.headers_mut();
        for (k, v) in self.headers {
            if let Ok(v) = http::HeaderValue::from_str(&v) {
                h.append(k, v);
            }
        }
        if let Ok(v) = http::HeaderValue::from_str(&crate::id::random_id("req")) {
            h.insert("x-amzn-RequestId", v);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |m: &str, p: &str| Route::of(&m.parse().unwrap(), p);
        assert_eq!(r("POST", "/snapshots"), Some(Route::StartSnapshot));
        assert_eq!(
            r("PUT", "/snapshots/snap-1/blocks/7"),
            Some(Route::PutSnapshotBlock("snap-1".into(), "7".into()))
        );
        assert_eq!(
            r("POST", "/snapshots/completion/snap-1"),
            Some(Route::CompleteSnapshot("snap-1".into()))
        );
        assert_eq!(
            r("GET", "/snapshots/snap-1/changedblocks"),
            Some(Route::ListChangedBlocks("snap-1".into()))
        );
        assert_eq!(r("DELETE", "/snapshots/snap-1/blocks/7"), None);
        assert_eq!(r("GET", "/snapshots/a/b/c/d/e"), None);
        assert_eq!(r("GET", "/"), Some(Route::Ec2));
        assert_eq!(r("POST", "/"), Some(Route::Ec2));
        assert_eq!(r("PUT", "/"), None);
    }
}
