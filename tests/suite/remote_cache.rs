//! Remote images (issue 18), through FUSE mounts of URLs served by the
//! small Range-capable server of tests/suite/common/httpd.rs: the on-disk
//! chunk cache (`--remote-cache`: reuse by a second mount, no stale chunks
//! after an ETag change, its size bound, damaged files refetched) and
//! writes into a local overlay over a remote base, checked by qemu-img.

use crate::common;
use crate::common::httpd;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use common::fuse::Mounted;

/// Patterned bytes, different for each `seed`.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(7).wrapping_add(seed) % 251) as u8)
        .collect()
}

/// A directory with `base.raw` (4 MiB) and `top.qcow2` over it, some
/// clusters rewritten; the expected raw content of `top.qcow2`.
fn chain_dir() -> (tempfile::TempDir, String) {
    let dir = common::scratch();
    std::fs::write(dir.path().join("base.raw"), pattern(4 << 20, 1)).unwrap();
    let top = dir.path().join("top.qcow2");
    let t = top.to_str().unwrap();
    common::qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", t,
    ]);
    common::qemu_io(
        "qcow2",
        &top,
        &["write -P 0x5a 64k 128k", "write -P 0xa5 3M 4k"],
    );
    let sha = common::sha256_hex(&common::qemu_raw(&top, Some("qcow2")));
    (dir, sha)
}

/// Mounts `url` with `opts` and returns the raw view's sha256, the
/// requests the server answered meanwhile and the body bytes it sent.
fn mount_and_hash(server: &httpd::Httpd, url: &str, opts: &[&str]) -> (String, u64, u64) {
    let (r0, s0) = (
        server.ctl.requests.load(Ordering::Relaxed),
        server.ctl.sent.load(Ordering::Relaxed),
    );
    let m = Mounted::new(&[Path::new(url)], opts);
    let sha = common::sha256_file(&m.file("top.raw"));
    m.unmount();
    let (r1, s1) = (
        server.ctl.requests.load(Ordering::Relaxed),
        server.ctl.sent.load(Ordering::Relaxed),
    );
    (sha, r1 - r0, s1 - s0)
}

fn cache_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "chunk"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_second_mount_reads_from_the_disk_cache_and_never_stale_chunks() {
    let (dir, sha) = chain_dir();
    let cache = common::scratch();
    let server = httpd::Httpd::start(dir.path());
    let url = server.url("top.qcow2");
    let c = cache.path().to_str().unwrap();
    let opts = ["--remote-cache", c, "--remote-chunk", "256K"];

    let (got, first, first_sent) = mount_and_hash(&server, &url, &opts);
    assert_eq!(got, sha);
    assert!(first_sent >= 4 << 20, "{first_sent}");
    let (got, second, second_sent) = mount_and_hash(&server, &url, &opts);
    assert_eq!(got, sha);
    // A HEAD per object, by the mount command's check and by the daemon,
    // and at most a stray chunk whose write the first daemon's exit cut short.
    eprintln!("first mount: {first} requests, {first_sent} bytes; second: {second}, {second_sent}");
    assert!(
        second <= 6 && second < first && second_sent <= 512 << 10,
        "second mount: {second} requests, {second_sent} bytes (first: {first})"
    );

    // A new version of the base (new ETag): its old chunks must not be used.
    let new_base = pattern(4 << 20, 2);
    std::fs::write(dir.path().join("new"), &new_base).unwrap();
    std::fs::rename(dir.path().join("new"), dir.path().join("base.raw")).unwrap();
    let want = common::sha256_hex(&common::qemu_raw(
        &dir.path().join("top.qcow2"),
        Some("qcow2"),
    ));
    assert_ne!(want, sha);
    let (got, third, _) = mount_and_hash(&server, &url, &opts);
    assert_eq!(got, want, "stale chunks of the old base were served");
    assert!(third > 2, "the new base was not fetched ({third} requests)");

    // A damaged cache file is detected and its chunk fetched again.
    let files = cache_files(cache.path());
    assert!(!files.is_empty());
    for f in &files {
        let raw = std::fs::read(f).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
        file.write_at(&[raw[raw.len() - 1] ^ 0xff], raw.len() as u64 - 1)
            .unwrap();
    }
    let (got, fourth, _) = mount_and_hash(&server, &url, &opts);
    assert_eq!(got, want, "a damaged cache file was served");
    assert!(
        fourth > 2,
        "damaged chunks were not fetched again ({fourth} requests)"
    );
}

#[test]
fn the_disk_cache_stays_within_its_bound() {
    let (dir, sha) = chain_dir();
    let cache = common::scratch();
    let server = httpd::Httpd::start(dir.path());
    let url = server.url("top.qcow2");
    let c = cache.path().to_str().unwrap();
    let opts = [
        "-o",
        &format!("remote_cache={c},remote_cache_size=1M"),
        "--remote-chunk",
        "128K",
    ];
    let (got, _, _) = mount_and_hash(&server, &url, &opts);
    assert_eq!(got, sha);
    let total: u64 = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        total <= 1 << 20,
        "{total} bytes in a cache bounded to 1 MiB"
    );
    assert!(total >= 512 << 10, "the cache holds only {total} bytes");
}

#[test]
fn overlay_writes_over_a_remote_base_pass_qemu_img_check_and_compare() {
    let dir = common::scratch();
    let base = pattern(4 << 20, 3);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let server = httpd::Httpd::start(dir.path());
    let url = server.url("base.raw");
    let work = common::scratch();
    let ov = work.path().join("ov.qcow2");
    let ovs = ov.to_str().unwrap();

    let mut want = base.clone();
    let writes: [(usize, usize, u8); 3] = [
        (0, 4096, 0x11),
        (1 << 20, 300_000, 0x22),
        ((4 << 20) - 512, 512, 0x33),
    ];
    let m = Mounted::new(&[Path::new(&url)], &["--overlay", ovs]);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.file("base.raw"))
            .unwrap();
        for (at, len, byte) in writes {
            f.write_all_at(&vec![byte; len], at as u64).unwrap();
            want[at..at + len].fill(byte);
        }
        f.sync_all().unwrap();
    }
    m.unmount();

    // qemu's view of the overlay: the URL is its backing file name.
    let info = common::qemu_img(&["info", "--output=json", "-U", ovs]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], url.as_str(), "{info}");
    assert_eq!(v["backing-filename-format"], "raw", "{info}");
    // `check` opens the backing file too (through qemu's curl driver, if
    // installed): checked without it, the overlay's own metadata.
    let spec = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{ovs}"}},"backing":null}}"#
    );
    common::qemu_img(&["check", "-q", &spec]);

    // qemu-img compare: the base copied locally and the overlay's backing
    // name rewritten to it (without touching data, -u).
    let local_base = work.path().join("base.raw");
    std::fs::write(&local_base, &base).unwrap();
    let copy = work.path().join("copy.qcow2");
    std::fs::copy(&ov, &copy).unwrap();
    let lb = local_base.to_str().unwrap();
    common::qemu_img_line(&format!(
        "rebase -u -f qcow2 -b {} -F raw {}",
        lb,
        copy.to_str().unwrap()
    ));
    let expected = work.path().join("want.raw");
    std::fs::write(&expected, &want).unwrap();
    common::qemu_img_line(&format!(
        "compare -q -f qcow2 -F raw {} {}",
        copy.to_str().unwrap(),
        expected.to_str().unwrap()
    ));

    // vdiskfs reuses the overlay: remount it over the same URL.
    let m = Mounted::new(&[Path::new(&url)], &["--overlay", ovs]);
    assert_eq!(
        common::sha256_file(&m.file("base.raw")),
        common::sha256_hex(&want)
    );
    m.unmount();
}
