//! `segue-engine`: MusicGen inference on candle, with no plugin types.
//!
//! Modules by concept (see the README's architecture section):
//! - [`codec`]: EnCodec 32 kHz (SEANet encoder/decoder + residual vector quantiser).
//! - [`text`]: T5 text encoder and tokenizer.
//! - [`decoder`]: the MusicGen transformer decoder over EnCodec tokens.
//! - [`matvec`]: the CPU kernel for the decoder's few-rows products.
//! - [`pattern`]: the codebook delay pattern (pure functions).
//! - [`sampling`]: guidance mix, temperature, top-k / top-p, greedy.
//! - [`generate`]: the generation loop.
//! - [`longform`]: any length by windowed extension, and streaming generation.
//! - [`stream`]: streaming decode of a growing token stream.
//! - [`model`]: a loaded MusicGen checkpoint (typed config, text encoder, decoder).
//! - [`hub`]: model download / cache / local folders.
//! - [`service`]: the long-lived inference thread and its channels.
//! - [`audio`]: WAV reading/writing and resampling helpers shared by the CLI and the plugin.

pub mod audio;
pub mod codec;
pub(crate) mod cpu_ops;
pub mod decoder;
pub mod generate;
pub mod hub;
pub mod longform;
pub mod matvec;
pub mod model;
pub mod pattern;
pub mod sampling;
pub mod service;
pub mod stream;
pub mod text;
