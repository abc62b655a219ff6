//! The byte layouts of FUSE-over-io_uring (protocol 7.42, Linux 6.14+) and
//! of the FUSE request and reply structures the ring carries, decoded and
//! encoded by hand (little-endian, as on every Linux FUSE host): pure
//! functions with no I/O, tested below. See docs/fuse-uring.md.

/// `FUSE_IO_URING_CMD_REGISTER`: hand the kernel an entry's buffers.
pub const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: reply and wait for the next request.
pub const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `in_out` area of `struct fuse_uring_req_header`: the `fuse_in_header`
/// of a request, the `fuse_out_header` of its reply.
pub const IN_OUT_SZ: usize = 128;
/// `op_in` area: the request's fixed per-opcode struct (its first argument).
pub const OP_IN_SZ: usize = 128;
/// Offset of `struct fuse_uring_ent_in_out` in the header buffer.
pub const ENT_IN_OUT_OFF: usize = IN_OUT_SZ + OP_IN_SZ;
/// `sizeof(struct fuse_uring_req_header)`: the header buffer of an entry.
pub const HEADER_SZ: usize = ENT_IN_OUT_OFF + 32;
/// Size of `struct fuse_in_header`.
pub const IN_HEADER_SZ: usize = 40;

/// FUSE opcodes served on the ring.
#[allow(missing_docs)]
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// `FATTR_SIZE` in `fuse_setattr_in.valid`.
pub const FATTR_SIZE: u32 = 1 << 3;
/// `FOPEN_KEEP_CACHE`.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// `FOPEN_PASSTHROUGH`.
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// Reads a little-endian u32 at `off`; zero past the end (callers check
/// lengths first, this only keeps a short buffer from panicking).
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads a little-endian u64 at `off`; zero past the end.
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8).map_or(0, |s| {
        u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    })
}

/// The fields of `struct fuse_in_header` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    /// Opcode.
    pub opcode: u32,
    /// Request id, echoed in the reply.
    pub unique: u64,
    /// Inode the request is about.
    pub nodeid: u64,
}

impl InHeader {
    /// Decodes the request header from an entry's header buffer.
    pub fn decode(header: &[u8]) -> InHeader {
        InHeader {
            opcode: u32_at(header, 4),
            unique: u64_at(header, 8),
            nodeid: u64_at(header, 16),
        }
    }
}

/// `fuse_uring_ent_in_out.commit_id` and `.payload_sz` of a fetched request.
pub fn ent_in_out(header: &[u8]) -> (u64, u32) {
    (
        u64_at(header, ENT_IN_OUT_OFF + 8),
        u32_at(header, ENT_IN_OUT_OFF + 16),
    )
}

/// Writes the reply headers into an entry's header buffer: the
/// `fuse_out_header` (length, errno as a negative number, unique) and the
/// payload size in `fuse_uring_ent_in_out`.
pub fn encode_reply(header: &mut [u8], unique: u64, error: i32, payload_sz: u32) {
    let len = 16 + payload_sz;
    header[..16].fill(0);
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&(-error.abs()).to_le_bytes());
    header[8..16].copy_from_slice(&unique.to_le_bytes());
    let e = &mut header[ENT_IN_OUT_OFF..ENT_IN_OUT_OFF + 32];
    e.fill(0);
    e[16..20].copy_from_slice(&payload_sz.to_le_bytes());
}

/// `struct fuse_uring_cmd_req` in the SQE's 80-byte command area.
pub fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

/// A little-endian writer over a reply payload.
pub struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Out<'a> {
    /// Writes from the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Out<'a> {
        Out { buf, pos: 0 }
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf[self.pos..self.pos + v.len()].copy_from_slice(v);
        self.pos += v.len();
        self
    }
    /// Bytes written.
    pub fn len(&self) -> usize {
        self.pos
    }
    /// Size of the buffer.
    pub fn buf_len(&self) -> usize {
        self.buf.len()
    }
    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

/// The fields of `struct fuse_attr`, 88 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// atime, mtime and ctime (seconds, nanoseconds).
    pub time: (u64, u32),
    /// Type and permission bits.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// Appends `struct fuse_attr`.
pub fn put_attr(o: &mut Out, a: &Attr) {
    o.u64(a.ino).u64(a.size).u64(a.blocks);
    o.u64(a.time.0).u64(a.time.0).u64(a.time.0);
    o.u32(a.time.1).u32(a.time.1).u32(a.time.1);
    o.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid);
    o.u32(0).u32(a.blksize).u32(0);
}

/// Appends `struct fuse_entry_out` (128 bytes) for `a` with the same
/// validity for the entry and its attributes.
pub fn put_entry_out(o: &mut Out, a: &Attr, valid: u64) {
    o.u64(a.ino).u64(0).u64(valid).u64(valid).u32(0).u32(0);
    put_attr(o, a);
}

/// Appends `struct fuse_attr_out` (104 bytes).
pub fn put_attr_out(o: &mut Out, a: &Attr, valid: u64) {
    o.u64(valid).u32(0).u32(0);
    put_attr(o, a);
}

/// Appends one `struct fuse_dirent` with its name, padded to 8 bytes;
/// false (nothing written) when it does not fit in `room` more bytes.
pub fn put_dirent(o: &mut Out, room: usize, ino: u64, off: u64, dir: bool, name: &[u8]) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if len > room {
        return false;
    }
    let kind = if dir { libc::DT_DIR } else { libc::DT_REG } as u32;
    o.u64(ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(kind)
        .bytes(name);
    o.bytes(&[0u8; 8][..len - 24 - name.len()]);
    true
}

/// Appends `struct fuse_kstatfs` (80 bytes): 4 KiB blocks, nothing free.
pub fn put_statfs(o: &mut Out, blocks: u64, files: u64) {
    o.u64(blocks).u64(0).u64(0).u64(files).u64(0);
    o.u32(4096).u32(255).u32(4096).u32(0);
    for _ in 0..6 {
        o.u32(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes_match_the_kernel() {
        assert_eq!(HEADER_SZ, 288);
        let mut buf = [0u8; 200];
        let a = Attr::default();
        let mut o = Out::new(&mut buf);
        put_attr(&mut o, &a);
        assert_eq!(o.len(), 88);
        let mut o = Out::new(&mut buf);
        put_entry_out(&mut o, &a, 1);
        assert_eq!(o.len(), 128);
        let mut o = Out::new(&mut buf);
        put_attr_out(&mut o, &a, 1);
        assert_eq!(o.len(), 104);
        let mut o = Out::new(&mut buf);
        put_statfs(&mut o, 1, 2);
        assert_eq!(o.len(), 80);
    }

    #[test]
    fn request_header_decodes() {
        let mut h = [0u8; HEADER_SZ];
        h[0..4].copy_from_slice(&80u32.to_le_bytes());
        h[4..8].copy_from_slice(&op::READ.to_le_bytes());
        h[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        h[16..24].copy_from_slice(&7u64.to_le_bytes());
        h[ENT_IN_OUT_OFF + 8..ENT_IN_OUT_OFF + 16].copy_from_slice(&0x1234u64.to_le_bytes());
        h[ENT_IN_OUT_OFF + 16..ENT_IN_OUT_OFF + 20].copy_from_slice(&5u32.to_le_bytes());
        let r = InHeader::decode(&h);
        assert_eq!(
            r,
            InHeader {
                opcode: op::READ,
                unique: 0x1234,
                nodeid: 7
            }
        );
        assert_eq!(ent_in_out(&h), (0x1234, 5));
        // A short buffer reads as zeros instead of panicking.
        assert_eq!(InHeader::decode(&h[..6]).unique, 0);
    }

    #[test]
    fn reply_header_encodes() {
        let mut h = [0xffu8; HEADER_SZ];
        encode_reply(&mut h, 99, libc::ENOENT, 0);
        assert_eq!(u32_at(&h, 0), 16);
        assert_eq!(u32_at(&h, 4) as i32, -libc::ENOENT);
        assert_eq!(u64_at(&h, 8), 99);
        assert_eq!(u32_at(&h, ENT_IN_OUT_OFF + 16), 0);
        encode_reply(&mut h, 100, 0, 4096);
        assert_eq!(u32_at(&h, 0), 16 + 4096);
        assert_eq!(u32_at(&h, 4), 0);
        assert_eq!(u32_at(&h, ENT_IN_OUT_OFF + 16), 4096);
        // Untouched: the op_in area (the kernel ignores it on commit).
        assert_eq!(h[IN_OUT_SZ], 0xff);
    }

    #[test]
    fn command_area_holds_commit_id_and_queue() {
        let c = cmd_req(0xabcdef, 3);
        assert_eq!(u64_at(&c, 0), 0);
        assert_eq!(u64_at(&c, 8), 0xabcdef);
        assert_eq!(u16::from_le_bytes([c[16], c[17]]), 3);
        assert!(c[18..].iter().all(|&b| b == 0));
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut buf = [0u8; 64];
        let mut o = Out::new(&mut buf);
        assert!(put_dirent(&mut o, 64, 2, 1, false, b"disk.raw"));
        assert_eq!(o.len(), 32);
        assert!(!put_dirent(&mut o, 32 - 1, 3, 2, false, b"abc"));
        assert_eq!(o.len(), 32);
        assert_eq!(u32_at(&buf, 16), 8);
        assert_eq!(u32_at(&buf, 20), libc::DT_REG as u32);
        assert_eq!(&buf[24..32], b"disk.raw");
    }
}
