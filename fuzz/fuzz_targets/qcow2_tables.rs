//! qcow2 L1/L2 (and subcluster) walking and compressed clusters: reads
//! through a blob opened as qcow2; the last 512 bytes script the reads.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.len().saturating_sub(512);
    let (image, script) = data.split_at(split);
    vdiskfs::fuzzing::open_and_read(image, Some(vdiskfs::format::Format::Qcow2), script);
});
