//! Text helpers that reproduce Python `str` semantics, since dolma's attribute offsets and
//! scores are defined by Python: code-point offsets, `str.split()`, `str.strip()`, and the
//! paragraph regex `[^\n]*\n|[^\n]+$`.

/// Python's `str.isspace()`: Unicode White_Space plus the ASCII separators \x1c..\x1f,
/// which Rust's `char::is_whitespace` leaves out.
#[inline]
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.split()` with no arguments.
pub fn py_split(text: &str) -> impl Iterator<Item = &str> {
    text.split(py_is_space).filter(|w| !w.is_empty())
}

/// Python's `str.strip()` with no arguments.
pub fn py_strip(text: &str) -> &str {
    text.trim_matches(py_is_space)
}

/// Number of code points, i.e. Python's `len(str)`.
#[inline]
pub fn char_len(text: &str) -> usize {
    if text.is_ascii() {
        text.len()
    } else {
        text.chars().count()
    }
}

/// Maps byte offsets of one text to code-point offsets.
pub enum CharMap {
    Ascii,
    Table(Vec<u32>),
}

impl CharMap {
    pub fn new(text: &str) -> Self {
        if text.is_ascii() {
            return CharMap::Ascii;
        }
        let mut table = vec![0u32; text.len() + 1];
        let mut ci = 0u32;
        for (bi, ch) in text.char_indices() {
            for slot in &mut table[bi..bi + ch.len_utf8()] {
                *slot = ci;
            }
            ci += 1;
        }
        table[text.len()] = ci;
        CharMap::Table(table)
    }

    #[inline]
    pub fn to_char(&self, byte: usize) -> usize {
        match self {
            CharMap::Ascii => byte,
            CharMap::Table(t) => t[byte] as usize,
        }
    }
}

/// A slice of a document in both byte and code-point offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice<'a> {
    pub text: &'a str,
    pub byte_start: usize,
    pub start: usize,
    pub end: usize,
}

/// dolma's `split_paragraphs`: every run of characters up to and including a newline, plus a
/// final run without one. With `remove_empty`, whitespace-only paragraphs are dropped.
pub fn split_paragraphs(text: &str, remove_empty: bool) -> Vec<Slice<'_>> {
    let mut out = Vec::new();
    let mut byte_start = 0;
    let mut char_start = 0;
    let bytes = text.as_bytes();
    while byte_start < bytes.len() {
        let byte_end = match memchr_newline(&bytes[byte_start..]) {
            Some(i) => byte_start + i + 1,
            None => bytes.len(),
        };
        let para = &text[byte_start..byte_end];
        let char_end = char_start + char_len(para);
        if !remove_empty || !py_strip(para).is_empty() {
            out.push(Slice {
                text: para,
                byte_start,
                start: char_start,
                end: char_end,
            });
        }
        byte_start = byte_end;
        char_start = char_end;
    }
    out
}

#[inline]
fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Python's `round(x, 5)`: correctly rounded on the exact binary value, half to even,
/// which is what Rust's fixed-precision formatting does too.
pub fn round5(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    if x == x.trunc() && x.abs() < 1e15 {
        return x;
    }
    format!("{x:.5}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_match_dolma_regex() {
        let p = split_paragraphs("a\n\nbé\nc", false);
        let got: Vec<(usize, usize, &str)> = p.iter().map(|s| (s.start, s.end, s.text)).collect();
        assert_eq!(
            got,
            vec![(0, 2, "a\n"), (2, 3, "\n"), (3, 6, "bé\n"), (6, 7, "c")]
        );
        let p = split_paragraphs("a\n\nbé\nc", true);
        assert_eq!(p.len(), 3);
        assert!(split_paragraphs("", true).is_empty());
        assert_eq!(split_paragraphs("x\n", false).len(), 1);
    }

    #[test]
    fn python_whitespace() {
        assert_eq!(
            py_split(" a\x1cb\u{3000}c ").collect::<Vec<_>>(),
            vec!["a", "b", "c"]
        );
        assert_eq!(py_strip("\x1f x \n"), "x");
    }

    #[test]
    fn char_map_maps_bytes_to_code_points() {
        let m = CharMap::new("aé€b");
        assert_eq!(m.to_char(0), 0);
        assert_eq!(m.to_char(1), 1);
        assert_eq!(m.to_char(3), 2);
        assert_eq!(m.to_char(6), 3);
        assert_eq!(m.to_char(7), 4);
    }

    #[test]
    fn rounding_like_python() {
        assert_eq!(round5(0.123456), 0.12346);
        assert_eq!(round5(2.0), 2.0);
        assert_eq!(round5(1.0 / 3.0), 0.33333);
        assert_eq!(round5(-0.000004), -0.0);
    }
}
