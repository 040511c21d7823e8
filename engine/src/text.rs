//! The text condition: T5 tokenizer, T5 encoder and MusicGen's `enc_to_dec_proj`.
//!
//! Mirrors what `MusicgenForConditionalGeneration` does with text
//! (`transformers/models/musicgen/modeling_musicgen.py`): the T5 encoder's last hidden state
//! goes through `enc_to_dec_proj` (a linear map to the decoder width, with bias) and is then
//! multiplied by the attention mask, so padded positions are exactly zero. Classifier-free
//! guidance appends the null condition: all-zero states with an all-zero mask
//! ([`TextCondition::with_null`]).
//!
//! candle-transformers' `T5EncoderModel` takes no attention mask, so each text is encoded on its
//! own, unpadded: for every real token this equals the reference's padded, masked batch (the
//! masked keys get zero weight there, and T5's relative position bias does not depend on the
//! padding); padded positions are zero after the mask either way.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::t5;

/// Texts longer than this many tokens (the `</s>` included) are truncated, as the reference's
/// tokenizer (`model_max_length` 512 for every MusicGen checkpoint) does.
pub const MAX_TEXT_TOKENS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer {path}: {message}")]
    TokenizerFile { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("text encoder config: {0}")]
    Config(String),
    #[error("text encoder: {0}")]
    Candle(#[from] candle_core::Error),
}

fn d_vocab() -> usize {
    32128
}
fn d_model() -> usize {
    512
}
fn d_kv() -> usize {
    64
}
fn d_ff() -> usize {
    2048
}
fn d_layers() -> usize {
    6
}
fn d_heads() -> usize {
    8
}
fn d_buckets() -> usize {
    32
}
fn d_max_distance() -> usize {
    128
}
fn d_eps() -> f64 {
    1e-6
}
fn d_one() -> f64 {
    1.0
}
fn d_relu() -> String {
    "relu".into()
}
fn d_eos() -> usize {
    1
}

/// The `text_encoder` section of a MusicGen `config.json` (`T5Config`), upstream names and
/// defaults; only what the encoder needs.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct TextEncoderConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_model")]
    pub d_model: usize,
    #[serde(default = "d_kv")]
    pub d_kv: usize,
    #[serde(default = "d_ff")]
    pub d_ff: usize,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "d_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_one")]
    pub initializer_factor: f64,
    /// `"relu"` (t5-base, every MusicGen checkpoint), `"gated-gelu"`, `"gated-silu"` or another
    /// activation name.
    #[serde(default = "d_relu")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "d_eos")]
    pub eos_token_id: usize,
}

impl TextEncoderConfig {
    /// The hidden size of the encoder's output.
    pub fn hidden_size(&self) -> usize {
        self.d_model
    }

    /// candle-transformers' T5 config for the encoder.
    pub fn to_t5(&self) -> Result<t5::Config, TextError> {
        let feed_forward_proj = match self.feed_forward_proj.as_str() {
            "gated-gelu" => t5::ActivationWithOptionalGating {
                gated: true,
                activation: candle_nn::Activation::NewGelu,
            },
            "gated-silu" => t5::ActivationWithOptionalGating {
                gated: true,
                activation: candle_nn::Activation::Silu,
            },
            name => {
                let activation = serde_json::from_value(serde_json::Value::String(
                    name.to_string(),
                ))
                .map_err(|_| TextError::Config(format!("unknown feed_forward_proj {name:?}")))?;
                t5::ActivationWithOptionalGating {
                    gated: false,
                    activation,
                }
            }
        };
        Ok(t5::Config {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            d_kv: self.d_kv,
            d_ff: self.d_ff,
            num_layers: self.num_layers,
            num_decoder_layers: None,
            num_heads: self.num_heads,
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
            dropout_rate: 0.0,
            layer_norm_epsilon: self.layer_norm_epsilon,
            initializer_factor: self.initializer_factor,
            feed_forward_proj,
            tie_word_embeddings: true,
            is_decoder: false,
            is_encoder_decoder: true,
            use_cache: false,
            pad_token_id: self.pad_token_id,
            eos_token_id: self.eos_token_id,
            decoder_start_token_id: None,
        })
    }
}

/// A tokenizer loaded from a `tokenizer.json`, truncating at [`MAX_TEXT_TOKENS`].
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

/// The ids of one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    /// Token ids, the end-of-sequence id last.
    pub ids: Vec<u32>,
    /// Whether the text was longer than [`MAX_TEXT_TOKENS`] and cut.
    pub truncated: bool,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let file_err = |message: String| TextError::TokenizerFile {
            path: path.display().to_string(),
            message,
        };
        let mut inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| file_err(e.to_string()))?;
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_TEXT_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| file_err(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self { inner })
    }

    /// Ids of `text` with the special tokens of the tokenizer's post-processor (T5: a trailing
    /// `</s>`), no padding.
    pub fn encode(&self, text: &str) -> Result<TokenizedText, TextError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TextError::Tokenize(e.to_string()))?;
        Ok(TokenizedText {
            ids: enc.get_ids().to_vec(),
            truncated: !enc.get_overflowing().is_empty(),
        })
    }
}

/// What the decoder's cross-attention sees.
#[derive(Debug, Clone)]
pub struct TextCondition {
    /// (batch, len, decoder hidden) f32, zero wherever `mask` is 0.
    pub states: Tensor,
    /// (batch, len) f32: 1 = token, 0 = padding / no condition.
    pub mask: Tensor,
    /// Per row: the text was truncated to [`MAX_TEXT_TOKENS`].
    pub truncated: Vec<bool>,
}

impl TextCondition {
    /// The reference's unconditional input (`get_unconditional_inputs`): one all-zero state
    /// per row with a zero mask, so cross-attention contributes nothing.
    pub fn unconditional(batch: usize, hidden: usize, device: &Device) -> Result<Self, TextError> {
        Ok(Self {
            states: Tensor::zeros((batch, 1, hidden), DType::F32, device)?,
            mask: Tensor::zeros((batch, 1), DType::F32, device)?,
            truncated: vec![false; batch],
        })
    }

    pub fn batch(&self) -> usize {
        self.states.dims()[0]
    }

    /// The classifier-free-guidance batch: these rows, then as many null rows (zero states,
    /// zero mask).
    pub fn with_null(&self) -> Result<Self, TextError> {
        let states = Tensor::cat(&[&self.states, &self.states.zeros_like()?], 0)?;
        let mask = Tensor::cat(&[&self.mask, &self.mask.zeros_like()?], 0)?;
        let mut truncated = self.truncated.clone();
        truncated.extend(std::iter::repeat_n(false, self.batch()));
        Ok(Self {
            states,
            mask,
            truncated,
        })
    }

    /// Each row repeated `n` times in a row (takes of one text).
    pub fn repeat_rows(&self, n: usize) -> Result<Self, TextError> {
        let b = self.batch();
        let idx: Vec<u32> = (0..b as u32)
            .flat_map(|i| std::iter::repeat_n(i, n))
            .collect();
        let idx = Tensor::new(idx, self.states.device())?;
        Ok(Self {
            states: self.states.index_select(&idx, 0)?,
            mask: self.mask.index_select(&idx, 0)?,
            truncated: self
                .truncated
                .iter()
                .flat_map(|&t| std::iter::repeat_n(t, n))
                .collect(),
        })
    }
}

/// Per-text encoder outputs, for checks against the reference.
#[derive(Debug, Clone)]
pub struct EncodedText {
    /// (len, d_model): the T5 encoder's last hidden state.
    pub hidden: Tensor,
    /// (len, decoder hidden): after `enc_to_dec_proj`.
    pub projected: Tensor,
    pub tokens: TokenizedText,
}

/// The T5 encoder and the projection to the decoder width. Immutable; runs in f32 whatever the
/// decoder's dtype (T5 overflows in f16, and the text is encoded once per generation).
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: TextTokenizer,
    t5: t5::T5EncoderModel,
    /// `enc_to_dec_proj`; `None` when the encoder already has the decoder's width.
    proj: Option<candle_nn::Linear>,
    decoder_hidden: usize,
    device: Device,
}

impl TextEncoder {
    /// `vb` is the checkpoint root in f32 (keys `text_encoder.…` and `enc_to_dec_proj.…`).
    pub fn new(
        cfg: &TextEncoderConfig,
        decoder_hidden: usize,
        tokenizer: TextTokenizer,
        vb: VarBuilder,
    ) -> Result<Self, TextError> {
        let t5 = t5::T5EncoderModel::load(vb.pp("text_encoder"), &cfg.to_t5()?)?;
        // As the reference: a projection exists exactly when the widths differ.
        let proj = if cfg.d_model != decoder_hidden {
            Some(candle_nn::linear(
                cfg.d_model,
                decoder_hidden,
                vb.pp("enc_to_dec_proj"),
            )?)
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            t5,
            proj,
            decoder_hidden,
            device: vb.device().clone(),
        })
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Encodes one text: T5 over its ids (no padding), then the projection.
    pub fn encode_one(&self, text: &str) -> Result<EncodedText, TextError> {
        let tokens = self.tokenizer.encode(text)?;
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        // `forward` takes `&mut self` for a decoder cache the encoder never uses; a clone shares
        // the weights.
        let hidden = self
            .t5
            .clone()
            .forward(&ids)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let projected = match &self.proj {
            Some(p) => p.forward(&hidden)?,
            None => hidden.clone(),
        };
        Ok(EncodedText {
            hidden,
            projected,
            tokens,
        })
    }

    /// The condition for `texts` (one row each), right-padded to the longest with zero states
    /// and a zero mask.
    pub fn encode(&self, texts: &[&str]) -> Result<TextCondition, TextError> {
        let encoded = texts
            .iter()
            .map(|t| self.encode_one(t))
            .collect::<Result<Vec<_>, _>>()?;
        let len = encoded
            .iter()
            .map(|e| e.tokens.ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut rows = Vec::with_capacity(encoded.len());
        let mut mask = Vec::with_capacity(encoded.len() * len);
        for e in &encoded {
            let n = e.tokens.ids.len();
            let row = if n < len {
                let pad = Tensor::zeros((len - n, self.decoder_hidden), DType::F32, &self.device)?;
                Tensor::cat(&[&e.projected, &pad], 0)?
            } else {
                e.projected.clone()
            };
            rows.push(row);
            mask.extend((0..len).map(|i| if i < n { 1f32 } else { 0f32 }));
        }
        Ok(TextCondition {
            states: Tensor::stack(&rows, 0)?,
            mask: Tensor::from_vec(mask, (encoded.len(), len), &self.device)?,
            truncated: encoded.iter().map(|e| e.tokens.truncated).collect(),
        })
    }
}
