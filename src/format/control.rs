//! The control protocol of a process serving lazy volumes (`volume serve
//! --writable`, `instance attach`): one JSON request line, one JSON
//! response line, over a Unix socket in the abstract namespace named by
//! what is served. Every message carries `Version` (frozen: do not
//! modify); a server answers a newer one with an error saying so.

use serde::{Deserialize, Serialize};

use crate::format::manifest::Tag;
use crate::id::{AccountId, SnapshotId};

pub const CONTROL_VERSION: u32 = 1;
/// The longest request or response line accepted.
pub const MAX_MESSAGE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "Op", rename_all = "PascalCase")]
pub enum Op {
    /// Snapshot the writable volumes served (those `devices` names, or
    /// all), at one instant.
    #[serde(rename_all = "PascalCase")]
    Snapshot {
        #[serde(default)]
        devices: Vec<String>,
        description: String,
        tags: Vec<Tag>,
        owner: Option<AccountId>,
        threads: usize,
        no_delta: bool,
    },
    /// Stop serving and exit.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Response {
    pub version: u32,
    /// Set when the request failed: what went wrong, for the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<Taken>,
}

/// One snapshot a `Snapshot` request took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Taken {
    /// The device (`/dev/xvda`) or the overlay's path.
    pub volume: String,
    pub snapshot_id: SnapshotId,
    pub blocks_read: u64,
    pub blocks_taken: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_written() {
        let r = Request {
            version: CONTROL_VERSION,
            op: Op::Snapshot {
                devices: vec!["/dev/xvda".into()],
                description: "d".into(),
                tags: vec![],
                owner: None,
                threads: 0,
                no_delta: false,
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.starts_with(r#"{"Version":1,"Op":"Snapshot","#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        let stop: Request = serde_json::from_str(r#"{"Version":1,"Op":"Stop"}"#).unwrap();
        assert_eq!(stop.op, Op::Stop);
    }
}
