//! VMDK text descriptor parsing (extent lines, quoting, ddb keys, CIDs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vdiskfs::format::vmdk::descriptor::looks_like_descriptor(data);
    let _ = vdiskfs::format::vmdk::descriptor::parse(data);
});
