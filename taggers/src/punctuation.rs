//! `not_alphanum_paragraph_v1` (dolma `taggers/punctuation.py`).

use std::sync::LazyLock;

use regex::Regex;

use crate::text::split_paragraphs;
use crate::{Document, Span, Tagger};

// `regex`'s POSIX `[[:punct:]]` in Unicode mode is punctuation or symbol, plus the emoji and
// dingbat blocks dolma lists explicitly.
static ALL_PUNCT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[\p{P}\p{S}]|\s|[\x{1f300}-\x{1f64f}\x{1f680}-\x{1f6ff}\x{2600}-\x{26ff}\x{2700}-\x{27bf}]+)+\n?$")
        .expect("valid regex")
});

/// Paragraphs with no ASCII letter or digit and nothing but punctuation, symbols, emoji and
/// whitespace get `all_punct` = 1; a document with none gets one `all_punct` = 0 span.
pub struct NotAlphanumParagraph;

impl Tagger for NotAlphanumParagraph {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let first = out.len();
        for p in split_paragraphs(doc.text, true) {
            if p.text.bytes().any(|b| b.is_ascii_alphanumeric()) {
                continue;
            }
            if ALL_PUNCT.is_match(p.text) {
                out.push(Span::new(p.start, p.end, "all_punct", 1.0));
            }
        }
        if out.len() == first {
            out.push(Span::new(0, doc.len_chars(), "all_punct", 0.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_punctuation_paragraphs() {
        let doc = Document::new("d", "Hello\n--- !!! ---\n日本語\n★ ☺\n");
        let mut out = Vec::new();
        NotAlphanumParagraph.predict(&doc, &mut out);
        assert_eq!(
            out,
            vec![
                Span::new(6, 18, "all_punct", 1.0),
                Span::new(22, 26, "all_punct", 1.0)
            ]
        );
        let doc = Document::new("d", "just words");
        let mut out = Vec::new();
        NotAlphanumParagraph.predict(&doc, &mut out);
        assert_eq!(out, vec![Span::new(0, 10, "all_punct", 0.0)]);
    }
}
