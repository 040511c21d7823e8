//! SEANet's padded, weight-normalised 1-D convolutions. Mirrors `EncodecConv1d` and
//! `EncodecConvTranspose1d` in transformers' `models/encodec/modeling_encodec.py`.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use super::cpu::{self, Act};
use super::weights::{get, weight_norm, HostView};
use super::{CodecError, Config};

/// How a convolution pads its input (`pad_mode` in `config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    /// Mirror without repeating the edge sample (`torch.nn.functional.pad(mode="reflect")`).
    Reflect,
    /// Zeros (`"constant"` / `"zero"`).
    Zero,
    /// Repeat the edge sample (`"replicate"`).
    Replicate,
}

impl PadMode {
    pub(crate) fn parse(s: &str) -> Result<Self, CodecError> {
        match s {
            "reflect" => Ok(Self::Reflect),
            "constant" | "zero" | "zeros" => Ok(Self::Zero),
            "replicate" => Ok(Self::Replicate),
            other => Err(CodecError::Config(format!(
                "pad_mode {other:?} is not supported (reflect, constant, replicate)"
            ))),
        }
    }
}

/// The reference's `_get_extra_padding_for_conv1d`: how many samples to add on the right so that
/// the last window of a strided convolution is complete (`kernel` is the effective, dilated size).
///
/// The reference computes `ceil((length - kernel + padding_total) / stride + 1) - 1` in f32; this
/// is the exact integer form of the same value.
pub fn extra_padding_for_conv1d(length: usize, kernel: usize, stride: usize) -> usize {
    let padding_total = kernel as i64 - stride as i64;
    let num = length as i64 - kernel as i64 + padding_total; // = length - stride
    let s = stride as i64;
    // ceil(num / s) for either sign of num.
    let ceil_div = if num >= 0 {
        (num + s - 1) / s
    } else {
        -((-num) / s)
    };
    let n_frames = ceil_div + 1 - 1;
    let ideal = n_frames * s + kernel as i64 - padding_total;
    (ideal - length as i64).max(0) as usize
}

/// Source index of every output sample of a padded signal of `len` samples with `left` / `right`
/// samples of padding, or `None` where the padding is zeros. Reflect padding follows the
/// reference's `_pad1d`: when the signal is not longer than the padding, it is first extended
/// with zeros on the right so that the reflection exists, and those zeros are cut off again.
pub fn pad_indices(len: usize, left: usize, right: usize, mode: PadMode) -> Vec<Option<usize>> {
    let total = left + len + right;
    match mode {
        PadMode::Zero => (0..total)
            .map(|i| (i >= left && i < left + len).then(|| i - left))
            .collect(),
        PadMode::Replicate => (0..total)
            .map(|i| Some(i.saturating_sub(left).min(len - 1)))
            .collect(),
        PadMode::Reflect => {
            let max_pad = left.max(right);
            let extra = if len <= max_pad { max_pad - len + 1 } else { 0 };
            let ext_len = len + extra; // the zero-extended signal, longer than any padding
            (0..total)
                .map(|i| {
                    // Position in the zero-extended signal, reflected at both ends.
                    let p = i as i64 - left as i64;
                    let q = if p < 0 {
                        -p
                    } else if p >= ext_len as i64 {
                        2 * (ext_len as i64 - 1) - p
                    } else {
                        p
                    } as usize;
                    (q < len).then_some(q)
                })
                .collect()
        }
    }
}

/// Pads the last axis of `xs` (batch, channels, time) by `left` / `right` samples.
pub(crate) fn pad1d(
    xs: &Tensor,
    left: usize,
    right: usize,
    mode: PadMode,
) -> Result<Tensor, CodecError> {
    if left == 0 && right == 0 {
        return Ok(xs.clone());
    }
    let xs = &xs.contiguous()?;
    let len = xs.dim(D::Minus1)?;
    match mode {
        PadMode::Zero => Ok(xs.pad_with_zeros(D::Minus1, left, right)?),
        PadMode::Replicate => Ok(xs.pad_with_same(D::Minus1, left, right)?),
        PadMode::Reflect => {
            let idx = pad_indices(len, left, right, mode);
            if idx.iter().all(Option::is_some) {
                let ids: Vec<u32> = idx.into_iter().map(|i| i.unwrap_or(0) as u32).collect();
                let n = ids.len();
                let ids = Tensor::from_vec(ids, n, xs.device())?;
                Ok(xs.index_select(&ids, 2)?)
            } else {
                // Short input: gather from a copy with one trailing zero (index `len`).
                let ext = xs.pad_with_zeros(D::Minus1, 0, 1)?;
                let ids: Vec<u32> = idx.into_iter().map(|i| i.unwrap_or(len) as u32).collect();
                let n = ids.len();
                let ids = Tensor::from_vec(ids, n, xs.device())?;
                Ok(ext.index_select(&ids, 2)?)
            }
        }
    }
}

/// `EncodecConv1d`: a weight-normalised conv1d with SEANet's padding (non-causal: the padding is
/// split, the larger half on the left; causal: all on the left) and the extra right padding that
/// completes the last stride.
#[derive(Clone, Debug)]
pub struct Conv1d {
    /// (out_channels, in_channels, kernel)
    weight: Tensor,
    /// (kernel, out_channels, in_channels) contiguous, for the host kernels (CPU only): each
    /// tap's matrix is contiguous, so GEMM packs it with sequential reads.
    weight_taps: Option<Tensor>,
    /// (1, out_channels, 1)
    bias: Tensor,
    kernel: usize,
    stride: usize,
    dilation: usize,
    causal: bool,
    pad_mode: PadMode,
}

impl Conv1d {
    /// `vb` points at the `EncodecConv1d` module; the weights are under `vb.pp("conv")`.
    pub fn new(
        cfg: &Config,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self, CodecError> {
        let vb = vb.pp("conv");
        let weight = weight_norm(&vb, &[out_c, in_c, kernel], out_c, 0)?;
        let bias = get(&vb, &[out_c], "bias")?.reshape((1, out_c, 1))?;
        let weight_taps = if weight.device().is_cpu() {
            Some(weight.permute((2, 0, 1))?.contiguous()?)
        } else {
            None
        };
        Ok(Self {
            weight,
            weight_taps,
            bias,
            kernel,
            stride,
            dilation,
            causal: cfg.use_causal_conv,
            pad_mode: PadMode::parse(&cfg.pad_mode)?,
        })
    }

    /// Left and right padding for an input of `len` samples.
    fn padding(&self, len: usize) -> (usize, usize) {
        let kernel = (self.kernel - 1) * self.dilation + 1;
        let padding_total = kernel - self.stride;
        let extra = extra_padding_for_conv1d(len, kernel, self.stride);
        if self.causal {
            (padding_total, extra)
        } else {
            let right = padding_total / 2;
            (padding_total - right, right + extra)
        }
    }

    /// (batch, in_channels, time) -> (batch, out_channels, ceil(time / stride))
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, CodecError> {
        let (left, right) = self.padding(xs.dim(D::Minus1)?);
        let xs = pad1d(xs, left, right, self.pad_mode)?;
        let ys = xs.conv1d(&self.weight, 0, self.stride, self.dilation, 1)?;
        Ok(ys.broadcast_add(&self.bias)?)
    }

    /// [`Self::forward`] on host buffers, with `elu(x)` as input when `elu_first`.
    pub(crate) fn forward_host(&self, xs: &Act, elu_first: bool) -> Result<Act, CodecError> {
        let (left, right) = self.padding(xs.t);
        let idx = pad_indices(xs.t, left, right, self.pad_mode);
        let (w, b) = (HostView::new(&self.weight)?, HostView::new(&self.bias)?);
        let taps = HostView::new(self.weight_taps.as_ref().unwrap_or(&self.weight))?;
        Ok(cpu::conv1d(
            xs,
            (&idx, left),
            elu_first,
            (w.slice(), taps.slice()),
            b.slice(),
            self.kernel,
            self.stride,
            self.dilation,
        ))
    }
}

/// candle's `conv_transpose1d` one batch item at a time: with a batch of more than one, candle
/// 0.11.1's CPU implementation (the col2im path) returns wrong values for every item after the
/// first (see the `transposed_conv_kernels_match_definition` test).
pub(crate) fn conv_transpose1d_per_item(
    xs: &Tensor,
    weight: &Tensor,
    stride: usize,
) -> Result<Tensor, CodecError> {
    let b = xs.dim(0)?;
    if b == 1 {
        return Ok(xs.conv_transpose1d(weight, 0, 0, stride, 1, 1)?);
    }
    let items = (0..b)
        .map(|i| {
            xs.narrow(0, i, 1)?
                .conv_transpose1d(weight, 0, 0, stride, 1, 1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&items, 0)?)
}

/// `EncodecConvTranspose1d`: a weight-normalised transposed conv1d whose output is trimmed by
/// `kernel - stride` samples (split as in [`Conv1d`], or per `trim_right_ratio` when causal).
#[derive(Clone, Debug)]
pub struct ConvTranspose1d {
    /// (in_channels, out_channels, kernel)
    weight: Tensor,
    /// (kernel, out_channels, in_channels) contiguous (each tap's transposed matrix), for the
    /// host kernels (CPU only).
    weight_taps: Option<Tensor>,
    /// (1, out_channels, 1)
    bias: Tensor,
    kernel: usize,
    stride: usize,
    causal: bool,
    trim_right_ratio: f64,
}

impl ConvTranspose1d {
    /// `vb` points at the `EncodecConvTranspose1d` module; the weights are under `vb.pp("conv")`.
    /// Weight norm acts on dim 0 (input channels) as in PyTorch's `weight_norm` default.
    pub fn new(
        cfg: &Config,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self, CodecError> {
        let vb = vb.pp("conv");
        let weight = weight_norm(&vb, &[in_c, out_c, kernel], in_c, 0)?;
        let bias = get(&vb, &[out_c], "bias")?.reshape((1, out_c, 1))?;
        let weight_taps = if weight.device().is_cpu() {
            Some(weight.permute((2, 1, 0))?.contiguous()?)
        } else {
            None
        };
        Ok(Self {
            weight,
            weight_taps,
            bias,
            kernel,
            stride,
            causal: cfg.use_causal_conv,
            trim_right_ratio: cfg.trim_right_ratio,
        })
    }

    /// Samples trimmed from the left and right of the full transposed-conv output.
    fn trim(&self) -> (usize, usize) {
        let padding_total = self.kernel - self.stride;
        let right = if self.causal {
            (padding_total as f64 * self.trim_right_ratio).ceil() as usize
        } else {
            padding_total / 2
        };
        (padding_total - right, right)
    }

    /// (batch, in_channels, time) -> (batch, out_channels, time * stride)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, CodecError> {
        let ys = conv_transpose1d_per_item(xs, &self.weight, self.stride)?;
        let ys = ys.broadcast_add(&self.bias)?;
        let (left, right) = self.trim();
        let len = ys.dim(D::Minus1)?;
        Ok(ys.narrow(D::Minus1, left, len - left - right)?)
    }

    /// [`Self::forward`] on host buffers, with `elu(x)` as input when `elu_first`.
    pub(crate) fn forward_host(&self, xs: &Act, elu_first: bool) -> Result<Act, CodecError> {
        let (left, right) = self.trim();
        let Some(taps) = &self.weight_taps else {
            return Err(CodecError::Input(
                "host kernels need the model on the CPU".into(),
            ));
        };
        let (w, b) = (HostView::new(taps)?, HostView::new(&self.bias)?);
        Ok(cpu::conv_transpose1d(
            xs,
            w.slice(),
            b.slice(),
            self.kernel,
            self.stride,
            (left, right),
            elu_first,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_padding_matches_reference_formula() {
        // Reference: ceil((L - k + p) / s + 1) - 1 frames, ideal = n * s + k - p, extra = ideal - L.
        for len in 1..200usize {
            for (k, s) in [(7, 1), (3, 1), (8, 4), (10, 5), (16, 8), (1, 1)] {
                let p = k as f64 - s as f64;
                let n = ((len as f64 - k as f64 + p) / s as f64 + 1.0).ceil() - 1.0;
                let ideal = n * s as f64 + k as f64 - p;
                let want = ideal - len as f64;
                assert_eq!(
                    extra_padding_for_conv1d(len, k, s) as f64,
                    want,
                    "len {len} k {k} s {s}"
                );
            }
        }
        // A strided conv then sees ceil(len / stride) windows.
        assert_eq!(extra_padding_for_conv1d(20_000, 16, 8), 0);
        assert_eq!(extra_padding_for_conv1d(20_001, 16, 8), 7);
    }

    #[test]
    fn reflect_indices_like_torch() {
        let s = |v: Vec<Option<usize>>| {
            v.into_iter()
                .map(|i| i.map(|i| i as i64).unwrap_or(-1))
                .collect::<Vec<_>>()
        };
        // torch.nn.functional.pad([0,1,2,3,4], (3, 2), mode="reflect") = [3,2,1,0,1,2,3,4,3,2]
        assert_eq!(
            s(pad_indices(5, 3, 2, PadMode::Reflect)),
            vec![3, 2, 1, 0, 1, 2, 3, 4, 3, 2]
        );
        // Short input (len 2 <= pad 3): the reference extends [a, b] with zeros to [a, b, 0, 0],
        // reflects by (3, 3) to [0, 0, b, a, b, 0, 0, 0, b, a] and cuts the 2 added samples.
        assert_eq!(
            s(pad_indices(2, 3, 3, PadMode::Reflect)),
            vec![-1, -1, 1, 0, 1, -1, -1, -1]
        );
        assert_eq!(
            s(pad_indices(3, 2, 1, PadMode::Replicate)),
            vec![0, 0, 0, 1, 2, 2]
        );
        assert_eq!(
            s(pad_indices(2, 1, 2, PadMode::Zero)),
            vec![-1, 0, 1, -1, -1]
        );
    }

    #[test]
    fn pad1d_reflect_values() -> Result<(), CodecError> {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &dev)?;
        let y = pad1d(&x, 2, 3, PadMode::Reflect)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![3., 2., 1., 2., 3., 4., 3., 2., 1.]
        );
        let short = Tensor::new(&[[[5f32]]], &dev)?;
        // [5] + zeros (0, 3) = [5,0,0,0] reflect (3,3) = [0,0,0,5,0,0,0,0,0,0], cut 3.
        let y = pad1d(&short, 3, 3, PadMode::Reflect)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![0., 0., 0., 5., 0., 0., 0.]
        );
        Ok(())
    }

    /// Direct definition: y[o, t*s + j] += sum_i w[i, o, j] x[i, t].
    fn naive_conv_transpose(
        x: &[f32],
        (c_in, t_in): (usize, usize),
        w: &[f32],
        (c_out, k): (usize, usize),
        s: usize,
    ) -> Vec<f32> {
        let full = (t_in - 1) * s + k;
        let mut y = vec![0f32; c_out * full];
        for i in 0..c_in {
            for o in 0..c_out {
                for j in 0..k {
                    for t in 0..t_in {
                        y[o * full + t * s + j] += w[(i * c_out + o) * k + j] * x[i * t_in + t];
                    }
                }
            }
        }
        y
    }

    #[test]
    fn transposed_conv_kernels_match_definition() -> Result<(), CodecError> {
        let dev = candle_core::Device::Cpu;
        for (c_in, c_out, t_in, s) in [(4, 2, 5, 4), (16, 8, 3, 8), (3, 5, 1, 2), (40, 33, 7, 5)] {
            let k = 2 * s;
            // Two items: the second is checked (batching must not mix items).
            let x2 = Tensor::randn(0f32, 1.0, (2, c_in, t_in), &dev)?;
            let x = x2.narrow(0, 1, 1)?;
            let w = Tensor::randn(0f32, 1.0, (c_in, c_out, k), &dev)?;
            let xv = x.flatten_all()?.to_vec1::<f32>()?;
            let wv = w.flatten_all()?.to_vec1::<f32>()?;
            let want = naive_conv_transpose(&xv, (c_in, t_in), &wv, (c_out, k), s);
            let err = |v: &[f32]| {
                v.iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            };
            let taps = w.permute((2, 1, 0))?.flatten_all()?.to_vec1::<f32>()?;
            let host = cpu::conv_transpose1d(
                &Act {
                    data: xv.clone(),
                    b: 1,
                    c: c_in,
                    t: t_in,
                },
                &taps,
                &vec![0.0; c_out],
                k,
                s,
                (s - s / 2, s / 2),
                false,
            );
            // The host kernel trims as EncodecConvTranspose1d does (non-causal split).
            let full = (t_in - 1) * s + k;
            let trimmed: Vec<f32> = (0..c_out)
                .flat_map(|o| want[o * full + s - s / 2..o * full + full - s / 2].to_vec())
                .collect();
            let err_t = host
                .data
                .iter()
                .zip(&trimmed)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert_eq!(host.data.len(), trimmed.len());
            assert!(err_t < 1e-4, "host {c_in} {c_out} {t_in} {s}: {err_t}");
            let candle = conv_transpose1d_per_item(&x2, &w, s)?
                .narrow(0, 1, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // candle's own batched call is wrong past the first item (the reason for the
            // per-item wrapper); if this starts failing, candle was fixed and the wrapper can go.
            let batched = x2
                .conv_transpose1d(&w, 0, 0, s, 1, 1)?
                .narrow(0, 1, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if t_in > 1 {
                assert!(
                    err(&batched) > 1e-3,
                    "candle's batched conv_transpose1d is right now"
                );
            }
            assert!(
                err(&candle) < 1e-4,
                "candle {c_in} {c_out} {t_in} {s}: {}",
                err(&candle)
            );
        }
        Ok(())
    }
}
