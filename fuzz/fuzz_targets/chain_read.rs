//! End to end: a blob opened as an image (format detected from content)
//! and read at scripted ranges through the whole chain stack.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.len().saturating_sub(256);
    let (image, script) = data.split_at(split);
    vdiskfs::fuzzing::open_and_read(image, None, script);
});
