//! EnCodec section of `segue bench`: encode and decode speed of the full-size 32 kHz codec
//! (MusicGen's, random weights, no download) on the CPU, as real-time factors.

use std::time::Instant;

use candle_core::{Device, Tensor};
use segue_engine::codec::{random_var_builder, Config, Encodec};

#[derive(clap::Args)]
pub struct CodecBenchArgs {
    /// Seconds of audio the codec benchmark encodes and decodes per run.
    #[arg(long, default_value_t = 10.0)]
    pub codec_seconds: f64,
    /// Timed runs of each direction (after one untimed warm-up run); the best is reported.
    #[arg(long, default_value_t = 3)]
    pub codec_runs: usize,
}

/// Best wall time of `runs` calls of `f`, after one warm-up call, in seconds.
fn best_of<T>(runs: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

pub fn run(args: &CodecBenchArgs) -> anyhow::Result<()> {
    if !(args.codec_seconds > 0.0 && args.codec_seconds.is_finite()) {
        anyhow::bail!("--codec-seconds must be a positive number of seconds");
    }
    let device = Device::Cpu;
    let cfg = Config::musicgen_32khz();
    let t = Instant::now();
    let codec = Encodec::new(&cfg, random_var_builder(&device))?;
    let build_s = t.elapsed().as_secs_f64();
    let samples = (args.codec_seconds * cfg.sampling_rate as f64).round() as usize;
    let seconds = samples as f64 / cfg.sampling_rate as f64;
    // A 440 Hz tone with some noise: realistic levels, no denormals.
    let tone = Tensor::arange(0u32, samples as u32, &device)?
        .to_dtype(candle_core::DType::F32)?
        .affine(
            2.0 * std::f64::consts::PI * 440.0 / cfg.sampling_rate as f64,
            0.0,
        )?
        .sin()?
        .affine(0.5, 0.0)?;
    let noise = Tensor::randn(0f32, 0.05, samples, &device)?;
    let audio = (tone + noise)?.reshape((1, 1, samples))?; // (1, 1, samples)
    let codes = codec.encode(&audio)?; // (1, K, frames)

    let threads = candle_core::utils::get_num_threads();
    println!(
        "codec: full-size 32 kHz EnCodec (random weights, built in {build_s:.2} s), CPU, {threads} threads, {seconds:.1} s of mono audio, best of {} runs",
        args.codec_runs.max(1)
    );
    let enc = best_of(args.codec_runs, || Ok(codec.encode(&audio)?))?;
    println!(
        "codec encode: {enc:.3} s -> {:.1}x real time",
        seconds / enc
    );
    let dec = best_of(args.codec_runs, || Ok(codec.decode(&codes)?))?;
    println!(
        "codec decode: {dec:.3} s -> {:.1}x real time",
        seconds / dec
    );
    Ok(())
}
