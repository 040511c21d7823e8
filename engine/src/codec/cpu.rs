//! Host (CPU) kernels for SEANet, used when the model lives on the CPU. candle's CPU conv1d
//! builds its im2col matrix single-threaded with cache-hostile strides and its LSTM would be a
//! dozen small tensor ops per step; here a conv is a padded copy (with the preceding ELU fused
//! in) plus one GEMM per kernel tap reading shifted views of that copy, and the LSTM runs its
//! recurrence on plain slices. Results equal the tensor path to float rounding (both are tested
//! against the reference).

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::conv::{pad_indices, PadMode};

/// Activations on the host, `(batch, channels, time)` row-major, owned.
#[derive(Clone, Debug)]
pub(crate) struct Act {
    pub data: Vec<f32>,
    pub b: usize,
    pub c: usize,
    pub t: usize,
}

impl Act {
    pub fn zeros(b: usize, c: usize, t: usize) -> Self {
        Self {
            data: vec![0.0; b * c * t],
            b,
            c,
            t,
        }
    }

    fn item(&self, i: usize) -> &[f32] {
        &self.data[i * self.c * self.t..(i + 1) * self.c * self.t]
    }
}

fn parallelism() -> Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

/// ELU with alpha 1, as `torch.nn.ELU`.
#[inline]
pub(crate) fn elu(x: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        x.exp_m1()
    }
}

/// In-place ELU, parallel over chunks.
pub(crate) fn elu_inplace(a: &mut Act) {
    a.data
        .par_chunks_mut(1 << 14)
        .for_each(|c| c.iter_mut().for_each(|x| *x = elu(*x)));
}

/// Adds `other` element-wise (same shape).
pub(crate) fn add_inplace(a: &mut Act, other: &Act) {
    debug_assert_eq!(a.data.len(), other.data.len());
    a.data
        .par_chunks_mut(1 << 14)
        .zip(other.data.par_chunks(1 << 14))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
}

/// A padded copy of `x` along time (`left`/`right` samples per `mode`), with ELU applied first
/// when `elu_first`.
pub(crate) fn pad(x: &Act, left: usize, right: usize, mode: PadMode, elu_first: bool) -> Act {
    let idx = pad_indices(x.t, left, right, mode);
    let tp = idx.len();
    let mut out = Act::zeros(x.b, x.c, tp);
    let t = x.t;
    out.data
        .par_chunks_mut(tp)
        .zip(x.data.par_chunks(t))
        .for_each(|(dst, src)| {
            // The middle is a straight copy; only the edges need the index map.
            let mid = &mut dst[left..left + t];
            if elu_first {
                mid.iter_mut().zip(src).for_each(|(d, s)| *d = elu(*s));
            } else {
                mid.copy_from_slice(src);
            }
            for (p, i) in idx.iter().enumerate() {
                if p >= left && p < left + t {
                    continue;
                }
                dst[p] = match i {
                    Some(i) if elu_first => elu(src[*i]),
                    Some(i) => src[*i],
                    None => 0.0,
                };
            }
        });
    out
}

/// Fills every row `o` of every item with `bias[o]`: (batch, c_out, t).
fn bias_filled(b: usize, bias: &[f32], t: usize) -> Act {
    let c = bias.len();
    let mut out = Act::zeros(b, c, t);
    out.data
        .par_chunks_mut(t.max(1))
        .enumerate()
        .for_each(|(row, dst)| dst.fill(bias[row % c]));
    out
}

/// Valid (unpadded) strided, dilated conv1d of an already padded `x`: weight (c_out, c_in, k)
/// row-major, bias (c_out) -> (batch, c_out, (t - (k - 1) * dilation - 1) / stride + 1).
pub(crate) fn conv1d(
    x: &Act,
    weight: &[f32],
    bias: &[f32],
    k: usize,
    stride: usize,
    dilation: usize,
) -> Act {
    let c_out = bias.len();
    let c_in = x.c;
    debug_assert_eq!(weight.len(), c_out * c_in * k);
    let span = (k - 1) * dilation + 1;
    let t_out = (x.t - span) / stride + 1;
    let mut out = bias_filled(x.b, bias, t_out);
    let par = parallelism();
    for i in 0..x.b {
        let src = x.item(i);
        let dst = &mut out.data[i * c_out * t_out..(i + 1) * c_out * t_out];
        if c_in * k <= 32 {
            // Few input rows (the first conv: one audio channel): one GEMM over an explicit
            // (c_in * k, t_out) column matrix beats k rank-c_in updates.
            let rows = c_in * k;
            let mut col = vec![0f32; rows * t_out];
            for ci in 0..c_in {
                for j in 0..k {
                    let r = &mut col[(ci * k + j) * t_out..(ci * k + j + 1) * t_out];
                    let base = ci * x.t + j * dilation;
                    for (tt, v) in r.iter_mut().enumerate() {
                        *v = src[base + tt * stride];
                    }
                }
            }
            // SAFETY: every pointer/stride pair addresses inside its slice:
            // dst (c_out, t_out), weight (c_out, rows), col (rows, t_out).
            unsafe {
                gemm(
                    c_out,
                    t_out,
                    rows,
                    dst.as_mut_ptr(),
                    1,
                    t_out as isize,
                    true,
                    weight.as_ptr(),
                    1,
                    rows as isize,
                    col.as_ptr(),
                    1,
                    t_out as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        } else {
            for j in 0..k {
                // dst (c_out, t_out) += W[:, :, j] (c_out, c_in) @ x[:, j*d + s*t] (c_in, t_out)
                // SAFETY: W[o, ci, j] = weight[o * c_in * k + ci * k + j] for o < c_out,
                // ci < c_in; x[ci, j*d + s*t] lies in the item since
                // j*d + s*(t_out - 1) <= span - 1 + s*(t_out - 1) < x.t.
                unsafe {
                    gemm(
                        c_out,
                        t_out,
                        c_in,
                        dst.as_mut_ptr(),
                        1,
                        t_out as isize,
                        true,
                        weight.as_ptr().add(j),
                        k as isize,
                        (c_in * k) as isize,
                        src.as_ptr().add(j * dilation),
                        stride as isize,
                        x.t as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
            }
        }
    }
    out
}

/// Transposed conv1d: weight (c_in, c_out, k) row-major, bias (c_out), output trimmed by
/// `left` / `right` samples of the full `(t - 1) * stride + k`. ELU is applied to the input
/// first when `elu_first`.
pub(crate) fn conv_transpose1d(
    x: &Act,
    weight: &[f32],
    bias: &[f32],
    k: usize,
    stride: usize,
    (left, right): (usize, usize),
    elu_first: bool,
) -> Act {
    let c_out = bias.len();
    let c_in = x.c;
    debug_assert_eq!(weight.len(), c_in * c_out * k);
    let full = (x.t - 1) * stride + k;
    let mut out = bias_filled(x.b, bias, full);
    let x_elu;
    let x = if elu_first {
        let mut e = x.clone();
        elu_inplace(&mut e);
        x_elu = e;
        &x_elu
    } else {
        x
    };
    let par = parallelism();
    for i in 0..x.b {
        let src = x.item(i);
        let dst = &mut out.data[i * c_out * full..(i + 1) * c_out * full];
        for j in 0..k {
            // dst[:, s*t + j] (c_out, t) += W[:, :, j]^T (c_out, c_in) @ x (c_in, t)
            // SAFETY: W[ci, o, j] = weight[ci * c_out * k + o * k + j]; the destination column
            // s*(t - 1) + j < full.
            unsafe {
                gemm(
                    c_out,
                    x.t,
                    c_in,
                    dst.as_mut_ptr().add(j),
                    stride as isize,
                    full as isize,
                    true,
                    weight.as_ptr().add(j),
                    (c_out * k) as isize,
                    k as isize,
                    src.as_ptr(),
                    1,
                    x.t as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
    }
    if left == 0 && right == 0 {
        return out;
    }
    let t = full - left - right;
    let mut trimmed = Act::zeros(out.b, c_out, t);
    trimmed
        .data
        .par_chunks_mut(t)
        .zip(out.data.par_chunks(full))
        .for_each(|(d, s)| d.copy_from_slice(&s[left..left + t]));
    trimmed
}

/// One LSTM layer's weights on the host, borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LstmWeights<'a> {
    /// (h, 4h) row-major: `weight_ih_l{k}` transposed.
    pub w_ih_t: &'a [f32],
    /// (4h, h) row-major: `weight_hh_l{k}`.
    pub w_hh: &'a [f32],
    /// (4h): `bias_ih + bias_hh`.
    pub bias: &'a [f32],
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Dot product with 8 independent accumulators (vectorisable).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() - a.len() % 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// Stacked LSTM with the skip connection: x (batch, h, t) -> lstm(x) + x (batch, h, t).
pub(crate) fn lstm(x: &Act, layers: &[LstmWeights<'_>]) -> Act {
    let (b, h, t) = (x.b, x.c, x.t);
    let g4 = 4 * h;
    // Time-major sequence (t, batch, h).
    let mut seq = vec![0f32; t * b * h];
    for bi in 0..b {
        for ci in 0..h {
            let row = &x.data[(bi * h + ci) * t..(bi * h + ci + 1) * t];
            for (ti, v) in row.iter().enumerate() {
                seq[(ti * b + bi) * h + ci] = *v;
            }
        }
    }
    let skip = seq.clone();
    let par = parallelism();
    for layer in layers {
        // Input projection of all steps at once: (t*b, 4h) = seq (t*b, h) @ W_ih^T + bias.
        let mut xproj = vec![0f32; t * b * g4];
        xproj
            .par_chunks_mut(g4)
            .for_each(|r| r.copy_from_slice(layer.bias));
        // SAFETY: seq is (t*b, h), W_ih^T is (h, 4h), xproj is (t*b, 4h), all row-major.
        unsafe {
            gemm(
                t * b,
                g4,
                h,
                xproj.as_mut_ptr(),
                1,
                g4 as isize,
                true,
                seq.as_ptr(),
                1,
                h as isize,
                layer.w_ih_t.as_ptr(),
                1,
                g4 as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        let mut hs = vec![0f32; b * h];
        let mut cs = vec![0f32; b * h];
        let mut gates = vec![0f32; b * g4];
        for ti in 0..t {
            // gates (b, 4h) = xproj[t] + h_prev @ W_hh^T: one pass over W_hh's rows, in
            // parallel blocks of rows, each row reused for every batch item.
            let xp = &xproj[ti * b * g4..(ti + 1) * b * g4];
            let w_hh = layer.w_hh;
            let hs_ref = &hs;
            // Layout of `gates` while computing: (4h, b) so each row block is contiguous.
            gates
                .par_chunks_mut(64 * b)
                .enumerate()
                .for_each(|(blk, out)| {
                    for (r, o) in out.chunks_mut(b).enumerate() {
                        let row = blk * 64 + r;
                        let w = &w_hh[row * h..(row + 1) * h];
                        for (bi, v) in o.iter_mut().enumerate() {
                            *v = xp[bi * g4 + row] + dot(w, &hs_ref[bi * h..(bi + 1) * h]);
                        }
                    }
                });
            for bi in 0..b {
                for j in 0..h {
                    let g = |q: usize| gates[(q * h + j) * b + bi];
                    let (ig, fg, gg, og) =
                        (sigmoid(g(0)), sigmoid(g(1)), g(2).tanh(), sigmoid(g(3)));
                    let c = fg * cs[bi * h + j] + ig * gg;
                    cs[bi * h + j] = c;
                    hs[bi * h + j] = og * c.tanh();
                }
            }
            seq[ti * b * h..(ti + 1) * b * h].copy_from_slice(&hs);
        }
    }
    // Skip connection and back to (batch, h, t).
    let mut out = Act::zeros(b, h, t);
    for bi in 0..b {
        for ci in 0..h {
            let row = &mut out.data[(bi * h + ci) * t..(bi * h + ci + 1) * t];
            for (ti, v) in row.iter_mut().enumerate() {
                let k = (ti * b + bi) * h + ci;
                *v = seq[k] + skip[k];
            }
        }
    }
    out
}
