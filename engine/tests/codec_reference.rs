//! EnCodec against the reference (`transformers` on the tiny fixture checkpoints; see
//! `engine/fixtures/README.md`): codes exactly equal, audio within 1e-4 of the reference's peak.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use segue_engine::codec::{load_safetensors, CheckpointCodec, CodecError, Config, Encodec};
use segue_engine::hub;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn load(checkpoint: &str) -> (CheckpointCodec, Encodec) {
    let files = hub::resolve(fixtures().join(checkpoint).to_str().unwrap(), &mut |_| {}).unwrap();
    CheckpointCodec::load(&files, &Device::Cpu).unwrap()
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    load_safetensors(&fixtures().join("reference").join(name), &Device::Cpu).unwrap()
}

fn codes_i64(t: &Tensor) -> Vec<Vec<Vec<i64>>> {
    t.to_dtype(DType::I64).unwrap().to_vec3::<i64>().unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `|got - want| <= tol * peak(want)` everywhere, with equal shapes.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let peak = max_abs(want);
    assert!(
        peak > 1e-3,
        "{what}: reference is (nearly) silent, the test would prove nothing"
    );
    let err = max_abs(&(got - want).unwrap());
    assert!(
        err <= tol * peak,
        "{what}: max error {err:e} > {tol:e} x peak {peak:e}"
    );
}

/// Codebooks `start, start + step, …` of (batch, K, frames).
fn every_other(codes: &Tensor, start: usize) -> Tensor {
    let k = codes.dim(1).unwrap();
    let ids: Vec<u32> = (start..k).step_by(2).map(|i| i as u32).collect();
    let n = ids.len();
    codes
        .index_select(&Tensor::from_vec(ids, n, &Device::Cpu).unwrap(), 1)
        .unwrap()
}

#[test]
fn config_of_the_fixture_and_of_the_real_model() {
    let (info, codec) = load("tiny-musicgen-mono");
    let cfg = codec.config();
    assert_eq!(info.channels, 1);
    assert_eq!(cfg.hop_length(), 640);
    assert_eq!(cfg.frame_rate(), 50.0);
    assert_eq!(cfg.num_quantizers(), 4);
    assert_eq!(cfg.num_codebooks(), 4);
    assert_eq!(cfg.codebook_dim(), 8);
    let (stereo, _) = load("tiny-musicgen-stereo");
    assert_eq!(stereo.channels, 2);

    let real = Config::musicgen_32khz();
    assert_eq!(real.num_quantizers_for_bandwidth(2.2), 4);
    assert_eq!(real.num_quantizers(), 4);
    // The trap: log2(codebook size) enters the count, a 16-entry codebook gives 11 at 2.2 kbps.
    let small = Config {
        codebook_size: 16,
        ..real.clone()
    };
    assert_eq!(small.num_quantizers_for_bandwidth(2.2), 11);
    assert_eq!(small.num_quantizers(), 11);
    // EnCodec 24 kHz defaults: 75 Hz, 1.5 kbps -> 2 codebooks, 24 kbps -> 32.
    let e24: Config = serde_json::from_str(r#"{"model_type": "encodec"}"#).unwrap();
    assert_eq!(e24.frame_rate(), 75.0);
    assert_eq!(e24.num_quantizers_for_bandwidth(1.5), 2);
    assert_eq!(e24.num_quantizers(), 32);
}

#[test]
fn mono_codes_and_audio_equal_reference() {
    // Both SEANet implementations: the CPU kernels (default on the CPU) and candle tensor ops.
    for host in [true, false] {
        mono_case(host);
    }
}

fn mono_case(host: bool) {
    let (_, mut codec) = load("tiny-musicgen-mono");
    codec.set_host_kernels(host);
    let r = reference("codec_mono.safetensors");
    let input = &r["input_audio"]; // (2, 1, 20000)

    let emb = codec.encoder_output(input).unwrap();
    assert_close("encoder output", &emb, &r["encoder_output"], 1e-4);

    let codes = codec.encode(input).unwrap();
    assert_eq!(codes.dims(), &[2, 4, 32]);
    assert_eq!(codes_i64(&codes), codes_i64(&r["codes"]), "codes differ");

    let q = codec.quantized(&r["codes"]).unwrap();
    assert_close("quantized", &q, &r["quantized"], 1e-6);

    let audio = codec.decode(&r["codes"]).unwrap();
    assert_eq!(audio.dims(), &[2, 1, 20480]);
    assert_close("decoded audio", &audio, &r["decoded_audio"], 1e-4);
    // u32 codes decode the same as the reference's i64 ones.
    let audio_u32 = codec.decode(&codes).unwrap();
    assert_close(
        "decoded audio (u32 codes)",
        &audio_u32,
        &r["decoded_audio"],
        1e-4,
    );
}

#[test]
fn stereo_codes_interleave_and_equal_reference() {
    for host in [true, false] {
        stereo_case(host);
    }
}

fn stereo_case(host: bool) {
    let (info, mut codec) = load("tiny-musicgen-stereo");
    codec.set_host_kernels(host);
    let r = reference("codec_stereo.safetensors");
    let input = &r["input_audio"]; // (2, 2, 20000)

    let left = input.narrow(1, 0, 1).unwrap();
    let right = input.narrow(1, 1, 1).unwrap();
    assert_close(
        "encoder output left",
        &codec.encoder_output(&left).unwrap(),
        &r["encoder_output_left"],
        1e-4,
    );
    assert_close(
        "encoder output right",
        &codec.encoder_output(&right).unwrap(),
        &r["encoder_output_right"],
        1e-4,
    );

    let codes = codec.encode_interleaved(input, info.channels).unwrap();
    assert_eq!(codes.dims(), &[2, 8, 32]);
    assert_eq!(codes_i64(&codes), codes_i64(&r["codes"]), "codes differ");
    // Even rows are the left channel's own codes.
    assert_eq!(
        codes_i64(&every_other(&codes, 0)),
        codes_i64(&codec.encode(&left).unwrap())
    );

    let ql = codec.quantized(&every_other(&r["codes"], 0)).unwrap();
    let qr = codec.quantized(&every_other(&r["codes"], 1)).unwrap();
    assert_close("quantized left", &ql, &r["quantized_left"], 1e-6);
    assert_close("quantized right", &qr, &r["quantized_right"], 1e-6);

    let audio = codec.decode_interleaved(&r["codes"], 2).unwrap();
    assert_eq!(audio.dims(), &[2, 2, 20480]);
    assert_close("decoded stereo audio", &audio, &r["decoded_audio"], 1e-4);
}

#[test]
fn hub_weight_norm_names_load_identically() {
    let (info, _) = load("tiny-musicgen-mono");
    let alt = fixtures().join("reference/codec_mono_alt_weightnorm.safetensors");
    let names = load_safetensors(&alt, &Device::Cpu).unwrap();
    assert!(names.keys().any(|k| k.ends_with(".conv.weight_g")));
    assert!(!names.keys().any(|k| k.contains("parametrizations")));
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[alt], DType::F32, &Device::Cpu) }.unwrap();
    let codec = Encodec::new(&info.config, vb.pp("audio_encoder")).unwrap();
    let r = reference("codec_mono.safetensors");
    let codes = codec.encode(&r["input_audio"]).unwrap();
    assert_eq!(codes_i64(&codes), codes_i64(&r["codes"]));
    let audio = codec.decode(&r["codes"]).unwrap();
    assert_close(
        "decoded audio (weight_g/weight_v)",
        &audio,
        &r["decoded_audio"],
        1e-4,
    );
}

fn codec_tensors() -> HashMap<String, Tensor> {
    load_safetensors(
        &fixtures().join("tiny-musicgen-mono/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .filter(|(k, _)| k.starts_with("audio_encoder."))
    .collect()
}

fn build(tensors: HashMap<String, Tensor>) -> Result<Encodec, CodecError> {
    let (info, _) = load("tiny-musicgen-mono");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Encodec::new(&info.config, vb.pp("audio_encoder"))
}

#[test]
fn missing_or_misshaped_tensors_are_named() {
    assert!(build(codec_tensors()).is_ok());

    let name = "audio_encoder.decoder.layers.1.lstm.weight_hh_l1";
    let mut t = codec_tensors();
    t.remove(name);
    let e = build(t).unwrap_err();
    assert!(
        matches!(&e, CodecError::MissingTensor { name: n, expected } if n == name && expected == &[128, 32]),
        "{e}"
    );
    assert!(e.to_string().contains(name), "{e}");

    let name = "audio_encoder.quantizer.layers.2.codebook.embed";
    let mut t = codec_tensors();
    t.insert(
        name.into(),
        Tensor::zeros((1024, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = build(t).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(name) && msg.contains("[1024, 16]") && msg.contains("[2048, 8]"),
        "{msg}"
    );

    // A weight-norm direction tensor of the wrong shape names it and both shapes.
    let name = "audio_encoder.encoder.layers.3.conv.parametrizations.weight.original1";
    let mut t = codec_tensors();
    t.insert(
        name.into(),
        Tensor::zeros((4, 2, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = build(t).unwrap_err().to_string();
    assert!(
        msg.contains(name) && msg.contains("[4, 2, 7]") && msg.contains("[4, 2, 8]"),
        "{msg}"
    );

    // Neither weight-norm naming present: both names are in the error.
    let mut t = codec_tensors();
    t.retain(|k, _| !k.starts_with("audio_encoder.encoder.layers.0.conv.parametrizations"));
    let msg = build(t).unwrap_err().to_string();
    assert!(
        msg.contains("audio_encoder.encoder.layers.0.conv.parametrizations.weight.original1")
            && msg.contains("audio_encoder.encoder.layers.0.conv.weight_v"),
        "{msg}"
    );
}

#[test]
fn decode_checks_codes() {
    let (_, codec) = load("tiny-musicgen-mono");
    let mut codes = vec![0u32; 4 * 5];
    codes[2 * 5 + 3] = 2048;
    let t = Tensor::from_vec(codes, (1, 4, 5), &Device::Cpu).unwrap();
    let e = codec.decode(&t).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::CodeOutOfRange {
                codebook: 2,
                frame: 3,
                code: 2048,
                codebook_size: 2048
            }
        ),
        "{e}"
    );
    let t = Tensor::zeros((1, 5, 5), DType::U32, &Device::Cpu).unwrap();
    assert!(codec
        .decode(&t)
        .unwrap_err()
        .to_string()
        .contains("5 codebooks"));
    let t = Tensor::zeros((1, 4, 0), DType::U32, &Device::Cpu).unwrap();
    assert!(codec.decode(&t).is_err());
    let t = Tensor::new(&[[[-1i64]]], &Device::Cpu).unwrap();
    assert!(codec
        .decode(&t)
        .unwrap_err()
        .to_string()
        .contains("negative"));
    let mut v = vec![0.1f32; 700];
    v[650] = f32::NAN;
    let a = Tensor::from_vec(v, (1, 1, 700), &Device::Cpu).unwrap();
    assert!(codec.encode(&a).unwrap_err().to_string().contains("NaN"));
    let a = Tensor::zeros((1, 2, 100), DType::F32, &Device::Cpu).unwrap();
    assert!(codec
        .encode(&a)
        .unwrap_err()
        .to_string()
        .contains("2 channels"));
}

#[test]
fn any_run_of_frames_decodes() {
    // Streaming decodes windows of frames; every length, down to one frame, must work
    // (the reflect padding's short-input rule kicks in at the smallest sizes).
    let (_, codec) = load("tiny-musicgen-mono");
    let r = reference("codec_mono.safetensors");
    let mut tensor_ops = codec.clone();
    tensor_ops.set_host_kernels(false);
    for (start, len) in [(0, 1), (5, 2), (10, 3), (31, 1), (7, 17)] {
        let slice = r["codes"].narrow(D::Minus1, start, len).unwrap();
        let audio = codec.decode(&slice).unwrap();
        assert_eq!(audio.dims(), &[2, 1, len * 640]);
        assert!(max_abs(&audio).is_finite() && max_abs(&audio) > 0.0);
        // The two implementations agree on the short-input padding rule too.
        assert_close(
            "slice decode",
            &audio,
            &tensor_ops.decode(&slice).unwrap(),
            1e-5,
        );
    }
    // Encoding short input: one sample up to one hop gives one frame.
    for n in [1, 2, 7, 639, 640, 641] {
        let a = r["input_audio"].narrow(D::Minus1, 0, n).unwrap();
        let codes = codec.encode(&a).unwrap();
        assert_eq!(codes.dim(2).unwrap(), n.div_ceil(640), "{n} samples");
        let emb = codec.encoder_output(&a).unwrap();
        assert_close(
            "short encode",
            &emb,
            &tensor_ops.encoder_output(&a).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn normalize_divides_by_rms_and_decode_restores_it() {
    let (info, _) = load("tiny-musicgen-mono");
    let plain = Encodec::new(
        &info.config,
        VarBuilder::from_tensors(codec_tensors(), DType::F32, &Device::Cpu).pp("audio_encoder"),
    )
    .unwrap();
    let cfg = Config {
        normalize: true,
        ..info.config.clone()
    };
    let norm = Encodec::new(
        &cfg,
        VarBuilder::from_tensors(codec_tensors(), DType::F32, &Device::Cpu).pp("audio_encoder"),
    )
    .unwrap();
    let r = reference("codec_mono.safetensors");
    let x = &r["input_audio"];
    let (codes, scale) = norm.encode_with_scale(x).unwrap();
    let scale = scale.expect("normalize gives a scale");
    // scale = rms + 1e-8 per item.
    let rms = x
        .sqr()
        .unwrap()
        .mean_keepdim(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_close("scale", &scale, &(rms + 1e-8).unwrap(), 1e-6);
    // The normalised codec encodes x exactly as the plain one encodes x / scale.
    let scaled = x.broadcast_div(&scale.reshape((2, 1, 1)).unwrap()).unwrap();
    assert_eq!(
        codes_i64(&codes),
        codes_i64(&plain.encode(&scaled).unwrap())
    );
    // And decoding multiplies by the scale again.
    let back = norm.decode_with_scale(&codes, Some(&scale)).unwrap();
    let want = plain
        .decode(&codes)
        .unwrap()
        .broadcast_mul(&scale.reshape((2, 1, 1)).unwrap())
        .unwrap();
    assert_close("rescaled decode", &back, &want, 1e-6);
    assert!(plain.encode_with_scale(x).unwrap().1.is_none());
}
