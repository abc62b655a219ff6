//! Offset newtypes for the write path: guest bytes, host bytes, and
//! cluster indices on either side, so that a host offset passed where a
//! guest offset is wanted (or a cluster index where a byte offset is) does
//! not compile.
//!
//! Only the write engine's interfaces (copy-on-write runs, the overlap
//! guard, the append allocator, in-flight tracking) and the qcow2 write
//! path use them; readers keep plain `u64`s. Conversions are explicit:
//! `.get()` at the edge where a plain number is needed (a `pread`
//! offset, a table entry), the arithmetic here everywhere else.

use std::fmt;

/// A byte offset into the virtual disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset into a host file (an image, extent or data file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

/// The index of a guest cluster (guest offset >> cluster bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

/// The index of a host cluster (host offset >> cluster bits), as refcount
/// tables count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

impl GuestOffset {
    /// The plain number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `n` bytes further.
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, n: u64) -> GuestOffset {
        GuestOffset(self.0 + n)
    }

    /// The guest cluster this offset lies in.
    pub fn cluster(self, cluster_bits: u32) -> GuestCluster {
        GuestCluster(self.0 >> cluster_bits)
    }

    /// The offset within its cluster.
    pub fn in_cluster(self, cluster_bits: u32) -> u64 {
        self.0 & ((1u64 << cluster_bits) - 1)
    }
}

impl HostOffset {
    /// The plain number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `n` bytes further.
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }

    /// The host cluster this offset lies in.
    pub fn cluster(self, cluster_bits: u32) -> HostCluster {
        HostCluster(self.0 >> cluster_bits)
    }
}

impl GuestCluster {
    /// The plain number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The guest offset of the cluster's first byte.
    pub fn offset(self, cluster_bits: u32) -> GuestOffset {
        GuestOffset(self.0 << cluster_bits)
    }
}

impl HostCluster {
    /// The plain number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The host offset of the cluster's first byte.
    pub fn offset(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.0 << cluster_bits)
    }

    /// `n` clusters further.
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, n: u64) -> HostCluster {
        HostCluster(self.0 + n)
    }
}

impl fmt::LowerHex for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::LowerHex for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_and_offsets_convert_both_ways() {
        let g = GuestOffset(0x3_1234);
        assert_eq!(g.cluster(16), GuestCluster(3));
        assert_eq!(g.in_cluster(16), 0x1234);
        assert_eq!(GuestCluster(3).offset(16), GuestOffset(0x3_0000));
        let h = HostOffset(0x5_0000).add(0x10);
        assert_eq!(h.cluster(16), HostCluster(5));
        assert_eq!(HostCluster(5).add(1).offset(16), HostOffset(0x6_0000));
        assert_eq!(format!("{:#x}", h), "0x50010");
    }
}
