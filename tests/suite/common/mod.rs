//! Helpers shared by the integration tests: the qemu-img oracle, image
//! building, and reading through the library.
#![allow(dead_code)]

pub mod damage;
pub mod fuse;
pub mod httpd;
pub mod manifest;
pub mod model;
pub mod nbd;
pub mod rng;
pub mod vhd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use vdiskfs::cache::Caches;
use vdiskfs::chain::{Chain, ChainOptions};

/// Fails the test (never skips) when a tool is missing, saying what to install.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: install it (apt-get install {package}); this test does not skip"
    );
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img` with arguments.
pub fn qemu_img(args: &[&str]) -> String {
    require_tool("qemu-img", "qemu-utils");
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img` with `line` split at white space: one line for the many
/// create/convert calls. Only for arguments without spaces (scratch paths
/// have none; a test that names a file with a space uses [`qemu_img`]).
pub fn qemu_img_line(line: &str) -> String {
    let args: Vec<&str> = line.split_whitespace().collect();
    qemu_img(&args)
}

/// The data extents `qemu-img map` reports for `img` (read as `fmt`, or
/// probed), adjacent ones merged.
pub fn qemu_data_extents(img: &Path, fmt: Option<&str>) -> Vec<(u64, u64)> {
    let mut args = vec!["map", "--output=json"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.push(img.to_str().unwrap());
    let v: serde_json::Value = serde_json::from_str(&qemu_img(&args)).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] != true {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// The data extents of the file at `path` by SEEK_DATA / SEEK_HOLE, as
/// `(start, end)`; ENXIO ends the walk (no data past `pos`).
pub fn seek_data_extents(path: &Path) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let fd = f.as_raw_fd();
    let size = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: fd is open for the duration of the calls; lseek has no
        // memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "SEEK_DATA: {err}");
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE {hole} after data at {data}");
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    out
}

/// `qemu-io -f FMT IMAGE -c CMD...`.
pub fn qemu_io(fmt: &str, image: &Path, cmds: &[&str]) {
    require_tool("qemu-io", "qemu-utils");
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(image);
    run(&mut c);
}

/// The oracle: `qemu-img convert -O raw` of `image`, as bytes.
pub fn qemu_raw(image: &Path, fmt: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("oracle.raw");
    let mut args = vec!["convert"];
    if let Some(f) = fmt {
        args.push("-f");
        args.push(f);
    }
    let img = image.to_str().unwrap();
    let o = out.to_str().unwrap();
    args.extend(["-O", "raw", img, o]);
    qemu_img(&args);
    std::fs::read(&out).unwrap()
}

/// A temporary path as `&str` (tempfile paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Opens `image` writable, with otherwise default options.
pub fn try_open_rw(image: &Path) -> vdiskfs::Result<Chain> {
    let opts = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    Chain::open(image, &opts, &caches())
}

/// [`try_open_rw`], panicking with the error.
pub fn open_rw(image: &Path) -> Chain {
    try_open_rw(image).unwrap_or_else(|e| panic!("open {}: {e}", image.display()))
}

/// The first offset where `a` and `b` differ (within the shorter one).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts that `got` equals the in-memory `model`, naming the first
/// differing offset.
pub fn assert_model(got: &[u8], model: &[u8], what: &str) {
    assert_eq!(got.len(), model.len(), "{what}: size");
    if let Some(i) = first_difference(got, model) {
        panic!("{what}: differs from the model at offset {i:#x}");
    }
}

/// Opens `image` with default options.
pub fn open_chain(image: &Path) -> vdiskfs::Result<Chain> {
    Chain::open(image, &ChainOptions::default(), &Caches::new(64 << 20))
}

/// Opening `p` must fail: the error.
pub fn open_err(p: &Path) -> vdiskfs::Error {
    match open_chain(p) {
        Ok(_) => panic!("{} opened, expected an error", p.display()),
        Err(e) => e,
    }
}

/// A copy of `src` in `dir` with `f` applied to its bytes.
pub fn patched(src: &Path, dir: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    f(&mut bytes);
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Reads the whole disk through the library, in `piece`-sized reads.
pub fn read_all(chain: &Chain, piece: usize) -> vdiskfs::Result<Vec<u8>> {
    let size = chain.size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let n = piece.min(size - pos);
        chain.read_at(&mut out[pos..pos + n], pos as u64)?;
        pos += n;
    }
    Ok(out)
}

/// Asserts that reading `image` through the library equals the qemu oracle,
/// with small reads at random offsets (into empty caches: compressed
/// blocks are first decoded only partly), then whole-disk and odd-sized
/// piecewise reads.
pub fn assert_matches_qemu(image: &Path) {
    let expected = qemu_raw(image, None);
    let chain = open_chain(image).unwrap_or_else(|e| panic!("open {}: {e}", image.display()));
    let mut rng = rng::Rng::new(expected.len() as u64);
    for _ in 0..500 {
        let len = (1 + rng.below(9000) as usize).min(expected.len());
        let off = rng.below((expected.len() - len) as u64 + 1) as usize;
        let mut got = vec![0u8; len];
        chain
            .read_at(&mut got, off as u64)
            .unwrap_or_else(|e| panic!("{}: read {len} at {off:#x}: {e}", image.display()));
        assert!(
            got == expected[off..off + len],
            "{}: random read of {len} bytes at {off:#x} differs from qemu-img convert",
            image.display()
        );
    }
    assert_eq!(
        chain.size() as usize,
        expected.len(),
        "virtual size of {}",
        image.display()
    );
    for piece in [1 << 20, 4096 + 512, 65536 * 3 + 7] {
        let got = read_all(&chain, piece).unwrap();
        assert_same(&got, &expected, image, piece);
    }
}

/// Compares two disks, reporting the first differing offset.
pub fn assert_same(got: &[u8], expected: &[u8], image: &Path, piece: usize) {
    assert_eq!(got.len(), expected.len(), "size of {}", image.display());
    if let Some(first) = first_difference(got, expected) {
        panic!(
            "{}: differs from qemu-img convert at offset {first:#x} (read size {piece})",
            image.display()
        );
    }
}

/// A scratch directory for one test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The shared testdata directory (../shared/testdata from the repo root).
pub fn testdata() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        root.join("../shared/testdata"),
        root.join("../../shared/testdata"),
    ];
    for c in &candidates {
        if c.join("MANIFEST.tsv").exists() {
            return c.clone();
        }
    }
    panic!("../shared/testdata/MANIFEST.tsv not found next to the repository; tests need it");
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fresh caches for a test.
pub fn caches() -> Arc<Caches> {
    Caches::new(64 << 20)
}

/// sha256 of a file, streamed in 4 MiB pieces.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a whole disk read through the library in 4 MiB pieces.
pub fn sha256_chain(chain: &Chain) -> vdiskfs::Result<String> {
    use sha2::{Digest, Sha256};
    let size = chain.size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        chain.read_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A qcow2 overlay `ov.qcow2` in `base`'s folder over `base` (of qemu format
/// `fmt`), with `writes` by qemu-io: it reads as qemu-img does, and the chain
/// has `base` as its second layer, detected as `fmt`.
pub fn assert_qcow2_overlay_over(base: &Path, fmt: &str, writes: &[&str]) {
    let ov = base.with_file_name("ov.qcow2");
    let name = base.file_name().unwrap().to_str().unwrap();
    qemu_img_line(&format!("create -f qcow2 -b {name} -F {fmt} {}", s(&ov)));
    qemu_io("qcow2", &ov, writes);
    assert_matches_qemu(&ov);
    let chain = open_chain(&ov).unwrap();
    assert_eq!(chain.layers()[1].format().name(), fmt);
    assert_eq!(chain.layers()[1].path(), base);
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A two-layer qcow2 chain in `dir`: `base.qcow2` of `size` with
/// `base_writes`, under `disk.qcow2` with `top_writes` (qemu-io commands);
/// returns the top.
pub fn qcow2_pair(dir: &Path, size: &str, base_writes: &[&str], top_writes: &[&str]) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), size]);
    qemu_io("qcow2", &base, base_writes);
    qemu_img_line(&format!(
        "create -q -f qcow2 -b base.qcow2 -F qcow2 {}",
        s(&top)
    ));
    qemu_io("qcow2", &top, top_writes);
    top
}

/// A hand-made ESXi COWD (vmfsSparse) extent of 2048 sectors, 8-sector
/// grains, one grain directory entry at sector 4 pointing at the grain
/// table at sector 5; `grains` are (grain index, fill byte), stored from
/// sector 40 on in that order. Returns the file's bytes.
pub fn cowd_extent(grains: &[(usize, u8)]) -> Vec<u8> {
    let mut cowd = vec![0u8; (40 + 8 * grains.len()) * 512];
    let put = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    cowd[0..4].copy_from_slice(b"COWD");
    put(&mut cowd, 4, 1); // version
    put(&mut cowd, 8, 3); // flags
    put(&mut cowd, 12, 2048); // capacity, sectors
    put(&mut cowd, 16, 8); // grain, sectors
    put(&mut cowd, 20, 4); // GD sector
    put(&mut cowd, 24, 1); // GD entries
    put(&mut cowd, 4 * 512, 5); // GD[0] -> GT at sector 5
    for (i, &(grain, fill)) in grains.iter().enumerate() {
        let sector = 40 + 8 * i;
        put(&mut cowd, 5 * 512 + 4 * grain, sector as u32); // GT[grain]
        cowd[sector * 512..(sector + 8) * 512].fill(fill);
    }
    cowd
}
