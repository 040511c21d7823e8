//! Streaming decode: audio of a growing token stream, chunk by chunk, while it is generated.
//!
//! EnCodec's decoder is not causal: its convolutions look a few frames ahead and behind (with
//! reflect padding at the ends of whatever is decoded), and its LSTM carries a state over the
//! whole sequence, from a zero state at the first frame. Decoding only the new frames would give
//! every chunk an edge. So each chunk decodes a window of frames with
//! [`StreamConfig::left_context_frames`] before it (long enough for the LSTM's state, started
//! from zero at the window's start, to converge to the state a one-shot decode has there) and
//! [`StreamConfig::right_context_frames`] after it (covering the convolutions' look-ahead), and
//! keeps only the chunk's own samples. A chunk is cut at frame boundaries; with enough context
//! on both sides no crossfade is needed: the concatenated chunks equal the one-shot decode of the
//! same codes to within float rounding (the unit tests measure the error against the context
//! length; the defaults keep a wide margin below -60 dB relative to the signal's RMS).
//!
//! The last frames of a take have no right context until the take ends: they are held back and
//! emitted by [`StreamDecoder::finish`], decoded like the one-shot decode decodes its end. No
//! chunk is ever corrected afterwards.

use candle_core::{DType, Tensor};

use crate::audio::Audio;
use crate::codec::{CodecError, Encodec};

/// How a [`StreamDecoder`] cuts the stream into chunks. Frames are 50 Hz codec frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Frames decoded before each chunk and thrown away: lets the LSTM state converge.
    pub left_context_frames: usize,
    /// Frames after each chunk that must exist before the chunk is decoded (convolution
    /// look-ahead); the chunk's latency in frames.
    pub right_context_frames: usize,
    /// Frames of the first chunk (small: time to the first audible sample).
    pub first_chunk_frames: usize,
    /// Frames of every later chunk (larger: less decoding of context per second of audio).
    pub chunk_frames: usize,
}

impl Default for StreamConfig {
    /// Measured on the two fixture codecs (random weights; `context_needed_for_exactness_*`
    /// tests): 4 frames of right context are exact to float rounding (8 kept for margin); the
    /// LSTM state, started from zero, converges below -60 dB within 50 frames for one codec and
    /// 200 for the other (below -100 dB at 100 and 300). How long the state remembers depends on
    /// the weights, so the default left context is 400 frames (8 s), and chunks after the first
    /// are 4 s to keep the decoded context at about twice the audio emitted.
    fn default() -> Self {
        Self {
            left_context_frames: 400,
            right_context_frames: 8,
            first_chunk_frames: 25,
            chunk_frames: 200,
        }
    }
}

impl StreamConfig {
    /// Rejects chunk sizes of zero.
    pub fn validate(&self) -> Result<(), CodecError> {
        if self.first_chunk_frames == 0 || self.chunk_frames == 0 {
            return Err(CodecError::Input(
                "stream chunks must hold at least one frame".into(),
            ));
        }
        Ok(())
    }
}

/// One piece of decoded continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// Where the chunk starts, in samples (at the codec's rate) from the start of the
    /// continuation (the first sample after the prompt).
    pub offset: usize,
    /// One [`Audio`] per batch row (take), at the codec's rate and the model's channels.
    pub audio: Vec<Audio>,
}

impl Chunk {
    /// Samples per channel.
    pub fn frames(&self) -> usize {
        self.audio.first().map_or(0, Audio::frames)
    }
}

/// Decodes a growing stream of codes chunk by chunk. Owns a copy of the codes it has seen
/// (`(rows, codebooks, frames)`, prompt first); borrows the codec.
pub struct StreamDecoder<'a> {
    codec: &'a Encodec,
    /// Audio channels of the music (codebooks are interleaved per channel when 2).
    channels: usize,
    cfg: StreamConfig,
    /// `(rows, codebooks, frames)`, undelayed, prompt first.
    codes: Vec<Vec<Vec<u32>>>,
    prompt_frames: usize,
    /// New frames already emitted in chunks.
    emitted: usize,
    chunks: usize,
    finished: bool,
}

impl<'a> StreamDecoder<'a> {
    /// `prompt`: `(rows, codebooks, prompt_frames)` (every row may be empty, but there must be
    /// `rows` of them, each with every codebook).
    pub fn new(
        codec: &'a Encodec,
        channels: usize,
        prompt: Vec<Vec<Vec<u32>>>,
        cfg: StreamConfig,
    ) -> Result<Self, CodecError> {
        cfg.validate()?;
        let k = prompt.first().map_or(0, Vec::len);
        let prompt_frames = prompt.first().and_then(|r| r.first()).map_or(0, Vec::len);
        if prompt.is_empty() || k == 0 {
            return Err(CodecError::Input(
                "a stream needs at least one row and one codebook".into(),
            ));
        }
        if prompt
            .iter()
            .any(|r| r.len() != k || r.iter().any(|c| c.len() != prompt_frames))
        {
            return Err(CodecError::Input(
                "stream prompt rows must have the same codebooks and frames".into(),
            ));
        }
        Ok(Self {
            codec,
            channels,
            cfg,
            codes: prompt,
            prompt_frames,
            emitted: 0,
            chunks: 0,
            finished: false,
        })
    }

    pub fn rows(&self) -> usize {
        self.codes.len()
    }

    fn codebooks(&self) -> usize {
        self.codes[0].len()
    }

    /// New frames received so far.
    pub fn new_frames(&self) -> usize {
        self.codes[0][0].len() - self.prompt_frames
    }

    fn hop(&self) -> usize {
        self.codec.config().hop_length()
    }

    fn next_chunk_frames(&self) -> usize {
        if self.chunks == 0 {
            self.cfg.first_chunk_frames
        } else {
            self.cfg.chunk_frames
        }
    }

    /// Adds one frame of every row (`(rows, codebooks)` row-major) and returns a chunk when
    /// enough frames (chunk plus right context) have arrived.
    pub fn push_frame(&mut self, frame: &[u32]) -> Result<Option<Chunk>, CodecError> {
        let (rows, k) = (self.rows(), self.codebooks());
        if self.finished {
            return Err(CodecError::Input("frame pushed after finish".into()));
        }
        if frame.len() != rows * k {
            return Err(CodecError::Input(format!(
                "a stream frame must hold {rows} rows x {k} codebooks, got {} codes",
                frame.len()
            )));
        }
        for (r, row) in self.codes.iter_mut().enumerate() {
            for (c, col) in row.iter_mut().enumerate() {
                col.push(frame[r * k + c]);
            }
        }
        let size = self.next_chunk_frames();
        let ready = self
            .new_frames()
            .saturating_sub(self.cfg.right_context_frames);
        if ready >= self.emitted + size {
            let from = self.emitted;
            return self.emit(from, from + size).map(Some);
        }
        Ok(None)
    }

    /// The stream is complete: emits every frame not emitted yet (decoded up to the end, as the
    /// one-shot decode does), or `None` when nothing is left.
    pub fn finish(&mut self) -> Result<Option<Chunk>, CodecError> {
        self.finished = true;
        let n = self.new_frames();
        if self.emitted >= n {
            return Ok(None);
        }
        let from = self.emitted;
        self.emit(from, n).map(Some)
    }

    fn emit(&mut self, from: usize, to: usize) -> Result<Chunk, CodecError> {
        let p = self.prompt_frames;
        let audio = self.decode_range(p + from, p + to)?;
        self.emitted = to;
        self.chunks += 1;
        Ok(Chunk {
            offset: from * self.hop(),
            audio,
        })
    }

    /// The decode of the prompt frames alone, with the stream's right context after them when
    /// it exists: what precedes the first chunk. Per row; empty audio without a prompt.
    pub fn prompt_audio(&self) -> Result<Vec<Audio>, CodecError> {
        self.decode_range(0, self.prompt_frames)
    }

    /// Decodes frames `[from, to)` of the whole stream (prompt included) with the configured
    /// context around them and returns their samples only, per row.
    fn decode_range(&self, from: usize, to: usize) -> Result<Vec<Audio>, CodecError> {
        let rate = self.codec.config().sampling_rate;
        let hop = self.hop();
        if from >= to {
            return Ok(vec![
                Audio {
                    sample_rate: rate,
                    channels: vec![Vec::new(); self.channels],
                };
                self.rows()
            ]);
        }
        let total = self.codes[0][0].len();
        let lo = from.saturating_sub(self.cfg.left_context_frames);
        let hi = (to + self.cfg.right_context_frames).min(total);
        let (rows, k) = (self.rows(), self.codebooks());
        let flat: Vec<u32> = self
            .codes
            .iter()
            .flat_map(|row| row.iter().flat_map(|col| col[lo..hi].iter().copied()))
            .collect();
        let codes = Tensor::from_vec(flat, (rows, k, hi - lo), self.codec.device())?;
        let audio = self.codec.decode_interleaved(&codes, self.channels)?; // (rows, C, samples)
        let audio: Vec<Vec<Vec<f32>>> = audio.to_dtype(DType::F32)?.to_vec3()?;
        let (a, b) = ((from - lo) * hop, (to - lo) * hop);
        Ok(audio
            .into_iter()
            .map(|chans| Audio {
                sample_rate: rate,
                channels: chans.into_iter().map(|c| c[a..b].to_vec()).collect(),
            })
            .collect())
    }
}

/// Decodes `codes` (`(rows, codebooks, frames)`, prompt first) exactly as a [`StreamDecoder`]
/// fed frame by frame would, without holding the activations of the whole sequence at once:
/// per row, the prompt's decode followed by every chunk. Used for takes longer than one window,
/// so that a streamed take and the same take decoded afterwards are the same audio.
pub fn decode_chunked(
    codec: &Encodec,
    channels: usize,
    codes: &[Vec<Vec<u32>>],
    prompt_frames: usize,
    cfg: StreamConfig,
) -> Result<Vec<Audio>, CodecError> {
    let prompt: Vec<Vec<Vec<u32>>> = codes
        .iter()
        .map(|row| row.iter().map(|c| c[..prompt_frames].to_vec()).collect())
        .collect();
    let total = codes.first().and_then(|r| r.first()).map_or(0, Vec::len);
    let mut dec = StreamDecoder::new(codec, channels, prompt, cfg)?;
    let (rows, k) = (dec.rows(), dec.codebooks());
    let mut out = Vec::new();
    let mut frame = vec![0u32; rows * k];
    for f in prompt_frames..total {
        for (r, row) in codes.iter().enumerate() {
            for (c, col) in row.iter().enumerate() {
                frame[r * k + c] = col[f];
            }
        }
        if let Some(chunk) = dec.push_frame(&frame)? {
            out.push(chunk);
        }
    }
    if let Some(chunk) = dec.finish()? {
        out.push(chunk);
    }
    let mut audio = dec.prompt_audio()?;
    append_chunks(&mut audio, &out);
    Ok(audio)
}

/// Appends every chunk's audio, in order, to the per-row `audio`.
pub fn append_chunks(audio: &mut [Audio], chunks: &[Chunk]) {
    for chunk in chunks {
        for (dst, src) in audio.iter_mut().zip(&chunk.audio) {
            for (d, s) in dst.channels.iter_mut().zip(&src.channels) {
                d.extend_from_slice(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{seeded_random_var_builder, CheckpointCodec, Config};
    use crate::hub;
    use candle_core::Device;

    fn fixture_codec(name: &str) -> (Encodec, usize) {
        let dir = format!(
            "{}/fixtures/tiny-musicgen-{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let files = hub::resolve(&dir, &mut |_| panic!("no download")).unwrap();
        let (cc, codec) = CheckpointCodec::load(&files, &Device::Cpu).unwrap();
        (codec, cc.channels)
    }

    /// Deterministic pseudo-random codes `(rows, codebooks, frames)` below `size`.
    fn random_codes(
        rows: usize,
        k: usize,
        frames: usize,
        size: u32,
        seed: u64,
    ) -> Vec<Vec<Vec<u32>>> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % u64::from(size)) as u32
        };
        (0..rows)
            .map(|_| {
                (0..k)
                    .map(|_| (0..frames).map(|_| next()).collect())
                    .collect()
            })
            .collect()
    }

    fn one_shot(codec: &Encodec, channels: usize, codes: &[Vec<Vec<u32>>]) -> Vec<Vec<Vec<f32>>> {
        let (rows, k, n) = (codes.len(), codes[0].len(), codes[0][0].len());
        let flat: Vec<u32> = codes.iter().flatten().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (rows, k, n), &Device::Cpu).unwrap();
        codec
            .decode_interleaved(&t, channels)
            .unwrap()
            .to_vec3()
            .unwrap()
    }

    /// Worst sample error over all rows and channels, in dB relative to the signal's RMS.
    fn error_db(got: &[Audio], want: &[Vec<Vec<f32>>]) -> f64 {
        let (mut err, mut sum, mut n) = (0f64, 0f64, 0usize);
        for (g, w) in got.iter().zip(want) {
            for (gc, wc) in g.channels.iter().zip(w) {
                assert_eq!(gc.len(), wc.len(), "lengths differ");
                for (a, b) in gc.iter().zip(wc) {
                    err = err.max(f64::from((a - b).abs()));
                    sum += f64::from(*b) * f64::from(*b);
                    n += 1;
                }
            }
        }
        let rms = (sum / n as f64).sqrt();
        assert!(rms > 1e-6, "silent reference");
        20.0 * (err.max(1e-30) / rms).log10()
    }

    fn streamed_error(
        codec: &Encodec,
        channels: usize,
        codes: &[Vec<Vec<u32>>],
        prompt_frames: usize,
        cfg: StreamConfig,
    ) -> f64 {
        let got = decode_chunked(codec, channels, codes, prompt_frames, cfg).unwrap();
        let want = one_shot(codec, channels, codes);
        error_db(&got, &want)
    }

    #[test]
    fn chunks_concatenate_to_the_one_shot_decode() {
        for name in ["mono", "stereo"] {
            let (codec, channels) = fixture_codec(name);
            let k = 4 * channels;
            let codes = random_codes(2, k, 900, 2048, 3);
            for prompt in [0, 37] {
                let db = streamed_error(&codec, channels, &codes, prompt, StreamConfig::default());
                assert!(db < -60.0, "{name}, prompt {prompt}: {db:.1} dB");
            }
        }
    }

    #[test]
    fn chunks_arrive_in_order_with_their_offsets_and_hold_back_the_tail() {
        let (codec, channels) = fixture_codec("mono");
        let cfg = StreamConfig::default();
        let codes = random_codes(1, 4, 300, 2048, 5);
        let prompt: Vec<Vec<Vec<u32>>> = vec![codes[0].iter().map(|c| c[..20].to_vec()).collect()];
        let mut dec = StreamDecoder::new(&codec, channels, prompt, cfg).unwrap();
        let mut chunks = Vec::new();
        for f in 20..300 {
            let frame: Vec<u32> = codes[0].iter().map(|c| c[f]).collect();
            if let Some(c) = dec.push_frame(&frame).unwrap() {
                // Never more than is covered by right context.
                assert!(c.offset / 640 + c.frames() / 640 + cfg.right_context_frames <= f - 20 + 1);
                chunks.push(c);
            }
        }
        assert_eq!(chunks[0].offset, 0);
        assert_eq!(chunks[0].frames(), cfg.first_chunk_frames * 640);
        for w in chunks.windows(2) {
            assert_eq!(w[1].offset, w[0].offset + w[0].frames());
            assert_eq!(w[1].frames(), cfg.chunk_frames * 640);
        }
        let last = dec.finish().unwrap().expect("the held-back tail");
        let end = chunks.last().map_or(0, |c| c.offset + c.frames());
        assert_eq!(last.offset, end);
        assert_eq!(last.offset + last.frames(), 280 * 640);
        assert!(dec.finish().unwrap().is_none());
        assert!(dec.push_frame(&[0; 4]).is_err());
    }

    #[test]
    fn bad_frames_are_errors() {
        let (codec, channels) = fixture_codec("mono");
        let mut dec = StreamDecoder::new(
            &codec,
            channels,
            vec![vec![vec![]; 4]],
            StreamConfig::default(),
        )
        .unwrap();
        assert!(dec.push_frame(&[1, 2, 3]).is_err());
        assert!(StreamDecoder::new(&codec, 1, vec![], StreamConfig::default()).is_err());
        let zero = StreamConfig {
            chunk_frames: 0,
            ..StreamConfig::default()
        };
        assert!(StreamDecoder::new(&codec, 1, vec![vec![vec![]; 4]], zero).is_err());
    }

    /// Error of the streamed decode against the one-shot decode as a function of the context
    /// (printed with `--nocapture`), and the error with `check_left` frames of left context and
    /// the default right context. `check_left` must leave chunks whose left context does not
    /// reach back to the first frame: with more, every chunk is decoded from the stream's start
    /// and equals the one-shot decode whatever the codec, and the check would prove nothing.
    fn context_table(
        label: &str,
        codec: &Encodec,
        frames: usize,
        lefts: &[usize],
        check_left: usize,
    ) -> f64 {
        // Chunks of 40 frames: the last one starts at `frames - 40` or later.
        assert!(
            check_left + 80 <= frames,
            "{label}: a left context of {check_left} frames reaches the start of every chunk \
             of a {frames}-frame stream"
        );
        let d = StreamConfig::default();
        let codes = random_codes(1, 4, frames, 2048, 11);
        let err = |left: usize, right: usize| {
            let cfg = StreamConfig {
                left_context_frames: left,
                right_context_frames: right,
                first_chunk_frames: 40,
                chunk_frames: 40,
            };
            streamed_error(codec, 1, &codes, 0, cfg)
        };
        for right in [0, 1, 2, 4, 8] {
            let db = err(d.left_context_frames, right);
            eprintln!(
                "{label}: right {right:3} frames, left {:3}: {db:7.1} dB",
                d.left_context_frames
            );
        }
        for &left in lefts {
            let db = err(left, d.right_context_frames);
            eprintln!(
                "{label}: left {left:3} frames, right {:3}: {db:7.1} dB",
                d.right_context_frames
            );
        }
        err(check_left, d.right_context_frames)
    }

    #[test]
    fn context_needed_for_exactness_fixture_codecs() {
        for name in ["mono", "stereo"] {
            let (tiny, _) = fixture_codec(name);
            let lefts = [0, 5, 10, 25, 50, 100, 150, 200, 300];
            // The margin of the defaults: three quarters of the default left context are
            // already below -60 dB.
            let check = StreamConfig::default().left_context_frames * 3 / 4;
            let db = context_table(name, &tiny, 800, &lefts, check);
            assert!(
                db < -60.0,
                "{name}: 3/4 of the default left context gives {db:.1} dB"
            );
        }
    }

    /// The same on the full-size topology with random weights, seeded so that the figures are
    /// the same every run (slow: `--ignored --nocapture`; numbers in BENCHMARKS.md).
    #[test]
    #[ignore]
    fn context_needed_for_exactness_full_size_random() {
        let full = Encodec::new(
            &Config::musicgen_32khz(),
            seeded_random_var_builder(&Device::Cpu, 7),
        )
        .unwrap();
        // 200 frames keep the run affordable, so the default left context (400 frames) cannot
        // be checked here (it would reach every chunk's start); 100 frames, a quarter of it,
        // must already be below -60 dB (measured: -84 dB, see BENCHMARKS.md).
        let db = context_table("full-size random", &full, 200, &[0, 10, 25, 50, 100], 100);
        assert!(
            db < -60.0,
            "a quarter of the default left context gives {db:.1} dB"
        );
    }
}
