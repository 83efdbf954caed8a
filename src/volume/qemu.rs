//! Disk image files in qemu's formats (qcow2, vmdk, vhdx, vdi, qed, vpc):
//! recognised by their magic and confirmed by `qemu-img info`, and served
//! by a private `qemu-nbd` on a socket in a temporary directory for as
//! long as a command reads or writes them through NBD. Raw files never
//! come here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// The formats recognised by their first bytes.
const MAGICS: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow2"),
    (b"KDMV", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"QED\0", "qed"),
    (b"conectix", "vpc"),
];

/// The qemu format of the file at `path`, or `None` for a raw file (or a
/// device, or anything that is no qemu image).
pub fn detect_format(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let mut head = [0u8; 72];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .ctx("read", path)?;
    let head = &head[..n];
    let vdi = head.len() >= 68 && head[64..68] == [0x7f, 0x10, 0xda, 0xbe];
    let sniffed = MAGICS
        .iter()
        .find(|(m, _)| head.starts_with(m))
        .map(|(_, f)| *f)
        .or(vdi.then_some("vdi"));
    let Some(sniffed) = sniffed else {
        return Ok(None);
    };
    // qemu-img has the last word.
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .map_err(|e| missing_tool("qemu-img", e))?;
    if !out.status.success() {
        return Err(Error::InvalidArgument(format!(
            "{} looks like a {sniffed} image, but qemu-img cannot read it: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::InvalidArgument(format!("qemu-img info of {}: {e}", path.display())))?;
    let format = info["format"].as_str().filter(|f| *f != "raw");
    // A raw disk whose guest wrote an image header naming a backing file
    // would otherwise have qemu read that host file into the snapshot:
    // an image is only read when it is the only file qemu opens.
    if let Some(format) = format {
        let others: Vec<&str> = info["children"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .filter(|n| *n != "file")
            .collect();
        if let Some(backing) = info["backing-filename"].as_str() {
            return Err(refer_elsewhere(
                path,
                format,
                &format!("backing file {backing}"),
            ));
        }
        if let Some(child) = others.first() {
            return Err(refer_elsewhere(
                path,
                format,
                &format!("{child} in another file"),
            ));
        }
    }
    Ok(format.map(str::to_string))
}

fn refer_elsewhere(path: &Path, format: &str, what: &str) -> Error {
    Error::InvalidArgument(format!(
        "{} is a {format} image with its {what}: blocksnap reads an image in a qemu format only \
         when it is self-contained; export it yourself (qemu-nbd -r -f {format} …) and give its \
         nbd+unix:// URI, or flatten it (qemu-img convert)",
        path.display()
    ))
}

fn missing_tool(tool: &str, e: std::io::Error) -> Error {
    Error::NotFound(format!(
        "{tool} is needed for disk images in qemu formats and cannot run ({e}): install it \
         (apt-get install qemu-utils)"
    ))
}

/// Creates a new image of `format` and `size` bytes at `path`.
pub fn create_image(path: &Path, format: &str, size: u64) -> Result<()> {
    if path.exists() {
        return Err(Error::TargetExists(path.to_path_buf()));
    }
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| missing_tool("qemu-img", e))?;
    if !out.status.success() {
        return Err(Error::InvalidArgument(format!(
            "qemu-img cannot create a {format} image at {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A private `qemu-nbd` serving one image; stopped when dropped.
#[derive(Debug)]
pub struct QemuExport {
    child: Child,
    dir: PathBuf,
    uri: String,
}

impl QemuExport {
    /// Serves the `format` image at `path` (read-only unless `writable`;
    /// with its persistent dirty bitmap `bitmap`) on a socket in a new
    /// temporary directory, once it answers.
    pub fn start(
        path: &Path,
        format: &str,
        writable: bool,
        bitmap: Option<&str>,
    ) -> Result<QemuExport> {
        let dir = std::env::temp_dir().join(crate::id::random_id("blocksnap-qemu-nbd"));
        std::fs::create_dir(&dir).ctx("create", &dir)?;
        let socket = dir.join("nbd.sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--persistent",
            "--shared=8",
            "--export-name=disk",
            "--format",
            format,
        ])
        .arg("--socket")
        .arg(&socket)
        .args(if writable {
            &["--cache=writeback"][..]
        } else {
            &["--read-only"][..]
        })
        .args(bitmap.map(|b| format!("--bitmap={b}")))
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        crate::sys::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir(&dir);
            missing_tool("qemu-nbd", e)
        })?;
        let mut export = QemuExport {
            child,
            uri: format!("nbd+unix:///disk?socket={}", socket.display()),
            dir,
        };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = export.child.try_wait().ctx("wait for qemu-nbd on", path)? {
                let mut err = String::new();
                if let Some(mut e) = export.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(Error::InvalidArgument(format!(
                    "qemu-nbd could not serve {} ({status}): {}",
                    path.display(),
                    err.trim()
                )));
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Error::InvalidArgument(format!(
                    "qemu-nbd did not start serving {} within 30 s",
                    path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(export)
    }

    /// Its `nbd+unix://` URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

impl Drop for QemuExport {
    fn drop(&mut self) {
        // SIGTERM lets qemu-nbd flush and close the image cleanly.
        crate::sys::terminate(self.child.id());
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
