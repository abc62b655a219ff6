//! Compressed cluster decoding: the first byte picks the method and output size.
#![no_main]
use vdiskfs::compress::{decompress, Method};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let method = match sel % 3 {
        0 => Method::Deflate,
        1 => Method::Zlib,
        _ => Method::Zstd,
    };
    let mut out = vec![0u8; 512 << (sel as usize / 3 % 13)];
    let _ = decompress(method, input, &mut out, sel & 0x80 != 0);
});
