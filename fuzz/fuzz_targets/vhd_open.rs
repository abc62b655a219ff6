//! VHD: footer (at the end and its copy at 0), dynamic header, BAT, parent
//! locators, sector bitmaps.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vdiskfs::fuzzing::open_layer(data, vdiskfs::format::Format::Vhd);
    vdiskfs::fuzzing::open_and_read(data, Some(vdiskfs::format::Format::Vhd), &[]);
    vdiskfs::fuzzing::open_and_read(data, None, &[]);
});
