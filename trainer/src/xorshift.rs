//! xorshift64: the small deterministic generator behind random inputs of tests and of
//! gpu-check's tables. Not for anything that must match OLMo: weight init and the data order
//! have their own generators.

pub struct XorShift(u64);

impl XorShift {
    /// A generator whose state is `seed` spread by a golden-ratio multiply (never 0).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A generator that starts at `state` (not 0).
    pub fn from_state(state: u64) -> XorShift {
        XorShift(state)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value uniform in [-1, 1), from the top 24 bits.
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.symmetric() * scale).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::XorShift;

    #[test]
    fn values_are_in_range_and_repeat_from_a_seed() {
        let a = XorShift::new(3).vec(1000, 2.5);
        assert!(a.iter().all(|v| (-2.5..2.5).contains(v)));
        assert!(a.iter().any(|&v| v < -2.0) && a.iter().any(|&v| v > 2.0));
        assert_eq!(a, XorShift::new(3).vec(1000, 2.5));
        assert_ne!(a, XorShift::new(4).vec(1000, 2.5));
    }
}
