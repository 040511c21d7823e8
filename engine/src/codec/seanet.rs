//! SEANet encoder and decoder as used by EnCodec. Mirrors `EncodecResnetBlock`,
//! `EncodecEncoder` and `EncodecDecoder` in transformers' `models/encodec/modeling_encodec.py`;
//! module indices (`layers.{i}`, `block.{j}`) are the checkpoint's, ELUs included.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::conv::{Conv1d, ConvTranspose1d};
use super::cpu::{self, Act};
use super::lstm::Lstm;
use super::{CodecError, Config};

/// SEANet residual block: `shortcut(x) + conv1x1(elu(conv_k(elu(x))))`.
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    conv1: Conv1d,
    conv2: Conv1d,
    shortcut: Option<Conv1d>,
}

impl ResnetBlock {
    fn new(cfg: &Config, dim: usize, dilation: usize, vb: VarBuilder) -> Result<Self, CodecError> {
        let hidden = dim / cfg.compress;
        let block = vb.pp("block");
        // block.0 and block.2 are ELUs (no weights).
        let conv1 = Conv1d::new(
            cfg,
            dim,
            hidden,
            cfg.residual_kernel_size,
            1,
            dilation,
            block.pp("1"),
        )?;
        let conv2 = Conv1d::new(cfg, hidden, dim, 1, 1, 1, block.pp("3"))?;
        let shortcut = if cfg.use_conv_shortcut {
            Some(Conv1d::new(cfg, dim, dim, 1, 1, 1, vb.pp("shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            shortcut,
        })
    }

    /// (batch, dim, time) -> (batch, dim, time)
    fn forward(&self, xs: &Tensor) -> Result<Tensor, CodecError> {
        let ys = self.conv1.forward(&xs.elu(1.0)?)?;
        let ys = self.conv2.forward(&ys.elu(1.0)?)?;
        let residual = match &self.shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        Ok((residual + ys)?)
    }

    /// [`Self::forward`] on host buffers.
    fn forward_host(&self, xs: &Act) -> Result<Act, CodecError> {
        let ys = self.conv1.forward_host(xs, true)?;
        let mut ys = self.conv2.forward_host(&ys, true)?;
        match &self.shortcut {
            Some(conv) => cpu::add_inplace(&mut ys, &conv.forward_host(xs, false)?),
            None => cpu::add_inplace(&mut ys, xs),
        }
        Ok(ys)
    }
}

#[derive(Clone, Debug)]
enum Layer {
    Elu,
    Conv(Conv1d),
    ConvTranspose(ConvTranspose1d),
    Residual(ResnetBlock),
    Lstm(Lstm),
}

impl Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor, CodecError> {
        match self {
            Layer::Elu => Ok(xs.elu(1.0)?),
            Layer::Conv(m) => m.forward(xs),
            Layer::ConvTranspose(m) => m.forward(xs),
            Layer::Residual(m) => m.forward(xs),
            Layer::Lstm(m) => m.forward(xs),
        }
    }
}

/// Runs `layers` on host buffers, fusing every ELU into the padding copy or input of the
/// convolution that follows it.
fn forward_host(layers: &[Layer], xs: &Tensor) -> Result<Tensor, CodecError> {
    let (b, c, t) = xs.dims3()?;
    let mut x = Act {
        data: xs.flatten_all()?.to_vec1::<f32>()?,
        b,
        c,
        t,
    };
    let mut elu_pending = false;
    for layer in layers {
        if let Layer::Elu = layer {
            if elu_pending {
                cpu::elu_inplace(&mut x);
            }
            elu_pending = true;
            continue;
        }
        let elu_first = std::mem::take(&mut elu_pending);
        x = match layer {
            Layer::Conv(m) => m.forward_host(&x, elu_first)?,
            Layer::ConvTranspose(m) => m.forward_host(&x, elu_first)?,
            Layer::Residual(m) => {
                if elu_first {
                    cpu::elu_inplace(&mut x);
                }
                m.forward_host(&x)?
            }
            Layer::Lstm(m) => {
                if elu_first {
                    cpu::elu_inplace(&mut x);
                }
                m.forward_host(&x)?
            }
            Layer::Elu => x,
        };
    }
    if elu_pending {
        cpu::elu_inplace(&mut x);
    }
    Ok(Tensor::from_vec(x.data, (x.b, x.c, x.t), xs.device())?)
}

/// Appends layers while counting their index in the checkpoint's `layers` list.
struct Stack<'a> {
    layers: Vec<Layer>,
    vb: VarBuilder<'a>,
}

impl<'a> Stack<'a> {
    fn next_vb(&self) -> VarBuilder<'a> {
        self.vb.pp(self.layers.len().to_string())
    }
}

/// SEANet encoder: audio (batch, audio_channels, samples) -> embeddings (batch, hidden_size,
/// ceil(samples / hop_length)).
#[derive(Clone, Debug)]
pub struct Encoder {
    layers: Vec<Layer>,
}

impl Encoder {
    /// `vb` is the codec root's `.pp("encoder")`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self, CodecError> {
        let mut s = Stack {
            layers: Vec::new(),
            vb: vb.pp("layers"),
        };
        let conv = Conv1d::new(
            cfg,
            cfg.audio_channels,
            cfg.num_filters,
            cfg.kernel_size,
            1,
            1,
            s.next_vb(),
        )?;
        s.layers.push(Layer::Conv(conv));
        let mut scaling = 1;
        for &ratio in cfg.upsampling_ratios.iter().rev() {
            let dim = scaling * cfg.num_filters;
            for j in 0..cfg.num_residual_layers {
                let dilation = cfg.dilation_growth_rate.pow(j as u32);
                let block = ResnetBlock::new(cfg, dim, dilation, s.next_vb())?;
                s.layers.push(Layer::Residual(block));
            }
            s.layers.push(Layer::Elu);
            let conv = Conv1d::new(cfg, dim, dim * 2, ratio * 2, ratio, 1, s.next_vb())?;
            s.layers.push(Layer::Conv(conv));
            scaling *= 2;
        }
        let dim = scaling * cfg.num_filters;
        let lstm = Lstm::new(dim, cfg.num_lstm_layers, s.next_vb())?;
        s.layers.push(Layer::Lstm(lstm));
        s.layers.push(Layer::Elu);
        let conv = Conv1d::new(
            cfg,
            dim,
            cfg.hidden_size,
            cfg.last_kernel_size,
            1,
            1,
            s.next_vb(),
        )?;
        s.layers.push(Layer::Conv(conv));
        Ok(Self { layers: s.layers })
    }

    /// (batch, audio_channels, samples) -> (batch, hidden_size, frames); `host`: run the CPU
    /// kernels of [`super::cpu`] instead of tensor ops.
    pub fn forward(&self, xs: &Tensor, host: bool) -> Result<Tensor, CodecError> {
        if host {
            return forward_host(&self.layers, xs);
        }
        self.layers
            .iter()
            .try_fold(xs.clone(), |xs, layer| layer.forward(&xs))
    }
}

/// SEANet decoder: embeddings (batch, hidden_size, frames) -> audio (batch, audio_channels,
/// frames * hop_length).
#[derive(Clone, Debug)]
pub struct Decoder {
    layers: Vec<Layer>,
}

impl Decoder {
    /// `vb` is the codec root's `.pp("decoder")`.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self, CodecError> {
        let mut s = Stack {
            layers: Vec::new(),
            vb: vb.pp("layers"),
        };
        let mut scaling = 1usize << cfg.upsampling_ratios.len();
        let dim = scaling * cfg.num_filters;
        let conv = Conv1d::new(
            cfg,
            cfg.hidden_size,
            dim,
            cfg.kernel_size,
            1,
            1,
            s.next_vb(),
        )?;
        s.layers.push(Layer::Conv(conv));
        let lstm = Lstm::new(dim, cfg.num_lstm_layers, s.next_vb())?;
        s.layers.push(Layer::Lstm(lstm));
        for &ratio in &cfg.upsampling_ratios {
            let dim = scaling * cfg.num_filters;
            s.layers.push(Layer::Elu);
            let conv = ConvTranspose1d::new(cfg, dim, dim / 2, ratio * 2, ratio, s.next_vb())?;
            s.layers.push(Layer::ConvTranspose(conv));
            for j in 0..cfg.num_residual_layers {
                let dilation = cfg.dilation_growth_rate.pow(j as u32);
                let block = ResnetBlock::new(cfg, dim / 2, dilation, s.next_vb())?;
                s.layers.push(Layer::Residual(block));
            }
            scaling /= 2;
        }
        s.layers.push(Layer::Elu);
        let conv = Conv1d::new(
            cfg,
            cfg.num_filters,
            cfg.audio_channels,
            cfg.last_kernel_size,
            1,
            1,
            s.next_vb(),
        )?;
        s.layers.push(Layer::Conv(conv));
        Ok(Self { layers: s.layers })
    }

    /// (batch, hidden_size, frames) -> (batch, audio_channels, frames * hop_length); `host`:
    /// run the CPU kernels of [`super::cpu`] instead of tensor ops.
    pub fn forward(&self, xs: &Tensor, host: bool) -> Result<Tensor, CodecError> {
        if host {
            return forward_host(&self.layers, xs);
        }
        self.layers
            .iter()
            .try_fold(xs.clone(), |xs, layer| layer.forward(&xs))
    }
}
