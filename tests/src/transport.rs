//! The host transport as a test script states it, and its CLAP encoding.
//!
//! [`Transport`] is a value: a test builds one (playing or stopped, tempo, time signature,
//! position, loop range), the harness turns it into the CLAP transport event of each block and
//! moves it forward by the block's length with [`Transport::advanced`], wrapping at the loop end
//! like a DAW does. Positions are in quarter-note beats (`pos_beats`) and seconds, as CLAP has them.

use clack_host::events::event_types::{TransportEvent, TransportFlags};
use clack_host::events::{EventFlags, EventHeader};
use clack_host::utils::{BeatTime, SecondsTime};

/// A time signature `numerator / denominator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSignature {
    /// Counted notes per bar.
    pub numerator: u16,
    /// Note value of a counted note (4 = quarter, 8 = eighth).
    pub denominator: u16,
}

impl TimeSignature {
    /// 4/4.
    pub const COMMON: TimeSignature = TimeSignature {
        numerator: 4,
        denominator: 4,
    };

    /// Bar length in quarter-note beats (4/4 = 4, 6/8 = 3, 7/8 = 3.5).
    pub fn beats_per_bar(self) -> f64 {
        self.numerator as f64 * 4.0 / self.denominator as f64
    }
}

/// The host's transport at one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transport {
    /// The transport is rolling.
    pub playing: bool,
    /// The host is recording.
    pub recording: bool,
    /// Tempo in quarter-note beats per minute; `None`: the host reports no tempo.
    pub tempo: Option<f64>,
    /// `None`: the host reports no time signature.
    pub time_signature: Option<TimeSignature>,
    /// Song position in quarter-note beats; `None`: the host reports no musical timeline.
    pub pos_beats: Option<f64>,
    /// Song position in seconds; `None`: the host reports no seconds timeline.
    pub pos_seconds: Option<f64>,
    /// Active loop range in beats, `[start, end)`; `None`: not looping.
    pub loop_beats: Option<(f64, f64)>,
}

impl Transport {
    /// A playing transport at song position 0 with the given tempo (BPM) and signature.
    pub fn playing(tempo: f64, time_signature: TimeSignature) -> Self {
        Self {
            playing: true,
            recording: false,
            tempo: Some(tempo),
            time_signature: Some(time_signature),
            pos_beats: Some(0.0),
            pos_seconds: Some(0.0),
            loop_beats: None,
        }
    }

    /// The same transport, stopped.
    pub fn stopped(self) -> Self {
        Self {
            playing: false,
            ..self
        }
    }

    /// The same transport moved to `beats` (quarter notes); the seconds position follows at the
    /// constant tempo.
    pub fn at_beats(self, beats: f64) -> Self {
        let seconds = self.tempo.map(|t| beats * 60.0 / t);
        Self {
            pos_beats: Some(beats),
            pos_seconds: seconds.or(self.pos_seconds),
            ..self
        }
    }

    /// The same transport moved to the start of bar `bar` (0-based).
    pub fn at_bar(self, bar: u32) -> Self {
        let beats = bar as f64 * self.beats_per_bar();
        self.at_beats(beats)
    }

    /// The same transport looping over `[start, end)` beats.
    pub fn looping(self, start_beats: f64, end_beats: f64) -> Self {
        assert!(
            end_beats > start_beats,
            "empty loop {start_beats}..{end_beats}"
        );
        Self {
            loop_beats: Some((start_beats, end_beats)),
            ..self
        }
    }

    /// A transport with no musical information at all (what a host gives when it has none).
    pub fn free_running() -> Self {
        Self {
            playing: true,
            recording: false,
            tempo: None,
            time_signature: None,
            pos_beats: None,
            pos_seconds: None,
            loop_beats: None,
        }
    }

    /// Bar length in beats (4/4 when the host reports no signature).
    pub fn beats_per_bar(&self) -> f64 {
        self.time_signature
            .unwrap_or(TimeSignature::COMMON)
            .beats_per_bar()
    }

    /// Samples per beat at `sample_rate` (Hz), if there is a tempo.
    pub fn samples_per_beat(&self, sample_rate: f64) -> Option<f64> {
        self.tempo.map(|t| sample_rate * 60.0 / t)
    }

    /// Start of the bar containing the current position, in beats, and that bar's 0-based
    /// number, assuming the signature holds from song position 0.
    pub fn bar(&self) -> Option<(f64, i32)> {
        let beats = self.pos_beats?;
        let per_bar = self.beats_per_bar();
        let number = (beats / per_bar + 1e-9).floor();
        Some((number * per_bar, number as i32))
    }

    /// Samples from the current position until the loop end, when looping and playing with a
    /// tempo and the loop end lies ahead.
    pub fn samples_to_loop_end(&self, sample_rate: f64) -> Option<f64> {
        let (_, end) = self.loop_beats?;
        if !self.playing {
            return None;
        }
        let beats = self.pos_beats?;
        let spb = self.samples_per_beat(sample_rate)?;
        (end > beats).then_some((end - beats) * spb)
    }

    /// The transport `frames` samples later at `sample_rate` (Hz). A stopped transport, or one
    /// without tempo, does not move (the seconds position of a tempo-less playing transport
    /// still does). Crossing the loop end wraps to the loop start, as hosts do.
    pub fn advanced(&self, frames: usize, sample_rate: f64) -> Self {
        let mut next = *self;
        if !self.playing {
            return next;
        }
        let seconds = frames as f64 / sample_rate;
        match (self.pos_beats, self.tempo) {
            (Some(beats), Some(tempo)) => {
                let mut beats = beats + seconds * tempo / 60.0;
                if let Some((start, end)) = self.loop_beats {
                    if beats >= end && self.pos_beats.is_some_and(|b| b < end) {
                        beats = start + (beats - end) % (end - start);
                    }
                }
                next = next.at_beats(beats);
            }
            _ => next.pos_seconds = self.pos_seconds.map(|s| s + seconds),
        }
        next
    }

    /// The CLAP transport event for this transport, at sample `time` of a block.
    pub fn to_clap(&self, time: u32) -> TransportEvent {
        let mut flags = TransportFlags::empty();
        flags.set(TransportFlags::IS_PLAYING, self.playing);
        flags.set(TransportFlags::IS_RECORDING, self.recording);
        flags.set(TransportFlags::HAS_TEMPO, self.tempo.is_some());
        flags.set(
            TransportFlags::HAS_TIME_SIGNATURE,
            self.time_signature.is_some(),
        );
        flags.set(TransportFlags::HAS_BEATS_TIMELINE, self.pos_beats.is_some());
        flags.set(
            TransportFlags::HAS_SECONDS_TIMELINE,
            self.pos_seconds.is_some(),
        );
        flags.set(TransportFlags::IS_LOOP_ACTIVE, self.loop_beats.is_some());
        let sig = self.time_signature.unwrap_or(TimeSignature::COMMON);
        let (bar_start, bar_number) = self.bar().unwrap_or((0.0, 0));
        let (loop_start, loop_end) = self.loop_beats.unwrap_or((0.0, 0.0));
        let to_seconds = |beats: f64| self.tempo.map_or(0.0, |t| beats * 60.0 / t);
        TransportEvent {
            header: EventHeader::new_core(time, EventFlags::empty()),
            flags,
            song_pos_beats: BeatTime::from_float(self.pos_beats.unwrap_or(0.0)),
            song_pos_seconds: SecondsTime::from_float(self.pos_seconds.unwrap_or(0.0)),
            tempo: self.tempo.unwrap_or(0.0),
            tempo_inc: 0.0,
            loop_start_beats: BeatTime::from_float(loop_start),
            loop_end_beats: BeatTime::from_float(loop_end),
            loop_start_seconds: SecondsTime::from_float(to_seconds(loop_start)),
            loop_end_seconds: SecondsTime::from_float(to_seconds(loop_end)),
            bar_start: BeatTime::from_float(bar_start),
            bar_number,
            time_signature_numerator: sig.numerator,
            time_signature_denominator: sig.denominator,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_by_tempo() {
        let t = Transport::playing(120.0, TimeSignature::COMMON);
        // 120 BPM at 48 kHz: 24000 samples per beat.
        let t = t.advanced(48_000, 48_000.0);
        assert!((t.pos_beats.unwrap() - 2.0).abs() < 1e-12);
        assert!((t.pos_seconds.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(t.stopped().advanced(48_000, 48_000.0), t.stopped());
    }

    #[test]
    fn loop_wraps_to_start() {
        let t = Transport::playing(120.0, TimeSignature::COMMON)
            .at_beats(7.0)
            .looping(4.0, 8.0);
        // 1.5 beats later: 0.5 beats past the end -> 4.5.
        let next = t.advanced(36_000, 48_000.0);
        assert!((next.pos_beats.unwrap() - 4.5).abs() < 1e-9, "{next:?}");
        assert!((t.samples_to_loop_end(48_000.0).unwrap() - 24_000.0).abs() < 1e-9);
    }

    #[test]
    fn bars_follow_signature() {
        let seven_eight = TimeSignature {
            numerator: 7,
            denominator: 8,
        };
        let t = Transport::playing(100.0, seven_eight).at_bar(3);
        assert_eq!(t.pos_beats, Some(10.5));
        assert_eq!(t.bar(), Some((10.5, 3)));
        let e = t.to_clap(5);
        assert_eq!(e.header.time(), 5);
        assert_eq!(e.bar_number, 3);
        assert_eq!(e.time_signature_numerator, 7);
        assert!((e.song_pos_beats.to_float() - 10.5).abs() < 1e-9);
        assert!((e.song_pos_seconds.to_float() - 6.3).abs() < 1e-9);
        assert!(e
            .flags
            .contains(TransportFlags::IS_PLAYING | TransportFlags::HAS_TEMPO));
        assert!(!e.flags.contains(TransportFlags::IS_LOOP_ACTIVE));
    }

    #[test]
    fn free_running_has_no_musical_flags() {
        let e = Transport::free_running().to_clap(0);
        assert_eq!(e.flags, TransportFlags::IS_PLAYING);
    }
}
