//! Identifier newtypes, parsed and validated once at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A string that is not a valid id of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: expected {expected}")]
pub struct InvalidId {
    pub kind: &'static str,
    pub input: String,
    pub expected: &'static str,
}

type Result<T> = std::result::Result<T, InvalidId>;

/// Name of a chunk: the BLAKE3-256 digest of the raw block bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Content address of `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 12 hex digits, enough to name a chunk in a message.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

impl FromStr for ChunkId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self> {
        let bytes = unhex(s)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| InvalidId {
                kind: "chunk id",
                input: s.to_string(),
                expected: "64 lowercase hex digits",
            })?;
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes);
        Ok(ChunkId(id))
    }
}

/// How chunks are named: by the plain BLAKE3-256 of their bytes, or, for
/// chunks under an encryption key, by BLAKE3 keyed with a key derived from
/// it, so that equal blocks still share a chunk within one key and a name
/// says nothing about the bytes to whoever lacks the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Namer {
    Plain,
    Keyed([u8; 32]),
}

impl Namer {
    pub fn name(&self, data: &[u8]) -> ChunkId {
        match self {
            Namer::Plain => ChunkId::of(data),
            Namer::Keyed(k) => ChunkId(*blake3::keyed_hash(k, data).as_bytes()),
        }
    }
}

impl fmt::Debug for Namer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.write_str(match self {
            Namer::Plain => "Namer::Plain",
            Namer::Keyed(_) => "Namer::Keyed",
        })
    }
}

/// An encryption key's id, as KMS writes it: a random (version 4) UUID in
/// lowercase, `8-4-4-4-12` hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    pub fn random() -> KeyId {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the OS random number generator failed");
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        KeyId(b)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex(&self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || InvalidId {
            kind: "key id",
            input: s.to_string(),
            expected: "a UUID of lowercase hex digits, e.g. 1234abcd-12ab-34cd-56ef-1234567890ab",
        };
        let groups: Vec<&str> = s.split('-').collect();
        if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let bytes = unhex(&groups.concat()).ok_or_else(bad)?;
        Ok(KeyId(bytes.try_into().map_err(|_| bad())?))
    }
}

impl TryFrom<String> for KeyId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.to_string()
    }
}

/// Random suffix length of snapshot, image and instance ids, as in EC2.
const ID_HEX_LEN: usize = 17;

/// Writes a `prefix-` + 17 lowercase hex id from fresh random bytes.
pub(crate) fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 9];
    // The OS random source failing means the system is unusable; there is
    // no sane fallback for id uniqueness.
    getrandom::fill(&mut bytes).expect("the OS random number generator failed");
    let mut s = hex(&bytes);
    s.truncate(ID_HEX_LEN);
    format!("{prefix}-{s}")
}

fn is_prefixed_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            hex.len() == ID_HEX_LEN
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// The string conversions every validated string id shares: `FromStr`
/// does the validation; these route serde and formatting through it.
macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = <$name as std::str::FromStr>::Err;
            fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
pub(crate) use string_newtype;

/// Defines an EC2-style id newtype: `prefix-` + 17 lowercase hex digits.
macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal, $example:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn random() -> Self {
                $name(random_id($prefix))
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self> {
                if is_prefixed_id(s, $prefix) {
                    Ok($name(s.to_string()))
                } else {
                    Err(InvalidId {
                        kind: $kind,
                        input: s.to_string(),
                        expected: concat!($prefix, "- followed by 17 lowercase hex digits, e.g. ", $example),
                    })
                }
            }
        }

        string_newtype!($name);
    };
}

prefixed_id!(
    /// A snapshot: `snap-` + 17 lowercase hex digits.
    SnapshotId, "snap", "snapshot id", "snap-0123456789abcdef0"
);
prefixed_id!(
    /// An image (AMI): `ami-` + 17 lowercase hex digits.
    ImageId, "ami", "image id", "ami-0123456789abcdef0"
);
prefixed_id!(
    /// A lifecycle policy: `policy-` + 17 lowercase hex digits (as DLM's).
    PolicyId, "policy", "policy id", "policy-0123456789abcdef0"
);
prefixed_id!(
    /// A recycle bin retention rule: `rule-` + 17 lowercase hex digits.
    RuleId, "rule", "retention rule id", "rule-0123456789abcdef0"
);
prefixed_id!(
    /// A launched instance: `i-` + 17 lowercase hex digits.
    InstanceId, "i", "instance id", "i-0123456789abcdef0"
);

/// A 12-digit account id, the owner of snapshots and images.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

impl AccountId {
    /// A fresh random account id, given to a new store as its default owner.
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random number generator failed");
        let n = u64::from_le_bytes(bytes) % 1_000_000_000_000;
        AccountId(format!("{n:012}"))
    }
}

impl FromStr for AccountId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self> {
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(AccountId(s.to_string()))
        } else {
            Err(InvalidId {
                kind: "account id",
                input: s.to_string(),
                expected: "12 decimal digits, e.g. 123456789012",
            })
        }
    }
}

string_newtype!(AccountId);

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_are_validated() {
        let id = SnapshotId::random();
        assert_eq!(id.as_str().len(), "snap-".len() + 17);
        assert_eq!(id.as_str().parse::<SnapshotId>().unwrap(), id);
        for bad in [
            "snap-123",
            "snap-0123456789ABCDEF0",
            "ami-0123456789abcdef0",
            "snap0123456789abcdef0",
            "",
        ] {
            assert!(bad.parse::<SnapshotId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn chunk_id_hex_round_trip() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert_eq!(id.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert!("zz".parse::<ChunkId>().is_err());
    }

    #[test]
    fn key_ids_are_uuids_and_names_depend_on_the_key() {
        let k = KeyId::random();
        let text = k.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text.parse::<KeyId>().unwrap(), k);
        for bad in [
            "",
            "1234",
            "1234abcd-12ab-34cd-56ef-1234567890aB",
            "1234abcd12ab34cd56ef1234567890ab",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
        let (a, b) = (Namer::Keyed([1; 32]), Namer::Keyed([2; 32]));
        assert_ne!(a.name(b"x"), b.name(b"x"));
        assert_ne!(a.name(b"x"), Namer::Plain.name(b"x"));
        assert_eq!(Namer::Plain.name(b"x"), ChunkId::of(b"x"));
        assert!(!format!("{a:?}").contains('1'));
    }

    #[test]
    fn account_ids_are_twelve_digits() {
        assert!("123456789012".parse::<AccountId>().is_ok());
        assert!("12345678901".parse::<AccountId>().is_err());
        assert!("12345678901a".parse::<AccountId>().is_err());
        assert_eq!(AccountId::random().as_str().len(), 12);
    }
}
