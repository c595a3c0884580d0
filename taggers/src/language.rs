//! Language identification and fastText classifiers (dolma `taggers/language.py`,
//! `core/ft_tagger.py`), plus a `whatlang` tagger that needs no model file.

use std::borrow::Cow;
use std::sync::Arc;

use crate::fasttext::FastTextModel;
use crate::text::{py_strip, split_paragraphs};
use crate::{Document, Span, Tagger};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Document,
    Paragraph,
}

/// Units a tagger scores: the whole document, or its non-empty paragraphs.
fn units<'a>(doc: &Document<'a>, level: Level) -> Vec<(usize, usize, &'a str)> {
    match level {
        Level::Document => vec![(0, doc.len_chars(), doc.text)],
        Level::Paragraph => split_paragraphs(doc.text, true)
            .into_iter()
            .map(|p| (p.start, p.end, p.text))
            .collect(),
    }
}

/// dolma's fastText input: lowercased, newlines as spaces, stripped.
fn ft_input(text: &str) -> String {
    py_strip(&text.to_lowercase().replace('\n', " ")).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LidOutput {
    /// `ft_lang_id_doc_v1` / `ft_lang_id_paragraph_v1`: every label with its probability.
    AllLabels,
    /// `ft_lang_id_en_*_v2`: `en` and `not_en` = 1 - `en`.
    English,
}

pub struct FastTextLangId {
    pub model: Arc<FastTextModel>,
    pub level: Level,
    pub output: LidOutput,
}

impl Tagger for FastTextLangId {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let mut negatives = Vec::new();
        for (start, end, text) in units(doc, self.level) {
            let input = ft_input(text);
            match self.output {
                LidOutput::AllLabels => {
                    for p in self.model.predict(&input, 0.0) {
                        out.push(Span::new(start, end, p.label, p.prob as f64));
                    }
                }
                LidOutput::English => {
                    let en = self.model.label_prob(&input, "en") as f64;
                    out.push(Span::new(start, end, "en", en));
                    negatives.push(Span::new(start, end, "not_en", 1.0 - en));
                }
            }
        }
        out.extend(negatives);
    }
}

/// A fastText classifier (quality, toxicity, spam, ...): emits the chosen labels' probabilities
/// under the full label name, as dolma's jigsaw taggers do (`__label__toxic`).
pub struct FastTextClassifier {
    pub model: Arc<FastTextModel>,
    pub level: Level,
    /// Labels to emit, with the `__label__` prefix; empty = all.
    pub labels: Vec<String>,
    pub lowercase: bool,
}

impl Tagger for FastTextClassifier {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let prefix = self.model.label_prefix().to_string();
        for (start, end, text) in units(doc, self.level) {
            let input = if self.lowercase {
                ft_input(text)
            } else {
                py_strip(&text.replace('\n', " ")).to_string()
            };
            let preds = self.model.predict(&input, 0.0);
            if self.labels.is_empty() {
                for p in preds {
                    out.push(Span::new(
                        start,
                        end,
                        format!("{prefix}{}", p.label),
                        p.prob as f64,
                    ));
                }
            } else {
                for want in &self.labels {
                    let bare = want.strip_prefix(prefix.as_str()).unwrap_or(want);
                    let prob = preds
                        .iter()
                        .find(|p| p.label == bare)
                        .map_or(0.0, |p| p.prob as f64);
                    out.push(Span::new(start, end, format!("{prefix}{bare}"), prob));
                }
            }
        }
    }
}

/// `whatlang_doc_v1` / `whatlang_paragraph_v1` (all: detected ISO 639-3 code with its
/// confidence) and `whatlang_en_doc_v1` / `whatlang_en_paragraph_v1` (`en` and `not_en`,
/// like the fastText English taggers). Needs no model file.
pub struct WhatlangTagger {
    pub level: Level,
    pub english_only: bool,
}

impl Tagger for WhatlangTagger {
    fn predict(&self, doc: &Document<'_>, out: &mut Vec<Span>) {
        let mut negatives = Vec::new();
        for (start, end, text) in units(doc, self.level) {
            let info = whatlang::detect(text);
            if self.english_only {
                let en = match &info {
                    Some(i) if i.lang() == whatlang::Lang::Eng => i.confidence(),
                    _ => 0.0,
                };
                out.push(Span::new(start, end, "en", en));
                negatives.push(Span::new(start, end, "not_en", 1.0 - en));
            } else if let Some(i) = info {
                out.push(Span::new(
                    start,
                    end,
                    Cow::Borrowed(i.lang().code()),
                    i.confidence(),
                ));
            }
        }
        out.extend(negatives);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whatlang_english_and_other() {
        let doc = Document::new(
            "d",
            "The quick brown fox jumps over the lazy dog and keeps running through the field.\n\
             Der schnelle braune Fuchs springt über den faulen Hund und läuft weiter über das Feld.\n",
        );
        let mut out = Vec::new();
        WhatlangTagger {
            level: Level::Paragraph,
            english_only: false,
        }
        .predict(&doc, &mut out);
        assert_eq!(out[0].kind, "eng");
        assert_eq!(out[1].kind, "deu");
        let mut out = Vec::new();
        WhatlangTagger {
            level: Level::Document,
            english_only: true,
        }
        .predict(&doc, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].kind, "not_en");
        assert!((out[0].score + out[1].score - 1.0).abs() < 1e-12);
    }

    #[test]
    fn classifier_emits_chosen_labels_per_unit() {
        let bytes = crate::fasttext::tests::tiny_softmax_model();
        let model = Arc::new(FastTextModel::from_reader(&bytes[..], "tiny").unwrap());
        let doc = Document::new("d", "good good\n\nbad\n");
        let mut out = Vec::new();
        FastTextClassifier {
            model: model.clone(),
            level: Level::Paragraph,
            labels: vec!["__label__pos".into()],
            lowercase: false,
        }
        .predict(&doc, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].start, out[0].end, out[0].kind.as_ref()),
            (0, 10, "__label__pos")
        );
        assert!(out[0].score > 0.98);
        assert_eq!((out[1].start, out[1].end), (11, 15));
        assert!(out[1].score < 0.02);
        let mut out = Vec::new();
        FastTextClassifier {
            model,
            level: Level::Document,
            labels: vec![],
            lowercase: true,
        }
        .predict(&Document::new("d", "GOOD"), &mut out);
        assert_eq!(out[0].kind, "__label__pos");
        assert_eq!(out[1].kind, "__label__neg");
    }

    #[test]
    fn fasttext_input_is_normalised() {
        assert_eq!(ft_input("  Hello\nWORLD \n"), "hello world");
    }
}
