//! WAV reading/writing, resampling and channel conversion, shared by the CLI and the plugin.
//!
//! Everything here allocates and may take milliseconds to seconds: call it off the audio thread.
//! Audio is planar ([`Audio::channels`]`[c][i]` is sample `i` of channel `c`), `f32`, nominally in
//! [-1, 1].

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use rubato::{FftFixedInOut, Resampler};

/// Errors from reading, writing or converting audio. Each names the file (where there is one) and
/// says what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// The file cannot be opened or read (missing, no permission, I/O failure).
    #[error("cannot read {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a WAV file we can read: {reason}")]
    NotWav { path: PathBuf, reason: String },
    #[error("{path}: unsupported WAV format: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path} contains no audio (zero-length)")]
    Empty { path: PathBuf },
    #[error("{path}: {count} of {total} samples are not finite (NaN or infinity)")]
    NonFinite {
        path: PathBuf,
        count: usize,
        total: usize,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("invalid audio: {0}")]
    Invalid(String),
    #[error("resampling from {from} Hz to {to} Hz failed: {reason}")]
    Resample { from: u32, to: u32, reason: String },
}

/// Planar audio owned by the caller. `channels[c][i]` is sample `i` of channel `c`, nominally in
/// [-1, 1]; every channel has the same length.
#[derive(Clone, Debug, PartialEq)]
pub struct Audio {
    /// Samples per second per channel (Hz).
    pub sample_rate: u32,
    /// One `Vec` per channel, all of the same length (frames).
    pub channels: Vec<Vec<f32>>,
}

impl Audio {
    /// Number of frames (samples per channel); 0 when there are no channels.
    pub fn frames(&self) -> usize {
        self.channels.first().map_or(0, Vec::len)
    }

    /// Duration in seconds.
    pub fn duration_s(&self) -> f64 {
        if self.sample_rate == 0 {
            0.0
        } else {
            self.frames() as f64 / self.sample_rate as f64
        }
    }

    /// A copy of the audio from frame `from` on (empty channels when `from` is past the end).
    pub fn from_frame(&self, from: usize) -> Audio {
        Audio {
            sample_rate: self.sample_rate,
            channels: self
                .channels
                .iter()
                .map(|c| c[from.min(c.len())..].to_vec())
                .collect(),
        }
    }

    /// Converts to `n` channels: `n == 1` averages all channels (mixdown); a mono source is
    /// duplicated; otherwise output channel `j` averages the source channels `c` with
    /// `c % n == j` when narrowing, and copies source channel `j % source_channels` when widening.
    /// `n == 0` gives no channels.
    pub fn to_channels(&self, n: usize) -> Audio {
        let src = self.channels.len();
        let frames = self.frames();
        let channels = if n == src {
            self.channels.clone()
        } else if src == 0 {
            vec![Vec::new(); n]
        } else if n < src {
            (0..n)
                .map(|j| {
                    let group: Vec<&Vec<f32>> = self.channels.iter().skip(j).step_by(n).collect();
                    let scale = 1.0 / group.len() as f32;
                    (0..frames)
                        .map(|i| group.iter().map(|c| c[i]).sum::<f32>() * scale)
                        .collect()
                })
                .collect()
        } else {
            (0..n).map(|j| self.channels[j % src].clone()).collect()
        };
        Audio {
            sample_rate: self.sample_rate,
            channels,
        }
    }

    /// Checks the invariants: a positive rate, at least one channel, equal channel lengths.
    pub fn validate(&self) -> Result<(), AudioError> {
        if self.sample_rate == 0 {
            return Err(AudioError::Invalid("sample rate is 0 Hz".into()));
        }
        if self.channels.is_empty() {
            return Err(AudioError::Invalid("no channels".into()));
        }
        let frames = self.frames();
        if let Some((c, ch)) = self
            .channels
            .iter()
            .enumerate()
            .find(|(_, ch)| ch.len() != frames)
        {
            return Err(AudioError::Invalid(format!(
                "channel {c} has {} frames but channel 0 has {frames}",
                ch.len()
            )));
        }
        Ok(())
    }

    /// Number of samples that are NaN or infinite, over all channels.
    pub fn non_finite_count(&self) -> usize {
        self.channels
            .iter()
            .flatten()
            .filter(|s| !s.is_finite())
            .count()
    }
}

/// Maps a decoding error of a file that did open: anything wrong with its content means it is
/// not a WAV file we can read; only a genuine I/O failure stays an I/O error.
fn hound_err(path: &Path, err: hound::Error) -> AudioError {
    match err {
        hound::Error::IoError(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::Other
                    | std::io::ErrorKind::InvalidData
            ) =>
        {
            AudioError::NotWav {
                path: path.to_owned(),
                reason: format!("the file ends early or is malformed ({error})"),
            }
        }
        hound::Error::IoError(error) => AudioError::Open {
            path: path.to_owned(),
            error,
        },
        hound::Error::FormatError(reason) => AudioError::NotWav {
            path: path.to_owned(),
            reason: reason.to_string(),
        },
        hound::Error::Unsupported => AudioError::Unsupported {
            path: path.to_owned(),
            what: "this WAV encoding is not supported (use integer or 32-bit float PCM)".into(),
        },
        other => AudioError::NotWav {
            path: path.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// Reads a WAV file: integer PCM of 8 to 32 bits or 32-bit float, any channel count, any rate.
/// Integer samples are scaled to [-1, 1). Rejects empty files and audio with any non-finite
/// sample (NaN/infinity would poison every model downstream). Errors name the file.
pub fn read_wav(path: &Path) -> Result<Audio, AudioError> {
    let file = File::open(path).map_err(|error| AudioError::Open {
        path: path.to_owned(),
        error,
    })?;
    let mut reader =
        hound::WavReader::new(std::io::BufReader::new(file)).map_err(|e| hound_err(path, e))?;
    let spec = reader.spec();
    let n_ch = spec.channels as usize;
    if n_ch == 0 {
        return Err(AudioError::Unsupported {
            path: path.to_owned(),
            what: "the header declares 0 channels".into(),
        });
    }
    if spec.sample_rate == 0 {
        return Err(AudioError::Unsupported {
            path: path.to_owned(),
            what: "the header declares a sample rate of 0 Hz".into(),
        });
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => {
            if spec.bits_per_sample != 32 {
                return Err(AudioError::Unsupported {
                    path: path.to_owned(),
                    what: format!(
                        "{}-bit float samples (only 32-bit float is supported)",
                        spec.bits_per_sample
                    ),
                });
            }
            reader
                .samples::<f32>()
                .collect::<Result<_, _>>()
                .map_err(|e| hound_err(path, e))?
        }
        hound::SampleFormat::Int => {
            if !(1..=32).contains(&spec.bits_per_sample) {
                return Err(AudioError::Unsupported {
                    path: path.to_owned(),
                    what: format!("{}-bit integer samples", spec.bits_per_sample),
                });
            }
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f64;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| (v as f64 * scale) as f32))
                .collect::<Result<_, _>>()
                .map_err(|e| hound_err(path, e))?
        }
    };
    let frames = interleaved.len() / n_ch;
    if frames == 0 {
        return Err(AudioError::Empty {
            path: path.to_owned(),
        });
    }
    let mut channels = vec![Vec::with_capacity(frames); n_ch];
    for frame in interleaved.chunks_exact(n_ch) {
        for (ch, &s) in channels.iter_mut().zip(frame) {
            ch.push(s);
        }
    }
    let audio = Audio {
        sample_rate: spec.sample_rate,
        channels,
    };
    let bad = audio.non_finite_count();
    if bad > 0 {
        return Err(AudioError::NonFinite {
            path: path.to_owned(),
            count: bad,
            total: frames * n_ch,
        });
    }
    Ok(audio)
}

/// A temporary path next to `path` (same folder, so the final rename is atomic).
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    path.with_file_name(unique)
}

/// Writes `audio` as a 32-bit float WAV. Writes a temporary file in the same folder, then renames
/// it over `path`: a reader never sees a half-written file and a failure leaves `path` untouched.
pub fn write_wav_f32(path: &Path, audio: &Audio) -> Result<(), AudioError> {
    audio.validate()?;
    if audio.channels.len() > u16::MAX as usize {
        return Err(AudioError::Invalid(format!(
            "{} channels do not fit in a WAV header",
            audio.channels.len()
        )));
    }
    let werr = |reason: String| AudioError::Write {
        path: path.to_owned(),
        reason,
    };
    let spec = hound::WavSpec {
        channels: audio.channels.len() as u16,
        sample_rate: audio.sample_rate,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let tmp = temp_path_for(path);
    let result = (|| -> Result<(), AudioError> {
        let file = File::create(&tmp).map_err(|e| werr(e.to_string()))?;
        let mut writer =
            hound::WavWriter::new(BufWriter::new(file), spec).map_err(|e| werr(e.to_string()))?;
        for i in 0..audio.frames() {
            for ch in &audio.channels {
                writer
                    .write_sample(ch[i])
                    .map_err(|e| werr(e.to_string()))?;
            }
        }
        writer.finalize().map_err(|e| werr(e.to_string()))?;
        // Flush to disk before the rename makes the file visible under its final name.
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| werr(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| werr(e.to_string()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Resamples to `to_rate` with rubato's synchronous FFT resampler (high quality, band-limited).
/// The resampler's latency is removed and the tail flushed: the output has
/// `round(frames * to_rate / from_rate)` frames and is not delayed against the input.
/// Returns a copy when the rates already match.
///
/// This is [`StreamResampler`] fed all of `audio` at once, so resampling a signal piece by piece
/// with a [`StreamResampler`] gives exactly (bit for bit) this function's output.
pub fn resample(audio: &Audio, to_rate: u32) -> Result<Audio, AudioError> {
    audio.validate()?;
    if to_rate == 0 {
        return Err(AudioError::Invalid("target sample rate is 0 Hz".into()));
    }
    if audio.sample_rate == to_rate {
        return Ok(audio.clone());
    }
    let mut rs = StreamResampler::new(audio.sample_rate, to_rate, audio.channels.len())?;
    let mut out = rs.push(&audio.channels)?;
    let tail = rs.finish()?;
    for (o, t) in out.iter_mut().zip(tail) {
        o.extend_from_slice(&t);
    }
    Ok(Audio {
        sample_rate: to_rate,
        channels: out,
    })
}

/// Resamples a signal that arrives piece by piece (a streamed take): [`StreamResampler::push`]
/// returns the output frames that are final so far, [`StreamResampler::finish`] the rest. The
/// pieces' outputs concatenated equal [`resample`] of the whole signal exactly, however the
/// signal is cut: the resampler always processes the same fixed-size input chunks, buffering
/// what does not fill one.
///
/// Latency: a pushed frame comes out once a whole input chunk (about 1024 input frames) is there
/// plus the filter's delay (half a chunk); the rest waits for [`StreamResampler::finish`].
pub struct StreamResampler {
    from: u32,
    to: u32,
    /// `None` when the rates match (a copy).
    rs: Option<FftFixedInOut<f32>>,
    /// Input frames not processed yet, per channel.
    pending: Vec<Vec<f32>>,
    out_buf: Vec<Vec<f32>>,
    /// Output frames still to drop (the filter's delay).
    skip: usize,
    /// Input frames pushed, output frames returned.
    pushed: usize,
    emitted: usize,
}

impl StreamResampler {
    /// A resampler from `from` Hz to `to` Hz for `channels` channels.
    pub fn new(from: u32, to: u32, channels: usize) -> Result<Self, AudioError> {
        if from == 0 || to == 0 {
            return Err(AudioError::Invalid(format!(
                "cannot resample from {from} Hz to {to} Hz"
            )));
        }
        if channels == 0 {
            return Err(AudioError::Invalid("audio without channels".into()));
        }
        let (rs, skip, out_buf) = if from == to {
            (None, 0, Vec::new())
        } else {
            // rubato's FFT filter is a sinc centred on sample `fft_size_in / 2` (integer
            // division), while `output_delay()` reports `fft_size_out / 2`: the two agree only
            // when the FFT input size is even. Choose the chunk so that it is (an odd size leaves
            // a fractional-sample delay, e.g. 0.36 samples from 44.1 kHz).
            let min_chunk_in = from as usize / gcd(from as usize, to as usize);
            let chunks = 1024usize.div_ceil(min_chunk_in).next_multiple_of(2);
            let rs = FftFixedInOut::<f32>::new(
                from as usize,
                to as usize,
                chunks * min_chunk_in,
                channels,
            )
            .map_err(|e| AudioError::Resample {
                from,
                to,
                reason: e.to_string(),
            })?;
            let skip = rs.output_delay();
            let out_buf = rs.output_buffer_allocate(true);
            (Some(rs), skip, out_buf)
        };
        Ok(Self {
            from,
            to,
            rs,
            pending: vec![Vec::new(); channels],
            out_buf,
            skip,
            pushed: 0,
            emitted: 0,
        })
    }

    /// Output frames the whole signal will have once finished (as [`resample`] counts them).
    fn target(&self) -> usize {
        ((self.pushed as u128 * self.to as u128 + self.from as u128 / 2) / self.from as u128)
            as usize
    }

    /// Adds planar input (every channel the same length) and returns the output frames that no
    /// later input can change.
    pub fn push<S: AsRef<[f32]>>(&mut self, planar: &[S]) -> Result<Vec<Vec<f32>>, AudioError> {
        if planar.len() != self.pending.len() {
            return Err(AudioError::Invalid(format!(
                "{} channels pushed to a resampler of {}",
                planar.len(),
                self.pending.len()
            )));
        }
        let frames = planar.first().map_or(0, |c| c.as_ref().len());
        if planar.iter().any(|c| c.as_ref().len() != frames) {
            return Err(AudioError::Invalid("channels of different lengths".into()));
        }
        self.pushed += frames;
        if self.rs.is_none() {
            self.emitted += frames;
            return Ok(planar.iter().map(|c| c.as_ref().to_vec()).collect());
        }
        for (p, c) in self.pending.iter_mut().zip(planar) {
            p.extend_from_slice(c.as_ref());
        }
        self.drain(false)
    }

    /// Flushes the resampler (zeros after the signal) and returns the last output frames.
    pub fn finish(mut self) -> Result<Vec<Vec<f32>>, AudioError> {
        if self.rs.is_none() {
            return Ok(vec![Vec::new(); self.pending.len()]);
        }
        self.drain(true)
    }

    /// Processes whole input chunks (and, when `flush`, zero-padded ones until every output
    /// frame of the signal is out).
    fn drain(&mut self, flush: bool) -> Result<Vec<Vec<f32>>, AudioError> {
        let (from, to) = (self.from, self.to);
        let target = self.target();
        let mut out = vec![Vec::new(); self.pending.len()];
        let Some(rs) = self.rs.as_mut() else {
            return Ok(out);
        };
        // Input frames consumed; removed from `pending` once at the end (not per chunk, which
        // would move the rest of a long signal every time).
        let mut pos = 0;
        loop {
            let need = rs.input_frames_next();
            let have = self.pending[0].len() - pos;
            if have < need {
                if !flush || self.emitted >= target {
                    break;
                }
                for p in &mut self.pending {
                    p.resize(pos + need, 0.0);
                }
            }
            let slices: Vec<&[f32]> = self.pending.iter().map(|c| &c[pos..pos + need]).collect();
            let (_, written) = rs
                .process_into_buffer(&slices, &mut self.out_buf, None)
                .map_err(|e| AudioError::Resample {
                    from,
                    to,
                    reason: e.to_string(),
                })?;
            pos += need;
            let skip = self.skip.min(written);
            self.skip -= skip;
            let keep = if flush {
                (written - skip).min(target - self.emitted)
            } else {
                written - skip
            };
            for (o, b) in out.iter_mut().zip(&self.out_buf) {
                o.extend_from_slice(&b[skip..skip + keep]);
            }
            self.emitted += keep;
        }
        for p in &mut self.pending {
            p.drain(..pos.min(p.len()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f32, frames: usize) -> Vec<f32> {
        (0..frames)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    #[test]
    fn to_channels_mixdown_and_duplicate() {
        let a = Audio {
            sample_rate: 8000,
            channels: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
        };
        assert_eq!(a.to_channels(1).channels, vec![vec![0.5, 0.5]]);
        let m = Audio {
            sample_rate: 8000,
            channels: vec![vec![0.25, -0.5]],
        };
        assert_eq!(m.to_channels(2).channels, vec![vec![0.25, -0.5]; 2]);
        let quad = Audio {
            sample_rate: 8000,
            channels: vec![vec![1.0], vec![2.0], vec![3.0], vec![4.0]],
        };
        assert_eq!(quad.to_channels(2).channels, vec![vec![2.0], vec![3.0]]);
    }

    #[test]
    fn resample_length_and_no_delay() {
        for (from, to, frames) in [
            (44_100u32, 32_000u32, 44_100usize),
            (48_000, 32_000, 12_345),
            (16_000, 32_000, 999),
            (22_050, 32_000, 7),
            (22_050, 32_000, 30_000),
            (96_000, 32_000, 50_000),
        ] {
            let input = Audio {
                sample_rate: from,
                channels: vec![sine(from, 440.0, frames), sine(from, 220.0, frames)],
            };
            let out = resample(&input, to).unwrap();
            let expected = (frames as f64 * to as f64 / from as f64).round() as usize;
            assert_eq!(out.frames(), expected, "{from}->{to} {frames}");
            assert_eq!(out.channels.len(), 2);
            assert_eq!(out.sample_rate, to);
            if frames > 10_000 {
                // Away from the edges, the output matches the ideal sine at the new rate: the
                // resampler's latency was removed.
                let ideal = sine(to, 440.0, expected);
                let mid = expected / 4..expected * 3 / 4;
                let err = mid
                    .map(|i| (out.channels[0][i] - ideal[i]).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-3, "{from}->{to}: max error {err}");
            }
        }
    }

    /// Pushing a signal in pieces of any size gives exactly the one-shot output; output frames
    /// come out while input arrives (not all at the end).
    #[test]
    fn streamed_resampling_equals_one_shot() {
        for (from, to, frames) in [
            (32_000u32, 44_100u32, 40_000usize),
            (32_000, 48_000, 33_333),
            (32_000, 96_000, 5_000),
            (48_000, 32_000, 9),
            (32_000, 32_000, 1_000),
        ] {
            let input = Audio {
                sample_rate: from,
                channels: vec![sine(from, 440.0, frames), sine(from, 97.0, frames)],
            };
            let whole = resample(&input, to).unwrap();
            for cuts in [
                vec![1usize],
                vec![640, 1, 7_000, 0],
                vec![12_800],
                vec![frames],
            ] {
                let mut rs = StreamResampler::new(from, to, 2).unwrap();
                let mut got: Vec<Vec<f32>> = vec![Vec::new(); 2];
                let mut pos = 0;
                let mut i = 0;
                let mut early = 0;
                while pos < frames {
                    let n = cuts[i % cuts.len()].min(frames - pos);
                    i += 1;
                    let piece: Vec<&[f32]> =
                        input.channels.iter().map(|c| &c[pos..pos + n]).collect();
                    let out = rs.push(&piece).unwrap();
                    pos += n;
                    for (g, o) in got.iter_mut().zip(out) {
                        g.extend_from_slice(&o);
                    }
                    if pos < frames {
                        early = got[0].len();
                    }
                }
                for (g, o) in got.iter_mut().zip(rs.finish().unwrap()) {
                    g.extend_from_slice(&o);
                }
                assert_eq!(got, whole.channels, "{from}->{to}, cuts {cuts:?}");
                if frames > 20_000 && cuts[0] < frames {
                    assert!(
                        early > whole.frames() / 2,
                        "{from}->{to}: only {early} early"
                    );
                }
            }
        }
        assert!(StreamResampler::new(0, 32_000, 1).is_err());
        assert!(StreamResampler::new(32_000, 48_000, 0).is_err());
        let mut rs = StreamResampler::new(32_000, 48_000, 2).unwrap();
        assert!(rs.push(&[[0.0f32; 4]]).is_err());
        assert!(rs.push(&[&[0.0f32; 4][..], &[0.0f32; 3][..]]).is_err());
    }

    #[test]
    fn wav_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.wav");
        let audio = Audio {
            sample_rate: 32_000,
            channels: vec![vec![0.1, -0.2, 0.3], vec![0.0, 0.5, -1.0]],
        };
        write_wav_f32(&path, &audio).unwrap();
        assert_eq!(read_wav(&path).unwrap(), audio);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // 16-bit integer PCM, 3 channels.
        let p16 = dir.path().join("b.wav");
        let spec = hound::WavSpec {
            channels: 3,
            sample_rate: 11_025,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&p16, spec).unwrap();
        for s in [16384i16, -32768, 0, 8192, 0, 32767] {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        let b = read_wav(&p16).unwrap();
        assert_eq!(b.sample_rate, 11_025);
        assert_eq!(b.channels.len(), 3);
        assert_eq!(b.channels[0], vec![0.5, 0.25]);
        assert_eq!(b.channels[1], vec![-1.0, 0.0]);

        let missing = dir.path().join("missing.wav");
        let e = read_wav(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.wav"), "{e}");

        let text = dir.path().join("text.wav");
        std::fs::write(&text, "hello, not a wav").unwrap();
        let e = read_wav(&text).unwrap_err();
        assert!(matches!(e, AudioError::NotWav { .. }), "{e}");
        assert!(e.to_string().contains("text.wav"));

        // Too short to hold a header: not a WAV, and the message says so once.
        let short = dir.path().join("short.wav");
        std::fs::write(&short, "hi\n").unwrap();
        let e = read_wav(&short).unwrap_err();
        assert!(matches!(e, AudioError::NotWav { .. }), "{e}");
        let mut truncated = std::fs::read(&path).unwrap();
        truncated.truncate(30);
        std::fs::write(&short, truncated).unwrap();
        assert!(matches!(
            read_wav(&short).unwrap_err(),
            AudioError::NotWav { .. }
        ));

        let empty = dir.path().join("empty.wav");
        hound::WavWriter::create(&empty, spec)
            .unwrap()
            .finalize()
            .unwrap();
        assert!(matches!(
            read_wav(&empty).unwrap_err(),
            AudioError::Empty { .. }
        ));

        let nan = dir.path().join("nan.wav");
        let nan_audio = Audio {
            sample_rate: 8000,
            channels: vec![vec![f32::NAN; 4]],
        };
        write_wav_f32(&nan, &nan_audio).unwrap();
        let e = read_wav(&nan).unwrap_err();
        assert!(matches!(e, AudioError::NonFinite { count: 4, .. }), "{e}");
    }
}
