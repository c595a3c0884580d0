//! `gopher_v1` / `gopher_v2`: the Gopher quality statistics (dolma `taggers/gopher.py`).
//!
//! n-gram counting interns words to ids and hashes id slices, instead of Python's tuples of
//! strings; ties for the most common n-gram go to the one seen first, like `Counter.most_common`.

use std::sync::LazyLock;

use regex::Regex;
use rustc_hash::FxHashMap;

use crate::text::{char_len, py_split};
use crate::{Document, Span, Tagger};

/// Python's `str.isalpha()` is true for general category L (Lu, Ll, Lt, Lm, Lo) only; Rust's
/// `char::is_alphabetic` also takes marks and letter numbers.
static LETTER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\p{L}").expect("valid regex"));

const REQUIRED_ENGLISH_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];

pub struct Gopher {
    /// gopher_v2 splits lines on runs of newlines (skips empty lines).
    pub ignore_empty_lines: bool,
}

fn median(values: &mut [usize]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2] as f64
    } else {
        (values[n / 2 - 1] + values[n / 2]) as f64 / 2.0
    }
}

impl Tagger for Gopher {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let text = doc.text;
        let n = doc.len_chars();
        let push =
            |out: &mut Vec<Span>, kind: &'static str, v: f64| out.push(Span::new(0, n, kind, v));
        if n == 0 {
            for kind in SCALAR_FIELDS {
                push(out, kind, 0.0);
            }
            return;
        }

        let words: Vec<&str> = py_split(text).collect();
        let word_lens: Vec<usize> = words.iter().map(|w| char_len(w)).collect();
        let word_count = words.len();
        let character_count: usize = word_lens.iter().sum();

        // n-gram statistics over interned words.
        let mut interner: FxHashMap<&str, u32> = FxHashMap::default();
        interner.reserve(words.len());
        let ids: Vec<u32> = words
            .iter()
            .map(|w| {
                let next = interner.len() as u32;
                *interner.entry(w).or_insert(next)
            })
            .collect();
        let mut most_common = Vec::new();
        let mut duplicate = Vec::new();
        let mut counts: FxHashMap<&[u32], (u32, u32)> = FxHashMap::default();
        for ng in 2..=10usize {
            if words.len() < ng {
                continue;
            }
            counts.clear();
            for (i, window) in ids.windows(ng).enumerate() {
                counts.entry(window).or_insert((0, i as u32)).0 += 1;
            }
            let ngram_chars = |first: u32| -> usize {
                word_lens[first as usize..first as usize + ng].iter().sum()
            };
            if ng <= 4 {
                let (count, first) = counts
                    .values()
                    .copied()
                    .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
                    .expect("non-empty");
                let value =
                    (count as usize * ngram_chars(first)) as f64 / character_count.max(1) as f64;
                most_common.push((ng, value));
            } else {
                let mut all = 0usize;
                let mut dup = 0usize;
                for &(count, first) in counts.values() {
                    let c = count as usize * ngram_chars(first);
                    all += c;
                    if count > 1 {
                        dup += c;
                    }
                }
                duplicate.push((ng, dup as f64 / all.max(1) as f64));
            }
        }

        let symbol_words = words
            .iter()
            .filter(|w| w.contains('#') || w.contains('\u{2026}'))
            .count();
        let alpha_words = words.iter().filter(|w| LETTER.is_match(w)).count();
        let required = words
            .iter()
            .filter(|w| REQUIRED_ENGLISH_WORDS.contains(w))
            .count();
        let mut lens = word_lens.clone();
        let median_len = median(&mut lens);

        let lines: Vec<&str> = if self.ignore_empty_lines {
            split_on_newline_runs(text)
        } else {
            text.split('\n').collect()
        };
        let line_count = lines.len().max(1) as f64;
        let bullets = lines
            .iter()
            .filter(|l| l.starts_with('*') || l.starts_with('-'))
            .count();
        let ellipsis = lines.iter().filter(|l| l.ends_with('\u{2026}')).count();
        let mut line_counts: FxHashMap<&str, usize> = FxHashMap::default();
        for l in &lines {
            *line_counts.entry(l).or_insert(0) += 1;
        }
        let dup_lines: usize = line_counts.values().filter(|&&c| c > 1).sum();
        let dup_line_chars: usize = line_counts
            .iter()
            .filter(|(_, &c)| c > 1)
            .map(|(l, &c)| char_len(l) * c)
            .sum();

        for (ng, v) in most_common {
            out.push(Span::new(0, n, MOST_COMMON[ng - 2], v));
        }
        for (ng, v) in duplicate {
            out.push(Span::new(0, n, DUPLICATE[ng - 5], v));
        }
        let wc = word_count.max(1) as f64;
        push(out, "character_count", n as f64);
        push(out, "word_count", word_count as f64);
        push(out, "median_word_length", median_len);
        push(out, "symbol_to_word_ratio", symbol_words as f64 / wc);
        push(
            out,
            "fraction_of_words_with_alpha_character",
            alpha_words as f64 / wc,
        );
        push(out, "required_word_count", required as f64);
        push(
            out,
            "fraction_of_lines_starting_with_bullet_point",
            bullets as f64 / line_count,
        );
        push(
            out,
            "fraction_of_lines_ending_with_ellipsis",
            ellipsis as f64 / line_count,
        );
        push(
            out,
            "fraction_of_duplicate_lines",
            dup_lines as f64 / line_count,
        );
        push(
            out,
            "fraction_of_characters_in_duplicate_lines",
            dup_line_chars as f64 / character_count.max(1) as f64,
        );
    }
}

/// Python's `re.split(r"\n+", text)`.
fn split_on_newline_runs(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        match rest.find('\n') {
            None => {
                out.push(rest);
                return out;
            }
            Some(i) => {
                out.push(&rest[..i]);
                rest = rest[i..].trim_start_matches('\n');
            }
        }
    }
}

const SCALAR_FIELDS: [&str; 10] = [
    "character_count",
    "word_count",
    "median_word_length",
    "symbol_to_word_ratio",
    "fraction_of_words_with_alpha_character",
    "required_word_count",
    "fraction_of_lines_starting_with_bullet_point",
    "fraction_of_lines_ending_with_ellipsis",
    "fraction_of_duplicate_lines",
    "fraction_of_characters_in_duplicate_lines",
];

const MOST_COMMON: [&str; 3] = [
    "fraction_of_characters_in_most_common_2grams",
    "fraction_of_characters_in_most_common_3grams",
    "fraction_of_characters_in_most_common_4grams",
];

const DUPLICATE: [&str; 6] = [
    "fraction_of_characters_in_duplicate_5grams",
    "fraction_of_characters_in_duplicate_6grams",
    "fraction_of_characters_in_duplicate_7grams",
    "fraction_of_characters_in_duplicate_8grams",
    "fraction_of_characters_in_duplicate_9grams",
    "fraction_of_characters_in_duplicate_10grams",
];

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn attrs(text: &str) -> HashMap<String, f64> {
        let doc = Document::new("d", text);
        let mut out = Vec::new();
        Gopher {
            ignore_empty_lines: false,
        }
        .predict(&doc, &mut out);
        out.into_iter()
            .map(|s| (s.kind.to_string(), s.score))
            .collect()
    }

    #[test]
    fn basic_statistics() {
        let a = attrs("the cat sat\nthe cat sat\n- item #tag\u{2026}");
        assert_eq!(a["word_count"], 9.0);
        assert_eq!(a["character_count"], 36.0);
        assert_eq!(a["required_word_count"], 2.0);
        assert_eq!(a["median_word_length"], 3.0);
        assert!((a["symbol_to_word_ratio"] - 1.0 / 9.0).abs() < 1e-12);
        assert!((a["fraction_of_lines_starting_with_bullet_point"] - 1.0 / 3.0).abs() < 1e-12);
        assert!((a["fraction_of_lines_ending_with_ellipsis"] - 1.0 / 3.0).abs() < 1e-12);
        assert!((a["fraction_of_duplicate_lines"] - 2.0 / 3.0).abs() < 1e-12);
        // duplicate lines: 2 * 11 chars over 9 words' 23 chars
        let word_chars = 3.0 * 6.0 + 1.0 + 4.0 + 5.0;
        assert!((a["fraction_of_characters_in_duplicate_lines"] - 22.0 / word_chars).abs() < 1e-12);
        // most common 2-gram "the cat" (x2, first seen) = 2 * 6 chars
        assert!(
            (a["fraction_of_characters_in_most_common_2grams"] - 12.0 / word_chars).abs() < 1e-12
        );
        assert!(a.contains_key("fraction_of_characters_in_duplicate_5grams"));
        assert!(!a.contains_key("fraction_of_characters_in_duplicate_10grams"));
    }

    #[test]
    fn empty_document_has_zero_fields_only() {
        let a = attrs("");
        assert_eq!(a.len(), 10);
        assert!(a.values().all(|&v| v == 0.0));
    }

    #[test]
    fn v2_skips_empty_lines() {
        let text = "- a b\n\n\n- c d";
        let run = |ignore_empty_lines| -> HashMap<String, f64> {
            let doc = Document::new("d", text);
            let mut out = Vec::new();
            Gopher { ignore_empty_lines }.predict(&doc, &mut out);
            out.into_iter()
                .map(|s| (s.kind.to_string(), s.score))
                .collect()
        };
        // v1 sees 4 lines (two empty), v2 two: both start with a bullet
        assert_eq!(
            run(false)["fraction_of_lines_starting_with_bullet_point"],
            0.5
        );
        assert_eq!(
            run(true)["fraction_of_lines_starting_with_bullet_point"],
            1.0
        );
        // v1 counts the two empty lines as duplicates
        assert_eq!(run(false)["fraction_of_duplicate_lines"], 0.5);
        assert_eq!(run(true)["fraction_of_duplicate_lines"], 0.0);
    }

    #[test]
    fn newline_runs() {
        assert_eq!(split_on_newline_runs("a\n\n\nb\n"), vec!["a", "b", ""]);
    }
}
