//! Files `torch.save` writes (PyTorch 1.6 and later): a zip archive, stored without
//! compression, of `{name}/data.pkl` (the pickled object) and one `{name}/data/{key}` entry per
//! storage. Read without Python: the archive's directory (zip64 included: an OLMo-1B
//! `model.pt` is 4.7 GB), the pickle through [`crate::pickle`], and each tensor's elements from
//! its storage's bytes only when asked for, so a 7B checkpoint is never held twice.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::pickle::{self, Value};

/// Element types of torch's storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// The dtype of a legacy storage class (`torch.FloatStorage`), the name torch pickles.
    fn of_storage(name: &str) -> Option<Dtype> {
        Some(match name {
            "DoubleStorage" => Dtype::F64,
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    pub(crate) fn value(self, b: &[u8]) -> f64 {
        match self {
            Dtype::F64 => f64::from_le_bytes(b.try_into().unwrap()),
            Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
            Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            Dtype::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Dtype::I8 => b[0] as i8 as f64,
            Dtype::U8 | Dtype::Bool => b[0] as f64,
        }
    }
}

/// A storage the pickle refers to: `{name}/data/{key}` in the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    pub dtype: Dtype,
    pub key: String,
}

/// A tensor as torch rebuilds it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: Storage,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// A row-major tensor over the whole of storage `key`.
    pub fn whole(dtype: Dtype, key: &str, shape: &[usize]) -> TensorRef {
        TensorRef {
            storage: Storage {
                dtype,
                key: key.to_string(),
            },
            offset: 0,
            shape: shape.to_vec(),
            stride: row_major_strides(shape),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The storage elements the view spans, `[offset, end)`, checked: sizes, strides and
    /// offsets that overflow, or a view repeating its storage many times over (stride 0),
    /// come from a damaged file, not from a state dict.
    fn span(&self) -> Result<(usize, usize)> {
        let bad = || {
            anyhow!(
                "a tensor of size {:?}, stride {:?} at {}",
                self.shape,
                self.stride,
                self.offset
            )
        };
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |a, &n| a.checked_mul(n))
            .ok_or_else(bad)?;
        if numel == 0 {
            return Ok((self.offset, self.offset));
        }
        let last = self
            .shape
            .iter()
            .zip(&self.stride)
            .try_fold(0usize, |a, (&n, &s)| a.checked_add((n - 1).checked_mul(s)?))
            .ok_or_else(bad)?;
        let end = self
            .offset
            .checked_add(last)
            .and_then(|e| e.checked_add(1))
            .ok_or_else(bad)?;
        if numel / 64 > end - self.offset {
            return Err(bad());
        }
        Ok((self.offset, end))
    }

    /// Storage indices of the elements in row-major order.
    fn indices(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.numel());
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..self.numel() {
            out.push(idx.iter().zip(&self.stride).map(|(i, s)| i * s).sum());
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }

    fn contiguous(&self) -> bool {
        let mut want = 1;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != want {
                return false;
            }
            want *= n;
        }
        true
    }
}

/// One archive entry: where its bytes start in the file, and how many.
#[derive(Debug, Clone, Copy)]
struct Entry {
    at: u64,
    len: u64,
}

/// An opened `torch.save` file: the archive its tensors are read from (shared by threads;
/// the object [`TorchFile::open`] returns beside it is not).
pub struct TorchFile {
    path: PathBuf,
    file: File,
    /// The archive's top folder (torch names it after the file).
    prefix: String,
    entries: HashMap<String, Entry>,
}

impl TorchFile {
    /// The file and the object it holds.
    pub fn open(path: &Path) -> Result<(TorchFile, Value)> {
        Self::open_part(path, None)
    }

    /// A `torch.save` archive inside a file: `len` bytes from byte `at` (one item of a
    /// `torch.distributed.checkpoint` data file), or the whole file.
    pub fn open_part(path: &Path, part: Option<(u64, u64)>) -> Result<(TorchFile, Value)> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let read = || -> Result<(TorchFile, Value)> {
            let size = file.metadata()?.len();
            let (at, len) = part.unwrap_or((0, size));
            if at.checked_add(len).is_none_or(|end| end > size) {
                bail!(
                    "bytes {at}..{} lie past the end of the file ({size} bytes)",
                    at + len
                );
            }
            let entries = zip_entries(&file, Entry { at, len })?;
            let pkl = entries
                .keys()
                .find(|k| k.ends_with("/data.pkl") && k.matches('/').count() == 1)
                .ok_or_else(|| anyhow!("no data.pkl in the archive: not a torch.save file"))?
                .clone();
            let prefix = pkl.trim_end_matches("data.pkl").to_string();
            if let Some(e) = entries.get(&format!("{prefix}byteorder")) {
                let order = read_at(&file, *e)?;
                if order != b"little" {
                    bail!(
                        "byte order {:?}: only little-endian checkpoints are read",
                        String::from_utf8_lossy(&order)
                    );
                }
            }
            let data = read_at(&file, entries[&pkl])?;
            let keys: Vec<String> = entries.keys().cloned().collect();
            let root = pickle::load(&data, &mut |pid| storage_of(pid, &prefix, &keys), &rebuild)
                .context("data.pkl")?;
            Ok((
                TorchFile {
                    path: path.to_path_buf(),
                    file: file.try_clone()?,
                    prefix,
                    entries,
                },
                root,
            ))
        };
        read().with_context(|| match part {
            Some((at, _)) => format!("{} (the item at byte {at})", path.display()),
            None => path.display().to_string(),
        })
    }

    fn storage_bytes(&self, t: &TensorRef, (from, to): (usize, usize)) -> Result<Vec<u8>> {
        let name = format!("{}data/{}", self.prefix, t.storage.key);
        let e = *self
            .entries
            .get(&name)
            .ok_or_else(|| anyhow!("{}: no storage entry {name}", self.path.display()))?;
        let size = t.storage.dtype.size() as u64;
        let (from, to) = (from as u64 * size, to as u64 * size);
        if to > e.len || from > to {
            bail!(
                "{}: a tensor reads {name} up to byte {to}, the entry holds {}",
                self.path.display(),
                e.len
            );
        }
        read_at(
            &self.file,
            Entry {
                at: e.at + from,
                len: to - from,
            },
        )
        .with_context(|| format!("{}: {name}", self.path.display()))
    }

    /// A floating-point tensor's elements in row-major order, as f32.
    pub fn f32s(&self, t: &TensorRef) -> Result<Vec<f32>> {
        let dtype = t.storage.dtype;
        if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64) {
            bail!(
                "{}: a {dtype:?} tensor where floating point is expected",
                self.path.display()
            );
        }
        let (from, to) = t.span().with_context(|| self.path.display().to_string())?;
        let bytes = self.storage_bytes(t, (from, to))?;
        let size = dtype.size();
        let at = |i: usize| &bytes[(i - from) * size..(i - from + 1) * size];
        Ok(match (dtype, t.contiguous()) {
            (Dtype::F32, true) => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            (_, true) => (from..to).map(|i| dtype.value(at(i)) as f32).collect(),
            _ => t
                .indices()
                .into_iter()
                .map(|i| dtype.value(at(t.offset + i)) as f32)
                .collect(),
        })
    }

    /// A floating-point tensor's elements into `out` (its length the tensor's): an F32 one
    /// laid out in order is read straight in, with no copy in between (an OLMo-7B `model.pt`
    /// is 27 GB).
    pub fn f32s_into(&self, t: &TensorRef, out: &mut [f32]) -> Result<()> {
        let (from, to) = t.span().with_context(|| self.path.display().to_string())?;
        if t.numel() != out.len() {
            bail!(
                "{}: a tensor of {} elements read into {}",
                self.path.display(),
                t.numel(),
                out.len()
            );
        }
        if t.storage.dtype != Dtype::F32 || !t.contiguous() || to - from != out.len() {
            out.copy_from_slice(&self.f32s(t)?);
            return Ok(());
        }
        let name = format!("{}data/{}", self.prefix, t.storage.key);
        let e = *self
            .entries
            .get(&name)
            .ok_or_else(|| anyhow!("{}: no storage entry {name}", self.path.display()))?;
        let (start, end) = (from as u64 * 4, to as u64 * 4);
        if end > e.len {
            bail!(
                "{}: a tensor reads {name} up to byte {end}, the entry holds {}",
                self.path.display(),
                e.len
            );
        }
        self.file
            .read_exact_at(crate::checkpoint::as_bytes_mut(out), e.at + start)
            .with_context(|| format!("{}: {name} (a truncated file?)", self.path.display()))
    }

    /// A one-element tensor's value.
    pub fn scalar(&self, t: &TensorRef) -> Result<f64> {
        if t.numel() != 1 {
            bail!(
                "{}: a tensor of shape {:?} where one value is expected",
                self.path.display(),
                t.shape
            );
        }
        let bytes = self.storage_bytes(t, (t.offset, t.offset + 1))?;
        Ok(t.storage.dtype.value(&bytes))
    }
}

/// torch's persistent id for a storage: `('storage', torch.FloatStorage, key, location, numel)`.
fn storage_of(pid: Value, prefix: &str, keys: &[String]) -> Result<Value> {
    let items = pid.items().unwrap_or_default();
    let (kind, class, key) = match items.as_slice() {
        [kind, class, key, ..] => (kind, class, key),
        _ => bail!(
            "a persistent id that is {}, not torch's storage tuple",
            pid.kind()
        ),
    };
    if kind.as_str() != Some("storage") {
        bail!("a persistent id of kind {}, not a storage", kind.brief());
    }
    let dtype = match class {
        Value::Global(m, n) if m == "torch" => Dtype::of_storage(n),
        _ => None,
    }
    .ok_or_else(|| anyhow!("storage of type {}, which is not read", class.kind()))?;
    let key = key
        .as_str()
        .ok_or_else(|| anyhow!("a storage key that is {}", key.kind()))?
        .to_string();
    let entry = format!("{prefix}data/{key}");
    if !keys.contains(&entry) {
        bail!("the pickle names storage {key}, the archive has no {entry}");
    }
    Ok(Value::Storage(Storage { dtype, key }))
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    v.usizes()
        .ok_or_else(|| anyhow!("a tensor {what} that is {}, not a list of sizes", v.kind()))
}

/// The calls `torch.save`'s pickles make that the reader builds: dicts and tensors.
fn rebuild(module: &str, name: &str, args: &Value) -> Result<Option<Value>> {
    let args = args.items().unwrap_or_default();
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Some(Value::Dict(Default::default())),
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            let [storage, offset, size, stride, ..] = args.as_slice() else {
                bail!("{} arguments, at least 4 expected", args.len());
            };
            let Value::Storage(storage) = storage else {
                bail!("a tensor over {}, not a storage", storage.kind());
            };
            let t = TensorRef {
                storage: storage.clone(),
                offset: offset
                    .as_usize()
                    .ok_or_else(|| anyhow!("a storage offset that is {}", offset.kind()))?,
                shape: usizes(size, "size")?,
                stride: usizes(stride, "stride")?,
            };
            if t.shape.len() != t.stride.len() {
                bail!(
                    "size {:?} and stride {:?} differ in rank",
                    t.shape,
                    t.stride
                );
            }
            Some(Value::Tensor(t))
        }
        // nn.Parameter: the tensor it wraps
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            match args.first() {
                Some(t @ Value::Tensor(_)) => Some(t.clone()),
                _ => bail!("a parameter of no tensor"),
            }
        }
        _ => None,
    })
}

fn read_at(file: &File, e: Entry) -> Result<Vec<u8>> {
    let len = usize::try_from(e.len).map_err(|_| anyhow!("an entry of {} bytes", e.len))?;
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, e.at)
        .map_err(|err| anyhow!("{len} bytes at {}: {err} (a truncated file?)", e.at))?;
    Ok(buf)
}

fn le(b: &[u8], at: usize, n: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&b[at..at + n]);
    u64::from_le_bytes(v)
}

/// The entries of a zip archive (the `window` of `file` it fills), by name, with where their
/// data lie in the file; only stored (uncompressed) entries, as torch writes them.
fn zip_entries(file: &File, window: Entry) -> Result<HashMap<String, Entry>> {
    let (base, size) = (window.at, window.len);
    let mut head = [0u8; 4];
    let short = || anyhow!("{size} bytes, too short for a torch.save archive");
    if size < 4 || file.read_exact_at(&mut head, base).is_err() {
        return Err(short());
    }
    if head != *b"PK\x03\x04" {
        if head[0] == 0x80 {
            bail!("a pickle, not a zip archive: torch.save's legacy format (before PyTorch 1.6), which is not read; load it and save it again with a newer torch");
        }
        bail!("not a zip archive, as torch.save writes");
    }
    if size < 22 {
        return Err(short());
    }
    // The end-of-directory record lies in the last 22 bytes plus a comment of up to 64 KiB.
    let tail_len = size.min(22 + 65535 + 20);
    let tail = read_at(
        file,
        Entry {
            at: base + size - tail_len,
            len: tail_len,
        },
    )?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| tail[i..i + 4] == *b"PK\x05\x06")
        .ok_or_else(|| anyhow!("no zip directory at the end (a truncated file?)"))?;
    let mut count = le(&tail, eocd + 10, 2);
    let mut dir_len = le(&tail, eocd + 12, 4);
    let mut dir_at = le(&tail, eocd + 16, 4);
    // zip64: a locator just before the record points at the 64-bit record
    if eocd >= 20 && tail[eocd - 20..eocd - 16] == *b"PK\x06\x07" {
        let at = le(&tail, eocd - 20 + 8, 8);
        if at.checked_add(56).is_none_or(|end| end > size) {
            bail!("a zip64 locator pointing past the end (a truncated file?)");
        }
        let rec = read_at(
            file,
            Entry {
                at: base + at,
                len: 56,
            },
        )
        .context("the zip64 directory record")?;
        if rec[..4] != *b"PK\x06\x06" {
            bail!("a zip64 locator pointing at no zip64 record");
        }
        count = le(&rec, 32, 8);
        dir_len = le(&rec, 40, 8);
        dir_at = le(&rec, 48, 8);
    }
    if dir_at.checked_add(dir_len).is_none_or(|end| end > size) {
        bail!("the zip directory lies past the end of the file (a truncated file?)");
    }
    let dir = read_at(
        file,
        Entry {
            at: base + dir_at,
            len: dir_len,
        },
    )?;
    let mut entries = HashMap::new();
    let mut i = 0;
    for _ in 0..count {
        if i + 46 > dir.len() || dir[i..i + 4] != *b"PK\x01\x02" {
            bail!("a broken zip directory entry at byte {}", dir_at + i as u64);
        }
        let method = le(&dir, i + 10, 2);
        let mut comp = le(&dir, i + 20, 4);
        let mut len = le(&dir, i + 24, 4);
        let name_len = le(&dir, i + 28, 2) as usize;
        let extra_len = le(&dir, i + 30, 2) as usize;
        let comment_len = le(&dir, i + 32, 2) as usize;
        let mut local = le(&dir, i + 42, 4);
        let end = i + 46 + name_len + extra_len + comment_len;
        if end > dir.len() {
            bail!("a broken zip directory entry at byte {}", dir_at + i as u64);
        }
        let name = String::from_utf8_lossy(&dir[i + 46..i + 46 + name_len]).into_owned();
        // zip64 extra field: the 32-bit fields that overflowed, in this order
        let mut x = i + 46 + name_len;
        let extra_end = x + extra_len;
        while x + 4 <= extra_end {
            let (id, n) = (le(&dir, x, 2), le(&dir, x + 2, 2) as usize);
            let mut f = x + 4;
            if id == 1 {
                for field in [&mut len, &mut comp, &mut local] {
                    if *field == 0xffff_ffff && f + 8 <= x + 4 + n {
                        *field = le(&dir, f, 8);
                        f += 8;
                    }
                }
            }
            x += 4 + n;
        }
        if method != 0 || comp != len {
            bail!("entry {name} is compressed (method {method}): torch.save stores its entries");
        }
        if local.checked_add(30).is_none_or(|end| end > size) {
            bail!("entry {name}'s header lies past the end of the file");
        }
        let local = base + local;
        let mut lh = [0u8; 30];
        file.read_exact_at(&mut lh, local)
            .map_err(|_| anyhow!("entry {name}'s header lies past the end of the file"))?;
        if lh[..4] != *b"PK\x03\x04" {
            bail!("entry {name}'s local header is broken");
        }
        let at = local + 30 + le(&lh, 26, 2) + le(&lh, 28, 2);
        if at.checked_add(len).is_none_or(|e| e > base + size) {
            bail!("entry {name} runs past the end of the file (a truncated file?)");
        }
        entries.insert(name, Entry { at, len });
        i = end;
    }
    Ok(entries)
}

/// A zip archive written as torch's writer does: entries stored, each one's data aligned to
/// 64 bytes (so `torch.load(mmap=True)` can map it), zip64 records where sizes or offsets
/// pass 4 GiB and at the end.
struct ZipWriter {
    w: std::io::BufWriter<File>,
    at: u64,
    central: Vec<u8>,
    count: u64,
}

const ALIGN: u64 = 64;

impl ZipWriter {
    fn entry(&mut self, name: &str, data: &[u8]) -> Result<()> {
        use std::io::Write;
        let len = data.len() as u64;
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let big = len >= 0xffff_ffff;
        let mut local = Vec::new();
        let put16 = |v: &mut Vec<u8>, x: u16| v.extend(x.to_le_bytes());
        let put32 = |v: &mut Vec<u8>, x: u32| v.extend(x.to_le_bytes());
        let size32 = if big { 0xffff_ffff } else { len as u32 };
        let version = if big { 45 } else { 20 };
        put32(&mut local, 0x0403_4b50);
        put16(&mut local, version);
        put16(&mut local, 0); // flags
        put16(&mut local, 0); // stored
        put16(&mut local, 0); // time
        put16(&mut local, 0x21); // 1980-01-01
        put32(&mut local, crc.sum());
        put32(&mut local, size32);
        put32(&mut local, size32);
        let zip64_len = if big { 20 } else { 0 };
        let fixed = self.at + 30 + name.len() as u64 + zip64_len + 4;
        let pad = (ALIGN - fixed % ALIGN) % ALIGN;
        put16(&mut local, name.len() as u16);
        put16(&mut local, (zip64_len + 4 + pad) as u16);
        local.extend(name.as_bytes());
        if big {
            put16(&mut local, 1);
            put16(&mut local, 16);
            local.extend(len.to_le_bytes());
            local.extend(len.to_le_bytes());
        }
        // padding in an extra field of torch's writer's id ("FB")
        put16(&mut local, 0x4246);
        put16(&mut local, pad as u16);
        local.resize(local.len() + pad as usize, 0);
        self.w.write_all(&local)?;
        self.w.write_all(data)?;

        let offset = self.at;
        let far = offset >= 0xffff_ffff;
        let mut extra = Vec::new();
        if big || far {
            let fields: Vec<u64> = [(big, len), (big, len), (far, offset)]
                .into_iter()
                .filter_map(|(on, v)| on.then_some(v))
                .collect();
            put16(&mut extra, 1);
            put16(&mut extra, (fields.len() * 8) as u16);
            for f in fields {
                extra.extend(f.to_le_bytes());
            }
        }
        let c = &mut self.central;
        put32(c, 0x0201_4b50);
        put16(c, 45);
        put16(c, if big || far { 45 } else { 20 });
        put16(c, 0);
        put16(c, 0);
        put16(c, 0);
        put16(c, 0x21);
        put32(c, crc.sum());
        put32(c, size32);
        put32(c, size32);
        put16(c, name.len() as u16);
        put16(c, extra.len() as u16);
        put16(c, 0); // comment
        put16(c, 0); // disk
        put16(c, 0); // internal attributes
        put32(c, 0); // external attributes
        put32(c, if far { 0xffff_ffff } else { offset as u32 });
        c.extend(name.as_bytes());
        c.extend(&extra);
        self.at += local.len() as u64 + len;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<File> {
        use std::io::Write;
        let (dir_at, dir_len) = (self.at, self.central.len() as u64);
        let mut end = std::mem::take(&mut self.central);
        let put16 = |v: &mut Vec<u8>, x: u16| v.extend(x.to_le_bytes());
        let put32 = |v: &mut Vec<u8>, x: u32| v.extend(x.to_le_bytes());
        let put64 = |v: &mut Vec<u8>, x: u64| v.extend(x.to_le_bytes());
        let record_at = dir_at + dir_len;
        put32(&mut end, 0x0606_4b50);
        put64(&mut end, 44);
        put16(&mut end, 45);
        put16(&mut end, 45);
        put32(&mut end, 0);
        put32(&mut end, 0);
        put64(&mut end, self.count);
        put64(&mut end, self.count);
        put64(&mut end, dir_len);
        put64(&mut end, dir_at);
        put32(&mut end, 0x0706_4b50);
        put32(&mut end, 0);
        put64(&mut end, record_at);
        put32(&mut end, 1);
        put32(&mut end, 0x0605_4b50);
        put16(&mut end, 0);
        put16(&mut end, 0);
        put16(&mut end, self.count.min(0xffff) as u16);
        put16(&mut end, self.count.min(0xffff) as u16);
        put32(&mut end, dir_len.min(0xffff_ffff) as u32);
        put32(&mut end, dir_at.min(0xffff_ffff) as u32);
        put16(&mut end, 0);
        self.w.write_all(&end)?;
        self.w.into_inner().map_err(|e| anyhow!("{}", e.error()))
    }
}

/// Writes `root` as `torch.save` writes it, storage `{i}` holding `storages[i]` (F32), under a
/// temporary name renamed when complete; `torch.load` (`weights_only=True` too) reads it.
pub fn save(path: &Path, root: &Value, storages: &[&[f32]]) -> Result<()> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && s.is_ascii())
        .unwrap_or("archive");
    let tmp = path.with_extension("pt.tmp");
    let write = || -> Result<()> {
        let file = File::create(&tmp)?;
        let mut z = ZipWriter {
            w: std::io::BufWriter::with_capacity(1 << 20, file),
            at: 0,
            central: Vec::new(),
            count: 0,
        };
        let mut pkl = Vec::new();
        pickle::dump(root, &mut pkl)?;
        z.entry(&format!("{name}/data.pkl"), &pkl)?;
        z.entry(&format!("{name}/byteorder"), b"little")?;
        for (i, s) in storages.iter().enumerate() {
            z.entry(&format!("{name}/data/{i}"), crate::checkpoint::as_bytes(s))?;
        }
        z.entry(&format!("{name}/version"), b"3\n")?;
        z.finish()?.sync_all()?;
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// A tensor over the whole of storage `key`, F32, row-major.
pub fn f32_tensor(key: usize, shape: &[usize]) -> Value {
    tensor_named(&key.to_string(), shape)
}

/// A row-major F32 tensor over the whole of storage `key`.
pub fn tensor_named(key: &str, shape: &[usize]) -> Value {
    Value::Tensor(TensorRef::whole(Dtype::F32, key, shape))
}

/// Elements between neighbours along each dimension of a row-major tensor of `shape`.
pub fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut stride = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    stride
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/torch")
            .join(name)
    }

    /// `views.pt`, which `tests/data/torch/make_views.py` wrote with torch: an OrderedDict of
    /// a 2x3 F32 `arange`, a transposed 2x3 BF16 `arange` (strides 1, 3) and row 1 of the
    /// first (a view at offset 3 of the same storage).
    #[test]
    fn tensors_read_as_torch_saved_them_views_included() {
        let (f, root) = TorchFile::open(&fixture("views.pt")).unwrap();
        let t = |k: &str| match root.get(k) {
            Some(Value::Tensor(t)) => t,
            other => panic!("{k}: {other:?}"),
        };
        let (a, b, c) = (t("a.weight"), t("b"), t("c"));
        assert_eq!((a.shape.clone(), a.storage.dtype), (vec![2, 3], Dtype::F32));
        assert_eq!(f.f32s(&a).unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(
            (b.shape.clone(), b.stride.clone()),
            (vec![3, 2], vec![1, 3])
        );
        assert_eq!(b.storage.dtype, Dtype::BF16);
        assert_eq!(f.f32s(&b).unwrap(), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(
            (c.offset, c.storage.key.as_str()),
            (3, a.storage.key.as_str())
        );
        assert_eq!(f.f32s(&c).unwrap(), [3.0, 4.0, 5.0]);
        assert!(f.scalar(&c).is_err());
    }

    #[test]
    fn views_that_overflow_or_repeat_their_storage_are_refused() {
        let (f, root) = TorchFile::open(&fixture("views.pt")).unwrap();
        let Some(Value::Tensor(a)) = root.get("a.weight") else {
            panic!()
        };
        for (shape, stride, offset) in [
            (vec![usize::MAX / 2, 4], vec![4, 1], 0),
            (vec![2, 3], vec![usize::MAX, 1], 0),
            (vec![6], vec![1], usize::MAX),
            (vec![1 << 20], vec![0], 0),
        ] {
            let t = TensorRef {
                shape,
                stride,
                offset,
                ..a.clone()
            };
            let e = format!("{:#}", f.f32s(&t).unwrap_err());
            assert!(e.contains("views.pt: a tensor of size"), "{e}");
        }
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read(fixture("views.pt")).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty.pt", vec![], "too short"),
            (
                "cut.pt",
                good[..good.len() - 30].to_vec(),
                "no zip directory",
            ),
            (
                "half.pt",
                good[..good.len() / 2].to_vec(),
                "no zip directory",
            ),
            (
                "legacy.pt",
                b"\x80\x02\x8a\x0alegacy".to_vec(),
                "legacy format",
            ),
            ("text.pt", b"hello, world".to_vec(), "not a zip archive"),
        ];
        for (name, bytes, want) in cases {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = format!("{:#}", TorchFile::open(&p).err().unwrap());
            assert!(e.contains(name) && e.contains(want), "{name}: {e}");
        }
        // a tensor's elements come from its storage's entry: zeroing those bytes zeroes it
        let mut short = good.clone();
        let (f, root) = TorchFile::open(&fixture("views.pt")).unwrap();
        let Some(Value::Tensor(a)) = root.get("a.weight") else {
            panic!()
        };
        let e = f.entries[&format!("{}data/{}", f.prefix, a.storage.key)];
        short[e.at as usize..(e.at + e.len) as usize].fill(0);
        let p = dir.path().join("zeroed.pt");
        std::fs::write(&p, &short).unwrap();
        let (z, _) = TorchFile::open(&p).unwrap();
        assert_eq!(z.f32s(&a).unwrap(), [0.0; 6]);
    }

    /// Past 4 GiB a zip needs zip64 fields for an entry's size and for the offsets after it.
    /// Writes a 4.8 GB file (to `$ZIP64_CHECK_FILE` if set, left there for
    /// `torch.load(..., mmap=True)`): run with `cargo test --release -- --ignored past_4_gib`.
    #[test]
    #[ignore]
    fn an_archive_past_4_gib_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = std::env::var("ZIP64_CHECK_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| dir.path().join("big.pt"));
        let n = 1_200_000_000usize;
        let mut big = vec![0.5f32; n];
        big[n - 1] = 7.0;
        let small = [1.0f32, 2.0, 3.0];
        let root = Value::dict(vec![
            (Value::Str("big".into()), f32_tensor(0, &[n])),
            (Value::Str("small".into()), f32_tensor(1, &[3])),
        ]);
        save(&path, &root, &[&big, &small]).unwrap();
        drop(big);
        let (f, root) = TorchFile::open(&path).unwrap();
        let Some(Value::Tensor(s)) = root.get("small") else {
            panic!()
        };
        assert_eq!(f.f32s(&s).unwrap(), small);
        let Some(Value::Tensor(mut b)) = root.get("big") else {
            panic!()
        };
        assert!(f.entries.values().any(|e| e.at > 0xffff_ffff));
        b.offset = n - 2;
        b.shape = vec![2];
        assert_eq!(f.f32s(&b).unwrap(), [0.5, 7.0]);
    }
}
