//! The text encoder, decoder and generation loop against the reference (`transformers`)
//! outputs in `engine/fixtures/reference/lm_{mono,stereo}.safetensors` (see
//! `engine/fixtures/README.md` for what each tensor is and the script that made it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use segue_engine::generate::{
    generate_codes, CodesRequest, Condition, Control, GenerateError, StepInfo,
};
use segue_engine::hub;
use segue_engine::model::Musicgen;
use segue_engine::pattern::{codebook_delays, forced_token, sequence_len, FREE};
use segue_engine::sampling::SamplingParams;
use segue_engine::text::TextCondition;

const PROMPTS: [&str; 2] = [
    "80s pop track with bassy drums and synth",
    "calm lo-fi piano",
];
const NEW_FRAMES: usize = 30;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn load_model(name: &str, dtype: DType) -> Musicgen {
    let dir = fixtures().join(format!("tiny-musicgen-{name}"));
    let files = hub::resolve(dir.to_str().unwrap(), &mut |_| panic!("no download")).unwrap();
    Musicgen::load(&files, dtype, &Device::Cpu).expect("fixture model loads")
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(format!("reference/lm_{name}.safetensors"));
    candle_core::safetensors::load(path, &Device::Cpu).expect("reference tensors load")
}

fn codes3(t: &Tensor) -> Vec<Vec<Vec<u32>>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec3::<i64>()
        .unwrap()
        .into_iter()
        .map(|b| {
            b.into_iter()
                .map(|r| r.into_iter().map(|v| v as u32).collect())
                .collect()
        })
        .collect()
}

/// Largest absolute difference between two float tensors of the same shape.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn greedy_request(condition: Condition, prompt: Vec<Vec<Vec<u32>>>) -> CodesRequest {
    let rows = condition.rows();
    CodesRequest {
        condition,
        prompt,
        new_frames: NEW_FRAMES,
        sampling: SamplingParams::greedy(3.0),
        seeds: vec![0; rows],
    }
}

fn texts() -> Condition {
    Condition::Text(PROMPTS.iter().map(|s| s.to_string()).collect())
}

fn no_callback() -> impl FnMut(&StepInfo) -> Control {
    |_| Control::Continue
}

/// Token ids, mask, T5 output and projection, and the guidance layout of the condition.
fn check_text_encoder(name: &str) {
    let model = load_model(name, DType::F32);
    let r = reference(name);
    let ids = r["input_ids"].to_vec2::<i64>().unwrap();
    let mask = r["attention_mask"].to_vec2::<i64>().unwrap();
    let t5_ref = &r["text_encoder_last_hidden_state"];
    let proj_ref = &r["enc_to_dec_proj_output"];
    for (i, text) in PROMPTS.iter().enumerate() {
        let enc = model.text_encoder().encode_one(text).unwrap();
        let n = enc.tokens.ids.len();
        let want: Vec<u32> = ids[i]
            .iter()
            .zip(&mask[i])
            .filter(|(_, &m)| m == 1)
            .map(|(&id, _)| id as u32)
            .collect();
        assert_eq!(enc.tokens.ids, want, "{name}: ids of {text:?}");
        assert!(mask[i][n..].iter().all(|&m| m == 0));
        // Real tokens only: the reference's padded positions are masked out downstream.
        let d_t5 = max_abs_diff(&enc.hidden, &t5_ref.i((i, 0..n)).unwrap());
        let d_proj = max_abs_diff(&enc.projected, &proj_ref.i((i, 0..n)).unwrap());
        assert!(d_t5 < 1e-4, "{name}: T5 output differs by {d_t5}");
        assert!(d_proj < 1e-4, "{name}: projection differs by {d_proj}");
    }
    let cond = model
        .text_encoder()
        .encode(&PROMPTS)
        .unwrap()
        .with_null()
        .unwrap();
    let d = max_abs_diff(&cond.states, &r["cfg_encoder_hidden_states"]);
    assert!(d < 1e-4, "{name}: guidance condition differs by {d}");
    let want_mask = r["cfg_encoder_attention_mask"]
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(max_abs_diff(&cond.mask, &want_mask), 0.0);
}

#[test]
fn text_encoder_matches_reference_mono() {
    check_text_encoder("mono");
}

#[test]
fn text_encoder_matches_reference_stereo() {
    check_text_encoder("stereo");
}

/// The first decoder call's raw logits for the text, continuation and unconditional inputs.
fn check_first_step_logits(name: &str, dtype: DType, tol: f32) {
    let model = load_model(name, dtype);
    let r = reference(name);
    let dec = model.decoder();
    let k = dec.config().num_codebooks;
    let bos = dec.config().bos_token_id;
    let delays = codebook_delays(k, dec.config().audio_channels).unwrap();
    let cond = model
        .text_encoder()
        .encode(&PROMPTS)
        .unwrap()
        .with_null()
        .unwrap();

    // Text only: the start column.
    let mut state = dec.new_state(&cond.states, &cond.mask, 40).unwrap();
    let ids = Tensor::full(bos, (4, k, 1), &Device::Cpu).unwrap();
    let logits = dec.forward(&mut state, &ids).unwrap();
    let want = &r["text_first_step_logits"];
    let d = max_abs_diff(&logits, want);
    assert!(
        d < tol * max_abs(want).max(1.0),
        "{name} {dtype:?}: text logits differ by {d}"
    );

    // Continuation: the start column and the delayed prompt in one call.
    let prompt = codes3(&r["cont_prompt_codes"]);
    let p = prompt[0][0].len();
    let mut ids = Vec::new();
    for b in 0..4 {
        for (c, &delay) in delays.iter().enumerate() {
            for t in 0..=p {
                ids.push(forced_token(t, delay, &prompt[b % 2][c], NEW_FRAMES, bos, bos).unwrap());
            }
        }
    }
    let ids = Tensor::from_vec(ids, (4, k, p + 1), &Device::Cpu).unwrap();
    let mut state = dec.new_state(&cond.states, &cond.mask, 60).unwrap();
    let logits = dec.forward(&mut state, &ids).unwrap();
    let want = &r["cont_first_step_logits"];
    let d = max_abs_diff(&logits, want);
    assert!(
        d < tol * max_abs(want).max(1.0),
        "{name} {dtype:?}: continuation logits differ by {d}"
    );

    // Unconditional: zero condition, no guidance batch.
    let uncond = TextCondition::unconditional(2, dec.config().hidden_size, &Device::Cpu).unwrap();
    let mut state = dec.new_state(&uncond.states, &uncond.mask, 40).unwrap();
    let ids = Tensor::full(bos, (2, k, 1), &Device::Cpu).unwrap();
    let logits = dec.forward(&mut state, &ids).unwrap();
    let want = &r["uncond_first_step_logits"];
    let d = max_abs_diff(&logits, want);
    assert!(
        d < tol * max_abs(want).max(1.0),
        "{name} {dtype:?}: unconditional logits differ by {d}"
    );
    assert!(logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn first_step_logits_match_reference_mono() {
    check_first_step_logits("mono", DType::F32, 1e-4);
}

#[test]
fn first_step_logits_match_reference_stereo() {
    check_first_step_logits("stereo", DType::F32, 1e-4);
}

/// Half-precision weights and compute stay close to the f32 reference (relative to the largest
/// logit; bf16 keeps 8 bits of mantissa, f16 11).
#[test]
fn first_step_logits_in_half_precision() {
    check_first_step_logits("mono", DType::BF16, 3e-2);
    check_first_step_logits("mono", DType::F16, 5e-3);
}

/// Guidance mix of the first step equals the reference's guided logits.
#[test]
fn guided_logits_match_reference() {
    for name in ["mono", "stereo"] {
        let r = reference(name);
        let raw = &r["text_first_step_logits"];
        let cond = raw.i(0..2).unwrap();
        let uncond = raw.i(2..4).unwrap();
        let mut c = cond.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let u = uncond.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        segue_engine::sampling::guidance_mix(&mut c, &u, 3.0);
        let guided = Tensor::from_vec(c, cond.dims(), &Device::Cpu).unwrap();
        let d = max_abs_diff(&guided, &r["text_first_step_guided_logits"]);
        assert!(d < 1e-4, "{name}: guided logits differ by {d}");
    }
}

/// The delay pattern masks of the three runs.
#[test]
fn delay_pattern_masks_match_reference() {
    for name in ["mono", "stereo"] {
        let r = reference(name);
        let model = load_model(name, DType::F32);
        let cfg = model.decoder().config();
        let delays = codebook_delays(cfg.num_codebooks, cfg.audio_channels).unwrap();
        let prompt = codes3(&r["cont_prompt_codes"]);
        for (prefix, p) in [
            ("text", 0usize),
            ("cont", prompt[0][0].len()),
            ("uncond", 0),
        ] {
            let want = r[&format!("{prefix}_delay_pattern_mask")]
                .to_vec3::<i64>()
                .unwrap();
            let len = sequence_len(p, NEW_FRAMES, &delays);
            for (b, rows) in want.iter().enumerate() {
                assert_eq!(rows[0].len(), len);
                for (c, row) in rows.iter().enumerate() {
                    let pr: &[u32] = if p > 0 { &prompt[b][c] } else { &[] };
                    let ours: Vec<i64> = (0..len)
                        .map(|t| {
                            forced_token(t, delays[c], pr, NEW_FRAMES, 2048, 2048)
                                .map_or(FREE, i64::from)
                        })
                        .collect();
                    assert_eq!(&ours, row, "{name} {prefix} batch {b} codebook {c}");
                }
            }
        }
    }
}

fn check_greedy(name: &str) {
    let model = load_model(name, DType::F32);
    let r = reference(name);
    let out = generate_codes(&model, &greedy_request(texts(), vec![]), &mut no_callback()).unwrap();
    assert_eq!(
        out.codes,
        codes3(&r["text_codes"]),
        "{name}: text-only greedy codes"
    );
    assert_eq!(
        (out.prompt_frames, out.new_frames, out.steps),
        (0, NEW_FRAMES, NEW_FRAMES + 3)
    );

    let prompt = codes3(&r["cont_prompt_codes"]);
    let out = generate_codes(&model, &greedy_request(texts(), prompt), &mut no_callback()).unwrap();
    assert_eq!(
        out.codes,
        codes3(&r["cont_codes"]),
        "{name}: continuation greedy codes"
    );
    assert_eq!(out.prompt_frames, 16);

    let out = generate_codes(
        &model,
        &greedy_request(Condition::Unconditional { rows: 2 }, vec![]),
        &mut no_callback(),
    )
    .unwrap();
    assert_eq!(
        out.codes,
        codes3(&r["uncond_codes"]),
        "{name}: unconditional greedy codes"
    );
}

#[test]
fn greedy_codes_match_reference_mono() {
    check_greedy("mono");
}

#[test]
fn greedy_codes_match_reference_stereo() {
    check_greedy("stereo");
}

fn sampled(model: &Musicgen, seeds: Vec<u64>, text: &str) -> Vec<Vec<Vec<u32>>> {
    let req = CodesRequest {
        condition: Condition::takes_of(text, seeds.len()),
        prompt: vec![],
        new_frames: 20,
        sampling: SamplingParams::default(),
        seeds,
    };
    generate_codes(model, &req, &mut no_callback())
        .unwrap()
        .codes
}

/// Same seed and inputs give the same codes; another seed, or another take, other codes.
#[test]
fn sampling_is_seeded() {
    let model = load_model("mono", DType::F32);
    let a = sampled(&model, vec![7], PROMPTS[1]);
    let b = sampled(&model, vec![7], PROMPTS[1]);
    let c = sampled(&model, vec![8], PROMPTS[1]);
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Two takes in one batch, each with its own seed.
    let takes = sampled(&model, vec![7, 8], PROMPTS[1]);
    assert_eq!(takes.len(), 2);
    assert_ne!(takes[0], takes[1]);
    assert_eq!(takes, sampled(&model, vec![7, 8], PROMPTS[1]));
    // Unconditional sampling works too and is seeded.
    assert_eq!(
        sampled(&model, vec![3, 4], ""),
        sampled(&model, vec![3, 4], "")
    );
}

/// The callback sees every step in order, the frames as they complete (equal to the final
/// codes), and can stop the generation.
#[test]
fn step_callback_reports_frames_and_stops() {
    let model = load_model("stereo", DType::F32);
    let r = reference("stereo");
    let mut steps = Vec::new();
    let mut frames: Vec<(usize, Vec<u32>)> = Vec::new();
    let out = generate_codes(
        &model,
        &greedy_request(texts(), codes3(&r["cont_prompt_codes"])),
        &mut |info| {
            steps.push((info.step, info.total));
            if let Some(f) = &info.frame {
                frames.push((f.index, f.codes.to_vec()));
            }
            Control::Continue
        },
    )
    .unwrap();
    let total = NEW_FRAMES + 3;
    assert_eq!(steps, (1..=total).map(|s| (s, total)).collect::<Vec<_>>());
    assert_eq!(
        frames.iter().map(|f| f.0).collect::<Vec<_>>(),
        (0..NEW_FRAMES).collect::<Vec<_>>()
    );
    for (i, codes) in &frames {
        for (row, row_codes) in out.codes.iter().enumerate() {
            for (c, cb) in row_codes.iter().enumerate() {
                assert_eq!(codes[row * 8 + c], cb[out.prompt_frames + i]);
            }
        }
    }

    let mut calls = 0;
    let err = generate_codes(&model, &greedy_request(texts(), vec![]), &mut |_| {
        calls += 1;
        if calls == 3 {
            Control::Stop
        } else {
            Control::Continue
        }
    })
    .unwrap_err();
    assert!(
        matches!(err, GenerateError::Cancelled { step: 3, total: 33 }),
        "{err}"
    );
    assert_eq!(calls, 3);
}

/// Lengths past the model's limit, bad sampling values and malformed prompts are errors before
/// any work.
#[test]
fn bad_requests_are_errors() {
    let model = load_model("mono", DType::F32);
    let max = model.max_frames();
    assert_eq!(max, 1500, "generation_config max_length");
    let mut req = greedy_request(texts(), vec![]);
    req.new_frames = max + 1;
    let err = generate_codes(&model, &req, &mut no_callback()).unwrap_err();
    assert!(matches!(err, GenerateError::TooLong { .. }), "{err}");
    assert!(err.to_string().contains("at most 1500"), "{err}");

    let mut req = greedy_request(texts(), vec![vec![vec![1; 10]; 4]; 2]);
    req.new_frames = max - 9;
    assert!(matches!(
        generate_codes(&model, &req, &mut no_callback()),
        Err(GenerateError::TooLong { .. })
    ));

    let mut req = greedy_request(texts(), vec![]);
    req.new_frames = 0;
    assert!(matches!(
        generate_codes(&model, &req, &mut no_callback()),
        Err(GenerateError::NoFrames)
    ));

    let mut req = greedy_request(texts(), vec![]);
    req.sampling = SamplingParams {
        top_k: 0,
        ..SamplingParams::default()
    };
    assert!(matches!(
        generate_codes(&model, &req, &mut no_callback()),
        Err(GenerateError::Sampling(_))
    ));

    let req = greedy_request(texts(), vec![vec![vec![1; 10]; 3]; 2]);
    assert!(matches!(
        generate_codes(&model, &req, &mut no_callback()),
        Err(GenerateError::Request(_))
    ));
    let req = greedy_request(texts(), vec![vec![vec![4096; 10]; 4]; 2]);
    assert!(matches!(
        generate_codes(&model, &req, &mut no_callback()),
        Err(GenerateError::Request(_))
    ));
    let mut req = greedy_request(texts(), vec![]);
    req.seeds = vec![1];
    assert!(matches!(
        generate_codes(&model, &req, &mut no_callback()),
        Err(GenerateError::Request(_))
    ));
}

/// Tokenizer ids equal the reference's for every case, including `""`, repeated spaces,
/// full-width and accented letters and unknown symbols.
#[test]
fn tokenizer_matches_reference_cases() {
    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
    }
    #[derive(serde::Deserialize)]
    struct Cases {
        cases: Vec<Case>,
    }
    let cases: Cases = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.cases.len(), 5);
    let tok =
        segue_engine::text::TextTokenizer::from_file(&fixtures().join("reference/tokenizer.json"))
            .unwrap();
    for case in &cases.cases {
        let got = tok.encode(&case.text).unwrap();
        assert_eq!(got.ids, case.ids, "{:?}", case.text);
        assert!(!got.truncated);
    }
    // Over-long text is cut to the limit, `</s>` kept last, and flagged.
    let long = "piano ".repeat(1000);
    let got = tok.encode(&long).unwrap();
    assert!(got.truncated);
    assert_eq!(got.ids.len(), segue_engine::text::MAX_TEXT_TOKENS);
    assert_eq!(*got.ids.last().unwrap(), 1);
}

fn audio_of(t: &Tensor, row: usize) -> segue_engine::audio::Audio {
    segue_engine::audio::Audio {
        sample_rate: 32_000,
        channels: t.i(row).unwrap().to_vec2::<f32>().unwrap(),
    }
}

fn peak_error(got: &[Vec<f32>], want: &Tensor) -> (f32, f32) {
    let want = want.to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "channels");
    let mut err = 0f32;
    let mut peak = 0f32;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len(), "samples");
        for (a, b) in g.iter().zip(w) {
            err = err.max((a - b).abs());
            peak = peak.max(b.abs());
        }
    }
    (err, peak)
}

/// Audio prompt to audio, through the codec: the prompt is encoded to the reference's prompt
/// codes, the greedy continuation equals the reference's, and the decode of prompt and
/// continuation together equals the reference's audio.
fn check_audio_continuation(name: &str) {
    let model = load_model(name, DType::F32);
    let r = reference(name);
    let want_codes = codes3(&r["cont_codes"]);
    for row in 0..2 {
        let req = segue_engine::generate::AudioRequest {
            text: PROMPTS[row].to_string(),
            prompt: Some(audio_of(&r["cont_prompt_audio"], row)),
            new_frames: NEW_FRAMES,
            sampling: SamplingParams::greedy(3.0),
            seed: 0,
            takes: 1,
        };
        let out = segue_engine::generate::generate_audio(&model, &req, &mut no_callback()).unwrap();
        assert_eq!(out.prompt_frames, 16);
        let take = &out.takes[0];
        assert_eq!(take.codes, want_codes[row], "{name} row {row}: codes");
        let (err, peak) = peak_error(
            &take.audio.channels,
            &r["cont_decoded_audio"].i(row).unwrap(),
        );
        assert!(
            peak > 1e-3 && err <= 1e-4 * peak,
            "{name} row {row}: audio error {err} (peak {peak})"
        );
        let cont = take.continuation();
        assert_eq!(cont.frames(), NEW_FRAMES * 640);
        assert_eq!(cont.channels[0][..], take.audio.channels[0][16 * 640..]);
    }
}

#[test]
fn audio_continuation_matches_reference_mono() {
    check_audio_continuation("mono");
}

#[test]
fn audio_continuation_matches_reference_stereo() {
    check_audio_continuation("stereo");
}

/// Text only, one take per text: the decoded audio equals the reference's.
#[test]
fn text_to_audio_matches_reference() {
    for name in ["mono", "stereo"] {
        let model = load_model(name, DType::F32);
        let r = reference(name);
        let req = segue_engine::generate::AudioRequest {
            text: PROMPTS[1].to_string(),
            prompt: None,
            new_frames: NEW_FRAMES,
            sampling: SamplingParams::greedy(3.0),
            seed: 0,
            takes: 2,
        };
        let out = segue_engine::generate::generate_audio(&model, &req, &mut no_callback()).unwrap();
        assert_eq!(out.takes.len(), 2);
        // Greedy: both takes of one text are the same, and equal the reference's second row.
        for take in &out.takes {
            assert_eq!(take.codes, codes3(&r["text_codes"])[1]);
            let (err, peak) =
                peak_error(&take.audio.channels, &r["text_decoded_audio"].i(1).unwrap());
            assert!(
                err <= 1e-4 * peak,
                "{name}: audio error {err} (peak {peak})"
            );
            assert_eq!(take.continuation().channels, take.audio.channels);
        }
        assert_eq!((out.takes[0].seed, out.takes[1].seed), (0, 1));
    }
}

/// A prompt longer than the model allows is refused before any work.
#[test]
fn too_long_audio_prompt_is_an_error() {
    let model = load_model("mono", DType::F32);
    let req = segue_engine::generate::AudioRequest {
        text: String::new(),
        prompt: Some(segue_engine::audio::Audio {
            sample_rate: 32_000,
            channels: vec![vec![0.0; 32_000 * 30]],
        }),
        new_frames: 1,
        sampling: SamplingParams::default(),
        seed: 0,
        takes: 1,
    };
    let err = segue_engine::generate::generate_audio(&model, &req, &mut no_callback()).unwrap_err();
    assert!(
        matches!(
            err,
            GenerateError::TooLong {
                prompt: 1500,
                new: 1,
                max: 1500
            }
        ),
        "{err}"
    );
}

/// The cache written in place: feeding a sequence one column at a time gives the same last
/// logits as feeding it at once, and a state refuses positions past its capacity.
#[test]
fn stepwise_decoding_equals_one_call() {
    let model = load_model("stereo", DType::F32);
    let r = reference("stereo");
    let dec = model.decoder();
    let cond = model
        .text_encoder()
        .encode(&PROMPTS)
        .unwrap()
        .with_null()
        .unwrap();
    // 12 columns of the reference's delayed continuation sequence, guidance batch of 4.
    let seq = r["cont_delayed_codes"]
        .narrow(2, 0, 12)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let seq = Tensor::cat(&[&seq, &seq], 0).unwrap(); // (4, 8, 12)
    let mut all = dec.new_state(&cond.states, &cond.mask, 12).unwrap();
    let want = dec.forward(&mut all, &seq).unwrap();
    let mut one = dec.new_state(&cond.states, &cond.mask, 12).unwrap();
    let mut got = None;
    for t in 0..12 {
        got = Some(
            dec.forward(&mut one, &seq.narrow(2, t, 1).unwrap())
                .unwrap(),
        );
    }
    assert_eq!(one.position(), 12);
    let d = max_abs_diff(&got.unwrap(), &want);
    assert!(d < 1e-4, "stepwise logits differ by {d}");
    let err = dec
        .forward(&mut one, &seq.narrow(2, 0, 1).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("13 positions"), "{err}");
}
