//! A small deterministic generator shared by the tests (random writes, random read offsets).

/// A small deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `len` bytes: runs of one byte and random stretches.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        // Runs of one byte and random stretches, so compressed clusters
        // and copies of them look different from zeros.
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let run = (1 + self.below(700) as usize).min(len - out.len());
            if self.below(3) == 0 {
                let b = self.next() as u8 | 1;
                out.extend(std::iter::repeat_n(b, run));
            } else {
                for _ in 0..run {
                    out.push(self.next() as u8);
                }
            }
        }
        out
    }
}
