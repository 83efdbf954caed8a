//! The connection to an S3-compatible store: its configuration (from a
//! region definition, the settings and the AWS credential variables), the
//! request counters, and how its errors are classified.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{Error, ErrorKind, IoContext, Location, Result};
use crate::format::regions::{RegionDef, S3Url};

#[derive(Default)]
pub struct Requests {
    pub get: AtomicU64,
    pub head: AtomicU64,
    pub put: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
}

impl Requests {
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The connection shared by a region's backend and chunk store.
pub struct S3 {
    pub requests: Arc<Requests>,
    pub store: AmazonS3,
    pub runtime: tokio::runtime::Runtime,
    pub url: String,
    pub prefix: String,
    pub endpoint: String,
    pub inflight: usize,
}

impl Drop for S3 {
    fn drop(&mut self) {
        if crate::settings::get().s3_trace {
            let r = &self.requests;
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            eprintln!(
                "blocksnap: requests to {}: {} GET, {} HEAD, {} PUT, {} listings, {} DELETE",
                self.url,
                n(&r.get),
                n(&r.head),
                n(&r.put),
                n(&r.list),
                n(&r.delete)
            );
        }
    }
}

impl S3 {
    pub fn connect(region: &str, def: &RegionDef) -> Result<S3> {
        let url = S3Url::parse(&def.url)?;
        let settings = crate::settings::get();
        let aws = &settings.aws;
        let (Some(key), Some(secret)) = (aws.access_key_id.clone(), aws.secret_access_key.clone())
        else {
            return Err(Error::Remote {
                op: "open region",
                location: format!("{region} ({})", def.url),
                reason: "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                         (and AWS_REGION) in the environment"
                    .into(),
                kind: ErrorKind::Permission,
                source: None,
            });
        };
        let endpoint = def.endpoint.clone().or_else(|| aws.endpoint.clone());
        let timeout = settings.s3_timeout.as_secs_f64();
        let retries = settings.s3_retries;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_region(aws.region.clone().unwrap_or_else(|| "us-east-1".into()))
            .with_allow_http(def.allow_http)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: retries,
                retry_timeout: Duration::from_secs_f64(timeout * 2.0),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs_f64(timeout))
                    .with_connect_timeout(Duration::from_secs_f64(timeout.min(10.0)))
                    .with_allow_http(def.allow_http),
            );
        if let Some(token) = aws.session_token.clone() {
            builder = builder.with_token(token);
        }
        if let Some(e) = &endpoint {
            builder = builder.with_endpoint(e);
        }
        let store = builder.build().map_err(|e| Error::Remote {
            op: "open region",
            location: format!("{region} ({})", def.url),
            reason: e.to_string(),
            kind: ErrorKind::Usage,
            source: Some(Arc::new(e)),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blocksnap-s3")
            .enable_all()
            .build()
            .ctx("start the S3 client", std::path::Path::new("tokio"))?;
        let inflight = settings.s3_inflight.max(1);
        Ok(S3 {
            requests: Arc::default(),
            store,
            runtime,
            url: format!("s3://{}{}", url.bucket, prefixed(&url.prefix)),
            prefix: url.prefix,
            endpoint: endpoint.unwrap_or_else(|| "AWS S3".into()),
            inflight,
        })
    }

    pub fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Reads object `key` whole, refusing one larger than `limit`.
    pub fn read(&self, key: &str, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let result = self.block_on(async {
            Requests::add(&self.requests.get);
            let got = self.store.get(&path).await?;
            if got.meta.size > limit {
                return Ok(Err(got.meta.size));
            }
            Ok(Ok(got.bytes().await?.to_vec()))
        });
        match result {
            Ok(Ok(bytes)) => Ok(Some(bytes)),
            Ok(Err(size)) => Err(Error::CorruptFile {
                what,
                location: Location::Url(self.url_of(key)),
                reason: format!("it holds {size} bytes, more than {limit}"),
            }),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(self.error("read", key, e)),
        }
    }

    pub fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.handle().block_on(f)
    }

    /// An object-store error as [`Error`]: what was done, on which object,
    /// why, and what to check.
    pub fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        remote_error(op, self.url_of(key), &self.endpoint, e)
    }

    pub fn list_meta(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.path(dir);
        Requests::add(&self.requests.list);
        self.block_on(self.store.list(Some(&prefix)).try_collect::<Vec<_>>())
            .map_err(|e| self.error("list", dir, e))
    }

    /// `key`'s name relative to the region (`chunks/ab12/…`).
    pub fn key_of<'a>(&self, meta: &'a ObjectMeta) -> &'a str {
        let full = meta.location.as_ref();
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(self.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    pub fn put(&self, key: &str, data: &[u8], mode: PutMode) -> Result<bool> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let payload = PutPayload::from(data.to_vec());
        Requests::add(&self.requests.put);
        match self.block_on(self.store.put_opts(&self.path(key), payload, opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.error("write", key, e)),
        }
    }

    pub fn get_range(&self, key: &str, len: u64) -> Result<Option<(Vec<u8>, u64)>> {
        let path = self.path(key);
        let result = self.block_on(async {
            if len == 0 {
                Requests::add(&self.requests.head);
                let meta = self.store.head(&path).await?;
                return Ok((Vec::new(), meta.size));
            }
            let opts = GetOptions {
                range: Some(GetRange::Bounded(0..len)),
                ..Default::default()
            };
            Requests::add(&self.requests.get);
            let got = self.store.get_opts(&path, opts).await?;
            let size = got.meta.size;
            Ok((got.bytes().await?.to_vec(), size))
        });
        match result {
            Ok(r) => Ok(Some(r)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(self.error("read", key, e)),
        }
    }
}

fn prefixed(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!("/{prefix}")
    }
}

/// Whether `e` says that an object is absent (and not its bucket).
pub fn absent(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && !e.to_string().contains("NoSuchBucket")
}

/// An error's text on one line, with an S3 error document reduced to its
/// code and message.
fn condensed(text: &str) -> String {
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let start = text.find(&open)? + open.len();
        let len = text[start..].find(&format!("</{tag}>"))?;
        Some(&text[start..start + len])
    };
    let head = text.split("<?xml").next().unwrap_or(text);
    let mut out = head.trim_end_matches([' ', ':', '\n']).to_string();
    if let (Some(code), Some(msg)) = (field("Code"), field("Message")) {
        out = format!("{out}: {code}: {msg}");
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Classifies an object-store failure for the user.
pub fn remote_error(
    op: &'static str,
    location: String,
    endpoint: &str,
    e: object_store::Error,
) -> Error {
    use object_store::Error as E;
    // The whole chain: the outer message often hides the cause (a timeout).
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    let (kind, hint) = match &e {
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => (
            ErrorKind::Permission,
            "the store refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        ),
        _ if text.contains("NoSuchBucket") || text.contains("bucket does not exist") => (
            ErrorKind::NotFound,
            "the bucket does not exist: create it, or fix the region's URL (`blocksnap region list`)",
        ),
        _ if text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
            || text.contains("AccessDenied") =>
        {
            (
                ErrorKind::Permission,
                "the store refused the credentials: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )
        }
        E::NotFound { .. } => (ErrorKind::NotFound, "it does not exist"),
        E::Precondition { .. } | E::AlreadyExists { .. } => {
            (ErrorKind::Conflict, "another writer created it first")
        }
        _ if text.contains("timed out") || text.contains("operation timed out") => (
            ErrorKind::Other,
            "the store did not answer in time (BLOCKSNAP_S3_TIMEOUT): check that it runs and is reachable",
        ),
        _ if text.contains("error sending request") || text.contains("connect") => (
            ErrorKind::Other,
            "the store cannot be reached: check that it runs and the region's endpoint",
        ),
        _ => (ErrorKind::Other, "the object store failed"),
    };
    Error::Remote {
        op,
        location,
        reason: format!("{hint} ({endpoint}: {})", condensed(&text)),
        kind,
        source: Some(Arc::new(e)),
    }
}

/// When the store last wrote an object, by its own clock.
pub fn modified(m: &ObjectMeta) -> SystemTime {
    SystemTime::from(m.last_modified)
}
