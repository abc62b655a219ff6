//! Vdi: header, block table, mapping every run, reads through the chain.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdiskfs::fuzzing::open_layer(data, vdiskfs::format::Format::Vdi);
    vdiskfs::fuzzing::open_and_read(data, Some(vdiskfs::format::Format::Vdi), &[]);
});
