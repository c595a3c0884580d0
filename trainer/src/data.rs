//! Training data as OLMo reads it: dolma token shards cut into `seq_len` windows, in a global
//! order given by NumPy's PCG64 permutation.
//!
//! Each `.npy` file (raw little-endian tokens, no header) gives `len / seq_len` windows, the
//! tail dropped; windows run across document boundaries. Instance ids number the windows of
//! all files in config order. Epoch `e` uses `permutation(N, seed + e)`, padded with its own head
//! to a multiple of the world size (or truncated with `drop_last`), and rank `r` reads every
//! `world`-th entry. Global step `k` is `order[k*B .. (k+1)*B]` for a global batch of `B`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::permutation::permutation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    pub fn parse(s: &str) -> Result<Dtype> {
        match s {
            "uint16" => Ok(Dtype::U16),
            "uint32" => Ok(Dtype::U32),
            other => bail!("memmap_dtype `{other}` is not supported (uint16 or uint32)"),
        }
    }
    pub fn width(self) -> u64 {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ShardFile {
    pub path: PathBuf,
    pub tokens: u64,
    /// Index of this file's first window among all instances.
    pub first_instance: u64,
    pub instances: u64,
    /// OLMo's label mask: a NumPy bool memmap, one byte per token (`data.label_mask_paths`).
    pub label_mask: Option<PathBuf>,
}

/// Expands `data.paths` entries (globs allowed), each sorted; an entry matching nothing is an
/// error.
pub fn expand_paths(patterns: &[String]) -> Result<Vec<PathBuf>> {
    expand_globs(patterns, "data.paths entry")
}

/// Expands glob patterns, each one's matches sorted; `what` names a pattern in errors (one
/// that is a URL, or matches nothing).
pub fn expand_globs(patterns: &[String], what: &str) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for p in patterns {
        remote_refused(p, what)?;
        let mut matched: Vec<PathBuf> = glob::glob(p)
            .map_err(|e| anyhow::anyhow!("bad path pattern `{p}`: {e}"))?
            .filter_map(|r| r.ok())
            .collect();
        if matched.is_empty() {
            bail!("{what} `{p}` matched no file");
        }
        matched.sort();
        paths.extend(matched);
    }
    Ok(paths)
}

/// An error for a URL where a local path is read (OLMo's configs name `http://`, `s3://`,
/// `gs://`, ... objects, which OLMo streams and this trainer does not).
pub fn remote_refused(p: &str, what: &str) -> Result<()> {
    if let Some((scheme, _)) = p.split_once("://") {
        bail!(
            "{what} `{p}` is a {scheme}:// URL: olmo-train reads local files only: download it and give the local path"
        );
    }
    Ok(())
}

/// The windows of a list of token files.
#[derive(Debug, Clone)]
pub struct Shards {
    pub files: Vec<ShardFile>,
    pub dtype: Dtype,
    pub seq_len: u64,
}

impl Shards {
    /// Opens the files (sizes only) and checks what can be checked without reading them all.
    pub fn open(paths: &[PathBuf], dtype: Dtype, seq_len: u64) -> Result<Shards> {
        if seq_len == 0 {
            bail!("max_sequence_length must be positive");
        }
        if paths.is_empty() {
            bail!("no token files (data.paths is empty or matched nothing)");
        }
        let mut files = Vec::new();
        let mut next = 0u64;
        for p in paths {
            let bytes = std::fs::metadata(p)
                .with_context(|| format!("cannot open token file {}", p.display()))?
                .len();
            if bytes == 0 {
                bail!("{}: empty token file", p.display());
            }
            if !bytes.is_multiple_of(dtype.width()) {
                bail!(
                    "{}: {bytes} bytes is not a whole number of {}-byte tokens: wrong memmap_dtype, or a file with a NumPy header?",
                    p.display(),
                    dtype.width()
                );
            }
            let tokens = bytes / dtype.width();
            let instances = tokens / seq_len;
            if instances == 0 {
                tracing_warn(&format!("{}: {tokens} tokens, fewer than one window of {seq_len}; it contributes nothing", p.display()));
            }
            files.push(ShardFile {
                path: p.clone(),
                tokens,
                first_instance: next,
                instances,
                label_mask: None,
            });
            next += instances;
        }
        if next == 0 {
            bail!("no complete window of {seq_len} tokens in any token file");
        }
        Ok(Shards {
            files,
            dtype,
            seq_len,
        })
    }

    /// Pairs each token file with its label mask, in order, checking the mask covers the file.
    pub fn with_label_masks(mut self, masks: Vec<PathBuf>) -> Result<Shards> {
        if masks.len() != self.files.len() {
            bail!(
                "data.label_mask_paths: {} files for {} token files (one mask per token file, in the same order)",
                masks.len(),
                self.files.len()
            );
        }
        for (f, m) in self.files.iter_mut().zip(masks) {
            let bytes = std::fs::metadata(&m)
                .with_context(|| format!("cannot open label mask {}", m.display()))?
                .len();
            if bytes != f.tokens {
                bail!(
                    "{}: {bytes} bytes for the {} tokens of {} (a label mask holds one byte, a NumPy bool, per token)",
                    m.display(),
                    f.tokens,
                    f.path.display()
                );
            }
            f.label_mask = Some(m);
        }
        Ok(self)
    }

    pub fn has_label_masks(&self) -> bool {
        self.files.iter().any(|f| f.label_mask.is_some())
    }

    /// One instance's label mask (every file has one once [`Shards::with_label_masks`] paired them).
    pub fn read_label_mask(&self, instance: u64) -> Result<Vec<bool>> {
        let (f, offset) = self.locate(instance)?;
        let path = f
            .label_mask
            .as_ref()
            .with_context(|| format!("{}: no label mask", f.path.display()))?;
        let buf = read_at(path, offset, self.seq_len)?;
        if let Some((k, bad)) = buf.iter().enumerate().find(|(_, &b)| b > 1) {
            bail!(
                "{}: byte {bad} at position {} is not a bool (0 or 1)",
                path.display(),
                offset + k as u64
            );
        }
        Ok(buf.into_iter().map(|b| b == 1).collect())
    }

    pub fn len(&self) -> u64 {
        self.files.iter().map(|f| f.instances).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// File and token offset of an instance.
    pub fn locate(&self, instance: u64) -> Result<(&ShardFile, u64)> {
        let i = self
            .files
            .partition_point(|f| f.first_instance + f.instances <= instance);
        let f = self
            .files
            .get(i)
            .filter(|f| instance >= f.first_instance)
            .with_context(|| {
                format!(
                    "instance {instance} is out of range ({} instances)",
                    self.len()
                )
            })?;
        Ok((f, (instance - f.first_instance) * self.seq_len))
    }

    /// Reads one instance's tokens, checking ids against the vocabulary.
    pub fn read(&self, instance: u64, vocab_size: Option<u64>) -> Result<Vec<u32>> {
        let (f, offset) = self.locate(instance)?;
        let w = self.dtype.width();
        let buf = read_at(&f.path, offset * w, self.seq_len * w)?;
        let ids: Vec<u32> = buf
            .chunks_exact(w as usize)
            .map(|c| {
                if w == 2 {
                    u16::from_le_bytes([c[0], c[1]]) as u32
                } else {
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]])
                }
            })
            .collect();
        if let Some(v) = vocab_size {
            if let Some((k, bad)) = ids.iter().enumerate().find(|(_, &t)| t as u64 >= v) {
                bail!(
                    "{}: token {bad} at position {} is outside the vocabulary ({v})",
                    f.path.display(),
                    offset + k as u64
                );
            }
        }
        Ok(ids)
    }
}

/// `len` bytes of `path` from byte `offset`: one window of a token file or of its label mask.
fn read_at(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf)
        .with_context(|| format!("{}: short read", path.display()))?;
    Ok(buf)
}

fn tracing_warn(msg: &str) {
    eprintln!("warning: {msg}");
}

/// The global order of instance ids for one epoch, padded or truncated to a multiple of `world`
/// exactly as OLMo's `IterableDataset` does.
pub fn global_order(n: u64, seed: u64, epoch: u64, world: u64, drop_last: bool) -> Vec<u32> {
    let mut idx = permutation(n as usize, seed + epoch);
    let total = epoch_len(n, world, drop_last) as usize;
    if total <= idx.len() {
        idx.truncate(total);
    } else {
        let head: Vec<u32> = idx[..(total - idx.len()).min(idx.len())].to_vec();
        idx.extend(head);
    }
    idx
}

/// The length of [`global_order`]'s result, without shuffling: `n` padded up to a multiple of
/// `world`, or with `drop_last` and a remainder, truncated as OLMo does.
pub fn epoch_len(n: u64, world: u64, drop_last: bool) -> u64 {
    let world = world.max(1);
    if drop_last && !n.is_multiple_of(world) {
        (n - world).div_ceil(world) * world
    } else {
        n.div_ceil(world) * world
    }
}

/// The instances of global step `step` (0-based) read by `rank`: `order[step*B..(step+1)*B]`,
/// every `world`-th one starting at `rank`.
pub fn batch_instances(
    order: &[u32],
    step: u64,
    global_batch: u64,
    rank: u64,
    world: u64,
) -> Result<Vec<u32>> {
    let start = (step * global_batch) as usize;
    let end = start + global_batch as usize;
    if end > order.len() {
        bail!(
            "step {step} needs instances {start}..{end} but the epoch has {} (steps per epoch: {})",
            order.len(),
            order.len() as u64 / global_batch
        );
    }
    Ok(order[start..end]
        .iter()
        .skip(rank as usize)
        .step_by(world.max(1) as usize)
        .copied()
        .collect())
}

/// Writes `global_indices.npy` as OLMo does: raw little-endian uint32, no header.
pub fn write_global_indices(path: &Path, order: &[u32]) -> Result<()> {
    if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p)?;
    }
    let tmp = path.with_extension("npy.tmp");
    let mut w = std::io::BufWriter::new(
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    for &i in order {
        w.write_all(&i.to_le_bytes())?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tokens(path: &Path, tokens: &[u16]) {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn windows_concatenate_files_and_drop_tails() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.npy");
        let b = dir.path().join("b.npy");
        write_tokens(&a, &(0..10).collect::<Vec<u16>>());
        write_tokens(&b, &(100..107).collect::<Vec<u16>>());
        let s = Shards::open(&[a.clone(), b.clone()], Dtype::U16, 3).unwrap();
        assert_eq!(s.len(), 3 + 2);
        assert_eq!(s.read(0, None).unwrap(), vec![0, 1, 2]);
        assert_eq!(s.read(2, None).unwrap(), vec![6, 7, 8]);
        assert_eq!(s.read(3, None).unwrap(), vec![100, 101, 102]);
        assert_eq!(s.read(4, None).unwrap(), vec![103, 104, 105]);
        assert!(s.read(5, None).is_err());
        let e = s.read(3, Some(101)).unwrap_err().to_string();
        assert!(
            e.contains("b.npy") && e.contains("token 101") && e.contains("outside the vocabulary"),
            "{e}"
        );
    }

    #[test]
    fn bad_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("e.npy");
        std::fs::write(&empty, b"").unwrap();
        assert!(Shards::open(&[empty], Dtype::U16, 4)
            .unwrap_err()
            .to_string()
            .contains("empty token file"));
        let odd = dir.path().join("o.npy");
        std::fs::write(&odd, b"abc").unwrap();
        assert!(Shards::open(&[odd], Dtype::U16, 4)
            .unwrap_err()
            .to_string()
            .contains("wrong memmap_dtype"));
    }

    #[test]
    fn order_padding_and_rank_slicing_follow_olmo() {
        let order = global_order(10, 6198, 0, 4, false);
        assert_eq!(order.len(), 12);
        assert_eq!(&order[10..], &order[..2]);
        let trunc = global_order(10, 6198, 0, 4, true);
        assert_eq!(trunc.len(), 8);
        for (n, w, drop) in [
            (10, 4, false),
            (10, 4, true),
            (12, 4, true),
            (7, 1, false),
            (3, 5, false),
        ] {
            assert_eq!(
                epoch_len(n, w, drop),
                global_order(n, 1, 0, w, drop).len() as u64
            );
        }
        let full = global_order(10, 6198, 0, 1, false);
        assert_eq!(full, permutation(10, 6198));
        let e1 = global_order(10, 6198, 1, 1, false);
        assert_eq!(e1, permutation(10, 6199));
        let b = batch_instances(&full, 1, 4, 0, 1).unwrap();
        assert_eq!(b, full[4..8].to_vec());
        let r1 = batch_instances(&full, 0, 4, 1, 2).unwrap();
        assert_eq!(r1, vec![full[1], full[3]]);
        assert!(batch_instances(&full, 3, 4, 0, 1).is_err());
    }

    #[test]
    fn global_indices_are_raw_uint32() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("train_data/global_indices.npy");
        write_global_indices(&p, &[3, 1, 2]).unwrap();
        assert_eq!(
            std::fs::read(&p).unwrap(),
            vec![3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]
        );
    }
}
