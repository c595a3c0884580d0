//! `c4_v1` / `c4_v2`: C4's line and document heuristics (dolma `taggers/c4.py`).

use rustc_hash::FxHashSet as HashSet;
use std::sync::LazyLock;

use crate::text::{char_len, py_split, py_strip};
use crate::{Document, Span, Tagger};

const MIN_WORDS_PER_LINE: usize = 3;

struct Naughty {
    words: HashSet<&'static str>,
    phrases: Vec<&'static str>,
}

static NAUGHTY: LazyLock<Naughty> = LazyLock::new(|| {
    let all = include_str!("../data/naughty_words_en.txt");
    let mut words = HashSet::default();
    let mut phrases = Vec::new();
    for l in all.lines() {
        if l.contains(' ') {
            phrases.push(l);
        } else {
            words.insert(l);
        }
    }
    Naughty { words, phrases }
});

fn ends_with_punct(s: &str) -> bool {
    s.ends_with(['.', '?', '!', '"'])
}

fn has_naughty(lowered: &str) -> bool {
    let n = &*NAUGHTY;
    py_split(lowered).any(|w| n.words.contains(w)) || n.phrases.iter().any(|p| lowered.contains(p))
}

/// `c4_v1`: per-line spans in original-text offsets, then document flags.
pub struct C4V1;

impl Tagger for C4V1 {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let n = doc.len_chars();
        let lines: Vec<&str> = doc.text.split('\n').collect();
        let (mut naughty, mut js, mut lorem, mut curly) = (false, false, false, false);
        let mut no_punct = Vec::new();
        let mut few_words = Vec::new();
        let mut offset = 0;
        for (i, original) in lines.iter().enumerate() {
            let mut end = offset + char_len(original);
            if i < lines.len() - 1 {
                end += 1;
            }
            let lowered = original.to_lowercase();
            let line = py_strip(&lowered);
            if !ends_with_punct(line) {
                no_punct.push(Span::new(
                    offset,
                    end,
                    "lines_with_no_ending_punctuation",
                    1.0,
                ));
            }
            let words: Vec<&str> = py_split(line).collect();
            if words.len() < MIN_WORDS_PER_LINE {
                few_words.push(Span::new(offset, end, "lines_with_too_few_words", 1.0));
            }
            if !naughty && has_naughty_line(&words, line) {
                naughty = true;
            }
            js |= words.contains(&"javascript");
            lorem |= line.contains("lorem ipsum");
            curly |= line.contains('{');
            offset = end;
        }
        out.extend(no_punct);
        out.extend(few_words);
        for (flag, kind) in [
            (naughty, "has_naughty_word"),
            (js, "has_javascript"),
            (lorem, "has_lorem_ipsum"),
            (curly, "has_curly_brace"),
        ] {
            if flag {
                out.push(Span::new(0, n, kind, 1.0));
            }
        }
        out.push(Span::new(0, n, "line_count", lines.len() as f64));
    }
}

fn has_naughty_line(words: &[&str], line: &str) -> bool {
    let n = &*NAUGHTY;
    words.iter().any(|w| n.words.contains(w)) || n.phrases.iter().any(|p| line.contains(p))
}

/// `c4_v2`: the faster variant. Like dolma, its line offsets are counted on the lowercased
/// text (they differ from the original only where lowercasing changes a length, e.g. `İ`).
pub struct C4V2;

impl Tagger for C4V2 {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let n = doc.len_chars();
        let text = doc.text.to_lowercase();
        let text_len = char_len(&text);
        if text.contains('{') {
            out.push(Span::new(0, n, "has_curly_brace", 1.0));
        }
        if text.contains("lorem ipsum") {
            out.push(Span::new(0, n, "has_lorem_ipsum", 1.0));
        }
        if text.contains("javascript") {
            out.push(Span::new(0, n, "has_javascript", 1.0));
        }
        if has_naughty(&text) {
            out.push(Span::new(0, n, "has_naughty_word", 1.0));
        }
        let mut start = 0;
        let mut count = 0;
        for sent in text.split('\n') {
            let mut end = start + char_len(sent);
            if end != text_len {
                end += 1;
            }
            let s = py_strip(sent);
            if !ends_with_punct(s) {
                out.push(Span::new(
                    start,
                    end,
                    "lines_with_no_ending_punctuation",
                    1.0,
                ));
            }
            if py_split(s).count() < MIN_WORDS_PER_LINE {
                out.push(Span::new(start, end, "lines_with_too_few_words", 1.0));
            }
            count += 1;
            start = end;
        }
        out.push(Span::new(0, n, "line_count", count as f64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &dyn Tagger, text: &str) -> Vec<Span> {
        let doc = Document::new("d", text);
        let mut out = Vec::new();
        t.predict(&doc, &mut out);
        out
    }

    #[test]
    fn v2_lines_and_flags() {
        let s = run(&C4V2, "This is fine.\nno end\n{ JavaScript lorem ipsum }");
        let kinds: Vec<(&str, usize, usize)> = s
            .iter()
            .map(|s| (s.kind.as_ref(), s.start, s.end))
            .collect();
        assert!(kinds.contains(&("has_curly_brace", 0, 47)));
        assert!(kinds.contains(&("has_javascript", 0, 47)));
        assert!(kinds.contains(&("has_lorem_ipsum", 0, 47)));
        assert!(kinds.contains(&("lines_with_no_ending_punctuation", 14, 21)));
        assert!(kinds.contains(&("lines_with_too_few_words", 14, 21)));
        assert!(!kinds.contains(&("lines_with_no_ending_punctuation", 0, 14)));
        assert_eq!(s.last().unwrap(), &Span::new(0, 47, "line_count", 3.0));
        assert!(!kinds.iter().any(|k| k.0 == "has_naughty_word"));
    }

    #[test]
    fn naughty_words_and_phrases() {
        assert!(run(&C4V2, "what a 2g1c thing")
            .iter()
            .any(|s| s.kind == "has_naughty_word"));
        assert!(run(&C4V1, "two girls: 2 girls 1 cup.")
            .iter()
            .any(|s| s.kind == "has_naughty_word"));
        assert!(!run(&C4V1, "clean text.")
            .iter()
            .any(|s| s.kind == "has_naughty_word"));
    }

    #[test]
    fn v1_javascript_is_a_whole_word() {
        assert!(!run(&C4V1, "javascripts here")
            .iter()
            .any(|s| s.kind == "has_javascript"));
        assert!(run(&C4V1, "use javascript now")
            .iter()
            .any(|s| s.kind == "has_javascript"));
        let s = run(&C4V1, "a\nb");
        assert_eq!(
            s[0],
            Span::new(0, 2, "lines_with_no_ending_punctuation", 1.0)
        );
        assert_eq!(
            s[1],
            Span::new(2, 3, "lines_with_no_ending_punctuation", 1.0)
        );
    }
}
