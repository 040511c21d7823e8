//! `segue encode` (WAV -> codes JSON) and `segue decode` (codes JSON -> 32-bit float WAV).

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use segue_engine::audio::{self, Audio};
use segue_engine::codec::{CheckpointCodec, CodesFile, Encodec};
use segue_engine::hub::{self, HubProgress};

#[derive(clap::Args)]
pub struct EncodeArgs {
    /// MusicGen checkpoint: a local folder or a Hub id such as facebook/musicgen-small.
    #[arg(long)]
    pub model: String,
    /// Input WAV file: any sample rate, any number of channels.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the codes (JSON).
    #[arg(long)]
    pub codes_out: PathBuf,
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// MusicGen checkpoint: a local folder or a Hub id such as facebook/musicgen-small.
    #[arg(long)]
    pub model: String,
    /// Codes file (JSON) as written by `segue encode` or `segue generate --codes-out`.
    #[arg(long)]
    pub codes: PathBuf,
    /// Where to write the audio (WAV, 32-bit float, the codec's sample rate).
    #[arg(long)]
    pub out: PathBuf,
}

/// Shows Hub downloads as progress bars on stderr (nothing for local or cached models).
pub(crate) fn hub_progress() -> impl FnMut(HubProgress) {
    let mut bar: Option<indicatif::ProgressBar> = None;
    move |p| match p {
        HubProgress::Downloading { file, bytes, total } => {
            let b = bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(total.unwrap_or(0));
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b.set_message(file);
                b
            });
            if let Some(t) = total {
                b.set_length(t);
            }
            b.set_position(bytes);
        }
        HubProgress::Done { .. } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
        }
    }
}

/// Resolves `model` and loads its codec on the CPU.
pub(crate) fn load_codec(model: &str) -> anyhow::Result<(CheckpointCodec, Encodec)> {
    let files = hub::resolve(model, &mut hub_progress())?;
    let (info, codec) = CheckpointCodec::load(&files, &Device::Cpu)
        .with_context(|| format!("loading the codec of {model}"))?;
    Ok((info, codec))
}

pub fn encode(args: EncodeArgs) -> anyhow::Result<()> {
    let input = audio::read_wav(&args.input)?;
    let (info, codec) = load_codec(&args.model)?;
    let cfg = codec.config();
    let channels = info.channels;
    let mixed = input.to_channels(channels);
    let resampled = audio::resample(&mixed, cfg.sampling_rate)?;
    let samples = resampled.frames();
    if samples == 0 {
        bail!(
            "{}: too short: {} samples at {} Hz resample to none at {} Hz",
            args.input.display(),
            input.frames(),
            input.sample_rate,
            cfg.sampling_rate
        );
    }
    let flat: Vec<f32> = resampled.channels.concat();
    let audio = Tensor::from_vec(flat, (1, channels, samples), &Device::Cpu)?; // (1, C, samples)
    let codes = codec.encode_interleaved(&audio, channels)?; // (1, C*K, frames)
    let file = CodesFile::from_tensor(&codes, cfg.frame_rate() as u32, 0)?;
    file.write(&args.codes_out)?;
    eprintln!(
        "{}: {:.2} s, {} channel(s) -> {} codebooks x {} frames at {} Hz -> {}",
        args.input.display(),
        input.duration_s(),
        input.channels.len(),
        file.num_codebooks(),
        file.frames(),
        file.frame_rate,
        args.codes_out.display()
    );
    Ok(())
}

pub fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let file = CodesFile::read(&args.codes)?;
    let (info, codec) = load_codec(&args.model)?;
    let cfg = codec.config();
    let path = args.codes.display();
    if file.frame_rate as f64 != cfg.frame_rate() {
        bail!(
            "{path}: frame_rate {} does not match the model's {} Hz",
            file.frame_rate,
            cfg.frame_rate()
        );
    }
    let expected = info.channels * cfg.num_codebooks();
    if file.num_codebooks() != expected {
        bail!(
            "{path}: {} codebooks, but the model takes {expected} ({} channel(s) x {} codebooks)",
            file.num_codebooks(),
            info.channels,
            cfg.num_codebooks()
        );
    }
    file.check_range(cfg.codebook_size)
        .with_context(|| format!("{path}"))?;
    let codes = file.to_tensor(&Device::Cpu)?; // (1, C*K, frames)
    let audio = codec.decode_interleaved(&codes, info.channels)?; // (1, C, samples)
    let channels = audio.squeeze(0)?.to_vec2::<f32>()?;
    let out = Audio {
        sample_rate: cfg.sampling_rate,
        channels,
    };
    audio::write_wav_f32(&args.out, &out)?;
    eprintln!(
        "{path}: {} frames -> {:.2} s, {} channel(s) at {} Hz -> {}",
        file.frames(),
        out.duration_s(),
        out.channels.len(),
        out.sample_rate,
        args.out.display()
    );
    Ok(())
}
