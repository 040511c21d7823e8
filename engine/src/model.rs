//! A loaded MusicGen checkpoint: typed config, text encoder, decoder and codec.
//!
//! Mirrors the layout of `MusicgenForConditionalGeneration`'s `config.json` (sections
//! `text_encoder`, `audio_encoder`, `decoder`) and its weights (prefixes `text_encoder.`,
//! `enc_to_dec_proj.`, `audio_encoder.`, `decoder.`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::codec::{CheckpointCodec, CodecError, Encodec};
use crate::decoder::{Decoder, DecoderConfig, DecoderError, Quant};
use crate::hub::{HubError, ModelFiles};
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
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(transparent)]
    Decoder(#[from] DecoderError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("{0}")]
    Invalid(String),
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let file_err = |message: String| ModelError::File {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_err(format!("invalid JSON: {e}")))
}

/// A loaded MusicGen model: immutable, shareable between generations and threads (`Clone` is
/// cheap: the weights are reference-counted).
#[derive(Clone)]
pub struct Musicgen {
    config: MusicgenConfig,
    generation: GenerationConfig,
    text: TextEncoder,
    decoder: Decoder,
    codec: Encodec,
    codec_info: CheckpointCodec,
}

impl Musicgen {
    /// Loads a resolved checkpoint (see [`crate::hub::resolve`]): the decoder in `dtype`, the
    /// text encoder and the codec in f32 (T5 overflows in f16; both run once per generation).
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(files, dtype, device, None)
    }

    /// As [`Musicgen::load`], with the decoder's linear layers quantised to `quant` once while
    /// loading (`dtype` must then be f32, the compute dtype of the activations); the text
    /// encoder and codec are never quantised. See [`Decoder::new_quantized`].
    pub fn load_with(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        quant: Option<Quant>,
    ) -> Result<Self, ModelError> {
        if quant.is_some() && dtype != DType::F32 {
            return Err(ModelError::Invalid(format!(
                "quantised decoder weights compute in f32; {dtype:?} cannot be combined with them"
            )));
        }
        let json: serde_json::Value = files.read_config()?;
        let config: MusicgenConfig =
            serde_json::from_value(json.clone()).map_err(|e| ModelError::File {
                path: files.config.clone(),
                message: format!("not a MusicGen config: {e}"),
            })?;
        let generation = match &files.generation_config {
            Some(p) => read_json(p)?,
            None => GenerationConfig::default(),
        };
        let tokenizer_path = files.tokenizer.as_ref().ok_or_else(|| ModelError::File {
            path: files.dir.join("tokenizer.json"),
            message: "the checkpoint has no tokenizer.json (MusicGen needs its T5 tokenizer)"
                .into(),
        })?;
        let tokenizer = TextTokenizer::from_file(tokenizer_path)?;
        let vb_f32 = files.var_builder(DType::F32, device)?;
        let vb = files.var_builder(dtype, device)?;
        let codec_info = CheckpointCodec::from_json(&json)?;
        if codec_info.channels != config.decoder.audio_channels {
            return Err(ModelError::Invalid(format!(
                "{}: decoder has {} audio channels, codec section says {}",
                files.config.display(),
                config.decoder.audio_channels,
                codec_info.channels
            )));
        }
        let codec = Encodec::new(&codec_info.config, vb_f32.pp(&codec_info.prefix))?;
        let per_channel = codec.config().num_codebooks();
        if per_channel * config.decoder.audio_channels != config.decoder.num_codebooks {
            return Err(ModelError::Invalid(format!(
                "{}: the decoder models {} codebooks but the codec gives {per_channel} per channel \
                 for {} channel(s)",
                files.config.display(),
                config.decoder.num_codebooks,
                config.decoder.audio_channels
            )));
        }
        let decoder = Decoder::new_quantized(&config.decoder, vb.pp("decoder"), quant)?;
        let text = TextEncoder::new(
            &config.text_encoder,
            config.decoder.hidden_size,
            tokenizer,
            vb_f32,
        )?;
        Ok(Self {
            config,
            generation,
            text,
            decoder,
            codec,
            codec_info,
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
    pub fn codec(&self) -> &Encodec {
        &self.codec
    }

    /// Audio channels of the music (1, or 2 for the stereo checkpoints).
    pub fn channels(&self) -> usize {
        self.codec_info.channels
    }

    /// Sample rate of the audio in and out (32 000 Hz).
    pub fn sample_rate(&self) -> u32 {
        self.codec.config().sampling_rate
    }

    /// Audio samples per frame (640).
    pub fn hop_length(&self) -> usize {
        self.codec.config().hop_length()
    }

    /// Frames per second of the codes (50).
    pub fn frame_rate(&self) -> f64 {
        self.codec.config().frame_rate()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The service shares one loaded model between threads.
    #[test]
    fn model_is_shareable_between_threads() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Musicgen>();
        shareable::<Decoder>();
        shareable::<TextEncoder>();
    }

    #[test]
    fn generation_config_fields() {
        let g: GenerationConfig = serde_json::from_str(
            r#"{"do_sample": true, "guidance_scale": 3.0, "top_k": 250, "max_length": 1500,
                "pad_token_id": 2048, "decoder_start_token_id": 2048, "bos_token_id": 2048}"#,
        )
        .unwrap();
        assert_eq!(g.max_length, Some(1500));
        assert_eq!(
            (g.top_k, g.guidance_scale, g.do_sample),
            (Some(250), Some(3.0), Some(true))
        );
    }
}
