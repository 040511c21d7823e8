//! The generation loop: text condition, delay pattern, decoder steps with guidance and
//! sampling, and the undelayed codes.
//!
//! Mirrors `MusicgenForConditionalGeneration.generate` (transformers): the decoder sequence
//! starts with one start column (the BOS id in every codebook) followed by the delayed prompt;
//! the first decoder call feeds all of that at once, every later call one column; after each
//! step the new column is overwritten wherever the delay pattern forces a token (see
//! [`crate::pattern::forced_token`]). With guidance the decoder batch holds the conditional rows
//! first and the null condition's rows after them, and the logits are mixed as
//! `uncond + scale * (cond - uncond)` before choosing tokens.
//!
//! Unlike the reference, a token forced by the pattern is not sampled at all (the reference
//! samples and then overwrites it), so the random stream is spent only on real choices.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::audio::{resample, Audio};
use crate::codec::CodecError;
use crate::decoder::DecoderError;
use crate::model::Musicgen;
use crate::pattern::{codebook_delays, forced_token, sequence_len, undo_delay, PatternError};
use crate::sampling::{SamplingError, SamplingParams, StepSelector, TakeRng};
use crate::text::{TextCondition, TextError};

/// What conditions the decoder.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// One text per batch row (several takes of one text repeat it).
    Text(Vec<String>),
    /// No text: the reference's unconditional input (zero condition). Guidance is pointless
    /// there (both halves would be identical) and is not run.
    Unconditional { rows: usize },
}

impl Condition {
    /// `takes` rows of one text; an empty or blank text means [`Condition::Unconditional`].
    pub fn takes_of(text: &str, takes: usize) -> Self {
        if text.trim().is_empty() {
            Self::Unconditional { rows: takes }
        } else {
            Self::Text(vec![text.to_string(); takes])
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Unconditional { rows } => *rows,
        }
    }
}

/// One generation request at the level of codes (audio prompts are encoded by the caller or
/// by the codec-aware wrapper).
#[derive(Debug, Clone)]
pub struct CodesRequest {
    pub condition: Condition,
    /// Undelayed prompt codes per row, `(rows, codebooks, prompt_frames)`; every row the same
    /// number of frames. Empty = no prompt.
    pub prompt: Vec<Vec<Vec<u32>>>,
    /// Frames to generate after the prompt (50 per second).
    pub new_frames: usize,
    pub sampling: SamplingParams,
    /// One seed per row: the same seed with the same inputs gives the same codes.
    pub seeds: Vec<u64>,
}

/// Passed to the step callback after every decoder step.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Steps done, 1-based.
    pub step: usize,
    /// Steps in this generation (`new_frames` + the delay depth − 1).
    pub total: usize,
    /// Time since the generation started (text encoding included).
    pub elapsed: Duration,
    /// A new frame completed by this step (all codebooks known), if any.
    pub frame: Option<FrameReady<'a>>,
}

/// One finished frame of every row, as soon as the delay pattern completes it (for streaming).
#[derive(Debug)]
pub struct FrameReady<'a> {
    /// Index among the new frames (0 = the first frame after the prompt).
    pub index: usize,
    /// `(rows, codebooks)` row-major.
    pub codes: &'a [u32],
}

/// What the step callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Abandon the generation; [`generate_codes`] returns [`GenerateError::Cancelled`].
    Stop,
}

/// Wall-clock times of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    pub text: Duration,
    /// The first decoder call (start column and prompt together).
    pub prefill: Duration,
    /// All decoder steps after the first.
    pub steps: Duration,
    pub total: Duration,
}

impl Timings {
    /// Decoder steps per second after the prefill.
    pub fn steps_per_second(&self, steps: usize) -> f64 {
        if steps <= 1 || self.steps.is_zero() {
            return 0.0;
        }
        (steps - 1) as f64 / self.steps.as_secs_f64()
    }
}

/// The result: undelayed codes, prompt first.
#[derive(Debug, Clone)]
pub struct CodesOutput {
    /// `(rows, codebooks, prompt_frames + new_frames)`.
    pub codes: Vec<Vec<Vec<u32>>>,
    pub prompt_frames: usize,
    pub new_frames: usize,
    pub seeds: Vec<u64>,
    /// Per row: the text was cut to the tokenizer's limit.
    pub text_truncated: Vec<bool>,
    /// Decoder steps run.
    pub steps: usize,
    pub timings: Timings,
}

impl CodesOutput {
    /// The codes as a `(rows, codebooks, frames)` u32 tensor (what the codec decodes).
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let rows = self.codes.len();
        let k = self.codes.first().map_or(0, Vec::len);
        let n = self.prompt_frames + self.new_frames;
        let flat: Vec<u32> = self.codes.iter().flatten().flatten().copied().collect();
        Tensor::from_vec(flat, (rows, k, n), device)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(
        "{requested} frames requested ({prompt} prompt + {new} new, {secs:.2} s) but this model allows at most {max} ({max_secs:.2} s), prompt included",
        requested = prompt + new, secs = (*prompt + *new) as f64 / 50.0, max_secs = *max as f64 / 50.0
    )]
    TooLong {
        prompt: usize,
        new: usize,
        max: usize,
    },
    #[error("at least one new frame must be requested")]
    NoFrames,
    #[error("{0}")]
    Request(String),
    #[error("generation cancelled after {step} of {total} steps")]
    Cancelled { step: usize, total: usize },
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Decoder(#[from] DecoderError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("generation: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Checks a request against the model before any work: lengths, prompt shape, seeds, sampling.
pub fn validate_request(model: &Musicgen, req: &CodesRequest) -> Result<(), GenerateError> {
    req.sampling.validate()?;
    let rows = req.condition.rows();
    let k = model.config().decoder.num_codebooks;
    if rows == 0 {
        return Err(GenerateError::Request(
            "at least one take (batch row) is needed".into(),
        ));
    }
    if req.seeds.len() != rows {
        return Err(GenerateError::Request(format!(
            "{} seeds given for {rows} rows",
            req.seeds.len()
        )));
    }
    if req.new_frames == 0 {
        return Err(GenerateError::NoFrames);
    }
    let prompt_frames = prompt_frames(req)?;
    if !req.prompt.is_empty() {
        if req.prompt.len() != rows {
            return Err(GenerateError::Request(format!(
                "{} prompt rows given for {rows} rows",
                req.prompt.len()
            )));
        }
        let vocab = model.config().decoder.vocab_size as u32;
        for row in &req.prompt {
            if row.len() != k {
                return Err(GenerateError::Request(format!(
                    "prompt has {} codebooks, the model {k}",
                    row.len()
                )));
            }
            if let Some(&bad) = row.iter().flatten().find(|&&c| c >= vocab) {
                return Err(GenerateError::Request(format!(
                    "prompt code {bad} is outside the codebook (< {vocab})"
                )));
            }
        }
    }
    let max = model.max_frames();
    if prompt_frames + req.new_frames > max {
        return Err(GenerateError::TooLong {
            prompt: prompt_frames,
            new: req.new_frames,
            max,
        });
    }
    Ok(())
}

fn prompt_frames(req: &CodesRequest) -> Result<usize, GenerateError> {
    let n = req
        .prompt
        .first()
        .and_then(|r| r.first())
        .map_or(0, Vec::len);
    if req.prompt.iter().flatten().any(|r| r.len() != n) {
        return Err(GenerateError::Request(
            "prompt rows and codebooks must all have the same number of frames".into(),
        ));
    }
    Ok(n)
}

/// Runs one generation. `on_step` is called after every decoder step (from this thread) and
/// can stop it; the callback's time counts in the timings.
pub fn generate_codes(
    model: &Musicgen,
    req: &CodesRequest,
    on_step: &mut dyn FnMut(&StepInfo) -> Control,
) -> Result<CodesOutput, GenerateError> {
    validate_request(model, req)?;
    let started = Instant::now();
    let cfg = &model.config().decoder;
    let decoder = model.decoder();
    let device = decoder.device().clone();
    let rows = req.condition.rows();
    let k = cfg.num_codebooks;
    let (bos, pad) = (cfg.bos_token_id, cfg.pad_token_id);
    let delays = codebook_delays(k, cfg.audio_channels)?;
    let prompt_frames = prompt_frames(req)?;
    let new_frames = req.new_frames;
    let empty: Vec<u32> = Vec::new();
    let prompt_row = |r: usize, c: usize| -> &[u32] { req.prompt.get(r).map_or(&empty, |p| &p[c]) };

    // Condition.
    let (cond, guidance) = match &req.condition {
        Condition::Text(texts) => {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            (
                model.text_encoder().encode(&refs)?,
                req.sampling.uses_guidance(),
            )
        }
        Condition::Unconditional { rows } => (
            TextCondition::unconditional(*rows, cfg.hidden_size, &device)?,
            false,
        ),
    };
    let text_truncated = cond.truncated.clone();
    let cond = if guidance { cond.with_null()? } else { cond };
    let batch = cond.batch();
    let text_time = started.elapsed();

    // The delayed sequence, host side: (rows, codebooks, len).
    let len = sequence_len(prompt_frames, new_frames, &delays);
    let start = prompt_frames + 1;
    let steps = len - start;
    let mut seq = vec![vec![vec![pad; len]; k]; rows];
    for (r, row) in seq.iter_mut().enumerate() {
        for (c, col) in row.iter_mut().enumerate() {
            for (t, slot) in col.iter_mut().enumerate().take(start) {
                *slot = forced_token(t, delays[c], prompt_row(r, c), new_frames, bos, pad)
                    .unwrap_or(pad);
            }
        }
    }
    let mut state = decoder.new_state(&cond.states, &cond.mask, len - 1)?;

    let mut selector = StepSelector::new(req.sampling.clone())?;
    let mut rngs: Vec<TakeRng> = req.seeds.iter().map(|&s| TakeRng::new(s)).collect();
    let mut frame = vec![0u32; rows * k];
    // Per-step buffers, reused: the ids fed (batch, codebooks, width; the prefill's width
    // first, 1 afterwards), the tokens forced by the delay pattern and the tokens chosen.
    let mut ids_buf: Vec<u32> = Vec::with_capacity(batch * k * start);
    let mut forced = vec![None; rows * k];
    let mut chosen = vec![0u32; rows * k];
    let mut prefill = Duration::ZERO;
    let steps_started = Instant::now();
    let max_delay = delays.iter().copied().max().unwrap_or(0);

    for step in 0..steps {
        let t = start + step; // the column this step produces
        let (from, width) = if step == 0 { (0, start) } else { (t - 1, 1) };
        // (batch, codebooks, width): the conditional rows, repeated for the null condition.
        ids_buf.clear();
        for b in 0..batch {
            for col in &seq[b % rows] {
                ids_buf.extend_from_slice(&col[from..from + width]);
            }
        }
        let ids = Tensor::from_slice(&ids_buf, (batch, k, width), &device)?;
        let logits = decoder.forward(&mut state, &ids)?; // (batch, codebooks, vocab)
        for r in 0..rows {
            for c in 0..k {
                forced[r * k + c] =
                    forced_token(t, delays[c], prompt_row(r, c), new_frames, bos, pad);
            }
        }
        selector.select(&logits, rows, guidance, &forced, &mut rngs, &mut chosen)?;
        for r in 0..rows {
            for c in 0..k {
                seq[r][c][t] = chosen[r * k + c];
            }
        }
        if step == 0 {
            prefill = steps_started.elapsed();
        }
        // The frame whose last codebook this column holds is now complete.
        let done = t
            .checked_sub(1 + max_delay)
            .filter(|&f| f >= prompt_frames && f < prompt_frames + new_frames);
        let frame_ready = done.map(|f| {
            for r in 0..rows {
                for c in 0..k {
                    frame[r * k + c] = seq[r][c][1 + delays[c] + f];
                }
            }
            FrameReady {
                index: f - prompt_frames,
                codes: &frame,
            }
        });
        let info = StepInfo {
            step: step + 1,
            total: steps,
            elapsed: started.elapsed(),
            frame: frame_ready,
        };
        if on_step(&info) == Control::Stop {
            return Err(GenerateError::Cancelled {
                step: step + 1,
                total: steps,
            });
        }
    }
    let decode_time = steps_started.elapsed();

    let codes = seq
        .iter()
        .map(|row| undo_delay(row, &delays, prompt_frames + new_frames))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CodesOutput {
        codes,
        prompt_frames,
        new_frames,
        seeds: req.seeds.clone(),
        text_truncated,
        steps,
        timings: Timings {
            text: text_time,
            prefill,
            steps: decode_time - prefill,
            total: started.elapsed(),
        },
    })
}

/// A generation request at the audio level: what the CLI and the service ask for.
#[derive(Debug, Clone)]
pub struct AudioRequest {
    /// The description; empty or blank = unconditional.
    pub text: String,
    /// Audio to continue (any sample rate and channel count; converted to the model's). The
    /// continuation follows its last sample.
    pub prompt: Option<Audio>,
    /// New frames to generate (50 per second).
    pub new_frames: usize,
    pub sampling: SamplingParams,
    /// Take `i` uses seed `seed + i`.
    pub seed: u64,
    /// Takes generated together in one batch, at least 1.
    pub takes: usize,
}

/// One finished take.
#[derive(Debug, Clone)]
pub struct Take {
    pub seed: u64,
    /// Undelayed codes `(codebooks, prompt_frames + new_frames)`, prompt first (stereo:
    /// interleaved left/right).
    pub codes: Vec<Vec<u32>>,
    /// The decode of all the codes, prompt included, at the model's sample rate and channels.
    pub audio: Audio,
    /// Samples of `audio` that belong to the prompt (`prompt_frames * hop`).
    pub prompt_samples: usize,
}

impl Take {
    /// Only the new audio (after the prompt).
    pub fn continuation(&self) -> Audio {
        self.audio.from_frame(self.prompt_samples)
    }
}

/// Wall-clock times of a generation with the codec.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AudioTimings {
    /// Encoding the prompt audio.
    pub encode: Duration,
    pub generate: Timings,
    /// Decoding every take.
    pub decode: Duration,
}

/// The takes of one [`AudioRequest`].
#[derive(Debug, Clone)]
pub struct AudioOutput {
    pub takes: Vec<Take>,
    pub prompt_frames: usize,
    pub new_frames: usize,
    /// The text was cut to the tokenizer's limit.
    pub text_truncated: bool,
    /// Decoder steps run.
    pub steps: usize,
    pub timings: AudioTimings,
}

/// One [`Take`] per generated row: its seed and codes from `out`, its decoded `audio` (prompt
/// and continuation together, one item per row in row order).
pub(crate) fn assemble_takes(
    model: &Musicgen,
    out: &CodesOutput,
    audio: impl IntoIterator<Item = Audio>,
) -> Vec<Take> {
    let prompt_samples = out.prompt_frames * model.hop_length();
    out.codes
        .iter()
        .zip(audio)
        .zip(&out.seeds)
        .map(|((codes, audio), &seed)| Take {
            seed,
            codes: codes.clone(),
            audio,
            prompt_samples,
        })
        .collect()
}

/// Frames the codec makes of `samples` samples at the model's rate (`ceil(samples / hop)`).
pub fn frames_for_samples(model: &Musicgen, samples: usize) -> usize {
    samples.div_ceil(model.hop_length())
}

/// Text and/or audio prompt to audio: encodes the prompt, runs [`generate_codes`] for all takes
/// in one batch, and decodes every take, prompt and continuation together (EnCodec is not
/// causal: decoding the continuation alone would give its start no left context).
pub fn generate_audio(
    model: &Musicgen,
    req: &AudioRequest,
    on_step: &mut dyn FnMut(&StepInfo) -> Control,
) -> Result<AudioOutput, GenerateError> {
    if req.takes == 0 {
        return Err(GenerateError::Request("at least one take is needed".into()));
    }
    req.sampling.validate()?;
    let channels = model.channels();
    let rate = model.sample_rate();
    let t0 = Instant::now();
    let prompt_codes = match &req.prompt {
        None => Vec::new(),
        Some(audio) => {
            audio
                .validate()
                .map_err(|e| GenerateError::Request(format!("prompt audio: {e}")))?;
            let audio = resample(&audio.to_channels(channels), rate)
                .map_err(|e| GenerateError::Request(format!("prompt audio: {e}")))?;
            let frames = frames_for_samples(model, audio.frames());
            let max = model.max_frames();
            if frames + req.new_frames.max(1) > max {
                return Err(GenerateError::TooLong {
                    prompt: frames,
                    new: req.new_frames,
                    max,
                });
            }
            let flat: Vec<f32> = audio.channels.concat();
            let t = Tensor::from_vec(flat, (1, channels, audio.frames()), model.codec().device())?;
            let codes = model.codec().encode_interleaved(&t, channels)?; // (1, K, frames)
            let codes: Vec<Vec<u32>> = codes.squeeze(0)?.to_vec2()?;
            vec![codes; req.takes]
        }
    };
    let encode = t0.elapsed();
    let seeds: Vec<u64> = (0..req.takes as u64)
        .map(|i| req.seed.wrapping_add(i))
        .collect();
    let out = generate_codes(
        model,
        &CodesRequest {
            condition: Condition::takes_of(&req.text, req.takes),
            prompt: prompt_codes,
            new_frames: req.new_frames,
            sampling: req.sampling.clone(),
            seeds,
        },
        on_step,
    )?;
    let t1 = Instant::now();
    let codes = out.to_tensor(model.codec().device())?;
    let audio = model.codec().decode_interleaved(&codes, channels)?; // (takes, C, samples)
    let audio: Vec<Vec<Vec<f32>>> = audio.to_dtype(candle_core::DType::F32)?.to_vec3()?;
    let audio = audio.into_iter().map(|channels| Audio {
        sample_rate: rate,
        channels,
    });
    let takes = assemble_takes(model, &out, audio);
    Ok(AudioOutput {
        takes,
        prompt_frames: out.prompt_frames,
        new_frames: out.new_frames,
        text_truncated: out.text_truncated.iter().any(|&t| t),
        steps: out.steps,
        timings: AudioTimings {
            encode,
            generate: out.timings,
            decode: t1.elapsed(),
        },
    })
}
