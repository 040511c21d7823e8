//! EnCodec section of `segue bench` (in progress).

#[derive(clap::Args)]
pub struct CodecBenchArgs {}

pub fn run(_args: &CodecBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("codec bench: not implemented yet")
}
