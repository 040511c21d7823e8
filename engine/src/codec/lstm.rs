//! `EncodecLSTM`: a stacked unidirectional LSTM over the time axis with a skip connection
//! (`lstm(x) + x`), mirroring transformers' `models/encodec/modeling_encodec.py` and PyTorch's
//! `nn.LSTM` (gate order i, f, g, o; zero initial state).

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use super::cpu::{self, Act};
use super::weights::{get, HostView};
use super::CodecError;

#[derive(Clone, Debug)]
struct LstmLayer {
    /// (input, 4 * hidden): `weight_ih_l{k}` transposed, contiguous.
    w_ih_t: Tensor,
    /// (4 * hidden, hidden): `weight_hh_l{k}`, contiguous (`W h` reads it row by row).
    w_hh: Tensor,
    /// (1, 4 * hidden): `bias_ih_l{k} + bias_hh_l{k}`.
    bias: Tensor,
}

/// A stack of LSTM layers of equal width `dim` with a residual connection around the stack.
#[derive(Clone, Debug)]
pub struct Lstm {
    layers: Vec<LstmLayer>,
    dim: usize,
}

impl Lstm {
    /// `vb` points at the `EncodecLSTM` module; PyTorch's weights are under `vb.pp("lstm")`.
    pub fn new(dim: usize, num_layers: usize, vb: VarBuilder) -> Result<Self, CodecError> {
        let vb = vb.pp("lstm");
        let layers = (0..num_layers)
            .map(|k| {
                let w_ih = get(&vb, &[4 * dim, dim], &format!("weight_ih_l{k}"))?;
                let w_hh = get(&vb, &[4 * dim, dim], &format!("weight_hh_l{k}"))?;
                let b_ih = get(&vb, &[4 * dim], &format!("bias_ih_l{k}"))?;
                let b_hh = get(&vb, &[4 * dim], &format!("bias_hh_l{k}"))?;
                Ok(LstmLayer {
                    w_ih_t: w_ih.t()?.contiguous()?,
                    w_hh: w_hh.contiguous()?,
                    bias: (b_ih + b_hh)?.reshape((1, 4 * dim))?,
                })
            })
            .collect::<Result<Vec<_>, CodecError>>()?;
        Ok(Self { layers, dim })
    }

    /// (batch, dim, time) -> (batch, dim, time)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, CodecError> {
        let (b, c, t) = xs.dims3()?;
        if c != self.dim {
            return Err(CodecError::Input(format!(
                "LSTM expects {} channels, got {c}",
                self.dim
            )));
        }
        let h = self.dim;
        let skip = xs.transpose(1, 2)?.contiguous()?; // (batch, time, dim)
        let mut seq = skip.clone();
        for layer in &self.layers {
            // The input projection of every time step in one matmul.
            let xproj = seq
                .reshape((b * t, h))?
                .matmul(&layer.w_ih_t)?
                .broadcast_add(&layer.bias)?
                .reshape((b, t, 4 * h))?; // (batch, time, 4 * dim)
            let mut hs = Vec::with_capacity(t);
            let mut h_t = Tensor::zeros((b, h), xs.dtype(), xs.device())?;
            let mut c_t = h_t.clone();
            for step in 0..t {
                let gates = xproj
                    .narrow(1, step, 1)?
                    .squeeze(1)?
                    .add(&layer.w_hh.matmul(&h_t.t()?)?.t()?)?; // (batch, 4 * dim)
                let i = candle_nn::ops::sigmoid(&gates.narrow(D::Minus1, 0, h)?)?;
                let f = candle_nn::ops::sigmoid(&gates.narrow(D::Minus1, h, h)?)?;
                let g = gates.narrow(D::Minus1, 2 * h, h)?.tanh()?;
                let o = candle_nn::ops::sigmoid(&gates.narrow(D::Minus1, 3 * h, h)?)?;
                c_t = ((f * &c_t)? + (i * g)?)?;
                h_t = (o * c_t.tanh()?)?;
                hs.push(h_t.clone());
            }
            seq = Tensor::stack(&hs, 1)?; // (batch, time, dim)
        }
        Ok((seq + skip)?.transpose(1, 2)?.contiguous()?)
    }

    /// [`Self::forward`] on host buffers.
    pub(crate) fn forward_host(&self, xs: &Act) -> Result<Act, CodecError> {
        if xs.c != self.dim {
            return Err(CodecError::Input(format!(
                "LSTM expects {} channels, got {}",
                self.dim, xs.c
            )));
        }
        let views = self
            .layers
            .iter()
            .map(|l| {
                Ok((
                    HostView::new(&l.w_ih_t)?,
                    HostView::new(&l.w_hh)?,
                    HostView::new(&l.bias)?,
                ))
            })
            .collect::<Result<Vec<_>, CodecError>>()?;
        let weights: Vec<cpu::LstmWeights<'_>> = views
            .iter()
            .map(|(w_ih_t, w_hh, bias)| cpu::LstmWeights {
                w_ih_t: w_ih_t.slice(),
                w_hh: w_hh.slice(),
                bias: bias.slice(),
            })
            .collect();
        Ok(cpu::lstm(xs, &weights))
    }
}
