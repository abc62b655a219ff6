//! Opening remote chains (issue 18): the metadata of the whole chain is
//! fetched at open with overlapping requests (tables hinted to the host
//! file at once, backing objects opened while the tables of the layer
//! naming them arrive). Measured as sequential round trips against the
//! small server of tests/suite/common/httpd.rs with an injected delay.

use crate::common;
use crate::common::httpd;

use std::path::Path;
use std::sync::atomic::Ordering;

use vdiskfs::chain::{Chain, ChainOptions};

/// A three-link chain, top.qcow2 → mid.qcow2 → base.vmdk (monolithicSparse),
/// each link with data of its own; returns the directory.
fn three_links() -> tempfile::TempDir {
    let dir = common::scratch();
    let p = |n: &str| dir.path().join(n);
    common::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        p("base.vmdk").to_str().unwrap(),
        "256M",
    ]);
    common::qemu_io(
        "vmdk",
        &p("base.vmdk"),
        &["write -P 0x11 0 1M", "write -P 0x12 200M 64k"],
    );
    for (name, back, fmt, cmd) in [
        ("mid.qcow2", "base.vmdk", "vmdk", "write -P 0x22 512k 64k"),
        ("top.qcow2", "mid.qcow2", "qcow2", "write -P 0x33 2M 4k"),
    ] {
        let path = p(name);
        let t = path.to_str().unwrap();
        common::qemu_img(&["create", "-q", "-f", "qcow2", "-b", back, "-F", fmt, t]);
        common::qemu_io("qcow2", &path, &[cmd]);
    }
    dir
}

#[test]
fn a_remote_chain_opens_in_overlapping_round_trips_and_reads_byte_exact() {
    // 64 KiB chunks put each qcow2 L1 table in a chunk of its own, as on
    // images larger than the default 4 MiB first chunk.
    let _client = httpd::remote_client(vdiskfs::remote::Settings {
        chunk: 64 << 10,
        ..Default::default()
    });
    let dir = three_links();
    let top = dir.path().join("top.qcow2");
    let expected = common::qemu_raw(&top, Some("qcow2"));
    let server = httpd::Httpd::start(dir.path());
    // Far above the client's own work, so each sequential step is one
    // round: requests started together by one arrival count as one round
    // only if the last of them reaches the server before the first is
    // answered, and on a loaded two-CPU machine (the whole suite at once)
    // threads woken together were seen to start 100 ms apart.
    server.ctl.delay_ms.store(400, Ordering::SeqCst);
    let url = server.url("top.qcow2");
    let r0 = server.ctl.rounds.load(Ordering::SeqCst);
    let q0 = server.ctl.requests.load(Ordering::SeqCst);
    let chain = Chain::open(Path::new(&url), &ChainOptions::default(), &common::caches()).unwrap();
    let rounds = server.ctl.rounds.load(Ordering::SeqCst) - r0;
    let requests = server.ctl.requests.load(Ordering::SeqCst) - q0;
    assert_eq!(chain.layers().len(), 3);
    // One round for the top's first chunk, then one per link in which the
    // link's L1 table and the next link's first chunk arrive together
    // (layer by layer: first chunk, then tables, link after link).
    assert!(
        rounds <= 3,
        "opening the chain took {rounds} sequential rounds ({requests} requests)"
    );
    server.ctl.delay_ms.store(0, Ordering::SeqCst);
    let got = common::read_all(&chain, 1 << 20).unwrap();
    common::assert_same(&got, &expected, &top, 1 << 20);
}
