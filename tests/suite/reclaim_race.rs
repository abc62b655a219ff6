//! Frees that cannot race reads: concurrent readers, writers and discards
//! on one writable qcow2 image (small clusters, so freed clusters are
//! reused at once). Every 8-byte word a writer stores encodes the guest
//! offset of its block and a version; a read must only ever see words of
//! its own block (any version) or zeros. A reader that mapped a cluster,
//! then lost it to a discard and a reuse for another block, would see
//! that other block's words.
//!
//! Bounded in time: `VDISKFS_RACE_SECS` (default 20) seconds.

use crate::common;
use common::qemu_img_line;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{caches, scratch};
use vdiskfs::chain::{Chain, ChainOptions};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 256;

fn word(block: u64, version: u64) -> u64 {
    // Never 0; the block's offset in the high half.
    ((block * BLOCK) << 24) | (version & 0xff_ffff) | 1 << 63
}

fn fill(block: u64, version: u64) -> Vec<u8> {
    let w = word(block, version).to_le_bytes();
    w.iter().copied().cycle().take(BLOCK as usize).collect()
}

/// The guest offset a word claims, or None for zeros.
fn owner(w: u64) -> Option<u64> {
    (w != 0).then_some((w & !(1 << 63)) >> 24)
}

struct Xs(u64);
impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn reads_never_see_another_offsets_data_under_discards_and_reuse() {
    let secs: u64 = std::env::var("VDISKFS_RACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let d = scratch();
    let img = d.path().join("race.qcow2");
    let size = (BLOCK * BLOCKS).to_string();
    qemu_img_line(&format!(
        "create -q -f qcow2 -o compat=1.1,cluster_size=4096 {} {}",
        img.to_str().unwrap(),
        &size
    ));
    let opts = ChainOptions {
        writable: true,
        ..Default::default()
    };
    let chain = Chain::open(&img, &opts, &caches()).unwrap();
    for b in 0..BLOCKS {
        chain.write_at(&fill(b, 0), b * BLOCK).unwrap();
    }
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let frees = AtomicU64::new(0);
    let bad: parking_lot::Mutex<Option<String>> = parking_lot::Mutex::new(None);
    let deadline = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let (chain, stop, reads, bad) = (&chain, &stop, &reads, &bad);
            s.spawn(move || {
                let mut r = Xs(0x9e37_79b9 + t);
                let mut buf = vec![0u8; 4 * BLOCK as usize];
                while !stop.load(Ordering::Relaxed) {
                    let n = 1 + r.next() % 4;
                    let b = r.next() % (BLOCKS - n + 1);
                    let out = &mut buf[..(n * BLOCK) as usize];
                    chain.read_at(out, b * BLOCK).unwrap();
                    for (i, c) in out.chunks_exact(8).enumerate() {
                        let w = u64::from_le_bytes(c.try_into().unwrap());
                        let at = b * BLOCK + i as u64 * 8;
                        if let Some(o) = owner(w) {
                            if o != at - at % BLOCK {
                                *bad.lock() = Some(format!(
                                    "read at {at:#x} returned a word of guest offset {o:#x}"
                                ));
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for t in 0..2u64 {
            let (chain, stop) = (&chain, &stop);
            s.spawn(move || {
                let mut r = Xs(0x1234_5678 + t);
                let mut v = 1;
                while !stop.load(Ordering::Relaxed) {
                    let b = r.next() % BLOCKS;
                    chain.write_at(&fill(b, v), b * BLOCK).unwrap();
                    v += 1;
                }
            });
        }
        for t in 0..2u64 {
            let (chain, stop, frees) = (&chain, &stop, &frees);
            s.spawn(move || {
                let mut r = Xs(0xdead_beef + t);
                while !stop.load(Ordering::Relaxed) {
                    let b = r.next() % BLOCKS;
                    chain.write_zeroes(b * BLOCK, BLOCK).unwrap();
                    frees.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (reads, frees) = (reads.into_inner(), frees.into_inner());
    eprintln!("{reads} reads, {frees} discards in {secs} s");
    if let Some(msg) = bad.into_inner() {
        panic!("{msg} (after {reads} reads, {frees} discards)");
    }
    assert!(
        reads > 1000 && frees > 1000,
        "too little work: {reads} reads, {frees} discards"
    );
    chain.flush().unwrap();
    drop(chain);
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(&img)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{v}");
}
