//! What the settings column offers and how its widgets map onto the persisted settings: the
//! model list, example prompts, the ranges of every sampling control, the seed's lock and dice,
//! and the sampling parameters a request gets. Plain data and functions, tested here; the
//! drawing in `mod.rs` calls them.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::ops::RangeInclusive;

use segue_engine::sampling::SamplingParams;

use crate::params::SamplingSettings;

/// A model the picker offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelChoice {
    /// The Hub id.
    pub id: &'static str,
    /// What the picker shows.
    pub label: &'static str,
}

/// The MusicGen checkpoints that continue audio from a text prompt (the melody models, which need
/// a chroma input, are not offered). Sizes as published: small 300M, medium 1.5B, large 3.3B
/// parameters.
pub const MODEL_CHOICES: [ModelChoice; 6] = [
    ModelChoice {
        id: "facebook/musicgen-small",
        label: "Small (mono, 300M)",
    },
    ModelChoice {
        id: "facebook/musicgen-medium",
        label: "Medium (mono, 1.5B)",
    },
    ModelChoice {
        id: "facebook/musicgen-large",
        label: "Large (mono, 3.3B)",
    },
    ModelChoice {
        id: "facebook/musicgen-stereo-small",
        label: "Small (stereo, 300M)",
    },
    ModelChoice {
        id: "facebook/musicgen-stereo-medium",
        label: "Medium (stereo, 1.5B)",
    },
    ModelChoice {
        id: "facebook/musicgen-stereo-large",
        label: "Large (stereo, 3.3B)",
    },
];

/// What the picker shows for the model `model` (a Hub id or a local folder).
pub fn model_label(model: &str) -> String {
    match MODEL_CHOICES.iter().find(|c| c.id == model) {
        Some(choice) => choice.label.to_owned(),
        None if is_local_folder(model) => format!("Folder: {}", short_model_name(model)),
        None => model.to_owned(),
    }
}

/// Whether `model` names a local folder rather than a Hub id (`owner/name`): an absolute path,
/// one starting with `.` or `~`, or one with more than one `/` or any `\`.
pub fn is_local_folder(model: &str) -> bool {
    let m = model.trim();
    m.starts_with('/')
        || m.starts_with('.')
        || m.starts_with('~')
        || m.contains('\\')
        || m.matches('/').count() > 1
        || (m.len() > 1 && m.as_bytes()[1] == b':')
}

/// The last part of a Hub id or a folder path (`musicgen-small`, `tiny-musicgen-mono`).
pub fn short_model_name(model: &str) -> &str {
    model
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(model)
}

/// Text prompts to start from (the prompt field's menu).
pub const EXAMPLE_PROMPTS: [&str; 6] = [
    "warm lo-fi hip hop beat with dusty drums and mellow Rhodes chords",
    "driving synthwave with punchy drums, arpeggiated bass and bright leads",
    "acoustic folk guitar, gentle fingerpicking, intimate and calm",
    "funky disco groove with slap bass, tight hi-hats and string stabs",
    "cinematic ambient pads, slow evolving textures, deep reverb",
    "energetic drum and bass, rolling breakbeats and a heavy reese bass",
];

/// Range of the temperature control.
pub const TEMPERATURE: RangeInclusive<f64> = 0.05..=2.0;
/// Range of the top-k control (1 keeps only the most likely token; MusicGen's codebooks have
/// 2048 entries).
pub const TOP_K: RangeInclusive<usize> = 1..=2048;
/// Range of the top-p control (1 = off).
pub const TOP_P: RangeInclusive<f64> = 0.01..=1.0;
/// Range of the guidance control (1 = off).
pub const GUIDANCE: RangeInclusive<f64> = 1.0..=10.0;
/// Range of the takes-per-generation control.
pub const TAKES: RangeInclusive<usize> = 1..=4;

/// `settings` with every value brought into the controls' ranges (non-finite values go back to
/// the defaults), so whatever a project or a typed number holds makes a valid request.
pub fn clamped(settings: &SamplingSettings) -> SamplingSettings {
    let d = SamplingSettings::default();
    let clamp_f = |x: f64, r: &RangeInclusive<f64>, default: f64| {
        if x.is_finite() {
            x.clamp(*r.start(), *r.end())
        } else {
            default
        }
    };
    SamplingSettings {
        greedy: settings.greedy,
        temperature: clamp_f(settings.temperature, &TEMPERATURE, d.temperature),
        top_k: settings.top_k.clamp(*TOP_K.start(), *TOP_K.end()),
        top_p: clamp_f(settings.top_p, &TOP_P, d.top_p),
        guidance_scale: clamp_f(settings.guidance_scale, &GUIDANCE, d.guidance_scale),
        seed: settings.seed,
        takes: settings.takes.clamp(*TAKES.start(), *TAKES.end()),
    }
}

/// The engine's sampling parameters for the settings (clamped first).
pub fn sampling_params(settings: &SamplingSettings) -> SamplingParams {
    let s = clamped(settings);
    SamplingParams {
        greedy: s.greedy,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        guidance_scale: s.guidance_scale,
    }
}

/// A fresh random seed (from the process's hash keys and the clock; not for cryptography).
pub fn random_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    // Seeds are shown and typed: keep them to 9 digits.
    hasher.finish() % 1_000_000_000
}

/// The settings after the seed lock was switched: locked keeps generating with `shown` (the seed
/// on screen: the locked one, or the last take's), unlocked draws a fresh seed every time.
pub fn with_seed_lock(settings: &SamplingSettings, locked: bool, shown: u64) -> SamplingSettings {
    SamplingSettings {
        seed: locked.then_some(shown),
        ..settings.clone()
    }
}

/// The settings after the dice: a new random seed, locked (so the next generation uses it).
pub fn with_random_seed(settings: &SamplingSettings) -> SamplingSettings {
    with_seed_lock(settings, true, random_seed())
}

/// The seed typed into the seed field (digits, surrounding spaces allowed); `None` when it is
/// not a number that fits in 64 bits.
pub fn parse_seed(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The seed the settings show: the locked one, else the seed of the last take (`last`), else 0.
pub fn shown_seed(settings: &SamplingSettings, last: Option<u64>) -> u64 {
    settings.seed.or(last).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picker_lists_every_text_model_in_both_channel_layouts() {
        for size in ["small", "medium", "large"] {
            assert!(MODEL_CHOICES
                .iter()
                .any(|c| c.id == format!("facebook/musicgen-{size}")));
            assert!(MODEL_CHOICES
                .iter()
                .any(|c| c.id == format!("facebook/musicgen-stereo-{size}")));
        }
        assert!(MODEL_CHOICES.iter().all(|c| !c.id.contains("melody")));
        assert_eq!(model_label("facebook/musicgen-small"), "Small (mono, 300M)");
        assert_eq!(model_label("someone/my-finetune"), "someone/my-finetune");
        assert_eq!(
            model_label("/models/tiny-musicgen-mono/"),
            "Folder: tiny-musicgen-mono"
        );
    }

    #[test]
    fn folders_are_told_from_hub_ids() {
        assert!(!is_local_folder("facebook/musicgen-small"));
        assert!(is_local_folder("/home/me/models/musicgen"));
        assert!(is_local_folder("./fixtures/tiny"));
        assert!(is_local_folder("~/models/x"));
        assert!(is_local_folder("C:\\models\\x"));
        assert!(is_local_folder("models/musicgen/small"));
        assert_eq!(
            short_model_name("facebook/musicgen-small"),
            "musicgen-small"
        );
        assert_eq!(short_model_name("C:\\models\\tiny\\"), "tiny");
        assert_eq!(short_model_name("plain"), "plain");
    }

    #[test]
    fn any_setting_maps_to_a_valid_request() {
        let wild = [
            SamplingSettings {
                temperature: 0.0,
                top_k: 0,
                top_p: 0.0,
                guidance_scale: 0.5,
                takes: 0,
                ..Default::default()
            },
            SamplingSettings {
                temperature: f64::NAN,
                top_k: usize::MAX,
                top_p: 7.0,
                guidance_scale: f64::INFINITY,
                takes: 99,
                ..Default::default()
            },
            SamplingSettings::default(),
        ];
        for s in &wild {
            let p = sampling_params(s);
            assert_eq!(p.validate(), Ok(()), "{s:?} gave {p:?}");
            let c = clamped(s);
            assert!(TAKES.contains(&c.takes));
        }
        let nan = clamped(&wild[1]);
        assert_eq!(
            nan.temperature, 1.0,
            "non-finite values fall back to defaults"
        );
        assert_eq!(nan.guidance_scale, 3.0);
        assert_eq!(nan.top_k, 2048);
        // In-range values pass through unchanged.
        let fine = SamplingSettings {
            greedy: true,
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            guidance_scale: 4.5,
            seed: Some(42),
            takes: 3,
        };
        assert_eq!(clamped(&fine), fine);
        let p = sampling_params(&fine);
        assert_eq!(
            (p.greedy, p.temperature, p.top_k, p.top_p, p.guidance_scale),
            (true, 0.7, 50, 0.9, 4.5)
        );
    }

    #[test]
    fn the_seed_lock_keeps_the_seed_on_screen() {
        let s = SamplingSettings::default();
        assert_eq!(s.seed, None);
        assert_eq!(shown_seed(&s, None), 0);
        assert_eq!(
            shown_seed(&s, Some(77)),
            77,
            "unlocked shows the last take's seed"
        );
        let locked = with_seed_lock(&s, true, 77);
        assert_eq!(locked.seed, Some(77));
        assert_eq!(shown_seed(&locked, Some(5)), 77);
        let unlocked = with_seed_lock(&locked, false, 77);
        assert_eq!(unlocked.seed, None);
        assert_eq!(
            SamplingSettings {
                seed: None,
                ..locked.clone()
            },
            unlocked,
            "nothing else changes"
        );
    }

    #[test]
    fn typed_seeds_are_whole_numbers() {
        assert_eq!(parse_seed(" 42 "), Some(42));
        assert_eq!(parse_seed("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_seed("18446744073709551616"), None);
        assert_eq!(parse_seed("-1"), None);
        assert_eq!(parse_seed("4.2"), None);
        assert_eq!(parse_seed(""), None);
    }

    #[test]
    fn the_dice_lock_a_new_seed() {
        let s = SamplingSettings::default();
        let seeds: Vec<u64> = (0..8)
            .map(|_| with_random_seed(&s).seed.expect("locked"))
            .collect();
        assert!(seeds.iter().all(|x| *x < 1_000_000_000));
        let mut distinct = seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 1, "{seeds:?}");
    }

    #[test]
    fn example_prompts_are_short_enough_to_read() {
        for p in EXAMPLE_PROMPTS {
            assert!(!p.is_empty() && p.len() < 100, "{p}");
        }
    }
}
