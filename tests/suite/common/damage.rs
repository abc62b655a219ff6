//! Damaging copies of an image and asserting how vdiskfs takes the damage:
//! refused with a one-line error naming the file, EIO on the damaged range
//! only, and no panic or runaway under random header mutations.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vdiskfs::chain::{Chain, ChainOptions};
use vdiskfs::format::Format;
use vdiskfs::ErrorKind;

use super::rng::Rng;

/// Writes `bytes` into the file at `path` at `offset` (the file keeps its
/// length unless the write runs past it).
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Copies `base` to `dir/name`: a fresh image to damage.
pub fn copy_of(base: &Path, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(base, &p).unwrap();
    p
}

/// Cuts the file at `path` to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Opening `p` (as `format` when given, else detected) fails with `kind`, in
/// one line containing `words`, and the error names `p`.
pub fn assert_refused(p: &Path, format: Option<Format>, kind: ErrorKind, words: &str) {
    let opts = ChainOptions {
        format,
        ..Default::default()
    };
    let e = Chain::open(p, &opts, &super::caches())
        .err()
        .unwrap_or_else(|| panic!("{} opened", p.display()));
    assert_eq!(e.kind(), kind, "{}: {e}", p.display());
    let msg = e.to_string();
    assert!(msg.contains(words) && !msg.contains('\n'), "{msg}");
    assert_eq!(e.path(), Some(p));
}

/// `vdiskfs info p` fails (not by timeout) with a single line on stderr.
pub fn assert_info_fails_in_one_line(p: &Path) {
    let (code, stderr, _) = super::fuse::info_bounded(p, &[]);
    assert!(
        code.is_some() && code != Some(0) && code != Some(124),
        "{}: {code:?} {stderr}",
        p.display()
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A 4 KiB read at `bad` fails as corrupt, while 4 KiB reads at each of
/// `good` succeed and hold only `fill`.
pub fn assert_fails_only_at(chain: &Chain, bad: u64, good: &[u64], fill: u8) {
    let mut buf = vec![0u8; 4096];
    let e = chain.read_at(&mut buf, bad).expect_err("EIO");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    for &at in good {
        chain.read_at(&mut buf, at).unwrap();
        assert!(buf.iter().all(|&b| b == fill), "read at {at:#x}");
    }
}

/// 1500 copies of `seed` with up to 7 random bytes changed below `end` (and
/// every seventh one truncated at random), each opened as `format` and as
/// whatever it is detected as: none may panic, and all within two minutes.
pub fn mutations_never_panic(seed: &[u8], end: usize, rng_seed: u64, format: Format) {
    let mut rng = Rng::new(rng_seed);
    let started = Instant::now();
    for i in 0..1500 {
        let mut blob = seed.to_vec();
        for _ in 0..=rng.below(6) {
            let at = rng.below(end as u64) as usize;
            blob[at] = rng.below(256) as u8;
        }
        if i % 7 == 0 {
            blob.truncate(rng.below(seed.len() as u64) as usize);
        }
        vdiskfs::fuzzing::open_layer(&blob, format);
        vdiskfs::fuzzing::open_and_read(&blob, None, &blob[..64.min(blob.len())]);
    }
    assert!(started.elapsed() < Duration::from_secs(120));
}

/// One damage: the copy's name, where `bytes` go, and the error kind and
/// words its refusal must have.
pub type Refusal<'a> = (&'a str, u64, &'a [u8], ErrorKind, &'a str);

/// Damaged copies of one image, each checked as it is made: refused on
/// open (as `format` when given) with a one-line error naming the file, and
/// by `vdiskfs info` in one line on stderr.
pub struct Damages<'a> {
    /// The intact image the copies are made from.
    pub base: &'a Path,
    /// Where the copies go.
    pub dir: &'a Path,
    /// The format to force on open; `None`: detected.
    pub format: Option<Format>,
}

impl Damages<'_> {
    /// A copy cut to `len` bytes: refused as `kind`, with `words`.
    pub fn cut(&self, name: &str, len: u64, kind: ErrorKind, words: &str) {
        let p = copy_of(self.base, self.dir, name);
        truncate(&p, len);
        self.check(&p, kind, words, true);
    }

    /// For each row, a copy with `bytes` at `offset`: refused as `kind`,
    /// with `words`.
    pub fn refused(&self, rows: &[Refusal]) {
        for &(name, offset, bytes, kind, words) in rows {
            let p = self.patched(name, offset, bytes);
            self.check(&p, kind, words, true);
        }
    }

    /// [`Damages::refused`] of one row, on open only: for damage that makes the file no
    /// longer detected as the format, so `info` reads it as something else.
    pub fn refused_on_open(
        &self,
        name: &str,
        offset: u64,
        bytes: &[u8],
        kind: ErrorKind,
        words: &str,
    ) {
        let p = self.patched(name, offset, bytes);
        self.check(&p, kind, words, false);
    }

    /// A copy with `bytes` at `offset`, not checked (it may open).
    pub fn patched(&self, name: &str, offset: u64, bytes: &[u8]) -> PathBuf {
        let p = copy_of(self.base, self.dir, name);
        patch(&p, offset, bytes);
        p
    }

    fn check(&self, p: &Path, kind: ErrorKind, words: &str, info: bool) {
        assert_refused(p, self.format, kind, words);
        if info {
            assert_info_fails_in_one_line(p);
        }
    }
}
