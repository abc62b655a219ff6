//! The NBD wire format, pure: constants, parsing of what a client sends
//! (option payloads, request headers) and encoding of what the server
//! sends (option replies, simple replies, structured reply chunks).
//!
//! Nothing here does I/O, so every rule of the encoding is unit-tested and
//! fuzzed without sockets. The numbers are those of the NBD project's
//! `doc/proto.md`; `qemu:allocation-depth` is described in qemu's
//! `docs/interop/nbd.txt`.
use crate::endian::{
    be16, be16_bytes, be32, be32_bytes, be64, be64_bytes, put_be16, put_be32, put_be64,
};

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows NBDMAGIC (newstyle), and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Option: select an export, old style (no reply on failure).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client gives up.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe and select an export.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: option not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: malformed or invalid in this state.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: the option's payload is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Info: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info: the export's name.
pub const INFO_NAME: u16 = 1;
/// Info: a description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: TRIM is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections see one consistent disk.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: FAST_ZERO is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard.
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not deallocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: BLOCK_STATUS wants one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: WRITE_ZEROES must fail rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured chunk flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk: nothing (ends a reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk: a run of zeros at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk: an error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// NBD error: not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// NBD error: I/O error.
pub const EIO: u32 = 5;
/// NBD error: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD error: invalid request.
pub const EINVAL: u32 = 22;
/// NBD error: no space (write past the end).
pub const ENOSPC: u32 = 28;
/// NBD error: request too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error: not supported (FAST_ZERO that would be slow).
pub const ENOTSUP: u32 = 95;
/// NBD error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, context query) the spec lets a client send.
pub const MAX_STRING: usize = 4096;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;

/// The metadata contexts this server knows, by id.
pub const CONTEXTS: [(u32, &str); 2] = [
    (CTX_BASE_ALLOCATION, "base:allocation"),
    (CTX_ALLOCATION_DEPTH, "qemu:allocation-depth"),
];
/// Context id of `base:allocation`.
pub const CTX_BASE_ALLOCATION: u32 = 1;
/// Context id of `qemu:allocation-depth`.
pub const CTX_ALLOCATION_DEPTH: u32 = 2;

/// A malformed client message: the connection answers `REP_ERR_INVALID`
/// (negotiation) or is dropped (transmission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// Reads big-endian integers and strings off a byte slice, failing (never
/// panicking) when it runs short.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        let b = self.take(2, what)?;
        Ok(be16(b, 0))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        let b = self.take(4, what)?;
        Ok(be32(b, 0))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, Malformed> {
        let b = self.take(8, what)?;
        Ok(be64(b, 0))
    }
    /// A u32-length-prefixed string of at most [`MAX_STRING`] bytes.
    fn string(&mut self, what: &'static str) -> Result<String, Malformed> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING {
            return Err(Malformed(what));
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Malformed(what))
    }
    fn done(&self, what: &'static str) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Malformed(what))
        }
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export's name (empty: the default export).
    pub name: String,
    /// The information types the client asks for.
    pub requests: Vec<u16>,
}

/// Parses the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, Malformed> {
    let mut c = Cursor { buf: data };
    let name = c.string("bad export name in NBD_OPT_GO/INFO")?;
    let n = c.u16("missing information request count")?;
    let mut requests = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        requests.push(c.u16("information request list is short")?);
    }
    c.done("trailing bytes after NBD_OPT_GO/INFO")?;
    Ok(InfoRequest { name, requests })
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (context names or namespace prefixes).
    pub queries: Vec<String>,
}

/// Parses the payload of the two meta-context options.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, Malformed> {
    let mut c = Cursor { buf: data };
    let export = c.string("bad export name in meta context option")?;
    let n = c.u32("missing query count")?;
    let mut queries = Vec::new();
    for _ in 0..n {
        // Each query takes at least its 4-byte length, so a hostile count
        // ends at the payload's end instead of in a huge allocation.
        queries.push(c.string("bad meta context query")?);
    }
    c.done("trailing bytes after meta context queries")?;
    Ok(MetaRequest { export, queries })
}

/// The contexts a query selects. `list` allows the namespace-only forms
/// (`base:`, `qemu:`) that `NBD_OPT_LIST_META_CONTEXT` accepts.
pub fn match_context(query: &str, list: bool) -> Vec<(u32, &'static str)> {
    CONTEXTS
        .iter()
        .filter(|(_, name)| {
            *name == query
                || (list
                    && query.ends_with(':')
                    && name.starts_with(query)
                    && query.len() < name.len())
        })
        .copied()
        .collect()
}

/// One option reply: header and payload.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&be64_bytes(OPT_REPLY_MAGIC));
    v.extend_from_slice(&be32_bytes(option));
    v.extend_from_slice(&be32_bytes(reply));
    v.extend_from_slice(&be32_bytes(data.len() as u32));
    v.extend_from_slice(data);
    v
}

/// The `NBD_REP_SERVER` payload naming one export.
pub fn server_entry(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&be32_bytes(name.len() as u32));
    v.extend_from_slice(name.as_bytes());
    v
}

/// The `NBD_INFO_EXPORT` payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&be16_bytes(INFO_EXPORT));
    v.extend_from_slice(&be64_bytes(size));
    v.extend_from_slice(&be16_bytes(flags));
    v
}

/// An `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` payload.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut v = be16_bytes(kind).to_vec();
    v.extend_from_slice(text.as_bytes());
    v
}

/// The `NBD_INFO_BLOCK_SIZE` payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = be16_bytes(INFO_BLOCK_SIZE).to_vec();
    for x in [min, preferred, max] {
        v.extend_from_slice(&be32_bytes(x));
    }
    v
}

/// The `NBD_REP_META_CONTEXT` payload.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = be32_bytes(id).to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte count.
    pub len: u32,
}

/// Parses a request header; a wrong magic is a protocol error.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, Malformed> {
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(Malformed("bad request magic"));
    }
    let mut c = Cursor { buf: &b[4..] };
    let flags = c.u16("request")?;
    let kind = c.u16("request")?;
    let cookie = c.u64("request")?;
    let offset = c.u64("request")?;
    let len = c.u32("request")?;
    Ok(Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    })
}

/// A simple reply header (for READ, the data follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut v = [0u8; 16];
    put_be32(&mut v, 0, SIMPLE_REPLY_MAGIC);
    put_be32(&mut v, 4, error);
    put_be64(&mut v, 8, cookie);
    v
}

/// A structured chunk header announcing `len` bytes of payload.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut v = [0u8; 20];
    put_be32(&mut v, 0, STRUCTURED_REPLY_MAGIC);
    put_be16(&mut v, 4, flags);
    put_be16(&mut v, 6, kind);
    put_be64(&mut v, 8, cookie);
    put_be32(&mut v, 16, len);
    v
}

/// A whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(cookie: u64, flags: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut v = chunk_header(cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12).to_vec();
    v.extend_from_slice(&be64_bytes(offset));
    v.extend_from_slice(&be32_bytes(len));
    v
}

/// A whole `NBD_REPLY_TYPE_ERROR` chunk (always the last).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut v = chunk_header(
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&be32_bytes(error));
    v.extend_from_slice(&be16_bytes(msg.len() as u16));
    v.extend_from_slice(msg);
    v
}

/// A whole `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: `extents` are
/// (length, flags) pairs.
pub fn status_chunk(cookie: u64, flags: u16, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut v = chunk_header(cookie, flags, REPLY_TYPE_BLOCK_STATUS, len).to_vec();
    v.extend_from_slice(&be32_bytes(context));
    for (l, f) in extents {
        v.extend_from_slice(&be32_bytes(*l));
        v.extend_from_slice(&be32_bytes(*f));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = be32_bytes(s.len() as u32).to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn info_requests_parse() {
        let mut d = string("disk");
        d.extend_from_slice(&be16_bytes(2));
        d.extend_from_slice(&be16_bytes(INFO_BLOCK_SIZE));
        d.extend_from_slice(&be16_bytes(INFO_NAME));
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // Short, trailing bytes, oversized name.
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut t = d.clone();
        t.push(0);
        assert!(parse_info_request(&t).is_err());
        let mut big = be32_bytes(MAX_STRING as u32 + 1).to_vec();
        big.resize(MAX_STRING + 10, b'a');
        assert!(parse_info_request(&big).is_err());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn meta_requests_parse_and_match() {
        let mut d = string("disk");
        d.extend_from_slice(&be32_bytes(2));
        d.extend(string("base:allocation"));
        d.extend(string("qemu:"));
        let r = parse_meta_request(&d).unwrap();
        assert_eq!(r.queries, vec!["base:allocation", "qemu:"]);
        // A count far beyond the payload fails without allocating.
        let mut h = string("disk");
        h.extend_from_slice(&be32_bytes(u32::MAX));
        assert!(parse_meta_request(&h).is_err());
        assert_eq!(
            match_context("base:allocation", false),
            vec![(1, "base:allocation")]
        );
        assert!(match_context("qemu:", false).is_empty());
        assert_eq!(
            match_context("qemu:", true),
            vec![(2, "qemu:allocation-depth")]
        );
        assert!(match_context("base:nothing", true).is_empty());
        assert!(match_context("", true).is_empty());
    }

    #[test]
    fn requests_parse() {
        let mut b = [0u8; REQUEST_LEN];
        put_be32(&mut b, 0, REQUEST_MAGIC);
        put_be16(&mut b, 4, CMD_FLAG_FUA);
        put_be16(&mut b, 6, CMD_WRITE);
        put_be64(&mut b, 8, 0x1122);
        put_be64(&mut b, 16, 4096);
        put_be32(&mut b, 24, 512);
        let r = parse_request(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0x1122,
                offset: 4096,
                len: 512
            }
        );
        b[0] = 0;
        assert_eq!(parse_request(&b), Err(Malformed("bad request magic")));
    }

    #[test]
    fn replies_encode() {
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &be64_bytes(OPT_REPLY_MAGIC));
        assert_eq!(be32(&r, 8), 7);
        let s = simple_reply(9, EIO);
        assert_eq!(be32(&s, 4), 5);
        let e = error_chunk(9, EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(be32(&e, 16), 9);
        let st = status_chunk(1, REPLY_FLAG_DONE, 2, &[(4096, 1), (512, 0)]);
        assert_eq!(st.len(), 20 + 4 + 16);
        let h = hole_chunk(1, 0, 65536, 512);
        assert_eq!(h.len(), 32);
        assert_eq!(&info_export(1, 3)[..2], &[0, 0]);
        assert_eq!(info_block_size(1, 4096, 1 << 25).len(), 14);
    }
}
