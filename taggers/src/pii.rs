//! PII regex taggers (dolma `taggers/pii.py`).
//!
//! The patterns are dolma's, with Python `re`'s `\s` (which also matches \x1c..\x1f) spelled
//! out. dolma's URL pattern starts with `"\b"` in a plain Python string, i.e. a literal
//! backspace, so it practically never matches; we keep that so results agree.

use std::sync::LazyLock;

use regex::Regex;

use crate::text::{py_split, split_paragraphs};
use crate::{Document, Span, Tagger};

const S: &str = r"\s\x1c-\x1f";

fn email_re() -> String {
    format!(r"[.{S}@,?!;:)(]*([^{S}@]+@[^{S}@,?!;:)(]+?)[.{S}@,?!;:)(]?[{S}\n\r]")
}
fn phone_re() -> String {
    format!(r"[{S}]+\(?(\d{{3}})\)?[-\. ]*(\d{{3}})[-. ]?(\d{{4}})")
}
const IP_RE: &str =
    r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)";
fn url_re() -> String {
    format!(
        "(?i)\x08((?:https?://|www\\d{{0,3}}[.]|[a-z0-9.\\-]+[.][a-z]{{2,4}}/)(?:[^{S}()<>]+|\\(([^{S}()<>]+|\
         (\\([^{S}()<>]+\\)))*\\))+(?:\\(([^{S}()<>]+|(\\([^{S}()<>]+\\)))*\\)|[^{S}`!()\\[\\]\
         {{}};:'\".,<>?«»“”‘’]))"
    )
}

struct Patterns {
    email: Regex,
    phone: Regex,
    ip: Regex,
    url: Regex,
    pre_ip: Regex,
    pre_phone: Regex,
}

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| Patterns {
    email: Regex::new(&email_re()).expect("email regex"),
    phone: Regex::new(&phone_re()).expect("phone regex"),
    ip: Regex::new(IP_RE).expect("ip regex"),
    url: Regex::new(&url_re()).expect("url regex"),
    pre_ip: Regex::new(&format!(r"\.[^{S}]")).expect("pre-ip regex"),
    pre_phone: Regex::new(r"\d").expect("digit regex"),
});

const EMAIL: &str = "EMAIL_ADDRESS";
const PHONE: &str = "PHONE_NUMBER";
const IP: &str = "IP_ADDRESS";

/// `pii_regex_with_counts_fast_v2`: per-paragraph matching with cheap prefilters, then
/// `doc_count` and `doc_frac`.
pub struct FastPiiRegex;

impl Tagger for FastPiiRegex {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let p = &*PATTERNS;
        let first = out.len();
        let text = doc.text;
        let paragraphs = if text.bytes().filter(|&b| b == b'?').count() > 10_000 {
            tracing::warn!(
                id = doc.id,
                "skipping regex PII detection for doc with >10k question marks"
            );
            Vec::new()
        } else {
            split_paragraphs(text, true)
        };
        let span_of = |para_byte: usize, s: usize, e: usize, kind: &'static str| {
            Span::new(
                doc.char_offset(para_byte + s),
                doc.char_offset(para_byte + e),
                kind,
                1.0,
            )
        };
        for para in paragraphs {
            let t = para.text;
            if t.contains('@') {
                for c in p.email.captures_iter(t) {
                    let m = c.get(0).expect("match");
                    let g = c.get(1).expect("group").as_str();
                    let (addressee, domain) = g.split_once('@').unwrap_or((g, ""));
                    if crate::text::py_strip(addressee) == "(" || !domain.contains('.') {
                        continue;
                    }
                    out.push(span_of(para.byte_start, m.start(), m.end(), EMAIL));
                }
            }
            if p.pre_phone.is_match(t) {
                for m in p.phone.find_iter(t) {
                    out.push(span_of(para.byte_start, m.start(), m.end(), PHONE));
                }
            }
            if p.pre_ip.is_match(t) {
                for m in p.ip.find_iter(t) {
                    if p.url.is_match(m.as_str()) {
                        continue;
                    }
                    out.push(span_of(para.byte_start, m.start(), m.end(), IP));
                }
            }
        }
        let count = (out.len() - first) as f64;
        let covered: usize = out[first..].iter().map(|s| s.end - s.start).sum();
        let n = doc.len_chars();
        out.push(Span::new(0, n, "doc_count", count));
        // dolma sums over all spans so far, the doc_count span (length n) included.
        let frac = if n == 0 {
            -1.0
        } else {
            (covered + n) as f64 / n as f64
        };
        out.push(Span::new(0, n, "doc_frac", frac));
    }
}

/// `pii_regex_v1` (and `pii_regex_v2`, which differs only for empty documents in dolma; an
/// empty document crashes dolma's v1, here both score it -1).
pub struct PiiRegexV1;

impl Tagger for PiiRegexV1 {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let p = &*PATTERNS;
        let text = doc.text;
        let n = doc.len_chars();
        let first = out.len();
        let chars: Vec<char> = text.chars().collect();
        let mention = |s: &Span, window: usize| -> String {
            chars[s.start.saturating_sub(window)..(s.end + window).min(chars.len())]
                .iter()
                .collect()
        };
        let mut text_has_url: Option<bool> = None;
        for (kind, re) in [(EMAIL, &p.email), (PHONE, &p.phone), (IP, &p.ip)] {
            for m in re.find_iter(text) {
                let span = Span::new(
                    doc.char_offset(m.start()),
                    doc.char_offset(m.end()),
                    kind,
                    1.0,
                );
                let keep = if kind == EMAIL {
                    let mention = m.as_str();
                    let mut parts = mention.split('@');
                    let addressee = parts.next().unwrap_or("");
                    let domain = parts.next().unwrap_or("");
                    crate::text::py_strip(addressee) != "(" && domain.contains('.')
                } else {
                    let context = mention(&span, 100);
                    if context.contains("isbn") || context.contains("doi") || context.contains('#')
                    {
                        false
                    } else if kind == IP {
                        true
                    } else {
                        !*text_has_url.get_or_insert_with(|| p.url.is_match(text))
                    }
                };
                if keep {
                    out.push(span);
                }
            }
        }
        let words = py_split(text).count();
        let found = (out.len() - first) as f64;
        let score = if words == 0 {
            -1.0
        } else {
            found / words as f64
        };
        out.push(Span::new(0, n, "doc", score));
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
    fn fast_finds_email_phone_ip() {
        let text = "Write to john.doe@example.com now\ncall 555-123-4567 or ping 192.168.1.10\n";
        let s = run(&FastPiiRegex, text);
        let kinds: Vec<&str> = s.iter().map(|s| s.kind.as_ref()).collect();
        assert_eq!(kinds, vec![EMAIL, PHONE, IP, "doc_count", "doc_frac"]);
        // the email match includes its surrounding separators, as dolma's does
        assert_eq!((s[0].start, s[0].end), (8, 30));
        assert_eq!(&text[s[2].start..s[2].end], "192.168.1.10");
        assert_eq!(s[3].score, 3.0);
        let n = text.len() as f64;
        let covered =
            (s[0].end - s[0].start + s[1].end - s[1].start + s[2].end - s[2].start) as f64;
        assert!((s[4].score - (covered + n) / n).abs() < 1e-12);
    }

    #[test]
    fn fast_rejects_domain_without_dot_and_handles_unicode_offsets() {
        let s = run(&FastPiiRegex, "é user@localhost x\n");
        assert_eq!(s[0].kind, "doc_count");
        assert_eq!(s[0].score, 0.0);
        let s = run(&FastPiiRegex, "éé a@b.co \n");
        assert_eq!((s[0].start, s[0].end), (2, 11));
        assert_eq!(run(&FastPiiRegex, "")[1].score, -1.0);
    }

    #[test]
    fn v1_postprocess_drops_isbn_context() {
        let s = run(&PiiRegexV1, "ISBN isbn 555-123-4567 here");
        assert!(s.iter().all(|s| s.kind != PHONE));
        let s = run(&PiiRegexV1, "call me 555-123-4567 here");
        assert!(s.iter().any(|s| s.kind == PHONE));
        let doc = s.last().unwrap();
        assert_eq!(doc.kind, "doc");
        assert!((doc.score - 1.0 / 4.0).abs() < 1e-12);
    }
}
