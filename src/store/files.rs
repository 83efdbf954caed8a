//! File helpers every local room shares: atomic writes with a chosen
//! durability, bounded reads of small files, directory walks, temporary
//! names, ctime.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, IoContext, Result};
use crate::id::random_id;

/// A file's status-change time: set by the kernel on every write, rename
/// or link, and not settable by a user.
pub fn ctime(m: &fs::Metadata) -> SystemTime {
    use std::os::unix::fs::MetadataExt;
    let (s, ns) = (m.ctime(), m.ctime_nsec());
    if s < 0 {
        return SystemTime::UNIX_EPOCH;
    }
    SystemTime::UNIX_EPOCH + std::time::Duration::new(s as u64, ns.clamp(0, 999_999_999) as u32)
}

/// Calls `f` with the path of every entry of `dir`; a missing `dir` has none.
pub fn for_each_entry(dir: &Path, mut f: impl FnMut(PathBuf) -> Result<()>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("list directory", dir),
    };
    for entry in entries {
        f(entry.ctx("list directory", dir)?.path())?;
    }
    Ok(())
}

/// Reads a file of at most `limit` bytes (refusing a larger one as damaged
/// before reading it all); `Ok(None)` if it is absent.
pub fn read_bounded(path: &Path, what: &'static str, limit: u64) -> Result<Option<Vec<u8>>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx("open", path),
    };
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .ctx("read", path)?;
    if bytes.len() as u64 > limit {
        return Err(Error::CorruptFile {
            what,
            location: path.into(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(Some(bytes))
}

const TEMP_MARK: &str = ".tmp-";

pub fn is_temp_name(name: &str) -> bool {
    name.contains(TEMP_MARK)
}

/// A unique temporary path beside `path`.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let suffix = random_id("x");
    path.with_file_name(format!(".{name}{TEMP_MARK}{}", &suffix[2..]))
}

/// When a file written by [`write_atomic`] becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before `write_atomic` returns: fsync the file, rename, fsync the
    /// directory.
    Now,
    /// At the next [`crate::store::chunk_store::ChunkStore::sync`]: write,
    /// start the writeback without waiting for it, rename. After a
    /// crash before that sync the file may be missing or hold partial
    /// content under its final name; readers of such files verify them
    /// (chunks are checked against their names).
    AtSync,
}

/// Writes `data` to `path` atomically for other processes: a unique
/// temporary name in the same directory, write, rename.
pub fn write_atomic(path: &Path, data: &[u8], durability: Durability) -> Result<()> {
    let tmp = temp_path_for(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create temporary file", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        match durability {
            Durability::Now => f.sync_all().ctx("fsync", &tmp)?,
            // The disk starts writing now, while the next chunks are
            // compressed, instead of all at once in the sync: a full
            // snapshot of a 4 GiB image waited 3.4 s in `syncfs` for
            // 1.6 GB of chunks, a third of its time.
            Durability::AtSync => crate::sys::start_writeback(&f, 0, 0),
        }
        fs::rename(&tmp, path).ctx("rename into place", path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if durability == Durability::Now {
        sync_dir(path.parent().expect("store paths have a parent"))?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}
