//! Configuration: dolma's YAML/JSON config files plus `--dotted.key value` command-line
//! overrides (defaults <- file <- command line), with OmegaConf's `${oc.env:VAR[,default]}`
//! and dolma's `${d.processes:n}` resolvers.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// Parses a YAML (or JSON, which is YAML) config file into a JSON value.
pub fn read_config_file(path: &Path) -> Result<Value> {
    let text = crate::io::read_to_string(path)?;
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    let value: Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON config", path.display()))?
    } else {
        serde_saphyr::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid YAML config: {e}", path.display()))?
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Null => Ok(Value::Object(Map::new())),
        other => bail!(
            "{}: a config must be a mapping of fields, got {other}",
            path.display()
        ),
    }
}

/// A command-line value, typed like a YAML scalar.
fn scalar(s: &str) -> Value {
    match s {
        "true" | "True" => return Value::Bool(true),
        "false" | "False" => return Value::Bool(false),
        "null" | "None" | "~" => return Value::Null,
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::from(i);
    }
    if s.contains(['.', 'e', 'E']) && !s.contains('/') {
        if let Ok(f) = s.parse::<f64>() {
            if f.is_finite() {
                return Value::from(f);
            }
        }
    }
    Value::String(s.to_string())
}

/// Sets `a.b.c` in `root`, creating mappings on the way.
pub fn set_dotted(root: &mut Value, key: &str, value: Value) -> Result<()> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            bail!("invalid option name `--{key}`");
        }
        let obj = match cur {
            Value::Object(m) => m,
            _ => bail!(
                "cannot set `--{key}`: `{}` is not a mapping",
                parts[..i].join(".")
            ),
        };
        if i + 1 == parts.len() {
            obj.insert(part.to_string(), value);
            return Ok(());
        }
        cur = obj
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if cur.is_null() {
            *cur = Value::Object(Map::new());
        }
    }
    unreachable!("loop returns on the last part")
}

/// Applies `--key value [value ...]`, `--key=value`, `--flag` and `--no-flag` overrides.
/// Dashes in names become underscores (`--skip-bad-lines` sets `skip_bad_lines`).
pub fn apply_overrides(root: &mut Value, args: &[String]) -> Result<()> {
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(name) = arg.strip_prefix("--") else {
            bail!("unexpected argument `{arg}`: options look like `--field value` (see --help)");
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        let key = name.replace('-', "_");
        i += 1;
        let mut values: Vec<String> = Vec::new();
        if let Some(v) = inline {
            values.push(v);
        } else {
            while i < args.len() && !(args[i].starts_with("--") && args[i].len() > 2) {
                values.push(args[i].clone());
                i += 1;
            }
        }
        let value = match values.len() {
            0 => match key.strip_prefix("no_") {
                Some(positive) => {
                    set_dotted(root, positive, Value::Bool(false))?;
                    continue;
                }
                None => Value::Bool(true),
            },
            1 => scalar(&values[0]),
            _ => Value::Array(values.iter().map(|v| scalar(v)).collect()),
        };
        set_dotted(root, &key, value)?;
    }
    Ok(())
}

/// Resolves `${oc.env:VAR}`, `${oc.env:VAR,default}` and dolma's `${d.processes:n}`,
/// `${d.glob:pattern}` (a whole value only: the sorted list of matches, at least one),
/// `${d.unescape:text}` and `${d.cache:path}` (local paths only) in every string.
pub fn resolve_interpolations(v: &mut Value) -> Result<()> {
    match v {
        Value::String(s) if s.starts_with("${d.glob:") && s.ends_with('}') => {
            let pattern = &s["${d.glob:".len()..s.len() - 1];
            let mut matched: Vec<String> = glob::glob(pattern)
                .map_err(|e| anyhow!("`{s}`: bad pattern: {e}"))?
                .filter_map(|p| p.ok())
                .map(|p| p.display().to_string())
                .collect();
            if matched.is_empty() {
                bail!("`{s}`: {pattern} matches no file");
            }
            matched.sort();
            *v = Value::Array(matched.into_iter().map(Value::String).collect());
        }
        Value::String(s) if s.contains("${") => {
            let resolved = resolve_string(s)?;
            *v = if resolved.1 {
                scalar(&resolved.0)
            } else {
                Value::String(resolved.0)
            };
        }
        Value::Array(a) => a.iter_mut().try_for_each(resolve_interpolations)?,
        Value::Object(m) => m.values_mut().try_for_each(resolve_interpolations)?,
        _ => {}
    }
    Ok(())
}

/// Returns the string and whether it was a single interpolation (then typed like a scalar).
fn resolve_string(s: &str) -> Result<(String, bool)> {
    let mut out = String::new();
    let mut rest = s;
    let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find('}')
            .ok_or_else(|| anyhow!("unterminated interpolation in `{s}`"))?;
        let expr = &rest[i + 2..i + end];
        let (resolver, arg) = expr.split_once(':').unwrap_or((expr, ""));
        match resolver {
            "oc.env" => {
                let (var, default) = match arg.split_once(',') {
                    Some((v, d)) => (v.trim(), Some(d.trim())),
                    None => (arg.trim(), None),
                };
                match (std::env::var(var), default) {
                    (Ok(val), _) => out.push_str(&val),
                    (Err(_), Some(d)) => out.push_str(d),
                    (Err(_), None) => bail!("`{s}`: environment variable {var} is not set"),
                }
            }
            "d.processes" => {
                let keep: usize = arg.trim().parse().unwrap_or(0);
                let n = std::thread::available_parallelism().map_or(1, |n| n.get());
                out.push_str(&n.saturating_sub(keep).max(1).to_string());
            }
            // dolma's: Python's unicode_escape (`\t`, `\n`, `\\`, ...)
            "d.unescape" => out.push_str(&unescape(arg).with_context(|| format!("`{s}`"))?),
            // dolma downloads a URL into a cache; a local path is its own cache
            "d.cache" if arg.contains("://") => bail!(
                "`{s}`: d.cache of a URL is not fetched here: download it and give the local path"
            ),
            "d.cache" => out.push_str(arg.trim()),
            "d.glob" => bail!("`{s}`: d.glob gives a list, so it must be the whole value"),
            field if !expr.contains(':') => bail!(
                "`{s}`: `${{{field}}}` refers to another field, which is not resolved here: write its value"
            ),
            other => bail!(
                "`{s}`: unsupported interpolation `{other}` (supported: oc.env, d.processes, d.glob, d.unescape, d.cache)"
            ),
        }
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok((out, whole))
}

/// Python's `unicode_escape` decoding of the escapes configs use.
fn unescape(s: &str) -> Result<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some('\'') => out.push('\''),
            Some('"') => out.push('"'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 2)
                    .ok_or_else(|| anyhow!("`\\x{hex}` needs two hex digits"))?;
                out.push(char::from_u32(code).expect("below 256"));
            }
            Some(other) => bail!("unknown escape `\\{other}`"),
            None => bail!("a lone `\\` at the end"),
        }
    }
    Ok(out)
}

/// Loads the config of one command: file, then overrides, then interpolation, then typed.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    overrides: &[String],
    command: &str,
) -> Result<T> {
    let mut root = match file {
        Some(p) => read_config_file(p)?,
        None => Value::Object(Map::new()),
    };
    apply_overrides(&mut root, overrides)?;
    resolve_interpolations(&mut root)?;
    let what = file.map_or_else(|| "command line".to_string(), |p| p.display().to_string());
    serde_json::from_value(root).map_err(|e| anyhow!("invalid `{command}` config ({what}): {e}"))
}

/// Accepts a single string (or number) where a list of strings is expected.
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    let v = Value::deserialize(d)?;
    let item = |v: &Value| -> std::result::Result<String, D::Error> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(serde::de::Error::custom(format!(
                "expected a string, got {other}"
            ))),
        }
    };
    match &v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a.iter().map(item).collect(),
        other => Ok(vec![item(other)?]),
    }
}

/// Like [`one_or_many`] but keeps "not given" distinct from an empty list.
pub fn opt_one_or_many<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<String>>, D::Error> {
    one_or_many(d).map(Some)
}

/// serde default for fields that are on unless turned off (`progress`).
pub fn yes() -> bool {
    true
}

/// A required string field that also accepts a number on the command line.
pub fn string<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    opt_string(d)?.ok_or_else(|| serde::de::Error::custom("expected a string, got null"))
}

/// A string field that also accepts a number on the command line (`--experiment 2024`).
pub fn opt_string<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(serde::de::Error::custom(format!(
            "expected a string, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn overrides_follow_dolma_cli() {
        let mut v = serde_json::json!({"processes": 1, "taggers": ["a"]});
        apply_overrides(
            &mut v,
            &args(&[
                "--taggers",
                "x",
                "y",
                "--processes=4",
                "--ignore-existing",
                "--no-debug",
                "--tagger_options.random_number_v1.seed",
                "7",
                "--skip-bad-lines",
                "--rate",
                "0.5",
            ]),
        )
        .unwrap();
        assert_eq!(v["taggers"], serde_json::json!(["x", "y"]));
        assert_eq!(v["processes"], 4);
        assert_eq!(v["ignore_existing"], true);
        assert_eq!(v["debug"], false);
        assert_eq!(v["skip_bad_lines"], true);
        assert_eq!(v["rate"], 0.5);
        assert_eq!(v["tagger_options"]["random_number_v1"]["seed"], 7);
        let err = apply_overrides(&mut v, &args(&["stray"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("stray"));
    }

    #[test]
    fn env_interpolation() {
        std::env::set_var("DOLMA_TEST_VAR", "/data");
        let mut v = serde_json::json!({"a": "${oc.env:DOLMA_TEST_VAR}/docs", "b": "${oc.env:NOPE_NOT_SET,3}"});
        resolve_interpolations(&mut v).unwrap();
        assert_eq!(v["a"], "/data/docs");
        assert_eq!(v["b"], 3);
        let mut v = serde_json::json!({"a": "${oc.env:NOPE_NOT_SET}"});
        assert!(resolve_interpolations(&mut v)
            .unwrap_err()
            .to_string()
            .contains("NOPE_NOT_SET"));
    }

    #[test]
    fn dolma_resolvers() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.json.gz", "a.json.gz", "c.txt"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let d = dir.path().display();
        let mut v = serde_json::json!({
            "documents": format!("${{d.glob:{d}/*.gz}}"),
            "sep": "${d.unescape:a\\tb\\n\\x41}",
            "model": "${d.cache:/models/lid.bin}",
        });
        resolve_interpolations(&mut v).unwrap();
        assert_eq!(
            v["documents"],
            serde_json::json!([format!("{d}/a.json.gz"), format!("{d}/b.json.gz")])
        );
        assert_eq!(v["sep"], "a\tb\nA");
        assert_eq!(v["model"], "/models/lid.bin");
        for (bad, want) in [
            (format!("${{d.glob:{d}/*.zst}}"), "matches no file"),
            (format!("x ${{d.glob:{d}/*.gz}}"), "must be the whole value"),
            ("${d.cache:s3://b/lid.bin}".to_string(), "not fetched here"),
            ("${d.unescape:a\\q}".to_string(), "unknown escape"),
            (
                "${d.nope:x}".to_string(),
                "unsupported interpolation `d.nope`",
            ),
            ("${work_dir}/x".to_string(), "refers to another field"),
        ] {
            let err = resolve_interpolations(&mut serde_json::json!({ "a": bad })).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{bad}: {err:#}");
        }
    }

    #[test]
    fn yaml_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(
            &p,
            "documents:\n  - a/documents/*.gz\nprocesses: 2\ntaggers: [x]\n",
        )
        .unwrap();
        let v = read_config_file(&p).unwrap();
        assert_eq!(v["processes"], 2);
        assert_eq!(v["documents"][0], "a/documents/*.gz");
        std::fs::write(&p, "documents: [a\n").unwrap();
        assert!(read_config_file(&p)
            .unwrap_err()
            .to_string()
            .contains("c.yaml"));
    }
}
