//! The OLMo decoder on the CPU kernels: explicit forward and backward passes over one flat
//! parameter buffer (llm.c style), for a batch of sequences at once so the GEMMs are large.
//!
//! Block (pre-norm, no biases): `x += attn_out(attn(rope(q), rope(k), v))` with
//! `q, k, v = split(att_proj(norm(x)))`, then `x += ff_out(swiglu(ff_proj(norm(x))))`; a final
//! norm and logits against the embedding (tied) or a separate head (untied). Norms are
//! LayerNorm or RMSNorm, with or without a weight. OLMo 2's blocks move the norms to the
//! branch outputs (`x += norm(attn_out(…))` with `att_proj(x)`, alike for the MLP) and
//! normalise q and k (each over its whole width, before RoPE).

use crate::ops::*;
use rayon::prelude::*;

use crate::permutation::Pcg64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitFn {
    Normal,
    Mitchell,
    FullMegatron,
}

/// OLMo's init options: `init_fn`, `init_std`, `init_cutoff_factor` (in stds), and the
/// embedding's own `emb_init_std` and `scale_emb_init` (the latter full_megatron's only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    pub kind: InitFn,
    pub std: f32,
    pub cutoff: Option<f32>,
    pub emb_std: Option<f32>,
    pub scale_emb: bool,
}

impl Init {
    /// `kind` with `init_std` `std`, no cutoff but the init's own, and OLMo's embedding std.
    pub fn new(kind: InitFn, std: f32) -> Init {
        Init {
            kind,
            std,
            cutoff: None,
            emb_std: None,
            scale_emb: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// k and v heads (OLMo's `effective_n_kv_heads`): `n_heads` for multi-head attention, fewer
    /// for grouped-query attention, where each serves `n_heads / n_kv_heads` q heads.
    pub n_kv_heads: usize,
    pub n_layers: usize,
    /// SwiGLU hidden size `h` (ff_proj is `2h × d`, ff_out `d × h`).
    pub mlp_hidden: usize,
    pub vocab_size: usize,
    /// Embedding rows (OLMo's `embedding_size`): at least `vocab_size`, padded to 128 by default.
    pub embedding_size: usize,
    pub rope_theta: f32,
    pub eps: f32,
    pub z_loss: f32,
    pub norm: NormKind,
    /// `layer_norm_with_affine`: norms carry a weight (no bias).
    pub norm_affine: bool,
    pub weight_tying: bool,
    /// OLMo's `clip_qkv`: q, k and v clamped to [−c, c] after their projection.
    pub clip_qkv: Option<f32>,
    /// OLMo 2's reordered norms (`norm_after`): each branch's output is normalised before it
    /// is added to the residual, and the branch reads the residual stream as it is.
    pub norm_after: bool,
    /// QK-norm (`attention_layer_norm`): q and k each normalised over their whole width after
    /// the projection (and clip), before RoPE; `qk_norm_affine`: those norms carry a weight.
    pub qk_norm: bool,
    pub qk_norm_affine: bool,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// The width of k (and of v): `n_kv_heads` heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }

    /// The width of att_proj's fused q|k|v output.
    pub fn qkv_width(&self) -> usize {
        self.d_model + 2 * self.kv_dim()
    }

    /// Non-embedding parameters (the `N` of the FLOPs formula).
    pub fn non_embedding_params(&self) -> usize {
        let l = Layout::new(self);
        l.total - self.embedding_size * self.d_model * if self.weight_tying { 1 } else { 2 }
    }

    pub fn num_params(&self) -> usize {
        Layout::new(self).total
    }

    /// The block in words, for `info` and a run's first line.
    pub fn block(&self) -> String {
        let norm = match (self.norm, self.norm_affine) {
            (NormKind::LayerNorm, false) => "non-parametric LayerNorm",
            (NormKind::LayerNorm, true) => "LayerNorm+weight",
            (NormKind::Rms, false) => "RMSNorm",
            (NormKind::Rms, true) => "RMSNorm+weight",
        };
        let mut s = match self.norm_after {
            true => format!("OLMo 2 blocks ({norm} after each branch"),
            false => format!("pre-norm blocks ({norm}"),
        };
        if self.qk_norm {
            s += if self.qk_norm_affine {
                ", QK-norm+weight"
            } else {
                ", QK-norm"
            };
        }
        if let Some(c) = self.clip_qkv {
            s += &format!(", clip_qkv {c}");
        }
        match self.n_kv_heads {
            1 if self.n_heads > 1 => s += ", multi-query attention",
            k if k < self.n_heads => s += &format!(", {k} kv heads"),
            _ => {}
        }
        s += if self.weight_tying {
            ", tied head)"
        } else {
            ", untied head)"
        };
        s
    }

    /// Training FLOPs per token (forward + backward) as OLMo counts them.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        let attn = (self.n_layers * self.d_model * seq) as f64;
        let n = self.non_embedding_params() as f64;
        let total = self.num_params() as f64;
        2.0 * n + 4.0 * attn + 4.0 * total + 8.0 * attn
    }
}

/// OLMo's `activation_checkpointing`: what the forward pass drops for the backward pass to
/// compute again. Memory for compute: a block computed again costs one more forward pass
/// (about a third more of its FLOPs, which MFU does not count). The results are the same bits,
/// as every kernel is deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    #[default]
    Off,
    WholeLayer,
    /// Blocks 0, n, 2n, … (`one_in_two`, `one_in_three`, `one_in_four`, `one_in_eight`).
    OneIn(usize),
    /// The other blocks (`two_in_three`, `three_in_four`).
    AllButOneIn(usize),
    /// `fine_grained`: no whole block, but each block's attention, from its q, k and v (kept):
    /// its probabilities (the materialised attention's T×T per head, or flash's log-sum-exp)
    /// and its output. OLMo's strategy also wraps the norms and the activation function, but
    /// what those free is kept anyway as the next GEMM's input (by PyTorch as here), apart
    /// from the norms' per-row statistics, which are kept here.
    FineGrained,
}

impl Checkpointing {
    /// OLMo's names of its strategies.
    pub const NAMES: [&'static str; 8] = [
        "whole_layer",
        "fine_grained",
        "one_in_two",
        "one_in_three",
        "one_in_four",
        "one_in_eight",
        "two_in_three",
        "three_in_four",
    ];

    pub fn from_name(name: &str) -> Option<Checkpointing> {
        use Checkpointing::*;
        Some(match name {
            "whole_layer" => WholeLayer,
            "fine_grained" => FineGrained,
            "one_in_two" => OneIn(2),
            "one_in_three" => OneIn(3),
            "one_in_four" => OneIn(4),
            "one_in_eight" => OneIn(8),
            "two_in_three" => AllButOneIn(3),
            "three_in_four" => AllButOneIn(4),
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use Checkpointing::*;
        match self {
            Off => "off",
            WholeLayer => "whole_layer",
            FineGrained => "fine_grained",
            OneIn(2) => "one_in_two",
            OneIn(3) => "one_in_three",
            OneIn(4) => "one_in_four",
            OneIn(_) => "one_in_eight",
            AllButOneIn(3) => "two_in_three",
            AllButOneIn(_) => "three_in_four",
        }
    }

    /// For a run's first line: `""` when off.
    pub fn describe(self, layers: usize) -> String {
        match self {
            Checkpointing::Off => String::new(),
            Checkpointing::FineGrained => "; activation checkpointing fine_grained: each block's attention computed again in the backward pass".into(),
            c => format!(
                "; activation checkpointing {}: {} of {layers} blocks computed again in the backward pass",
                c.name(),
                (0..layers).filter(|&l| c.recomputes(l)).count()
            ),
        }
    }

    /// Whether block `layer` (counted from 0) is computed again in the backward pass, as
    /// OLMo's `should_checkpoint_block` decides.
    pub fn recomputes(self, layer: usize) -> bool {
        match self {
            Checkpointing::Off | Checkpointing::FineGrained => false,
            Checkpointing::WholeLayer => true,
            Checkpointing::OneIn(n) => layer.is_multiple_of(n),
            Checkpointing::AllButOneIn(n) => !layer.is_multiple_of(n),
        }
    }

    /// Whether the blocks kept whole drop their attention's probabilities and output, for
    /// the backward pass to compute them again from q, k and v.
    pub fn recomputes_attention(self) -> bool {
        self == Checkpointing::FineGrained
    }
}

/// What a tensor is, which decides its init and its weight-decay group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedding,
    /// A block's input projection (att_proj, ff_proj) of layer `.0`.
    InProj(usize),
    /// A block's output projection (attn_out) of layer `.0`.
    AttnOut(usize),
    /// A block's ff_out of layer `.0`.
    FfOut(usize),
    Norm,
    Head,
}

/// One named tensor of the flat buffer, named as in OLMo's state dict.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub role: Role,
}

impl Tensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Offsets of one layer's tensors.
#[derive(Debug, Clone, Copy)]
pub struct LayerOffsets {
    pub attn_norm: Option<usize>,
    pub att_proj: usize,
    /// QK-norm weights, when the model has weighted QK-norms.
    pub q_norm: Option<usize>,
    pub k_norm: Option<usize>,
    pub attn_out: usize,
    pub ff_norm: Option<usize>,
    pub ff_proj: usize,
    pub ff_out: usize,
}

/// Where every tensor lives in the flat parameter buffer.
#[derive(Debug, Clone)]
pub struct Layout {
    pub tensors: Vec<Tensor>,
    pub total: usize,
    pub wte: usize,
    pub layers: Vec<LayerOffsets>,
    pub ln_f: Option<usize>,
    pub head: Option<usize>,
}

impl Layout {
    pub fn new(cfg: &ModelConfig) -> Layout {
        let (d, h, kvd) = (cfg.d_model, cfg.mlp_hidden, cfg.kv_dim());
        let mut tensors = Vec::new();
        let mut total = 0;
        let mut add = |name: String, shape: Vec<usize>, role: Role| {
            let offset = total;
            total += shape.iter().product::<usize>();
            tensors.push(Tensor {
                name,
                offset,
                shape,
                role,
            });
            offset
        };
        let wte = add(
            "transformer.wte.weight".into(),
            vec![cfg.embedding_size, d],
            Role::Embedding,
        );
        let mut layers = Vec::new();
        for l in 0..cfg.n_layers {
            let p = format!("transformer.blocks.{l}");
            let norm = |add: &mut dyn FnMut(String, Vec<usize>, Role) -> usize,
                        n: &str,
                        width: usize,
                        affine: bool| {
                affine.then(|| add(format!("{p}.{n}.weight"), vec![width], Role::Norm))
            };
            let attn_norm = norm(&mut add, "attn_norm", d, cfg.norm_affine);
            let att_proj = add(
                format!("{p}.att_proj.weight"),
                vec![cfg.qkv_width(), d],
                Role::InProj(l),
            );
            let qk_affine = cfg.qk_norm && cfg.qk_norm_affine;
            let q_norm = norm(&mut add, "q_norm", d, qk_affine);
            let k_norm = norm(&mut add, "k_norm", kvd, qk_affine);
            let attn_out = add(format!("{p}.attn_out.weight"), vec![d, d], Role::AttnOut(l));
            let ff_norm = norm(&mut add, "ff_norm", d, cfg.norm_affine);
            let ff_proj = add(
                format!("{p}.ff_proj.weight"),
                vec![2 * h, d],
                Role::InProj(l),
            );
            let ff_out = add(format!("{p}.ff_out.weight"), vec![d, h], Role::FfOut(l));
            layers.push(LayerOffsets {
                attn_norm,
                att_proj,
                q_norm,
                k_norm,
                attn_out,
                ff_norm,
                ff_proj,
                ff_out,
            });
        }
        let ln_f = cfg
            .norm_affine
            .then(|| add("transformer.ln_f.weight".into(), vec![d], Role::Norm));
        let head = (!cfg.weight_tying).then(|| {
            add(
                "transformer.ff_out.weight".into(),
                vec![cfg.embedding_size, d],
                Role::Head,
            )
        });
        Layout {
            tensors,
            total,
            wte,
            layers,
            ln_f,
            head,
        }
    }
}

impl Layout {
    /// A flat buffer cut into each tensor's part, in layout order.
    pub fn split_mut<'a>(&self, mut buf: &'a mut [f32]) -> Vec<&'a mut [f32]> {
        let mut parts = Vec::with_capacity(self.tensors.len());
        let mut at = 0;
        for t in &self.tensors {
            let rest = std::mem::take(&mut buf);
            let (_, from) = rest.split_at_mut(t.offset - at);
            let (part, rest) = from.split_at_mut(t.len());
            parts.push(part);
            buf = rest;
            at = t.offset + t.len();
        }
        parts
    }

    /// Weight decay on or off per tensor, in layout order: OLMo decays Linear weights, and
    /// embeddings and norm weights only when asked.
    pub fn decay_mask(&self, embeddings: bool, norms: bool) -> Vec<bool> {
        self.tensors
            .iter()
            .map(|t| match t.role {
                Role::Embedding => embeddings,
                Role::Norm => norms,
                _ => true,
            })
            .collect()
    }
}

/// Initial parameters as OLMo's `init_fn` sets them (truncated normals; norm weights 1).
/// Each tensor draws from its own generator seeded by (seed, tensor index), so the values do
/// not depend on the order tensors are filled in.
pub fn init_params(cfg: &ModelConfig, init: &Init, seed: u64) -> Vec<f32> {
    let layout = Layout::new(cfg);
    let mut params = vec![0.0f32; layout.total];
    let d = cfg.d_model as f32;
    let h = cfg.mlp_hidden as f32;
    let (init_std, cutoff) = (init.std, init.cutoff);
    // OLMo reads `emb_init_std or ...`: 0 counts as unset
    let emb_std = init.emb_std.filter(|s| *s != 0.0);
    for (i, t) in layout.tensors.iter().enumerate() {
        let (std, cut) = match (init.kind, t.role) {
            (_, Role::Norm) => {
                params[t.range()].fill(1.0);
                continue;
            }
            (InitFn::Normal, role) => {
                let std = match role {
                    Role::Embedding => emb_std.unwrap_or(init_std),
                    _ => init_std,
                };
                (std, cutoff)
            }
            (InitFn::Mitchell, role) => {
                let std = match role {
                    Role::AttnOut(l) => 1.0 / (2.0 * d * (l + 1) as f32).sqrt(),
                    Role::FfOut(l) => 1.0 / (2.0 * h * (l + 1) as f32).sqrt(),
                    Role::Embedding => emb_std.unwrap_or(1.0 / d.sqrt()),
                    _ => 1.0 / d.sqrt(),
                };
                (std, Some(cutoff.unwrap_or(3.0)))
            }
            (InitFn::FullMegatron, role) => {
                let std = match role {
                    Role::AttnOut(_) | Role::FfOut(_) => {
                        init_std / (2.0 * cfg.n_layers as f32).sqrt()
                    }
                    Role::Head => 1.0 / d.sqrt(),
                    Role::Embedding => match emb_std {
                        Some(s) => s,
                        None if init.scale_emb => init_std * d.sqrt(),
                        None => init_std,
                    },
                    _ => init_std,
                };
                (std, Some(cutoff.unwrap_or(3.0)))
            }
        };
        // Chunks of a tensor draw from their own generators, so big models initialise in
        // parallel and the values do not depend on the thread count.
        params[t.range()]
            .par_chunks_mut(INIT_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let stream = (i as u64) << 32 | c as u64;
                let mut g = Pcg64::new(seed.wrapping_mul(1_000_003).wrapping_add(stream));
                for p in chunk {
                    *p = loop {
                        // Box-Muller on two uniforms in (0, 1].
                        let u1 = ((g.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                        let u2 = (g.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                        if cut.is_none_or(|c| z.abs() <= c as f64) {
                            break z as f32 * std;
                        }
                    };
                }
            });
    }
    params
}

/// Elements per independently seeded init chunk.
const INIT_CHUNK: usize = 1 << 20;

/// A batch of `b` sequences of `t` positions: input ids and the next-token targets
/// ([`IGNORE`] where a position is not scored).
pub struct Batch<'a> {
    pub inputs: &'a [u32],
    pub targets: &'a [u32],
    pub b: usize,
    pub t: usize,
    /// Attention within documents: where each input position's document starts in its
    /// sequence ([`crate::ops::document_starts`]); `None`, the whole sequence.
    pub doc_starts: Option<&'a [u32]>,
}

impl<'a> Batch<'a> {
    /// Training batch from whole windows of `t + 1` tokens: predict tokens `1..` from `..t`.
    pub fn from_windows(
        windows: &[Vec<u32>],
        inputs: &'a mut Vec<u32>,
        targets: &'a mut Vec<u32>,
    ) -> Batch<'a> {
        Self::from_masked_windows(windows, None, inputs, targets)
    }

    /// The same with OLMo's label masks, one flag per window token: a target whose token's
    /// flag is false is not scored (OLMo masks the labels, then shifts them).
    pub fn from_masked_windows(
        windows: &[Vec<u32>],
        masks: Option<&[Vec<bool>]>,
        inputs: &'a mut Vec<u32>,
        targets: &'a mut Vec<u32>,
    ) -> Batch<'a> {
        let t = windows[0].len() - 1;
        inputs.clear();
        targets.clear();
        for (k, w) in windows.iter().enumerate() {
            inputs.extend_from_slice(&w[..t]);
            match masks {
                Some(m) => {
                    targets.extend(
                        w[1..]
                            .iter()
                            .zip(&m[k][1..])
                            .map(|(&x, &keep)| if keep { x } else { IGNORE }),
                    )
                }
                None => targets.extend_from_slice(&w[1..]),
            }
        }
        Batch {
            inputs,
            targets,
            b: windows.len(),
            t,
            doc_starts: None,
        }
    }
}

impl<'a> Batch<'a> {
    /// The batch attending within documents that end with `eos` (when given; else as it is),
    /// their starts computed into `starts`.
    pub fn within_documents(self, eos: Option<u32>, starts: &'a mut Vec<u32>) -> Batch<'a> {
        let Some(eos) = eos else { return self };
        *starts = crate::ops::document_starts(self.inputs, self.t, eos);
        Batch {
            doc_starts: Some(starts),
            ..self
        }
    }
}

/// What a forward pass scored.
#[derive(Debug, Default, Clone)]
pub struct Scores {
    /// log p(target) per position (0 where ignored).
    pub logprobs: Vec<f32>,
    /// Σ −log p over scored positions, and Σ z-loss terms, in f64.
    pub ce_sum: f64,
    pub z_sum: f64,
    pub count: usize,
}

/// A norm's per-row statistics, for its backward pass.
struct Stats {
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

/// Activations one layer's backward pass needs. Pre-norm blocks keep each norm's output (the
/// next GEMM's input); `norm_after` blocks keep each branch's output before its norm instead.
struct LayerActs {
    ln1: Option<(Vec<f32>, Stats)>,
    qkv: Vec<f32>,
    /// The entries `clip_qkv` clipped, one bit each.
    clipped: Option<Vec<u32>>,
    /// QK-norm's inputs (q, k before the norm) and statistics.
    qk: Option<[(Vec<f32>, Stats); 2]>,
    /// None under `fine_grained` checkpointing, which computes it again from `qkv`.
    attention: Option<Attention>,
    attn_post: Option<(Vec<f32>, Stats)>,
    x_mid: Vec<f32>,
    ln2: Option<(Vec<f32>, Stats)>,
    ff_in: Vec<f32>,
    ff_act: Vec<f32>,
    ff_post: Option<(Vec<f32>, Stats)>,
}

/// The attention's output (attn_out's input) and its probabilities.
struct Attention {
    att: Vec<f32>,
    probs: Vec<f32>,
}

/// What the backward pass has of a layer: its input, and its activations unless the layer is
/// one that activation checkpointing computes again.
struct Kept {
    x_in: Vec<f32>,
    acts: Option<LayerActs>,
}

/// The most f32 logits the CPU engine holds at once (see [`logit_chunk_rows`]).
pub const CPU_LOGITS_BYTES: usize = 256 << 20;

/// Rows of logits computed at once: all `n` where their f32 logits fit in `budget` bytes, else
/// equal chunks (multiples of 64 rows) under it, so each chunk's GEMMs stay large and the
/// head's memory stops growing with the batch.
pub fn logit_chunk_rows(n: usize, emb: usize, budget: usize) -> usize {
    let most = (budget / (4 * emb.max(1))).max(64);
    if n <= most {
        return n.max(1);
    }
    let chunks = n.div_ceil(most);
    (n.div_ceil(chunks).div_ceil(64) * 64).min(most)
}

/// The model: its shape, where its tensors are, and the RoPE table.
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: Layout,
    /// The layers whose activations the backward pass computes again rather than keeps.
    pub checkpointing: Checkpointing,
    /// Rows of logits at a time, in place of [`logit_chunk_rows`] (for tests).
    pub head_rows: Option<usize>,
    rope: RopeTable,
}

impl Model {
    /// `max_seq` bounds the positions any batch may have (the RoPE table's length).
    pub fn new(cfg: ModelConfig, max_seq: usize) -> Model {
        Model {
            layout: Layout::new(&cfg),
            checkpointing: Checkpointing::Off,
            head_rows: None,
            rope: RopeTable::new(max_seq, cfg.head_dim(), cfg.rope_theta),
            cfg,
        }
    }

    /// The model with activation checkpointing as given (it changes memory and time, not bits).
    pub fn with_checkpointing(self, checkpointing: Checkpointing) -> Model {
        Model {
            checkpointing,
            ..self
        }
    }

    /// The most positions a batch may have.
    pub fn max_seq(&self) -> usize {
        self.rope.sin.len() / self.rope.half.max(1)
    }

    /// `d`-wide rows of `x` normalised (times the weight at `w`, if any).
    fn norm(&self, params: &[f32], x: &[f32], w: Option<usize>) -> (Vec<f32>, Stats) {
        self.norm_of(params, x, self.cfg.d_model, w)
    }

    /// Rows `d` wide normalised: `norm` at any width (QK-norm's k is `kvd` wide).
    fn norm_of(&self, params: &[f32], x: &[f32], d: usize, w: Option<usize>) -> (Vec<f32>, Stats) {
        let rows = x.len() / d;
        let mut y = vec![0.0; x.len()];
        let mut st = Stats {
            mean: vec![0.0; rows],
            rstd: vec![0.0; rows],
        };
        let w = w.map(|o| &params[o..o + d]);
        norm_forward(
            self.cfg.norm,
            x,
            d,
            self.cfg.eps,
            w,
            &mut y,
            &mut st.mean,
            &mut st.rstd,
        );
        (y, st)
    }

    /// Adds the norm's dL/dx into `dx` (and dL/dw into `grads`) given dL/dy.
    fn norm_back(
        &self,
        params: &[f32],
        grads: &mut [f32],
        dy: &[f32],
        (x, st): (&[f32], &Stats),
        w: Option<usize>,
        dx: &mut [f32],
    ) {
        let d = x.len() / st.mean.len();
        let (w, g) = split_norm(params, grads, w, d);
        norm_backward(self.cfg.norm, dy, x, &st.mean, &st.rstd, d, w, dx, g);
    }

    /// The q and k column blocks of fused qkv rows: (first column, width).
    fn q_and_k(&self) -> [(usize, usize); 2] {
        [(0, self.cfg.d_model), (self.cfg.d_model, self.cfg.kv_dim())]
    }

    /// QK-norm in place on the q and k columns of fused qkv rows; returns their inputs.
    fn qk_norm(&self, params: &[f32], qkv: &mut [f32], o: &LayerOffsets) -> [(Vec<f32>, Stats); 2] {
        let stride = self.cfg.qkv_width();
        let [q, k] = self.q_and_k();
        [(q, o.q_norm), (k, o.k_norm)].map(|((from, width), w)| {
            let raw = columns(qkv, stride, from, width);
            let (y, st) = self.norm_of(params, &raw, width, w);
            set_columns(qkv, stride, from, &y);
            (raw, st)
        })
    }

    /// QK-norm's backward in place on the q and k columns of the qkv gradient.
    fn qk_norm_back(
        &self,
        params: &[f32],
        grads: &mut [f32],
        dqkv: &mut [f32],
        saved: &[(Vec<f32>, Stats); 2],
        o: &LayerOffsets,
    ) {
        let stride = self.cfg.qkv_width();
        let [q, k] = self.q_and_k();
        for (((from, width), w), (raw, st)) in [(q, o.q_norm), (k, o.k_norm)].into_iter().zip(saved)
        {
            let dy = columns(dqkv, stride, from, width);
            let mut dx = vec![0.0; dy.len()];
            self.norm_back(params, grads, &dy, (raw, st), w, &mut dx);
            set_columns(dqkv, stride, from, &dx);
        }
    }

    /// The attention's `[n, 3d]` q|k|v rows: the fused projection itself, or under grouped-query
    /// attention with each kv head repeated for its q heads (made again for the backward pass
    /// rather than kept).
    fn heads<'q>(&self, qkv: &'q [f32]) -> std::borrow::Cow<'q, [f32]> {
        let c = &self.cfg;
        match c.n_kv_heads == c.n_heads {
            true => qkv.into(),
            false => repeat_kv(qkv, c.n_heads, c.n_kv_heads, c.head_dim()).into(),
        }
    }

    /// A branch's output `out` joining the residual stream `r`: `r + out`, or under
    /// `norm_after` `r + norm(out)`, keeping `out` and the norm's statistics.
    #[allow(clippy::type_complexity)]
    fn join(
        &self,
        params: &[f32],
        mut out: Vec<f32>,
        w: Option<usize>,
        r: &[f32],
    ) -> (Vec<f32>, Option<(Vec<f32>, Stats)>) {
        let add = |y: &mut [f32], r: &[f32]| y.iter_mut().zip(r).for_each(|(y, r)| *y += r);
        if self.cfg.norm_after {
            let (mut y, st) = self.norm(params, &out, w);
            add(&mut y, r);
            (y, Some((out, st)))
        } else {
            add(&mut out, r);
            (out, None)
        }
    }

    /// [`Model::join`]'s backward: dL/d(branch output) given dL/d(joined), when a norm sits
    /// between them (else the branch's gradient is `dy` itself).
    fn post_norm_back(
        &self,
        params: &[f32],
        grads: &mut [f32],
        dy: &[f32],
        post: &Option<(Vec<f32>, Stats)>,
        w: Option<usize>,
    ) -> Option<Vec<f32>> {
        let (out, st) = post.as_ref()?;
        let mut dout = vec![0.0; dy.len()];
        self.norm_back(params, grads, dy, (out, st), w, &mut dout);
        Some(dout)
    }

    /// Adds dL/dx into `dx` given dL/dh for a branch input `h`: `norm(x)` in pre-norm blocks
    /// (`pre` holds its output and statistics), `x` itself under `norm_after`.
    fn pre_norm_back(
        &self,
        params: &[f32],
        grads: &mut [f32],
        dh: &[f32],
        (x, pre): (&[f32], &Option<(Vec<f32>, Stats)>),
        w: Option<usize>,
        dx: &mut [f32],
    ) {
        match pre {
            Some((_, st)) => self.norm_back(params, grads, dh, (x, st), w, dx),
            None => dx.iter_mut().zip(dh).for_each(|(d, h)| *d += h),
        }
    }

    /// One block's forward pass from its input `x`: its output, and the activations its
    /// backward pass reads.
    fn layer_forward(
        &self,
        params: &[f32],
        x: &[f32],
        o: &LayerOffsets,
        batch: &Batch,
    ) -> (Vec<f32>, LayerActs) {
        let cfg = &self.cfg;
        let (d, hh, h) = (cfg.d_model, cfg.n_heads, cfg.mlp_hidden);
        let (kvh, w) = (cfg.n_kv_heads, cfg.qkv_width());
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        // Attention branch: pre-norm `x + attn(norm(x))`, or `x + norm(attn(x))`.
        let ln1 = (!cfg.norm_after).then(|| self.norm(params, x, o.attn_norm));
        let mut qkv = vec![0.0; n * w];
        let h1 = ln1.as_ref().map_or(x, |(y, _)| y);
        matmul_forward(h1, &params[o.att_proj..], n, d, w, &mut qkv);
        let clipped = cfg.clip_qkv.map(|c| clip_qkv(&mut qkv, c));
        let qk = cfg.qk_norm.then(|| self.qk_norm(params, &mut qkv, o));
        rope(&mut qkv, w, hh + kvh, t, &self.rope, false);
        let attention = self.attention(&qkv, batch);
        let mut a = vec![0.0; n * d];
        matmul_forward(&attention.att, &params[o.attn_out..], n, d, d, &mut a);
        let (x_mid, attn_post) = self.join(params, a, o.attn_norm, x);
        // MLP branch, alike.
        let ln2 = (!cfg.norm_after).then(|| self.norm(params, &x_mid, o.ff_norm));
        let h2 = ln2.as_ref().map_or(&x_mid, |(y, _)| y);
        let mut ff_in = vec![0.0; n * 2 * h];
        matmul_forward(h2, &params[o.ff_proj..], n, d, 2 * h, &mut ff_in);
        let mut ff_act = vec![0.0; n * h];
        swiglu_forward(&ff_in, h, &mut ff_act);
        let mut f = vec![0.0; n * d];
        matmul_forward(&ff_act, &params[o.ff_out..], n, h, d, &mut f);
        let (x_out, ff_post) = self.join(params, f, o.ff_norm, &x_mid);
        let acts = LayerActs {
            ln1,
            qkv,
            clipped,
            qk,
            attention: Some(attention),
            attn_post,
            x_mid,
            ln2,
            ff_in,
            ff_act,
            ff_post,
        };
        (x_out, acts)
    }

    /// Causal attention over the (RoPE'd) q, k and v rows of `qkv`.
    fn attention(&self, qkv: &[f32], batch: &Batch) -> Attention {
        let cfg = &self.cfg;
        let (b, t, hh) = (batch.b, batch.t, cfg.n_heads);
        let mut att = vec![0.0; b * t * cfg.d_model];
        let mut probs = vec![0.0; b * hh * t * t];
        let heads = self.heads(qkv);
        let hd = cfg.head_dim();
        attention_forward(&heads, b, t, hh, hd, batch.doc_starts, &mut att, &mut probs);
        Attention { att, probs }
    }

    /// Scores a batch without keeping activations for a backward pass.
    pub fn forward(&self, params: &[f32], batch: &Batch) -> Scores {
        self.run(params, batch, None)
    }

    /// Scores a batch and adds `grad_scale · d(Σ CE + z-loss)/dparams` into `grads`.
    pub fn forward_backward(
        &self,
        params: &[f32],
        batch: &Batch,
        grad_scale: f32,
        grads: &mut [f32],
    ) -> Scores {
        self.run(params, batch, Some((grad_scale, grads)))
    }

    fn run(&self, params: &[f32], batch: &Batch, backward: Option<(f32, &mut [f32])>) -> Scores {
        let cfg = &self.cfg;
        let (d, hh, h) = (cfg.d_model, cfg.n_heads, cfg.mlp_hidden);
        let (hd, kvh, w) = (cfg.head_dim(), cfg.n_kv_heads, cfg.qkv_width());
        let (b, t) = (batch.b, batch.t);
        let n = b * t;
        let emb = cfg.embedding_size;
        assert!(t <= self.rope.sin.len() / self.rope.half.max(1));
        assert_eq!(batch.inputs.len(), n);
        assert_eq!(batch.targets.len(), n);
        let lay = &self.layout;
        let wte = &params[lay.wte..lay.wte + emb * d];
        let keep = backward.is_some();

        let mut x = vec![0.0f32; n * d];
        for (row, &tok) in x.chunks_exact_mut(d).zip(batch.inputs) {
            row.copy_from_slice(&wte[tok as usize * d..(tok as usize + 1) * d]);
        }
        let mut kept: Vec<Kept> = Vec::with_capacity(if keep { cfg.n_layers } else { 0 });
        for (i, o) in lay.layers.iter().enumerate() {
            let (x_out, mut acts) = self.layer_forward(params, &x, o, batch);
            let x_in = std::mem::replace(&mut x, x_out);
            if self.checkpointing.recomputes_attention() {
                acts.attention = None;
            }
            if keep {
                let acts = (!self.checkpointing.recomputes(i)).then_some(acts);
                kept.push(Kept { x_in, acts });
            }
        }
        let (lnf, lnf_st) = self.norm(params, &x, lay.ln_f);
        let head_at = lay.head.unwrap_or(lay.wte);
        let head = &params[head_at..head_at + emb * d];
        // The head a chunk of rows at a time: each chunk's logits become its loss and, going
        // backward, its rows of dL/dlnf and its share of the head's gradient, so the logits'
        // memory does not grow with the batch.
        let rows = self
            .head_rows
            .unwrap_or_else(|| logit_chunk_rows(n, emb, CPU_LOGITS_BYTES))
            .clamp(1, n.max(1));
        let mut logits = vec![0.0; rows * emb];
        let mut scores = Scores {
            logprobs: Vec::with_capacity(n),
            ..Default::default()
        };
        let (grad_scale, mut grads) = backward.unzip();
        let mut dlnf = vec![0.0; if grads.is_some() { n * d } else { 0 }];
        for r0 in (0..n).step_by(rows) {
            let m = rows.min(n - r0);
            let (lnf_c, targets) = (&lnf[r0 * d..(r0 + m) * d], &batch.targets[r0..r0 + m]);
            let logits = &mut logits[..m * emb];
            matmul_forward(lnf_c, head, m, d, emb, logits);
            let per_row = cross_entropy(logits, targets, emb, cfg.z_loss, grad_scale);
            for (r, &tgt) in per_row.iter().zip(targets) {
                scores.logprobs.push(r.0);
                if tgt != IGNORE {
                    scores.ce_sum -= r.0 as f64;
                    scores.z_sum += r.1 as f64;
                    scores.count += 1;
                }
            }
            if let Some(grads) = grads.as_deref_mut() {
                // `logits` now holds dL/dlogits.
                matmul_backward(
                    logits,
                    lnf_c,
                    head,
                    m,
                    d,
                    emb,
                    &mut dlnf[r0 * d..(r0 + m) * d],
                    &mut grads[head_at..head_at + emb * d],
                );
            }
        }
        drop(logits);
        let Some(grads) = grads else {
            return scores;
        };

        let mut dx = vec![0.0; n * d];
        self.norm_back(params, grads, &dlnf, (&x, &lnf_st), lay.ln_f, &mut dx);
        for (o, k) in lay.layers.iter().zip(kept).rev() {
            let a = &match k.acts {
                Some(a) => a,
                None => self.layer_forward(params, &k.x_in, o, batch).1,
            };
            // MLP branch; `dx` is dL/dx_out, and the residual's share of dL/dx_mid.
            let df_post = self.post_norm_back(params, grads, &dx, &a.ff_post, o.ff_norm);
            let mut dff_act = vec![0.0; n * h];
            matmul_backward(
                df_post.as_ref().unwrap_or(&dx),
                &a.ff_act,
                &params[o.ff_out..],
                n,
                h,
                d,
                &mut dff_act,
                &mut grads[o.ff_out..o.ff_out + d * h],
            );
            let mut dff_in = vec![0.0; n * 2 * h];
            swiglu_backward(&dff_act, &a.ff_in, h, &mut dff_in);
            let mut dh2 = vec![0.0; n * d];
            matmul_backward(
                &dff_in,
                a.ln2.as_ref().map_or(&a.x_mid, |(y, _)| y),
                &params[o.ff_proj..],
                n,
                d,
                2 * h,
                &mut dh2,
                &mut grads[o.ff_proj..o.ff_proj + 2 * h * d],
            );
            let mut dx_mid = dx;
            self.pre_norm_back(
                params,
                grads,
                &dh2,
                (&a.x_mid, &a.ln2),
                o.ff_norm,
                &mut dx_mid,
            );
            // Attention branch, alike.
            let da_post = self.post_norm_back(params, grads, &dx_mid, &a.attn_post, o.attn_norm);
            let again;
            let attention = match &a.attention {
                Some(kept) => kept,
                None => {
                    again = self.attention(&a.qkv, batch);
                    &again
                }
            };
            let mut datt = vec![0.0; n * d];
            matmul_backward(
                da_post.as_ref().unwrap_or(&dx_mid),
                &attention.att,
                &params[o.attn_out..],
                n,
                d,
                d,
                &mut datt,
                &mut grads[o.attn_out..o.attn_out + d * d],
            );
            let mut dheads = vec![0.0; n * 3 * d];
            let heads = self.heads(&a.qkv);
            attention_backward(&datt, &heads, &attention.probs, b, t, hh, hd, &mut dheads);
            drop(heads);
            let mut dqkv = match kvh == hh {
                true => dheads,
                false => sum_kv(&dheads, hh, kvh, hd),
            };
            rope(&mut dqkv, w, hh + kvh, t, &self.rope, true);
            if let Some(saved) = &a.qk {
                self.qk_norm_back(params, grads, &mut dqkv, saved, o);
            }
            if let Some(bits) = &a.clipped {
                clip_qkv_backward(&mut dqkv, bits);
            }
            let mut dh1 = vec![0.0; n * d];
            matmul_backward(
                &dqkv,
                a.ln1.as_ref().map_or(&k.x_in, |(y, _)| y),
                &params[o.att_proj..],
                n,
                d,
                w,
                &mut dh1,
                &mut grads[o.att_proj..o.att_proj + w * d],
            );
            let mut dx_in = dx_mid;
            self.pre_norm_back(
                params,
                grads,
                &dh1,
                (&k.x_in, &a.ln1),
                o.attn_norm,
                &mut dx_in,
            );
            dx = dx_in;
        }
        // Embedding lookup: rows in order, so the sum does not depend on threads.
        let gw = &mut grads[lay.wte..lay.wte + emb * d];
        for (row, &tok) in dx.chunks_exact(d).zip(batch.inputs) {
            let g = &mut gw[tok as usize * d..(tok as usize + 1) * d];
            g.iter_mut().zip(row).for_each(|(g, r)| *g += r);
        }
        scores
    }
}

/// Columns `from..from + width` of rows `stride` wide, gathered into `[rows, width]`.
fn columns(x: &[f32], stride: usize, from: usize, width: usize) -> Vec<f32> {
    x.chunks_exact(stride)
        .flat_map(|r| &r[from..from + width])
        .copied()
        .collect()
}

/// The inverse of [`columns`]: writes `[rows, width]` back at column `from`.
fn set_columns(x: &mut [f32], stride: usize, from: usize, cols: &[f32]) {
    let width = cols.len() / (x.len() / stride);
    for (r, c) in x.chunks_exact_mut(stride).zip(cols.chunks_exact(width)) {
        r[from..from + width].copy_from_slice(c);
    }
}

/// A norm's weight and gradient slices, when the norm has a weight.
fn split_norm<'a>(
    params: &'a [f32],
    grads: &'a mut [f32],
    at: Option<usize>,
    d: usize,
) -> (Option<&'a [f32]>, Option<&'a mut [f32]>) {
    match at {
        Some(o) => (Some(&params[o..o + d]), Some(&mut grads[o..o + d])),
        None => (None, None),
    }
}

#[cfg(test)]
impl ModelConfig {
    /// A model small enough for unit tests: d 8, 2 heads, 2 layers, SwiGLU hidden 12.
    pub(crate) fn tiny(norm: NormKind, affine: bool, tying: bool) -> ModelConfig {
        ModelConfig {
            d_model: 8,
            n_heads: 2,
            n_kv_heads: 2,
            n_layers: 2,
            mlp_hidden: 12,
            vocab_size: 20,
            embedding_size: 128,
            rope_theta: 10_000.0,
            eps: 1e-5,
            z_loss: 1e-4,
            norm,
            norm_affine: affine,
            weight_tying: tying,
            clip_qkv: None,
            norm_after: false,
            qk_norm: false,
            qk_norm_affine: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, Moments};

    fn loss_of(model: &Model, params: &[f32], seqs: &[Vec<u32>]) -> f64 {
        let (mut i, mut t) = (Vec::new(), Vec::new());
        let batch = Batch::from_windows(seqs, &mut i, &mut t);
        let s = model.forward(params, &batch);
        s.ce_sum + s.z_sum
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        // OLMo-1 blocks, then OLMo-2 blocks (norm_after, QK-norm) with weighted RMSNorms, and
        // with weightless LayerNorms; multi-query attention (one kv head for both q heads) in
        // both kinds
        for (norm, affine, tying, olmo2, kv_heads) in [
            (NormKind::LayerNorm, false, true, false, 2),
            (NormKind::Rms, true, false, false, 1),
            (NormKind::Rms, true, false, true, 2),
            (NormKind::Rms, true, false, true, 1),
            (NormKind::LayerNorm, false, true, true, 2),
        ] {
            let cfg = ModelConfig {
                n_kv_heads: kv_heads,
                norm_after: olmo2,
                qk_norm: olmo2,
                qk_norm_affine: affine,
                ..ModelConfig::tiny(norm, affine, tying)
            };
            let model = Model::new(cfg, 16);
            let mut params = init_params(&cfg, &Init::new(InitFn::Normal, 0.3), 1);
            // perturb norm weights away from 1 so their gradients are exercised
            for t in &model.layout.tensors {
                if t.role == Role::Norm {
                    for (j, p) in params[t.range()].iter_mut().enumerate() {
                        *p += 0.05 * j as f32;
                    }
                }
            }
            let seqs = vec![vec![3u32, 7, 1, 19, 4, 7], vec![5u32, 5, 0, 2, 18, 9]];
            let (mut i, mut t) = (Vec::new(), Vec::new());
            let batch = Batch::from_windows(&seqs, &mut i, &mut t);
            let mut grads = vec![0.0; params.len()];
            model.forward_backward(&params, &batch, 1.0, &mut grads);
            let (d, kvd) = (cfg.d_model, cfg.kv_dim());
            let lay = &model.layout;
            let (l0, l1) = (lay.layers[0], lay.layers[1]);
            let mut probes = vec![
                3 * d + 1,
                19 * d + 5,
                10 * d + 2,
                // att_proj's q, k and v rows
                l0.att_proj + 5,
                l0.att_proj + (d + 1) * d + 3,
                l0.att_proj + (d + kvd) * d + 9,
                l0.attn_out + 17,
                l0.ff_proj + 30,
                l0.ff_proj + cfg.mlp_hidden * d + 3,
                l0.ff_out + 40,
                l1.att_proj + d * d + 11,
                l1.ff_out + 7,
            ];
            if affine {
                probes.extend([
                    l0.attn_norm.unwrap() + 3,
                    l1.ff_norm.unwrap() + 6,
                    lay.ln_f.unwrap() + 1,
                ]);
            }
            if affine && olmo2 {
                probes.extend([
                    l0.q_norm.unwrap() + 2,
                    l0.k_norm.unwrap() + kvd - 1,
                    l1.q_norm.unwrap() + 7,
                    l1.k_norm.unwrap(),
                ]);
            }
            if let Some(head) = lay.head {
                probes.extend([head + 9 * d + 3, head + 100 * d]);
            }
            for &p in &probes {
                // small enough that truncation error stays below the tolerance for std-0.3
                // weights, large enough for f32 forward passes
                let eps = 3e-3f32;
                let at = |delta: f32| {
                    let mut q = params.clone();
                    q[p] += delta;
                    loss_of(&model, &q, &seqs)
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                assert!(
                    (fd - grads[p] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{norm:?} affine {affine} tying {tying} olmo2 {olmo2} kv heads {kv_heads}: param {p}: finite difference {fd}, backward {}",
                    grads[p]
                );
            }
        }
    }

    #[test]
    fn checkpointed_layers_give_the_same_bits() {
        // 5 layers, so that every strategy computes some blocks again and keeps others; OLMo 1
        // blocks with clip_qkv, and OLMo 2 blocks with grouped-query attention; documents
        for (olmo2, kv_heads, clip) in [(false, 2, Some(0.4)), (true, 1, None)] {
            let cfg = ModelConfig {
                n_layers: 5,
                n_kv_heads: kv_heads,
                norm_after: olmo2,
                qk_norm: olmo2,
                qk_norm_affine: olmo2,
                clip_qkv: clip,
                ..ModelConfig::tiny(NormKind::Rms, true, !olmo2)
            };
            let params = init_params(&cfg, &Init::new(InitFn::Normal, 0.3), 4);
            let seqs = vec![vec![3u32, 7, 1, 19, 4, 7], vec![5u32, 5, 0, 2, 18, 9]];
            let (mut i, mut t) = (Vec::new(), Vec::new());
            let mut batch = Batch::from_windows(&seqs, &mut i, &mut t);
            let starts = crate::ops::document_starts(batch.inputs, batch.t, 7);
            batch.doc_starts = Some(&starts);
            let run = |c: Checkpointing| {
                let model = Model::new(cfg, 16).with_checkpointing(c);
                let mut grads = vec![0.0; params.len()];
                let s = model.forward_backward(&params, &batch, 0.5, &mut grads);
                (s.ce_sum, s.z_sum, s.logprobs, grads)
            };
            let plain = run(Checkpointing::Off);
            assert!(plain.3.iter().all(|g| g.is_finite()) && plain.3.iter().any(|&g| g != 0.0));
            for name in Checkpointing::NAMES {
                let c = Checkpointing::from_name(name).unwrap();
                assert_eq!(c.name(), name);
                let again = (0..5).filter(|&l| c.recomputes(l)).count();
                assert!(again > 0 || c.recomputes_attention(), "{name}");
                let got = run(c);
                assert!(got == plain, "olmo2 {olmo2}: {name} changes the results");
            }
        }
    }

    #[test]
    fn logits_a_chunk_of_rows_at_a_time_score_and_train_alike() {
        // tied and untied heads; an ignored target in the second chunk
        for tying in [true, false] {
            let cfg = ModelConfig::tiny(NormKind::LayerNorm, true, tying);
            let params = init_params(&cfg, &Init::new(InitFn::Normal, 0.3), 5);
            let seqs = vec![
                vec![3u32, 7, 1, 19, 4, 7, 2],
                vec![5u32, 5, 0, 2, 18, 9, 11],
            ];
            let (mut i, mut t) = (Vec::new(), Vec::new());
            let mut batch = Batch::from_windows(&seqs, &mut i, &mut t);
            let mut targets = batch.targets.to_vec();
            targets[5] = IGNORE;
            batch.targets = &targets;
            let run = |rows: Option<usize>| {
                let mut model = Model::new(cfg, 16);
                model.head_rows = rows;
                let mut grads = vec![0.0; params.len()];
                let s = model.forward_backward(&params, &batch, 0.5, &mut grads);
                let f = model.forward(&params, &batch);
                assert_eq!(f.logprobs, s.logprobs);
                (s, grads)
            };
            let (whole, g_whole) = run(None);
            assert_eq!(whole.count, 11);
            for rows in [1, 4, 5, 11] {
                let (s, g) = run(Some(rows));
                // The same to rounding (the GEMM library picks its kernels by shape, a
                // one-row product being a matrix-vector one); the head's gradient sums over
                // the chunks.
                let near = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
                for (a, b) in s.logprobs.iter().zip(&whole.logprobs) {
                    assert!(
                        near(*a as f64, *b as f64),
                        "{rows} rows at a time: {a} vs {b}"
                    );
                }
                assert_eq!((s.logprobs.len(), s.count), (whole.logprobs.len(), 11));
                assert!(near(s.ce_sum, whole.ce_sum) && near(s.z_sum, whole.z_sum));
                for (k, (a, b)) in g.iter().zip(&g_whole).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-5 * (1.0 + b.abs()),
                        "{rows} rows at a time, gradient {k}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn checkpointing_picks_the_blocks_olmo_picks() {
        let picks = |name| {
            let c = Checkpointing::from_name(name).unwrap();
            (0..9).filter(|&l| c.recomputes(l)).collect::<Vec<_>>()
        };
        assert_eq!(picks("whole_layer"), (0..9).collect::<Vec<_>>());
        assert_eq!(picks("one_in_two"), [0, 2, 4, 6, 8]);
        assert_eq!(picks("one_in_three"), [0, 3, 6]);
        assert_eq!(picks("one_in_four"), [0, 4, 8]);
        assert_eq!(picks("one_in_eight"), [0, 8]);
        assert_eq!(picks("two_in_three"), [1, 2, 4, 5, 7, 8]);
        assert_eq!(picks("three_in_four"), [1, 2, 3, 5, 6, 7]);
        assert!(picks("fine_grained").is_empty());
        assert!(Checkpointing::FineGrained.recomputes_attention());
        assert!(!Checkpointing::Off.recomputes(0));
        assert!(!Checkpointing::Off.recomputes_attention());
        assert!(!Checkpointing::WholeLayer.recomputes_attention());
        assert_eq!(Checkpointing::from_name("every_layer"), None);
        assert_eq!(
            Checkpointing::from_name("one_in_three").unwrap().describe(16),
            "; activation checkpointing one_in_three: 6 of 16 blocks computed again in the backward pass"
        );
    }

    #[test]
    fn blocks_are_named_by_their_norms() {
        let olmo1 = ModelConfig::tiny(NormKind::LayerNorm, false, true);
        assert_eq!(
            olmo1.block(),
            "pre-norm blocks (non-parametric LayerNorm, tied head)"
        );
        let olmo2 = ModelConfig {
            norm_after: true,
            qk_norm: true,
            qk_norm_affine: true,
            ..ModelConfig::tiny(NormKind::Rms, true, false)
        };
        assert_eq!(
            olmo2.block(),
            "OLMo 2 blocks (RMSNorm+weight after each branch, QK-norm+weight, untied head)"
        );
    }

    #[test]
    fn batched_scores_equal_one_sequence_at_a_time() {
        let cfg = ModelConfig::tiny(NormKind::LayerNorm, false, true);
        let model = Model::new(cfg, 16);
        let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 3);
        let seqs = vec![vec![1u32, 2, 3, 4, 5], vec![9u32, 8, 7, 6, 5]];
        let both = loss_of(&model, &params, &seqs);
        let one = loss_of(&model, &params, &seqs[..1]) + loss_of(&model, &params, &seqs[1..]);
        assert!((both - one).abs() < 1e-5, "{both} vs {one}");
    }

    #[test]
    fn a_document_scores_alike_wherever_it_sits_in_the_window() {
        // Within documents, a document's positions see only it, and RoPE makes the scores
        // depend on relative positions only: document B after A and its EOS (0) scores as B
        // alone at the window's start, up to rounding.
        let cfg = ModelConfig::tiny(NormKind::LayerNorm, false, true);
        let model = Model::new(cfg, 16);
        let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 3);
        let doc_b = [5u32, 9, 3, 3, 7, 1, 8];
        let after_a: Vec<u32> = [4, 11, 6, 0].iter().chain(&doc_b).copied().collect();
        let alone: Vec<u32> = doc_b.iter().chain(&[2, 2, 2, 2]).copied().collect();
        let scores = |seq: &Vec<u32>, docs: bool| {
            let (mut i, mut t) = (Vec::new(), Vec::new());
            let batch = Batch::from_windows(std::slice::from_ref(seq), &mut i, &mut t);
            let starts = crate::ops::document_starts(batch.inputs, batch.t, 0);
            let batch = Batch {
                doc_starts: docs.then_some(&starts[..]),
                ..batch
            };
            model.forward(&params, &batch).logprobs
        };
        // B's six targets after its first token: positions 4..10 of one window, 0..6 of the other
        let (within, alone) = (scores(&after_a, true), scores(&alone, false));
        for k in 0..6 {
            assert!(
                (within[4 + k] - alone[k]).abs() < 1e-5,
                "target {k}: {} vs {}",
                within[4 + k],
                alone[k]
            );
        }
        // without documents, A shows through
        let across = scores(&after_a, false);
        assert!((0..6).any(|k| (across[4 + k] - alone[k]).abs() > 1e-3));
    }

    #[test]
    fn parameter_counts_match_olmo_1b_and_7b() {
        let olmo = |d, heads, layers, hidden, tying| ModelConfig {
            d_model: d,
            n_heads: heads,
            n_kv_heads: heads,
            n_layers: layers,
            mlp_hidden: hidden,
            vocab_size: 50280,
            embedding_size: 50304,
            rope_theta: 10_000.0,
            eps: 1e-5,
            z_loss: 0.0,
            norm: NormKind::LayerNorm,
            norm_affine: false,
            weight_tying: tying,
            clip_qkv: None,
            norm_after: false,
            qk_norm: false,
            qk_norm_affine: false,
        };
        // the published sizes: OLMo-1B 1,176,764,416; OLMo-7B 6,888,095,744
        assert_eq!(olmo(2048, 16, 16, 8192, true).num_params(), 1_176_764_416);
        assert_eq!(olmo(4096, 32, 32, 11008, false).num_params(), 6_888_095_744);
    }

    #[test]
    fn mitchell_init_scales_output_projections_by_depth() {
        let mut cfg = ModelConfig::tiny(NormKind::LayerNorm, false, true);
        cfg.d_model = 64;
        cfg.n_heads = 4;
        cfg.mlp_hidden = 128;
        let params = init_params(&cfg, &Init::new(InitFn::Mitchell, 0.02), 4);
        let lay = Layout::new(&cfg);
        let std = |r: std::ops::Range<usize>| {
            let v = &params[r];
            (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt()
        };
        let l1 = lay.layers[1];
        let attn_out = std(l1.attn_out..l1.attn_out + 64 * 64);
        let want = 1.0 / (2.0f64 * 64.0 * 2.0).sqrt();
        // a ±3σ truncated normal has std ≈ 0.986σ
        assert!(
            (attn_out / want - 0.986).abs() < 0.03,
            "{attn_out} vs {want}"
        );
        let wte = std(0..128 * 64);
        assert!((wte / (1.0 / 8.0) - 0.986).abs() < 0.03, "{wte}");
        assert!(params.iter().all(|p| p.abs() <= 3.0 / 8.0 + 1e-6));

        // OLMo's embedding options: emb_init_std in every init (0 meaning unset, as OLMo's
        // `or` reads it), scale_emb_init (× √d) in full_megatron's only; the rest unchanged
        let wte_std = |init: Init| {
            let p = init_params(&cfg, &init, 4);
            let v = &p[0..128 * 64];
            let s = (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
            (s, p[128 * 64..] == params[128 * 64..])
        };
        let emb = |kind, emb_std, scale_emb| Init {
            emb_std,
            scale_emb,
            ..Init::new(kind, 0.02)
        };
        for (init, want) in [
            (emb(InitFn::Mitchell, Some(0.5), false), 0.5 * 0.986),
            (emb(InitFn::Mitchell, Some(0.0), false), 0.125 * 0.986),
            (emb(InitFn::Normal, Some(0.5), true), 0.5),
            (emb(InitFn::Normal, None, true), 0.02),
            (emb(InitFn::FullMegatron, None, true), 0.02 * 8.0 * 0.986),
            (emb(InitFn::FullMegatron, Some(0.1), true), 0.1 * 0.986),
            (emb(InitFn::FullMegatron, None, false), 0.02 * 0.986),
        ] {
            let (got, rest_same) = wte_std(init);
            assert!((got / want - 1.0).abs() < 0.03, "{init:?}: {got} vs {want}");
            // (the Mitchell init above, but for the embedding)
            if init.kind == InitFn::Mitchell {
                assert!(rest_same, "{init:?} changed more than the embedding");
            }
        }
    }

    #[test]
    fn adamw_steps_fit_a_fixed_sequence() {
        let cfg = ModelConfig::tiny(NormKind::LayerNorm, false, true);
        let model = Model::new(cfg, 16);
        let mut params = init_params(&cfg, &Init::new(InitFn::Normal, 0.02), 2);
        let seqs = vec![vec![1u32, 2, 3, 4, 5, 6, 7, 8, 9]];
        let (mut i, mut t) = (Vec::new(), Vec::new());
        let batch = Batch::from_windows(&seqs, &mut i, &mut t);
        let opt = AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut state = Moments::zeros(params.len());
        let (mut first, mut last) = (None, 0.0);
        for step in 1..=200 {
            let mut grads = vec![0.0; params.len()];
            let s = model.forward_backward(&params, &batch, 1.0 / 8.0, &mut grads);
            let loss = (s.ce_sum / s.count as f64) as f32;
            first.get_or_insert(loss);
            last = loss;
            opt.step(step, 1e-2, &mut params, &grads, &mut state, true);
        }
        let first = first.unwrap();
        // starts near ln(128) (uniform over the padded vocabulary), ends far below
        assert!((first - (128f32).ln()).abs() < 0.1, "{first}");
        assert!(last < 0.5, "loss went from {first} to {last}");
    }
}
