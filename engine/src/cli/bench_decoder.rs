//! Decoder section of `segue bench` (in progress).

#[derive(clap::Args)]
pub struct DecoderBenchArgs {}

pub fn run(_args: &DecoderBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("decoder bench: not implemented yet")
}
