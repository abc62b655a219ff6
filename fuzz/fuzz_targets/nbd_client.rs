//! The NBD server fed arbitrary client bytes: handshake, options, then
//! requests against two small in-memory exports.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdiskfs::fuzzing::nbd_client(data);
});
