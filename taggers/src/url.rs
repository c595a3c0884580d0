//! URL / domain blocklist tagger over `metadata.url` (dolma `taggers/url.py`).
//!
//! Reads a user-supplied list: plain domains or URLs, hosts-file lines (`0.0.0.0 example.com`),
//! or AdBlock-Plus domain rules (`||example.com^`); `#`, `;` and `!` start comments. Unlike
//! dolma, which only checks the host and `www.`+host (after a `lstrip("www.")` that also eats
//! leading `w`s), domain mode also blocks every subdomain of a listed domain.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};

use anyhow::{Context, Result};

use crate::{Document, Span, Tagger};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockMode {
    /// Match on host (and its parent domains).
    Domain,
    /// Match on host[:port]/path, without scheme, query or trailing slash.
    Url,
}

pub struct UrlBlocklist {
    entries: HashSet<String>,
    mode: BlockMode,
}

/// `host[:port]/path` of a URL, lowercased, scheme, credentials, query and fragment removed.
pub fn clean_url(url: &str) -> Option<String> {
    let url = url.trim();
    if url.is_empty() {
        return None;
    }
    let rest = match url.find("://") {
        Some(i)
            if url[..i]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            &url[i + 3..]
        }
        _ => url,
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.is_empty() {
        return None;
    }
    let cleaned = format!("{authority}{path}");
    Some(cleaned.trim_end_matches('/').to_lowercase())
}

/// The host of a URL, lowercased, without port or a leading `www.`.
pub fn host_of(url: &str) -> Option<String> {
    let cleaned = clean_url(url)?;
    let authority = cleaned.split('/').next().unwrap_or("");
    let host = if authority.starts_with('[') {
        authority
            .split(']')
            .next()
            .map(|h| format!("{h}]"))
            .unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or("").to_string()
    };
    let host = host.trim_end_matches('.');
    let host = host.strip_prefix("www.").unwrap_or(host);
    (!host.is_empty()).then(|| host.to_string())
}

fn parse_line(line: &str, mode: BlockMode) -> Option<String> {
    let line = line.trim().to_lowercase();
    if line.is_empty() || line.starts_with(['#', ';', '!']) {
        return None;
    }
    let entry = if let Some(rule) = line.strip_prefix("||") {
        rule.split(['^', '$']).next().unwrap_or("").to_string()
    } else {
        let mut fields = line.split_whitespace();
        let first = fields.next()?;
        // hosts-file form: an address then a name
        match fields.next() {
            Some(name) if first.parse::<std::net::IpAddr>().is_ok() => {
                if matches!(
                    name,
                    "localhost" | "localdomain" | "local" | "broadcasthost"
                ) {
                    return None;
                }
                name.to_string()
            }
            _ => first.to_string(),
        }
    };
    match mode {
        BlockMode::Domain => host_of(&entry),
        BlockMode::Url => clean_url(&entry),
    }
}

impl UrlBlocklist {
    pub fn from_reader<R: Read>(reader: R, mode: BlockMode, what: &str) -> Result<Self> {
        let mut entries = HashSet::new();
        for (i, line) in BufReader::new(reader).lines().enumerate() {
            let line = line.with_context(|| format!("{what}: cannot read line {}", i + 1))?;
            if let Some(e) = parse_line(&line, mode) {
                entries.insert(e);
            }
        }
        if entries.is_empty() {
            anyhow::bail!("{what}: blocklist has no entries");
        }
        Ok(UrlBlocklist { entries, mode })
    }

    /// Reads and merges list files (`.gz` or plain text).
    pub fn from_paths(paths: &[String], mode: BlockMode) -> Result<Self> {
        let mut text = String::new();
        for p in paths {
            let file =
                std::fs::File::open(p).with_context(|| format!("cannot open blocklist {p}"))?;
            let mut reader: Box<dyn Read> = if p.ends_with(".gz") {
                Box::new(flate2::read::MultiGzDecoder::new(file))
            } else {
                Box::new(file)
            };
            reader.read_to_string(&mut text).with_context(|| {
                format!("cannot read blocklist {p} (not UTF-8 text, or a corrupt .gz)")
            })?;
            text.push('\n');
        }
        Self::from_reader(text.as_bytes(), mode, &paths.join(", "))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn is_blocked(&self, url: &str) -> bool {
        match self.mode {
            BlockMode::Url => clean_url(url).is_some_and(|u| self.entries.contains(&u)),
            BlockMode::Domain => {
                let Some(host) = host_of(url) else {
                    return false;
                };
                let mut h = host.as_str();
                loop {
                    if self.entries.contains(h) {
                        return true;
                    }
                    match h.find('.') {
                        Some(i) => h = &h[i + 1..],
                        None => return false,
                    }
                }
            }
        }
    }
}

impl Tagger for UrlBlocklist {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let url = doc
            .metadata
            .and_then(|m| m.get("url"))
            .and_then(|u| u.as_str())
            .unwrap_or("");
        if self.is_blocked(url) {
            out.push(Span::new(0, doc.len_chars(), "url", 1.0));
        }
    }

    fn needs_metadata(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "# comment\nbad.example\n0.0.0.0 tracker.test\n127.0.0.1 localhost\n||ads.example^\nhttps://www.site.org/evil/page?x=1\n";

    #[test]
    fn domain_mode_blocks_listed_domains_and_subdomains() {
        let b = UrlBlocklist::from_reader(LIST.as_bytes(), BlockMode::Domain, "t").unwrap();
        assert!(b.is_blocked("http://bad.example/x"));
        assert!(b.is_blocked("https://WWW.Bad.Example:8080/"));
        assert!(b.is_blocked("https://cdn.tracker.test/a.js"));
        assert!(b.is_blocked("ads.example"));
        assert!(b.is_blocked("https://site.org/"));
        assert!(!b.is_blocked("https://notbad.example.com/"));
        assert!(!b.is_blocked("https://localhost/"));
        assert!(!b.is_blocked(""));
    }

    #[test]
    fn url_mode_needs_the_path() {
        let b = UrlBlocklist::from_reader(LIST.as_bytes(), BlockMode::Url, "t").unwrap();
        assert!(b.is_blocked("http://www.site.org/evil/page/"));
        assert!(!b.is_blocked("http://www.site.org/good"));
    }

    #[test]
    fn empty_list_is_an_error() {
        let err = UrlBlocklist::from_reader("# only\n".as_bytes(), BlockMode::Domain, "list.txt")
            .err()
            .unwrap();
        assert!(err.to_string().contains("list.txt"));
    }

    #[test]
    fn tagger_reads_metadata_url() {
        let b = UrlBlocklist::from_reader(LIST.as_bytes(), BlockMode::Domain, "t").unwrap();
        let meta = serde_json::json!({"url": "http://bad.example/page"});
        let doc = Document::new("d", "abc").with_metadata(Some(&meta));
        let mut out = Vec::new();
        b.predict(&doc, &mut out);
        assert_eq!(out, vec![Span::new(0, 3, "url", 1.0)]);
    }
}
