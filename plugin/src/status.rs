//! What the plugin is doing, in a form the editor can draw and the log can print.
//!
//! The controller thread writes a [`Status`] (behind [`crate::controller::Shared::status`], a
//! non-realtime lock) from the engine's events; the editor reads a copy each frame. Every update
//! bumps [`Status::revision`], so the editor can tell a change without comparing contents. The
//! audio thread never touches it.

use std::time::{Duration, Instant};

use segue_engine::service::LoadStage;

use crate::export::ExportReport;

/// What getting the model ready is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum Loading {
    /// Downloading `file` from the Hub: `bytes` of `total` so far.
    Downloading {
        /// File name within the model repository.
        file: String,
        /// Bytes downloaded so far.
        bytes: u64,
        /// File size in bytes, when the server says.
        total: Option<u64>,
    },
    /// Reading the weights into memory (or preparing the engine).
    Reading,
}

impl Loading {
    /// Fraction done in `0..=1`, when known.
    pub fn fraction(&self) -> Option<f32> {
        match self {
            Loading::Downloading {
                bytes,
                total: Some(total),
                ..
            } if *total > 0 => Some((*bytes as f64 / *total as f64).clamp(0.0, 1.0) as f32),
            _ => None,
        }
    }
}

/// The phase of the current (or last) generation.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Phase {
    /// Nothing was asked yet.
    #[default]
    Idle,
    /// A generation was asked for; the engine has not started on it yet.
    Starting,
    /// The model is being downloaded or loaded.
    Loading(Loading),
    /// The decoder runs: `step` of `total` steps done at `steps_per_s`.
    Generating {
        /// Steps done (1-based).
        step: usize,
        /// Steps in all.
        total: usize,
        /// Recent speed in steps per second.
        steps_per_s: f64,
    },
    /// The last generation made `takes` takes.
    Ready {
        /// How many takes it made.
        takes: usize,
    },
    /// The last generation failed; the reason in plain words.
    Failed(String),
    /// The last generation was cancelled.
    Cancelled,
}

impl Phase {
    /// Whether a generation is under way.
    pub fn is_running(&self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Loading(_) | Phase::Generating { .. }
        )
    }

    /// Phase for one of the engine's load stages.
    pub fn from_load(stage: LoadStage) -> Phase {
        Phase::Loading(match stage {
            LoadStage::Downloading { file, bytes, total } => {
                Loading::Downloading { file, bytes, total }
            }
            LoadStage::Downloaded { .. } | LoadStage::Loading => Loading::Reading,
        })
    }
}

/// The plugin's status as the editor shows it.
#[derive(Debug, Clone)]
pub struct Status {
    /// Where the current or last generation is.
    pub phase: Phase,
    /// When `phase` began.
    pub since: Instant,
    /// The model of the last generation (a Hub id or a folder), once the engine reported it.
    pub model: Option<String>,
    /// The device it runs on, in words (`"cpu"`, `"cuda:0"`).
    pub device: Option<String>,
    /// Why the model does not run on the device that was asked for, if it does not.
    pub device_note: Option<String>,
    /// The last thing that went wrong outside generation (renaming, exporting…), in plain words.
    pub notice: Option<String>,
    /// Where the last export went, or why it failed.
    pub export: Option<Result<ExportReport, String>>,
    /// Bumped on every change.
    pub revision: u64,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            phase: Phase::Idle,
            since: Instant::now(),
            model: None,
            device: None,
            device_note: None,
            notice: None,
            export: None,
            revision: 0,
        }
    }
}

impl Status {
    /// Moves to `phase` (the start time only changes when the kind of phase does, so a stream of
    /// progress updates keeps the time the decoder started).
    pub fn set_phase(&mut self, phase: Phase) {
        if std::mem::discriminant(&phase) != std::mem::discriminant(&self.phase) {
            self.since = Instant::now();
        }
        // A new generation starts with a clean slate.
        if phase == Phase::Starting {
            self.notice = None;
        }
        self.phase = phase;
        self.revision += 1;
    }

    /// Records a notice (or clears it with `None`).
    pub fn set_notice(&mut self, notice: Option<String>) {
        self.notice = notice;
        self.revision += 1;
    }

    /// A one-line account, for the log and the window's status line.
    pub fn line(&self) -> String {
        match &self.phase {
            Phase::Idle => "Ready to generate".to_owned(),
            Phase::Starting => "Starting…".to_owned(),
            Phase::Loading(Loading::Downloading { file, bytes, total }) => match total {
                Some(t) => format!(
                    "Downloading {file}: {} of {}",
                    format_bytes(*bytes),
                    format_bytes(*t)
                ),
                None => format!("Downloading {file}: {}", format_bytes(*bytes)),
            },
            Phase::Loading(Loading::Reading) => "Loading the model…".to_owned(),
            Phase::Generating {
                step,
                total,
                steps_per_s,
            } => {
                let mut line = format!("Generating: step {step} of {total}");
                if *steps_per_s > 0.0 {
                    line.push_str(&format!(", {steps_per_s:.1} steps/s"));
                }
                if let Some(left) = time_left(*step, *total, *steps_per_s) {
                    line.push_str(&format!(", {} left", format_duration(left)));
                }
                line
            }
            Phase::Ready { takes: 1 } => "Take ready".to_owned(),
            Phase::Ready { takes } => format!("{takes} takes ready"),
            Phase::Failed(reason) => format!("Generation failed: {reason}"),
            Phase::Cancelled => "Cancelled".to_owned(),
        }
    }
}

/// Time the remaining `total - step` steps take at `steps_per_s`; `None` when the speed is not
/// known yet (zero, negative or not finite) or the step count is inconsistent.
pub fn time_left(step: usize, total: usize, steps_per_s: f64) -> Option<Duration> {
    if !(steps_per_s.is_finite() && steps_per_s > 0.0) || step > total {
        return None;
    }
    let seconds = (total - step) as f64 / steps_per_s;
    Duration::try_from_secs_f64(seconds).ok()
}

/// A short human duration: `"0:07"`, `"2:05"`, `"1:02:03"` (seconds rounded up, so "0:00" only
/// when nothing is left).
pub fn format_duration(d: Duration) -> String {
    let total = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// A short size in bytes: `"512 B"`, `"1.5 MB"`, `"2.1 GB"` (powers of 1000, as download
/// sizes are shown on the Hub).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_counts_the_remaining_steps() {
        assert_eq!(time_left(10, 110, 50.0), Some(Duration::from_secs(2)));
        assert_eq!(time_left(110, 110, 50.0), Some(Duration::ZERO));
        assert_eq!(
            time_left(0, 3, 2.0),
            Some(Duration::from_millis(1500)),
            "fractional seconds are kept"
        );
    }

    #[test]
    fn time_left_is_unknown_without_a_speed() {
        assert_eq!(time_left(1, 10, 0.0), None);
        assert_eq!(time_left(1, 10, -3.0), None);
        assert_eq!(time_left(1, 10, f64::NAN), None);
        assert_eq!(time_left(1, 10, f64::INFINITY), None);
        assert_eq!(time_left(11, 10, 5.0), None, "step past the total");
    }

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(format_duration(Duration::ZERO), "0:00");
        assert_eq!(format_duration(Duration::from_millis(6_100)), "0:07");
        assert_eq!(format_duration(Duration::from_secs(125)), "2:05");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1:02:03");
    }

    #[test]
    fn bytes_read_in_hub_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1_500), "1.5 kB");
        assert_eq!(format_bytes(2_200_000_000), "2.2 GB");
    }

    #[test]
    fn phases_change_the_line_and_keep_their_start() {
        let mut status = Status::default();
        assert_eq!(status.line(), "Ready to generate");
        status.set_phase(Phase::Generating {
            step: 1,
            total: 101,
            steps_per_s: 0.0,
        });
        assert_eq!(status.line(), "Generating: step 1 of 101");
        let started = status.since;
        std::thread::sleep(Duration::from_millis(2));
        status.set_phase(Phase::Generating {
            step: 51,
            total: 101,
            steps_per_s: 25.0,
        });
        assert_eq!(status.since, started, "progress keeps the phase's start");
        assert_eq!(
            status.line(),
            "Generating: step 51 of 101, 25.0 steps/s, 0:02 left"
        );
        assert!(status.phase.is_running());
        let revision = status.revision;
        status.set_phase(Phase::Failed("no network".into()));
        assert!(status.since > started);
        assert!(status.revision > revision);
        assert!(!status.phase.is_running());
        assert_eq!(status.line(), "Generation failed: no network");
    }

    #[test]
    fn a_new_generation_clears_the_last_notice() {
        let mut status = Status::default();
        status.set_notice(Some("cannot rename the take".into()));
        status.set_phase(Phase::Loading(Loading::Reading));
        assert!(status.notice.is_some(), "loading keeps it");
        status.set_phase(Phase::Starting);
        assert_eq!(status.notice, None);
    }

    #[test]
    fn load_stages_become_loading_phases() {
        let phase = Phase::from_load(LoadStage::Downloading {
            file: "model.safetensors".into(),
            bytes: 250,
            total: Some(1000),
        });
        let Phase::Loading(loading) = &phase else {
            panic!("{phase:?}");
        };
        assert_eq!(loading.fraction(), Some(0.25));
        let mut status = Status::default();
        status.set_phase(phase);
        assert_eq!(
            status.line(),
            "Downloading model.safetensors: 250 B of 1.0 kB"
        );
        assert_eq!(
            Phase::from_load(LoadStage::Loading),
            Phase::Loading(Loading::Reading)
        );
        assert_eq!(Loading::Reading.fraction(), None);
    }
}
