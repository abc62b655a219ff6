//! Damaged and crafted VHDX images: refused with the right error kind and a
//! one-line message naming the file, or EIO confined to the damaged block;
//! `vdiskfs info` on each stays within 512 MiB of address space and 20 s.

use std::time::{Duration, Instant};

use super::*;

enum Expect {
    /// Opening fails with this kind, the message saying this.
    Refused(ErrorKind, &'static str),
    /// Opens; reading guest offset `bad` fails, `good` reads.
    EioAt { bad: u64, good: u64 },
    /// Opens and reads exactly what qemu reads from the undamaged image.
    Reads,
}

/// Adds a region table entry to both copies (CRCs recomputed).
fn add_region(b: &mut [u8], guid: [u8; 16], offset: u64, len: u32, required: bool) {
    for t in [192u64 << 10, 256 << 10] {
        let n = u64::from(le32(b, t + 8));
        let e = t + 16 + 32 * n;
        b[e as usize..e as usize + 16].copy_from_slice(&guid);
        put64(b, e + 16, offset);
        put32(b, e + 24, len);
        put32(b, e + 28, u32::from(required));
        put32(b, t + 8, n as u32 + 1);
        fix_crc(b, t, 64 << 10);
    }
}

/// Adds a metadata table entry for an item of 8 bytes at 768 KiB.
fn add_metadata(b: &mut [u8], guid: [u8; 16], required: bool) {
    let m = metadata_offset(b);
    let n = u64::from(u16::from_le_bytes([b[m as usize + 10], b[m as usize + 11]]));
    let e = m + 32 + 32 * n;
    b[e as usize..e as usize + 16].copy_from_slice(&guid);
    put32(b, e + 16, 768 << 10);
    put32(b, e + 20, 8);
    put32(b, e + 24, if required { 4 } else { 0 });
    b[m as usize + 10..m as usize + 12].copy_from_slice(&(n as u16 + 1).to_le_bytes());
}

fn set_virtual_size(b: &mut [u8], v: u64) {
    let at = metadata_item(b, 0x2fa5_4224);
    put64(b, at, v);
}

#[test]
fn hostile_images_are_refused_or_fail_only_their_range() {
    let dir = scratch();
    let base = created(
        dir.path(),
        "base.vhdx",
        "8M",
        "block_size=1M",
        &["write -P 0x31 0 4M"],
    );
    let expected = qemu_raw(&base, None);
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch, Expect)> = vec![
        (
            "both-headers-bad",
            Box::new(|b| {
                b[64 << 10] ^= 0xff;
                b[(128 << 10) + 100] ^= 1;
            }),
            Expect::Refused(ErrorKind::Corrupt, "no valid VHDX header"),
        ),
        (
            "current-header-bad",
            Box::new(|b| {
                let h = current_header(b) as usize;
                b[h + 200] ^= 1;
            }),
            Expect::Reads,
        ),
        (
            "headers-share-a-sequence",
            Box::new(|b| {
                for h in [64u64 << 10, 128 << 10] {
                    put64(b, h + 8, 77);
                    b[h as usize + 16] ^= h as u8 ^ 0x5a; // FileWriteGuids differ
                    fix_crc(b, h, 4096);
                }
            }),
            Expect::Refused(ErrorKind::Corrupt, "share sequence number 77"),
        ),
        (
            "headers-identical",
            Box::new(|b| {
                let h = current_header(b) as usize;
                let copy = b[h..h + 4096].to_vec();
                b[(64 << 10)..(64 << 10) + 4096].copy_from_slice(&copy);
                b[(128 << 10)..(128 << 10) + 4096].copy_from_slice(&copy);
            }),
            Expect::Reads,
        ),
        (
            "regions-overlap",
            Box::new(|b| {
                let bat = bat_offset(b);
                for t in [192u64 << 10, 256 << 10] {
                    for i in 0..u64::from(le32(b, t + 8)) {
                        let e = t + 16 + 32 * i;
                        if le32(b, e) == 0x8b7c_a206 {
                            put64(b, e + 16, bat);
                        }
                    }
                    fix_crc(b, t, 64 << 10);
                }
            }),
            Expect::Refused(ErrorKind::Corrupt, "overlaps"),
        ),
        (
            "both-region-tables-bad",
            Box::new(|b| {
                b[(192 << 10) + 4] ^= 1;
                b[(256 << 10) + 4] ^= 1;
            }),
            Expect::Refused(ErrorKind::Corrupt, "no valid VHDX region table"),
        ),
        (
            "first-region-table-bad",
            Box::new(|b| b[(192 << 10) + 40] ^= 1),
            Expect::Reads,
        ),
        (
            "unknown-required-region",
            Box::new(|b| add_region(b, *b"unknown-region!!", 7 * MIB, MIB as u32, true)),
            Expect::Refused(ErrorKind::Unsupported, "marked required but unknown"),
        ),
        (
            "unknown-optional-region",
            Box::new(|b| add_region(b, *b"unknown-region!!", 7 * MIB, MIB as u32, false)),
            Expect::Reads,
        ),
        (
            "bat-region-past-eof",
            Box::new(|b| {
                for t in [192u64 << 10, 256 << 10] {
                    for i in 0..u64::from(le32(b, t + 8)) {
                        let e = t + 16 + 32 * i;
                        if le32(b, e) == 0x2dc2_7766 {
                            put64(b, e + 16, 1 << 40);
                        }
                    }
                    fix_crc(b, t, 64 << 10);
                }
            }),
            Expect::Refused(ErrorKind::Corrupt, "past the end of the file"),
        ),
        (
            "bat-entry-past-eof",
            Box::new(|b| {
                let bat = bat_offset(b);
                put64(b, bat + 8, (1 << 40) | 6);
            }),
            Expect::EioAt {
                bad: MIB + 4096,
                good: 0,
            },
        ),
        (
            "bat-entry-bad-state",
            Box::new(|b| {
                let bat = bat_offset(b);
                let e = le64(b, bat + 16);
                put64(b, bat + 16, (e & !7) | 7);
            }),
            Expect::EioAt {
                bad: 2 * MIB,
                good: 3 * MIB,
            },
        ),
        (
            "huge-virtual-size",
            Box::new(|b| set_virtual_size(b, 1 << 62)),
            Expect::Refused(ErrorKind::Corrupt, "virtual size"),
        ),
        (
            "bat-too-small-for-size",
            Box::new(|b| set_virtual_size(b, 60 << 40)),
            Expect::Refused(ErrorKind::Corrupt, "cannot hold"),
        ),
        (
            "block-size-not-power-of-two",
            Box::new(|b| {
                let at = metadata_item(b, 0xcaa1_6737);
                put32(b, at, 3 << 20);
            }),
            Expect::Refused(ErrorKind::Corrupt, "block size"),
        ),
        (
            "sector-size-1000",
            Box::new(|b| {
                let at = metadata_item(b, 0x8141_bf1d);
                put32(b, at, 1000);
            }),
            Expect::Refused(ErrorKind::Corrupt, "sector size"),
        ),
        (
            "unknown-required-metadata",
            Box::new(|b| add_metadata(b, *b"unknown-item-id!", true)),
            Expect::Refused(ErrorKind::Unsupported, "marked required but unknown"),
        ),
        (
            "unknown-optional-metadata",
            Box::new(|b| add_metadata(b, *b"unknown-item-id!", false)),
            Expect::Reads,
        ),
        (
            "metadata-item-outside-region",
            Box::new(|b| {
                let m = metadata_offset(b);
                put32(b, m + 32 + 16, 0xffff_f000);
            }),
            Expect::Refused(ErrorKind::Corrupt, "outside the metadata region"),
        ),
        (
            "metadata-count-huge",
            Box::new(|b| {
                let m = metadata_offset(b) as usize;
                b[m + 10..m + 12].copy_from_slice(&0xffffu16.to_le_bytes());
            }),
            Expect::Refused(ErrorKind::Corrupt, "entries"),
        ),
        (
            "log-past-eof",
            Box::new(|b| {
                let h = current_header(b);
                b[h as usize + 48..h as usize + 64].copy_from_slice(b"some-log-guid!!!");
                put32(b, h + 68, 0xfff0_0000);
                fix_crc(b, h, 4096);
            }),
            Expect::Refused(ErrorKind::Corrupt, "log"),
        ),
        (
            "log-garbage-only",
            Box::new(|b| {
                let h = current_header(b);
                b[h as usize + 48..h as usize + 64].copy_from_slice(b"some-log-guid!!!");
                fix_crc(b, h, 4096);
                let log = le64(b, h + 72) as usize;
                for (i, x) in b[log..log + MIB as usize].iter_mut().enumerate() {
                    *x = if i % 4096 < 4 {
                        b"loge"[i % 4]
                    } else {
                        i as u8
                    };
                }
            }),
            Expect::Reads,
        ),
        (
            "truncated-to-identifier",
            Box::new(|b| b.truncate(64 << 10)),
            Expect::Refused(ErrorKind::Corrupt, "no valid VHDX header"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, patch, expect) in &cases {
        let p = patched(&base, dir.path(), &format!("{name}.vhdx"), |b| patch(b));
        let (code, stderr, took) = common::fuse::info_bounded(&p, &[]);
        if took > Duration::from_secs(10) || code == Some(124) || code.is_none() {
            failures.push(format!("{name}: info took {took:?} (exit {code:?})"));
        }
        let result = open_chain(&p);
        match (expect, result) {
            (Expect::Refused(kind, what), Err(e)) => {
                let msg = e.to_string();
                if e.kind() != *kind || !msg.contains(what) || !msg.contains(name) {
                    failures.push(format!("{name}: {:?} {msg:?}", e.kind()));
                }
                if code == Some(0) || stderr.trim().lines().count() != 1 {
                    failures.push(format!("{name}: info said {code:?} {stderr:?}"));
                }
            }
            (Expect::Refused(..), Ok(_)) => failures.push(format!("{name}: opened")),
            (Expect::EioAt { bad, good }, Ok(c)) => {
                let mut buf = vec![0u8; 4096];
                match c.read_at(&mut buf, *bad) {
                    Ok(()) => failures.push(format!("{name}: damaged range read")),
                    Err(e) if e.errno() != libc::EIO => {
                        failures.push(format!("{name}: errno {} for {e}", e.errno()))
                    }
                    Err(_) => {}
                }
                if let Err(e) = c.read_at(&mut buf, *good) {
                    failures.push(format!("{name}: good range failed: {e}"));
                }
            }
            (Expect::Reads, Ok(c)) => match read_all(&c, 1 << 20) {
                Ok(got) if got == expected => {}
                Ok(_) => failures.push(format!("{name}: reads differ from qemu's")),
                Err(e) => failures.push(format!("{name}: {e}")),
            },
            (_, Err(e)) => failures.push(format!("{name}: refused: {e}")),
        }
    }
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}

/// Random damage to every structure (checksums recomputed where the
/// structure has one, so the damage reaches the parsers behind them),
/// through the fuzzing entry points: errors are fine, panics and hangs not.
#[test]
fn random_structure_damage_never_panics() {
    use super::crafted::{install_log, log_entry, Desc};
    let dir = scratch();
    let base = created(
        dir.path(),
        "m.vhdx",
        "6M",
        "block_size=1M",
        &["write -P 0x41 0 2M", "write -z 3M 1M"],
    );
    let clean = std::fs::read(&base).unwrap();
    let b0 = le64(&clean, bat_offset(&clean)) & !0xfffff;
    let bat = bat_offset(&clean);
    let e = log_entry(
        5,
        0,
        b"vdiskfs-log-guid",
        &[Desc::Page(b0, vec![3; 4096]), Desc::Zero(bat, 4096)],
        clean.len() as u64,
    );
    let mut logged = clean.clone();
    install_log(&mut logged, &[(0, e)], true);
    let mut rng = common::rng::Rng::new(0x7668_6478);
    let started = Instant::now();
    for i in 0..240 {
        let mut b = if i % 2 == 0 {
            clean.clone()
        } else {
            logged.clone()
        };
        let h = current_header(&b);
        let log = le64(&b, h + 72);
        let (at, len, crc): (u64, u64, Option<(u64, usize)>) = match i % 6 {
            0 => (h, 80, Some((h, 4096))),
            1 => (192 << 10, 16 + 32 * 3, Some((192 << 10, 64 << 10))),
            2 => (metadata_offset(&b), 64 << 10, None),
            3 => (metadata_item(&b, 0xcaa1_6737), 64, None),
            4 => (bat_offset(&b), 64, None),
            // The crafted entry (header sector + one data sector), re-checksummed.
            _ => (log, 8192, Some((log, 8192))),
        };
        for _ in 0..=rng.below(6) {
            let p = (at + rng.below(len)) as usize;
            b[p] = match rng.below(3) {
                0 => b[p] ^ (1 << rng.below(8)),
                1 => 0xff,
                _ => rng.below(256) as u8,
            };
        }
        if let Some((c, n)) = crc {
            fix_crc(&mut b, c, n);
            if c == 192 << 10 {
                // Keep both copies equal, or the second would hide the damage.
                let (t1, t2) = (192usize << 10, 256usize << 10);
                let copy = b[t1..t1 + (64 << 10)].to_vec();
                b[t2..t2 + (64 << 10)].copy_from_slice(&copy);
            }
        }
        let script: Vec<u8> = (0..64).map(|_| rng.below(256) as u8).collect();
        vdiskfs::fuzzing::open_layer(&b, vdiskfs::format::Format::Vhdx);
        vdiskfs::fuzzing::open_and_read(&b, None, &script);
    }
    assert!(started.elapsed() < Duration::from_secs(120));
}
