//! Exit codes: what each failure maps to, and the message printed.

use blocksnap::id::InvalidId;
use blocksnap::{Error, ErrorKind};

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (I/O error, unreadable volume, anything not below)
  2  usage error: bad argument, malformed id, wrong block size, not a file or
     device, volume over 64 TiB
  3  not found: volume, snapshot, image, instance or region does not exist
  4  integrity: a chunk or manifest is corrupt, truncated or missing
  5  conflict: already exists (region, image name), target exists, differs in
     size or is too small, device in use,
     store locked, image deregistered, snapshot in use by an image, retention
     rule locked
  6  permission: the account may not use or change that image, snapshot,
     policy or retention rule";

fn code_of_kind(kind: Option<ErrorKind>) -> u8 {
    match kind {
        Some(ErrorKind::Usage) => 2,
        Some(ErrorKind::NotFound) => 3,
        Some(ErrorKind::Integrity) => 4,
        Some(ErrorKind::Conflict) => 5,
        Some(ErrorKind::Permission) => 6,
        Some(ErrorKind::Other) | None => 1,
    }
}

/// The exit code of a library error.
pub fn code_of(e: &Error) -> u8 {
    code_of_kind(Some(e.kind()))
}

pub fn describe_error(err: &anyhow::Error) -> (u8, String) {
    // A malformed id parsed here is a usage error like any other.
    let kind = |e: &(dyn std::error::Error + 'static)| {
        e.downcast_ref::<Error>()
            .map(Error::kind)
            .or_else(|| e.downcast_ref::<InvalidId>().map(|_| ErrorKind::Usage))
    };
    let code = code_of_kind(err.chain().find_map(kind));
    // Library errors already carry their cause in the message; context
    // added here comes first.
    let mut parts: Vec<String> = Vec::new();
    for e in err.chain() {
        let s = e.to_string();
        if parts.last().is_some_and(|prev| prev.contains(&s)) {
            continue;
        }
        let lib = kind(e).is_some();
        parts.push(s);
        if lib {
            break;
        }
    }
    (code, parts.join(": "))
}
