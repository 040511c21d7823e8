//! `segue generate`: text and/or audio prompt to WAV with MusicGen.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use segue_engine::audio;
use segue_engine::codec::CodesFile;
use segue_engine::hub::HubProgress;
use segue_engine::sampling::SamplingParams;
use segue_engine::service::{
    Client, DTypeChoice, DeviceChoice, Engine, EventKind, GenerateRequest, JobId, LoadStage,
    ModelSpec, Policy,
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
    /// Seconds of new audio (rounded to 50 Hz frames).
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
    /// Output WAV (32-bit float at 32 kHz); only the new audio unless --include-prompt.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the decoded prompt before the continuation.
    #[arg(long)]
    pub include_prompt: bool,
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
    };
    let job = client.generate(request, Policy::Queue);
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
            Ok(EventKind::Finished(takes)) => break takes,
            Ok(EventKind::Failed(msg)) => {
                bar.finish_and_clear();
                if args.input.is_some() && msg.contains("allows at most") {
                    bail!("the prompt audio plus the new audio is too long: {msg}");
                }
                bail!("{msg}");
            }
            Ok(EventKind::Cancelled) => {
                bar.finish_and_clear();
                bail!("the generation was cancelled");
            }
            Ok(_) => {}
            Err(e) => {
                bar.finish_and_clear();
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
        audio::write_wav_f32(&path, &audio)?;
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
    Ok(())
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
}
