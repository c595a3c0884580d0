//! NumPy's `Generator(PCG64(seed)).shuffle(arange(n))`, bit for bit.
//!
//! OLMo orders training instances with exactly this call (seed + epoch), so reproducing it is
//! what makes a run's data order identical to OLMo's. Three parts, as in NumPy:
//! `SeedSequence(seed).generate_state(4, uint64)`, the PCG64 (XSL-RR 128/64) generator seeded
//! from it, and the Fisher–Yates shuffle with NumPy's masked rejection sampling.

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const POOL_SIZE: usize = 4;

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> 16)
}

fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> 16)
}

/// `SeedSequence(seed).generate_state(n, np.uint64)`.
pub fn seed_sequence_state(seed: u64, n: usize) -> Vec<u64> {
    // The seed as little-endian 32-bit words, without leading zero words (0 -> [0]).
    let mut entropy = vec![seed as u32];
    if seed >> 32 != 0 {
        entropy.push((seed >> 32) as u32);
    }
    let mut pool = [0u32; POOL_SIZE];
    let mut hc = INIT_A;
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hc);
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                let h = hashmix(pool[src], &mut hc);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &e in entropy.iter().skip(POOL_SIZE) {
        for p in pool.iter_mut() {
            let h = hashmix(e, &mut hc);
            *p = mix(*p, h);
        }
    }
    let mut hb = INIT_B;
    let words: Vec<u32> = (0..2 * n)
        .map(|i| {
            let mut v = pool[i % POOL_SIZE] ^ hb;
            hb = hb.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hb);
            v ^ (v >> 16)
        })
        .collect();
    words
        .chunks_exact(2)
        .map(|w| w[0] as u64 | (w[1] as u64) << 32)
        .collect()
}

const PCG_MULT: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;

/// NumPy's PCG64 bit generator, with its buffered 32-bit draws.
pub struct Pcg64 {
    state: u128,
    inc: u128,
    spare32: Option<u32>,
}

impl Pcg64 {
    /// `np.random.PCG64(seed)`.
    pub fn new(seed: u64) -> Pcg64 {
        let s = seed_sequence_state(seed, 4);
        let initstate = (s[0] as u128) << 64 | s[1] as u128;
        let initseq = (s[2] as u128) << 64 | s[3] as u128;
        let mut g = Pcg64 {
            state: 0,
            inc: (initseq << 1) | 1,
            spare32: None,
        };
        g.step();
        g.state = g.state.wrapping_add(initstate);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let hi = (self.state >> 64) as u64;
        let lo = self.state as u64;
        (hi ^ lo).rotate_right((self.state >> 122) as u32)
    }

    pub fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.spare32.take() {
            return v;
        }
        let v = self.next_u64();
        self.spare32 = Some((v >> 32) as u32);
        v as u32
    }

    /// NumPy's `random_interval(max)`: uniform in [0, max] by masked rejection.
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u32::MAX as u64 {
            loop {
                let v = (self.next_u32() as u64) & mask;
                if v <= max {
                    return v;
                }
            }
        }
        loop {
            let v = self.next_u64() & mask;
            if v <= max {
                return v;
            }
        }
    }
}

/// `np.random.Generator(np.random.PCG64(seed)).shuffle(np.arange(n, dtype=np.uint32))`.
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    assert!(
        n <= u32::MAX as usize + 1,
        "more instances than a uint32 index can hold"
    );
    let mut idx: Vec<u32> = (0..n as u64).map(|i| i as u32).collect();
    let mut g = Pcg64::new(seed);
    for i in (1..n).rev() {
        let j = g.interval(i as u64) as usize;
        idx.swap(i, j);
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from NumPy (shared/reference/olmo-trainer.md §1.3).
    #[test]
    fn raw_pcg64_outputs() {
        let mut g = Pcg64::new(6198);
        assert_eq!(g.next_u64(), 12_993_904_571_665_206_773);
        assert_eq!(g.next_u64(), 5_279_284_732_208_017_281);
    }

    #[test]
    fn small_permutations() {
        assert_eq!(permutation(10, 0), vec![4, 6, 2, 7, 3, 5, 9, 0, 8, 1]);
        assert_eq!(
            permutation(16, 6198),
            vec![4, 14, 6, 15, 3, 2, 13, 0, 10, 11, 9, 7, 8, 1, 12, 5]
        );
        let p = permutation(1000, 6198);
        assert_eq!(&p[..10], &[615, 832, 881, 9, 648, 523, 809, 336, 989, 868]);
        assert_eq!(p[..100].iter().map(|&x| x as u64).sum::<u64>(), 50342);
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
    }
}

#[cfg(test)]
mod numpy_vectors {
    use super::permutation;

    /// trainer/tests/data/numpy_permutations.json was generated with NumPy (see its
    /// `generator` field): head, tail and a position-weighted checksum of each permutation.
    #[test]
    fn matches_numpy_on_a_million_instances() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../tests/data/numpy_permutations.json")).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert!(cases.iter().any(|c| c["n"] == 1_000_000));
        for c in cases {
            let (seed, n) = (
                c["seed"].as_u64().unwrap(),
                c["n"].as_u64().unwrap() as usize,
            );
            let p = permutation(n, seed);
            let head: Vec<u64> = p.iter().take(16).map(|&x| x as u64).collect();
            let tail: Vec<u64> = p[n.saturating_sub(16)..]
                .iter()
                .map(|&x| x as u64)
                .collect();
            let want = |k: &str| -> Vec<u64> {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect()
            };
            assert_eq!(head, want("head"), "seed {seed} n {n}");
            assert_eq!(tail, want("tail"), "seed {seed} n {n}");
            let sum = p.iter().enumerate().fold(0u64, |acc, (i, &x)| {
                acc.wrapping_add((i as u64 + 1).wrapping_mul(x as u64))
            });
            assert_eq!(
                sum,
                c["weighted_sum"].as_u64().unwrap(),
                "seed {seed} n {n}"
            );
        }
    }
}
