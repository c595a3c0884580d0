//! The tagger registry: names, descriptions and construction from per-tagger options.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::fasttext::FastTextModel;
use crate::language::{FastTextClassifier, FastTextLangId, Level, LidOutput, WhatlangTagger};
use crate::url::{BlockMode, UrlBlocklist};
use crate::{c4, gopher, length, pii, punctuation, repetitions, sampling, Tagger};

/// Options of one tagger (`tagger_options.<name>` in the tag config).
pub type TaggerOptions = serde_json::Map<String, Value>;

pub struct TaggerInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// Option keys the tagger reads; anything else is an error.
    pub options: &'static [&'static str],
}

const FT_LID_ENV: &str = "DOLMA_FASTTEXT_LID_MODEL";

pub const TAGGERS: &[TaggerInfo] = &[
    TaggerInfo { name: "bytes_length_v1", description: "document size in UTF-8 bytes (`bytes`)", options: &[] },
    TaggerInfo { name: "char_length_v1", description: "document length in characters (`length`)", options: &[] },
    TaggerInfo { name: "char_length_with_paragraphs_v1", description: "characters per non-empty paragraph (`paragraph`) and per document (`document`)", options: &[] },
    TaggerInfo { name: "whitespace_tokenizer_v1", description: "word-and-punctuation token count, `len(regex.split(r\"\\w+|[^\\w\\s]+\"))` (`length`)", options: &[] },
    TaggerInfo { name: "uniseg_length_paragraphs_v1", description: "Unicode (UAX #29) words per non-empty paragraph (`paragraph`, `negative_paragraph`)", options: &[] },
    TaggerInfo { name: "gopher_v1", description: "Gopher quality statistics: word counts, symbol ratios, duplicate lines and n-grams", options: &[] },
    TaggerInfo { name: "gopher_v2", description: "gopher_v1 with empty lines skipped", options: &[] },
    TaggerInfo { name: "c4_v1", description: "C4 heuristics: lines without end punctuation / with < 3 words, naughty words, javascript, lorem ipsum, curly braces", options: &[] },
    TaggerInfo { name: "c4_v2", description: "faster c4_v1 (document-wide flags; line offsets on lowercased text, as dolma)", options: &[] },
    TaggerInfo { name: "pii_regex_v1", description: "email, phone and IP regexes with dolma's post-filters; `doc` = PII spans per word", options: &[] },
    TaggerInfo { name: "pii_regex_v2", description: "pii_regex_v1 (empty documents score -1)", options: &[] },
    TaggerInfo { name: "pii_regex_with_counts_fast_v2", description: "per-paragraph email/phone/IP regexes with prefilters; `doc_count`, `doc_frac`", options: &[] },
    TaggerInfo { name: "repetitions_v1", description: "repeated character groups `(.+?)(\\s?\\1){3,}` and document repetition stats", options: &[] },
    TaggerInfo { name: "paragraph_repetitions_v1", description: "repetitions_v1 within each paragraph", options: &[] },
    TaggerInfo { name: "not_alphanum_paragraph_v1", description: "paragraphs made only of punctuation, symbols and emoji (`all_punct`)", options: &[] },
    TaggerInfo { name: "random_number_v1", description: "uniform [0,1) number per document, a seeded hash of source and id (`random`); option `seed` (default 1)", options: &["seed"] },
    TaggerInfo { name: "ft_lang_id_doc_v1", description: "fastText lid.176 probabilities of every language, per document; option `model_path` or $DOLMA_FASTTEXT_LID_MODEL", options: &["model_path"] },
    TaggerInfo { name: "ft_lang_id_paragraph_v1", description: "fastText lid.176 probabilities of every language, per paragraph", options: &["model_path"] },
    TaggerInfo { name: "ft_lang_id_en_doc_v2", description: "fastText lid.176 English probability per document (`en`, `not_en`)", options: &["model_path"] },
    TaggerInfo { name: "ft_lang_id_en_paragraph_v2", description: "fastText lid.176 English probability per paragraph (`en`, `not_en`)", options: &["model_path"] },
    TaggerInfo { name: "whatlang_doc_v1", description: "whatlang language (ISO 639-3 code) and confidence per document; no model file needed", options: &[] },
    TaggerInfo { name: "whatlang_paragraph_v1", description: "whatlang language and confidence per paragraph", options: &[] },
    TaggerInfo { name: "whatlang_en_doc_v1", description: "whatlang English confidence per document (`en`, `not_en`)", options: &[] },
    TaggerInfo { name: "whatlang_en_paragraph_v1", description: "whatlang English confidence per paragraph (`en`, `not_en`)", options: &[] },
    TaggerInfo { name: "fasttext_classifier_v1", description: "any fastText classifier per document; options `model_path` (required), `labels` (default all), `lowercase` (default false)", options: &["model_path", "labels", "lowercase"] },
    TaggerInfo { name: "fasttext_classifier_paragraph_v1", description: "any fastText classifier per paragraph; same options", options: &["model_path", "labels", "lowercase"] },
    TaggerInfo { name: "domain_blocklist_v1", description: "`url` = 1 when metadata.url's domain (or a parent domain) is listed; option `blocklist` (path or list of paths)", options: &["blocklist"] },
    TaggerInfo { name: "url_blocklist_v1", description: "`url` = 1 when metadata.url (host/path, no scheme or query) is listed; option `blocklist`", options: &["blocklist"] },
];

pub fn tagger_names() -> impl Iterator<Item = &'static str> {
    TAGGERS.iter().map(|t| t.name)
}

static MODELS: Mutex<Option<HashMap<PathBuf, Arc<FastTextModel>>>> = Mutex::new(None);

/// Loads a fastText model once per process, however many taggers use it.
fn load_model(path: &Path) -> Result<Arc<FastTextModel>> {
    let mut guard = MODELS.lock().map_err(|_| anyhow!("model cache poisoned"))?;
    let cache = guard.get_or_insert_with(HashMap::new);
    if let Some(m) = cache.get(path) {
        return Ok(m.clone());
    }
    let model = Arc::new(FastTextModel::load(path)?);
    cache.insert(path.to_path_buf(), model.clone());
    Ok(model)
}

fn opt_str<'a>(name: &str, opts: &'a TaggerOptions, key: &str) -> Result<Option<&'a str>> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => bail!("tagger {name}: option `{key}` must be a string, got {other}"),
    }
}

fn opt_strings(name: &str, opts: &TaggerOptions, key: &str) -> Result<Vec<String>> {
    match opts.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    anyhow!("tagger {name}: option `{key}` must be a list of strings")
                })
            })
            .collect(),
        Some(other) => bail!("tagger {name}: option `{key}` must be a string or list, got {other}"),
    }
}

fn lid_model(name: &str, opts: &TaggerOptions) -> Result<Arc<FastTextModel>> {
    let path = match opt_str(name, opts, "model_path")? {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os(FT_LID_ENV) {
            Some(p) => PathBuf::from(p),
            None => bail!(
                "tagger {name} needs the fastText lid.176 model (.bin or .ftz): set \
                 `tagger_options.{name}.model_path` or the {FT_LID_ENV} environment variable"
            ),
        },
    };
    load_model(&path).with_context(|| format!("tagger {name}"))
}

/// Builds a tagger by name. Unknown names and unknown options are errors that list what exists.
pub fn build_tagger(name: &str, opts: &TaggerOptions) -> Result<Box<dyn Tagger>> {
    let Some(info) = TAGGERS.iter().find(|t| t.name == name) else {
        bail!(
            "unknown tagger `{name}`; available taggers: {} (see `dolma list`)",
            tagger_names().collect::<Vec<_>>().join(", ")
        );
    };
    if let Some(bad) = opts.keys().find(|k| !info.options.contains(&k.as_str())) {
        bail!(
            "tagger {name} has no option `{bad}`{}",
            if info.options.is_empty() {
                " (it takes none)".to_string()
            } else {
                format!("; options: {}", info.options.join(", "))
            }
        );
    }
    let doc = Level::Document;
    let para = Level::Paragraph;
    Ok(match name {
        "bytes_length_v1" => Box::new(length::BytesLength),
        "char_length_v1" => Box::new(length::CharLength),
        "char_length_with_paragraphs_v1" => Box::new(length::CharLengthWithParagraphs),
        "whitespace_tokenizer_v1" => Box::new(length::WhitespaceTokenizer),
        "uniseg_length_paragraphs_v1" => Box::new(length::UnisegLengthParagraphs),
        "gopher_v1" => Box::new(gopher::Gopher {
            ignore_empty_lines: false,
        }),
        "gopher_v2" => Box::new(gopher::Gopher {
            ignore_empty_lines: true,
        }),
        "c4_v1" => Box::new(c4::C4V1),
        "c4_v2" => Box::new(c4::C4V2),
        "pii_regex_v1" | "pii_regex_v2" => Box::new(pii::PiiRegexV1),
        "pii_regex_with_counts_fast_v2" => Box::new(pii::FastPiiRegex),
        "repetitions_v1" => Box::new(repetitions::Repetitions {
            per_paragraph: false,
        }),
        "paragraph_repetitions_v1" => Box::new(repetitions::Repetitions {
            per_paragraph: true,
        }),
        "not_alphanum_paragraph_v1" => Box::new(punctuation::NotAlphanumParagraph),
        "random_number_v1" => {
            let seed = match opts.get("seed") {
                None => 1,
                Some(v) => v.as_u64().ok_or_else(|| {
                    anyhow!("tagger {name}: option `seed` must be a non-negative integer, got {v}")
                })?,
            };
            Box::new(sampling::RandomNumber { seed })
        }
        "ft_lang_id_doc_v1"
        | "ft_lang_id_paragraph_v1"
        | "ft_lang_id_en_doc_v2"
        | "ft_lang_id_en_paragraph_v2" => Box::new(FastTextLangId {
            model: lid_model(name, opts)?,
            level: if name.contains("paragraph") {
                para
            } else {
                doc
            },
            output: if name.contains("_en_") {
                LidOutput::English
            } else {
                LidOutput::AllLabels
            },
        }),
        "whatlang_doc_v1"
        | "whatlang_paragraph_v1"
        | "whatlang_en_doc_v1"
        | "whatlang_en_paragraph_v1" => Box::new(WhatlangTagger {
            level: if name.contains("paragraph") {
                para
            } else {
                doc
            },
            english_only: name.contains("_en_"),
        }),
        "fasttext_classifier_v1" | "fasttext_classifier_paragraph_v1" => {
            let path = opt_str(name, opts, "model_path")?
                .ok_or_else(|| anyhow!("tagger {name} needs `tagger_options.{name}.model_path`"))?;
            let lowercase = match opts.get("lowercase") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    bail!("tagger {name}: option `lowercase` must be true or false, got {v}")
                }
            };
            let model = load_model(Path::new(path)).with_context(|| format!("tagger {name}"))?;
            let labels = opt_strings(name, opts, "labels")?;
            for l in &labels {
                let bare = l.strip_prefix(model.label_prefix()).unwrap_or(l);
                if !model
                    .labels()
                    .any(|m| m.strip_prefix(model.label_prefix()).unwrap_or(m) == bare)
                {
                    bail!(
                        "tagger {name}: label `{l}` is not in model {path}; its labels: {}",
                        model.labels().collect::<Vec<_>>().join(", ")
                    );
                }
            }
            Box::new(FastTextClassifier {
                model,
                level: if name.contains("paragraph") {
                    para
                } else {
                    doc
                },
                labels,
                lowercase,
            })
        }
        "domain_blocklist_v1" | "url_blocklist_v1" => {
            let paths = opt_strings(name, opts, "blocklist")?;
            if paths.is_empty() {
                bail!("tagger {name} needs `tagger_options.{name}.blocklist` (a list file path)");
            }
            let mode = if name == "url_blocklist_v1" {
                BlockMode::Url
            } else {
                BlockMode::Domain
            };
            Box::new(
                UrlBlocklist::from_paths(&paths, mode).with_context(|| format!("tagger {name}"))?,
            )
        }
        other => bail!("tagger `{other}` is registered but not constructible; this is a bug"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_tagger_without_required_options_builds() {
        for t in TAGGERS {
            let needs = t.name.starts_with("ft_")
                || t.name.contains("blocklist")
                || t.name.starts_with("fasttext_");
            if !needs {
                build_tagger(t.name, &TaggerOptions::new()).unwrap();
            }
        }
    }

    #[test]
    fn unknown_names_and_options_are_explained() {
        let e = build_tagger("gopher_v9", &TaggerOptions::new())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("unknown tagger `gopher_v9`") && e.contains("gopher_v1"),
            "{e}"
        );
        let mut o = TaggerOptions::new();
        o.insert("seeed".into(), 3.into());
        let e = build_tagger("random_number_v1", &o)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no option `seeed`") && e.contains("seed"), "{e}");
        let e = build_tagger("fasttext_classifier_v1", &TaggerOptions::new())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model_path"), "{e}");
    }
}
