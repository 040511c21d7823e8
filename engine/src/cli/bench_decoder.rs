//! Decoder section of `segue bench`: a random-weight decoder of the musicgen-small topology (no
//! download), guidance on (batch 2), timed per step.

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use segue_engine::decoder::{Decoder, DecoderConfig};

#[derive(clap::Args)]
pub struct DecoderBenchArgs {
    /// Decoder steps to time (after one warm-up step).
    #[arg(long = "decoder-steps", default_value_t = 50)]
    pub steps: usize,
    /// Weight and compute dtype of the decoder.
    #[arg(long = "decoder-dtype", value_enum, default_value = "f32")]
    pub dtype: BenchDtype,
    /// Takes generated together (the decoder batch is twice this with guidance).
    #[arg(long = "decoder-takes", default_value_t = 1)]
    pub takes: usize,
    /// Per-step products: the host kernel (default), candle's matmul, or both one after the
    /// other.
    #[arg(long = "decoder-kernel", value_enum, default_value = "host")]
    pub kernel: BenchKernel,
    /// Topology: small (24 layers, width 1024) or medium (48 layers, width 1536).
    #[arg(long = "decoder-size", value_enum, default_value = "small")]
    pub size: BenchSize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BenchDtype {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKernel {
    Host,
    Matmul,
    Both,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BenchSize {
    Small,
    Medium,
}

pub fn run(args: &DecoderBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps >= 1, "--decoder-steps must be at least 1");
    anyhow::ensure!(args.takes >= 1, "--decoder-takes must be at least 1");
    let dtype = match args.dtype {
        BenchDtype::F32 => DType::F32,
        BenchDtype::F16 => DType::F16,
        BenchDtype::Bf16 => DType::BF16,
    };
    let cfg = match args.size {
        BenchSize::Small => DecoderConfig::default(),
        BenchSize::Medium => DecoderConfig {
            hidden_size: 1536,
            num_hidden_layers: 48,
            num_attention_heads: 24,
            ffn_dim: 6144,
            ..DecoderConfig::default()
        },
    };
    let device = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "decoder: random weights, {} layers, width {}, {} heads, FFN {}, {} codebooks, {:?}, CPU ({threads} threads)",
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_dim, cfg.num_codebooks, dtype
    );
    let t0 = Instant::now();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &device);
    let mut decoder =
        Decoder::new(&cfg, vb.pp("decoder")).context("building the random decoder")?;
    drop(varmap); // the decoder keeps (and has fused) what it needs
    println!("  built in {:.1} s", t0.elapsed().as_secs_f64());

    // Guidance on: conditional rows then null rows; a 12-token text condition.
    let takes = args.takes;
    let batch = 2 * takes;
    let cond_len = 12;
    let cond = Tensor::randn(0f32, 1.0, (batch, cond_len, cfg.hidden_size), &device)?;
    let mask: Vec<f32> = (0..batch)
        .flat_map(|b| (0..cond_len).map(move |_| if b < takes { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (batch, cond_len), &device)?;
    let kernels: &[(bool, &str)] = match args.kernel {
        BenchKernel::Host => &[(true, "host kernel")],
        BenchKernel::Matmul => &[(false, "candle matmul")],
        BenchKernel::Both => &[(true, "host kernel"), (false, "candle matmul")],
    };
    for &(host, label) in kernels {
        decoder.set_host_kernels(host);
        time_steps(&decoder, &cond, &mask, args, dtype, label)?;
    }
    Ok(())
}

fn time_steps(
    decoder: &Decoder,
    cond: &Tensor,
    mask: &Tensor,
    args: &DecoderBenchArgs,
    dtype: DType,
    label: &str,
) -> anyhow::Result<()> {
    let cfg = decoder.config();
    let device = decoder.device().clone();
    let takes = args.takes;
    let batch = 2 * takes;
    let capacity = args.steps + 2;
    let mut state = decoder.new_state(cond, mask, capacity)?;
    let k = cfg.num_codebooks;
    let step_ids = |i: usize| {
        Tensor::from_vec(
            vec![((i * 37) % cfg.vocab_size) as u32; batch * k],
            (batch, k, 1),
            &device,
        )
    };
    decoder.forward(&mut state, &step_ids(0)?)?; // warm-up (the start column)
    let t = Instant::now();
    for i in 0..args.steps {
        let logits = decoder.forward(&mut state, &step_ids(i + 1)?)?;
        // What the generation loop does with them: copy to the host.
        let _host: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    }
    let secs = t.elapsed().as_secs_f64();
    let sps = args.steps as f64 / secs;
    let bytes = cfg.step_weight_elements() * dtype.size_in_bytes();
    println!(
        "  {label}: {} steps, batch {batch} (guidance on, {takes} take{}): {:.2} steps/s, {:.1} ms/step, real-time factor {:.3} (50 steps = 1 s)",
        args.steps,
        if takes == 1 { "" } else { "s" },
        sps,
        1000.0 / sps,
        sps / 50.0
    );
    println!(
        "  weights read per step: {:.0} MB, effective {:.1} GB/s",
        bytes as f64 / 1e6,
        bytes as f64 * sps / 1e9
    );
    Ok(())
}
