//! Long-form generation by windowed extension, and streaming, over [`generate_codes`].
//!
//! MusicGen's positions end at 30 s. Longer music is generated the way the authors do it
//! (audiocraft's `MusicGen._generate_tokens` with `extend_stride`): a first window of
//! [`WindowConfig::window_frames`], then windows that each keep the last
//! `window - stride` frames of the stream as their prompt and add up to
//! [`WindowConfig::stride_frames`] new frames (defaults 30 s and 18 s: every later window is
//! prompted with the last 12 s). As in audiocraft:
//! - the text condition is the same for every window (encoded again per window, unchanged);
//! - a window's prompt is *undelayed*, complete frames (the previous window's output after the
//!   delay pattern was undone), and each window applies the delay pattern afresh to its prompt:
//!   its first step predicts codebook 0 of the first new frame while the higher codebooks of the
//!   last prompt frames are forced from the prompt (see [`crate::pattern::forced_token`]);
//! - the windows' new frames are concatenated into one token stream, decoded as a whole (here
//!   chunk by chunk, [`crate::stream`]), so no window seam reaches the audio.
//!
//! Differences, on purpose: a prompt longer than fits is cut to its most recent part (audiocraft
//! refuses it), and window `w` samples with [`window_seed`]`(seed, w)` (window 0 with `seed`
//! itself, so a take that fits one window is the same as before).

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::audio::{resample, Audio};
use crate::generate::{
    assemble_takes, frames_for_samples, generate_codes, AudioOutput, AudioRequest, AudioTimings,
    CodesOutput, CodesRequest, Condition, Control, FrameReady, GenerateError, StepInfo, Timings,
};
use crate::model::Musicgen;
use crate::pattern::{codebook_delays, sequence_len};
use crate::stream::{append_chunks, decode_chunked, Chunk, StreamConfig, StreamDecoder};

/// The most new frames one request may ask for: 20 minutes at 50 Hz (the audio of a take is
/// held in memory, 7.7 MB per minute and channel).
pub const MAX_NEW_FRAMES: usize = 20 * 60 * 50;

/// Frames of prompt audio encoded before the part that is kept when a prompt is cut, so that
/// the kept frames do not see the encoder's edge (1 s).
const ENCODE_MARGIN_FRAMES: usize = 50;

/// Window length and stride of long-form generation, in 50 Hz frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowConfig {
    /// Frames (prompt and new together) of one generation window; at most the model's
    /// [`Musicgen::max_frames`].
    pub window_frames: usize,
    /// New frames each window after the first adds; `window_frames - stride_frames` frames of
    /// the stream prompt each later window.
    pub stride_frames: usize,
}

/// The authors' window (seconds).
pub const DEFAULT_WINDOW_S: f64 = 30.0;
/// The authors' stride (seconds): later windows are prompted with the last 12 s.
pub const DEFAULT_STRIDE_S: f64 = 18.0;

impl WindowConfig {
    /// From seconds at `frame_rate` frames per second (rounded to whole frames).
    pub fn from_seconds(
        window_s: f64,
        stride_s: f64,
        frame_rate: f64,
    ) -> Result<Self, GenerateError> {
        for (what, v) in [("window", window_s), ("stride", stride_s)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(GenerateError::Request(format!(
                    "the {what} must be a positive number of seconds (got {v})"
                )));
            }
        }
        Ok(Self {
            window_frames: (window_s * frame_rate).round() as usize,
            stride_frames: (stride_s * frame_rate).round() as usize,
        })
    }

    /// The authors' 30 s / 18 s, the window shortened to what `model` allows (and the stride
    /// in proportion) for checkpoints with fewer positions.
    pub fn for_model(model: &Musicgen) -> Self {
        let fr = model.frame_rate();
        let window = ((DEFAULT_WINDOW_S * fr).round() as usize).min(model.max_frames());
        let stride = ((window as f64 * DEFAULT_STRIDE_S / DEFAULT_WINDOW_S).round() as usize)
            .clamp(1, window.saturating_sub(1).max(1));
        Self {
            window_frames: window,
            stride_frames: stride,
        }
    }

    /// The window must fit the model and the stride must leave a prompt: `0 < stride < window
    /// <= max_frames`.
    pub fn validate(&self, max_frames: usize) -> Result<(), GenerateError> {
        if self.window_frames > max_frames {
            return Err(GenerateError::Request(format!(
                "the window of {} frames ({:.2} s) is longer than this model allows ({max_frames} frames, {:.2} s)",
                self.window_frames,
                self.window_frames as f64 / 50.0,
                max_frames as f64 / 50.0
            )));
        }
        if self.stride_frames == 0 || self.stride_frames >= self.window_frames {
            return Err(GenerateError::Request(format!(
                "the stride ({} frames) must be shorter than the window ({} frames) and not zero: \
                 each window keeps window - stride frames as its prompt",
                self.stride_frames, self.window_frames
            )));
        }
        Ok(())
    }

    /// Frames of the stream that prompt every window after the first.
    pub fn context_frames(&self) -> usize {
        self.window_frames - self.stride_frames
    }
}

/// One window of a [`Plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Frames of the stream (its most recent ones) that prompt this window.
    pub prompt_frames: usize,
    /// Frames this window adds.
    pub new_frames: usize,
    /// Index of this window's first new frame among all the request's new frames.
    pub offset: usize,
}

/// How one request is cut into windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Frames of the caller's prompt that are used (its most recent ones).
    pub prompt_frames: usize,
    pub windows: Vec<Window>,
}

/// The longest prompt a request of `new_frames` may keep: it leaves the first window room for
/// a full stride of new frames (or all of them, when fewer are asked for). A request that fits
/// one window keeps up to `window - new_frames` frames; a longer one up to `window - stride`,
/// the same context every later window has.
pub fn max_prompt_frames(new_frames: usize, cfg: &WindowConfig) -> usize {
    cfg.window_frames - new_frames.min(cfg.stride_frames)
}

/// Cuts a request of `prompt_frames` + `new_frames` into windows (`cfg` valid, `new_frames`
/// at least 1). The first window holds the (cut) prompt and fills the window; every later one
/// is prompted with the last [`WindowConfig::context_frames`] of the stream and adds up to a
/// stride; the last one adds what is left.
pub fn plan_windows(prompt_frames: usize, new_frames: usize, cfg: &WindowConfig) -> Plan {
    let prompt = prompt_frames.min(max_prompt_frames(new_frames, cfg));
    let first = new_frames.min(cfg.window_frames - prompt);
    let mut windows = vec![Window {
        prompt_frames: prompt,
        new_frames: first,
        offset: 0,
    }];
    let mut done = first;
    while done < new_frames {
        let stream = prompt + done;
        let n = (new_frames - done).min(cfg.stride_frames);
        windows.push(Window {
            prompt_frames: cfg.context_frames().min(stream),
            new_frames: n,
            offset: done,
        });
        done += n;
    }
    Plan {
        prompt_frames: prompt,
        windows,
    }
}

/// The prompt of the next window: the last `keep` frames of every codebook of `stream`
/// (`(codebooks, frames)`, undelayed; all frames complete, so the window applies the delay
/// pattern to them afresh). The whole stream when it is shorter.
pub fn window_prompt(stream: &[Vec<u32>], keep: usize) -> Vec<Vec<u32>> {
    stream
        .iter()
        .map(|c| c[c.len().saturating_sub(keep)..].to_vec())
        .collect()
}

/// The sampling seed of window `window` of a take seeded `seed`: `seed` itself for the first
/// window, a well-mixed value (splitmix64) for later ones, so that windows do not repeat each
/// other's random choices and do not collide with the seeds of other takes (`seed + i`).
pub fn window_seed(seed: u64, window: usize) -> u64 {
    if window == 0 {
        return seed;
    }
    let mut z = seed ^ (window as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Refuses more than [`MAX_NEW_FRAMES`] before any work.
fn check_new_frames(new_frames: usize) -> Result<(), GenerateError> {
    if new_frames > MAX_NEW_FRAMES {
        return Err(GenerateError::Request(format!(
            "{new_frames} new frames ({:.1} s) requested; at most {MAX_NEW_FRAMES} ({} minutes)",
            new_frames as f64 / 50.0,
            MAX_NEW_FRAMES / 3000
        )));
    }
    Ok(())
}

/// Decoder steps one window runs (its new frames plus the delay depth).
fn window_steps(w: &Window, delays: &[usize]) -> usize {
    sequence_len(w.prompt_frames, w.new_frames, delays) - (w.prompt_frames + 1)
}

/// [`generate_codes`] for any number of new frames: one window when prompt and new frames fit
/// `cfg.window_frames`, else windowed extension (see the module docs). A longer prompt is cut
/// to its most recent part. `on_step` sees the steps of all windows as one run (`step` and
/// `total` over the whole request, frame indices among all new frames).
pub fn generate_long_codes(
    model: &Musicgen,
    req: &CodesRequest,
    cfg: &WindowConfig,
    on_step: &mut dyn FnMut(&StepInfo) -> Control,
) -> Result<CodesOutput, GenerateError> {
    let started = Instant::now();
    cfg.validate(model.max_frames())?;
    if req.new_frames == 0 {
        return Err(GenerateError::NoFrames);
    }
    check_new_frames(req.new_frames)?;
    let rows = req.condition.rows();
    if req.prompt.len() > rows || req.seeds.len() != rows {
        return Err(GenerateError::Request(format!(
            "{} prompt rows and {} seeds for {rows} rows",
            req.prompt.len(),
            req.seeds.len()
        )));
    }
    let given = req
        .prompt
        .first()
        .and_then(|r| r.first())
        .map_or(0, Vec::len);
    let plan = plan_windows(given, req.new_frames, cfg);
    let k = model.config().decoder.num_codebooks;
    let delays = codebook_delays(k, model.config().decoder.audio_channels)?;
    let total: usize = plan.windows.iter().map(|w| window_steps(w, &delays)).sum();
    // The stream per row, `(rows, codebooks, frames)`: the cut prompt, then every window's new
    // frames.
    let mut stream: Vec<Vec<Vec<u32>>> = if req.prompt.is_empty() {
        vec![vec![Vec::new(); k]; rows]
    } else {
        req.prompt
            .iter()
            .map(|row| window_prompt(row, plan.prompt_frames))
            .collect()
    };
    let mut steps_before = 0;
    let mut timings = Timings::default();
    let mut text_truncated = vec![false; rows];
    for (w, win) in plan.windows.iter().enumerate() {
        let prompt: Vec<Vec<Vec<u32>>> = if win.prompt_frames == 0 {
            Vec::new()
        } else {
            stream
                .iter()
                .map(|row| window_prompt(row, win.prompt_frames))
                .collect()
        };
        let window_req = CodesRequest {
            condition: req.condition.clone(),
            prompt,
            new_frames: win.new_frames,
            sampling: req.sampling.clone(),
            seeds: req.seeds.iter().map(|&s| window_seed(s, w)).collect(),
        };
        let out = generate_codes(model, &window_req, &mut |info| {
            let frame = info.frame.as_ref().map(|f| FrameReady {
                index: win.offset + f.index,
                codes: f.codes,
            });
            on_step(&StepInfo {
                step: steps_before + info.step,
                total,
                elapsed: started.elapsed(),
                frame,
            })
        })
        .map_err(|e| match e {
            GenerateError::Cancelled { step, .. } => GenerateError::Cancelled {
                step: steps_before + step,
                total,
            },
            e => e,
        })?;
        steps_before += out.steps;
        timings.text += out.timings.text;
        timings.prefill += out.timings.prefill;
        timings.steps += out.timings.steps;
        for (t, o) in text_truncated.iter_mut().zip(&out.text_truncated) {
            *t |= o;
        }
        for (dst, src) in stream.iter_mut().zip(&out.codes) {
            for (d, s) in dst.iter_mut().zip(src) {
                d.extend_from_slice(&s[win.prompt_frames..]);
            }
        }
    }
    timings.total = started.elapsed();
    Ok(CodesOutput {
        codes: stream,
        prompt_frames: plan.prompt_frames,
        new_frames: req.new_frames,
        seeds: req.seeds.clone(),
        text_truncated,
        steps: steps_before,
        timings,
    })
}

/// How [`generate_long_audio`] windows and streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongOptions {
    pub window: WindowConfig,
    /// Emit chunks while generating (`Some`), or decode at the end only (`None`).
    pub stream: Option<StreamConfig>,
    /// How takes longer than one window are decoded at the end when not streaming (the same
    /// chunking a stream would use, so streamed and non-streamed takes are the same audio).
    pub chunked_decode: StreamConfig,
}

impl LongOptions {
    /// The authors' window and stride for `model`, no streaming.
    pub fn for_model(model: &Musicgen) -> Self {
        Self {
            window: WindowConfig::for_model(model),
            stream: None,
            chunked_decode: StreamConfig::default(),
        }
    }
}

/// Encodes prompt audio to `(codebooks, frames)` codes, keeping at most the `keep` most recent
/// frames. A prompt that fits is encoded whole (frames counted from its start, the last one
/// padded, as [`crate::generate::generate_audio`] does); a longer one is cut to its last
/// `keep` frames' samples (plus a margin encoded and thrown away, so the kept frames do not
/// see the encoder's edge). Returns the codes and the seconds of prompt audio they stand for.
fn encode_prompt(
    model: &Musicgen,
    audio: &Audio,
    keep: usize,
) -> Result<(Vec<Vec<u32>>, f64), GenerateError> {
    let channels = model.channels();
    let rate = model.sample_rate();
    let hop = model.hop_length();
    let original_s = audio.duration_s();
    audio
        .validate()
        .map_err(|e| GenerateError::Request(format!("prompt audio: {e}")))?;
    let audio = resample(&audio.to_channels(channels), rate)
        .map_err(|e| GenerateError::Request(format!("prompt audio: {e}")))?;
    let n = audio.frames();
    let frames = frames_for_samples(model, n);
    let (audio, drop) = if frames <= keep {
        (audio, 0)
    } else {
        let margin = ENCODE_MARGIN_FRAMES.min(n / hop - keep);
        let from = n - (keep + margin) * hop;
        let cut = Audio {
            sample_rate: rate,
            channels: audio.channels.iter().map(|c| c[from..].to_vec()).collect(),
        };
        (cut, margin)
    };
    let seconds = if frames <= keep {
        original_s
    } else {
        (keep * hop) as f64 / f64::from(rate)
    };
    let flat: Vec<f32> = audio.channels.concat();
    let t = Tensor::from_vec(flat, (1, channels, audio.frames()), model.codec().device())?;
    let codes = model.codec().encode_interleaved(&t, channels)?; // (1, K, frames)
    let codes: Vec<Vec<u32>> = codes.squeeze(0)?.to_vec2()?;
    Ok((
        codes.into_iter().map(|c| c[drop..].to_vec()).collect(),
        seconds,
    ))
}

/// [`crate::generate::generate_audio`] for any length, with optional streaming: the prompt is
/// cut to what fits ([`max_prompt_frames`]), the codes come from [`generate_long_codes`], and
/// with `opts.stream` every chunk of decoded continuation goes to `on_chunk` as soon as its
/// frames (and their right context) exist; the last one when the take completes.
///
/// The takes' audio: for a stream, the prompt's decode followed by exactly the streamed chunks;
/// otherwise a one-shot decode when everything fits one window (the reference path), and the
/// chunked decode a stream would have given for longer takes (bounded memory).
pub fn generate_long_audio(
    model: &Musicgen,
    req: &AudioRequest,
    opts: &LongOptions,
    on_step: &mut dyn FnMut(&StepInfo) -> Control,
    on_chunk: &mut dyn FnMut(&Chunk),
) -> Result<(AudioOutput, f64), GenerateError> {
    if req.takes == 0 {
        return Err(GenerateError::Request("at least one take is needed".into()));
    }
    req.sampling.validate()?;
    opts.window.validate(model.max_frames())?;
    if req.new_frames == 0 {
        return Err(GenerateError::NoFrames);
    }
    check_new_frames(req.new_frames)?;
    let channels = model.channels();
    let rate = model.sample_rate();
    let k = model.config().decoder.num_codebooks;
    let t0 = Instant::now();
    let keep = max_prompt_frames(req.new_frames, &opts.window);
    let (prompt_codes, prompt_s) = match &req.prompt {
        None => (Vec::new(), 0.0),
        Some(audio) => {
            let (codes, secs) = encode_prompt(model, audio, keep)?;
            (vec![codes; req.takes], secs)
        }
    };
    let encode = t0.elapsed();
    let seeds: Vec<u64> = (0..req.takes as u64)
        .map(|i| req.seed.wrapping_add(i))
        .collect();
    let codes_req = CodesRequest {
        condition: Condition::takes_of(&req.text, req.takes),
        prompt: prompt_codes.clone(),
        new_frames: req.new_frames,
        sampling: req.sampling.clone(),
        seeds,
    };
    let mut streamer = match opts.stream {
        Some(cfg) => {
            let prompt = if prompt_codes.is_empty() {
                vec![vec![Vec::new(); k]; req.takes]
            } else {
                prompt_codes.clone()
            };
            Some(StreamDecoder::new(model.codec(), channels, prompt, cfg)?)
        }
        None => None,
    };
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut stream_error = None;
    let mut stream_time = Duration::ZERO;
    let result = generate_long_codes(model, &codes_req, &opts.window, &mut |info| {
        if let (Some(dec), Some(frame)) = (streamer.as_mut(), info.frame.as_ref()) {
            let t = Instant::now();
            match dec.push_frame(frame.codes) {
                Ok(Some(chunk)) => {
                    on_chunk(&chunk);
                    chunks.push(chunk);
                }
                Ok(None) => {}
                Err(e) => {
                    stream_error = Some(e);
                    return Control::Stop;
                }
            }
            stream_time += t.elapsed();
        }
        on_step(info)
    });
    if let Some(e) = stream_error {
        return Err(e.into());
    }
    let out = result?;
    let t1 = Instant::now();
    let audio: Vec<Audio> = if let Some(mut dec) = streamer {
        if let Some(chunk) = dec.finish()? {
            on_chunk(&chunk);
            chunks.push(chunk);
        }
        let mut audio = dec.prompt_audio()?;
        append_chunks(&mut audio, &chunks);
        audio
    } else if out.prompt_frames + out.new_frames <= opts.window.window_frames {
        let codes = out.to_tensor(model.codec().device())?;
        let audio = model.codec().decode_interleaved(&codes, channels)?; // (takes, C, samples)
        let audio: Vec<Vec<Vec<f32>>> = audio.to_dtype(DType::F32)?.to_vec3()?;
        audio
            .into_iter()
            .map(|channels| Audio {
                sample_rate: rate,
                channels,
            })
            .collect()
    } else {
        decode_chunked(
            model.codec(),
            channels,
            &out.codes,
            out.prompt_frames,
            opts.chunked_decode,
        )?
    };
    let takes = assemble_takes(model, &out, audio);
    Ok((
        AudioOutput {
            takes,
            prompt_frames: out.prompt_frames,
            new_frames: out.new_frames,
            text_truncated: out.text_truncated.iter().any(|&t| t),
            steps: out.steps,
            timings: AudioTimings {
                encode,
                generate: out.timings,
                decode: t1.elapsed() + stream_time,
            },
        },
        prompt_s,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: WindowConfig = WindowConfig {
        window_frames: 1500,
        stride_frames: 900,
    };

    #[test]
    fn window_config_from_seconds_and_validation() {
        assert_eq!(WindowConfig::from_seconds(30.0, 18.0, 50.0).unwrap(), W);
        assert!(WindowConfig::from_seconds(0.0, 18.0, 50.0).is_err());
        assert!(WindowConfig::from_seconds(30.0, f64::NAN, 50.0).is_err());
        assert!(W.validate(1500).is_ok());
        assert!(W.validate(1499).is_err());
        for stride in [0, 1500, 1600] {
            let c = WindowConfig {
                stride_frames: stride,
                ..W
            };
            assert!(c.validate(1500).is_err(), "stride {stride}");
        }
        assert_eq!(W.context_frames(), 600);
    }

    #[test]
    fn a_request_that_fits_is_one_window_with_its_whole_prompt() {
        let p = plan_windows(400, 500, &W);
        assert_eq!(p.prompt_frames, 400);
        assert_eq!(
            p.windows,
            vec![Window {
                prompt_frames: 400,
                new_frames: 500,
                offset: 0
            }]
        );
        assert_eq!(plan_windows(0, 1500, &W).windows.len(), 1);
    }

    #[test]
    fn long_prompts_are_cut_to_their_most_recent_part_that_fits() {
        // Short continuation: the prompt may fill the rest of the window.
        assert_eq!(max_prompt_frames(250, &W), 1250);
        assert_eq!(plan_windows(5000, 250, &W).prompt_frames, 1250);
        assert_eq!(plan_windows(5000, 250, &W).windows.len(), 1);
        // Long continuation: the same 12 s context every later window has.
        assert_eq!(max_prompt_frames(6000, &W), 600);
        let p = plan_windows(5000, 6000, &W);
        assert_eq!(p.prompt_frames, 600);
        assert_eq!(p.windows[0].prompt_frames, 600);
        assert_eq!(p.windows[0].new_frames, 900);

        let stream = vec![vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10]];
        assert_eq!(window_prompt(&stream, 2), vec![vec![4, 5], vec![9, 10]]);
        assert_eq!(window_prompt(&stream, 9), stream);
        assert_eq!(window_prompt(&stream, 0), vec![Vec::<u32>::new(); 2]);
    }

    #[test]
    fn windows_cover_the_request_with_the_authors_stride() {
        // 120 s from nothing: 30 s, then 18 s per window prompted by the last 12 s.
        let p = plan_windows(0, 6000, &W);
        let news: Vec<usize> = p.windows.iter().map(|w| w.new_frames).collect();
        assert_eq!(news, vec![1500, 900, 900, 900, 900, 900]);
        assert!(p.windows[1..].iter().all(|w| w.prompt_frames == 600));
        // Every window fits, offsets are contiguous, the sum is the request.
        for (i, w) in p.windows.iter().enumerate() {
            assert!(w.prompt_frames + w.new_frames <= 1500);
            let before: usize = p.windows[..i].iter().map(|w| w.new_frames).sum();
            assert_eq!(w.offset, before);
        }
        // A last window shorter than a stride, and a short first prompt.
        let p = plan_windows(100, 2000, &W);
        let got: Vec<(usize, usize)> = p
            .windows
            .iter()
            .map(|w| (w.prompt_frames, w.new_frames))
            .collect();
        assert_eq!(got, vec![(100, 1400), (600, 600)]);
        // A tiny window: the context never exceeds the stream so far.
        let small = WindowConfig {
            window_frames: 10,
            stride_frames: 6,
        };
        let p = plan_windows(0, 23, &small);
        let got: Vec<(usize, usize, usize)> = p
            .windows
            .iter()
            .map(|w| (w.prompt_frames, w.new_frames, w.offset))
            .collect();
        assert_eq!(got, vec![(0, 10, 0), (4, 6, 10), (4, 6, 16), (4, 1, 22)]);
    }

    #[test]
    fn requests_longer_than_twenty_minutes_are_refused() {
        assert!(check_new_frames(MAX_NEW_FRAMES).is_ok());
        let err = check_new_frames(MAX_NEW_FRAMES + 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 60000"), "{err}");
    }

    #[test]
    fn window_seeds_keep_the_first_and_differ_after() {
        assert_eq!(window_seed(7, 0), 7);
        let seeds: Vec<u64> = (0..50).map(|w| window_seed(7, w)).collect();
        let mut sorted = seeds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), seeds.len());
        // Not a take's seed (seed + i) either.
        assert!(seeds[1..].iter().all(|&s| s.abs_diff(7) > 1000));
        assert_ne!(window_seed(7, 1), window_seed(8, 1));
    }

    #[test]
    fn steps_per_window_include_the_delay_depth() {
        let w = Window {
            prompt_frames: 600,
            new_frames: 900,
            offset: 0,
        };
        assert_eq!(window_steps(&w, &[0, 1, 2, 3]), 903);
        assert_eq!(window_steps(&w, &[0, 0, 1, 1, 2, 2, 3, 3]), 903);
    }

    // ---- On the tiny fixture checkpoints (random weights, real topology) ----

    use crate::hub;
    use crate::sampling::SamplingParams;
    use candle_core::Device;

    fn load(name: &str) -> Musicgen {
        let dir = format!(
            "{}/fixtures/tiny-musicgen-{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let files = hub::resolve(&dir, &mut |_| panic!("no download")).unwrap();
        Musicgen::load(&files, DType::F32, &Device::Cpu).unwrap()
    }

    const SMALL: WindowConfig = WindowConfig {
        window_frames: 100,
        stride_frames: 60,
    };

    fn request(model: &Musicgen, prompt: Vec<Vec<Vec<u32>>>, new_frames: usize) -> CodesRequest {
        let _ = model;
        CodesRequest {
            condition: Condition::takes_of("calm lo-fi piano", 2),
            prompt,
            new_frames,
            sampling: SamplingParams::default(),
            seeds: vec![3, 4],
        }
    }

    /// Three windows make one token stream: each window is exactly a one-window generation
    /// prompted with the stream's last frames (undelayed; the delay pattern applied afresh),
    /// and progress and frames are reported over the whole stream.
    #[test]
    fn three_windows_are_one_stream_of_window_generations() {
        let model = load("mono");
        let req = request(&model, Vec::new(), 200);
        let mut steps = Vec::new();
        let mut frames: Vec<(usize, Vec<u32>)> = Vec::new();
        let out = generate_long_codes(&model, &req, &SMALL, &mut |info| {
            steps.push((info.step, info.total));
            if let Some(f) = &info.frame {
                frames.push((f.index, f.codes.to_vec()));
            }
            Control::Continue
        })
        .unwrap();
        assert_eq!((out.prompt_frames, out.new_frames), (0, 200));
        assert!(out.codes.iter().flatten().all(|c| c.len() == 200));
        // Windows of 100, 60 and 40 new frames, 3 delay steps each.
        assert_eq!(out.steps, 209);
        let want: Vec<(usize, usize)> = (1..=209).map(|s| (s, 209)).collect();
        assert_eq!(steps, want);
        assert_eq!(frames.len(), 200);
        for (i, (index, codes)) in frames.iter().enumerate() {
            assert_eq!(*index, i);
            for r in 0..2 {
                for c in 0..4 {
                    assert_eq!(codes[r * 4 + c], out.codes[r][c][i], "frame {i}");
                }
            }
        }
        // Window 0 is the one-window generation with the same seeds.
        let none = &mut |_: &StepInfo| Control::Continue;
        let first = generate_codes(&model, &request(&model, Vec::new(), 100), none).unwrap();
        for r in 0..2 {
            for c in 0..4 {
                assert_eq!(first.codes[r][c][..], out.codes[r][c][..100]);
            }
        }
        // Window 1: prompted with the last window - stride = 40 frames (60..100), its own seeds.
        let prompt: Vec<Vec<Vec<u32>>> = out
            .codes
            .iter()
            .map(|row| row.iter().map(|c| c[60..100].to_vec()).collect())
            .collect();
        let mut second = request(&model, prompt, 60);
        second.seeds = vec![window_seed(3, 1), window_seed(4, 1)];
        let second = generate_codes(&model, &second, none).unwrap();
        for r in 0..2 {
            for c in 0..4 {
                assert_eq!(second.codes[r][c][40..], out.codes[r][c][100..160]);
            }
        }
        // No start or pad token anywhere in the stream.
        assert!(out.codes.iter().flatten().flatten().all(|&t| t < 2048));
    }

    #[test]
    fn a_cut_prompt_keeps_its_most_recent_frames() {
        let model = load("mono");
        let prompt: Vec<Vec<Vec<u32>>> = (0..2)
            .map(|r| {
                (0..4)
                    .map(|c| {
                        (0..150)
                            .map(|t| ((t * 7 + c * 3 + r) % 2048) as u32)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let out = generate_long_codes(
            &model,
            &request(&model, prompt.clone(), 80),
            &SMALL,
            &mut |_| Control::Continue,
        )
        .unwrap();
        // 80 new frames: one 60-frame stride in the first window, so 40 frames of prompt.
        assert_eq!(out.prompt_frames, 40);
        for (got, given) in out.codes.iter().flatten().zip(prompt.iter().flatten()) {
            assert_eq!(got[..40], given[110..]);
            assert_eq!(got.len(), 120);
        }
    }

    fn rms_db(err: f32, signal: &[f32]) -> f64 {
        let rms = (signal.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / signal.len() as f64)
            .sqrt();
        20.0 * (f64::from(err).max(1e-30) / rms).log10()
    }

    /// Streaming a three-window take with an audio prompt: chunks tile the continuation, equal
    /// the take's audio exactly, the take equals the same request decoded afterwards, and both
    /// match a one-shot decode of all the codes (no seam at window boundaries) below -60 dB.
    #[test]
    fn streamed_long_take_matches_the_one_shot_decode() {
        for name in ["mono", "stereo"] {
            let model = load(name);
            let prompt = Audio {
                sample_rate: 32_000,
                channels: vec![(0..12_345).map(|i| (i as f32 * 0.02).sin() * 0.5).collect()],
            };
            let req = AudioRequest {
                text: "calm lo-fi piano".into(),
                prompt: Some(prompt),
                new_frames: 200,
                sampling: SamplingParams::default(),
                seed: 5,
                takes: 2,
            };
            let mut opts = LongOptions::for_model(&model);
            opts.window = SMALL;
            let plain =
                generate_long_audio(&model, &req, &opts, &mut |_| Control::Continue, &mut |_| {
                    panic!("chunk without streaming")
                })
                .unwrap()
                .0;
            opts.stream = Some(StreamConfig::default());
            let mut chunks: Vec<Chunk> = Vec::new();
            let (out, prompt_s) =
                generate_long_audio(&model, &req, &opts, &mut |_| Control::Continue, &mut |c| {
                    chunks.push(c.clone())
                })
                .unwrap();
            // 20 frames of prompt (12 345 samples, rounded up) fit: 100 - 60 = 40 at most.
            assert_eq!(out.prompt_frames, 20);
            assert!((prompt_s - 12_345.0 / 32_000.0).abs() < 1e-9);
            assert!(chunks.len() >= 2, "{name}: {} chunks", chunks.len());
            let mut at = 0;
            for c in &chunks {
                assert_eq!(c.offset, at);
                at += c.frames();
            }
            assert_eq!(at, 200 * 640);
            for (t, take) in out.takes.iter().enumerate() {
                assert_eq!(take.codes[0].len(), 220);
                assert_eq!(take.audio.frames(), 220 * 640);
                let cont = take.continuation();
                let mut streamed = vec![Vec::new(); model.channels()];
                for c in &chunks {
                    for (s, ch) in streamed.iter_mut().zip(&c.audio[t].channels) {
                        s.extend_from_slice(ch);
                    }
                }
                assert_eq!(streamed, cont.channels, "{name} take {t}: chunks vs take");
                assert_eq!(
                    take.codes, plain.takes[t].codes,
                    "{name}: same seeds, same codes"
                );
                assert_eq!(
                    take.audio, plain.takes[t].audio,
                    "{name}: streamed vs decoded after"
                );
                // One-shot decode of the whole stream.
                let flat: Vec<u32> = take.codes.iter().flatten().copied().collect();
                let codes =
                    Tensor::from_vec(flat, (1, take.codes.len(), 220), &Device::Cpu).unwrap();
                let once: Vec<Vec<f32>> = model
                    .codec()
                    .decode_interleaved(&codes, model.channels())
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                for (got, want) in take.audio.channels.iter().zip(&once) {
                    let err = got
                        .iter()
                        .zip(want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    let db = rms_db(err, want);
                    assert!(db < -60.0, "{name} take {t}: {db:.1} dB");
                }
            }
        }
    }
}
