//! Shared helpers for the integration tests: a temp dir and store per test,
//! the real binary, real ext4 images built with `mkfs.ext4 -d`.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

pub const MIB: u64 = 1 << 20;

/// One test's world: its own directory and store.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// Set when the test's regions live on the S3 test server.
    pub s3: Option<S3Server>,
    /// `BLOCKSNAP_PASSPHRASE` for every command, when set.
    pub passphrase: std::cell::RefCell<Option<String>>,
}

/// The S3 server the tests run against, from the environment
/// `scripts/s3-server.sh start` prints.
#[derive(Clone)]
pub struct S3Server {
    pub endpoint: String,
    pub bucket: String,
    /// This test's own prefix in the bucket.
    pub prefix: String,
}

impl S3Server {
    pub fn from_env() -> Option<S3Server> {
        let endpoint = std::env::var("BLOCKSNAP_TEST_S3_ENDPOINT").ok()?;
        let bucket = std::env::var("BLOCKSNAP_TEST_S3_BUCKET").ok()?;
        Some(S3Server {
            endpoint,
            bucket,
            prefix: String::new(),
        })
    }

    /// The same server, under `prefix` in its bucket.
    pub fn with_prefix(self, prefix: String) -> S3Server {
        S3Server { prefix, ..self }
    }

    pub fn url(&self, region: &str) -> String {
        format!("s3://{}/{}/{region}", self.bucket, self.prefix)
    }
}

/// Regions the tests use; on S3 each gets its own prefix.
pub const TEST_REGIONS: [&str; 3] = ["local", "eu-west-1", "r2"];

/// Runs a test body (`fn case(env: &Env)`) twice: as `NAME::local` on a
/// local store, and as `NAME::s3` with every test region on the S3 server.
macro_rules! on_each_backend {
    ($name:ident, $case:ident) => {
        mod $name {
            #[test]
            fn local() {
                super::$case(&crate::util::Env::with_test_regions());
            }
            #[test]
            fn s3() {
                if let Some(env) = crate::util::Env::s3() {
                    super::$case(&env);
                }
            }
        }
    };
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("blocksnap-test-")
                .tempdir()
                .unwrap(),
            s3: None,
            passphrase: Default::default(),
        }
    }

    /// A local world where every test region exists (`region add`), as
    /// they do on the S3 server in [`Env::s3`].
    pub fn with_test_regions() -> Env {
        let env = Env::new();
        for region in TEST_REGIONS.iter().filter(|r| **r != "local") {
            env.ok(&["region", "add", region]);
        }
        env
    }

    /// A world with the S3 test server at hand under its own prefix, its
    /// regions still local until `add_s3_region`; `None` (with a printed
    /// reason) when no server is configured.
    pub fn with_s3_server() -> Option<Env> {
        let Some(server) = S3Server::from_env() else {
            skip(NO_S3_SERVER);
            count_s3_skip();
            return None;
        };
        let mut env = Env::new();
        env.s3 = Some(server.with_prefix(env.name()));
        Some(env)
    }

    /// A world whose regions all live on the S3 test server, each test
    /// under its own prefix; `None` (with a printed reason) when no server
    /// is configured.
    pub fn s3() -> Option<Env> {
        let env = Env::with_s3_server()?;
        for region in TEST_REGIONS {
            env.add_s3_region(region);
        }
        Some(env)
    }

    /// The bytes of object `key` of `region` (`images/ami-….json`), from
    /// the store directory or, on S3, fetched with curl as an outside
    /// client.
    pub fn read_stored(&self, region: &str, key: &str) -> Vec<u8> {
        match &self.s3 {
            None => fs::read(self.store().join(region).join(key)).unwrap(),
            Some(server) => {
                let out = self.curl(server, region, key, &[]);
                assert!(out.status.success(), "curl failed: {out:?}");
                out.stdout
            }
        }
    }

    /// Replaces object `key` of `region` with `bytes`, behind blocksnap's back.
    pub fn write_stored(&self, region: &str, key: &str, bytes: &[u8]) {
        match &self.s3 {
            None => fs::write(self.store().join(region).join(key), bytes).unwrap(),
            Some(server) => {
                let file = self.path("upload.tmp");
                fs::write(&file, bytes).unwrap();
                let out = self.curl(server, region, key, &["-T", file.to_str().unwrap()]);
                assert!(out.status.success(), "curl failed: {out:?}");
            }
        }
    }

    /// How many objects (files) `region` holds under `dir` (`locks`,
    /// `chunks`), counted by an outside client.
    pub fn count_stored(&self, region: &str, dir: &str) -> usize {
        match &self.s3 {
            None => {
                let mut files = Vec::new();
                walk(&self.store().join(region).join(dir), &mut files);
                files.len()
            }
            Some(server) => {
                let query = format!(
                    "?list-type=2&prefix={}%2F{region}%2F{dir}%2F",
                    server.prefix
                );
                let out = self.curl(server, "", &query, &[]);
                assert!(out.status.success(), "curl failed: {out:?}");
                String::from_utf8_lossy(&out.stdout)
                    .matches("<Key>")
                    .count()
            }
        }
    }

    /// The S3 listing (ListObjectsV2 XML) of every key under `prefix` in
    /// the test bucket, fetched with curl as an outside client.
    pub fn list_stored_keys(&self, prefix: &str) -> Vec<u8> {
        let server = self.s3.as_ref().expect("an S3 world");
        let query = format!(
            "?list-type=2&max-keys=10000&prefix={}",
            prefix.replace('/', "%2F")
        );
        let out = self.curl(server, "", &query, &[]);
        assert!(out.status.success(), "curl failed: {out:?}");
        out.stdout
    }

    fn curl(&self, server: &S3Server, region: &str, key: &str, extra: &[&str]) -> Output {
        let user = format!(
            "{}:{}",
            std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
            std::env::var("AWS_SECRET_ACCESS_KEY").unwrap()
        );
        let url = if region.is_empty() {
            format!("{}/{}{key}", server.endpoint, server.bucket)
        } else {
            format!(
                "{}/{}/{}/{region}/{key}",
                server.endpoint, server.bucket, server.prefix
            )
        };
        Command::new("curl")
            .args([
                "-sf",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                &user,
            ])
            .args(extra)
            .arg(url)
            .output()
            .unwrap()
    }

    /// Defines `region` on the S3 test server under this test's prefix.
    pub fn add_s3_region(&self, region: &str) {
        let server = self.s3.as_ref().expect("a world made with an S3 server");
        self.ok(&[
            "region",
            "add",
            region,
            &server.url(region),
            "--endpoint",
            &server.endpoint,
            "--allow-http",
        ]);
    }

    /// This test's unique name (its directory's).
    pub fn name(&self) -> String {
        let name = self.dir.path().file_name().unwrap();
        name.to_str().unwrap().to_string()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// `blocksnap` with this test's store, ready to run or spawn.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_blocksnap"));
        c.args(args)
            .env("BLOCKSNAP_STORE", self.store())
            .env_remove("BLOCKSNAP_REGION")
            .env_remove("BLOCKSNAP_ACCOUNT")
            .env_remove("BLOCKSNAP_LOCK_WAIT")
            .env_remove("BLOCKSNAP_PASSPHRASE")
            .env_remove("BLOCKSNAP_PASSPHRASE_FILE")
            .env_remove("BLOCKSNAP_KEY_FILE")
            // gc may reclaim a chunk the moment nothing names it.
            .env("BLOCKSNAP_S3_GC_GRACE", "0")
            .current_dir(self.dir.path());
        if let Some(p) = self.passphrase.borrow().as_ref() {
            c.env("BLOCKSNAP_PASSPHRASE", p);
        }
        c
    }

    /// Gives every later command `passphrase` (`None`: none at all).
    pub fn set_passphrase(&self, passphrase: Option<&str>) {
        *self.passphrase.borrow_mut() = passphrase.map(str::to_string);
    }

    /// Runs `blocksnap` with this test's store.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "blocksnap {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs with `--json`, expects success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// `store gc` with half a second's patience, expected to find the
    /// region locked (exit 5) because `why`; returns its stderr.
    pub fn gc_is_held_off(&self, why: &str) -> String {
        let gc = self
            .command(&["store", "gc"])
            .env("BLOCKSNAP_LOCK_WAIT", "0.5")
            .output()
            .unwrap();
        assert_eq!(gc.status.code(), Some(5), "gc ran: {why}");
        String::from_utf8_lossy(&gc.stderr).into_owned()
    }

    /// Runs and expects failure with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "blocksnap {args:?}: expected exit {code}, got {}; stderr:\n{stderr}",
            out.status
        );
        assert!(
            stderr.starts_with("blocksnap: error: "),
            "unexpected stderr: {stderr}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "error is not one line: {stderr}"
        );
        stderr
    }

    /// The store key (`chunks/<2 or 4 hex>/<64 hex>`) of the chunk holding
    /// block `index` of snapshot `snap` in `region`.
    pub fn chunk_key(&self, snap: &str, index: usize, region: &str) -> String {
        let blocks = self.json(&["snapshot", "blocks", snap, "--region", region]);
        let digest = blocks["Blocks"][index]["Checksum"]
            .as_str()
            .unwrap_or_else(|| panic!("no digest for block {index}: {}", blocks["Blocks"][index]))
            .to_string();
        self.chunk_key_of(&digest, region)
    }

    /// The store key of chunk `digest` in `region`: a local region of
    /// store version 2 fans chunks out by 2 hex digits, object stores and
    /// older local regions by 4.
    pub fn chunk_key_of(&self, digest: &str, region: &str) -> String {
        let store_json = self.store().join(region).join("store.json");
        let prefix = match fs::read(&store_json) {
            Ok(b) => {
                let v: Value = serde_json::from_slice(&b).unwrap();
                if v["version"].as_u64().unwrap() >= 2 {
                    2
                } else {
                    4
                }
            }
            Err(_) => 4,
        };
        format!("chunks/{}/{digest}", &digest[..prefix])
    }

    /// Flips the last byte of the chunk holding block `index` of `snap` in
    /// region `local`; returns its key.
    pub fn damage_chunk(&self, snap: &str, index: usize) -> String {
        let key = self.chunk_key(snap, index, "local");
        let mut chunk = self.read_stored("local", &key);
        let last = chunk.len() - 1;
        chunk[last] ^= 0xff;
        self.write_stored("local", &key, &chunk);
        key
    }

    /// Creates a snapshot and returns its JSON.
    pub fn snapshot(&self, volume: &Path, extra: &[&str]) -> Value {
        let mut args = vec!["snapshot", "create", volume.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// Every file under the store with its bytes, to show a failed command
    /// changed nothing.
    pub fn store_state(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        walk(&self.store(), &mut files);
        files.sort();
        files
            .into_iter()
            // Lock files hold who last took them, not state.
            .filter(|p| !p.file_name().unwrap().to_string_lossy().ends_with("lock"))
            .map(|p| {
                let b = fs::read(&p).unwrap();
                (p, b)
            })
            .collect()
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn id(v: &Value) -> String {
    v["SnapshotId"].as_str().unwrap().to_string()
}

pub fn sh(cmd: &str) -> Output {
    Command::new("bash").arg("-c").arg(cmd).output().unwrap()
}

pub fn sh_ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Byte-for-byte comparison with `cmp`.
pub fn assert_same(a: &Path, b: &Path) {
    let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `e2fsck -fn` finds nothing wrong.
pub fn assert_fsck_clean(img: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {} found problems:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes allocated on disk (`du`'s measure).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).unwrap().blocks() * 512
}

/// Copies keeping holes.
pub fn sparse_copy(from: &Path, to: &Path) {
    sh_ok(&format!(
        "cp --sparse=always '{}' '{}'",
        from.display(),
        to.display()
    ));
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible text.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = seed;
    while out.len() < len {
        writeln!(
            out,
            "line {i} of file {seed}: the quick brown fox jumps over the lazy dog"
        )
        .unwrap();
        i += 1;
    }
    out.truncate(len);
    out
}

/// A pair of real ext4 images (v1, and v2 = v1 with a new file and three
/// overwritten ranges inside an existing file), built once per test run.
pub struct Images {
    _dir: tempfile::TempDir,
    pub v1: PathBuf,
    pub v2: PathBuf,
}

pub const IMAGE_SIZE: u64 = 384 * MIB;

pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let images = build_images();
        // A static is never dropped: remove its directory when the test
        // binary exits instead of leaving 768 MiB behind each run.
        extern "C" fn remove_images() {
            if let Some(dir) = IMAGES_DIR.get() {
                let _ = fs::remove_dir_all(dir);
            }
        }
        let _ = IMAGES_DIR.set(images._dir.path().to_path_buf());
        // SAFETY: `remove_images` only reads a static and removes files,
        // valid for the life of the process.
        unsafe {
            libc::atexit(remove_images);
        }
        images
    })
}

/// Where [`images`] built its images, for removal at exit.
static IMAGES_DIR: OnceLock<PathBuf> = OnceLock::new();

fn build_images() -> Images {
    let dir = tempfile::Builder::new()
        .prefix("blocksnap-images-")
        .tempdir()
        .unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("var/log")).unwrap();
    fs::create_dir_all(src.join("data")).unwrap();
    for i in 0..40u64 {
        fs::write(
            src.join(format!("etc/conf{i}.txt")),
            text_bytes(i, 20_000 + (i as usize) * 3_000),
        )
        .unwrap();
    }
    for i in 0..6u64 {
        fs::write(
            src.join(format!("var/log/syslog.{i}")),
            text_bytes(1000 + i, 4 * MIB as usize),
        )
        .unwrap();
    }
    for i in 0..30u64 {
        fs::write(
            src.join(format!("data/small{i}.bin")),
            random_bytes(i, 50_000 + (i as usize) * 1_000),
        )
        .unwrap();
    }
    fs::write(src.join("data/big.bin"), random_bytes(7, 48 * MIB as usize)).unwrap();
    fs::write(src.join("data/big.txt"), text_bytes(9, 24 * MIB as usize)).unwrap();

    let v1 = dir.path().join("v1.img");
    // Fixed UUID and hash seed so images differ only where the test says.
    sh_ok(&format!(
        "truncate -s {IMAGE_SIZE} '{v1}' && mkfs.ext4 -q -F -b 4096 -U 2d1a6e39-7c55-4c2e-9d0f-1f4b2d3c4e5f \
         -E hash_seed=6f1a1d1e-0b52-4b7e-8a55-0c9e6d8f7a21,lazy_itable_init=0 -d '{src}' '{v1}'",
        v1 = v1.display(),
        src = src.display()
    ));
    let v2 = dir.path().join("v2.img");
    sparse_copy(&v1, &v2);
    let new_file = dir.path().join("new.bin");
    fs::write(&new_file, random_bytes(99, 3 * MIB as usize)).unwrap();
    sh_ok(&format!(
        "debugfs -w -R 'write {} data/new.bin' '{}'",
        new_file.display(),
        v2.display()
    ));
    let listing = sh_ok(&format!(
        "debugfs -R 'ls -l /data' '{}' 2>/dev/null",
        v2.display()
    ));
    assert!(
        listing.contains("new.bin"),
        "debugfs did not write new.bin: {listing}"
    );
    // Overwrite 64 KiB at three places inside data/big.bin, found with bmap.
    for (n, logical) in [100u64, 5000, 11000].iter().enumerate() {
        let phys: u64 = sh_ok(&format!(
            "debugfs -R 'bmap /data/big.bin {logical}' '{}' 2>/dev/null",
            v2.display()
        ))
        .trim()
        .parse()
        .unwrap();
        assert!(phys > 0, "bmap gave no block");
        let patch = random_bytes(500 + n as u64, 64 * 1024);
        let f = fs::OpenOptions::new().write(true).open(&v2).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &patch, phys * 4096).unwrap();
    }
    assert_fsck_clean(&v1);
    assert_fsck_clean(&v2);
    Images { _dir: dir, v1, v2 }
}

/// Attaches `img` to a free loop device; `None` (with the reason printed)
/// where this machine cannot.
/// Skips a test whose prerequisite is missing, saying why; where every
/// prerequisite must be there (`BLOCKSNAP_TEST_NO_SKIP`, set by `.ci/run`),
/// a skip is a failure instead.
pub fn skip(reason: impl std::fmt::Display) {
    if std::env::var_os("BLOCKSNAP_TEST_NO_SKIP").is_some() {
        panic!("would skip ({reason}), but BLOCKSNAP_TEST_NO_SKIP says every prerequisite is here");
    }
    eprintln!("SKIP: {reason}");
}

const NO_S3_SERVER: &str = "no S3 server configured (BLOCKSNAP_TEST_S3_ENDPOINT)";

/// S3 tests skipped in this run, told in one line when the run ends.
static S3_SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a skipped S3 test; the first one arranges for the summary line
/// printed after the harness's own.
fn count_s3_skip() {
    use std::sync::atomic::Ordering;
    extern "C" fn summary() {
        let n = S3_SKIPPED.load(Ordering::Relaxed);
        let tests = if n == 1 { "test" } else { "tests" };
        eprintln!(
            "SKIPPED: {n} S3 {tests}: {NO_S3_SERVER}; `scripts/with-s3.sh cargo test` runs them \
             against a local server"
        );
    }
    if S3_SKIPPED.fetch_add(1, Ordering::Relaxed) == 0 {
        // SAFETY: `summary` is a plain function that only reads an atomic
        // and writes to stderr, valid for the life of the process.
        unsafe {
            libc::atexit(summary);
        }
    }
}

pub fn attach_loop(img: &Path) -> Option<LoopDev> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(img)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(LoopDev(
            String::from_utf8(o.stdout).unwrap().trim().to_string(),
        )),
        Ok(o) => {
            skip(format!(
                "cannot attach a loop device: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            None
        }
        Err(e) => {
            skip(format!("losetup not runnable: {e}"));
            None
        }
    }
}

pub struct LoopDev(pub String);

impl LoopDev {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.0)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// `qemu-img ARGS`.
pub fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

/// `qemu-img ARGS`, expected to succeed; its stdout.
pub fn qemu_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether qemu-img runs here (else the test skips, saying why).
pub fn have_qemu() -> bool {
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        return true;
    }
    skip("qemu-img is not installed (apt-get install qemu-utils)");
    false
}
