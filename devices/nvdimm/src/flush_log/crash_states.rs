//! Which pages of the next epoch a crash state keeps, for `pmvm log crash-states`.

/// splitmix64: a tiny, well-mixed PRNG, so crash states need no extra crate and the same seed
/// gives the same images on every machine.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The pages of `next` (the epoch after the crash point) that crash state `index` of the
/// series for `seed` keeps: each page independently with probability 1/2.
pub fn crash_subset(next: &[u64], seed: u64, index: u64) -> Vec<u64> {
    // Mix the index in through the generator, so neighbouring seeds and indices diverge.
    let mut rng = SplitMix64::new(seed ^ SplitMix64::new(index).next_u64());
    next.iter()
        .copied()
        .filter(|_| rng.next_u64() >> 63 == 1)
        .collect()
}
