//! `segue encode` / `segue decode` run as the real binary on the fixture checkpoints.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use segue_engine::audio::{read_wav, write_wav_f32, Audio};
use segue_engine::codec::{load_safetensors, CodesFile};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn mono_model() -> String {
    fixtures().join("tiny-musicgen-mono").display().to_string()
}

fn stereo_model() -> String {
    fixtures()
        .join("tiny-musicgen-stereo")
        .display()
        .to_string()
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stderr: String,
}

fn segue(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_segue"))
        .args(args)
        // No network here: a Hub id must fail fast, never hang.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Item `b` of a (batch, channels, samples) reference tensor as planar audio.
fn item(t: &Tensor, b: usize, rate: u32) -> Audio {
    Audio {
        sample_rate: rate,
        channels: t.get(b).unwrap().to_vec2::<f32>().unwrap(),
    }
}

fn codes_of(t: &Tensor, b: usize) -> Vec<Vec<u32>> {
    t.get(b)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|c| c as u32).collect())
        .collect()
}

fn assert_audio_close(got: &Audio, want: &Audio) {
    assert_eq!(got.sample_rate, want.sample_rate);
    assert_eq!(got.channels.len(), want.channels.len());
    let peak = want
        .channels
        .iter()
        .flatten()
        .fold(0f32, |m, s| m.max(s.abs()));
    for (g, w) in got.channels.iter().zip(&want.channels) {
        assert_eq!(g.len(), w.len());
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * peak, "max error {err} vs peak {peak}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn encode_and_decode_match_reference_mono_and_stereo() {
    let dir = tempfile::tempdir().unwrap();
    for (model, reference, channels) in [
        (mono_model(), "codec_mono.safetensors", 1),
        (stereo_model(), "codec_stereo.safetensors", 2),
    ] {
        let r =
            load_safetensors(&fixtures().join("reference").join(reference), &Device::Cpu).unwrap();
        let wav = dir.path().join(format!("in{channels}.wav"));
        write_wav_f32(&wav, &item(&r["input_audio"], 1, 32_000)).unwrap();
        let codes = dir.path().join(format!("codes{channels}.json"));
        let run = segue(&[
            "encode",
            "--model",
            &model,
            "--input",
            s(&wav),
            "--codes-out",
            s(&codes),
        ]);
        assert!(run.ok, "{}", run.stderr);
        let file = CodesFile::read(&codes).unwrap();
        assert_eq!(file.frame_rate, 50);
        assert_eq!(file.prompt_frames, 0);
        assert_eq!(file.codes, codes_of(&r["codes"], 1));

        let out = dir.path().join(format!("out{channels}.wav"));
        let run = segue(&[
            "decode",
            "--model",
            &model,
            "--codes",
            s(&codes),
            "--out",
            s(&out),
        ]);
        assert!(run.ok, "{}", run.stderr);
        let spec = hound::WavReader::open(&out).unwrap().spec();
        assert_eq!(spec.sample_format, hound::SampleFormat::Float);
        assert_eq!(spec.bits_per_sample, 32);
        assert_eq!(spec.channels as usize, channels);
        assert_audio_close(
            &read_wav(&out).unwrap(),
            &item(&r["decoded_audio"], 1, 32_000),
        );
    }
}

#[test]
fn any_rate_and_channel_count_is_converted() {
    let dir = tempfile::tempdir().unwrap();
    // 1 s of 3-channel 44.1 kHz audio, 16-bit.
    let wav = dir.path().join("in.wav");
    let spec = hound::WavSpec {
        channels: 3,
        sample_rate: 44_100,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&wav, spec).unwrap();
    for i in 0..44_100 {
        for c in 0..3 {
            let x = (i as f32 * 0.01 * (c + 1) as f32).sin() * 8000.0;
            w.write_sample(x as i16).unwrap();
        }
    }
    w.finalize().unwrap();
    for (model, rows) in [(mono_model(), 4), (stereo_model(), 8)] {
        let codes = dir.path().join(format!("c{rows}.json"));
        let run = segue(&[
            "encode",
            "--model",
            &model,
            "--input",
            s(&wav),
            "--codes-out",
            s(&codes),
        ]);
        assert!(run.ok, "{}", run.stderr);
        let file = CodesFile::read(&codes).unwrap();
        assert_eq!(file.num_codebooks(), rows);
        assert_eq!(file.frames(), 50); // 32000 samples / 640
    }
}

/// Runs `args`, expecting failure with one `error:` line that contains every `want`, and that
/// `out` was not created.
fn expect_error(args: &[&str], wants: &[&str], out: &Path) {
    let run = segue(args);
    assert!(!run.ok, "{args:?} succeeded");
    assert_eq!(run.code, Some(1), "{args:?}: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one line: {}", run.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for w in wants {
        assert!(lines[0].contains(w), "{args:?}: {w:?} not in {}", lines[0]);
    }
    assert!(!lines[0].contains("panicked"));
    assert!(!out.exists(), "{} was written", out.display());
    // Nothing half-written next to it either.
    if let Some(parent) = out.parent().filter(|p| p.is_dir()) {
        for e in std::fs::read_dir(parent).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "temporary file {name} left behind");
        }
    }
}

#[test]
fn bad_inputs_give_one_clear_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let codes_out = d("codes.json");
    let model = mono_model();
    let encode = |input: &Path, wants: &[&str]| {
        expect_error(
            &[
                "encode",
                "--model",
                &model,
                "--input",
                s(input),
                "--codes-out",
                s(&codes_out),
            ],
            wants,
            &codes_out,
        )
    };

    encode(&d("missing.wav"), &["missing.wav"]);
    std::fs::write(d("text.wav"), "this is not a wav file").unwrap();
    encode(&d("text.wav"), &["text.wav", "not a WAV"]);
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 32_000,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    hound::WavWriter::create(d("empty.wav"), spec)
        .unwrap()
        .finalize()
        .unwrap();
    encode(&d("empty.wav"), &["empty.wav", "zero-length"]);
    let nan = Audio {
        sample_rate: 32_000,
        channels: vec![vec![f32::NAN; 1000]],
    };
    write_wav_f32(&d("nan.wav"), &nan).unwrap();
    encode(&d("nan.wav"), &["nan.wav", "not finite"]);

    // A model folder whose weights lack the codec.
    let good = Audio {
        sample_rate: 32_000,
        channels: vec![vec![0.1; 1000]],
    };
    write_wav_f32(&d("good.wav"), &good).unwrap();
    let broken = d("broken-model");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(
        fixtures().join("tiny-musicgen-mono/config.json"),
        broken.join("config.json"),
    )
    .unwrap();
    let one = std::collections::HashMap::from([(
        "decoder.model.decoder.layer_norm.weight".to_string(),
        Tensor::zeros(16, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&one, broken.join("model.safetensors")).unwrap();
    expect_error(
        &[
            "encode",
            "--model",
            s(&broken),
            "--input",
            s(&d("good.wav")),
            "--codes-out",
            s(&codes_out),
        ],
        &["missing tensor", "audio_encoder.encoder.layers.0.conv"],
        &codes_out,
    );
    expect_error(
        &[
            "encode",
            "--model",
            s(&d("no-model")),
            "--input",
            s(&d("good.wav")),
            "--codes-out",
            s(&codes_out),
        ],
        &["no-model", "does not exist"],
        &codes_out,
    );
    // A Hub id with no network and no cache.
    let run = Command::new(env!("CARGO_BIN_EXE_segue"))
        .args([
            "encode",
            "--model",
            "facebook/musicgen-small",
            "--input",
            s(&d("good.wav")),
            "--codes-out",
            s(&codes_out),
        ])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", dir.path().join("hf-home"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.contains("no network connection") && err.contains("no cached copy"),
        "{err}"
    );
    assert!(!codes_out.exists());

    // Decode errors.
    let wav_out = d("out.wav");
    let decode = |codes: &Path, wants: &[&str]| {
        expect_error(
            &[
                "decode",
                "--model",
                &model,
                "--codes",
                s(codes),
                "--out",
                s(&wav_out),
            ],
            wants,
            &wav_out,
        )
    };
    decode(&d("missing.json"), &["missing.json"]);
    decode(&d("text.wav"), &["text.wav", "not a codes file"]);
    let write = |name: &str, codes: Vec<Vec<u32>>| {
        let f = CodesFile {
            frame_rate: 50,
            prompt_frames: 0,
            codes,
        };
        f.write(&d(name)).unwrap();
        d(name)
    };
    decode(
        &write("three.json", vec![vec![1, 2]; 3]),
        &["three.json", "3 codebooks", "takes 4"],
    );
    decode(&write("eight.json", vec![vec![1, 2]; 8]), &["8 codebooks"]);
    let mut big = vec![vec![1u32, 2, 3]; 4];
    big[3][2] = 2048;
    decode(
        &write("big.json", big),
        &["big.json", "2048", "codebook 3", "frame 2"],
    );
    std::fs::write(
        d("ragged.json"),
        r#"{"frame_rate":50,"prompt_frames":0,"codes":[[1,2],[3],[4],[5]]}"#,
    )
    .unwrap();
    decode(&d("ragged.json"), &["ragged.json", "codebook 1"]);
    std::fs::write(
        d("rate.json"),
        r#"{"frame_rate":75,"prompt_frames":0,"codes":[[1],[2],[3],[4]]}"#,
    )
    .unwrap();
    decode(&d("rate.json"), &["rate.json", "frame_rate 75"]);
}

#[test]
fn bench_codec_runs_without_download() {
    // Full-size random-weight codec on a tenth of a second of audio: proves the benchmark
    // builds the real topology offline and reports both directions.
    let out = Command::new(env!("CARGO_BIN_EXE_segue"))
        .args([
            "bench",
            "--only",
            "codec",
            "--codec-seconds",
            "0.1",
            "--codec-runs",
            "1",
        ])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("full-size 32 kHz EnCodec"), "{stdout}");
    for what in ["codec encode: wall", "codec decode: wall"] {
        assert!(
            stdout.contains(what) && stdout.contains("x real time"),
            "{stdout}"
        );
    }
}
