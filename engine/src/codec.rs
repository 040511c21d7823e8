//! EnCodec, the neural audio codec MusicGen's tokens come from: SEANet encoder, residual vector
//! quantiser, SEANet decoder. Mirrors transformers' `models/encodec/modeling_encodec.py`
//! (`EncodecModel`) and `configuration_encodec.py` (`EncodecConfig`); checked against that
//! reference by the fixtures in `engine/fixtures/` (see `tests/codec_reference.rs`).
//!
//! Audio tensors are `(batch, channels, samples)` f32 at [`Config::sampling_rate`]; code tensors
//! are `(batch, codebooks, frames)` u32 at [`Config::frame_rate`]. The model holds weights only:
//! every call is independent, so [`Encodec::decode`] works on any slice of frames (decoding a
//! slice lacks the context outside it, so its edges differ from decoding the whole).

mod codes_file;
mod conv;
mod cpu;
mod lstm;
mod quantizer;
mod seanet;
mod weights;

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

pub use codes_file::CodesFile;
pub use conv::{extra_padding_for_conv1d, pad_indices, PadMode};

use crate::hub::{HubError, ModelFiles};

/// Errors from building or running the codec. Weight errors name the full checkpoint key.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("missing tensor {name} (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("unsupported codec configuration: {0}")]
    Config(String),
    #[error("invalid codec input: {0}")]
    Input(String),
    #[error("code {code} in codebook {codebook} at frame {frame} is out of range (codebook size {codebook_size})")]
    CodeOutOfRange {
        codebook: usize,
        frame: usize,
        code: u32,
        codebook_size: usize,
    },
    #[error("{path}: {reason}")]
    CodesFile { path: String, reason: String },
    #[error(transparent)]
    Hub(Box<HubError>),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<HubError> for CodecError {
    fn from(e: HubError) -> Self {
        Self::Hub(Box::new(e))
    }
}

fn default_sampling_rate() -> u32 {
    24_000
}
fn default_one() -> usize {
    1
}
fn default_two() -> usize {
    2
}
fn default_seven() -> usize {
    7
}
fn default_three() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_num_filters() -> usize {
    32
}
fn default_hidden_size() -> usize {
    128
}
fn default_ratios() -> Vec<usize> {
    vec![8, 5, 4, 2]
}
fn default_bandwidths() -> Vec<f64> {
    vec![1.5, 3.0, 6.0, 12.0, 24.0]
}
fn default_norm_type() -> String {
    "weight_norm".into()
}
fn default_pad_mode() -> String {
    "reflect".into()
}
fn default_trim_right_ratio() -> f64 {
    1.0
}
fn default_codebook_size() -> usize {
    1024
}

/// The `audio_encoder` section of a MusicGen `config.json` (or a standalone EnCodec
/// `config.json`), with the upstream field names and `EncodecConfig`'s defaults.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    /// Bandwidths in kbit/s the model was trained for; encoding uses the first.
    #[serde(default = "default_bandwidths")]
    pub target_bandwidths: Vec<f64>,
    /// Audio sample rate in Hz.
    #[serde(default = "default_sampling_rate")]
    pub sampling_rate: u32,
    /// Channels the codec itself takes (1 for MusicGen, also for stereo MusicGen).
    #[serde(default = "default_one")]
    pub audio_channels: usize,
    /// Scale the input to unit RMS before encoding (the scale is needed again to decode).
    #[serde(default)]
    pub normalize: bool,
    /// Chunked encoding (the 48 kHz EnCodec); not supported here, must be absent.
    #[serde(default)]
    pub chunk_length_s: Option<f64>,
    #[serde(default)]
    pub overlap: Option<f64>,
    /// Output channels of the last encoder conv = codebook vector size.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Channels of the first encoder conv; doubles at every downsampling.
    #[serde(default = "default_num_filters")]
    pub num_filters: usize,
    #[serde(default = "default_one")]
    pub num_residual_layers: usize,
    /// Decoder upsampling ratios; the encoder downsamples by them in reverse order.
    #[serde(default = "default_ratios")]
    pub upsampling_ratios: Vec<usize>,
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    #[serde(default = "default_seven")]
    pub kernel_size: usize,
    #[serde(default = "default_seven")]
    pub last_kernel_size: usize,
    #[serde(default = "default_three")]
    pub residual_kernel_size: usize,
    #[serde(default = "default_two")]
    pub dilation_growth_rate: usize,
    #[serde(default = "default_true")]
    pub use_causal_conv: bool,
    #[serde(default = "default_pad_mode")]
    pub pad_mode: String,
    #[serde(default = "default_two")]
    pub compress: usize,
    #[serde(default = "default_two")]
    pub num_lstm_layers: usize,
    #[serde(default = "default_trim_right_ratio")]
    pub trim_right_ratio: f64,
    #[serde(default = "default_codebook_size")]
    pub codebook_size: usize,
    /// Codebook vector size; `hidden_size` when absent.
    #[serde(default)]
    pub codebook_dim: Option<usize>,
    #[serde(default = "default_true")]
    pub use_conv_shortcut: bool,
}

/// Python's float floor division `a // b` (which is not always `floor(a / b)`).
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    let mut floordiv = div.floor();
    if div - floordiv > 0.5 {
        floordiv += 1.0;
    }
    floordiv
}

impl Config {
    /// The full-size 32 kHz EnCodec of every public MusicGen checkpoint (`facebook/musicgen-*`).
    pub fn musicgen_32khz() -> Self {
        Self {
            target_bandwidths: vec![2.2],
            sampling_rate: 32_000,
            audio_channels: 1,
            normalize: false,
            chunk_length_s: None,
            overlap: None,
            hidden_size: 128,
            num_filters: 64,
            num_residual_layers: 1,
            upsampling_ratios: vec![8, 5, 4, 4],
            norm_type: "weight_norm".into(),
            kernel_size: 7,
            last_kernel_size: 7,
            residual_kernel_size: 3,
            dilation_growth_rate: 2,
            use_causal_conv: false,
            pad_mode: "reflect".into(),
            compress: 2,
            num_lstm_layers: 2,
            trim_right_ratio: 1.0,
            codebook_size: 2048,
            codebook_dim: Some(128),
            use_conv_shortcut: false,
        }
    }

    /// Samples per frame: the product of the ratios (640 at 32 kHz).
    pub fn hop_length(&self) -> usize {
        self.upsampling_ratios.iter().product()
    }

    /// Frames per second as the reference computes it: `ceil(sampling_rate / hop_length)`
    /// (50 at 32 kHz).
    pub fn frame_rate(&self) -> f64 {
        (self.sampling_rate as f64 / self.hop_length() as f64).ceil()
    }

    /// Codebook vector size (`codebook_dim`, else `hidden_size`).
    pub fn codebook_dim(&self) -> usize {
        self.codebook_dim.unwrap_or(self.hidden_size)
    }

    /// Bits per code: `ceil(log2(codebook_size))`.
    pub fn codebook_nbits(&self) -> usize {
        (self.codebook_size as f64).log2().ceil() as usize
    }

    /// Number of codebooks stored in the checkpoint, as the reference computes it from the
    /// largest bandwidth: `int(1000 * target_bandwidths[-1] // (frame_rate * codebook_nbits))`.
    pub fn num_quantizers(&self) -> usize {
        let bw = self.target_bandwidths.last().copied().unwrap_or(0.0);
        py_floordiv(
            1000.0 * bw,
            self.frame_rate() * self.codebook_nbits() as f64,
        )
        .max(0.0) as usize
    }

    /// Codebooks used at `bandwidth` kbit/s, as `get_num_quantizers_for_bandwidth`:
    /// `max(1, floor(bandwidth * 1000 / (log2(codebook_size) * frame_rate)))`. It depends on
    /// the codebook size: a small test codebook gives more codebooks at the same bandwidth.
    pub fn num_quantizers_for_bandwidth(&self, bandwidth: f64) -> usize {
        if bandwidth <= 0.0 {
            return self.num_quantizers();
        }
        let bw_per_q = (self.codebook_size as f64).log2() * self.frame_rate();
        ((bandwidth * 1000.0 / bw_per_q).floor() as usize).max(1)
    }

    /// The bandwidth `encode` uses: the first target bandwidth (the reference's default).
    pub fn default_bandwidth(&self) -> f64 {
        self.target_bandwidths.first().copied().unwrap_or(0.0)
    }

    /// Codebooks per channel that [`Encodec::encode`] produces (at [`Self::default_bandwidth`]).
    pub fn num_codebooks(&self) -> usize {
        self.num_quantizers_for_bandwidth(self.default_bandwidth())
    }

    /// Rejects configurations this implementation does not cover, naming the field.
    pub fn validate(&self) -> Result<(), CodecError> {
        let err = |m: String| Err(CodecError::Config(m));
        if self.norm_type != "weight_norm" {
            return err(format!(
                "norm_type {:?} (only weight_norm is implemented)",
                self.norm_type
            ));
        }
        if self.chunk_length_s.is_some() {
            return err("chunk_length_s is set (chunked encoding is not implemented)".into());
        }
        PadMode::parse(&self.pad_mode)?;
        if self.upsampling_ratios.is_empty() || self.upsampling_ratios.contains(&0) {
            return err(format!("upsampling_ratios {:?}", self.upsampling_ratios));
        }
        if !self.codebook_size.is_power_of_two() {
            return err(format!(
                "codebook_size {} is not a power of two",
                self.codebook_size
            ));
        }
        if self.codebook_dim() != self.hidden_size {
            return err(format!(
                "codebook_dim {} differs from hidden_size {}",
                self.codebook_dim(),
                self.hidden_size
            ));
        }
        if self.sampling_rate == 0
            || self.audio_channels == 0
            || self.num_filters == 0
            || self.compress == 0
            || self.kernel_size == 0
            || self.last_kernel_size == 0
            || self.residual_kernel_size == 0
        {
            return err("a size or rate is 0".into());
        }
        if !self.use_causal_conv && self.trim_right_ratio != 1.0 {
            return err("trim_right_ratio != 1.0 needs use_causal_conv".into());
        }
        if self.num_quantizers() == 0 || self.num_codebooks() > self.num_quantizers() {
            return err(format!(
                "{} codebooks at {} kbit/s but {} stored",
                self.num_codebooks(),
                self.default_bandwidth(),
                self.num_quantizers()
            ));
        }
        Ok(())
    }
}

/// The EnCodec model: immutable weights, no per-call state.
#[derive(Clone, Debug)]
pub struct Encodec {
    cfg: Config,
    encoder: seanet::Encoder,
    decoder: seanet::Decoder,
    quantizer: quantizer::ResidualVectorQuantizer,
    device: Device,
    /// Run SEANet with the host kernels of `codec::cpu` (CPU only, the default there).
    host_kernels: bool,
}

impl Encodec {
    /// Builds the codec from weights. `vb` is the checkpoint root `.pp("audio_encoder")` for a
    /// MusicGen checkpoint (the root itself for a standalone EnCodec one). Weight norm is read
    /// under either name (`…conv.parametrizations.weight.original0/1` or `…conv.weight_g/_v`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self, CodecError> {
        cfg.validate()?;
        let vb = vb.set_dtype(DType::F32);
        let encoder = seanet::Encoder::new(cfg, vb.pp("encoder"))?;
        let decoder = seanet::Decoder::new(cfg, vb.pp("decoder"))?;
        let quantizer = quantizer::ResidualVectorQuantizer::new(
            cfg.num_quantizers(),
            cfg.codebook_size,
            cfg.codebook_dim(),
            vb.pp("quantizer"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            decoder,
            quantizer,
            host_kernels: vb.device().is_cpu(),
            device: vb.device().clone(),
        })
    }

    /// On the CPU, SEANet runs on dedicated kernels (see `codec::cpu`) unless this is turned
    /// off, in which case it runs on candle tensor ops as on other devices (slower; kept to
    /// cross-check the two). Ignored on other devices.
    pub fn set_host_kernels(&mut self, on: bool) {
        self.host_kernels = on && self.device.is_cpu();
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn check_audio(&self, audio: &Tensor) -> Result<Tensor, CodecError> {
        let (_, c, n) = audio.dims3().map_err(|_| {
            CodecError::Input(format!(
                "audio must be (batch, channels, samples), got {:?}",
                audio.dims()
            ))
        })?;
        if c != self.cfg.audio_channels {
            return Err(CodecError::Input(format!(
                "audio has {c} channels, the codec takes {}",
                self.cfg.audio_channels
            )));
        }
        if n == 0 {
            return Err(CodecError::Input("audio has no samples".into()));
        }
        let audio = audio.to_dtype(DType::F32)?.to_device(&self.device)?;
        // NaN or infinity anywhere makes the sum non-finite (a max would skip NaN).
        if !audio.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite() {
            return Err(CodecError::Input(
                "audio contains NaN or infinite samples".into(),
            ));
        }
        Ok(audio)
    }

    /// SEANet encoder only: (batch, 1, samples) -> embeddings (batch, hidden_size, frames).
    pub fn encoder_output(&self, audio: &Tensor) -> Result<Tensor, CodecError> {
        let audio = self.check_audio(audio)?;
        self.encoder.forward(&audio, self.host_kernels)
    }

    /// Quantized embeddings of codes (batch, K, frames) -> (batch, hidden_size, frames).
    pub fn quantized(&self, codes: &Tensor) -> Result<Tensor, CodecError> {
        let codes = self.check_codes(codes)?;
        self.quantizer.decode(&codes)
    }

    /// Audio (batch, 1, samples) f32 at 32 kHz -> codes (batch, K, frames) u32 with
    /// `frames = ceil(samples / hop)` and `K` = [`Config::num_codebooks`]. With
    /// `normalize: true` the per-item scale is dropped; use [`Self::encode_with_scale`].
    pub fn encode(&self, audio: &Tensor) -> Result<Tensor, CodecError> {
        Ok(self.encode_with_scale(audio)?.0)
    }

    /// As [`Self::encode`], also returning the scale (batch,) that `normalize: true` divided
    /// the audio by (`None` without normalisation): `sqrt(mean(mono^2)) + 1e-8`.
    pub fn encode_with_scale(
        &self,
        audio: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>), CodecError> {
        let audio = self.check_audio(audio)?;
        let (audio, scale) = if self.cfg.normalize {
            let channels = audio.dim(1)? as f64;
            let mono = (audio.sum_keepdim(1)? / channels)?; // (batch, 1, samples)
            let scale = (mono.sqr()?.mean_keepdim(D::Minus1)?.sqrt()? + 1e-8)?; // (batch, 1, 1)
            (audio.broadcast_div(&scale)?, Some(scale.flatten_all()?))
        } else {
            (audio, None)
        };
        let emb = self.encoder.forward(&audio, self.host_kernels)?; // (batch, hidden, frames)
        let codes = self.quantizer.encode(&emb, self.cfg.num_codebooks())?;
        Ok((codes, scale))
    }

    fn check_codes(&self, codes: &Tensor) -> Result<Tensor, CodecError> {
        let (_, k, t) = codes.dims3().map_err(|_| {
            CodecError::Input(format!(
                "codes must be (batch, codebooks, frames), got {:?}",
                codes.dims()
            ))
        })?;
        if k == 0 || k > self.quantizer.num_quantizers() {
            return Err(CodecError::Input(format!(
                "codes have {k} codebooks, the codec has {}",
                self.quantizer.num_quantizers()
            )));
        }
        if t == 0 {
            return Err(CodecError::Input("codes have no frames".into()));
        }
        let codes = match codes.dtype() {
            DType::U32 => codes.clone(),
            DType::I64 => {
                if codes
                    .min_keepdim(D::Minus1)?
                    .flatten_all()?
                    .min(0)?
                    .to_scalar::<i64>()?
                    < 0
                {
                    return Err(CodecError::Input("codes contain negative values".into()));
                }
                codes.to_dtype(DType::U32)?
            }
            DType::U8 => codes.to_dtype(DType::U32)?,
            other => {
                return Err(CodecError::Input(format!(
                    "codes must be an integer tensor, got {other:?}"
                )))
            }
        };
        let size = self.quantizer.codebook_size();
        let host = codes.to_device(&Device::Cpu)?.to_vec3::<u32>()?;
        for row in &host {
            for (q, frames) in row.iter().enumerate() {
                if let Some((f, &c)) = frames.iter().enumerate().find(|(_, &c)| c as usize >= size)
                {
                    return Err(CodecError::CodeOutOfRange {
                        codebook: q,
                        frame: f,
                        code: c,
                        codebook_size: size,
                    });
                }
            }
        }
        Ok(codes.to_device(&self.device)?)
    }

    /// Codes (batch, K, frames) u32 -> audio (batch, 1, frames * hop) f32, not trimmed. Works on
    /// any run of frames (the codec is stateless).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor, CodecError> {
        self.decode_with_scale(codes, None)
    }

    /// As [`Self::decode`], multiplying each item by `scale` (batch,) from
    /// [`Self::encode_with_scale`].
    pub fn decode_with_scale(
        &self,
        codes: &Tensor,
        scale: Option<&Tensor>,
    ) -> Result<Tensor, CodecError> {
        let codes = self.check_codes(codes)?;
        let emb = self.quantizer.decode(&codes)?; // (batch, hidden, frames)
        let audio = self.decoder.forward(&emb, self.host_kernels)?; // (batch, 1, samples)
        match scale {
            Some(s) => {
                let b = audio.dim(0)?;
                Ok(audio.broadcast_mul(&s.to_dtype(DType::F32)?.reshape((b, 1, 1))?)?)
            }
            None => Ok(audio),
        }
    }

    /// Stereo MusicGen: (batch, C, samples) -> (batch, C*K, frames), each channel encoded by the
    /// mono codec and the codebooks interleaved: codebook `C*q + c` is channel `c`'s quantizer
    /// `q` (for stereo: even = left, odd = right). `channels == 1` is [`Self::encode`].
    pub fn encode_interleaved(
        &self,
        audio: &Tensor,
        channels: usize,
    ) -> Result<Tensor, CodecError> {
        let (b, c, n) = audio.dims3().map_err(|_| {
            CodecError::Input(format!(
                "audio must be (batch, channels, samples), got {:?}",
                audio.dims()
            ))
        })?;
        if c != channels {
            return Err(CodecError::Input(format!(
                "audio has {c} channels, expected {channels}"
            )));
        }
        if channels == self.cfg.audio_channels {
            return self.encode(audio);
        }
        if self.cfg.audio_channels != 1 {
            return Err(CodecError::Input(format!(
                "interleaving needs a mono codec, this one takes {} channels",
                self.cfg.audio_channels
            )));
        }
        // Every channel becomes its own batch item of the mono codec.
        let mono = audio.reshape((b * c, 1, n))?;
        let codes = self.encode(&mono)?; // (batch * C, K, frames)
        let (_, k, f) = codes.dims3()?;
        Ok(codes
            .reshape((b, c, k, f))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, k * c, f))?)
    }

    /// Inverse of [`Self::encode_interleaved`]: (batch, C*K, frames) -> (batch, C, frames * hop).
    pub fn decode_interleaved(
        &self,
        codes: &Tensor,
        channels: usize,
    ) -> Result<Tensor, CodecError> {
        let (b, ck, f) = codes.dims3().map_err(|_| {
            CodecError::Input(format!(
                "codes must be (batch, codebooks, frames), got {:?}",
                codes.dims()
            ))
        })?;
        if channels == 0 || ck % channels != 0 {
            return Err(CodecError::Input(format!(
                "{ck} codebooks cannot be split into {channels} channels"
            )));
        }
        if channels == self.cfg.audio_channels {
            return self.decode(codes);
        }
        if self.cfg.audio_channels != 1 {
            return Err(CodecError::Input(format!(
                "interleaving needs a mono codec, this one takes {} channels",
                self.cfg.audio_channels
            )));
        }
        let k = ck / channels;
        let per_channel = codes
            .reshape((b, k, channels, f))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * channels, k, f))?;
        let audio = self.decode(&per_channel)?; // (batch * C, 1, samples)
        let n = audio.dim(D::Minus1)?;
        Ok(audio.reshape((b, channels, n))?)
    }
}

/// What a MusicGen checkpoint says about its codec: the `audio_encoder` section and the number
/// of audio channels its decoder models (`decoder.audio_channels`, 2 for stereo checkpoints).
#[derive(Clone, Debug)]
pub struct CheckpointCodec {
    pub config: Config,
    /// Channels of the music the checkpoint generates (1 or 2); the codec itself is mono and is
    /// applied per channel.
    pub channels: usize,
    /// Key prefix of the codec's tensors (`"audio_encoder"`, or `""` for a standalone EnCodec).
    pub prefix: String,
}

impl CheckpointCodec {
    /// Reads the codec part of `config.json`: a MusicGen config (with an `audio_encoder`
    /// section) or a standalone EnCodec config (`model_type: "encodec"`).
    pub fn from_json(json: &serde_json::Value) -> Result<Self, CodecError> {
        let parse = |v: &serde_json::Value| {
            Config::deserialize(v).map_err(|e| CodecError::Config(format!("config.json: {e}")))
        };
        if let Some(section) = json.get("audio_encoder") {
            let channels = json
                .get("decoder")
                .and_then(|d| d.get("audio_channels"))
                .and_then(|c| c.as_u64())
                .unwrap_or(1) as usize;
            Ok(Self {
                config: parse(section)?,
                channels,
                prefix: "audio_encoder".into(),
            })
        } else if json.get("model_type").and_then(|m| m.as_str()) == Some("encodec") {
            let config = parse(json)?;
            Ok(Self {
                channels: config.audio_channels,
                config,
                prefix: String::new(),
            })
        } else {
            Err(CodecError::Config(
                "config.json has no audio_encoder section and is not an EnCodec config".into(),
            ))
        }
    }

    /// Loads the codec of a resolved checkpoint on `device`.
    pub fn load(files: &ModelFiles, device: &Device) -> Result<(Self, Encodec), CodecError> {
        let json: serde_json::Value = files.read_config()?;
        let this = Self::from_json(&json)?;
        let vb = files.var_builder(DType::F32, device)?;
        let vb = if this.prefix.is_empty() {
            vb
        } else {
            vb.pp(&this.prefix)
        };
        let codec = Encodec::new(&this.config, vb)?;
        Ok((this, codec))
    }
}

/// A weight source that invents a random tensor of whatever shape is asked for: builds
/// full-size models for benchmarks without a download. Values are normal with standard
/// deviation `1 / sqrt(fan_in)` (fan-in = product of all but the first axis), which keeps
/// activations in a realistic range.
struct RandomWeights {
    /// `None`: the device's generator (different every run); `Some`: each tensor from a
    /// generator seeded with this and its name (the same weights every run).
    seed: Option<u64>,
}

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let fan_in: usize = s.dims().iter().skip(1).product::<usize>().max(1);
        let std = 1.0 / (fan_in as f64).sqrt();
        let Some(seed) = self.seed else {
            return Tensor::randn(0f32, std as f32, s, dev)?.to_dtype(dtype);
        };
        use rand::{Rng, SeedableRng};
        // FNV-1a of the name: stable across runs and builds.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ name_hash);
        // Uniform with the same standard deviation (a / sqrt(3) for [-a, a]).
        let a = (std * 3f64.sqrt()) as f32;
        let values: Vec<f32> = (0..s.elem_count())
            .map(|_| rng.random_range(-a..=a))
            .collect();
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape ({name})")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Answer for one weight-norm naming only, so that loading takes one definite path.
        !name.ends_with("weight_g") && !name.ends_with("weight_v")
    }
}

/// A [`VarBuilder`] of random weights for any model (see `segue bench`), different every run.
pub fn random_var_builder(device: &Device) -> VarBuilder<'static> {
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
        Box::new(RandomWeights { seed: None });
    VarBuilder::from_backend(backend, DType::F32, device.clone())
}

/// A [`VarBuilder`] of random weights that are the same every run for the same `seed` (uniform,
/// with the standard deviation [`random_var_builder`] uses): for measurements that must be
/// reproducible.
pub fn seeded_random_var_builder(device: &Device, seed: u64) -> VarBuilder<'static> {
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
        Box::new(RandomWeights { seed: Some(seed) });
    VarBuilder::from_backend(backend, DType::F32, device.clone())
}

/// Loads every tensor of one safetensors file (tests and tools).
pub fn load_safetensors(
    path: &std::path::Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, CodecError> {
    Ok(candle_core::safetensors::load(path, device)?)
}
