//! Entry points for the fuzz targets in `fuzz/` (and their regression
//! tests in `tests/fuzz_regressions.rs`): open a byte blob as an image and
//! read through it, with small caches, never panicking.

use std::sync::Arc;

use crate::cache::Caches;
use crate::chain::{Chain, ChainOptions};
use crate::format::{self, Format, OpenCtx};
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
    // Backing files named by a blob resolve against a directory that does
    // not exist and are confined: nothing on the host is ever opened.
    let opts = ChainOptions {
        format,
        policy: OpenPolicy {
            untrusted: true,
            root: Some("/nonexistent-vdiskfs-fuzz".into()),
            ..Default::default()
        },
        max_depth: 4,
        ..Default::default()
    };
    let Ok(chain) = Chain::open_on(file, &opts, &caches) else {
        return;
    };
    exercise(&chain, script);
}

/// Opens `data` with one driver directly (no chain) and maps every run.
pub fn open_layer(data: &[u8], format: Format) {
    let Ok(file) = HostFile::from_bytes("fuzz.img", data) else {
        return;
    };
    let caches: Arc<Caches> = Caches::new(8 << 20);
    let policy = OpenPolicy {
        untrusted: true,
        root: Some("/nonexistent-vdiskfs-fuzz".into()),
        ..Default::default()
    };
    let ctx = OpenCtx {
        caches: &caches,
        policy: &policy,
        writable: false,
    };
    let Ok(layer) = format::open_layer_on(file, format, &ctx) else {
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
        let off = u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]) as u64 * 512;
        let len = u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]) as u64;
        read(off, len);
    }
}

/// Feeds `data` to the NBD server as the bytes a client sends: the
/// handshake, then (if the client selected an export) the transmission
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
