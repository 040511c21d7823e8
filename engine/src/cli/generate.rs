//! `segue generate`: text and/or audio prompt to WAV with MusicGen.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use segue_engine::audio::{self, Audio};
use segue_engine::codec::CodesFile;
use segue_engine::decoder::Quant;
use segue_engine::hub::HubProgress;
use segue_engine::longform::{DEFAULT_STRIDE_S, DEFAULT_WINDOW_S, MAX_NEW_FRAMES};
use segue_engine::sampling::SamplingParams;
use segue_engine::service::{
    Client, DTypeChoice, DeviceChoice, Engine, EventKind, GenerateRequest, JobId, LoadStage,
    ModelSpec, Policy, WindowSeconds,
};

use super::codec::hub_progress;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("length").required(true).args(["duration", "frames"])))]
pub struct GenerateArgs {
    /// MusicGen checkpoint: a local folder or a Hub id such as facebook/musicgen-small.
    #[arg(long)]
    pub model: String,
    /// Description of the music; empty for unconditional generation.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Audio to continue (WAV, any sample rate and channel count).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Seconds of new audio (rounded to 50 Hz frames), any length up to 20 minutes: beyond one
    /// window the music is extended window by window (see --window and --stride).
    #[arg(long, allow_negative_numbers = true)]
    pub duration: Option<f64>,
    /// New 50 Hz frames.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Always take the most likely token (no sampling).
    #[arg(long, conflicts_with_all = ["top_k", "top_p", "temperature"])]
    pub greedy: bool,
    /// Sample among the K most likely tokens (default: the checkpoint's, 250).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1] (default 1 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Sampling temperature > 0 (default 1).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    /// Classifier-free guidance scale, >= 1 (default: the checkpoint's, 3; 1 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub cfg: Option<f64>,
    /// Random seed (default: from the clock, printed). Take i uses seed + i - 1.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Takes generated together; with more than one, --out x.wav writes x-1.wav … x-N.wav.
    #[arg(long, default_value_t = 1)]
    pub takes: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Decoder weight and compute dtype (the text encoder and codec stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Quantise the decoder's linear layers once at load (q8_0: 8-bit, q4k: 4-bit k-quant);
    /// needs --dtype f32. The text encoder and codec stay unquantised.
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// Output WAV (32-bit float at 32 kHz); only the new audio unless --include-prompt.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the decoded prompt before the continuation.
    #[arg(long, conflicts_with = "stream")]
    pub include_prompt: bool,
    /// Seconds of one generation window, prompt included (default 30, the most the model
    /// allows); longer music is generated window by window.
    #[arg(long, allow_negative_numbers = true)]
    pub window: Option<f64>,
    /// Seconds each window after the first adds (default 18 with the default window, else 60%
    /// of --window); later windows are prompted with the last window - stride seconds.
    #[arg(long, allow_negative_numbers = true)]
    pub stride: Option<f64>,
    /// Write the WAV while generating (a valid file after every chunk) and print the time to
    /// the first audible chunk.
    #[arg(long)]
    pub stream: bool,
    /// Also write every frame's codes, prompt first, as JSON (one file per take).
    #[arg(long)]
    pub codes_out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
    Auto,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    #[value(name = "q8_0")]
    Q8_0,
    Q4k,
}

impl QuantArg {
    pub fn quant(self) -> Quant {
        match self {
            Self::Q8_0 => Quant::Q8_0,
            Self::Q4k => Quant::Q4K,
        }
    }
}

impl DtypeArg {
    fn choice(self) -> DTypeChoice {
        match self {
            Self::F32 => DTypeChoice::F32,
            Self::F16 => DTypeChoice::F16,
            Self::Bf16 => DTypeChoice::Bf16,
        }
    }
}

impl DeviceArg {
    fn choice(self) -> DeviceChoice {
        match self {
            Self::Cpu => DeviceChoice::Cpu,
            Self::Cuda => DeviceChoice::Cuda(0),
            Self::Metal => DeviceChoice::Metal,
            Self::Auto => DeviceChoice::Auto,
        }
    }
}

/// `out.wav` for one take, `out-<i>.wav` (1-based) for several.
pub fn numbered(path: &Path, index: usize, count: usize) -> PathBuf {
    if count <= 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map_or_else(|| "out".into(), |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    path.with_file_name(name)
}

/// New frames from --frames or --duration (50 Hz).
fn new_frames(args: &GenerateArgs) -> anyhow::Result<usize> {
    match (args.frames, args.duration) {
        (Some(0), _) => bail!("--frames must be at least 1"),
        (Some(n), _) => Ok(n),
        (None, Some(d)) if !(d.is_finite() && d > 0.0) => {
            bail!("--duration must be a positive number of seconds (got {d})")
        }
        (None, Some(d)) if d * 50.0 > MAX_NEW_FRAMES as f64 => bail!(
            "--duration {d} is too long: at most {} s ({} minutes)",
            MAX_NEW_FRAMES / 50,
            MAX_NEW_FRAMES / 3000
        ),
        (None, Some(d)) => Ok(((d * 50.0).round() as usize).max(1)),
        (None, None) => bail!("give --duration or --frames"),
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    // Everything that can be checked without the model first.
    if args.takes == 0 {
        bail!("--takes must be at least 1");
    }
    let new_frames = new_frames(&args)?;
    let window = window(&args)?;
    if args.quant.is_some() && args.dtype != DtypeArg::F32 {
        bail!("--quant computes in f32: drop --dtype or give --dtype f32");
    }
    let mut sampling = if args.greedy {
        SamplingParams::greedy(3.0)
    } else {
        SamplingParams::default()
    };
    let explicit = |s: &mut SamplingParams| {
        if let Some(k) = args.top_k {
            s.top_k = k;
        }
        if let Some(p) = args.top_p {
            s.top_p = p;
        }
        if let Some(t) = args.temperature {
            s.temperature = t;
        }
        if let Some(g) = args.cfg {
            s.guidance_scale = g;
        }
    };
    explicit(&mut sampling);
    sampling.validate()?;
    let prompt_audio = match &args.input {
        Some(p) => Some(audio::read_wav(p)?),
        None => None,
    };
    // The same inference service the plugin uses: load, then generate, reading its events.
    let engine = Engine::new()?;
    let client = engine.client();
    let spec = ModelSpec {
        source: args.model.clone(),
        device: args.device.choice(),
        dtype: args.dtype.choice(),
        quant: args.quant.map(QuantArg::quant),
    };
    let load = client.load(spec.clone(), Policy::Queue);
    let mut download = hub_progress();
    let mut info = None;
    loop {
        match next_event(&client, load)? {
            EventKind::Load(LoadStage::Downloading { file, bytes, total }) => {
                download(HubProgress::Downloading { file, bytes, total })
            }
            EventKind::Load(LoadStage::Downloaded { file }) => download(HubProgress::Done { file }),
            EventKind::DeviceFallback { reason, .. } => eprintln!("warning: {reason}"),
            EventKind::ModelReady(ready) => info = Some(ready),
            EventKind::Loaded => break,
            EventKind::Failed(msg) => bail!("{msg}"),
            EventKind::Cancelled => bail!("loading {} was cancelled", args.model),
            _ => {}
        }
    }
    let info = info.context("the engine loaded the model without describing it")?;
    if args.device == DeviceArg::Auto {
        eprintln!("device: {}", info.device);
    }
    // The checkpoint's own defaults where the command line says nothing.
    if args.top_k.is_none() {
        if let Some(k) = info.defaults.top_k {
            sampling.top_k = k;
        }
    }
    if args.cfg.is_none() {
        if let Some(g) = info.defaults.guidance_scale {
            sampling.guidance_scale = g;
        }
    }
    explicit(&mut sampling);
    sampling.validate()?;

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    if args.seed.is_none() {
        eprintln!("seed: {seed}");
    }
    let frame_rate = 50.0;
    let request = GenerateRequest {
        model: spec,
        text: args.prompt.clone(),
        prompt: prompt_audio,
        duration_s: new_frames as f64 / frame_rate,
        sampling,
        seed,
        takes: args.takes,
        stream: args.stream,
        window,
    };
    let started = Instant::now();
    let job = client.generate(request, Policy::Queue);
    let mut writers: Vec<Option<StreamWriter>> = (0..args.takes).map(|_| None).collect();
    let mut first_chunk = None;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{wide_bar} {pos}/{len} steps {per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let takes = loop {
        match next_event(&client, job) {
            Ok(EventKind::Progress { step, total, .. }) => {
                if bar.length() != Some(total as u64) {
                    bar.set_length(total as u64);
                    bar.reset_elapsed();
                }
                bar.set_position(step as u64);
            }
            Ok(EventKind::Chunk {
                take,
                offset,
                audio,
            }) => {
                if first_chunk.is_none() {
                    let secs = started.elapsed().as_secs_f64();
                    first_chunk = Some(secs);
                    bar.suspend(|| eprintln!("first audio after {secs:.2} s"));
                }
                let path = numbered(&args.out, take + 1, args.takes);
                let result = match writers.get_mut(take) {
                    Some(slot) => StreamWriter::append(slot, &path, offset, &audio),
                    None => Err(anyhow::anyhow!(
                        "a chunk of take {take} that was not asked for"
                    )),
                };
                if let Err(e) = result {
                    bar.finish_and_clear();
                    client.cancel(job);
                    remove_partial(&mut writers);
                    return Err(e);
                }
            }
            Ok(EventKind::Finished(takes)) => break takes,
            Ok(EventKind::Failed(msg)) => {
                bar.finish_and_clear();
                remove_partial(&mut writers);
                if args.input.is_some() && msg.contains("allows at most") {
                    bail!("the prompt audio plus the new audio is too long: {msg}");
                }
                bail!("{msg}");
            }
            Ok(EventKind::Cancelled) => {
                bar.finish_and_clear();
                remove_partial(&mut writers);
                bail!("the generation was cancelled");
            }
            Ok(_) => {}
            Err(e) => {
                bar.finish_and_clear();
                remove_partial(&mut writers);
                return Err(e);
            }
        }
    };
    bar.finish_and_clear();
    if takes.iter().any(|t| t.meta.text_truncated) {
        eprintln!(
            "warning: the prompt text is longer than {} tokens and was truncated",
            segue_engine::text::MAX_TEXT_TOKENS
        );
    }
    let n = takes.len();
    for (i, take) in takes.iter().enumerate() {
        let audio = if args.include_prompt {
            take.audio.clone()
        } else {
            take.continuation()
        };
        let path = numbered(&args.out, i + 1, n);
        match writers.get_mut(i).and_then(Option::take) {
            // Streamed: the file already holds every chunk, which together are the take.
            Some(w) => w.finish(audio.frames())?,
            None => audio::write_wav_f32(&path, &audio)?,
        }
        if let Some(codes_out) = &args.codes_out {
            let file = CodesFile {
                frame_rate: frame_rate as u32,
                prompt_frames: take.prompt_frames,
                codes: take.codes.clone(),
            };
            let codes_path = numbered(codes_out, i + 1, n);
            file.write(&codes_path)?;
        }
        eprintln!("wrote {} (seed {})", path.display(), take.meta.seed);
    }
    if let Some(first) = takes.first() {
        let m = &first.meta;
        eprintln!(
            "{} steps at {:.2} steps/s on {}; {:.1} s in all",
            m.steps, m.steps_per_s, m.device, m.generation_s
        );
    }
    if let Some(secs) = first_chunk {
        eprintln!("time to the first audible chunk: {secs:.2} s");
    }
    Ok(())
}

/// --window / --stride to the request's window (`None`: the engine's defaults).
fn window(args: &GenerateArgs) -> anyhow::Result<Option<WindowSeconds>> {
    let check = |what: &str, v: Option<f64>| match v {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            bail!("--{what} must be a positive number of seconds (got {s})")
        }
        _ => Ok(()),
    };
    check("window", args.window)?;
    check("stride", args.stride)?;
    let (window_s, stride_s) = match (args.window, args.stride) {
        (None, None) => return Ok(None),
        (Some(w), None) => (w, w * DEFAULT_STRIDE_S / DEFAULT_WINDOW_S),
        (None, Some(s)) => (DEFAULT_WINDOW_S, s),
        (Some(w), Some(s)) => (w, s),
    };
    if stride_s >= window_s {
        bail!("--stride ({stride_s} s) must be shorter than --window ({window_s} s): each window is prompted with the last window - stride seconds");
    }
    Ok(Some(WindowSeconds { window_s, stride_s }))
}

/// A WAV file written chunk by chunk: the header is rewritten after every chunk, so a reader
/// at any moment sees a valid file holding the audio so far.
struct StreamWriter {
    path: PathBuf,
    writer: hound::WavWriter<BufWriter<File>>,
    /// Samples per channel written.
    frames: usize,
}

impl StreamWriter {
    /// Appends `audio` at `offset` (samples from the start of the continuation), creating the
    /// file on the first chunk. Chunks must arrive in order without gaps.
    fn append(
        slot: &mut Option<StreamWriter>,
        path: &Path,
        offset: usize,
        audio: &Audio,
    ) -> anyhow::Result<()> {
        if slot.is_none() {
            let spec = hound::WavSpec {
                channels: audio.channels.len() as u16,
                sample_rate: audio.sample_rate,
                bits_per_sample: 32,
                sample_format: hound::SampleFormat::Float,
            };
            let file =
                File::create(path).with_context(|| format!("creating {}", path.display()))?;
            let writer = hound::WavWriter::new(BufWriter::new(file), spec)
                .with_context(|| format!("writing {}", path.display()))?;
            *slot = Some(StreamWriter {
                path: path.to_path_buf(),
                writer,
                frames: 0,
            });
        }
        let Some(w) = slot.as_mut() else {
            unreachable!("set above")
        };
        if offset != w.frames {
            bail!(
                "{}: chunk at sample {offset} after {} samples (chunks out of order)",
                w.path.display(),
                w.frames
            );
        }
        let ctx = || format!("writing {}", w.path.display());
        for i in 0..audio.frames() {
            for ch in &audio.channels {
                w.writer.write_sample(ch[i]).with_context(ctx)?;
            }
        }
        w.writer.flush().with_context(ctx)?;
        w.frames += audio.frames();
        Ok(())
    }

    /// Closes the file, checking it holds the whole take (`frames` samples per channel).
    fn finish(self, frames: usize) -> anyhow::Result<()> {
        if self.frames != frames {
            let _ = std::fs::remove_file(&self.path);
            bail!(
                "{}: the streamed chunks hold {} samples, the take {frames}",
                self.path.display(),
                self.frames
            );
        }
        let path = self.path.clone();
        self.writer
            .finalize()
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Removes the files of a stream that did not complete (nothing half-written stays behind).
fn remove_partial(writers: &mut [Option<StreamWriter>]) {
    for w in writers.iter_mut().filter_map(Option::take) {
        let path = w.path.clone();
        drop(w);
        let _ = std::fs::remove_file(path);
    }
}

/// The next event of `job` (events of other jobs are not expected on this client).
fn next_event(client: &Client, job: JobId) -> anyhow::Result<EventKind> {
    loop {
        let event = client
            .events
            .recv()
            .context("the inference engine stopped unexpectedly")?;
        if event.job == job {
            return Ok(event.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_paths() {
        assert_eq!(
            numbered(Path::new("a/out.wav"), 1, 1),
            PathBuf::from("a/out.wav")
        );
        assert_eq!(
            numbered(Path::new("a/out.wav"), 2, 3),
            PathBuf::from("a/out-2.wav")
        );
        assert_eq!(numbered(Path::new("codes"), 1, 2), PathBuf::from("codes-1"));
    }

    /// A reader in the middle of a stream sees a valid WAV with every chunk so far.
    #[test]
    fn a_streamed_wav_is_valid_after_every_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.wav");
        let chunk = |n: usize, v: f32| Audio {
            sample_rate: 32_000,
            channels: vec![vec![v; n], vec![-v; n]],
        };
        let mut slot = None;
        StreamWriter::append(&mut slot, &path, 0, &chunk(100, 0.5)).unwrap();
        let mid = audio::read_wav(&path).unwrap();
        assert_eq!((mid.channels.len(), mid.frames()), (2, 100));
        StreamWriter::append(&mut slot, &path, 100, &chunk(50, 0.25)).unwrap();
        let mid = audio::read_wav(&path).unwrap();
        assert_eq!(mid.frames(), 150);
        assert_eq!(mid.channels[1][120], -0.25);
        // Out of order is an error, not a silently shifted file.
        assert!(StreamWriter::append(&mut slot, &path, 10, &chunk(5, 0.1)).is_err());
        slot.take().unwrap().finish(150).unwrap();
        assert_eq!(audio::read_wav(&path).unwrap().frames(), 150);
    }
}
