//! Inference for fastText supervised models (`.bin` and quantized `.ftz`).
//!
//! Written here rather than taken from the `fasttext` crate because its pure-Rust 0.8 release
//! skips the hierarchical-softmax tree for quantized models and so mislabels `lid.176.ftz`
//! (see `shared/reference/crates.md`), and the 0.7 C++ binding costs a C++ build in CI.
//! The arithmetic follows fastText 0.9.2 (`dictionary.cc`, `model.cc`, `loss.cc`,
//! `productquantizer.cc`) in `f32`, so probabilities agree with the Python binding to ~1e-6.

use rustc_hash::FxHashMap as HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};

const FASTTEXT_MAGIC: i32 = 793_712_314;
const FASTTEXT_VERSION: i32 = 12;
const EOS: &str = "</s>";
const BOW: &str = "<";
const EOW: &str = ">";
const KSUB: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LossKind {
    HierarchicalSoftmax,
    NegativeSampling,
    Softmax,
    OneVsAll,
}

#[derive(Debug, Clone)]
struct Args {
    dim: usize,
    word_ngrams: i32,
    loss: LossKind,
    bucket: i32,
    minn: i32,
    maxn: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryType {
    Word,
    Label,
}

struct Entry {
    word: String,
    count: i64,
    kind: EntryType,
    subwords: Vec<i32>,
}

struct Dictionary {
    entries: Vec<Entry>,
    index: HashMap<String, i32>,
    nwords: i32,
    nlabels: i32,
    /// `None` when the dictionary was never pruned; else bucket id -> compacted row.
    prune: Option<HashMap<i32, i32>>,
    label_prefix: String,
}

/// Product quantizer of `productquantizer.cc`.
struct ProductQuantizer {
    nsubq: usize,
    dsub: usize,
    lastdsub: usize,
    centroids: Vec<f32>,
}

impl ProductQuantizer {
    fn centroid(&self, m: usize, code: u8) -> &[f32] {
        let i = code as usize;
        if m == self.nsubq - 1 {
            let start = m * KSUB * self.dsub + i * self.lastdsub;
            &self.centroids[start..start + self.lastdsub]
        } else {
            let start = (m * KSUB + i) * self.dsub;
            &self.centroids[start..start + self.dsub]
        }
    }
}

enum Matrix {
    Dense {
        cols: usize,
        data: Vec<f32>,
    },
    Quantized {
        codes: Vec<u8>,
        pq: ProductQuantizer,
        norms: Option<(Vec<u8>, ProductQuantizer)>,
    },
}

impl Matrix {
    fn rows(&self) -> usize {
        match self {
            Matrix::Dense { cols, data } => data.len() / (*cols).max(1),
            Matrix::Quantized { codes, pq, .. } => codes.len() / pq.nsubq,
        }
    }

    fn norm(&self, row: usize) -> f32 {
        match self {
            Matrix::Quantized {
                norms: Some((codes, npq)),
                ..
            } => npq.centroid(0, codes[row])[0],
            _ => 1.0,
        }
    }

    fn add_row_to(&self, x: &mut [f32], row: usize) {
        match self {
            Matrix::Dense { cols, data } => {
                for (xi, v) in x.iter_mut().zip(&data[row * cols..(row + 1) * cols]) {
                    *xi += v;
                }
            }
            Matrix::Quantized { codes, pq, .. } => {
                let alpha = self.norm(row);
                let code = &codes[pq.nsubq * row..pq.nsubq * (row + 1)];
                for (m, &c) in code.iter().enumerate() {
                    let cent = pq.centroid(m, c);
                    let base = m * pq.dsub;
                    for (n, v) in cent.iter().enumerate() {
                        x[base + n] += alpha * v;
                    }
                }
            }
        }
    }

    fn dot_row(&self, x: &[f32], row: usize) -> f32 {
        match self {
            Matrix::Dense { cols, data } => {
                let mut res = 0.0f32;
                for (xi, v) in x.iter().zip(&data[row * cols..(row + 1) * cols]) {
                    res += xi * v;
                }
                res
            }
            Matrix::Quantized { codes, pq, .. } => {
                let alpha = self.norm(row);
                let code = &codes[pq.nsubq * row..pq.nsubq * (row + 1)];
                let mut res = 0.0f32;
                for (m, &c) in code.iter().enumerate() {
                    let cent = pq.centroid(m, c);
                    let base = m * pq.dsub;
                    for (n, v) in cent.iter().enumerate() {
                        res += x[base + n] * v;
                    }
                }
                res * alpha
            }
        }
    }
}

#[derive(Clone, Copy)]
struct TreeNode {
    left: i32,
    right: i32,
    parent: i32,
    count: i64,
}

/// A loaded fastText supervised classifier.
pub struct FastTextModel {
    args: Args,
    dict: Dictionary,
    input: Matrix,
    output: Matrix,
    tree: Vec<TreeNode>,
}

/// One predicted label (without the `__label__` prefix) and its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub prob: f32,
}

struct Reader<R: Read> {
    inner: R,
    what: String,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .with_context(|| format!("{}: truncated fastText model", self.what))?;
        Ok(b)
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.bytes::<4>()?))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.bytes::<8>()?))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.bytes::<8>()?))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes::<1>()?[0])
    }
    fn vec_u8(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.inner
            .read_exact(&mut v)
            .with_context(|| format!("{}: truncated fastText model", self.what))?;
        Ok(v)
    }
    fn vec_f32(&mut self, n: usize) -> Result<Vec<f32>> {
        let raw = self.vec_u8(n * 4)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn cstring(&mut self) -> Result<String> {
        let mut buf = Vec::new();
        loop {
            let b = self.u8()?;
            if b == 0 {
                break;
            }
            buf.push(b);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
    fn count(&mut self, n: i64, field: &str) -> Result<usize> {
        if !(0..=(1i64 << 34)).contains(&n) {
            bail!("{}: implausible {field} = {n} in fastText model", self.what);
        }
        Ok(n as usize)
    }

    fn pq(&mut self) -> Result<ProductQuantizer> {
        let dim = self.i32()?;
        let nsubq = self.i32()?;
        let dsub = self.i32()?;
        let lastdsub = self.i32()?;
        let dim = self.count(dim as i64, "pq dim")?;
        let nsubq = self.count(nsubq as i64, "pq nsubq")?;
        if nsubq == 0 {
            bail!("{}: product quantizer with no sub-quantizers", self.what);
        }
        let centroids = self.vec_f32(dim * KSUB)?;
        Ok(ProductQuantizer {
            nsubq,
            dsub: self.count(dsub as i64, "pq dsub")?,
            lastdsub: self.count(lastdsub as i64, "pq lastdsub")?,
            centroids,
        })
    }

    fn matrix(&mut self, quantized: bool) -> Result<Matrix> {
        if quantized {
            let qnorm = self.u8()? != 0;
            let m = self.i64()?;
            let _n = self.i64()?;
            let codesize = self.i32()?;
            let codesize = self.count(codesize as i64, "codesize")?;
            let codes = self.vec_u8(codesize)?;
            let pq = self.pq()?;
            let norms = if qnorm {
                let rows = self.count(m, "rows")?;
                let norm_codes = self.vec_u8(rows)?;
                Some((norm_codes, self.pq()?))
            } else {
                None
            };
            Ok(Matrix::Quantized { codes, pq, norms })
        } else {
            let m = self.i64()?;
            let n = self.i64()?;
            let rows = self.count(m, "rows")?;
            let cols = self.count(n, "cols")?;
            let data = self.vec_f32(rows * cols)?;
            Ok(Matrix::Dense { cols, data })
        }
    }
}

/// fastText's FNV-1a variant: bytes are sign-extended before the xor, as in `dictionary.cc`.
fn ft_hash(s: &[u8]) -> u32 {
    let mut h: u32 = 2_166_136_261;
    for &b in s {
        h ^= (b as i8) as i32 as u32;
        h = h.wrapping_mul(16_777_619);
    }
    h
}

impl Dictionary {
    fn push_hash(&self, out: &mut Vec<i32>, id: i32) {
        match &self.prune {
            None => out.push(self.nwords + id),
            Some(map) if map.is_empty() => {}
            Some(map) => {
                if let Some(&j) = map.get(&id) {
                    out.push(self.nwords + j);
                }
            }
        }
    }

    fn compute_subwords(&self, word: &[u8], bucket: i32, minn: i32, maxn: i32, out: &mut Vec<i32>) {
        if bucket <= 0 || maxn <= 0 {
            return;
        }
        let len = word.len();
        for i in 0..len {
            if word[i] & 0xC0 == 0x80 {
                continue;
            }
            let mut j = i;
            let mut n = 1;
            while j < len && n <= maxn {
                j += 1;
                while j < len && word[j] & 0xC0 == 0x80 {
                    j += 1;
                }
                if n >= minn && !(n == 1 && (i == 0 || j == len)) {
                    let h = ft_hash(&word[i..j]) % bucket as u32;
                    self.push_hash(out, h as i32);
                }
                n += 1;
            }
        }
    }
}

fn is_ft_space(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0x0b | 0x0c | 0)
}

impl FastTextModel {
    pub fn load(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open fastText model {}", path.display()))?;
        Self::from_reader(BufReader::new(file), &path.display().to_string())
    }

    pub fn from_reader<R: Read>(inner: R, what: &str) -> Result<Self> {
        let mut r = Reader {
            inner,
            what: what.to_string(),
        };
        let magic = r.i32()?;
        let version = r.i32()?;
        if magic != FASTTEXT_MAGIC {
            bail!("{what}: not a fastText model (bad magic number {magic})");
        }
        if version > FASTTEXT_VERSION {
            bail!("{what}: fastText model version {version} is newer than supported ({FASTTEXT_VERSION})");
        }
        let dim = r.i32()?;
        let _ws = r.i32()?;
        let _epoch = r.i32()?;
        let _min_count = r.i32()?;
        let _neg = r.i32()?;
        let word_ngrams = r.i32()?;
        let loss = match r.i32()? {
            1 => LossKind::HierarchicalSoftmax,
            2 => LossKind::NegativeSampling,
            3 => LossKind::Softmax,
            4 => LossKind::OneVsAll,
            other => bail!("{what}: unknown fastText loss id {other}"),
        };
        let model = r.i32()?;
        if model != 3 {
            bail!("{what}: fastText model is not a supervised classifier (model id {model})");
        }
        let bucket = r.i32()?;
        let minn = r.i32()?;
        let maxn = r.i32()?;
        let _lr_update = r.i32()?;
        let _t = r.f64()?;
        let args = Args {
            dim: r.count(dim as i64, "dim")?,
            word_ngrams,
            loss,
            bucket,
            minn,
            maxn,
        };

        let size = r.i32()?;
        let nwords = r.i32()?;
        let nlabels = r.i32()?;
        let _ntokens = r.i64()?;
        let prune_size = r.i64()?;
        let size_n = r.count(size as i64, "dictionary size")?;
        let mut entries = Vec::with_capacity(size_n);
        let mut index = HashMap::default();
        index.reserve(size_n);
        for i in 0..size_n {
            let word = r.cstring()?;
            let count = r.i64()?;
            let kind = if r.u8()? == 0 {
                EntryType::Word
            } else {
                EntryType::Label
            };
            index.insert(word.clone(), i as i32);
            entries.push(Entry {
                word,
                count,
                kind,
                subwords: Vec::new(),
            });
        }
        let prune = if prune_size >= 0 {
            let mut map = HashMap::default();
            map.reserve(prune_size as usize);
            for _ in 0..r.count(prune_size, "prune index size")? {
                let a = r.i32()?;
                let b = r.i32()?;
                map.insert(a, b);
            }
            Some(map)
        } else {
            None
        };
        let mut dict = Dictionary {
            entries,
            index,
            nwords,
            nlabels,
            prune,
            label_prefix: "__label__".to_string(),
        };
        for i in 0..size_n {
            if dict.entries[i].kind != EntryType::Word {
                continue;
            }
            let mut sub = vec![i as i32];
            if dict.entries[i].word != EOS {
                let w = format!("{BOW}{}{EOW}", dict.entries[i].word);
                dict.compute_subwords(w.as_bytes(), bucket, minn, maxn, &mut sub);
            }
            dict.entries[i].subwords = sub;
        }

        let quant_input = r.u8()? != 0;
        let input = r.matrix(quant_input)?;
        let quant_output = r.u8()? != 0;
        let output = r.matrix(quant_output)?;
        if output.rows() != nlabels as usize {
            bail!(
                "{what}: output matrix has {} rows for {nlabels} labels",
                output.rows()
            );
        }
        let mut model = FastTextModel {
            args,
            dict,
            input,
            output,
            tree: Vec::new(),
        };
        if model.args.loss == LossKind::HierarchicalSoftmax {
            model.build_tree();
        }
        Ok(model)
    }

    /// Huffman tree over label counts, exactly as `HierarchicalSoftmaxLoss::buildTree`.
    fn build_tree(&mut self) {
        let osz = self.dict.nlabels as usize;
        let counts: Vec<i64> = self
            .dict
            .entries
            .iter()
            .filter(|e| e.kind == EntryType::Label)
            .map(|e| e.count)
            .collect();
        let mut tree = vec![
            TreeNode {
                left: -1,
                right: -1,
                parent: -1,
                count: 1_000_000_000_000_000,
            };
            2 * osz - 1
        ];
        for (node, &c) in tree.iter_mut().zip(&counts) {
            node.count = c;
        }
        let mut leaf = osz as i64 - 1;
        let mut node = osz;
        for i in osz..2 * osz - 1 {
            let mut mini = [0usize; 2];
            for m in &mut mini {
                if leaf >= 0 && tree[leaf as usize].count < tree[node].count {
                    *m = leaf as usize;
                    leaf -= 1;
                } else {
                    *m = node;
                    node += 1;
                }
            }
            tree[i].left = mini[0] as i32;
            tree[i].right = mini[1] as i32;
            tree[i].count = tree[mini[0]].count + tree[mini[1]].count;
            tree[mini[0]].parent = i as i32;
            tree[mini[1]].parent = i as i32;
        }
        self.tree = tree;
    }

    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.dict
            .entries
            .iter()
            .filter(|e| e.kind == EntryType::Label)
            .map(|e| e.word.as_str())
    }

    pub fn label_prefix(&self) -> &str {
        &self.dict.label_prefix
    }

    /// Word and subword rows for one line, as `Dictionary::getLine` with a trailing newline
    /// (the Python binding appends one, which adds the `</s>` token).
    fn line_ids(&self, text: &str) -> Vec<i32> {
        let bytes = text.as_bytes();
        let mut ids = Vec::new();
        let mut word_hashes: Vec<i32> = Vec::new();
        let mut tokens: Vec<&[u8]> = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            while i < bytes.len() && is_ft_space(bytes[i]) && bytes[i] != b'\n' {
                i += 1;
            }
            if i >= bytes.len() {
                break;
            }
            if bytes[i] == b'\n' {
                tokens.push(EOS.as_bytes());
                break;
            }
            let start = i;
            while i < bytes.len() && !is_ft_space(bytes[i]) {
                i += 1;
            }
            tokens.push(&bytes[start..i]);
        }
        if tokens.last().copied() != Some(EOS.as_bytes()) {
            tokens.push(EOS.as_bytes());
        }
        for tok in tokens {
            let h = ft_hash(tok);
            let tok_str = String::from_utf8_lossy(tok);
            let wid = self.dict.index.get(tok_str.as_ref()).copied();
            let kind = match wid {
                Some(w) => self.dict.entries[w as usize].kind,
                None if tok_str.starts_with(&self.dict.label_prefix) => EntryType::Label,
                None => EntryType::Word,
            };
            if kind == EntryType::Word {
                match wid {
                    Some(w) => ids.extend_from_slice(&self.dict.entries[w as usize].subwords),
                    None => {
                        if tok != EOS.as_bytes() {
                            let mut w = Vec::with_capacity(tok.len() + 2);
                            w.extend_from_slice(BOW.as_bytes());
                            w.extend_from_slice(tok);
                            w.extend_from_slice(EOW.as_bytes());
                            self.dict.compute_subwords(
                                &w,
                                self.args.bucket,
                                self.args.minn,
                                self.args.maxn,
                                &mut ids,
                            );
                        }
                    }
                }
                word_hashes.push(h as i32);
            }
            if tok == EOS.as_bytes() {
                break;
            }
        }
        if self.args.bucket > 0 {
            let n = self.args.word_ngrams.max(1) as usize;
            for i in 0..word_hashes.len() {
                let mut h = word_hashes[i] as i64 as u64;
                for &next in word_hashes
                    .iter()
                    .take((i + n).min(word_hashes.len()))
                    .skip(i + 1)
                {
                    h = h.wrapping_mul(116_049_371).wrapping_add(next as i64 as u64);
                    self.dict
                        .push_hash(&mut ids, (h % self.args.bucket as u64) as i32);
                }
            }
        }
        ids
    }

    fn hidden(&self, ids: &[i32]) -> Vec<f32> {
        let mut hidden = vec![0f32; self.args.dim];
        if ids.is_empty() {
            return hidden;
        }
        for &id in ids {
            self.input.add_row_to(&mut hidden, id as usize);
        }
        let inv = 1.0f32 / ids.len() as f32;
        for h in &mut hidden {
            *h *= inv;
        }
        hidden
    }

    /// All labels with probability above `threshold`, best first, as `model.predict(text, k=-1)`.
    /// `text` must be one line (callers replace newlines, as dolma does).
    pub fn predict(&self, text: &str, threshold: f32) -> Vec<LabelScore> {
        let ids = self.line_ids(text);
        let hidden = self.hidden(&ids);
        let k = self.dict.nlabels as usize;
        let mut preds: Vec<(f32, usize)> = Vec::with_capacity(k);
        let std_log = |x: f32| ((x as f64) + 1e-5).ln() as f32;
        match self.args.loss {
            LossKind::HierarchicalSoftmax => {
                let root = self.tree.len() - 1;
                // fastText prunes the tree at std_log(threshold), i.e. log(1e-5) for threshold 0.
                self.dfs(root, 0.0, std_log(threshold), &hidden, &mut preds);
            }
            LossKind::Softmax => {
                let mut out: Vec<f32> = (0..k).map(|i| self.output.dot_row(&hidden, i)).collect();
                let max = out.iter().copied().fold(f32::MIN, f32::max);
                let mut z = 0f32;
                for o in &mut out {
                    *o = (*o - max).exp();
                    z += *o;
                }
                for (i, o) in out.iter().enumerate() {
                    let p = o / z;
                    if p >= threshold {
                        preds.push((std_log(p), i));
                    }
                }
            }
            LossKind::OneVsAll | LossKind::NegativeSampling => {
                for i in 0..k {
                    let p = 1.0 / (1.0 + (-self.output.dot_row(&hidden, i)).exp());
                    if p >= threshold {
                        preds.push((std_log(p), i));
                    }
                }
            }
        }
        preds.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let prefix = &self.dict.label_prefix;
        let labels: Vec<&Entry> = self
            .dict
            .entries
            .iter()
            .filter(|e| e.kind == EntryType::Label)
            .collect();
        preds
            .into_iter()
            .map(|(score, i)| {
                let word = &labels[i].word;
                LabelScore {
                    label: word
                        .strip_prefix(prefix.as_str())
                        .unwrap_or(word)
                        .to_string(),
                    prob: score.exp(),
                }
            })
            .collect()
    }

    /// The probability `predict(text, 0.0)` reports for one label (0 when it is not reported),
    /// without scoring every label: for hierarchical softmax only the root-to-leaf path is
    /// evaluated, with the same pruning at log(1e-5) the full search applies on the way.
    pub fn label_prob(&self, text: &str, label: &str) -> f32 {
        let Some(leaf) = self
            .dict
            .entries
            .iter()
            .filter(|e| e.kind == EntryType::Label)
            .position(|e| e.word.strip_prefix(self.dict.label_prefix.as_str()) == Some(label))
        else {
            return 0.0;
        };
        if self.args.loss != LossKind::HierarchicalSoftmax {
            return self
                .predict(text, 0.0)
                .into_iter()
                .find(|p| p.label == label)
                .map_or(0.0, |p| p.prob);
        }
        let ids = self.line_ids(text);
        let hidden = self.hidden(&ids);
        let osz = self.dict.nlabels as usize;
        let std_log = |x: f32| ((x as f64) + 1e-5).ln() as f32;
        let log_threshold = std_log(0.0);
        let mut path = vec![leaf];
        while let Some(&n) = path.last() {
            let parent = self.tree[n].parent;
            if parent < 0 {
                break;
            }
            path.push(parent as usize);
        }
        path.reverse();
        let mut score = 0.0f32;
        for pair in path.windows(2) {
            if score < log_threshold {
                return 0.0;
            }
            let (node, child) = (pair[0], pair[1]);
            let f = self.output_internal_dot(&hidden, node - osz);
            let f = (1.0 / (1.0 + (-(f as f64)).exp())) as f32;
            score += if self.tree[node].left == child as i32 {
                std_log(1.0 - f)
            } else {
                std_log(f)
            };
        }
        if score < log_threshold {
            return 0.0;
        }
        score.exp()
    }

    fn dfs(
        &self,
        node: usize,
        score: f32,
        log_threshold: f32,
        hidden: &[f32],
        out: &mut Vec<(f32, usize)>,
    ) {
        if score < log_threshold {
            return;
        }
        let n = self.tree[node];
        if n.left == -1 && n.right == -1 {
            out.push((score, node));
            return;
        }
        let osz = self.dict.nlabels as usize;
        let f = self.output_internal_dot(hidden, node - osz);
        let f = (1.0 / (1.0 + (-(f as f64)).exp())) as f32;
        let std_log = |x: f32| ((x as f64) + 1e-5).ln() as f32;
        self.dfs(
            n.left as usize,
            score + std_log(1.0 - f),
            log_threshold,
            hidden,
            out,
        );
        self.dfs(
            n.right as usize,
            score + std_log(f),
            log_threshold,
            hidden,
            out,
        );
    }

    fn output_internal_dot(&self, hidden: &[f32], row: usize) -> f32 {
        self.output.dot_row(hidden, row)
    }

    pub fn nlabels(&self) -> usize {
        self.dict.nlabels as usize
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A two-word, two-label dense softmax model in fastText's binary format: "good" points to
    /// `__label__pos`, "bad" to `__label__neg`.
    pub(crate) fn tiny_softmax_model() -> Vec<u8> {
        let mut b = Vec::new();
        let i32s = |b: &mut Vec<u8>, v: &[i32]| {
            v.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()))
        };
        i32s(&mut b, &[FASTTEXT_MAGIC, FASTTEXT_VERSION]);
        // dim ws epoch minCount neg wordNgrams loss(softmax) model(sup) bucket minn maxn lrUpdateRate
        i32s(&mut b, &[2, 5, 5, 1, 5, 1, 3, 3, 0, 0, 0, 100]);
        b.extend_from_slice(&1e-4f64.to_le_bytes());
        i32s(&mut b, &[4, 2, 2]);
        b.extend_from_slice(&10i64.to_le_bytes());
        b.extend_from_slice(&(-1i64).to_le_bytes());
        for (w, c, t) in [
            ("good", 5i64, 0u8),
            ("bad", 5, 0),
            ("__label__pos", 5, 1),
            ("__label__neg", 3, 1),
        ] {
            b.extend_from_slice(w.as_bytes());
            b.push(0);
            b.extend_from_slice(&c.to_le_bytes());
            b.push(t);
        }
        let dense = |b: &mut Vec<u8>, rows: i64, data: &[f32]| {
            b.push(0);
            b.extend_from_slice(&rows.to_le_bytes());
            b.extend_from_slice(&2i64.to_le_bytes());
            data.iter()
                .for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
        };
        dense(&mut b, 2, &[1.0, 0.0, 0.0, 1.0]);
        dense(&mut b, 2, &[2.0, -2.0, -2.0, 2.0]);
        b
    }

    #[test]
    fn dense_softmax_model_predicts_by_hand_computed_probabilities() {
        let m = FastTextModel::from_reader(&tiny_softmax_model()[..], "tiny").unwrap();
        assert_eq!(
            m.labels().collect::<Vec<_>>(),
            vec!["__label__pos", "__label__neg"]
        );
        let p = m.predict("good", 0.0);
        let pos = (2f64.exp() / (2f64.exp() + (-2f64).exp())) as f32;
        assert_eq!(p[0].label, "pos");
        assert!((p[0].prob - (pos + 1e-5)).abs() < 1e-5, "{p:?}");
        let p = m.predict("bad", 0.0);
        assert_eq!(p[0].label, "neg");
        let p = m.predict("good bad", 0.0);
        assert!(
            (p[0].prob - 0.5).abs() < 1e-4 && (p[1].prob - 0.5).abs() < 1e-4,
            "{p:?}"
        );
    }

    #[test]
    fn label_prob_equals_the_full_prediction() {
        let m = FastTextModel::from_reader(&tiny_softmax_model()[..], "tiny").unwrap();
        let full = m.predict("good", 0.0);
        assert_eq!(m.label_prob("good", "pos"), full[0].prob);
        assert_eq!(m.label_prob("good", "nope"), 0.0);
        // The hierarchical-softmax path walk is checked against `predict` on lid.176 in
        // tests/tag.rs (ft_lang_id_en_* against dolma) and below when the model is present.
        let lid = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/models/lid.176.ftz");
        let m = FastTextModel::load(&lid).unwrap();
        for text in [
            "hello world this is english",
            "bonjour le monde",
            "x",
            "",
            "日本語のテキスト",
            "the the the",
        ] {
            let full = m
                .predict(text, 0.0)
                .into_iter()
                .find(|p| p.label == "en")
                .map_or(0.0, |p| p.prob);
            assert_eq!(m.label_prob(text, "en"), full, "{text}");
        }
    }

    #[test]
    fn corrupt_models_are_errors() {
        let bytes = tiny_softmax_model();
        let e = FastTextModel::from_reader(&bytes[..bytes.len() - 3], "cut.bin")
            .err()
            .unwrap();
        assert!(e.to_string().contains("cut.bin: truncated"), "{e}");
        let e = FastTextModel::from_reader(&b"not a model at all"[..], "x.bin")
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a fastText model"), "{e}");
    }

    #[test]
    fn hash_matches_fasttext_sign_extension() {
        // Values computed with fastText's C++ `Dictionary::hash`.
        assert_eq!(ft_hash(b""), 2_166_136_261);
        assert_eq!(ft_hash(b"a"), 0xe40c292c);
        // Non-ASCII bytes are sign-extended: differs from plain FNV-1a.
        let plain = {
            let mut h: u32 = 2_166_136_261;
            for &b in "é".as_bytes() {
                h ^= b as u32;
                h = h.wrapping_mul(16_777_619);
            }
            h
        };
        assert_ne!(ft_hash("é".as_bytes()), plain);
    }
}
