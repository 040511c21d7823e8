//! Plugin state through the CLAP state extension: save, restore, round trips, bad input.

use anyhow::Result;
use segue::params::{GAIN_MAX_DB, GAIN_MIN_DB, STATE_VERSION};
use segue_host_tests::signal::noise;
use segue_host_tests::{render, BlockSplit, HostEvent, PluginLibrary, RenderRequest};

fn gain_norm(db: f32) -> f64 {
    ((db - GAIN_MIN_DB) / (GAIN_MAX_DB - GAIN_MIN_DB)) as f64
}

/// The JSON document inside a nice-plug state: an 8-byte little-endian length, then JSON.
fn state_json(bytes: &[u8]) -> serde_json::Value {
    assert!(bytes.len() > 8, "state of {} bytes", bytes.len());
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(
        len,
        bytes.len() - 8,
        "length prefix disagrees with the state size"
    );
    serde_json::from_slice(&bytes[8..]).expect("state is not JSON")
}

#[test]
fn state_round_trips_parameters_and_fields() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut a = lib.instantiate()?;
    a.activate(48_000.0, 512)?;
    // Set through automation events, as a host's automation lane would.
    let x = noise(1, 512, 0.5);
    a.process_block(
        &[&x, &x],
        &[],
        None,
        &[
            HostEvent::param(0, "gain", gain_norm(-12.0)),
            HostEvent::param(10, "monitor", 0.0),
        ],
    )?;
    let saved = a.save_state()?;
    let json = state_json(&saved);
    let fields = &json["fields"];
    assert_eq!(
        fields["state-version"],
        serde_json::json!(STATE_VERSION.to_string()),
        "{json}"
    );
    assert!(fields.get("editor-size").is_some(), "{json}");

    // A fresh instance, inactive (as a host restores a project), then active.
    let mut b = lib.instantiate()?;
    b.load_state(&saved)?;
    assert!((b.param_value("gain")? - gain_norm(-12.0)).abs() < 1e-6);
    assert_eq!(b.param_value("monitor")?, 0.0);
    assert_eq!(b.save_state()?, saved, "save(load(s)) differs from s");

    b.activate(48_000.0, 512)?;
    let out = b.process_block(&[&x, &x], &[], None, &[])?;
    assert!(
        out.iter().flatten().all(|v| *v == 0.0),
        "restored monitoring-off is not silent"
    );
    // Monitoring back on: the restored gain applies (the smoother starts at the restored value).
    b.set_param("monitor", 1.0)?;
    let n = 48_000 / 10;
    let one = vec![1.0f32; n];
    let out = render(
        &mut b,
        &RenderRequest::new([&one, &one], [&[], &[]], BlockSplit::Fixed(512)),
    )?;
    let want = 10f32.powf(-12.0 / 20.0);
    let last = *out[0].last().unwrap();
    assert!(
        (last - want).abs() < 1e-5,
        "restored gain: {last}, expected {want}"
    );
    Ok(())
}

#[test]
fn state_loads_into_an_active_instance() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut a = lib.instantiate()?;
    a.set_param("monitor", 0.0)?;
    let saved = a.save_state()?;

    let mut b = lib.instantiate()?;
    b.activate(44_100.0, 64)?;
    let x = noise(2, 64, 0.5);
    let before = b.process_block(&[&x, &x], &[], None, &[])?;
    assert_eq!(before[0], x);
    b.load_state(&saved)?;
    let after = b.process_block(&[&x, &x], &[], None, &[])?;
    assert!(
        after.iter().flatten().all(|v| *v == 0.0),
        "state loaded while active was ignored"
    );
    Ok(())
}

#[test]
fn unversioned_state_migrates() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut a = lib.instantiate()?;
    let saved = a.save_state()?;
    // The same state as a build before versioning would have written it.
    let mut json = state_json(&saved);
    json["fields"]
        .as_object_mut()
        .unwrap()
        .remove("state-version");
    let body = serde_json::to_vec(&json)?;
    let mut old = (body.len() as u64).to_le_bytes().to_vec();
    old.extend_from_slice(&body);

    let mut b = lib.instantiate()?;
    b.load_state(&old)?;
    let resaved = state_json(&b.save_state()?);
    assert_eq!(
        resaved["fields"]["state-version"],
        serde_json::json!(STATE_VERSION.to_string())
    );
    Ok(())
}

#[test]
fn corrupt_state_is_refused_and_the_instance_keeps_working() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    plugin.set_param("gain", gain_norm(-3.0))?;
    let good = plugin.save_state()?;
    let mut truncated_json = good.clone();
    truncated_json.truncate(good.len() / 2);
    let len = (truncated_json.len() - 8) as u64;
    truncated_json[..8].copy_from_slice(&len.to_le_bytes());
    let huge_length = [u64::MAX.to_le_bytes().to_vec(), b"{}".to_vec()].concat();
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("short", vec![1, 2, 3]),
        ("huge length", huge_length),
        ("truncated JSON", truncated_json),
        (
            "garbage",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        ),
    ] {
        assert!(
            plugin.load_state(&bytes).is_err(),
            "{what} state was accepted"
        );
        assert!(
            (plugin.param_value("gain")? - gain_norm(-3.0)).abs() < 1e-6,
            "{what} state changed the gain"
        );
    }
    plugin.activate(48_000.0, 64)?;
    let x = noise(3, 64, 0.5);
    let out = plugin.process_block(&[&x, &x], &[], None, &[])?;
    assert!(out.iter().flatten().all(|v| v.is_finite()));
    Ok(())
}
