//! What a host sees when it scans Segue: descriptor, ports, parameters.

use anyhow::Result;
use segue::params::{GAIN_MAX_DB, GAIN_MIN_DB};
use segue_host_tests::{clap_param_id, PluginLibrary, SEGUE_CLAP_ID};

/// `CLAP_AUDIO_PORT_IS_MAIN`.
const AUDIO_PORT_IS_MAIN: u32 = 1;
/// `CLAP_PARAM_IS_STEPPED`.
const PARAM_IS_STEPPED: u32 = 1;
/// `CLAP_PARAM_IS_AUTOMATABLE`.
const PARAM_IS_AUTOMATABLE: u32 = 1 << 5;

#[test]
fn descriptor_declares_a_stereo_sampler_instrument() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let descriptors = lib.descriptors()?;
    assert_eq!(descriptors.len(), 1, "{descriptors:?}");
    let d = &descriptors[0];
    assert_eq!(d.id, SEGUE_CLAP_ID);
    assert_eq!(d.name, "Segue");
    assert_eq!(d.version, env!("CARGO_PKG_VERSION"));
    assert!(!d.vendor.is_empty());
    for feature in ["instrument", "sampler", "stereo"] {
        assert!(
            d.features.iter().any(|f| f == feature),
            "feature {feature} missing from {:?}",
            d.features
        );
    }
    Ok(())
}

#[test]
fn audio_ports_are_stereo_main_sidechain_and_output() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    let inputs = plugin.audio_ports(true)?;
    assert_eq!(inputs.len(), 2, "{inputs:?}");
    assert_eq!(inputs[0].channels, 2);
    assert_ne!(
        inputs[0].flags & AUDIO_PORT_IS_MAIN,
        0,
        "first input must be main"
    );
    assert_eq!(inputs[0].port_type.as_deref(), Some("stereo"));
    assert_eq!(inputs[1].channels, 2);
    assert_eq!(
        inputs[1].flags & AUDIO_PORT_IS_MAIN,
        0,
        "sidechain must not be main"
    );
    assert_eq!(inputs[1].name, "Sidechain");
    assert_eq!(inputs[1].port_type.as_deref(), Some("stereo"));

    let outputs = plugin.audio_ports(false)?;
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert_eq!(outputs[0].channels, 2);
    assert_ne!(outputs[0].flags & AUDIO_PORT_IS_MAIN, 0);
    Ok(())
}

#[test]
fn takes_notes_on_one_input_port() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    let inputs = plugin.note_ports(true)?;
    assert_eq!(inputs.len(), 1, "{inputs:?}");
    assert!(
        inputs[0].clap_dialect && inputs[0].midi_dialect,
        "{inputs:?}"
    );
    assert!(plugin.note_ports(false)?.is_empty());
    Ok(())
}

#[test]
fn parameters_have_stable_ids_and_normalised_ranges() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    let params = plugin.params()?;
    assert_eq!(params.len(), 10, "{params:?}");
    for id in [
        "gain",
        "monitor",
        "capture-source",
        "prompt-bars",
        "continuation-bars",
        "playback-mode",
        "midi-quantise",
        "release",
        "generate-note",
        "generate",
    ] {
        let p = params
            .iter()
            .find(|p| p.id == clap_param_id(id))
            .unwrap_or_else(|| panic!("no parameter with the id of `{id}`"));
        // Continuous parameters are normalised; stepped ones count steps from 0 (nice-plug).
        assert_eq!(p.min, 0.0, "{p:?}");
        assert!(
            p.max >= 1.0 && p.default >= 0.0 && p.default <= p.max,
            "{p:?}"
        );
    }
    // The host-automatable momentary trigger, off by default.
    let generate = params
        .iter()
        .find(|p| p.id == clap_param_id("generate"))
        .unwrap();
    assert_ne!(generate.flags & PARAM_IS_AUTOMATABLE, 0);
    assert_eq!(generate.default, 0.0);
    assert_eq!(plugin.param_text("generate-note", 0.0)?, "Off");

    let gain = params
        .iter()
        .find(|p| p.id == clap_param_id("gain"))
        .expect("no parameter with the id of `gain`");
    assert_eq!(gain.name, "Output Gain");
    assert_eq!((gain.min, gain.max), (0.0, 1.0));
    let unity = (0.0 - GAIN_MIN_DB) / (GAIN_MAX_DB - GAIN_MIN_DB);
    assert!((gain.default - unity as f64).abs() < 1e-6, "{gain:?}");
    assert_ne!(gain.flags & PARAM_IS_AUTOMATABLE, 0);
    assert_eq!(plugin.param_text("gain", unity as f64)?, "0.0 dB");
    assert_eq!(plugin.param_text("gain", 0.0)?, "-60.0 dB");

    let monitor = params
        .iter()
        .find(|p| p.id == clap_param_id("monitor"))
        .expect("no parameter with the id of `monitor`");
    assert_eq!(monitor.name, "Input Monitoring");
    assert_eq!((monitor.min, monitor.max, monitor.default), (0.0, 1.0, 1.0));
    assert_ne!(monitor.flags & PARAM_IS_STEPPED, 0);
    Ok(())
}

#[test]
fn instances_are_independent() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut a = lib.instantiate()?;
    let mut b = lib.instantiate()?;
    a.set_param("gain", 0.25)?;
    assert!((a.param_value("gain")? - 0.25).abs() < 1e-6);
    let unity = ((0.0 - GAIN_MIN_DB) / (GAIN_MAX_DB - GAIN_MIN_DB)) as f64;
    assert!((b.param_value("gain")? - unity).abs() < 1e-6);
    Ok(())
}
