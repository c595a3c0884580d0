//! `repetitions_v1` and `paragraph_repetitions_v1` (dolma `taggers/repetitions`).
//!
//! dolma runs Python's backtracking regex `(.+?)(\s?\1){3,}`; Rust's `regex` has no
//! back-references, so this module walks the same search order by hand: leftmost start,
//! shortest unit first, then as many greedy repeats as possible, trying "whitespace + unit"
//! before "unit" in each repeat and backtracking only while fewer than three repeats matched.

use rustc_hash::FxHashMap;

use crate::text::{py_is_space, split_paragraphs};
use crate::{Document, Span, Tagger};

const MIN_REPEATS: usize = 3;

/// One repeat at `pos`: whitespace then `unit` (preferred), or `unit` alone.
fn repeat_options(text: &str, pos: usize, unit: &str) -> [Option<usize>; 2] {
    let rest = &text[pos..];
    let with_ws = rest
        .chars()
        .next()
        .filter(|&c| py_is_space(c))
        .and_then(|c| {
            rest[c.len_utf8()..]
                .starts_with(unit)
                .then(|| pos + c.len_utf8() + unit.len())
        });
    let without = rest.starts_with(unit).then(|| pos + unit.len());
    [with_ws, without]
}

/// End of the greedy `(\s?unit){3,}` match starting at `pos`, if any.
fn match_repeats(text: &str, pos: usize, unit: &str, count: usize) -> Option<usize> {
    if count >= MIN_REPEATS {
        // Any continuation succeeds from here, so the first option that matches is taken.
        let mut p = pos;
        while let Some(next) = repeat_options(text, p, unit).into_iter().flatten().next() {
            p = next;
        }
        return Some(p);
    }
    repeat_options(text, pos, unit)
        .into_iter()
        .flatten()
        .find_map(|next| match_repeats(text, next, unit, count + 1))
}

/// For each character start `i`, the next byte offset where the same two characters start
/// (`u32::MAX` if none), so candidates are visited without rescanning the line per start.
fn bigram_chains(text: &str) -> Vec<u32> {
    let bytes = text.as_bytes();
    let mut next = vec![u32::MAX; bytes.len()];
    let mut last: FxHashMap<u64, u32> = FxHashMap::default();
    let starts: Vec<u32> = if text.is_ascii() {
        (0..bytes.len() as u32).collect()
    } else {
        text.char_indices().map(|(i, _)| i as u32).collect()
    };
    for ci in (0..starts.len().saturating_sub(1)).rev() {
        let i = starts[ci] as usize;
        let end = starts.get(ci + 2).map_or(bytes.len(), |&e| e as usize);
        // Two UTF-8 characters fit in 8 bytes; zero padding is unambiguous because no
        // character's encoding ends in a zero byte unless it is NUL itself (one byte).
        let mut key = [0u8; 8];
        key[..end - i].copy_from_slice(&bytes[i..end]);
        if let Some(j) = last.insert(u64::from_le_bytes(key), i as u32) {
            next[i] = j;
        }
    }
    next
}

/// Byte ranges and repeat counts of all non-overlapping matches, as `re.finditer`.
///
/// For units of two or more characters, the first repeat must begin with the unit's first two
/// characters, so candidate unit lengths come from the chain of later occurrences of that
/// bigram instead of trying every length up to the end of the line.
pub fn find_repetitions(text: &str) -> Vec<(usize, usize, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    if text.len() >= u32::MAX as usize {
        tracing::warn!(
            "repetitions: skipping a document of {} bytes (4 GiB limit)",
            text.len()
        );
        return out;
    }
    let chains = bigram_chains(text);
    let mut candidates: Vec<usize> = Vec::new();
    let mut start = 0;
    let mut line_end = 0;
    'outer: while start < text.len() {
        if start > line_end || start == 0 {
            line_end = memchr::memchr(b'\n', &bytes[start..]).map_or(text.len(), |k| start + k);
        }
        let first = text[start..].chars().next().expect("in bounds");
        if first != '\n' {
            let one = start + first.len_utf8();
            candidates.clear();
            candidates.push(one);
            if one < line_end {
                let second = text[one..].chars().next().expect("in bounds");
                let prefix_end = one + second.len_utf8();
                // A repeat may start after one whitespace character (at most 3 bytes).
                let search_end = line_end + 3;
                let mut o = chains[start];
                while o != u32::MAX && (o as usize) <= search_end {
                    let at = o as usize;
                    o = chains[at];
                    if let Some(ws) = text[..at].chars().next_back().filter(|&c| py_is_space(c)) {
                        let unit_end = at - ws.len_utf8();
                        if unit_end >= prefix_end && unit_end <= line_end {
                            candidates.push(unit_end);
                        }
                    }
                    if at >= prefix_end && at <= line_end {
                        candidates.push(at);
                    }
                }
                candidates.sort_unstable();
                candidates.dedup();
            }
            for &unit_end in &candidates {
                let unit = &text[start..unit_end];
                if let Some(end) = match_repeats(text, unit_end, unit, 0) {
                    let count = text[start..end].matches(unit).count();
                    out.push((start, end, count));
                    start = end;
                    continue 'outer;
                }
            }
        }
        start += first.len_utf8();
    }
    out
}

fn stats(spans: &[Span], n: usize, out: &mut Vec<Span>) {
    let max_score = spans
        .iter()
        .map(|s| s.score)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let max_len = spans.iter().map(|s| s.end - s.start).max().unwrap_or(0);
    let total: usize = spans.iter().map(|s| s.end - s.start).sum();
    out.push(Span::new(
        0,
        n,
        "doc_max_score_repetition",
        max_score.unwrap_or(0.0),
    ));
    out.push(Span::new(0, n, "doc_max_length_repetition", max_len as f64));
    let frac = if spans.is_empty() || n == 0 {
        0.0
    } else {
        total as f64 / n as f64
    };
    out.push(Span::new(0, n, "doc_frac_repetition", frac));
}

/// `repetitions_v1`: repeated character groups anywhere in the document.
pub struct Repetitions {
    /// `paragraph_repetitions_v1`: search each paragraph separately.
    pub per_paragraph: bool,
}

impl Tagger for Repetitions {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let first = out.len();
        let units: Vec<(usize, &str)> = if self.per_paragraph {
            split_paragraphs(doc.text, false)
                .into_iter()
                .map(|p| (p.byte_start, p.text))
                .collect()
        } else {
            vec![(0, doc.text)]
        };
        for (base, text) in units {
            for (s, e, count) in find_repetitions(text) {
                out.push(Span::new(
                    doc.char_offset(base + s),
                    doc.char_offset(base + e),
                    "repetition",
                    count as f64,
                ));
            }
        }
        let found = out[first..].to_vec();
        stats(&found, doc.len_chars(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_python_matches() {
        // Values from Python: [(m.span(), m.group(0).count(m.group(1))) for m in
        //   re.finditer(r"(.+?)(\s?\1){3,}", text)]
        assert_eq!(find_repetitions("aaaa"), vec![(0, 4, 4)]);
        assert_eq!(find_repetitions("aaa"), vec![]);
        assert_eq!(find_repetitions("ab ab ab ab x"), vec![(0, 11, 4)]);
        assert_eq!(
            find_repetitions("xx hello hello hello hello"),
            vec![(2, 26, 4)]
        );
        assert_eq!(find_repetitions("ab abab ab ab"), vec![(0, 13, 5)]);
        assert_eq!(find_repetitions(" a a a a"), vec![(0, 8, 4)]);
        assert_eq!(find_repetitions("1 1  1 1 1"), vec![(0, 9, 4)]);
        // overlapping occurrences of the unit's first two characters
        assert_eq!(
            find_repetitions("clear.ie>\n  |   | \n  |   | 7.3"),
            vec![(10, 27, 4)]
        );
        assert_eq!(find_repetitions("a\na\na\na"), vec![(0, 7, 4)]);
        assert_eq!(find_repetitions("no repeats here"), vec![]);
        assert_eq!(find_repetitions("éééé"), vec![(0, 8, 4)]);
    }

    #[test]
    fn paragraph_mode_does_not_cross_newlines() {
        // "ab\nab\nab\nab" repeats across lines (\s? matches the newline) in document mode only
        let doc = Document::new("d", "ab\nab\nab\nab");
        let mut out = Vec::new();
        Repetitions {
            per_paragraph: false,
        }
        .predict(&doc, &mut out);
        assert_eq!(out[0], Span::new(0, 11, "repetition", 4.0));
        let mut out = Vec::new();
        Repetitions {
            per_paragraph: true,
        }
        .predict(&doc, &mut out);
        assert_eq!(out.len(), 3, "only the stats: {out:?}");
        assert_eq!(out[0].score, 0.0);
        // offsets are shifted to the paragraph's position
        let doc = Document::new("d", "x\nzzzz");
        let mut out = Vec::new();
        Repetitions {
            per_paragraph: true,
        }
        .predict(&doc, &mut out);
        assert_eq!(out[0], Span::new(2, 6, "repetition", 4.0));
    }

    #[test]
    fn tagger_emits_stats() {
        let doc = Document::new("d", "zzzzzz and text");
        let mut out = Vec::new();
        Repetitions {
            per_paragraph: false,
        }
        .predict(&doc, &mut out);
        assert_eq!(out[0], Span::new(0, 6, "repetition", 6.0));
        assert_eq!(out[1], Span::new(0, 15, "doc_max_score_repetition", 6.0));
        assert_eq!(out[2], Span::new(0, 15, "doc_max_length_repetition", 6.0));
        assert_eq!(out[3], Span::new(0, 15, "doc_frac_repetition", 6.0 / 15.0));
        let doc = Document::new("d", "");
        let mut out = Vec::new();
        Repetitions {
            per_paragraph: false,
        }
        .predict(&doc, &mut out);
        assert_eq!(out.len(), 3);
    }
}
