//! The decoder step (one position, a few rows) on the CPU in f32, on slices.
//!
//! A step runs 6 weight products per layer and, between them, layer norms, attention over the
//! cache, the activation and residual additions on a few rows. As candle tensor operations
//! every one of those small operations allocates its output and dispatches through candle's
//! generic machinery, the transcendental functions run single-threaded through libm, and each
//! weight product hands its work to rayon's pool from outside it (a wake-up of the workers and
//! of the caller per product, ~150 per step). Measured on the 2-core development machine, that
//! was about a third of a Q8_0 step. Here the whole step runs as one job on rayon's pool
//! (the products split from inside it), every intermediate lives in [`HostScratch`] (allocated
//! once with the state), and the small operations are [`crate::cpu_ops`]' vectorised slice
//! kernels. The keys/values go into the same cache tensors the tensor path (prefill, other
//! devices) uses, so the two paths can alternate within one generation.
//!
//! Reference equality: the tensor path is checked against the reference fixtures; this path is
//! checked against the tensor path (`host_step_equals_the_tensor_path`) and, being the step
//! path of CPU f32 generation, by the same fixtures through `generate`.

use super::{Decoder, DecoderError, DecoderState, Proj, Quant};
use crate::cpu_ops::{self, KvElem};
use crate::matvec::{self, Q4KScratch, Q8Scratch};
use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, DType, Device, Layout, Module, Tensor};
use candle_nn::LayerNorm;
use rayon::prelude::*;

/// Every intermediate of a host step for one state (batch `b`, hidden `d`), allocated once in
/// [`Decoder::new_state`]: no step allocates (apart from the returned logits tensor).
#[derive(Debug)]
pub(super) struct HostScratch {
    /// Residual stream: (b, d).
    x: Vec<f32>,
    /// Layer-norm output: (b, d).
    h: Vec<f32>,
    /// Self-attention q, k, v: (b, 3d).
    qkv: Vec<f32>,
    /// Attention output (heads concatenated): (b, d).
    attn: Vec<f32>,
    /// A projection back to the width: (b, d).
    out: Vec<f32>,
    /// Feed-forward hidden: (b, ffn).
    ffn: Vec<f32>,
    /// Logits of all codebooks: (b, codebooks * vocab).
    logits: Vec<f32>,
    /// Attention scores: (b * heads, max(capacity, cond_len)).
    scores: Vec<f32>,
    /// Quantised activations of Q8_0 and Q4K products.
    q8: QuantScratch,
}

/// Quantised activations of the quantised products, kept between products.
#[derive(Debug, Default)]
pub(super) struct QuantScratch {
    q8_0: Q8Scratch,
    q4k: Q4KScratch,
}

impl HostScratch {
    pub(super) fn new(dec: &Decoder, batch: usize, capacity: usize, cond_len: usize) -> Self {
        let c = &dec.cfg;
        let (b, d) = (batch, c.hidden_size);
        Self {
            x: vec![0.0; b * d],
            h: vec![0.0; b * d],
            qkv: vec![0.0; b * 3 * d],
            attn: vec![0.0; b * d],
            out: vec![0.0; b * d],
            ffn: vec![0.0; b * c.ffn_dim],
            logits: vec![0.0; b * c.num_codebooks * c.vocab_size],
            scores: vec![0.0; b * c.num_attention_heads * capacity.max(cond_len).max(1)],
            q8: QuantScratch::default(),
        }
    }
}

/// [`cpu_ops::with_slice`] for a tensor of the host step.
fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    cpu_ops::with_slice(t, "host step", f)
}

/// [`with_slice`] for f32.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_slice(t, f)
}

/// Layer norm of the rows of `x` into `out` with `norm`'s weight, bias and eps.
fn norm_rows(norm: &LayerNorm, x: &[f32], out: &mut [f32]) -> candle_core::Result<()> {
    let bias = norm
        .bias()
        .ok_or_else(|| candle_core::Error::Msg("host step: layer norm without bias".into()))?;
    with_f32(norm.weight(), |w| {
        with_f32(bias, |b| {
            cpu_ops::layer_norm(x, w, b, norm.eps() as f32, out)
        })
    })?
}

/// Writes one position of keys or values into a cache `(batch, heads, capacity, head_dim)`:
/// head `j` of row `r` comes from `src[r * stride + offset + j * head_dim..][..head_dim]`.
struct WritePosition<'a> {
    src: &'a [f32],
    stride: usize,
    offset: usize,
    batch: usize,
    heads: usize,
    head_dim: usize,
    capacity: usize,
    pos: usize,
}

impl candle_core::InplaceOp1 for WritePosition<'_> {
    fn name(&self) -> &'static str {
        "segue-write-position"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match storage {
            CpuStorage::F32(data) => self.write(data, layout),
            CpuStorage::F16(data) => self.write(data, layout),
            _ => candle_core::bail!("segue-write-position: cache is neither f32 nor f16"),
        }
    }
}

impl WritePosition<'_> {
    fn write<T: KvElem>(&self, data: &mut [T], layout: &Layout) -> candle_core::Result<()> {
        let Some((o, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("segue-write-position: cache not contiguous");
        };
        let (hd, cap) = (self.head_dim, self.capacity);
        if end - o != self.batch * self.heads * cap * hd || self.pos >= cap {
            candle_core::bail!("segue-write-position: cache shape mismatch");
        }
        for r in 0..self.batch {
            for j in 0..self.heads {
                let s = r * self.stride + self.offset + j * hd;
                let dst = o + ((r * self.heads + j) * cap + self.pos) * hd;
                for (d, &v) in data[dst..dst + hd].iter_mut().zip(&self.src[s..s + hd]) {
                    *d = T::from_f32(v);
                }
            }
        }
        Ok(())
    }
}

/// Attention of every (row, head) query in `q` (rows of `stride` values, head `j` at
/// `offset + j * head_dim`) over the first `n` positions of a key/value cache (batch, heads,
/// capacity, head_dim) in f32 or f16, with an optional additive mask (batch, mask_len) (its
/// first `n` values used). Parallel over the (row, head) pairs when there is enough work.
struct Attention<'a> {
    q: &'a [f32],
    stride: usize,
    offset: usize,
    capacity: usize,
    n: usize,
    mask: Option<(&'a [f32], usize)>,
    heads: usize,
    head_dim: usize,
}

impl Attention<'_> {
    /// Writes the attention output (batch, heads * head_dim) into `out`; `scores` is scratch
    /// of (batch * heads, at least n).
    fn over(
        &self,
        keys: &Tensor,
        values: &Tensor,
        scores: &mut [f32],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        match keys.dtype() {
            DType::F16 => with_slice(keys, |k| {
                with_slice(values, |v| self.run::<half::f16>(k, v, scores, out))
            })??,
            _ => with_f32(keys, |k| with_f32(values, |v| self.run(k, v, scores, out)))??,
        }
    }

    fn run<T: KvElem>(
        &self,
        kd: &[T],
        vd: &[T],
        scores: &mut [f32],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let (hd, n, heads) = (self.head_dim, self.n, self.heads);
        let pair_count = out.len() / hd;
        let score_len = scores.len() / pair_count;
        if kd.len() < pair_count * self.capacity * hd || vd.len() != kd.len() || n > score_len {
            candle_core::bail!("host step: attention shapes do not match the cache");
        }
        let task = |(i, (o, s)): (usize, (&mut [f32], &mut [f32]))| {
            let (r, j) = (i / heads, i % heads);
            let base = i * self.capacity * hd;
            let qs = r * self.stride + self.offset + j * hd;
            let m = self.mask.map(|(m, len)| &m[r * len..r * len + n]);
            cpu_ops::attend(
                &self.q[qs..qs + hd],
                &kd[base..base + n * hd],
                &vd[base..base + n * hd],
                m,
                s,
                o,
            );
        };
        // About 32k multiply-adds per task at least: below that, rayon's hand-off costs more
        // than it saves.
        let per_pair = 2 * n * hd;
        if per_pair * pair_count < 1 << 15 {
            out.chunks_mut(hd)
                .zip(scores.chunks_mut(score_len))
                .enumerate()
                .for_each(task);
        } else {
            let min = (1usize << 15).div_ceil(per_pair).max(1);
            out.par_chunks_mut(hd)
                .zip(scores.par_chunks_mut(score_len))
                .with_min_len(min)
                .enumerate()
                .for_each(task);
        }
        Ok(())
    }
}

impl Proj {
    /// `x` (rows, in) -> `y` (rows, out) on slices, for a CPU f32 step: dense f32 on
    /// [`matvec::matvec_into`], Q8_0 on [`matvec::matvec_q8_0_into`], Q4K on
    /// [`matvec::matvec_q4k_into`], any other format through [`Proj::forward`] (candle;
    /// allocates).
    fn forward_host(
        &self,
        x: &[f32],
        rows: usize,
        q8: &mut QuantScratch,
        y: &mut [f32],
    ) -> candle_core::Result<()> {
        match self {
            Self::Dense(w) if w.dtype() == DType::F32 && w.device().is_cpu() => {
                let inner = x.len() / rows;
                with_f32(w, |w| matvec::matvec_into(x, rows, w, inner, y))
            }
            Self::Quantized {
                q: QMatMul::QTensor(t),
                quant: Quant::Q8_0,
                ..
            } => matvec::matvec_q8_0_into(x, rows, t, &mut q8.q8_0, y),
            Self::Quantized {
                q: QMatMul::QTensor(t),
                quant: Quant::Q4K,
                ..
            } => matvec::matvec_q4k_into(x, rows, t, &mut q8.q4k, y),
            _ => {
                let xt = Tensor::from_slice(x, (rows, x.len() / rows), &Device::Cpu)?;
                let out = self.forward(&xt, true)?.flatten_all()?;
                with_f32(&out, |o| y.copy_from_slice(o))
            }
        }
    }
}

impl Decoder {
    /// Whether [`Decoder::host_step`] runs `time` positions for `state`: the CPU in f32 with
    /// the host kernels and step on, one position, and a state built with host scratch.
    pub(super) fn host_step_applies(&self, state: &DecoderState, time: usize) -> bool {
        self.host_kernels && self.host_step && time == 1 && state.host.is_some()
    }

    /// Feeds one position (`ids`: (batch, codebooks, 1) u32, checked by the caller) and
    /// returns the logits (batch, codebooks, vocab) f32, as the tensor path does.
    pub(super) fn host_step(
        &self,
        state: &mut DecoderState,
        ids: &Tensor,
    ) -> Result<Tensor, DecoderError> {
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let batch = state.batch;
        // One job on rayon's pool for the whole step: the products below split from inside a
        // worker instead of waking the pool (and then this thread) once per product.
        let logits = rayon::scope(|_| self.host_step_on_pool(state, &ids))?;
        let c = &self.cfg;
        Ok(Tensor::from_slice(
            logits,
            (batch, c.num_codebooks, c.vocab_size),
            &Device::Cpu,
        )?)
    }

    fn host_step_on_pool<'s>(
        &self,
        state: &'s mut DecoderState,
        ids: &[u32],
    ) -> Result<&'s [f32], DecoderError> {
        let c = &self.cfg;
        let (b, d, k) = (state.batch, c.hidden_size, c.num_codebooks);
        let (h, hd) = (c.num_attention_heads, c.head_dim());
        let pos = state.pos;
        let cap = state.capacity;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let s = state
            .host
            .as_mut()
            .ok_or_else(|| DecoderError::Shape("state has no host scratch".into()))?;

        // Embeddings: the codebooks' rows summed, plus the position.
        let rows = c.vocab_size + 1;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(DecoderError::Shape(format!(
                "token id {bad} outside the embedding tables ({rows} rows)"
            )));
        }
        with_f32(&self.embed, |table| {
            with_f32(&self.positions, |positions| {
                for r in 0..b {
                    let x = &mut s.x[r * d..(r + 1) * d];
                    x.fill(0.0);
                    for cb in 0..k {
                        let row = cb * rows + ids[r * k + cb] as usize;
                        cpu_ops::add_assign(x, &table[row * d..(row + 1) * d]);
                    }
                    cpu_ops::add_assign(x, &positions[pos * d..(pos + 1) * d]);
                }
            })
        })??;

        let cond_len = state.cross_mask.dim(3)?;
        let cross_mask = state.cross_mask.flatten_all()?;
        for (layer, ls) in self.layers.iter().zip(&state.layers) {
            // Self-attention.
            norm_rows(&layer.self_attn_norm, &s.x, &mut s.h)?;
            layer
                .self_qkv
                .forward_host(&s.h, b, &mut s.q8, &mut s.qkv)?;
            for r in 0..b {
                cpu_ops::scale(&mut s.qkv[r * 3 * d..r * 3 * d + d], scale);
            }
            for (cache, offset) in [(&ls.k, d), (&ls.v, 2 * d)] {
                cache.inplace_op1(&WritePosition {
                    src: &s.qkv,
                    stride: 3 * d,
                    offset,
                    batch: b,
                    heads: h,
                    head_dim: hd,
                    capacity: cap,
                    pos,
                })?;
            }
            Attention {
                q: &s.qkv,
                stride: 3 * d,
                offset: 0,
                capacity: cap,
                n: pos + 1,
                mask: None,
                heads: h,
                head_dim: hd,
            }
            .over(&ls.k, &ls.v, &mut s.scores, &mut s.attn)?;
            layer
                .self_out
                .forward_host(&s.attn, b, &mut s.q8, &mut s.out)?;
            cpu_ops::add_assign(&mut s.x, &s.out);

            // Cross-attention over the condition.
            norm_rows(&layer.cross_norm, &s.x, &mut s.h)?;
            layer.cross_q.forward_host(&s.h, b, &mut s.q8, &mut s.out)?;
            cpu_ops::scale(&mut s.out, scale);
            with_f32(&cross_mask, |m| {
                Attention {
                    q: &s.out,
                    stride: d,
                    offset: 0,
                    capacity: cond_len,
                    n: cond_len,
                    mask: Some((m, cond_len)),
                    heads: h,
                    head_dim: hd,
                }
                .over(&ls.cross_k, &ls.cross_v, &mut s.scores, &mut s.attn)
            })??;
            layer
                .cross_out
                .forward_host(&s.attn, b, &mut s.q8, &mut s.out)?;
            cpu_ops::add_assign(&mut s.x, &s.out);

            // Feed-forward.
            norm_rows(&layer.ffn_norm, &s.x, &mut s.h)?;
            layer.fc1.forward_host(&s.h, b, &mut s.q8, &mut s.ffn)?;
            if !cpu_ops::activation(c.activation_function, &mut s.ffn) {
                let t = Tensor::from_slice(&s.ffn[..], s.ffn.len(), &Device::Cpu)?;
                let t = c.activation_function.forward(&t)?;
                with_f32(&t, |v| s.ffn.copy_from_slice(v))?;
            }
            layer.fc2.forward_host(&s.ffn, b, &mut s.q8, &mut s.out)?;
            cpu_ops::add_assign(&mut s.x, &s.out);
        }
        state.pos = pos + 1;

        norm_rows(&self.final_norm, &s.x, &mut s.h)?;
        self.heads.forward_host(&s.h, b, &mut s.q8, &mut s.logits)?;
        Ok(&s.logits)
    }
}
