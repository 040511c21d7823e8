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

/// CPU time consumed by this process so far (all threads), in seconds; `None` where the
/// platform does not say.
pub(super) fn process_cpu_s() -> Option<f64> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9);
        }
    }
    None
}

/// Wall and CPU seconds of one timed call.
#[derive(Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: Option<f64>,
}

/// The fastest (by wall time) of `runs` calls of `f`, after one warm-up call.
fn best_of<T>(runs: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Timing> {
    f()?;
    let mut best = Timing {
        wall: f64::INFINITY,
        cpu: None,
    };
    for _ in 0..runs.max(1) {
        let c0 = process_cpu_s();
        let t = Instant::now();
        f()?;
        let wall = t.elapsed().as_secs_f64();
        let cpu = c0.zip(process_cpu_s()).map(|(a, b)| b - a);
        if wall < best.wall {
            best = Timing { wall, cpu };
        }
    }
    Ok(best)
}

/// One line per direction: wall time and real-time factor, plus CPU time and the real-time
/// factor it implies with every thread on its own idle core (wall time is inflated when other
/// processes compete for the cores).
fn report(what: &str, seconds: f64, t: Timing, threads: usize) {
    let cpu = match t.cpu {
        Some(cpu) => format!(
            ", CPU {cpu:.3} s -> {:.1}x real time on {threads} idle cores",
            seconds / (cpu / threads as f64)
        ),
        None => String::new(),
    };
    println!(
        "codec {what}: wall {:.3} s -> {:.1}x real time{cpu}",
        t.wall,
        seconds / t.wall
    );
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
    report("encode", seconds, enc, threads);
    let dec = best_of(args.codec_runs, || Ok(codec.decode(&codes)?))?;
    report("decode", seconds, dec, threads);
    Ok(())
}
