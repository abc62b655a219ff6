//! Reads through a blob opened as VMDK: grain tables, zeroed grains,
//! streamOptimized markers and compressed grains; the last 256 bytes script the reads.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.len().saturating_sub(256);
    let (image, script) = data.split_at(split);
    vdiskfs::fuzzing::open_and_read(image, Some(vdiskfs::format::Format::Vmdk), script);
});
