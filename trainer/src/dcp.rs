//! Folders `torch.distributed.checkpoint` writes (OLMo's sharded checkpoints keep the model
//! and optimizer in one, `step{N}/model_and_optim/`): a pickled `.metadata` naming, for each
//! flattened state-dict key, the chunks of the tensor each rank saved (offsets and sizes in
//! the whole tensor) and where each lies (`__{rank}_{n}.distcp`, a byte range holding a
//! `torch.save` archive of the chunk). A tensor is put back together from its chunks whatever
//! the number of ranks that wrote it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::pickle::{self, Value};
use crate::torch_file::{row_major_strides, TorchFile};

/// A byte range of one data file: one saved item.
#[derive(Debug, Clone)]
struct Place {
    file: String,
    at: u64,
    len: u64,
}

#[derive(Debug, Clone)]
struct Chunk {
    offsets: Vec<usize>,
    sizes: Vec<usize>,
    place: Place,
}

#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub size: Vec<usize>,
    chunks: Vec<Chunk>,
}

pub struct Dcp {
    dir: PathBuf,
    pub tensors: HashMap<String, TensorMeta>,
    /// Items saved as pickled objects (numbers, lists) rather than tensors.
    bytes: HashMap<String, Place>,
}

impl Dcp {
    pub fn open(dir: &Path) -> Result<Dcp> {
        let path = dir.join(".metadata");
        let data =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let at = |what: String| anyhow!("{}: {what}", path.display());
        let root = pickle::load(
            &data,
            &mut |pid| bail!("a persistent id ({}) in metadata", pid.kind()),
            &|_, _, _| Ok(None),
        )
        .with_context(|| path.display().to_string())?;
        let field = |v: &Value, name: &str| {
            v.attr(name)
                .ok_or_else(|| at(format!("no `{name}` in {}", v.kind())))
        };
        let mut places: HashMap<(String, Option<Vec<usize>>), Place> = HashMap::new();
        for (k, v) in field(&root, "storage_data")?.entries() {
            let fqn = field(&k, "fqn")?;
            let fqn = fqn
                .as_str()
                .ok_or_else(|| at(format!("a storage key named by {}", fqn.kind())))?;
            let offset = k.attr("offset").and_then(|o| o.usizes());
            let file = field(&v, "relative_path")?;
            let place = Place {
                file: file
                    .as_str()
                    .ok_or_else(|| at(format!("`{fqn}`'s file is {}", file.kind())))?
                    .to_string(),
                at: field(&v, "offset")?.as_int().unwrap_or(-1) as u64,
                len: field(&v, "length")?.as_int().unwrap_or(-1) as u64,
            };
            if place.file.contains('/') || place.file.starts_with('.') {
                bail!(at(format!(
                    "`{fqn}` lies in {:?}, outside the folder",
                    place.file
                )));
            }
            places.insert((fqn.to_string(), offset), place);
        }
        let mut tensors = HashMap::new();
        let mut bytes = HashMap::new();
        for (k, v) in field(&root, "state_dict_metadata")?.entries() {
            let fqn = k
                .as_str()
                .ok_or_else(|| at(format!("a key that is {}", k.kind())))?
                .to_string();
            let Some(chunks) = v.attr("chunks") else {
                // BytesStorageMetadata: an object saved whole
                let place = places
                    .remove(&(fqn.clone(), None))
                    .ok_or_else(|| at(format!("no storage for `{fqn}`")))?;
                bytes.insert(fqn, place);
                continue;
            };
            let size = field(&v, "size")?
                .usizes()
                .ok_or_else(|| at(format!("`{fqn}` has no size")))?;
            let mut list = Vec::new();
            for c in chunks.items().unwrap_or_default() {
                let (Some(offsets), Some(sizes)) = (
                    c.attr("offsets").and_then(|o| o.usizes()),
                    c.attr("sizes").and_then(|o| o.usizes()),
                ) else {
                    bail!(at(format!("a chunk of `{fqn}` without offsets and sizes")));
                };
                let fits = offsets.len() == size.len()
                    && sizes.len() == size.len()
                    && (0..size.len()).all(|d| {
                        offsets[d]
                            .checked_add(sizes[d])
                            .is_some_and(|e| e <= size[d])
                    });
                if !fits {
                    bail!(at(format!(
                        "a chunk of `{fqn}` at {offsets:?} of {sizes:?} lies outside its size {size:?}"
                    )));
                }
                let place = places
                    .get(&(fqn.clone(), Some(offsets.clone())))
                    .cloned()
                    .ok_or_else(|| at(format!("no storage for `{fqn}` at {offsets:?}")))?;
                list.push(Chunk {
                    offsets,
                    sizes,
                    place,
                });
            }
            let count = |dims: &[usize]| dims.iter().try_fold(1usize, |a, &n| a.checked_mul(n));
            let covered = list
                .iter()
                .try_fold(0usize, |a, c| a.checked_add(count(&c.sizes)?));
            let numel = count(&size);
            let stored = list.iter().fold(0u64, |a, c| a.saturating_add(c.place.len));
            let (Some(covered), Some(numel)) = (covered, numel) else {
                bail!(at(format!("`{fqn}`: sizes that overflow")));
            };
            // each element takes at least a byte of the data files
            if (numel as u64) > stored {
                bail!(at(format!(
                    "`{fqn}` has {numel} elements, its chunks {stored} bytes"
                )));
            }
            if covered != numel {
                bail!(at(format!(
                    "the chunks of `{fqn}` hold {covered} of its {numel} elements (a checkpoint of some ranks only?)"
                )));
            }
            tensors.insert(fqn, TensorMeta { size, chunks: list });
        }
        Ok(Dcp {
            dir: dir.to_path_buf(),
            tensors,
            bytes,
        })
    }

    fn item(&self, p: &Place) -> Result<(TorchFile, Value)> {
        TorchFile::open_part(&self.dir.join(&p.file), Some((p.at, p.len)))
    }

    /// A tensor, put together from its chunks, as f32 in row-major order.
    pub fn f32s(&self, fqn: &str) -> Result<Vec<f32>> {
        let meta = self
            .tensors
            .get(fqn)
            .ok_or_else(|| anyhow!("{}: no tensor `{fqn}`", self.dir.display()))?;
        let size = &meta.size;
        let mut out = vec![0.0f32; size.iter().product()];
        // elements per step along each dimension of the whole tensor
        let stride = row_major_strides(size);
        for c in &meta.chunks {
            let (f, root) = self.item(&c.place)?;
            let t = match &root {
                Value::Tensor(t) => t,
                other => bail!(
                    "{}: `{fqn}`'s chunk is {}, not a tensor",
                    self.dir.display(),
                    other.kind()
                ),
            };
            if t.shape != c.sizes {
                bail!(
                    "{}: `{fqn}`'s chunk at {:?} is {:?}, the metadata says {:?}",
                    self.dir.display(),
                    c.offsets,
                    t.shape,
                    c.sizes
                );
            }
            let data = f.f32s(t)?;
            // copy the chunk's rows (runs along the last dimension) into place
            let run = c.sizes.last().copied().unwrap_or(1);
            if run == 0 {
                continue;
            }
            let mut idx = vec![0usize; c.sizes.len().saturating_sub(1)];
            for row in data.chunks(run) {
                let start: usize = (0..c.sizes.len())
                    .map(|d| (c.offsets[d] + idx.get(d).copied().unwrap_or(0)) * stride[d])
                    .sum();
                out[start..start + run].copy_from_slice(row);
                for d in (0..idx.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < c.sizes[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
        }
        Ok(out)
    }

    /// An item saved whole (a number, a list), unpickled.
    pub fn object(&self, fqn: &str) -> Option<Result<Value>> {
        let p = self.bytes.get(fqn)?;
        Some(self.item(p).map(|(_, root)| root))
    }

    /// The keys of items saved whole.
    pub fn object_names(&self) -> impl Iterator<Item = &str> {
        self.bytes.keys().map(String::as_str)
    }
}
