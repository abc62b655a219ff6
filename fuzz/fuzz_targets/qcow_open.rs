//! qcow version 1: header, L1/L2 tables, compressed clusters.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdiskfs::fuzzing::open_layer(data, vdiskfs::format::Format::Qcow);
    vdiskfs::fuzzing::open_and_read(data, Some(vdiskfs::format::Format::Qcow), &[]);
});
