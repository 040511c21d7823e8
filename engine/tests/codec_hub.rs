//! Resolving checkpoints: local folders, sharded safetensors, and the offline error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use segue_engine::codec::{load_safetensors, CheckpointCodec};
use segue_engine::hub::{self, HubError, HubOptions};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn reference_codes() -> (Tensor, Vec<Vec<Vec<i64>>>) {
    let r = load_safetensors(
        &fixtures().join("reference/codec_mono.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (
        r["input_audio"].clone(),
        r["codes"].to_vec3::<i64>().unwrap(),
    )
}

fn encode_with(files: &hub::ModelFiles) -> Vec<Vec<Vec<i64>>> {
    let (_, codec) = CheckpointCodec::load(files, &Device::Cpu).unwrap();
    let (input, _) = reference_codes();
    codec
        .encode(&input)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec3::<i64>()
        .unwrap()
}

#[test]
fn local_folder() {
    let dir = fixtures().join("tiny-musicgen-mono");
    let files = hub::resolve(dir.to_str().unwrap(), &mut |_| panic!("no download")).unwrap();
    assert_eq!(files.dir, dir);
    assert_eq!(files.config, dir.join("config.json"));
    assert_eq!(files.weights, vec![dir.join("model.safetensors")]);
    assert_eq!(files.tokenizer, Some(dir.join("tokenizer.json")));
    assert_eq!(
        files.generation_config,
        Some(dir.join("generation_config.json"))
    );
    let cfg: serde_json::Value = files.read_config().unwrap();
    assert_eq!(cfg["audio_encoder"]["sampling_rate"], 32000);
    assert_eq!(encode_with(&files), reference_codes().1);
}

/// Writes `tensors` split over `n` shards plus the index, as `save_pretrained` does for big
/// models.
fn write_sharded(dir: &Path, tensors: HashMap<String, Tensor>, n: usize) {
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let per = names.len().div_ceil(n);
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|k| (k.clone(), tensors[k].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for k in chunk {
            weight_map.insert(k.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn sharded_checkpoint() {
    let src = fixtures().join("tiny-musicgen-mono");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let tensors = load_safetensors(&src.join("model.safetensors"), &Device::Cpu).unwrap();
    write_sharded(tmp.path(), tensors, 3);

    let files = hub::resolve(tmp.path().to_str().unwrap(), &mut |_| {}).unwrap();
    assert_eq!(files.weights.len(), 3);
    assert!(files.weights[0].ends_with("model-00001-of-00003.safetensors"));
    assert_eq!(files.tokenizer, None);
    assert_eq!(encode_with(&files), reference_codes().1);

    // A shard listed in the index but absent is named.
    std::fs::remove_file(tmp.path().join("model-00002-of-00003.safetensors")).unwrap();
    let e = hub::resolve(tmp.path().to_str().unwrap(), &mut |_| {}).unwrap_err();
    assert!(
        matches!(&e, HubError::MissingLocalFile { file, .. } if file == "model-00002-of-00003.safetensors"),
        "{e}"
    );
}

#[test]
fn folder_without_weights_or_config() {
    let tmp = tempfile::tempdir().unwrap();
    let e = hub::resolve(tmp.path().to_str().unwrap(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
    std::fs::copy(
        fixtures().join("tiny-musicgen-mono/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let e = hub::resolve(tmp.path().to_str().unwrap(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn offline_without_cache_says_so_and_how_to_fix_it() {
    let cache = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 of the loopback: the connection is refused at once.
    let opts = HubOptions {
        cache_dir: cache.path().to_path_buf(),
        endpoint: "http://127.0.0.1:9".into(),
        offline: false,
    };
    let t = std::time::Instant::now();
    let e = hub::resolve_with("facebook/musicgen-small", &opts, &mut |_| {}).unwrap_err();
    assert!(t.elapsed().as_secs() < 30, "should fail fast");
    assert!(matches!(e, HubError::Offline { .. }), "{e:?}");
    let msg = e.to_string();
    for want in [
        "facebook/musicgen-small",
        "config.json",
        "no network connection",
        "no cached copy",
        cache.path().to_str().unwrap(),
        "model.safetensors",
        "into one folder",
    ] {
        assert!(msg.contains(want), "missing {want:?} in: {msg}");
    }
    assert!(!msg.contains('\n'), "one line: {msg}");

    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let msg = hub::resolve_with("facebook/musicgen-small", &offline, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("HF_HUB_OFFLINE") && msg.contains("no cached copy"),
        "{msg}"
    );
}

#[test]
fn served_from_the_hub_cache_without_network() {
    // A cache laid out as the Hub client leaves it: refs/main names the snapshot.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--someone--tiny-musicgen");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let src = fixtures().join("tiny-musicgen-mono");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    let opts = HubOptions {
        cache_dir: cache.path().to_path_buf(),
        endpoint: "http://127.0.0.1:9".into(),
        offline: false,
    };
    let files = hub::resolve_with("someone/tiny-musicgen", &opts, &mut |_| {
        panic!("no download")
    })
    .unwrap();
    assert_eq!(files.dir, snap);
    assert_eq!(files.weights, vec![snap.join("model.safetensors")]);
    assert_eq!(encode_with(&files), reference_codes().1);
}
