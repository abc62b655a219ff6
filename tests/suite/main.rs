//! vdiskfs's integration tests, one test binary (`cargo test --release
//! --test suite`): one module per area, the shared helpers in `common`
//! compiled once. Filter by module path, e.g. `cargo test --release --test
//! suite qcow2_write::` or `-- --exact mount::NAME`.
//!
//! One binary instead of one per file: the helpers and the library link
//! once, not 37 times. Tests of different areas now share a process (and
//! the default of one test thread per core), so a test must not rely on
//! being alone in it: it sets environment variables for its child
//! processes, not for the process (the two exceptions are set once and are
//! harmless to other areas: `common::fuse::bin`'s transport and `remote`'s
//! `AWS_*` for the S3 server). A child-process helper is an `#[ignore]`d
//! test run with `--ignored --exact MODULE::NAME`, so it never counts as a
//! pass.

mod chains;
mod common;
mod daemon;
mod detect;
mod everyday;
mod fuzz_regressions;
mod hostile;
mod info_qemu;
mod load_snapshot;
mod logging;
mod manifest;
mod map;
mod model_writes;
mod mount;
mod nbd;
mod nbd_protocol;
mod nbd_tls;
mod overlap;
mod parallel_cow;
mod parallels;
mod powercut;
mod qcow;
mod qcow2;
mod qcow2_write;
mod qcow_write;
mod reclaim_race;
mod remote;
mod remote_cache;
mod remote_clouds;
mod remote_open;
mod uring;
mod vdi;
mod vhd;
mod vhd_diff;
mod vhd_vdi_write;
mod vhdx;
mod vhdx_write;
mod vmdk;
mod vmdk_write;
mod writeback;
mod writes;
