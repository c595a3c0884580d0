//! OmegaConf's interpolations, which OLMo's configs use and its loader resolves:
//! `${run_name}` and `${device_train_microbatch_size}` name other fields (from the top, or
//! relative with leading dots: `${.sibling}`, `${..uncle}`), `${oc.env:VAR}` and
//! `${oc.env:VAR,default}` read the environment, and OLMo's own resolvers find files:
//! `${path.glob:a/*.npy,b/*.npy}` (a sorted list, each pattern matching something),
//! `${path.choose:a,b}` (the first that exists) and `${path.last_checkpoint:run}` (its newest
//! step folder). A value that is one interpolation takes the type of what it names (a number
//! stays a number, a section stays a section); one inside text is spliced in as text.
//! `\${` is a literal `${`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Whether a config's text may hold interpolations (comments included: a false alarm costs
/// only a re-serialised config).
pub fn present(text: &str) -> bool {
    text.contains("${")
}

/// Resolves every interpolation in the tree, each against the tree as written, so the order
/// fields are visited in does not matter.
pub fn resolve(root: &mut Value) -> Result<()> {
    *root = Resolver { root: &*root }.node(&[], &mut Vec::new())?;
    Ok(())
}

fn node<'a>(mut v: &'a Value, path: &[String]) -> Option<&'a Value> {
    for part in path {
        v = match v {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// A piece of a string value: text as it stands, or the inside of a `${...}`.
#[derive(Debug, PartialEq)]
enum Piece {
    Text(String),
    Interpolation(String),
}

/// Splits a string into text and interpolations, `${...}` nesting allowed.
fn pieces(s: &str) -> Result<Vec<Piece>> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("\\${") {
            text.push_str("${");
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let mut depth = 1;
            let mut end = None;
            let bytes = r.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                // bytes, not chars: `$`, `{` and `}` never occur inside a multi-byte one
                if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'{') {
                    depth += 1;
                    i += 2;
                    continue;
                }
                if bytes[i] == b'}' {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                i += 1;
            }
            let end = end.ok_or_else(|| anyhow!("`{s}`: a `${{` without its `}}`"))?;
            if !text.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut text)));
            }
            out.push(Piece::Interpolation(r[..end].to_string()));
            rest = &r[end + 1..];
        } else {
            let c = rest.chars().next().expect("not empty");
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

struct Resolver<'a> {
    root: &'a Value,
}

impl Resolver<'_> {
    /// The resolved value of the node at `path`; `stack` holds the nodes being resolved, to
    /// name a cycle rather than recurse forever.
    fn node(&self, path: &[String], stack: &mut Vec<Vec<String>>) -> Result<Value> {
        if let Some(i) = stack.iter().position(|p| p == path) {
            let mut cycle: Vec<String> = stack[i..].iter().map(|p| p.join(".")).collect();
            cycle.push(path.join("."));
            bail!(
                "the interpolations go round in a circle: {}",
                cycle.join(" -> ")
            );
        }
        let v = node(self.root, path).ok_or_else(|| {
            anyhow!(
                "`{}` is not in the config (OLMo would take its default there: set it)",
                path.join(".")
            )
        })?;
        stack.push(path.to_vec());
        let out = match v {
            Value::String(s) if s.contains("${") => self
                .string(s, path, stack)
                .with_context(|| format!("field `{}`", path.join("."))),
            Value::Array(items) => (0..items.len())
                .map(|i| self.node(&[path, &[i.to_string()]].concat(), stack))
                .collect::<Result<Vec<_>>>()
                .map(Value::Array),
            Value::Object(map) => map
                .keys()
                .map(|k| {
                    Ok((
                        k.clone(),
                        self.node(&[path, std::slice::from_ref(k)].concat(), stack)?,
                    ))
                })
                .collect::<Result<serde_json::Map<_, _>>>()
                .map(Value::Object),
            other => Ok(other.clone()),
        };
        stack.pop();
        out
    }

    /// A string value at `here`: one interpolation keeps its value's type, more pieces are
    /// joined as text.
    fn string(&self, s: &str, here: &[String], stack: &mut Vec<Vec<String>>) -> Result<Value> {
        let pieces = pieces(s)?;
        if let [Piece::Interpolation(inner)] = pieces.as_slice() {
            return self.interpolation(inner, here, stack);
        }
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Text(t) => out.push_str(&t),
                Piece::Interpolation(inner) => {
                    out.push_str(&as_text(&self.interpolation(&inner, here, stack)?, &inner)?)
                }
            }
        }
        Ok(Value::String(out))
    }

    fn interpolation(
        &self,
        inner: &str,
        here: &[String],
        stack: &mut Vec<Vec<String>>,
    ) -> Result<Value> {
        // a nested one first: `${oc.env:DATA,${save_folder}}`
        let inner = if inner.contains("${") {
            as_text(&self.string(inner, here, stack)?, inner)?
        } else {
            inner.to_string()
        };
        let inner = inner.trim();
        match inner.split_once(':') {
            Some((name, args)) => resolver(name.trim(), args),
            None => self.node(&reference(inner, here)?, stack),
        }
    }
}

/// The path a `${...}` names from the node at `here`: dotted from the top, or with leading
/// dots from `here`'s section (one dot), its parent's (two), and so on.
fn reference(inner: &str, here: &[String]) -> Result<Vec<String>> {
    let rest = inner.trim_start_matches('.');
    let dots = inner.len() - rest.len();
    let base = match dots {
        0 => &here[..0],
        d if d <= here.len() => &here[..here.len() - d],
        _ => bail!("`${{{inner}}}` goes up past the top of the config"),
    };
    let mut path = base.to_vec();
    if !rest.is_empty() {
        // spelled as a command-line override's key (`a.b[0]`)
        path.extend(crate::config::key_path(rest).with_context(|| format!("`${{{inner}}}`"))?);
    }
    Ok(path)
}

/// A resolved value spliced into text.
fn as_text(v: &Value, inner: &str) -> Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "None".to_string(),
        _ => bail!("`${{{inner}}}` is a list or a section, which cannot be part of a text"),
    })
}

/// `a, 'b,c', d` → [a, b,c, d]: OmegaConf's arguments, quotes taken off.
fn arguments(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    for c in args.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ',') => out.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    out.push(cur.trim().to_string());
    out
}

fn resolver(name: &str, args: &str) -> Result<Value> {
    let args = arguments(args);
    match name {
        "oc.env" => {
            let var = &args[0];
            match (std::env::var(var), args.get(1)) {
                (Ok(v), _) => Ok(Value::String(v)),
                (Err(_), Some(d)) if d == "null" => Ok(Value::Null),
                (Err(_), Some(d)) => Ok(Value::String(d.clone())),
                (Err(e), None) => bail!("`${{oc.env:{var}}}`: {e} (and no default after a comma)"),
            }
        }
        "path.glob" => Ok(Value::Array(
            crate::data::expand_globs(&args, "`${path.glob:...}` pattern")?
                .into_iter()
                .map(|p| Value::String(p.display().to_string()))
                .collect(),
        )),
        "path.choose" => args
            .iter()
            .find(|p| Path::new(p).exists())
            .map(|p| Value::String(p.clone()))
            .ok_or_else(|| anyhow!("`${{path.choose:...}}`: none of {} exists", args.join(", "))),
        "path.last_checkpoint" => {
            let folder = Path::new(&args[0]);
            match crate::checkpoint::latest(folder)? {
                Some(dir) => Ok(Value::String(dir.display().to_string())),
                None => bail!(
                    "`${{path.last_checkpoint:{}}}`: no step folder in it",
                    folder.display()
                ),
            }
        }
        _ => bail!(
            "resolver `{name}` is not one of those OLMo's configs use (oc.env, path.glob, path.choose, path.last_checkpoint)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(yaml: &str) -> Result<Value> {
        let mut v: Value = serde_saphyr::from_str(yaml).map_err(|e| anyhow!("{e}"))?;
        resolve(&mut v)?;
        Ok(v)
    }

    fn err(yaml: &str) -> String {
        format!("{:#}", resolved(yaml).unwrap_err())
    }

    #[test]
    fn fields_keep_their_type_and_splice_into_text() {
        let v = resolved(
            "run_name: r7\nsave_folder: runs/${run_name}/ckpt\ndevice_train_microbatch_size: 4\n\
             device_eval_batch_size: ${device_train_microbatch_size}\nwandb:\n  name: ${run_name}\n  \
             group: ${.name}-g\n  size: ${..device_eval_batch_size}\nlist: [a, '${run_name}']\n\
             first: ${list[1]}\nmodel: {d_model: 8}\ncopy: ${model}\nliteral: \\${run_name}\n\
             nested: ${wandb.group}\nunicode: é${run_name}ü\n",
        )
        .unwrap();
        assert_eq!(v["save_folder"], "runs/r7/ckpt");
        assert_eq!(v["device_eval_batch_size"], 4);
        assert_eq!(v["wandb"]["name"], "r7");
        assert_eq!(v["wandb"]["group"], "r7-g");
        assert_eq!(v["wandb"]["size"], 4);
        assert_eq!(v["list"][1], "r7");
        assert_eq!(v["first"], "r7");
        assert_eq!(v["copy"]["d_model"], 8);
        assert_eq!(v["literal"], "${run_name}");
        // through another interpolation
        assert_eq!(v["nested"], "r7-g");
        assert_eq!(v["unicode"], "ér7ü");
    }

    #[test]
    fn environment_and_files() {
        // PATH: set in any environment tests run in (setting one would race other tests)
        let path = std::env::var("PATH").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for f in ["b.npy", "a.npy", "c.txt"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("run/step20")).unwrap();
        std::fs::create_dir_all(dir.path().join("run/step100")).unwrap();
        let v = resolved(&format!(
            "a: ${{oc.env:PATH}}/x.npy\n\
             b: ${{oc.env:OLMO_TRAIN_NOT_SET_ANYWHERE,'fall,back'}}\n\
             c: ${{oc.env:OLMO_TRAIN_NOT_SET_ANYWHERE,null}}\n\
             paths: ${{path.glob:{d}/*.npy,{d}/*.txt}}\n\
             choose: ${{path.choose:{d}/nothing,{d}/c.txt}}\n\
             load_path: ${{path.last_checkpoint:{d}/run}}\n"
        ))
        .unwrap();
        assert_eq!(v["a"], format!("{path}/x.npy"));
        assert_eq!(v["b"], "fall,back");
        assert_eq!(v["c"], Value::Null);
        let p = |f: &str| Value::String(format!("{d}/{f}"));
        assert_eq!(
            v["paths"],
            Value::Array(vec![p("a.npy"), p("b.npy"), p("c.txt")])
        );
        assert_eq!(v["choose"], p("c.txt"));
        assert_eq!(v["load_path"], p("run/step100"));
        assert!(err(&format!("p: ${{path.glob:{d}/*.bin}}")).contains("matched no file"));
    }

    #[test]
    fn mistakes_are_named() {
        for (yaml, want) in [
            (
                "a: ${b}\n",
                "field `a`: `b` is not in the config (OLMo would take its default there: set it)",
            ),
            ("a: ${b}\nb: ${a}\n", "go round in a circle: a -> b -> a"),
            ("a: x${b\nb: 1\n", "a `${` without its `}`"),
            (
                "a: ${oc.env:OLMO_TRAIN_NOT_SET_ANYWHERE}\n",
                "no default after a comma",
            ),
            ("a: ${now:}\n", "resolver `now` is not one of those"),
            ("a: x-${m}\nm: {k: 1}\n", "cannot be part of a text"),
            ("a: ${...b}\n", "goes up past the top"),
            ("a: ${b..c}\nb: 1\n", "`${b..c}`: `b..c` has an empty part"),
            (
                "a: é${b}ü\nb: ${c\n",
                "field `a`: field `b`: `${c`: a `${` without its `}`",
            ),
        ] {
            let e = err(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }
}
