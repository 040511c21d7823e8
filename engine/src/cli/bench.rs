//! `segue bench`: performance figures on random-weight checkpoints of the real topologies,
//! no download needed. The codec and decoder sections live in their own modules.

use super::{bench_codec, bench_decoder};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which part to benchmark.
    #[arg(long, value_enum, default_value = "all")]
    pub only: BenchPart,
    /// Where the decoder runs (the codec section always runs on the CPU). `cuda` needs a
    /// build with the `cuda` feature.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: BenchDevice,
    #[command(flatten)]
    pub codec: bench_codec::CodecBenchArgs,
    #[command(flatten)]
    pub decoder: bench_decoder::DecoderBenchArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPart {
    All,
    Codec,
    Decoder,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if matches!(args.only, BenchPart::All | BenchPart::Codec) {
        bench_codec::run(&args.codec)?;
    }
    if matches!(args.only, BenchPart::All | BenchPart::Decoder) {
        bench_decoder::run(&args.decoder, args.device)?;
    }
    Ok(())
}
