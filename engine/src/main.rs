//! The `segue` command-line program: encode/decode audio with EnCodec, generate with
//! MusicGen, and benchmark. Errors are reported as one line on stderr with a non-zero exit.

mod cli;

fn main() -> std::process::ExitCode {
    cli::run()
}
