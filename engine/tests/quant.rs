//! Quantised decoder weights (`--quant q8_0|q4k`) on the fixture checkpoints: first-step logits
//! against the reference (`engine/fixtures/reference/lm_*.safetensors`), the per-layer fallback
//! for widths off the quantisation block, and generation through the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use segue_engine::decoder::{Quant, WeightFormat};
use segue_engine::hub;
use segue_engine::model::Musicgen;

const PROMPTS: [&str; 2] = [
    "80s pop track with bassy drums and synth",
    "calm lo-fi piano",
];

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("tiny-musicgen-{name}"))
}

fn load(name: &str, quant: Option<Quant>) -> Musicgen {
    let dir = model_dir(name);
    let files = hub::resolve(dir.to_str().unwrap(), &mut |_| panic!("no download")).unwrap();
    Musicgen::load_with(&files, DType::F32, &Device::Cpu, quant).expect("fixture model loads")
}

/// Text-conditioned first-step logits (guidance batch: 2 conditional rows, 2 null rows).
fn first_step_logits(model: &Musicgen) -> Tensor {
    let dec = model.decoder();
    let k = dec.config().num_codebooks;
    let cond = model
        .text_encoder()
        .encode(&PROMPTS)
        .unwrap()
        .with_null()
        .unwrap();
    let mut state = dec.new_state(&cond.states, &cond.mask, 8).unwrap();
    let ids = Tensor::full(dec.config().bos_token_id, (4, k, 1), &Device::Cpu).unwrap();
    dec.forward(&mut state, &ids).unwrap()
}

/// max |got − want| / max |want|.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    diff / w.iter().map(|v| v.abs()).fold(0f32, f32::max)
}

fn reference_logits(name: &str) -> Tensor {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("fixtures/reference/lm_{name}.safetensors"));
    let mut r = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    r.remove("text_first_step_logits").unwrap()
}

/// The fixtures' widths: hidden 16 (off both blocks: stays f32), FFN 64 (fc2's input: a
/// multiple of Q8_0's 32 but not of Q4K's 256, so Q4K falls back to Q8_0 there).
#[test]
fn fixture_layers_fall_back_by_width_and_logits_stay_close() {
    let layers = 2;
    for name in ["mono", "stereo"] {
        let want = reference_logits(name);
        for quant in [Quant::Q8_0, Quant::Q4K] {
            let model = load(name, Some(quant));
            let formats = model.decoder().weight_formats();
            assert_eq!(formats.len(), layers * 7 + 1);
            for (i, f) in formats.iter().enumerate() {
                // fc2 is the 7th projection of each layer; the heads (last) read width 16.
                let expect = if i % 7 == 6 && i < layers * 7 {
                    WeightFormat::Quantized(Quant::Q8_0)
                } else {
                    WeightFormat::Dense(DType::F32)
                };
                assert_eq!(*f, expect, "{name} {quant}: projection {i}");
            }
            let got = first_step_logits(&model);
            let err = rel_err(&got, &want);
            println!("{name} {quant}: first-step logits, max abs error / max |logit| = {err:.2e}");
            assert!(err < 0.02, "{name} {quant}: relative error {err}");
            assert!(
                err > 0.0,
                "{name} {quant}: fc2 is quantised, so logits must move"
            );
        }
    }
}

fn segue(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segue"))
        .arg("generate")
        .args(args)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

#[test]
fn generate_cli_with_quantised_decoder_writes_audio() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_dir("mono").display().to_string();
    for quant in ["q8_0", "q4k"] {
        let out = tmp.path().join(format!("{quant}.wav"));
        let run = segue(&[
            "--model",
            &m,
            "--prompt",
            "calm lo-fi piano",
            "--frames",
            "12",
            "--seed",
            "3",
            "--quant",
            quant,
            "--out",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{quant}: {stderr}");
        let audio = segue_engine::audio::read_wav(&out).unwrap();
        assert_eq!(audio.sample_rate, 32000);
        assert_eq!(audio.channels.len(), 1);
        assert_eq!(audio.channels[0].len(), 12 * 640);
        assert!(audio.channels[0].iter().all(|v| v.is_finite()));
        assert!(audio.channels[0].iter().any(|&v| v != 0.0));
    }
    // Quantised weights compute in f32: half precision is refused before any work.
    let out = tmp.path().join("bad.wav");
    let run = segue(&[
        "--model",
        &m,
        "--frames",
        "4",
        "--quant",
        "q8_0",
        "--dtype",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("--quant"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn bench_decoder_table_has_every_format() {
    let out = Command::new(env!("CARGO_BIN_EXE_segue"))
        .args([
            "bench",
            "--only",
            "decoder",
            "--decoder-size",
            "tiny",
            "--decoder-steps",
            "2",
            "--decoder-prompt-seconds",
            "0.2",
            "--bandwidth-mib",
            "16",
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
    assert!(stdout.contains("memory read bandwidth"), "{stdout}");
    for format in ["f32", "bf16", "q8_0", "q4k"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {format} |")))
            .unwrap_or_else(|| panic!("no {format} row: {stdout}"));
        // steps/s, prefill and the fraction of the floor are numbers.
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells[2].parse::<f64>().unwrap() > 0.0, "{row}");
        assert!(cells[5].ends_with(" s"), "{row}");
        assert!(cells[8].ends_with('%'), "{row}");
    }
    // Quantised rows read fewer weight bytes than f32.
    let mb = |format: &str| -> f64 {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {format} |")))
            .unwrap();
        row.split('|')
            .nth(6)
            .unwrap()
            .trim()
            .trim_end_matches(" MB")
            .parse()
            .unwrap()
    };
    assert!(mb("q8_0") < mb("bf16") && mb("bf16") < mb("f32") && mb("q4k") < mb("q8_0"));
}
