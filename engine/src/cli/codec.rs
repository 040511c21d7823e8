//! `segue encode` / `segue decode` (in progress).

#[derive(clap::Args)]
pub struct EncodeArgs {}

#[derive(clap::Args)]
pub struct DecodeArgs {}

pub fn encode(_args: EncodeArgs) -> anyhow::Result<()> {
    anyhow::bail!("encode: not implemented yet")
}

pub fn decode(_args: DecodeArgs) -> anyhow::Result<()> {
    anyhow::bail!("decode: not implemented yet")
}
