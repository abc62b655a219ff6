//! VMDK containers: hosted sparse (KDMV) headers, embedded descriptors,
//! grain directories and tables, COWD and seSparse headers.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() >= 512 {
        let head: &[u8; 512] = data[..512].try_into().expect("512 bytes");
        let _ = vdiskfs::format::vmdk::sparse::Header::parse(head);
    }
    vdiskfs::fuzzing::open_layer(data, vdiskfs::format::Format::Vmdk);
});
