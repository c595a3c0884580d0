//! `random_number_v1`: a uniform number in [0, 1) per document.
//!
//! dolma seeds Python's `random` with the worker's pid, so its numbers change on every run.
//! Here the number is a hash of the document id and a seed: the same corpus and seed always
//! give the same sample, whatever the process count or file order.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::{Document, Span, Tagger};

pub struct RandomNumber {
    pub seed: u64,
}

/// Uniform in [0, 1) from the top 53 bits of a seeded xxh3 of `key`.
pub fn uniform_from_key(key: &[u8], seed: u64) -> f64 {
    (xxh3_64_with_seed(key, seed) >> 11) as f64 / (1u64 << 53) as f64
}

impl Tagger for RandomNumber {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        // The source is part of the key because ids are only unique within a source.
        let mut key = Vec::with_capacity(doc.source.len() + doc.id.len() + 1);
        key.extend_from_slice(doc.source.as_bytes());
        key.push(0);
        key.extend_from_slice(doc.id.as_bytes());
        out.push(Span::new(
            0,
            doc.len_chars(),
            "random",
            uniform_from_key(&key, self.seed),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(id: &str, seed: u64) -> f64 {
        let doc = Document::new(id, "text");
        let mut out = Vec::new();
        RandomNumber { seed }.predict(&doc, &mut out);
        out[0].score
    }

    #[test]
    fn reproducible_and_uniform() {
        assert_eq!(score("a", 1), score("a", 1));
        assert_ne!(score("a", 1), score("a", 2));
        let n = 20_000;
        let below: usize = (0..n).filter(|i| score(&i.to_string(), 7) < 0.25).count();
        // 0.25 * n = 5000, sd ~61: six sigma
        assert!((below as i64 - 5000).abs() < 370, "{below}");
        assert!((0..1000).all(|i| (0.0..1.0).contains(&score(&i.to_string(), 3))));
    }
}
