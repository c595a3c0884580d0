//! OLMo's safetensors form of its unsharded checkpoint files (`unshard.py --safe-tensors`
//! writes `model.safetensors` and `optim.safetensors` so): a nested state dict flattened, each
//! key the URL-safe base64 of a pickled `(keys, value_is_pickled)` naming the value's path in
//! the dict, and a value that is not a tensor (a param group, a number) stored as a uint8
//! tensor of its pickle. Read back into the same tree `torch.load` would give.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;

use crate::pickle::{self, Value};
use crate::torch_file::{Dtype, TensorRef};

pub struct StFile {
    path: PathBuf,
    file: File,
    /// Where each tensor's bytes lie in the file.
    places: HashMap<String, (u64, u64)>,
    pub root: Value,
}

/// A key path for a message: `state/transformer.wte.weight/exp_avg`.
fn shown(keys: &[Value]) -> String {
    keys.iter()
        .map(|k| k.as_str().map_or_else(|| k.brief(), String::from))
        .collect::<Vec<_>>()
        .join("/")
}

/// A key of OLMo's encoding: `(keys, value_is_pickled)`.
fn decode(key: &str) -> Option<(Vec<Value>, bool)> {
    let bytes = base64::engine::general_purpose::URL_SAFE.decode(key).ok()?;
    let v = pickle::load(&bytes, &mut |_| bail!("a persistent id"), &|_, _, _| {
        Ok(None)
    })
    .ok()?;
    match v.items()?.as_slice() {
        [keys, Value::Bool(pickled)] => Some((keys.items()?, *pickled)),
        _ => None,
    }
}

/// Whether `path` is a safetensors file in OLMo's encoding (not one of ours, keyed by name).
pub fn is_encoded(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    let Ok((map, _)) = crate::checkpoint::safetensors_header(&file, path) else {
        return false;
    };
    map.keys()
        .find(|k| *k != "__metadata__")
        .is_some_and(|k| decode(k).is_some())
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

/// Puts `leaf` at `path` in the nested dicts under `root`, making the dicts on the way.
fn insert(root: &Value, path: &[Value], leaf: Value) -> Result<()> {
    let Value::Dict(d) = root else {
        bail!("a value where a dict is expected");
    };
    let (first, rest) = path
        .split_first()
        .ok_or_else(|| anyhow!("an empty key path"))?;
    if rest.is_empty() {
        d.borrow_mut().push((first.clone(), leaf));
        return Ok(());
    }
    let found = d
        .borrow()
        .iter()
        .find(|(k, _)| same(k, first))
        .map(|(_, v)| v.clone());
    let child = match found {
        Some(c) => c,
        None => {
            let c = Value::dict(Vec::new());
            d.borrow_mut().push((first.clone(), c.clone()));
            c
        }
    };
    insert(&child, rest, leaf)
}

fn dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "F64" => Dtype::F64,
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I64" => Dtype::I64,
        "I32" => Dtype::I32,
        "I16" => Dtype::I16,
        "I8" => Dtype::I8,
        "U8" => Dtype::U8,
        "BOOL" => Dtype::Bool,
        _ => return None,
    })
}

impl StFile {
    pub fn open(path: &Path) -> Result<StFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let (map, start) = crate::checkpoint::safetensors_header(&file, path)?;
        let size = file.metadata()?.len();
        let at = |what: String| anyhow!("{}: {what}", path.display());
        let mut places = HashMap::new();
        let root = Value::dict(Vec::new());
        // in file order, so that dicts keep the order they were written in
        let mut entries: Vec<(&String, &serde_json::Value)> =
            map.iter().filter(|(k, _)| *k != "__metadata__").collect();
        entries.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64());
        for (key, meta) in entries {
            let (keys, pickled) =
                decode(key).ok_or_else(|| at(format!("key {key:?} is not OLMo's encoding")))?;
            let (Some(dt), Some(shape), Some([from, to])) = (
                meta["dtype"].as_str().and_then(dtype),
                meta["shape"].as_array().and_then(|s| {
                    s.iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<Vec<_>>>()
                }),
                meta["data_offsets"]
                    .as_array()
                    .and_then(|o| o.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
                    .and_then(|o| <[u64; 2]>::try_from(o).ok()),
            ) else {
                bail!(at(format!(
                    "{}: a header entry without dtype, shape and offsets",
                    shown(&keys)
                )));
            };
            let (from, to) = (start.saturating_add(from), start.saturating_add(to));
            let bytes = shape
                .iter()
                .try_fold(dt.size(), |a, &n| a.checked_mul(n))
                .unwrap_or(usize::MAX);
            let numel = bytes / dt.size();
            if from > to || to > size || to - from != bytes as u64 {
                bail!(at(format!(
                    "{}: bytes {from}..{to} do not hold {numel} {dt:?} values within the file (a truncated file?)",
                    shown(&keys)
                )));
            }
            let leaf = if pickled {
                let mut bytes = vec![0u8; (to - from) as usize];
                file.read_exact_at(&mut bytes, from)?;
                pickle::load(&bytes, &mut |_| bail!("a persistent id"), &|_, _, _| {
                    Ok(None)
                })
                .map_err(|e| at(format!("{}: {e}", shown(&keys))))?
            } else {
                places.insert(key.clone(), (from, to));
                Value::Tensor(TensorRef::whole(dt, key, &shape))
            };
            insert(&root, &keys, leaf).map_err(|e| at(format!("{}: {e}", shown(&keys))))?;
        }
        Ok(StFile {
            path: path.to_path_buf(),
            file,
            places,
            root,
        })
    }

    fn bytes(&self, t: &TensorRef) -> Result<Vec<u8>> {
        let &(from, to) = self
            .places
            .get(&t.storage.key)
            .ok_or_else(|| anyhow!("{}: no such tensor", self.path.display()))?;
        let mut b = vec![0u8; (to - from) as usize];
        self.file
            .read_exact_at(&mut b, from)
            .with_context(|| self.path.display().to_string())?;
        Ok(b)
    }

    pub fn f32s(&self, t: &TensorRef) -> Result<Vec<f32>> {
        let dt = t.storage.dtype;
        if !matches!(dt, Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64) {
            bail!(
                "{}: a {dt:?} tensor where floating point is expected",
                self.path.display()
            );
        }
        Ok(self
            .bytes(t)?
            .chunks_exact(dt.size())
            .map(|c| dt.value(c) as f32)
            .collect())
    }

    pub fn scalar(&self, t: &TensorRef) -> Result<f64> {
        match self
            .bytes(t)?
            .chunks_exact(t.storage.dtype.size())
            .collect::<Vec<_>>()
            .as_slice()
        {
            [one] => Ok(t.storage.dtype.value(one)),
            v => bail!(
                "{}: a tensor of {} values where one is expected",
                self.path.display(),
                v.len()
            ),
        }
    }
}
