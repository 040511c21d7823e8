//! Every parameter and every piece of persisted plugin state, in one place.
//!
//! Parameter ids (`#[id = "..."]`) and persist keys (`#[persist = "..."]`) are part of the saved
//! project format and of host automation: they must never be renamed. Add new ones instead, and
//! migrate old states in [`migrate_state`].

use nice_plug::prelude::*;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::playback::{MidiQuantise, PlaybackMode};

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
    width: 1000,
    height: 660,
};

/// Environment variable naming the default model (a Hub id or a local folder) of new instances,
/// so a studio (or a test) can point every instance at one checkpoint.
pub const MODEL_ENV: &str = "SEGUE_MODEL";

/// Model of new instances when [`MODEL_ENV`] is not set.
pub const DEFAULT_MODEL: &str = "facebook/musicgen-small";

/// The model new instances use: `$SEGUE_MODEL` when set and not blank, else [`DEFAULT_MODEL`].
pub fn default_model() -> String {
    std::env::var(MODEL_ENV)
        .ok()
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned())
}

/// Lowest and highest prompt length, in bars.
pub const PROMPT_BARS_RANGE: (i32, i32) = (1, 16);
/// Default prompt length, in bars.
pub const DEFAULT_PROMPT_BARS: i32 = 4;
/// Lowest and highest continuation length, in bars.
pub const CONTINUATION_BARS_RANGE: (i32, i32) = (1, 64);
/// Default continuation length, in bars.
pub const DEFAULT_CONTINUATION_BARS: i32 = 4;
/// Value of the generate trigger note parameter meaning "no note triggers a generation".
pub const NOTE_OFF: i32 = -1;

/// Which input is recorded as the prompt.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureSource {
    /// The main stereo input.
    #[id = "main"]
    #[name = "Main Input"]
    Main,
    /// The stereo sidechain input (how hosts such as Ableton Live hand an instrument audio).
    #[id = "sidechain"]
    #[name = "Sidechain"]
    Sidechain,
}

/// How takes are played; mirrors [`PlaybackMode`] with stable ids.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaybackModeParam {
    /// Anchored on the timeline at the bar line where the prompt ended.
    #[id = "timeline"]
    #[name = "Timeline"]
    Timeline,
    /// Launched at the next bar line after it arrives.
    #[id = "next-bar"]
    #[name = "Next Bar"]
    NextBar,
    /// Played by MIDI notes.
    #[id = "midi"]
    #[name = "MIDI"]
    Midi,
}

impl PlaybackModeParam {
    /// The player's mode.
    pub fn mode(self) -> PlaybackMode {
        match self {
            Self::Timeline => PlaybackMode::Timeline,
            Self::NextBar => PlaybackMode::NextBar,
            Self::Midi => PlaybackMode::Midi,
        }
    }
}

/// When a MIDI note starts the take; mirrors [`MidiQuantise`] with stable ids.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidiQuantiseParam {
    /// On the note's own sample.
    #[id = "immediate"]
    #[name = "Immediate"]
    Immediate,
    /// On the next beat.
    #[id = "next-beat"]
    #[name = "Next Beat"]
    NextBeat,
}

impl MidiQuantiseParam {
    /// The player's quantisation.
    pub fn quantise(self) -> MidiQuantise {
        match self {
            Self::Immediate => MidiQuantise::Immediate,
            Self::NextBeat => MidiQuantise::NextBeat,
        }
    }
}

/// Sampling settings of new generations, persisted (not automatable: they only matter when a
/// generation starts). Every field has a serde default so older states load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingSettings {
    /// Take the most likely token instead of sampling.
    pub greedy: bool,
    /// Softmax temperature (> 0).
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (at least 1).
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1]; 1 = off.
    pub top_p: f64,
    /// Classifier-free guidance scale (>= 1; 1 = off).
    pub guidance_scale: f64,
    /// Seed of the next generation; `None`: a fresh seed each time.
    pub seed: Option<u64>,
    /// Takes generated per request (1..=4).
    pub takes: usize,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self {
            greedy: false,
            temperature: 1.0,
            top_k: 250,
            top_p: 1.0,
            guidance_scale: 3.0,
            seed: None,
            takes: 1,
        }
    }
}

/// The persisted takes: the encoded takes state ([`crate::takes::encode_state`]) as a string,
/// plus a counter that tells the plugin when the host loaded a new one.
///
/// The non-realtime side refreshes the string after every change of the take store; the host
/// wrapper calls [`PersistentField::set`] when it loads a state (main thread), which only stores
/// the string and bumps [`TakesField::loaded`], so the plugin rebuilds its takes off the audio
/// thread (in `activate()` or on its controller thread).
/// Cheap to clone: clones share one field.
#[derive(Debug, Default, Clone)]
pub struct TakesField(Arc<TakesFieldInner>);

#[derive(Debug, Default)]
struct TakesFieldInner {
    json: RwLock<String>,
    loaded: AtomicU64,
}

impl TakesField {
    /// Times a state was loaded into this field.
    pub fn loaded(&self) -> u64 {
        self.0.loaded.load(Ordering::Acquire)
    }

    /// The encoded takes state (empty: no takes).
    pub fn json(&self) -> String {
        self.0.json.read().clone()
    }

    /// Replaces the encoded takes state without counting it as a load (the plugin's own saves).
    pub fn store(&self, json: String) {
        *self.0.json.write() = json;
    }
}

impl<'a> nice_plug::params::persist::PersistentField<'a, String> for TakesField {
    fn set(&self, new_value: String) {
        *self.0.json.write() = new_value;
        self.0.loaded.fetch_add(1, Ordering::AcqRel);
    }

    fn map<F, R>(&self, f: F) -> R
    where
        F: Fn(&String) -> R,
    {
        f(&self.0.json.read())
    }
}

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

    /// Which input is recorded.
    #[id = "capture-source"]
    pub capture_source: EnumParam<CaptureSource>,

    /// Length of the prompt in bars (the last bars played before the most recent bar line).
    #[id = "prompt-bars"]
    pub prompt_bars: IntParam,

    /// Length of the continuation in bars (at the tempo at capture).
    #[id = "continuation-bars"]
    pub continuation_bars: IntParam,

    /// How takes are played.
    #[id = "playback-mode"]
    pub playback_mode: EnumParam<PlaybackModeParam>,

    /// When a MIDI note starts the take (MIDI mode).
    #[id = "midi-quantise"]
    pub midi_quantise: EnumParam<MidiQuantiseParam>,

    /// Fade after a MIDI note-off, in milliseconds.
    #[id = "release"]
    pub release_ms: FloatParam,

    /// The MIDI note that requests a generation ([`NOTE_OFF`]: none).
    #[id = "generate-note"]
    pub generate_note: IntParam,

    /// Momentary: a rising edge (off to on) requests a generation at that exact sample.
    /// Host-automatable, so an automation lane can trigger generations.
    #[id = "generate"]
    pub generate: BoolParam,

    /// The text prompt.
    #[persist = "prompt-text"]
    pub prompt_text: Arc<RwLock<String>>,

    /// The model: a Hub id or a local folder.
    #[persist = "model"]
    pub model: Arc<RwLock<String>>,

    /// Sampling settings of new generations.
    #[persist = "sampling"]
    pub sampling: Arc<RwLock<SamplingSettings>>,

    /// Every take, encoded compactly (16-bit PCM at the model's rate).
    #[persist = "takes"]
    pub takes: TakesField,

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
            capture_source: EnumParam::new("Capture Source", CaptureSource::Main),
            prompt_bars: IntParam::new(
                "Prompt Bars",
                DEFAULT_PROMPT_BARS,
                IntRange::Linear {
                    min: PROMPT_BARS_RANGE.0,
                    max: PROMPT_BARS_RANGE.1,
                },
            ),
            continuation_bars: IntParam::new(
                "Continuation Bars",
                DEFAULT_CONTINUATION_BARS,
                IntRange::Linear {
                    min: CONTINUATION_BARS_RANGE.0,
                    max: CONTINUATION_BARS_RANGE.1,
                },
            ),
            playback_mode: EnumParam::new("Playback Mode", PlaybackModeParam::Timeline),
            midi_quantise: EnumParam::new("MIDI Quantise", MidiQuantiseParam::Immediate),
            release_ms: FloatParam::new(
                "Release",
                30.0,
                FloatRange::Skewed {
                    min: 1.0,
                    max: 2000.0,
                    factor: FloatRange::skew_factor(-2.0),
                },
            )
            .with_unit(" ms")
            .with_step_size(0.1),
            generate_note: IntParam::new(
                "Generate Note",
                NOTE_OFF,
                IntRange::Linear {
                    min: NOTE_OFF,
                    max: 127,
                },
            )
            .with_value_to_string(Arc::new(|n| {
                if n < 0 {
                    "Off".to_owned()
                } else {
                    n.to_string()
                }
            }))
            .with_string_to_value(Arc::new(|s| {
                let s = s.trim();
                if s.eq_ignore_ascii_case("off") {
                    Some(NOTE_OFF)
                } else {
                    s.parse().ok()
                }
            })),
            generate: BoolParam::new("Generate", false),
            prompt_text: Arc::new(RwLock::new(String::new())),
            model: Arc::new(RwLock::new(default_model())),
            sampling: Arc::new(RwLock::new(SamplingSettings::default())),
            takes: TakesField::default(),
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
        assert_eq!(
            ids,
            [
                "gain",
                "monitor",
                "capture-source",
                "prompt-bars",
                "continuation-bars",
                "playback-mode",
                "midi-quantise",
                "release",
                "generate-note",
                "generate"
            ]
        );
        let fields = params.serialize_fields();
        for key in [
            "state-version",
            "editor-size",
            "prompt-text",
            "model",
            "sampling",
            "takes",
        ] {
            assert!(fields.contains_key(key), "{key} missing from {fields:?}");
        }
    }

    #[test]
    fn takes_field_counts_host_loads_but_not_own_saves() {
        use nice_plug::params::persist::PersistentField;
        let params = SegueParams::default();
        assert_eq!(params.takes.loaded(), 0);
        params.takes.store("own".to_owned());
        assert_eq!(params.takes.loaded(), 0);
        let fields = params.serialize_fields();
        assert_eq!(fields["takes"], "\"own\"");
        let restored = SegueParams::default();
        restored.deserialize_fields(&fields);
        assert_eq!(restored.takes.loaded(), 1);
        assert_eq!(restored.takes.json(), "own");
        restored.takes.set("again".to_owned());
        assert_eq!(restored.takes.loaded(), 2);
        // Clones share the field (the controller thread holds one).
        assert_eq!(restored.takes.clone().json(), "again");
    }

    #[test]
    fn model_defaults_to_the_hub_checkpoint_or_the_environment() {
        let model = default_model();
        match std::env::var(MODEL_ENV) {
            Ok(m) if !m.trim().is_empty() => assert_eq!(model, m),
            _ => assert_eq!(model, DEFAULT_MODEL),
        }
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
