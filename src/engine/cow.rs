//! Copy-on-write data writes into freshly allocated space, shared by every
//! driver that allocates in units (clusters, grains, blocks).
//!
//! A driver decides *where* (it reserves a run of units with
//! [`crate::engine::append`] or its own allocator and marks them pending);
//! [`write_new_run`] does the rest of the data side: the overlap guard,
//! filling every part of the run the write does not cover (from the layers
//! below, a compressed cluster, or zeros — the driver's `fill` says which),
//! and one host write of the whole run. Only then does the driver publish
//! its table entries, so an entry never points at unwritten space.

use crate::engine::overlap::MetadataMap;
use crate::engine::units::{GuestOffset, HostOffset};
use crate::error::Result;
use crate::format::Below;
use crate::host::HostFile;

/// A run of freshly allocated units: guest `guest..guest + count * unit`
/// stored at host `host..host + count * unit`.
#[derive(Clone, Copy, Debug)]
pub struct NewRun {
    /// Guest offset of the first unit (unit-aligned).
    pub guest: GuestOffset,
    /// Host offset of the first unit.
    pub host: HostOffset,
    /// Number of units.
    pub count: u64,
    /// Unit size in bytes.
    pub unit: u64,
}

impl NewRun {
    /// Bytes of the run.
    pub fn bytes(&self) -> u64 {
        self.count * self.unit
    }

    /// Guest offset one past the run.
    pub fn guest_end(&self) -> GuestOffset {
        self.guest.add(self.bytes())
    }
}

/// Fills unit `k` at guest offset `guest` into `out` (see
/// [`write_new_run`]).
pub type Fill<'a> = dyn FnMut(usize, GuestOffset, &mut [u8]) -> Result<()> + 'a;

/// Writes the start of `buf` (guest offset `pos`, inside the run's first
/// unit) into the run and returns how many bytes of it were written.
///
/// Units the write does not cover entirely are first filled by
/// `fill(k, guest, out)` for unit `k` at guest offset `guest` (`out` is the
/// whole unit, zeroed; the driver leaves it zero where the unit must read
/// as zeros). Bytes past `vsize` (the disk's end) count as covered. When
/// `zeros` is set and the write covers the whole run, nothing is filled:
/// the never-written space already reads as zeros, and only its last sector
/// is written so that the file covers it.
#[allow(clippy::too_many_arguments)]
pub fn write_new_run(
    file: &HostFile,
    map: &MetadataMap,
    run: NewRun,
    vsize: u64,
    buf: &[u8],
    pos: GuestOffset,
    zeros: bool,
    fill: &mut Fill<'_>,
) -> Result<usize> {
    let unit = run.unit;
    let (guest, host) = (run.guest.get(), run.host.get());
    let pos = pos.get();
    let run_end = run.guest_end().get();
    let buf_end = pos + buf.len() as u64;
    let n = (buf_end.min(run_end) - pos) as usize;
    map.guard(run.host, run.bytes(), run.guest)?;
    let covers_all = pos == guest && buf_end >= run_end.min(vsize);
    if zeros && covers_all {
        return file
            .write_all_at(&[0u8; 512], host + run.bytes() - 512)
            .map(|()| n);
    }
    if covers_all && n as u64 == run.bytes() {
        // Nothing to fill: the caller's bytes are the run.
        return file.write_all_at(&buf[..n], host).map(|()| n);
    }
    let mut data = vec![0u8; run.bytes() as usize];
    for (k, out) in data.chunks_mut(unit as usize).enumerate() {
        let c = guest + k as u64 * unit;
        let covered = pos <= c && buf_end >= (c + unit).min(vsize);
        if !covered && c < vsize {
            fill(k, GuestOffset(c), out)?;
        }
    }
    let at = (pos - guest) as usize;
    data[at..at + n].copy_from_slice(&buf[..n]);
    file.write_all_at(&data, host)?;
    Ok(n)
}

/// The usual fill: the guest bytes of `out` as the layers below see them,
/// up to the disk's end (`vsize`); the rest stays zero.
pub fn fill_from_below(
    below: &dyn Below,
    guest: GuestOffset,
    out: &mut [u8],
    vsize: u64,
) -> Result<()> {
    let visible = (vsize.saturating_sub(guest.get())).min(out.len() as u64) as usize;
    below.read_below(&mut out[..visible], guest.get())
}

impl NewRun {
    /// [`write_new_run`] of this run for a driver whose fresh units either
    /// read as zeros (`below` is `None`: a dynamic disk) or as the layers
    /// below see them (`below` is `Some`: a differencing disk, which never
    /// takes the `zeros` shortcut since its unwritten units are not zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn write_over(
        self,
        file: &HostFile,
        map: &MetadataMap,
        vsize: u64,
        buf: &[u8],
        pos: GuestOffset,
        zeros: bool,
        below: Option<&dyn Below>,
    ) -> Result<usize> {
        write_new_run(
            file,
            map,
            self,
            vsize,
            buf,
            pos,
            zeros && below.is_none(),
            &mut |_, c, out| match below {
                Some(b) => fill_from_below(b, c, out, vsize),
                None => Ok(()),
            },
        )
    }
}
