//! Byte order of on-disk and on-wire structures: the one place that turns
//! big- and little-endian fields into integers and back.
//!
//! Every image parser and writer (qcow, qcow2, VMDK, VHD, VHDX, VDI,
//! Parallels, MBR/GPT), the NBD protocol and the remote block cache read and
//! write their fields through these functions, named after the field as the
//! specs name it: `be32(header, 20)` is "the big-endian u32 at byte 20".
//!
//! Why our own module rather than `zerocopy` structs: the specs describe
//! fields by offset, and the parsers check each one as they read it (with
//! many variable-offset records: header extensions, snapshot entries,
//! extent tables); plain offset readers map 1:1 to the spec tables and need
//! no derive machinery or layout assertions (see docs/dependencies.md).
//!
//! Two kinds of reader:
//! - `be32(b, at)` & co. for a buffer whose length the caller has already
//!   made sure of (a header read at its fixed size, an entry of a table
//!   whose length was checked). Reading past the end is a bug in our code,
//!   never in the image, and panics like slice indexing does.
//! - `get_be32(b, at)` & co. return `None` past the end, for buffers whose
//!   length comes from the input (probing, peers, variable records).

/// Generates, for one integer type and byte order, the fixed reader, the
/// checked reader, the writer into a buffer, the encoder to an array and
/// the iterator over a packed table.
macro_rules! field {
    ($t:ty, $n:literal, $from:ident, $to:ident,
     $read:ident, $get:ident, $put:ident, $bytes:ident, $all:ident, $order:literal) => {
        #[doc = concat!("The ", $order, " `", stringify!($t), "` at `b[at..]`; `b` must hold it (see the module doc).")]
        #[inline]
        #[must_use]
        #[track_caller]
        pub fn $read(b: &[u8], at: usize) -> $t {
            let mut a = [0u8; $n];
            a.copy_from_slice(&b[at..at + $n]);
            <$t>::$from(a)
        }

        #[doc = concat!("The ", $order, " `", stringify!($t), "` at `b[at..]`, or `None` when `b` is too short.")]
        #[inline]
        #[must_use]
        pub fn $get(b: &[u8], at: usize) -> Option<$t> {
            let s = b.get(at..at.checked_add($n)?)?;
            let mut a = [0u8; $n];
            a.copy_from_slice(s);
            Some(<$t>::$from(a))
        }

        #[doc = concat!("Stores `v` as ", $order, " at `b[at..]`; `b` must have room (our own buffers).")]
        #[inline]
        #[track_caller]
        pub fn $put(b: &mut [u8], at: usize, v: $t) {
            b[at..at + $n].copy_from_slice(&v.$to());
        }

        #[doc = concat!("`v` as ", $order, " bytes, to write or append as it is.")]
        #[inline]
        #[must_use]
        pub const fn $bytes(v: $t) -> [u8; $n] {
            v.$to()
        }

        #[doc = concat!("The ", $order, " `", stringify!($t), "` entries of a packed table (a trailing partial entry is ignored).")]
        pub fn $all(b: &[u8]) -> impl Iterator<Item = $t> + '_ {
            b.chunks_exact($n).map(|c| {
                let mut a = [0u8; $n];
                a.copy_from_slice(c);
                <$t>::$from(a)
            })
        }
    };
}

field!(
    u16,
    2,
    from_be_bytes,
    to_be_bytes,
    be16,
    get_be16,
    put_be16,
    be16_bytes,
    be16s,
    "big-endian"
);
field!(
    u32,
    4,
    from_be_bytes,
    to_be_bytes,
    be32,
    get_be32,
    put_be32,
    be32_bytes,
    be32s,
    "big-endian"
);
field!(
    u64,
    8,
    from_be_bytes,
    to_be_bytes,
    be64,
    get_be64,
    put_be64,
    be64_bytes,
    be64s,
    "big-endian"
);
field!(
    u16,
    2,
    from_le_bytes,
    to_le_bytes,
    le16,
    get_le16,
    put_le16,
    le16_bytes,
    le16s,
    "little-endian"
);
field!(
    u32,
    4,
    from_le_bytes,
    to_le_bytes,
    le32,
    get_le32,
    put_le32,
    le32_bytes,
    le32s,
    "little-endian"
);
field!(
    u64,
    8,
    from_le_bytes,
    to_le_bytes,
    le64,
    get_le64,
    put_le64,
    le64_bytes,
    le64s,
    "little-endian"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_both_orders_at_an_offset() {
        let mut b = [0u8; 16];
        put_be32(&mut b, 1, 0x1122_3344);
        assert_eq!(&b[1..5], &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(be32(&b, 1), 0x1122_3344);
        put_le64(&mut b, 8, 0x0102_0304_0506_0708);
        assert_eq!(b[8], 0x08);
        assert_eq!(le64(&b, 8), 0x0102_0304_0506_0708);
        assert_eq!(be16(&b, 1), 0x1122);
        assert_eq!(le16(&b, 1), 0x2211);
        assert_eq!(be16_bytes(0xabcd), [0xab, 0xcd]);
        assert_eq!(le32_bytes(1), [1, 0, 0, 0]);
    }

    #[test]
    fn checked_readers_refuse_short_buffers_and_huge_offsets() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!(get_le32(&b, 1), Some(0x0504_0302));
        assert_eq!(get_le32(&b, 2), None);
        assert_eq!(get_be64(&b, 0), None);
        assert_eq!(get_be16(&b, usize::MAX), None);
    }

    #[test]
    fn tables_decode_every_whole_entry() {
        let b = [0, 0, 0, 1, 0, 0, 0, 2, 9];
        assert_eq!(be32s(&b).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(le16s(&b[..4]).collect::<Vec<_>>(), [0, 0x0100]);
    }
}
