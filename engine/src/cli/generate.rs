//! `segue generate`: text and/or audio prompt to WAV with MusicGen.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use segue_engine::audio;
use segue_engine::codec::CodesFile;
use segue_engine::decoder::Quant;
use segue_engine::generate::{generate_audio, AudioRequest, Control, GenerateError};
use segue_engine::hub;
use segue_engine::model::Musicgen;
use segue_engine::sampling::SamplingParams;

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
    /// Quantise the decoder's linear layers once at load (q8_0: 8-bit, q4k: 4-bit k-quant);
    /// needs --dtype f32. The text encoder and codec stay unquantised.
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
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
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// The device asked for; `auto` picks CUDA, then Metal, then the CPU and says which.
pub fn select_device(arg: DeviceArg) -> anyhow::Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Device::new_cuda(0).context("--device cuda"),
        DeviceArg::Metal => Device::new_metal(0).context("--device metal"),
        DeviceArg::Auto => {
            let dev = if let Ok(d) = Device::new_cuda(0) {
                eprintln!("device: CUDA GPU 0");
                d
            } else if let Ok(d) = Device::new_metal(0) {
                eprintln!("device: Metal GPU 0");
                d
            } else {
                eprintln!("device: CPU (no CUDA or Metal device available in this build)");
                Device::Cpu
            };
            Ok(dev)
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
    let device = select_device(args.device)?;

    let files = hub::resolve(&args.model, &mut hub_progress())?;
    let model = Musicgen::load_with(
        &files,
        args.dtype.dtype(),
        &device,
        args.quant.map(QuantArg::quant),
    )
    .with_context(|| format!("loading {}", args.model))?;
    // The checkpoint's own defaults where the command line says nothing.
    let gen = model.generation_config();
    if args.top_k.is_none() {
        if let Some(k) = gen.top_k {
            sampling.top_k = k;
        }
    }
    if args.cfg.is_none() {
        if let Some(g) = gen.guidance_scale {
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
    let req = AudioRequest {
        text: args.prompt.clone(),
        prompt: prompt_audio,
        new_frames,
        sampling,
        seed,
        takes: args.takes,
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{wide_bar} {pos}/{len} steps {per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = generate_audio(&model, &req, &mut |info| {
        if bar.length() != Some(info.total as u64) {
            bar.set_length(info.total as u64);
            bar.reset_elapsed();
        }
        bar.set_position(info.step as u64);
        Control::Continue
    });
    bar.finish_and_clear();
    let out = match result {
        Ok(out) => out,
        Err(e @ GenerateError::TooLong { .. }) if args.input.is_some() => {
            return Err(
                anyhow::Error::new(e).context("the prompt audio plus the new audio is too long")
            )
        }
        Err(e) => return Err(e.into()),
    };
    if out.text_truncated {
        eprintln!(
            "warning: the prompt text is longer than {} tokens and was truncated",
            segue_engine::text::MAX_TEXT_TOKENS
        );
    }
    let n = out.takes.len();
    for (i, take) in out.takes.iter().enumerate() {
        let audio = if args.include_prompt {
            take.audio.clone()
        } else {
            take.continuation()
        };
        let path = numbered(&args.out, i + 1, n);
        audio::write_wav_f32(&path, &audio)?;
        if let Some(codes_out) = &args.codes_out {
            let file = CodesFile {
                frame_rate: model.frame_rate().round() as u32,
                prompt_frames: out.prompt_frames,
                codes: take.codes.clone(),
            };
            let codes_path = numbered(codes_out, i + 1, n);
            file.write(&codes_path)?;
        }
        eprintln!("wrote {} (seed {})", path.display(), take.seed);
    }
    let t = out.timings;
    eprintln!(
        "{} steps in {:.1} s ({:.2} steps/s); text {:.2} s, prompt encode {:.2} s, decode {:.2} s",
        out.steps,
        t.generate.prefill.as_secs_f64() + t.generate.steps.as_secs_f64(),
        t.generate.steps_per_second(out.steps),
        t.generate.text.as_secs_f64(),
        t.encode.as_secs_f64(),
        t.decode.as_secs_f64()
    );
    Ok(())
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
