//! Every parameter and every piece of persisted plugin state, in one place.
//!
//! Parameter ids (`#[id = "..."]`) and persist keys (`#[persist = "..."]`) are part of the saved
//! project format and of host automation: they must never be renamed. Add new ones instead, and
//! migrate old states in [`migrate_state`].

use nice_plug::prelude::*;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Version of the persisted state layout written by this build. Bump it when a persisted field
/// changes meaning, and teach [`migrate_state`] how to upgrade the previous layout.
pub const STATE_VERSION: u32 = 1;

/// Persist key of the state version field.
pub const STATE_VERSION_KEY: &str = "state-version";

/// Lowest and highest output gain in decibels. The CLAP/VST3 normalised value maps linearly onto
/// this range: `dB = GAIN_MIN_DB + normalised * (GAIN_MAX_DB - GAIN_MIN_DB)`.
pub const GAIN_MIN_DB: f32 = -60.0;
/// See [`GAIN_MIN_DB`].
pub const GAIN_MAX_DB: f32 = 12.0;

/// Time the output gain takes to glide to a new value, in milliseconds.
pub const GAIN_SMOOTHING_MS: f32 = 20.0;

/// Default editor size in logical pixels (width, height).
pub const DEFAULT_EDITOR_SIZE: EditorSize = EditorSize {
    width: 640,
    height: 400,
};

/// The editor window's size in logical pixels; persisted so a reopened project reopens the window
/// at the size the user left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditorSize {
    /// Width in logical pixels.
    pub width: u32,
    /// Height in logical pixels.
    pub height: u32,
}

/// All of Segue's parameters and persisted fields. Shared (`Arc`) between the host wrapper, the
/// audio thread and the editor; every field is internally synchronised.
#[derive(Params)]
pub struct SegueParams {
    /// Output gain in decibels, applied to everything Segue outputs. Smoothed per sample.
    #[id = "gain"]
    pub gain: FloatParam,

    /// Input monitoring: when on, the incoming audio (main input plus sidechain) is passed through
    /// to the output; when off, only what Segue itself plays is heard.
    #[id = "monitor"]
    pub monitor: BoolParam,

    /// Layout version of the persisted state this object holds; see [`migrate_state`].
    #[persist = "state-version"]
    pub state_version: AtomicU32,

    /// Editor window size in logical pixels.
    #[persist = "editor-size"]
    pub editor_size: Arc<RwLock<EditorSize>>,
}

impl Default for SegueParams {
    fn default() -> Self {
        Self {
            gain: FloatParam::new(
                "Output Gain",
                0.0,
                FloatRange::Linear {
                    min: GAIN_MIN_DB,
                    max: GAIN_MAX_DB,
                },
            )
            .with_smoother(SmoothingStyle::Linear(GAIN_SMOOTHING_MS))
            .with_step_size(0.1)
            .with_unit(" dB")
            // Rounds to the 0.1 dB step and never shows "-0.0", so text round-trips exactly.
            .with_value_to_string(formatters::v2s_f32_rounded(1)),
            monitor: BoolParam::new("Input Monitoring", true),
            state_version: AtomicU32::new(STATE_VERSION),
            editor_size: Arc::new(RwLock::new(DEFAULT_EDITOR_SIZE)),
        }
    }
}

impl SegueParams {
    /// The persisted state version currently held.
    pub fn state_version(&self) -> u32 {
        self.state_version.load(Ordering::Relaxed)
    }
}

/// Converts decibels to a linear amplitude factor.
#[inline]
pub fn db_to_gain(db: f32) -> f32 {
    10f32.powf(db / 20.0)
}

/// Reads the state version stored in a saved state. States written before versioning existed (no
/// field, or an unparsable one) count as version 0.
pub fn saved_state_version(state: &PluginState) -> u32 {
    state
        .fields
        .get(STATE_VERSION_KEY)
        .and_then(|v| serde_json::from_str::<u32>(v).ok())
        .unwrap_or(0)
}

/// Upgrades a saved state, in place, to the layout of [`STATE_VERSION`]. Called by the host
/// wrapper before the state is applied (through `Plugin::filter_state`), on the main thread.
///
/// Returns the version the state was saved with. A state from a newer build is left as it is
/// (unknown fields are ignored, known ones still load) and a warning is logged.
pub fn migrate_state(state: &mut PluginState) -> u32 {
    let saved = saved_state_version(state);
    if saved > STATE_VERSION {
        nice_warn!(
            "state was saved by a newer Segue (state version {saved}, this build knows {STATE_VERSION}); loading what is understood"
        );
        return saved;
    }
    // Version 0 -> 1: version 0 is the same layout without the version field. Future migrations
    // go here as `if saved < N { ... }` steps, oldest first.
    state
        .fields
        .insert(STATE_VERSION_KEY.to_owned(), STATE_VERSION.to_string());
    saved
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn empty_state(fields: &[(&str, &str)]) -> PluginState {
        PluginState {
            version: String::new(),
            params: BTreeMap::new(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn ids_never_change() {
        let params = SegueParams::default();
        let ids: Vec<String> = params
            .param_map()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(ids, vec!["gain".to_string(), "monitor".to_string()]);
        let fields = params.serialize_fields();
        assert!(fields.contains_key("state-version"), "{fields:?}");
        assert!(fields.contains_key("editor-size"), "{fields:?}");
    }

    #[test]
    fn unversioned_state_migrates_to_current() {
        let mut state = empty_state(&[]);
        assert_eq!(migrate_state(&mut state), 0);
        assert_eq!(saved_state_version(&state), STATE_VERSION);
    }

    #[test]
    fn current_state_is_untouched() {
        let mut state = empty_state(&[(STATE_VERSION_KEY, "1"), ("editor-size", "{}")]);
        assert_eq!(migrate_state(&mut state), 1);
        assert_eq!(saved_state_version(&state), 1);
        assert_eq!(state.fields["editor-size"], "{}");
    }

    #[test]
    fn newer_state_keeps_its_version() {
        let mut state = empty_state(&[(STATE_VERSION_KEY, "99")]);
        assert_eq!(migrate_state(&mut state), 99);
        assert_eq!(saved_state_version(&state), 99);
    }

    #[test]
    fn persisted_fields_round_trip() {
        let params = SegueParams::default();
        *params.editor_size.write() = EditorSize {
            width: 800,
            height: 500,
        };
        let fields = params.serialize_fields();
        let restored = SegueParams::default();
        restored.deserialize_fields(&fields);
        assert_eq!(
            *restored.editor_size.read(),
            EditorSize {
                width: 800,
                height: 500
            }
        );
        assert_eq!(restored.state_version(), STATE_VERSION);
    }

    #[test]
    fn gain_text_round_trips() {
        let params = SegueParams::default();
        let gain = &params.gain;
        // Just below 0 dB: must read "0.0", not "-0.0", or text -> value -> text changes.
        let almost_unity = gain.preview_normalized(-0.004);
        assert_eq!(
            gain.normalized_value_to_string(almost_unity, true),
            "0.0 dB"
        );
        for db in [-60.0, -12.3, -0.1, 0.0, 0.1, 12.0] {
            let text = gain.normalized_value_to_string(gain.preview_normalized(db), true);
            let back = gain.string_to_normalized_value(&text).unwrap();
            assert_eq!(gain.normalized_value_to_string(back, true), text, "{db} dB");
        }
    }

    #[test]
    fn db_conversion() {
        assert!((db_to_gain(0.0) - 1.0).abs() < 1e-6);
        assert!((db_to_gain(-6.0) - 0.501_187).abs() < 1e-5);
        assert!((db_to_gain(-60.0) - 0.001).abs() < 1e-7);
    }
}
