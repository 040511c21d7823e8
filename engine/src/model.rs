//! A loaded MusicGen checkpoint: typed config, text encoder and decoder.
//!
//! Mirrors the layout of `MusicgenForConditionalGeneration`'s `config.json` (sections
//! `text_encoder`, `audio_encoder`, `decoder`) and its weights (prefixes `text_encoder.`,
//! `enc_to_dec_proj.`, `audio_encoder.`, `decoder.`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::decoder::{Decoder, DecoderConfig, DecoderError};
use crate::text::{TextEncoder, TextEncoderConfig, TextError, TextTokenizer};

/// The parts of `config.json` the generation uses (unknown fields are ignored).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MusicgenConfig {
    pub decoder: DecoderConfig,
    pub text_encoder: TextEncoderConfig,
}

/// `generation_config.json`: the checkpoint's sampling defaults and length limit.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct GenerationConfig {
    /// The authors' length limit: 1500 (30 s of frames) for every public checkpoint.
    pub max_length: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub temperature: Option<f64>,
    pub do_sample: Option<bool>,
    pub decoder_start_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// Errors while loading a checkpoint; each names the file or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: weights: {source}")]
    Weights {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Decoder(#[from] DecoderError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("{0}")]
    Invalid(String),
}

/// The paths of one checkpoint on local disk.
#[derive(Debug, Clone)]
pub struct CheckpointPaths {
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    /// One file, or every shard.
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

impl CheckpointPaths {
    /// The files of a folder laid out as `save_pretrained` writes it, with a single
    /// `model.safetensors` (sharded folders go through the hub module).
    pub fn from_dir(dir: &Path) -> Self {
        let gen = dir.join("generation_config.json");
        Self {
            config: dir.join("config.json"),
            generation_config: gen.exists().then_some(gen),
            weights: vec![dir.join("model.safetensors")],
            tokenizer: dir.join("tokenizer.json"),
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let file_err = |message: String| ModelError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_err(format!("invalid JSON: {e}")))
}

/// A loaded MusicGen model: immutable, shareable between generations (`Clone` is cheap).
#[derive(Clone)]
pub struct Musicgen {
    config: MusicgenConfig,
    generation: GenerationConfig,
    text: TextEncoder,
    decoder: Decoder,
}

impl Musicgen {
    /// Loads the text encoder (always f32) and the decoder (in `dtype`) from `paths`.
    pub fn load(
        paths: &CheckpointPaths,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config: MusicgenConfig = read_json(&paths.config)?;
        let generation = match &paths.generation_config {
            Some(p) => read_json(p)?,
            None => GenerationConfig::default(),
        };
        for w in &paths.weights {
            if !w.exists() {
                return Err(ModelError::File {
                    path: w.clone(),
                    message: "weights file not found".into(),
                });
            }
        }
        if !paths.tokenizer.exists() {
            return Err(ModelError::File {
                path: paths.tokenizer.clone(),
                message: "tokenizer.json not found".into(),
            });
        }
        let weights_err = |source| ModelError::Weights {
            path: paths.weights[0].clone(),
            source,
        };
        // SAFETY: the files are memory-mapped read-only; like every safetensors loader we rely
        // on nobody truncating them while the model is loaded.
        let vb_f32 =
            unsafe { VarBuilder::from_mmaped_safetensors(&paths.weights, DType::F32, device) }
                .map_err(weights_err)?;
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&paths.weights, dtype, device) }
            .map_err(weights_err)?;
        let tokenizer = TextTokenizer::from_file(&paths.tokenizer)?;
        Self::from_var_builders(config, generation, tokenizer, vb_f32, vb)
    }

    /// Builds the model from already opened weights: `vb_text` (f32) for the text encoder and
    /// projection, `vb` (the compute dtype) for the decoder, both at the checkpoint root.
    pub fn from_var_builders(
        config: MusicgenConfig,
        generation: GenerationConfig,
        tokenizer: TextTokenizer,
        vb_text: VarBuilder,
        vb: VarBuilder,
    ) -> Result<Self, ModelError> {
        let decoder = Decoder::new(&config.decoder, vb.pp("decoder"))?;
        let text = TextEncoder::new(
            &config.text_encoder,
            config.decoder.hidden_size,
            tokenizer,
            vb_text,
        )?;
        Ok(Self {
            config,
            generation,
            text,
            decoder,
        })
    }

    pub fn config(&self) -> &MusicgenConfig {
        &self.config
    }
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.text
    }
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Audio frames per second of the codes (EnCodec 32 kHz: 50).
    pub fn frame_rate(&self) -> f64 {
        50.0
    }

    /// The most frames (prompt and new together) one generation may hold: the checkpoint's
    /// `max_length` read as frames (1500 = 30 s, the length the public models were trained on),
    /// and never more than the decoder's positions allow.
    pub fn max_frames(&self) -> usize {
        let delays = self.config.decoder.channel_codebooks().saturating_sub(1);
        // Positions fed: the start column plus every column but the last.
        let by_positions = self
            .config
            .decoder
            .max_position_embeddings
            .saturating_sub(delays);
        match self.generation.max_length {
            Some(l) => by_positions.min(l),
            None => by_positions,
        }
    }
}
