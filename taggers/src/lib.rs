//! Taggers: functions from one document to scored character spans, written as dolma attributes.
//!
//! Names, output fields and scores follow dolma 1.2.1 (`python/dolma/taggers/*`) wherever dolma
//! has the tagger, so attribute files made here can be mixed with dolma's own mixer and vice
//! versa. Offsets are code points, as Python's `str` indices are.

pub mod c4;
pub mod fasttext;
pub mod gopher;
pub mod language;
pub mod length;
pub mod pii;
pub mod punctuation;
pub mod registry;
pub mod repetitions;
pub mod sampling;
pub mod text;
pub mod url;

use std::borrow::Cow;
use std::sync::OnceLock;

pub use registry::{build_tagger, tagger_names, TaggerInfo, TaggerOptions, TAGGERS};
use text::CharMap;

/// A document as a tagger sees it.
pub struct Document<'a> {
    pub id: &'a str,
    pub text: &'a str,
    pub source: &'a str,
    pub metadata: Option<&'a serde_json::Value>,
    chars: OnceLock<CharMap>,
    len_chars: OnceLock<usize>,
}

impl<'a> Document<'a> {
    pub fn new(id: &'a str, text: &'a str) -> Self {
        Document {
            id,
            text,
            source: "",
            metadata: None,
            chars: OnceLock::new(),
            len_chars: OnceLock::new(),
        }
    }

    pub fn with_source(mut self, source: &'a str) -> Self {
        self.source = source;
        self
    }

    pub fn with_metadata(mut self, metadata: Option<&'a serde_json::Value>) -> Self {
        self.metadata = metadata;
        self
    }

    /// `len(text)` in code points.
    pub fn len_chars(&self) -> usize {
        *self.len_chars.get_or_init(|| text::char_len(self.text))
    }

    /// Code-point offset of a byte offset into `text`.
    pub fn char_offset(&self, byte: usize) -> usize {
        self.chars
            .get_or_init(|| CharMap::new(self.text))
            .to_char(byte)
    }
}

/// One scored span, `[start, end, score]` in code points, under an attribute `kind`.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub kind: Cow<'static, str>,
    pub score: f64,
}

impl Span {
    pub fn new(start: usize, end: usize, kind: impl Into<Cow<'static, str>>, score: f64) -> Self {
        Span {
            start,
            end,
            kind: kind.into(),
            score,
        }
    }
}

pub trait Tagger: Send + Sync {
    /// Appends this document's spans, in the order dolma emits them.
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>);

    /// Whether the tagger reads `metadata` (the reader then parses it).
    fn needs_metadata(&self) -> bool {
        false
    }
}

/// Spans grouped by kind in order of first appearance, scores rounded to 5 decimals:
/// dolma's `BaseTagger.group_output`.
pub type GroupedSpans = Vec<(String, Vec<(usize, usize, f64)>)>;

pub fn group_spans(spans: &[Span], out: &mut GroupedSpans) {
    out.clear();
    for s in spans {
        let value = (s.start, s.end, text::round5(s.score));
        match out.iter_mut().find(|(k, _)| k.as_str() == s.kind.as_ref()) {
            Some((_, v)) => v.push(value),
            None => out.push((s.kind.to_string(), vec![value])),
        }
    }
}

/// dolma's `make_variable_name`: anything outside `[a-zA-Z0-9_]` becomes `_`.
pub fn make_variable_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_keeps_first_appearance_order_and_rounds() {
        let spans = vec![
            Span::new(0, 1, "b", 0.123456),
            Span::new(0, 2, "a", 1.0),
            Span::new(1, 2, "b", 2.0),
        ];
        let mut g = GroupedSpans::new();
        group_spans(&spans, &mut g);
        assert_eq!(g[0].0, "b");
        assert_eq!(g[0].1, vec![(0, 1, 0.12346), (1, 2, 2.0)]);
        assert_eq!(g[1].0, "a");
    }

    #[test]
    fn variable_names() {
        assert_eq!(make_variable_name("__label__nsfw"), "__label__nsfw");
        assert_eq!(make_variable_name("a-b.c"), "a_b_c");
    }
}
