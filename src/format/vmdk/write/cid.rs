//! The content id (CID) update before a VMDK image's first write.
//!
//! Before the first write the descriptor gets a new random CID, as qemu
//! does, so delta children made earlier from this image no longer match
//! it; its hex digits are overwritten in place by as many digits (qemu
//! writes the CID without zero padding), so the descriptor never changes
//! size; a CID line without 1 to 8 hex digits is left alone.
//! The descriptor is synced by the image's flush when it was changed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::error::Result;
use crate::format::vmdk::{cowd, descriptor, sesparse, sparse, Vmdk};
use crate::host::HostFile;

/// The CID state of a writable image: changed once, before the first write.
pub(super) struct CidUpdate {
    /// Set once the CID was dealt with (changed, or found unchangeable).
    done: AtomicBool,
    lock: Mutex<()>,
    /// The new CID, once written (`u64::MAX`: unchanged).
    new_cid: AtomicU64,
    /// The descriptor was changed and not yet synced.
    desc_dirty: AtomicBool,
}

impl CidUpdate {
    /// Nothing changed yet.
    pub(super) fn new() -> CidUpdate {
        CidUpdate {
            done: AtomicBool::new(false),
            lock: Mutex::new(()),
            new_cid: AtomicU64::new(u64::MAX),
            desc_dirty: AtomicBool::new(false),
        }
    }

    /// The CID written, if it was changed.
    pub(super) fn new_cid(&self) -> Option<u32> {
        match self.new_cid.load(Ordering::Acquire) {
            u64::MAX => None,
            c => Some(c as u32),
        }
    }

    /// Before the first write, gives `v` a new CID as qemu does, so that
    /// delta children made from it earlier no longer match. A failure is
    /// logged, not returned: the write itself goes on.
    pub(super) fn once(&self, v: &Vmdk) {
        if self.done.load(Ordering::Acquire) {
            return;
        }
        let _g = self.lock.lock();
        if self.done.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.update(v) {
            log::warn!(
                "{}: the descriptor's CID was not updated: {e}",
                v.file.path().display()
            );
        }
        self.done.store(true, Ordering::Release);
    }

    fn update(&self, v: &Vmdk) -> Result<()> {
        let Some(d) = &v.desc else { return Ok(()) };
        let mut head = [0u8; 4];
        v.file.read_exact_at(&mut head, 0)?;
        let (at, len) = if &head == sparse::MAGIC {
            let h = sparse::Header::read(&v.file)?;
            if h.desc_offset == 0 || h.desc_size == 0 {
                return Ok(());
            }
            (
                h.desc_offset.saturating_mul(512),
                h.desc_size.saturating_mul(512),
            )
        } else if &head == cowd::MAGIC || sesparse::probe(&head) {
            return Ok(());
        } else {
            (0, v.file.len())
        };
        let len = len
            .min(descriptor::MAX_DESCRIPTOR)
            .min(v.file.len().saturating_sub(at));
        let mut text = vec![0u8; len as usize];
        v.file.read_exact_at(&mut text, at)?;
        let Some(r) = find_cid(&text) else {
            return Ok(());
        };
        let digits = r.len();
        if !(1..=8).contains(&digits) {
            log::info!(
                "{}: CID of {digits} digits left unchanged",
                v.file.path().display()
            );
            return Ok(());
        }
        // Same width, zero-padded: the text keeps its size.
        let cid = random_cid(d.cid, digits);
        self.desc_dirty.store(true, Ordering::Release);
        v.file
            .write_all_at(format!("{cid:0digits$x}").as_bytes(), at + r.start as u64)?;
        self.new_cid.store(u64::from(cid), Ordering::Release);
        Ok(())
    }

    /// Syncs the descriptor's file (`file`) when the CID changed since the
    /// last flush.
    pub(super) fn flush(&self, file: &HostFile) -> Result<()> {
        if self.desc_dirty.swap(false, Ordering::AcqRel) {
            if let Err(err) = file.sync_data() {
                self.desc_dirty.store(true, Ordering::Release);
                return Err(err);
            }
        }
        Ok(())
    }
}

/// Where the hex digits of the `CID=` value lie in descriptor text.
fn find_cid(text: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut start = 0;
    for line in text.split(|&b| b == b'\n') {
        let here = start;
        start += line.len() + 1;
        let lead = line.iter().take_while(|b| b.is_ascii_whitespace()).count();
        let Some(rest) = line[lead..].strip_prefix(b"CID") else {
            continue;
        };
        let mut i = here + lead + 3;
        let mut r = rest;
        while let [b' ' | b'\t', tail @ ..] = r {
            r = tail;
            i += 1;
        }
        let [b'=', tail @ ..] = r else { continue };
        r = tail;
        i += 1;
        while let [b' ' | b'\t' | b'"', tail @ ..] = r {
            r = tail;
            i += 1;
        }
        let digits = r.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        return Some(i..i + digits);
    }
    None
}

/// A fresh random CID of at most `digits` hex digits, different from
/// `old` and from the reserved values.
fn random_cid(old: Option<u32>, digits: usize) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mask = if digits >= 8 {
        u32::MAX
    } else {
        (1u32 << (4 * digits)) - 1
    };
    let mut n = 0u64;
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        let c = h.finish() as u32 & mask;
        if Some(c) != old && c < 0xffff_fffe {
            return c;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cid_digits() {
        let t = b"# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\nCID=79f443a\n";
        let r = find_cid(t).unwrap();
        assert_eq!(&t[r], b"79f443a");
        let t = b"version=1\n  CID = \"0a0b0c0d\"\nparentCID=ffffffff\n";
        let r = find_cid(t).unwrap();
        assert_eq!(&t[r], b"0a0b0c0d");
        assert!(find_cid(b"parentCID=ffffffff\n").is_none());
    }

    #[test]
    fn random_cids_keep_their_width() {
        for digits in 1..=8 {
            for _ in 0..20 {
                let c = random_cid(Some(3), digits);
                assert_ne!(c, 3);
                assert!(format!("{c:x}").len() <= digits);
                assert!(c < 0xffff_fffe);
            }
        }
    }
}
