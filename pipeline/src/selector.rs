//! Filter and span selectors in dolma's two syntaxes.
//!
//! JSONPath runs on `jsonpath-rust` 0.7, which evaluates `$.attributes[?(@.x[0][2] < 0.5)]`
//! over an object the way dolma's jsonpath-rust 0.3 does (the filter applies to the object
//! itself); RFC 9535 implementations iterate the members instead and silently match nothing.
//! A path "matches" when its result is not null, as in dolma.
//!
//! jq runs on jaq. A jq filter matches when it yields at least one output and every output is
//! truthy: true, a non-zero number, a non-empty string, array or object; null and false are
//! not. A run-time error counts as no match (and is counted and reported), where dolma would
//! fail the whole shard.

use std::str::FromStr;

use anyhow::{anyhow, bail, Result};
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, unwrap_valr, Compiler, Ctx, Vars};
use jaq_json::Val;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    JsonPath,
    Jq,
}

impl Syntax {
    pub fn parse(s: Option<&str>) -> Result<Syntax> {
        match s {
            None | Some("jsonpath") => Ok(Syntax::JsonPath),
            Some("jq") => Ok(Syntax::Jq),
            Some(other) => bail!("unknown syntax `{other}` (use `jsonpath` or `jq`)"),
        }
    }
}

type JqFilter = jaq_core::Filter<data::JustLut<Val>>;

/// A compiled selector. jq programs hold reference-counted values, so a `Selector` stays on the
/// thread that compiled it; [`SelectorSpec`] is the shareable, validated source.
pub enum Selector {
    JsonPath(jsonpath_rust::JsonPath<Value>),
    Jq(Box<JqFilter>),
}

/// A selector's source, checked to compile when created.
#[derive(Debug, Clone)]
pub struct SelectorSpec {
    pub code: String,
    pub syntax: Syntax,
}

impl SelectorSpec {
    pub fn new(code: &str, syntax: Syntax) -> Result<SelectorSpec> {
        let spec = SelectorSpec {
            code: code.to_string(),
            syntax,
        };
        spec.compile()?;
        Ok(spec)
    }

    pub fn compile(&self) -> Result<Selector> {
        match self.syntax {
            Syntax::JsonPath => jsonpath_rust::JsonPath::from_str(&self.code)
                .map(Selector::JsonPath)
                .map_err(|e| anyhow!("invalid JSONPath `{}`: {e}", self.code)),
            Syntax::Jq => compile_jq(&self.code).map(|f| Selector::Jq(Box::new(f))),
        }
    }
}

fn compile_jq(code: &str) -> Result<JqFilter> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let modules = loader
        .load(&arena, File { code, path: () })
        .map_err(|errs| {
            anyhow!(
                "invalid jq filter `{code}`: cannot parse it ({} error(s): {:?})",
                errs.len(),
                errs.iter()
                    .map(|e| format!("{:?}", e.1))
                    .collect::<Vec<_>>()
            )
        })?;
    Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|errs| {
            anyhow!(
                "invalid jq filter `{code}`: cannot compile it ({:?})",
                errs.iter()
                    .map(|e| format!("{:?}", e.1))
                    .collect::<Vec<_>>()
            )
        })
}

/// A document converted once for jq, reused by every jq selector.
pub struct JqInput(Val);

impl JqInput {
    pub fn new(doc: &Value) -> Result<JqInput> {
        let bytes = serde_json::to_vec(doc)?;
        jaq_json::read::parse_single(&bytes)
            .map(JqInput)
            .map_err(|e| anyhow!("cannot convert a document for jq: {e:?}"))
    }
}

/// jq truthiness as dolma defines it (stricter than jq's: 0, "" and [] are false).
fn truthy(v: &Val) -> bool {
    match v {
        Val::Null => false,
        Val::Bool(b) => *b,
        Val::Num(n) => match n {
            jaq_json::Num::Int(i) => *i != 0,
            jaq_json::Num::Float(f) => *f != 0.0,
            jaq_json::Num::Dec(s) => {
                s.parse::<f64>().is_ok_and(|f| f != 0.0) || s.parse::<f64>().is_err()
            }
            _ => true,
        },
        Val::TStr(s) | Val::BStr(s) => !s.is_empty(),
        Val::Arr(a) => !a.is_empty(),
        Val::Obj(o) => !o.is_empty(),
    }
}

fn jq_values(f: &JqFilter, input: &JqInput) -> std::result::Result<Vec<Val>, String> {
    let ctx = Ctx::<data::JustLut<Val>>::new(&f.lut, Vars::new([]));
    f.id.run((ctx, input.0.clone()))
        .map(unwrap_valr)
        .map(|r| r.map_err(|e| format!("{e:?}")))
        .collect()
}

/// The outcome of testing one filter on one document.
pub enum Match {
    Yes,
    No,
    /// The jq program failed on this document; treated as no match.
    Error(String),
}

impl Selector {
    /// Whether the selector "matches" the document (see the module docs).
    pub fn matches(&self, doc: &Value, jq: &mut Option<JqInput>) -> Result<Match> {
        match self {
            Selector::JsonPath(p) => Ok(if p.find(doc).is_null() {
                Match::No
            } else {
                Match::Yes
            }),
            Selector::Jq(f) => {
                let input = match jq {
                    Some(i) => i,
                    None => jq.insert(JqInput::new(doc)?),
                };
                Ok(match jq_values(f, input) {
                    Err(e) => Match::Error(e),
                    Ok(v) if v.is_empty() => Match::No,
                    Ok(v) => {
                        if v.iter().all(truthy) {
                            Match::Yes
                        } else {
                            Match::No
                        }
                    }
                })
            }
        }
    }

    /// Every value the selector yields, as JSON (for span replacement).
    pub fn values(&self, doc: &Value, jq: &mut Option<JqInput>) -> Result<Vec<Value>> {
        match self {
            Selector::JsonPath(p) => Ok(match p.find(doc) {
                Value::Null => Vec::new(),
                Value::Array(a) => a,
                other => vec![other],
            }),
            Selector::Jq(f) => {
                let input = match jq {
                    Some(i) => i,
                    None => jq.insert(JqInput::new(doc)?),
                };
                let vals = jq_values(f, input).map_err(|e| anyhow!("jq selector failed: {e}"))?;
                vals.into_iter()
                    .map(|v| {
                        serde_json::from_str(&v.to_string())
                            .map_err(|e| anyhow!("jq output is not JSON: {e}"))
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn keep(code: &str, syntax: Syntax, doc: &Value) -> bool {
        let s = SelectorSpec::new(code, syntax).unwrap().compile().unwrap();
        matches!(s.matches(doc, &mut None).unwrap(), Match::Yes)
    }

    #[test]
    fn jsonpath_filters_apply_to_the_attributes_object_as_dolma_does() {
        let doc = json!({"attributes": {"x": [[0, 10, 0.3]], "y": [[0, 10, 0.9]]}});
        assert!(keep(
            "$.attributes[?(@.x[0][2] < 0.5)]",
            Syntax::JsonPath,
            &doc
        ));
        assert!(!keep(
            "$.attributes[?(@.y[0][2] < 0.5)]",
            Syntax::JsonPath,
            &doc
        ));
        // dolma's guard form for possibly missing keys (#50)
        let guard = "$@.attributes[?(@.value1 && @.value1[0] && @.value1[0][2] >= 1.0)]";
        assert!(keep(
            guard,
            Syntax::JsonPath,
            &json!({"attributes": {"value1": [[0, 30, 1.0]]}})
        ));
        assert!(!keep(
            guard,
            Syntax::JsonPath,
            &json!({"attributes": {"value1": [[0, 30, 0.5]]}})
        ));
        assert!(keep("$.id", Syntax::JsonPath, &json!({"id": "a"})));
        assert!(!keep("$.nope", Syntax::JsonPath, &json!({"id": "a"})));
        assert!(keep("$..foo", Syntax::JsonPath, &json!({"foo": "bar"})));
    }

    #[test]
    fn jq_truthiness_follows_dolma() {
        let doc = json!({"attributes": {"foo": [1.0, 2.0, 3.0], "z": 0, "s": "", "e": []}, "text": "abcd"});
        assert!(keep(".attributes.foo | add >= 6", Syntax::Jq, &doc));
        assert!(!keep(".attributes.foo | add >= 7", Syntax::Jq, &doc));
        assert!(keep(".attributes.foo | length >= 3", Syntax::Jq, &doc));
        assert!(!keep(".attributes.z", Syntax::Jq, &doc));
        assert!(!keep(".attributes.s", Syntax::Jq, &doc));
        assert!(!keep(".attributes.e", Syntax::Jq, &doc));
        assert!(!keep(".attributes.missing", Syntax::Jq, &doc));
        assert!(!keep("empty", Syntax::Jq, &doc));
        // all outputs must be truthy
        assert!(!keep(".attributes.foo[] | . > 1", Syntax::Jq, &doc));
        assert!(keep(
            "(.attributes.foo | map(. * 2) | add) / (.text | length) <= 3",
            Syntax::Jq,
            &doc
        ));
    }

    #[test]
    fn jq_runtime_errors_are_reported_not_matched() {
        let s = SelectorSpec::new(".text | keys", Syntax::Jq)
            .unwrap()
            .compile()
            .unwrap();
        assert!(matches!(
            s.matches(&json!({"text": "x"}), &mut None).unwrap(),
            Match::Error(_)
        ));
    }

    #[test]
    fn malformed_expressions_fail_to_compile() {
        assert!(SelectorSpec::new(".x | sum(", Syntax::Jq).is_err());
        assert!(SelectorSpec::new(".x | nosuchfunction", Syntax::Jq).is_err());
        assert!(SelectorSpec::new("$.attributes[?(@.x <", Syntax::JsonPath).is_err());
        assert!(Syntax::parse(Some("xpath")).is_err());
    }

    #[test]
    fn values_for_span_replacement() {
        let doc = json!({"attributes": {"pii": [[0, 3, 1.0], [5, 6, 0.2]]}});
        let s = SelectorSpec::new("$.attributes.pii", Syntax::JsonPath)
            .unwrap()
            .compile()
            .unwrap();
        assert_eq!(
            s.values(&doc, &mut None).unwrap(),
            vec![json!([[0, 3, 1.0], [5, 6, 0.2]])]
        );
        let s = SelectorSpec::new(".attributes.pii", Syntax::Jq)
            .unwrap()
            .compile()
            .unwrap();
        assert_eq!(
            s.values(&doc, &mut None).unwrap(),
            vec![json!([[0, 3, 1.0], [5, 6, 0.2]])]
        );
        let s = SelectorSpec::new("$.attributes.none", Syntax::JsonPath)
            .unwrap()
            .compile()
            .unwrap();
        assert!(s.values(&doc, &mut None).unwrap().is_empty());
    }
}
