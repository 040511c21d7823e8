//! Decoder section of `segue bench`: a random-weight decoder of a real MusicGen topology (no
//! download), guidance on (batch 2), one table row per weight format: steps/s, real-time
//! factor, prefill of an audio prompt, peak memory, and the fraction of the memory-bandwidth
//! floor reached.

use std::time::Instant;

use super::bench::BenchDevice;
use super::bench_codec::process_cpu_s;
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rayon::prelude::*;
use segue_engine::decoder::{Decoder, DecoderConfig, Quant};
use segue_engine::sampling::{SamplingParams, StepSelector, TakeRng};

#[derive(clap::Args)]
pub struct DecoderBenchArgs {
    /// Decoder steps to time (after the prefill).
    #[arg(long = "decoder-steps", default_value_t = 50)]
    pub steps: usize,
    /// Weight formats, one table row each.
    #[arg(
        long = "decoder-formats",
        value_enum,
        value_delimiter = ',',
        default_value = "f32,bf16,q8_0,q4k"
    )]
    pub formats: Vec<BenchFormat>,
    /// Takes generated together (the decoder batch is twice this with guidance).
    #[arg(long = "decoder-takes", default_value_t = 1)]
    pub takes: usize,
    /// Per-step products of the f32 and q8_0 rows: our CPU kernels (`matvec`, default),
    /// candle's matmul / `QMatMul`, or both (two rows each).
    #[arg(long = "decoder-kernel", value_enum, default_value = "host")]
    pub kernel: BenchKernel,
    /// Topology: small (24 layers, width 1024, 16 heads, FFN 4096), medium (48 layers, width
    /// 1536, 24 heads, FFN 6144), or tiny (2 layers, width 256; a smoke test of the bench).
    #[arg(long = "decoder-size", value_enum, default_value = "small")]
    pub size: BenchSize,
    /// Seconds of audio prompt fed in the prefill (50 frames per second); 0 = just the start
    /// column.
    #[arg(long = "decoder-prompt-seconds", default_value_t = 10.0)]
    pub prompt_seconds: f64,
    /// Positions per prefill pass (the generation loop uses 64); a value at or above the
    /// prompt's length feeds it in one pass.
    #[arg(long = "decoder-prefill-chunk", default_value_t = segue_engine::decoder::PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Load the decoder weights from this safetensors file (keys `model.decoder.…` and
    /// `lm_heads.…`, as `MusicgenForCausalLM` saves them; the topology of `--decoder-size`)
    /// instead of random ones: the side-by-side script runs both implementations on the same
    /// checkpoint this way.
    #[arg(long = "decoder-checkpoint")]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Element type of the key/value cache: the decoder's default (f32 for f32 weights, f16
    /// for quantised weights on the CPU), or f32 / f16 for every row.
    #[arg(long = "decoder-cache", value_enum, default_value = "auto")]
    pub cache: BenchCache,
    /// MiB of the array read to measure memory bandwidth (well above the last-level cache).
    #[arg(long = "bandwidth-mib", default_value_t = 1024)]
    pub bandwidth_mib: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFormat {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    Q4k,
}

impl BenchFormat {
    fn label(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4k => "q4k",
        }
    }
    /// Compute dtype and quantisation.
    fn split(self) -> (DType, Option<Quant>) {
        match self {
            Self::F32 => (DType::F32, None),
            Self::F16 => (DType::F16, None),
            Self::Bf16 => (DType::BF16, None),
            Self::Q8_0 => (DType::F32, Some(Quant::Q8_0)),
            Self::Q4k => (DType::F32, Some(Quant::Q4K)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchCache {
    Auto,
    F32,
    F16,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKernel {
    Host,
    Matmul,
    Both,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BenchSize {
    Small,
    Medium,
    Tiny,
}

/// Peak resident memory of this process (`VmHWM`, bytes); `None` where `/proc` does not say.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak to the current resident size (Linux: `clear_refs` value 5), so that each
/// row reports its own peak. Returns whether it worked.
fn reset_peak_rss() -> bool {
    // Hand freed heap memory (the random weights' construction leaves plenty) back to the
    // system first, so that the peak counts what is in use.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Read bandwidth of main memory in bytes/s: every thread sums its share of an array of `mib`
/// MiB; best of 5 passes after one warm-up pass.
fn memory_bandwidth(mib: usize) -> f64 {
    let n = mib * (1 << 20) / 4;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let chunk = n
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1 << 16);
    let pass = || {
        let t = Instant::now();
        let s: f32 = data
            .par_chunks(chunk)
            .map(|c| {
                let mut acc = [0f32; 8];
                for v in c.chunks_exact(8) {
                    for j in 0..8 {
                        acc[j] += v[j];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        t.elapsed().as_secs_f64()
    };
    pass();
    let best = (0..5).map(|_| pass()).fold(f64::INFINITY, f64::min);
    (n * 4) as f64 / best
}

/// Read bandwidth of a device's memory in bytes/s: a sum over an array of `mib` MiB on the
/// device, best of 5 after one warm-up pass (each pass ends when the scalar reaches the host).
fn device_bandwidth(device: &Device, mib: usize) -> anyhow::Result<f64> {
    let n = mib * (1 << 20) / 4;
    let data = Tensor::ones(n, DType::F32, device)?;
    let pass = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let s: f32 = data.sum_all()?.to_scalar()?;
        std::hint::black_box(s);
        Ok(t.elapsed().as_secs_f64())
    };
    pass()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        best = best.min(pass()?);
    }
    Ok((n * 4) as f64 / best)
}

struct Row {
    label: String,
    steps_per_s: f64,
    prefill_s: Option<f64>,
    weight_bytes: usize,
    /// Every weight held (see `Decoder::weight_bytes`).
    held_bytes: usize,
    /// Process CPU time per step (all threads), ms.
    cpu_ms: Option<f64>,
    peak: Option<u64>,
    /// Element type of the key/value cache.
    cache: DType,
}

pub fn run(args: &DecoderBenchArgs, device: BenchDevice) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps >= 1, "--decoder-steps must be at least 1");
    anyhow::ensure!(args.takes >= 1, "--decoder-takes must be at least 1");
    anyhow::ensure!(
        args.prompt_seconds.is_finite() && args.prompt_seconds >= 0.0,
        "--decoder-prompt-seconds must be a number >= 0"
    );
    let base = DecoderConfig::default();
    let cfg = match args.size {
        BenchSize::Small => base,
        BenchSize::Medium => DecoderConfig {
            hidden_size: 1536,
            num_hidden_layers: 48,
            num_attention_heads: 24,
            ffn_dim: 6144,
            ..base
        },
        BenchSize::Tiny => DecoderConfig {
            hidden_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            ffn_dim: 512,
            ..base
        },
    };
    let prompt_frames = (args.prompt_seconds * 50.0).round() as usize;
    anyhow::ensure!(
        prompt_frames + args.steps + 2 <= cfg.max_position_embeddings,
        "prompt and steps exceed the decoder's {} positions",
        cfg.max_position_embeddings
    );
    let (device, bw) = match device {
        BenchDevice::Cpu => {
            let threads = candle_core::utils::get_num_threads();
            println!(
                "decoder: random weights, {} layers, width {}, {} heads, FFN {}, {} codebooks, CPU ({threads} threads)",
                cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_dim, cfg.num_codebooks
            );
            let bw = memory_bandwidth(args.bandwidth_mib.max(1));
            println!(
                "  memory read bandwidth: {:.1} GB/s ({} MiB array, {} threads)",
                bw / 1e9,
                args.bandwidth_mib,
                rayon::current_num_threads()
            );
            (Device::Cpu, bw)
        }
        BenchDevice::Cuda => {
            let device = Device::new_cuda(0)
                .context("--device cuda needs a build with the `cuda` feature and a GPU")?;
            println!(
                "decoder: random weights, {} layers, width {}, {} heads, FFN {}, {} codebooks, CUDA device 0",
                cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_dim, cfg.num_codebooks
            );
            let bw = device_bandwidth(&device, args.bandwidth_mib.max(1))?;
            println!(
                "  device memory read bandwidth: {:.1} GB/s ({} MiB array, sum on the device)",
                bw / 1e9,
                args.bandwidth_mib
            );
            (device, bw)
        }
    };

    let mut rows = Vec::new();
    for &format in &args.formats {
        let kernels: &[(bool, &str)] = match (format, args.kernel) {
            (BenchFormat::F32 | BenchFormat::Q8_0, BenchKernel::Both) => {
                &[(true, ""), (false, ", candle")]
            }
            (BenchFormat::F32 | BenchFormat::Q8_0, BenchKernel::Matmul) => &[(false, ", candle")],
            _ => &[(true, "")],
        };
        let (dtype, quant) = format.split();
        let t0 = Instant::now();
        let mut decoder = match &args.checkpoint {
            None => {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
                Decoder::new_quantized(&cfg, vb.pp("decoder"), quant)
                    .with_context(|| format!("building the random {} decoder", format.label()))?
                // the varmap drops here: the decoder keeps (and has fused) what it needs
            }
            Some(path) => {
                // SAFETY: the file is not modified while it is mapped (read once, here).
                let vb = unsafe {
                    VarBuilder::from_mmaped_safetensors(std::slice::from_ref(path), dtype, &device)
                }
                .with_context(|| format!("reading {}", path.display()))?;
                Decoder::new_quantized(&cfg, vb, quant).with_context(|| {
                    format!(
                        "loading the {} decoder from {} (topology {:?})",
                        format.label(),
                        path.display(),
                        args.size
                    )
                })?
            }
        };
        match args.cache {
            BenchCache::Auto => {}
            BenchCache::F32 => decoder.set_cache_dtype(DType::F32)?,
            BenchCache::F16 => decoder.set_cache_dtype(DType::F16)?,
        }
        println!(
            "  {}: built in {:.1} s, key/value cache {:?}",
            format.label(),
            t0.elapsed().as_secs_f64(),
            decoder.cache_dtype()
        );
        for &(host, suffix) in kernels {
            decoder.set_host_kernels(host);
            let label = format!("{}{suffix}", format.label());
            rows.push(time_steps(&decoder, args, prompt_frames, &label)?);
        }
    }

    println!();
    println!(
        "| format | steps/s | ms/step | real time | prefill {:.0} s prompt | weights/step | floor steps/s | of floor | weights held | peak RSS | peak / held | CPU ms/step | cache |",
        args.prompt_seconds
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let floor = bw / r.weight_bytes as f64;
        let peak = r
            .peak
            .map_or("?".into(), |p| format!("{:.0} MB", p as f64 / 1e6));
        let ratio = r.peak.map_or("?".into(), |p| {
            format!("{:.2}", p as f64 / r.held_bytes as f64)
        });
        let prefill = r.prefill_s.map_or("-".into(), |s| format!("{s:.2} s"));
        let cpu = r.cpu_ms.map_or("?".into(), |c| format!("{c:.1}"));
        println!(
            "| {} | {:.2} | {:.1} | {:.3}× | {prefill} | {:.0} MB | {:.1} | {:.0}% | {:.0} MB | {peak} | {ratio} | {cpu} | {} |",
            r.label,
            r.steps_per_s,
            1000.0 / r.steps_per_s,
            r.steps_per_s / 50.0,
            r.weight_bytes as f64 / 1e6,
            floor,
            100.0 * r.steps_per_s / floor,
            r.held_bytes as f64 / 1e6,
            r.cache.as_str(),
        );
    }
    println!(
        "  batch {} (guidance on, {} take{}); real time = steps/s ÷ 50; floor = bandwidth ÷ weight bytes per step; peak RSS is the process's high-water mark from the row's start (reset per row{})",
        2 * args.takes,
        args.takes,
        if args.takes == 1 { "" } else { "s" },
        if reset_peak_rss() { "" } else { " not possible here: cumulative" }
    );
    Ok(())
}

fn time_steps(
    decoder: &Decoder,
    args: &DecoderBenchArgs,
    prompt_frames: usize,
    label: &str,
) -> anyhow::Result<Row> {
    let cfg = decoder.config();
    let device = decoder.device().clone();
    let takes = args.takes;
    let batch = 2 * takes;
    // Guidance on: conditional rows then null rows; a 12-token text condition.
    let cond_len = 12;
    let cond = Tensor::randn(0f32, 1.0, (batch, cond_len, cfg.hidden_size), &device)?;
    let mask: Vec<f32> = (0..batch)
        .flat_map(|b| (0..cond_len).map(move |_| if b < takes { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (batch, cond_len), &device)?;
    reset_peak_rss();
    let capacity = prompt_frames + 1 + args.steps + 1;
    let mut state = decoder.new_state(&cond, &mask, capacity)?;
    let k = cfg.num_codebooks;
    let ids = |width: usize, i: usize| {
        let v: Vec<u32> = (0..batch * k * width)
            .map(|j| ((i * 37 + j * 11) % cfg.vocab_size) as u32)
            .collect();
        Tensor::from_vec(v, (batch, k, width), &device)
    };
    // Token selection as the generation loop runs it (default sampling: guidance 3, top-k
    // 250), so that a step's time includes choosing its tokens.
    let mut selector = StepSelector::new(SamplingParams::default())?;
    let mut rngs: Vec<TakeRng> = (0..takes as u64).map(TakeRng::new).collect();
    let forced = vec![None; takes * k];
    let mut chosen = vec![0u32; takes * k];
    // Prefill: the start column and the prompt, as a continuation does.
    let t = Instant::now();
    let logits =
        decoder.forward_chunked(&mut state, &ids(prompt_frames + 1, 0)?, args.prefill_chunk)?;
    selector.select(&logits, takes, true, &forced, &mut rngs, &mut chosen)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let cpu0 = process_cpu_s();
    for i in 0..args.steps {
        let logits = decoder.forward(&mut state, &ids(1, i + 1)?)?;
        selector.select(&logits, takes, true, &forced, &mut rngs, &mut chosen)?;
    }
    let sps = args.steps as f64 / t.elapsed().as_secs_f64();
    let cpu_ms = cpu0
        .zip(process_cpu_s())
        .map(|(a, b)| 1000.0 * (b - a) / args.steps as f64);
    let row = Row {
        label: label.to_string(),
        steps_per_s: sps,
        prefill_s: (prompt_frames > 0).then_some(prefill),
        weight_bytes: decoder.step_weight_bytes(),
        held_bytes: decoder.weight_bytes(),
        cpu_ms,
        peak: peak_rss(),
        cache: decoder.cache_dtype(),
    };
    if let Some(cpu) = cpu_ms {
        println!("  {label}: CPU time {cpu:.1} ms per step (all threads)");
    }
    println!(
        "  {label}: {:.2} steps/s, prefill {:.2} s ({} positions), {:.0} MB of weights per step",
        sps,
        prefill,
        prompt_frames + 1,
        row.weight_bytes as f64 / 1e6
    );
    Ok(row)
}
