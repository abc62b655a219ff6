//! The writable paths: a blob opened writable (on a memfd copy) as qcow2,
//! qcow, VMDK, VHD, VDI or VHDX (the first byte picks which), then random writes, zeroings,
//! flushes and reads scripted by the last 512 bytes. No panic, bounded
//! growth, and no successful write's data where the image keeps metadata.
#![no_main]
use vdiskfs::format::Format;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let format = match pick % 6 {
        0 => Format::Qcow2,
        1 => Format::Qcow,
        2 => Format::Vmdk,
        3 => Format::Vhd,
        4 => Format::Vdi,
        _ => Format::Vhdx,
    };
    let split = rest.len().saturating_sub(512);
    let (image, script) = rest.split_at(split);
    vdiskfs::fuzzing::open_and_write(image, format, script);
});
