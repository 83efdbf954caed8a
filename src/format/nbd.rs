//! The NBD wire protocol (the NetworkBlockDevice project's `doc/proto.md`):
//! its magics, numbers and message layouts, as pure encode and decode for a
//! server here and a client later. Every integer is big-endian.
//!
//! ```text
//! handshake   server: "NBDMAGIC" IHAVEOPT flags:u16
//!             client: flags:u32
//! option      client: IHAVEOPT option:u32 length:u32 data
//!             server: REPLY_MAGIC option:u32 type:u32 length:u32 data
//! request     client: REQUEST_MAGIC flags:u16 type:u16 cookie:u64 offset:u64 length:u32 [data]
//! simple      server: SIMPLE_MAGIC error:u32 cookie:u64 [data]
//! structured  server: STRUCTURED_MAGIC flags:u16 type:u16 cookie:u64 length:u32 payload
//! ```

/// `NBDMAGIC`: the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// `NBD_REP_INFO` types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command flags.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` states.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Errors (the Linux errno values the protocol reuses).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;

/// The longest option a peer may send (names, queries): anything longer
/// is refused before it is read.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The longest string in the protocol (export names, contexts).
pub const MAX_STRING: usize = 4096;

/// The fixed part of a request.
pub const REQUEST_LEN: usize = 28;
/// A simple reply's header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// A structured reply chunk's header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// A `qemu:dirty-bitmap:` context's state: the range was written.
pub const STATE_DIRTY: u32 = 1 << 0;
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A client's request, decoded from its [`REQUEST_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// `None` when the magic is wrong (the stream is lost).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// An option reply's header, followed by `len` bytes of data.
pub fn option_reply(option: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply's header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk's header, followed by `len` bytes of payload.
pub fn structured_reply(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A reply's header as a client reads it: simple or a structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Structured {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

impl ReplyHeader {
    /// How many header bytes follow the first four (the magic), or `None`
    /// for an unknown magic (the stream is lost).
    pub fn rest_len(magic: [u8; 4]) -> Option<usize> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN - 4),
            STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_LEN - 4),
            _ => None,
        }
    }

    /// Decodes a whole header (magic included); `None` when malformed.
    pub fn decode(b: &[u8]) -> Option<ReplyHeader> {
        match (be32(b.get(0..4)?), b.len()) {
            (SIMPLE_REPLY_MAGIC, SIMPLE_REPLY_LEN) => Some(ReplyHeader::Simple {
                error: be32(&b[4..8]),
                cookie: be64(&b[8..16]),
            }),
            (STRUCTURED_REPLY_MAGIC, STRUCTURED_REPLY_LEN) => Some(ReplyHeader::Structured {
                flags: be16(&b[4..6]),
                kind: be16(&b[6..8]),
                cookie: be64(&b[8..16]),
                len: be32(&b[16..20]),
            }),
            _ => None,
        }
    }
}

/// A client's option: `IHAVEOPT`, the option, its data's length, its data.
pub fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Decodes an option reply's header: the option, the reply type and the
/// data length; `None` when the magic is wrong.
pub fn decode_option_reply(b: &[u8; 20]) -> Option<(u32, u32, u32)> {
    (be64(&b[0..8]) == REPLY_MAGIC).then(|| (be32(&b[8..12]), be32(&b[12..16]), be32(&b[16..20])))
}

/// A `BLOCK_STATUS` chunk's payload: the context id and its extents
/// (length, state); `None` when malformed (no extent, a ragged tail, an
/// empty extent).
pub fn decode_block_status(payload: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return None;
    }
    let id = be32(&payload[0..4]);
    let extents: Vec<(u32, u32)> = payload[4..]
        .chunks_exact(8)
        .map(|e| (be32(&e[0..4]), be32(&e[4..8])))
        .collect();
    extents
        .iter()
        .all(|&(len, _)| len > 0)
        .then_some((id, extents))
}

/// An error chunk's payload: the error and its message; `None` when
/// malformed.
pub fn decode_error(payload: &[u8]) -> Option<(u32, String)> {
    let error = be32(payload.get(0..4)?);
    let len = be16(payload.get(4..6)?) as usize;
    let msg = payload.get(6..6 + len)?;
    Some((error, String::from_utf8_lossy(msg).into_owned()))
}

/// Reads big-endian integers and length-prefixed strings out of an
/// option's data, never past its end.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(be64)
    }

    /// The unread rest.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len()).unwrap_or_default()
    }

    /// A string of a `u32` length, at most [`MAX_STRING`] bytes of UTF-8.
    pub fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("eight bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_a_bad_magic_is_refused() {
        let r = Request {
            flags: CMD_FLAG_REQ_ONE,
            kind: CMD_BLOCK_STATUS,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 65536,
        };
        let mut b = r.encode();
        assert_eq!(Request::decode(&b), Some(r));
        b[0] ^= 1;
        assert_eq!(Request::decode(&b), None);
    }

    #[test]
    fn option_data_is_read_within_bounds() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&7u16.to_be_bytes());
        let mut r = Reader::new(&data);
        assert_eq!(r.string().as_deref(), Some("abc"));
        assert_eq!(r.u16(), Some(7));
        assert!(r.is_empty());
        assert_eq!(r.u16(), None);
        // A length past the end, or an absurd one, is refused.
        let mut r = Reader::new(&[0, 0, 0, 9, b'x']);
        assert_eq!(r.string(), None);
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.string(), None);
    }
}
