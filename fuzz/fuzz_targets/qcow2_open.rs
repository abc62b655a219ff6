//! qcow2 header, header extensions, snapshot table: open a blob as qcow2.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdiskfs::fuzzing::open_layer(data, vdiskfs::format::Format::Qcow2);
});
