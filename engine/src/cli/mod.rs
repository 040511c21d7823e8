//! Argument parsing and dispatch for the `segue` CLI. Each subcommand lives in its own
//! module; they share the engine library, never each other.

use clap::{Parser, Subcommand};

mod bench;
mod bench_codec;
mod bench_decoder;
mod codec;
mod generate;

#[derive(Parser)]
#[command(
    name = "segue",
    version,
    about = "MusicGen inference: encode, decode, generate, bench"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode a WAV file into EnCodec codes (JSON).
    Encode(codec::EncodeArgs),
    /// Decode EnCodec codes (JSON) into a 32 kHz WAV file.
    Decode(codec::DecodeArgs),
    /// Generate music from text and/or an audio prompt.
    Generate(generate::GenerateArgs),
    /// Benchmark the decoder and codec on random-weight checkpoints (no download).
    Bench(bench::BenchArgs),
}

/// Parses the command line, runs the subcommand and turns any error into one line on
/// stderr and exit code 1 (clap's own usage errors exit with 2).
pub fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Encode(args) => codec::encode(args),
        Command::Decode(args) => codec::decode(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
