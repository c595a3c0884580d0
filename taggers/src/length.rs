//! Length taggers (dolma `taggers/length.py`).

use std::sync::LazyLock;

use regex::Regex;
use unicode_segmentation::UnicodeSegmentation;

use crate::text::{char_len, py_strip, split_paragraphs};
use crate::{Document, Span, Tagger};

/// `char_length_v1`: `length` = number of code points.
pub struct CharLength;

impl Tagger for CharLength {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let n = doc.len_chars();
        out.push(Span::new(0, n, "length", n as f64));
    }
}

/// `char_length_with_paragraphs_v1`: one `paragraph` span per non-empty paragraph, then `document`.
pub struct CharLengthWithParagraphs;

impl Tagger for CharLengthWithParagraphs {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        for p in split_paragraphs(doc.text, true) {
            out.push(Span::new(
                p.start,
                p.end,
                "paragraph",
                (p.end - p.start) as f64,
            ));
        }
        let n = doc.len_chars();
        out.push(Span::new(0, n, "document", n as f64));
    }
}

// The `regex` module's `\s` is Unicode White_Space (no \x1c..\x1f), like Rust's.
static WORD_OR_PUNCT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\w+|[^\w\s]+").expect("valid regex"));

/// `len(regex.split(r"\w+|[^\w\s]+", text))`: one more than the number of matches.
pub fn whitespace_token_count(text: &str) -> usize {
    WORD_OR_PUNCT.find_iter(text).count() + 1
}

/// `whitespace_tokenizer_v1`.
pub struct WhitespaceTokenizer;

impl Tagger for WhitespaceTokenizer {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let n = doc.len_chars();
        out.push(Span::new(
            0,
            n,
            "length",
            whitespace_token_count(doc.text) as f64,
        ));
    }
}

/// Words of UAX #29 word segmentation, whitespace-only segments left out.
pub fn uniseg_word_count(text: &str) -> usize {
    text.split_word_bounds()
        .filter(|w| !py_strip(w).is_empty())
        .count()
}

/// `uniseg_length_paragraphs_v1`: `paragraph` and `negative_paragraph` word counts.
pub struct UnisegLengthParagraphs;

impl Tagger for UnisegLengthParagraphs {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        for p in split_paragraphs(doc.text, true) {
            let n = uniseg_word_count(py_strip(p.text)) as f64;
            out.push(Span::new(p.start, p.end, "paragraph", n));
            out.push(Span::new(p.start, p.end, "negative_paragraph", -n));
        }
    }
}

/// `bytes_length_v1`: UTF-8 size.
pub struct BytesLength;

impl Tagger for BytesLength {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        out.push(Span::new(
            0,
            char_len(doc.text),
            "bytes",
            doc.text.len() as f64,
        ));
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
    fn char_length_counts_code_points() {
        assert_eq!(
            run(&CharLength, "héllo"),
            vec![Span::new(0, 5, "length", 5.0)]
        );
        assert_eq!(run(&CharLength, ""), vec![Span::new(0, 0, "length", 0.0)]);
    }

    #[test]
    fn paragraphs_and_document() {
        let s = run(&CharLengthWithParagraphs, "ab\n\ncd");
        assert_eq!(
            s,
            vec![
                Span::new(0, 3, "paragraph", 3.0),
                Span::new(4, 6, "paragraph", 2.0),
                Span::new(0, 6, "document", 6.0)
            ]
        );
    }

    #[test]
    fn whitespace_tokens() {
        // "Hello, world!" -> Hello | , | world | ! => 4 matches, 5 pieces
        assert_eq!(whitespace_token_count("Hello, world!"), 5);
        assert_eq!(whitespace_token_count(""), 1);
        assert_eq!(run(&WhitespaceTokenizer, "a b")[0].score, 3.0);
    }

    #[test]
    fn bytes_length_counts_utf8_bytes() {
        assert_eq!(
            run(&BytesLength, "héllo"),
            vec![Span::new(0, 5, "bytes", 6.0)]
        );
    }

    #[test]
    fn uniseg_counts_words_per_paragraph() {
        let s = run(&UnisegLengthParagraphs, "Hello there, friend.\n\nBye");
        assert_eq!(s[0], Span::new(0, 21, "paragraph", 5.0));
        assert_eq!(s[1], Span::new(0, 21, "negative_paragraph", -5.0));
        assert_eq!(s[2], Span::new(22, 25, "paragraph", 1.0));
    }
}
