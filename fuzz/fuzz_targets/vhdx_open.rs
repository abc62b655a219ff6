//! VHDX: headers, region table, metadata, BAT, sector bitmaps, log replay.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdiskfs::fuzzing::open_layer(data, vdiskfs::format::Format::Vhdx);
    vdiskfs::fuzzing::open_and_read(data, Some(vdiskfs::format::Format::Vhdx), &[]);
});
