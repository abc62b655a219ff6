//! Decoding of compressed blocks: raw deflate (qcow2, qcow), zlib (VMDK
//! stream-optimized grains) and zstd (qcow2 `compression_type=zstd`).
//!
//! Every decoder writes into a caller-sized buffer and never allocates more
//! than that, whatever the input claims: the output size is known from the
//! image's cluster or grain size, never from the compressed stream.

use std::io::Read;

use crate::error::{Error, Result};

/// A compression method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Raw deflate (RFC 1951), as qcow2 and qcow write.
    Deflate,
    /// zlib (RFC 1950: deflate with header and checksum), as VMDK writes.
    Zlib,
    /// A zstd frame.
    Zstd,
}

/// Decodes `input` into exactly `out.len()` bytes.
///
/// Trailing bytes after the end of the compressed stream are ignored (qcow2
/// rounds compressed lengths up to sectors). A stream that ends before
/// `out` is full is an error unless `allow_short`, in which case the rest
/// is zero-filled.
pub fn decompress(method: Method, input: &[u8], out: &mut [u8], allow_short: bool) -> Result<()> {
    let n = match method {
        Method::Deflate => inflate(input, out, false),
        Method::Zlib => inflate(input, out, true),
        Method::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => fill(d.single_frame(), out),
            Err(e) => Err(e),
        },
    }
    .map_err(|e| Error::corrupt(format!("{method:?} data does not decode: {e}")))?;
    if n < out.len() {
        if !allow_short {
            return Err(Error::corrupt(format!(
                "{method:?} data decodes to {n} bytes, expected {}",
                out.len()
            )));
        }
        out[n..].fill(0);
    }
    Ok(())
}

/// Inflates straight from `input` into `out` (no intermediate buffer),
/// stopping at the end of the stream or when `out` is full.
fn inflate(input: &[u8], out: &mut [u8], zlib_header: bool) -> std::io::Result<usize> {
    use flate2::Decompress;
    use std::cell::RefCell;
    thread_local! {
        // One decoder per thread and kind, reset between blocks: its window
        // and state are allocated once, not per block.
        static DECODERS: RefCell<[Option<Decompress>; 2]> = const { RefCell::new([None, None]) };
    }
    DECODERS.with(|cell| {
        let mut slots = cell.borrow_mut();
        let d = slots[usize::from(zlib_header)].get_or_insert_with(|| Decompress::new(zlib_header));
        d.reset(zlib_header);
        run_inflate(d, input, out)
    })
}

fn run_inflate(d: &mut flate2::Decompress, input: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    use flate2::{FlushDecompress, Status};
    loop {
        let (in_pos, out_pos) = (d.total_in() as usize, d.total_out() as usize);
        let status = d
            .decompress(&input[in_pos..], &mut out[out_pos..], FlushDecompress::None)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let (new_in, new_out) = (d.total_in() as usize, d.total_out() as usize);
        if status == Status::StreamEnd
            || new_out == out.len()
            || (new_in == in_pos && new_out == out_pos)
        {
            return Ok(new_out);
        }
    }
}

fn fill(mut r: impl Read, out: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < out.len() {
        match r.read(&mut out[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn deflate_round_trip_ignores_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut comp = deflate(&data);
        comp.extend_from_slice(&[0xAA; 300]);
        let mut out = vec![0u8; data.len()];
        decompress(Method::Deflate, &comp, &mut out, false).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_round_trip() {
        let data = vec![7u8; 4096];
        let mut comp = zstd::encode_all(&data[..], 3).unwrap();
        comp.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 4096];
        decompress(Method::Zstd, &comp, &mut out, false).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_and_garbage_streams_are_errors() {
        let comp = deflate(&[1u8; 100]);
        let mut out = vec![0u8; 200];
        assert!(decompress(Method::Deflate, &comp, &mut out, false).is_err());
        decompress(Method::Deflate, &comp, &mut out, true).unwrap();
        assert_eq!(&out[100..], &[0u8; 100][..]);
        assert!(decompress(Method::Zlib, &[0xff; 64], &mut out, false).is_err());
        assert!(decompress(Method::Zstd, &[0xff; 64], &mut out, false).is_err());
    }
}
