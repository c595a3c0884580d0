//! A concurrent Bloom filter for deduplication, persisted with a versioned header.
//!
//! Bits live in `AtomicU64` words shared by all threads. A key's k bit positions come from one
//! xxh3-128 hash by double hashing (`h1 + i·h2`), so hashes are stable across runs, machines and
//! versions (dolma's `ahash` seeds are random and its `.bin` files cannot be reproduced).
//! `check_and_insert` is an atomic test-and-set: for equal keys (same h1) it runs under one
//! of 4096 striped locks, so two threads can never both see "new" for the same key.
//! Sizing follows dolma: k = ceil(m/n · ln 2), p = (1 - (1 - 1/m)^(kn))^k, and the size doubles
//! from 1 MiB until p is at most the target.
//!
//! File layout (little-endian): magic `DOLMARSB`, u32 version (1), u32 k, u64 number of bits,
//! u64 keys inserted, u32 number of recorded inputs, then per input: u32 length + UTF-8 name,
//! u64 size in bytes; then the bit words as u64.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use xxhash_rust::xxh3::xxh3_128;

const MAGIC: &[u8; 8] = b"DOLMARSB";
const VERSION: u32 = 1;
const DOLMA_MAGIC: u32 = 0x81F0_F117;
const STRIPES: usize = 4096;

/// The two halves of a key's 128-bit hash; `h1` also picks the key's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHash {
    pub h1: u64,
    pub h2: u64,
}

impl KeyHash {
    pub fn of(key: &[u8]) -> KeyHash {
        let h = xxh3_128(key);
        KeyHash {
            h1: h as u64,
            h2: ((h >> 64) as u64) | 1,
        }
    }
}

pub struct BloomFilter {
    words: Vec<AtomicU64>,
    num_bits: u64,
    k: u32,
    pub read_only: bool,
    locks: Vec<Mutex<()>>,
    inserted: AtomicU64,
    /// Inputs whose keys the filter holds: name -> size in bytes.
    pub inputs: BTreeMap<String, u64>,
}

/// Most hash functions used. Beyond ~30 the false-positive rate of an oversized filter is
/// already negligible and each extra hash only costs a cache miss (dolma has no cap).
pub const MAX_K: u32 = 32;

pub fn optimal_k(size_in_bytes: u64, expected: u64) -> u32 {
    let m = (size_in_bytes * 8) as f64;
    ((m / expected.max(1) as f64) * std::f64::consts::LN_2)
        .ceil()
        .clamp(1.0, MAX_K as f64) as u32
}

pub fn false_positive_rate(size_in_bytes: u64, expected: u64, k: u32) -> f64 {
    let m = (size_in_bytes * 8) as f64;
    let n = expected as f64;
    let k = k as f64;
    (1.0 - (1.0 - 1.0 / m).powf(k * n)).powf(k)
}

/// The fewest hash functions that still meet `rate` at `expected` keys. Doubling the size
/// overshoots the target, and each hash function is a cache miss per key, so this is often far
/// below the "optimal" k (e.g. 7 instead of 38 for 64 MiB, 10M keys, 1e-6).
pub fn smallest_k_for_rate(size_in_bytes: u64, expected: u64, rate: f64) -> u32 {
    let best = optimal_k(size_in_bytes, expected);
    (1..=best)
        .find(|&k| false_positive_rate(size_in_bytes, expected, k) <= rate)
        .unwrap_or(best)
}

/// dolma's rule: from 1 MiB, double until the predicted false-positive rate is low enough.
pub fn suggest_size_in_bytes(expected: u64, rate: f64) -> u64 {
    let mut size: u64 = 1 << 20;
    while size < (1 << 46) && false_positive_rate(size, expected, optimal_k(size, expected)) > rate
    {
        size *= 2;
    }
    size
}

impl BloomFilter {
    pub fn new(size_in_bytes: u64, k: u32, read_only: bool) -> Result<BloomFilter> {
        if size_in_bytes < 8 {
            bail!("bloom_filter.size_in_bytes must be at least 8, got {size_in_bytes}");
        }
        if k == 0 || k > 64 {
            bail!("bloom filter needs 1 to 64 hash functions, got {k}");
        }
        let n_words = size_in_bytes.div_ceil(8) as usize;
        let mut words = Vec::new();
        words
            .try_reserve_exact(n_words)
            .with_context(|| format!("cannot allocate a {size_in_bytes}-byte bloom filter"))?;
        words.extend((0..n_words).map(|_| AtomicU64::new(0)));
        Ok(BloomFilter {
            words,
            num_bits: n_words as u64 * 64,
            k,
            read_only,
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            inserted: AtomicU64::new(0),
            inputs: BTreeMap::new(),
        })
    }

    pub fn k(&self) -> u32 {
        self.k
    }

    pub fn size_in_bytes(&self) -> u64 {
        self.num_bits / 8
    }

    #[inline]
    fn bit(&self, h: KeyHash, i: u32) -> (usize, u64) {
        // Lemire's multiply-shift maps the 64-bit hash onto [0, num_bits) without a division.
        let x = h.h1.wrapping_add((i as u64).wrapping_mul(h.h2));
        let pos = ((x as u128 * self.num_bits as u128) >> 64) as u64;
        ((pos / 64) as usize, 1u64 << (pos % 64))
    }

    /// Starts loading a key's words into cache, so that a batch overlaps its cache misses.
    #[inline]
    fn prefetch(&self, h: KeyHash) {
        #[cfg(target_arch = "x86_64")]
        for i in 0..self.k {
            let (w, _) = self.bit(h, i);
            // SAFETY: `w < words.len()` by construction of `bit`; prefetching reads nothing.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    self.words.as_ptr().add(w) as *const i8,
                )
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = h;
    }

    /// `check_and_insert` over many keys in order, prefetching a few keys ahead; the results
    /// are exactly those of calling it key by key.
    pub fn check_and_insert_batch(&self, hashes: &[KeyHash], out: &mut Vec<bool>) {
        const AHEAD: usize = 4;
        out.clear();
        out.reserve(hashes.len());
        for h in hashes.iter().take(AHEAD) {
            self.prefetch(*h);
        }
        for (i, h) in hashes.iter().enumerate() {
            if let Some(next) = hashes.get(i + AHEAD) {
                self.prefetch(*next);
            }
            out.push(self.check_and_insert(*h));
        }
    }

    pub fn contains(&self, h: KeyHash) -> bool {
        (0..self.k).all(|i| {
            let (w, mask) = self.bit(h, i);
            self.words[w].load(Ordering::Relaxed) & mask != 0
        })
    }

    /// True if the key was (probably) present; inserts it otherwise, unless read-only.
    pub fn check_and_insert(&self, h: KeyHash) -> bool {
        if self.read_only {
            return self.contains(h);
        }
        let _guard = self.locks[(h.h1 % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut present = true;
        for i in 0..self.k {
            let (w, mask) = self.bit(h, i);
            let prev = self.words[w].fetch_or(mask, Ordering::Relaxed);
            present &= prev & mask != 0;
        }
        if !present {
            self.inserted.fetch_add(1, Ordering::Relaxed);
        }
        present
    }

    /// Fraction of bits set.
    pub fn fill_ratio(&self) -> f64 {
        let ones: u64 = self
            .words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        ones as f64 / self.num_bits as f64
    }

    /// False-positive rate for the next lookup, from the actual fill: fill^k.
    pub fn current_false_positive_rate(&self) -> f64 {
        self.fill_ratio().powi(self.k as i32)
    }

    pub fn keys_inserted(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
    }

    /// Writes the filter to `<path>.tmp` and renames it into place.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let tmp = crate::io::tmp_path(path);
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        let write = |w: &mut BufWriter<File>| -> std::io::Result<()> {
            w.write_all(MAGIC)?;
            w.write_all(&VERSION.to_le_bytes())?;
            w.write_all(&self.k.to_le_bytes())?;
            w.write_all(&self.num_bits.to_le_bytes())?;
            w.write_all(&self.keys_inserted().to_le_bytes())?;
            w.write_all(&(self.inputs.len() as u32).to_le_bytes())?;
            for (name, size) in &self.inputs {
                w.write_all(&(name.len() as u32).to_le_bytes())?;
                w.write_all(name.as_bytes())?;
                w.write_all(&size.to_le_bytes())?;
            }
            for word in &self.words {
                w.write_all(&word.load(Ordering::Relaxed).to_le_bytes())?;
            }
            w.flush()?;
            w.get_ref().sync_all()
        };
        write(&mut w).with_context(|| format!("cannot write bloom filter {}", tmp.display()))?;
        drop(w);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        Ok(())
    }

    pub fn load(path: &Path, read_only: bool) -> Result<BloomFilter> {
        let what = path.display();
        let file = File::open(path).with_context(|| format!("cannot open bloom filter {what}"))?;
        let mut r = BufReader::with_capacity(1 << 22, file);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .with_context(|| format!("{what}: too short for a bloom filter"))?;
        if &magic != MAGIC {
            if u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]) == DOLMA_MAGIC {
                bail!(
                    "{what} is a filter written by Python dolma; its hash functions (ahash with random seeds) \
                     cannot be reproduced, so it cannot be reused: build a new filter"
                );
            }
            bail!("{what}: not a bloom filter file (bad magic)");
        }
        let mut u32b = [0u8; 4];
        let mut u64b = [0u8; 8];
        let mut rd32 = |r: &mut BufReader<File>| -> Result<u32> {
            r.read_exact(&mut u32b)
                .with_context(|| format!("{what}: truncated header"))?;
            Ok(u32::from_le_bytes(u32b))
        };
        let version = rd32(&mut r)?;
        if version != VERSION {
            bail!("{what}: bloom filter version {version}, this build reads version {VERSION}");
        }
        let k = rd32(&mut r)?;
        let mut rd64 = |r: &mut BufReader<File>| -> Result<u64> {
            r.read_exact(&mut u64b)
                .with_context(|| format!("{what}: truncated header"))?;
            Ok(u64::from_le_bytes(u64b))
        };
        let num_bits = rd64(&mut r)?;
        let inserted = rd64(&mut r)?;
        if num_bits == 0 || num_bits % 64 != 0 {
            bail!("{what}: corrupt header (number of bits {num_bits})");
        }
        let mut b4 = [0u8; 4];
        r.read_exact(&mut b4)
            .with_context(|| format!("{what}: truncated header"))?;
        let n_inputs = u32::from_le_bytes(b4);
        let mut inputs = BTreeMap::new();
        for _ in 0..n_inputs {
            r.read_exact(&mut b4)
                .with_context(|| format!("{what}: truncated input list"))?;
            let len = u32::from_le_bytes(b4) as usize;
            let mut name = vec![0u8; len];
            r.read_exact(&mut name)
                .with_context(|| format!("{what}: truncated input list"))?;
            let mut b8 = [0u8; 8];
            r.read_exact(&mut b8)
                .with_context(|| format!("{what}: truncated input list"))?;
            inputs.insert(
                String::from_utf8(name).with_context(|| format!("{what}: corrupt input list"))?,
                u64::from_le_bytes(b8),
            );
        }
        let filter = BloomFilter::new(num_bits / 8, k, read_only)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut i = 0usize;
        while i < filter.words.len() {
            let n = ((filter.words.len() - i) * 8).min(buf.len());
            r.read_exact(&mut buf[..n]).with_context(|| {
                format!(
                    "{what}: truncated bit array ({} of {} words)",
                    i,
                    filter.words.len()
                )
            })?;
            for c in buf[..n].chunks_exact(8) {
                filter.words[i].store(
                    u64::from_le_bytes(c.try_into().expect("8 bytes")),
                    Ordering::Relaxed,
                );
                i += 1;
            }
        }
        let mut extra = [0u8; 1];
        if r.read(&mut extra)? != 0 {
            bail!("{what}: trailing bytes after the bit array (corrupt file?)");
        }
        filter.inserted.store(inserted, Ordering::Relaxed);
        Ok(BloomFilter { inputs, ..filter })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_follows_dolma() {
        // Values from dolma's formulas: 6e6 keys at 1e-4 -> 16 MiB.
        assert_eq!(suggest_size_in_bytes(6_000_000, 1e-4), 16 << 20);
        assert_eq!(optimal_k(16 << 20, 6_000_000), 16);
        assert!(false_positive_rate(16 << 20, 6_000_000, 16) <= 1e-4);
        assert_eq!(suggest_size_in_bytes(10, 0.01), 1 << 20);
        assert_eq!(optimal_k(1 << 20, 10), MAX_K);
        let size = suggest_size_in_bytes(10_000_000, 1e-6);
        assert_eq!(size, 64 << 20);
        let k = smallest_k_for_rate(size, 10_000_000, 1e-6);
        assert_eq!(k, 7);
        assert!(false_positive_rate(size, 10_000_000, k) <= 1e-6);
        assert!(false_positive_rate(size, 10_000_000, k - 1) > 1e-6);
    }

    #[test]
    fn check_and_insert_and_false_positive_rate() {
        let f = BloomFilter::new(1 << 16, 7, false).unwrap();
        for i in 0..5000u32 {
            assert!(!f.check_and_insert(KeyHash::of(&i.to_le_bytes())), "{i}");
        }
        let again: Vec<KeyHash> = (0..5000u32)
            .map(|i| KeyHash::of(&i.to_le_bytes()))
            .collect();
        let mut seen = Vec::new();
        f.check_and_insert_batch(&again, &mut seen);
        assert!(seen.iter().all(|&s| s));
        let fresh: Vec<KeyHash> = (0..10u32)
            .map(|i| KeyHash::of(format!("new{i}").as_bytes()))
            .collect();
        f.check_and_insert_batch(&[fresh.clone(), fresh.clone()].concat(), &mut seen);
        assert_eq!(seen, [vec![false; 10], vec![true; 10]].concat());
        let fp = (5000..105_000u32)
            .filter(|i| f.contains(KeyHash::of(&i.to_le_bytes())))
            .count();
        let predicted = false_positive_rate(1 << 16, 5000, 7);
        let observed = fp as f64 / 100_000.0;
        assert!(
            observed < predicted * 2.0 + 1e-3,
            "observed {observed}, predicted {predicted}"
        );
        assert_eq!(f.keys_inserted(), 5010);
    }

    #[test]
    fn concurrent_inserts_of_one_key_keep_exactly_one() {
        let f = BloomFilter::new(1 << 20, 7, false).unwrap();
        for key in 0..200u32 {
            let h = KeyHash::of(&key.to_le_bytes());
            let new_count = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        if !f.check_and_insert(h) {
                            new_count.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
            assert_eq!(new_count.into_inner(), 1, "key {key}");
        }
    }

    #[test]
    fn save_load_round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let mut f = BloomFilter::new(4096, 5, false).unwrap();
        f.inputs.insert("a/documents/x.json.gz".into(), 123);
        for i in 0..100u32 {
            f.check_and_insert(KeyHash::of(&i.to_le_bytes()));
        }
        f.save(&p).unwrap();
        let g = BloomFilter::load(&p, true).unwrap();
        assert_eq!(g.k(), 5);
        assert_eq!(g.size_in_bytes(), 4096);
        assert_eq!(g.keys_inserted(), 100);
        assert_eq!(g.inputs, f.inputs);
        assert!((0..100u32).all(|i| g.contains(KeyHash::of(&i.to_le_bytes()))));
        assert!(g.read_only && g.check_and_insert(KeyHash::of(&7u32.to_le_bytes())));
        assert!(!g.check_and_insert(KeyHash::of(b"never seen")));
        assert!(
            !g.contains(KeyHash::of(b"never seen")),
            "read-only must not insert"
        );

        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        assert!(BloomFilter::load(&p, false)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated"));
        let mut dolma = 0x81F0_F117u32.to_le_bytes().to_vec();
        dolma.extend_from_slice(&[0; 16]);
        std::fs::write(&p, dolma).unwrap();
        assert!(BloomFilter::load(&p, false)
            .err()
            .unwrap()
            .to_string()
            .contains("Python dolma"));
    }
}
