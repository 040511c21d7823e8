//! `segue generate` run as the real binary on the fixture checkpoints: outputs, and every bad
//! input ending in a clear error, a non-zero exit, no panic and no output file.

use std::path::{Path, PathBuf};
use std::process::Command;

use segue_engine::audio::{read_wav, write_wav_f32, Audio};
use segue_engine::codec::CodesFile;

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("tiny-musicgen-{name}"))
        .display()
        .to_string()
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stderr: String,
}

fn segue(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segue"));
    cmd.arg("generate").args(args);
    // No network in tests: a Hub id must fail fast, never hang.
    cmd.env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Fails with exit code 1 (ours) or 2 (usage), an error line containing `needle`, no panic,
/// and leaves `out` unwritten.
fn assert_fails(run: &Run, needle: &str, out: &Path) {
    assert!(!run.ok, "expected failure, stderr: {}", run.stderr);
    assert!(
        matches!(run.code, Some(1) | Some(2)),
        "exit code {:?}",
        run.code
    );
    assert!(!run.stderr.contains("panicked"), "panic: {}", run.stderr);
    assert!(
        run.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr lacks {needle:?}: {}",
        run.stderr
    );
    assert!(!out.exists(), "{} was written", out.display());
}

#[test]
fn takes_codes_and_prompt_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("take.wav");
    let codes = tmp.path().join("codes.json");
    let m = model("stereo");
    let args = [
        "--model",
        &m,
        "--prompt",
        "calm lo-fi piano",
        "--frames",
        "20",
        "--takes",
        "2",
        "--seed",
        "11",
        "--out",
        p(&out),
        "--codes-out",
        p(&codes),
    ];
    let run = segue(&args, &[]);
    assert!(run.ok, "{}", run.stderr);
    let take1 = tmp.path().join("take-1.wav");
    let t1 = read_wav(&take1).unwrap();
    let t2 = read_wav(&tmp.path().join("take-2.wav")).unwrap();
    assert!(!out.exists());
    assert_eq!(
        (t1.sample_rate, t1.channels.len(), t1.frames()),
        (32_000, 2, 20 * 640)
    );
    assert_ne!(t1, t2, "takes with different seeds");
    let c1 = CodesFile::read(&tmp.path().join("codes-1.json")).unwrap();
    assert_eq!(
        (
            c1.frame_rate,
            c1.prompt_frames,
            c1.num_codebooks(),
            c1.frames()
        ),
        (50, 0, 8, 20)
    );

    // The same seed again gives the same audio.
    let again = tmp.path().join("again.wav");
    let args = [
        "--model",
        &m,
        "--prompt",
        "calm lo-fi piano",
        "--frames",
        "20",
        "--seed",
        "11",
        "--out",
        p(&again),
    ];
    assert!(segue(&args, &[]).ok);
    assert_eq!(read_wav(&again).unwrap(), t1);

    // Continue take 1 (stereo audio into a mono model: mixed down), prompt included.
    let cont = tmp.path().join("cont.wav");
    let cont_codes = tmp.path().join("cont.json");
    let m = model("mono");
    let args = [
        "--model",
        &m,
        "--input",
        p(&take1),
        "--duration",
        "0.2",
        "--greedy",
        "--include-prompt",
        "--out",
        p(&cont),
        "--codes-out",
        p(&cont_codes),
    ];
    let run = segue(&args, &[]);
    assert!(run.ok, "{}", run.stderr);
    let c = CodesFile::read(&cont_codes).unwrap();
    assert_eq!(
        (c.prompt_frames, c.frames(), c.num_codebooks()),
        (20, 30, 4)
    );
    let a = read_wav(&cont).unwrap();
    assert_eq!((a.channels.len(), a.frames()), (1, 30 * 640));
    // Without --include-prompt only the 10 new frames.
    let new_only = tmp.path().join("new.wav");
    let args = [
        "--model",
        &m,
        "--input",
        p(&take1),
        "--frames",
        "10",
        "--greedy",
        "--out",
        p(&new_only),
    ];
    assert!(segue(&args, &[]).ok);
    let n = read_wav(&new_only).unwrap();
    assert_eq!(n.frames(), 10 * 640);
    assert_eq!(n.channels[0][..], a.channels[0][20 * 640..]);
}

#[test]
fn overlong_text_is_truncated_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.wav");
    let text = "piano ".repeat(700);
    let m = model("mono");
    let run = segue(
        &[
            "--model",
            &m,
            "--prompt",
            &text,
            "--frames",
            "2",
            "--out",
            p(&out),
        ],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stderr.contains("warning") && run.stderr.contains("truncated"),
        "{}",
        run.stderr
    );
    assert!(out.exists());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never.wav");
    let o = p(&out);
    let m = model("mono");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--model", &m, "--prompt", "piano", "--out", o]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run_with = |extra: &[&str]| {
        let args = base(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        segue(&refs, &[])
    };

    assert_fails(&run_with(&["--frames", "5", "--top-k", "0"]), "top-k", &out);
    assert_fails(
        &run_with(&["--frames", "5", "--temperature", "-1"]),
        "temperature",
        &out,
    );
    assert_fails(
        &run_with(&["--frames", "5", "--temperature", "0"]),
        "temperature",
        &out,
    );
    assert_fails(
        &run_with(&["--frames", "5", "--top-p", "1.5"]),
        "top-p",
        &out,
    );
    assert_fails(&run_with(&["--frames", "5", "--top-p", "0"]), "top-p", &out);
    assert_fails(
        &run_with(&["--frames", "5", "--cfg", "0.5"]),
        "guidance",
        &out,
    );
    assert_fails(&run_with(&["--frames", "5", "--takes", "0"]), "takes", &out);
    assert_fails(&run_with(&["--duration", "-2"]), "duration", &out);
    assert_fails(&run_with(&["--frames", "0"]), "frames", &out);
    assert_fails(&run_with(&[]), "--duration", &out);
    assert_fails(
        &run_with(&["--frames", "5", "--duration", "1"]),
        "cannot be used with",
        &out,
    );
    assert_fails(
        &run_with(&["--frames", "5", "--greedy", "--top-k", "5"]),
        "cannot be used with",
        &out,
    );
    assert_fails(&run_with(&["--duration", "1201"]), "at most 1200", &out);
    assert_fails(
        &run_with(&["--frames", "5", "--window", "31"]),
        "longer than this model allows",
        &out,
    );
    assert_fails(
        &run_with(&["--frames", "5", "--window", "10", "--stride", "10"]),
        "stride",
        &out,
    );
    assert_fails(
        &run_with(&["--frames", "5", "--stride", "-1"]),
        "stride",
        &out,
    );
    assert_fails(
        &run_with(&["--frames", "5", "--stream", "--include-prompt"]),
        "cannot be used with",
        &out,
    );

    // Unreadable WAV.
    let bad = tmp.path().join("bad.wav");
    std::fs::write(&bad, b"this is not audio").unwrap();
    assert_fails(
        &run_with(&["--frames", "5", "--input", p(&bad)]),
        "bad.wav",
        &out,
    );
    assert_fails(
        &run_with(&["--frames", "5", "--input", "/no/such/file.wav"]),
        "file.wav",
        &out,
    );

    // Prompt audio longer than one window (30 s) is cut to its most recent part that fits.
    let long = tmp.path().join("long.wav");
    write_wav_f32(
        &long,
        &Audio {
            sample_rate: 32_000,
            channels: vec![(0..32_000 * 31)
                .map(|i| (i as f32 * 0.01).sin() * 0.3)
                .collect()],
        },
    )
    .unwrap();
    let cut = tmp.path().join("cut.wav");
    let args = base(&["--frames", "5", "--input", p(&long), "--include-prompt"]);
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let at = refs.iter().position(|a| *a == o).unwrap();
    refs[at] = p(&cut);
    let run = segue(&refs, &[]);
    assert!(run.ok, "{}", run.stderr);
    // 1495 frames of prompt (the window less the 5 new ones), then 5 new.
    assert_eq!(read_wav(&cut).unwrap().frames(), 1500 * 640);

    // Unknown model: a missing folder, and a Hub id with no network and no cache.
    let args = ["--model", "/no/such/model", "--frames", "5", "--out", o];
    assert_fails(&segue(&args, &[]), "/no/such/model", &out);
    let cache = tmp.path().join("hf");
    let args = [
        "--model",
        "facebook/musicgen-small",
        "--frames",
        "5",
        "--out",
        o,
    ];
    let run = segue(&args, &[("HF_HOME", p(&cache)), ("HF_HUB_OFFLINE", "1")]);
    assert_fails(&run, "musicgen-small", &out);
    assert!(
        run.stderr.contains("folder"),
        "says how to place the files by hand: {}",
        run.stderr
    );
}

#[test]
fn a_gpu_request_runs_on_the_gpu_or_falls_back_to_the_cpu_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.wav");
    let m = model("mono");
    let run = segue(
        &[
            "--model",
            &m,
            "--device",
            "cuda",
            "--frames",
            "3",
            "--greedy",
            "--out",
            p(&out),
        ],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    let warned = run.stderr.contains("warning") && run.stderr.contains("CPU");
    // Builds without the `cuda` feature, and machines without a GPU, must say so and go on.
    assert_eq!(
        warned,
        !candle_core::utils::cuda_is_available(),
        "{}",
        run.stderr
    );
    assert_eq!(read_wav(&out).unwrap().frames(), 3 * 640);
}

/// Longer than one window (30 s): two windows, one continuous take of the requested length;
/// `--stream` writes the same file and reports the time to the first audible chunk.
#[test]
fn long_durations_and_streaming() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("mono");
    let gen = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--model",
            &m,
            "--prompt",
            "calm lo-fi piano",
            "--seed",
            "9",
            "--out",
            p(out),
        ];
        args.extend_from_slice(extra);
        let run = segue(&args, &[]);
        assert!(run.ok, "{}", run.stderr);
        run
    };
    let plain = tmp.path().join("plain.wav");
    let streamed = tmp.path().join("streamed.wav");
    gen(&plain, &["--duration", "40"]);
    let run = gen(&streamed, &["--duration", "40", "--stream"]);
    assert!(run.stderr.contains("first audible chunk"), "{}", run.stderr);
    let a = read_wav(&plain).unwrap();
    assert_eq!((a.channels.len(), a.frames()), (1, 40 * 50 * 640));
    assert!(a.channels[0].iter().all(|s| s.is_finite()));
    assert_eq!(
        read_wav(&streamed).unwrap(),
        a,
        "--stream wrote other audio"
    );

    // A short take: streamed chunks match the one-shot decode below -60 dB.
    let plain = tmp.path().join("short.wav");
    let streamed = tmp.path().join("short-streamed.wav");
    gen(&plain, &["--frames", "180"]);
    gen(&streamed, &["--frames", "180", "--stream"]);
    let (a, b) = (read_wav(&plain).unwrap(), read_wav(&streamed).unwrap());
    assert_eq!(a.frames(), b.frames());
    let rms = (a.channels[0].iter().map(|x| x * x).sum::<f32>() / a.frames() as f32).sqrt();
    let err = a.channels[0]
        .iter()
        .zip(&b.channels[0])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        20.0 * (err.max(1e-30) / rms).log10() < -60.0,
        "error {err}, rms {rms}"
    );

    // --window and --stride: 3 s windows striding 2 s make 7 windows of one continuous take.
    let small = tmp.path().join("small.wav");
    gen(
        &small,
        &["--duration", "15", "--window", "3", "--stride", "2"],
    );
    assert_eq!(read_wav(&small).unwrap().frames(), 15 * 50 * 640);
}
