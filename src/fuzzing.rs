//! Entry points for the fuzz targets in `fuzz/` (and their regression
//! tests in `tests/suite/fuzz_regressions.rs`): open a byte blob as an image and
//! read through it, with small caches, never panicking.

use std::sync::Arc;

use crate::cache::Caches;
use crate::chain::{Chain, ChainOptions};
use crate::endian::{le16, le32};
use crate::format::{self, Format, Layer, OpenCtx};
use crate::host::HostFile;
use crate::policy::OpenPolicy;

/// Opens `data` as a `format` layer (or detects it) and reads the ranges
/// that `script` describes (pairs of little-endian u32: offset, length),
/// plus the first, last and a middle block. Errors are expected; panics,
/// hangs and huge allocations are the bugs.
pub fn open_and_read(data: &[u8], format: Option<Format>, script: &[u8]) {
    let Ok(file) = HostFile::from_bytes("fuzz.img", data) else {
        return;
    };
    let caches = Caches::new(8 << 20);
    let opts = ChainOptions {
        format,
        policy: confined(),
        max_depth: 4,
        ..Default::default()
    };
    let Ok(chain) = Chain::open_on(file, &opts, &caches) else {
        return;
    };
    exercise(&chain, script);
}

/// The policy of every fuzz open: files named by a blob resolve against a
/// directory that does not exist and are confined, so nothing on the host
/// is ever opened.
fn confined() -> OpenPolicy {
    OpenPolicy {
        untrusted: true,
        root: Some("/nonexistent-vdiskfs-fuzz".into()),
        ..Default::default()
    }
}

/// Opens `file` with the `format` driver alone (no chain), confined.
fn open_one(
    file: Arc<HostFile>,
    format: Format,
    caches: &Arc<Caches>,
    writable: bool,
) -> Option<Arc<dyn Layer>> {
    let policy = confined();
    let ctx = OpenCtx {
        caches,
        policy: &policy,
        writable,
    };
    format::open_layer_on(file, format, &ctx).ok()
}

/// Opens `data` with one driver directly (no chain) and maps every run.
pub fn open_layer(data: &[u8], format: Format) {
    let Ok(file) = HostFile::from_bytes("fuzz.img", data) else {
        return;
    };
    let caches: Arc<Caches> = Caches::new(8 << 20);
    let Some(layer) = open_one(file, format, &caches, false) else {
        return;
    };
    let _ = layer.info();
    let size = layer.virtual_size();
    let mut pos = 0u64;
    let mut steps = 0;
    while pos < size && steps < 10_000 {
        match layer.map(pos, size - pos) {
            Ok((_, n)) => pos += n.max(1),
            Err(_) => pos = pos.saturating_add(65536),
        }
        steps += 1;
    }
}

fn exercise(chain: &Chain, script: &[u8]) {
    let size = chain.size();
    if size == 0 {
        return;
    }
    let _ = crate::info::gather(chain);
    let mut buf = vec![0u8; 256 << 10];
    let mut read = |off: u64, len: u64| {
        let off = off % size;
        let len = len.clamp(1, buf.len() as u64).min(size - off) as usize;
        let _ = chain.read_at(&mut buf[..len], off);
        let _ = chain.status(off, len as u64);
    };
    read(0, 65536);
    read(size / 2, 65536);
    read(size.saturating_sub(4096), 4096);
    for pair in script.chunks_exact(8).take(64) {
        let off = le32(pair, 0) as u64 * 512;
        let len = le32(pair, 4) as u64;
        read(off, len);
    }
}

/// Nothing below the fuzzed layer: copy-on-write fills read zeros.
struct NoBelow;

impl crate::format::Below for NoBelow {
    fn read_below(&self, buf: &mut [u8], _offset: u64) -> crate::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// Largest image a writable fuzz run may grow its memfd to.
const MAX_GROWN: u64 = 256 << 20;

/// Opens `data` writable as `format` (on a memfd copy) and runs the
/// operations `script` describes, 8 bytes each (at most 64): byte 0 picks
/// write (pattern), zeroing, flush or read; bytes 1..3 a length (up to
/// 128 KiB); bytes 4..8 an offset in 512-byte sectors. Errors are
/// expected. Panics if an operation panics, if the image grows without
/// bound, or if a write that succeeded left its data where the image,
/// opened afresh, keeps metadata.
pub fn open_and_write(data: &[u8], format: Format, script: &[u8]) {
    let Ok(file) = HostFile::from_bytes_rw("fuzz.img", data) else {
        return;
    };
    let caches = Caches::new(8 << 20);
    let Some(layer) = open_one(file.clone(), format, &caches, true) else {
        return;
    };
    let Some(w) = layer.as_write() else {
        return;
    };
    let size = layer.virtual_size();
    if size == 0 {
        return;
    }
    // VHDX allocates whole blocks (up to 256 MiB, mostly holes).
    let max_grown = match format {
        Format::Vhdx => MAX_GROWN.max(65 * layer.info().cluster_size.unwrap_or(0)),
        _ => MAX_GROWN,
    };
    let mut written = Vec::new();
    for (i, op) in script.chunks_exact(8).take(64).enumerate() {
        let len = u64::from(le16(op, 1)) * 2 + 1;
        let off = u64::from(le32(op, 4)) * 512 % size;
        let len = len.min(size - off);
        match op[0] % 4 {
            0 => {
                let buf = vec![(i as u8) | 1; len as usize];
                if w.write_at(&buf, off, &NoBelow).is_ok() {
                    written.push((off, len));
                }
            }
            1 => {
                let _ = w.write_zeroes(off, len, &NoBelow);
            }
            2 => {
                let _ = w.flush();
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                let mut pos = 0;
                while pos < len {
                    match layer.map(off + pos, len - pos) {
                        Ok((_, n)) => pos += n.max(1),
                        Err(_) => break,
                    }
                }
                let _ = file.read_at_most(&mut buf, off);
            }
        }
        let grown = file.file().metadata().map_or(0, |m| m.len());
        assert!(
            grown <= (data.len() as u64).max(1 << 20) + max_grown,
            "{format}: the image grew to {grown} bytes (op {i})"
        );
    }
    let _ = w.flush();
    drop(layer);
    check_written(&file, format, &caches, &written);
}

/// Reopens the written image and checks that no range a successful write
/// covered maps to host bytes the fresh open counts as metadata.
fn check_written(
    file: &Arc<HostFile>,
    format: Format,
    caches: &Arc<Caches>,
    written: &[(u64, u64)],
) {
    let Ok(dup) = file.file().try_clone() else {
        return;
    };
    let Ok(again) = HostFile::from_file(dup, "fuzz.img".into(), true) else {
        return;
    };
    let Some(layer) = open_one(again, format, caches, true) else {
        return;
    };
    let Some(w) = layer.as_write() else {
        return;
    };
    let maps = w.metadata_maps();
    for &(off, len) in written {
        let mut pos = off;
        while pos < off + len {
            let Ok((m, n)) = layer.map(pos, off + len - pos) else {
                break;
            };
            if let crate::format::Mapping::Data { file, offset } = m {
                for map in maps.iter().filter(|m| m.path() == file.path()) {
                    if let Some(hit) = map.find(offset, n) {
                        panic!(
                            "guest {pos:#x}+{n} was written to host {offset:#x}, which holds \
                             the {} at {:#x}",
                            hit.what, hit.start
                        );
                    }
                }
            }
            pos += n.max(1);
        }
    }
}

/// Feeds `data` to the NBD server as the bytes a client sends: the
/// handshake (also as a server requiring TLS would take it, up to
/// `STARTTLS`), then (if the client selected an export) the transmission
/// phase, against two 1 MiB in-memory raw exports, `rw` (writable) and
/// `ro`. Replies go nowhere. Protocol errors are expected; panics, hangs
/// and unbounded allocations are the bugs.
pub fn nbd_client(data: &[u8]) {
    use crate::nbd::{negotiate, transmit, Export};
    let caches = Caches::new(1 << 20);
    let mut exports = Vec::new();
    for (name, writable) in [("rw", true), ("ro", false)] {
        let Ok(mem) = HostFile::from_bytes("fuzz.raw", &vec![0x5a; 1 << 20]) else {
            return;
        };
        let Ok(file) = mem.file().try_clone() else {
            return;
        };
        let Ok(file) = HostFile::from_file(file, "fuzz.raw".into(), writable) else {
            return;
        };
        let opts = ChainOptions {
            format: Some(Format::Raw),
            writable,
            ..Default::default()
        };
        let Ok(chain) = Chain::open_on(file, &opts, &caches) else {
            return;
        };
        exports.push(Export {
            name: name.into(),
            description: name.into(),
            chain: Arc::new(chain),
            on_write: None,
        });
    }
    /// The client's bytes in, the server's bytes discarded.
    struct Wire<'a>(&'a [u8]);
    impl std::io::Read for Wire<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::io::Read::read(&mut self.0, buf)
        }
    }
    impl std::io::Write for Wire<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // The same bytes against a server that requires TLS, up to STARTTLS.
    let mut wire = Wire(data);
    if let Ok(mut n) = negotiate::Negotiator::greet(&mut wire, negotiate::Tls::Required) {
        let _ = n.options(&mut wire, &exports);
    }
    let mut wire = Wire(data);
    let Ok(Some(neg)) = negotiate::negotiate(&mut wire, &exports) else {
        return;
    };
    let limits = transmit::Limits {
        workers: 1,
        inflight_bytes: 1 << 20,
    };
    let _ = transmit::serve(wire.0, std::io::sink(), &exports[neg.export], &neg, &limits);
}
