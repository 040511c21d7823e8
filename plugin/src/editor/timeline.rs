//! The geometry of the waveform lanes: how long each lane is, where its bar lines and its
//! playhead fall. Pure functions of the musical data; the drawing in `mod.rs` only maps the
//! results onto pixels.
//!
//! Every lane is measured in seconds from its own start and all lanes share one scale (the
//! longest lane fills the width), so lengths compare at a glance. Lanes on the musical timeline
//! ([`Ruler::Bars`]) get a line per bar, labelled with the host's bar number, and fainter lines
//! per beat; the others ([`Ruler::Seconds`]) a line per second.

use crate::capture::TransportNow;
use crate::takes::TakeAnchor;
use crate::transport::TimeSig;

/// How a lane's time is marked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ruler {
    /// Bars at a fixed tempo; the lane starts on the line of bar `first_bar` (0-based, as the
    /// host counts; labels show it 1-based, as hosts display it).
    Bars {
        /// Tempo in beats per minute.
        tempo_bpm: f64,
        /// Time signature.
        time_sig: TimeSig,
        /// The bar at the lane's start.
        first_bar: i64,
    },
    /// Plain seconds (no musical position was known).
    Seconds,
}

impl Ruler {
    /// The ruler of a take anchored at `anchor` (seconds without one).
    pub fn for_take(anchor: Option<&TakeAnchor>) -> Ruler {
        match anchor {
            Some(a) => Ruler::Bars {
                tempo_bpm: a.tempo_bpm,
                time_sig: TimeSig {
                    numerator: a.time_sig_numerator,
                    denominator: a.time_sig_denominator,
                },
                first_bar: a.bar_index,
            },
            None => Ruler::Seconds,
        }
    }

    /// Seconds per bar (`None` for seconds rulers or a tempo that makes no sense).
    pub fn seconds_per_bar(&self) -> Option<f64> {
        match self {
            Ruler::Bars {
                tempo_bpm,
                time_sig,
                ..
            } if *tempo_bpm > 0.0 && tempo_bpm.is_finite() => {
                Some(time_sig.beats_per_bar() * 60.0 / tempo_bpm)
            }
            _ => None,
        }
    }
}

/// One line of a lane's ruler.
#[derive(Debug, Clone, PartialEq)]
pub struct GridLine {
    /// Seconds from the lane's start.
    pub at_s: f64,
    /// A bar (or second) line, as opposed to a beat line.
    pub major: bool,
    /// Text next to major lines: the bar number as hosts show it (1-based), or seconds.
    pub label: Option<String>,
}

/// Most lines a lane draws; beyond it beats are dropped, then every other bar.
pub const MAX_LINES: usize = 400;

/// The ruler lines of a lane `len_s` seconds long, when `px_per_s` pixels show a second: bar
/// lines (labelled) and, when beats are at least `min_beat_px` apart, beat lines. Bar labels
/// thin out (every 2nd, 4th… bar) so that labelled lines are at least `min_label_px` apart.
pub fn grid_lines(
    ruler: &Ruler,
    len_s: f64,
    px_per_s: f64,
    min_beat_px: f64,
    min_label_px: f64,
) -> Vec<GridLine> {
    if !(len_s.is_finite() && len_s > 0.0 && px_per_s.is_finite() && px_per_s > 0.0) {
        return Vec::new();
    }
    let (major_s, first_label, beats_per_major, unit_suffix) =
        match (ruler, ruler.seconds_per_bar()) {
            (
                Ruler::Bars {
                    time_sig,
                    first_bar,
                    ..
                },
                Some(bar_s),
            ) => (
                bar_s,
                *first_bar + 1,
                // Beat lines are quarter notes scaled to the signature's beat unit.
                time_sig.numerator.max(1) as usize,
                "",
            ),
            _ => (1.0, 0, 1, "s"),
        };
    let majors = (len_s / major_s + 1e-9).floor() as usize;
    let mut label_every = 1usize;
    while (label_every as f64) * major_s * px_per_s < min_label_px && label_every < 1 << 20 {
        label_every *= 2;
    }
    let beat_s = major_s / beats_per_major as f64;
    let beats = beats_per_major > 1 && beat_s * px_per_s >= min_beat_px;
    let mut lines = Vec::new();
    for k in 0..=majors {
        if lines.len() >= MAX_LINES {
            break;
        }
        let at_s = k as f64 * major_s;
        let label =
            (k % label_every == 0).then(|| format!("{}{unit_suffix}", first_label + k as i64));
        lines.push(GridLine {
            at_s,
            major: true,
            label,
        });
        if beats {
            for b in 1..beats_per_major {
                let at = at_s + b as f64 * beat_s;
                if at < len_s {
                    lines.push(GridLine {
                        at_s: at,
                        major: false,
                        label: None,
                    });
                }
            }
        }
    }
    lines
}

/// Where the host's playhead is on a bar ruler, in seconds from the lane's start, if the
/// transport runs on the same grid (tempo and signature). `None` for seconds rulers, a stopped
/// transport or one without a musical position.
pub fn transport_playhead_s(ruler: &Ruler, now: &TransportNow) -> Option<f64> {
    let grid = now.grid?;
    if !now.playing {
        return None;
    }
    let Ruler::Bars { first_bar, .. } = ruler else {
        return None;
    };
    let bar_s = ruler.seconds_per_bar()?;
    let beats_per_bar = grid.time_sig.beats_per_bar();
    if beats_per_bar <= 0.0 {
        return None;
    }
    // Bars since the lane's first bar line, from the grid's own bar origin.
    let bars_from_origin = (grid.pos_beats - grid.origin_beats) / beats_per_bar;
    let bars = grid.origin_bar as f64 + bars_from_origin - *first_bar as f64;
    let at = bars * bar_s;
    at.is_finite().then_some(at)
}

/// The lane length in seconds of `frames` frames at `sample_rate` Hz.
pub fn frames_to_s(frames: u64, sample_rate: f64) -> f64 {
    if sample_rate > 0.0 {
        frames as f64 / sample_rate
    } else {
        0.0
    }
}

/// The common scale: pixels per second such that the longest of `lens_s` fills `width_px`
/// (`None` when there is nothing to show).
pub fn px_per_s(width_px: f64, lens_s: impl IntoIterator<Item = f64>) -> Option<f64> {
    let longest = lens_s
        .into_iter()
        .filter(|l| l.is_finite())
        .fold(0.0f64, f64::max);
    (longest > 0.0 && width_px > 0.0).then(|| width_px / longest)
}

/// Most bars a shared axis spans; lanes further apart are drawn each from its own start.
pub const MAX_SHARED_BARS: f64 = 32.0;

/// How the lanes sit side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrangement {
    /// The ruler every lane shares (bar lines line up across lanes, one playhead runs over
    /// all), or `None` when each lane starts at the left with its own ruler.
    pub shared: Option<Ruler>,
    /// Where each lane starts, in seconds from the left edge.
    pub offsets_s: Vec<f64>,
    /// Seconds the width shows.
    pub len_s: f64,
}

/// Arranges lanes given as `(ruler, length in seconds)`: on one bar axis when every lane is on
/// the musical timeline at the same tempo and signature and together they span at most
/// `max_bars` bars, each lane at its own bar; otherwise each from the left edge.
pub fn arrange(lanes: &[(Ruler, f64)], max_bars: f64) -> Arrangement {
    let per_lane = || Arrangement {
        shared: None,
        offsets_s: vec![0.0; lanes.len()],
        len_s: lanes
            .iter()
            .map(|(_, l)| *l)
            .filter(|l| l.is_finite())
            .fold(0.0, f64::max),
    };
    let Some((first, _)) = lanes.first() else {
        return per_lane();
    };
    let (tempo, sig) = match first {
        Ruler::Bars {
            tempo_bpm,
            time_sig,
            ..
        } => (*tempo_bpm, *time_sig),
        Ruler::Seconds => return per_lane(),
    };
    let Some(bar_s) = first.seconds_per_bar() else {
        return per_lane();
    };
    let mut start_bar = i64::MAX;
    let mut end_s = f64::NEG_INFINITY;
    for (ruler, len_s) in lanes {
        match ruler {
            Ruler::Bars {
                tempo_bpm,
                time_sig,
                first_bar,
            } if (*tempo_bpm - tempo).abs() < 1e-6 && *time_sig == sig && len_s.is_finite() => {
                start_bar = start_bar.min(*first_bar);
                end_s = end_s.max(*first_bar as f64 * bar_s + len_s);
            }
            _ => return per_lane(),
        }
    }
    let len_s = end_s - start_bar as f64 * bar_s;
    if !(len_s > 0.0 && len_s / bar_s <= max_bars + 1e-9) {
        return per_lane();
    }
    let offsets_s = lanes
        .iter()
        .map(|(ruler, _)| match ruler {
            Ruler::Bars { first_bar, .. } => (*first_bar - start_bar) as f64 * bar_s,
            Ruler::Seconds => 0.0,
        })
        .collect();
    Arrangement {
        shared: Some(Ruler::Bars {
            tempo_bpm: tempo,
            time_sig: sig,
            first_bar: start_bar,
        }),
        offsets_s,
        len_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Grid;

    fn four_four(first_bar: i64) -> Ruler {
        Ruler::Bars {
            tempo_bpm: 120.0,
            time_sig: TimeSig {
                numerator: 4,
                denominator: 4,
            },
            first_bar,
        }
    }

    #[test]
    fn bars_last_as_long_as_the_signature_says() {
        assert_eq!(four_four(0).seconds_per_bar(), Some(2.0));
        let six_eight = Ruler::Bars {
            tempo_bpm: 90.0,
            time_sig: TimeSig {
                numerator: 6,
                denominator: 8,
            },
            first_bar: 0,
        };
        // 6/8 is 3 quarter notes: 3 * 60 / 90 s.
        assert_eq!(six_eight.seconds_per_bar(), Some(2.0));
        assert_eq!(Ruler::Seconds.seconds_per_bar(), None);
        let still = Ruler::Bars {
            tempo_bpm: 0.0,
            time_sig: TimeSig {
                numerator: 4,
                denominator: 4,
            },
            first_bar: 0,
        };
        assert_eq!(still.seconds_per_bar(), None);
    }

    #[test]
    fn bar_lines_carry_host_bar_numbers_and_beats_between() {
        // Bars 5..=6 (0-based 4, 5) of 2 s each, 100 px per second: beats 50 px apart.
        let lines = grid_lines(&four_four(4), 4.0, 100.0, 8.0, 30.0);
        let majors: Vec<_> = lines.iter().filter(|l| l.major).collect();
        assert_eq!(
            majors.iter().map(|l| l.at_s).collect::<Vec<_>>(),
            vec![0.0, 2.0, 4.0]
        );
        assert_eq!(
            majors
                .iter()
                .map(|l| l.label.clone().unwrap())
                .collect::<Vec<_>>(),
            vec!["5", "6", "7"]
        );
        let beats: Vec<f64> = lines.iter().filter(|l| !l.major).map(|l| l.at_s).collect();
        assert_eq!(beats, vec![0.5, 1.0, 1.5, 2.5, 3.0, 3.5]);
    }

    #[test]
    fn crowded_rulers_thin_out() {
        // 2 s bars at 5 px per second: bars 10 px apart, beats 2.5 px: no beats, labels every
        // 4th bar (40 px >= 30 px).
        let lines = grid_lines(&four_four(0), 32.0, 5.0, 8.0, 30.0);
        assert!(lines.iter().all(|l| l.major));
        assert_eq!(lines.len(), 17);
        let labelled: Vec<_> = lines.iter().filter_map(|l| l.label.clone()).collect();
        assert_eq!(labelled, vec!["1", "5", "9", "13", "17"]);
        assert!(grid_lines(&four_four(0), 1e9, 1e-9, 8.0, 30.0).len() <= MAX_LINES);
    }

    #[test]
    fn seconds_rulers_count_seconds() {
        let lines = grid_lines(&Ruler::Seconds, 2.5, 100.0, 8.0, 30.0);
        let labels: Vec<_> = lines.iter().filter_map(|l| l.label.clone()).collect();
        assert_eq!(labels, vec!["0s", "1s", "2s"]);
        assert!(grid_lines(&Ruler::Seconds, 0.0, 100.0, 8.0, 30.0).is_empty());
        assert!(grid_lines(&Ruler::Seconds, f64::NAN, 100.0, 8.0, 30.0).is_empty());
    }

    #[test]
    fn playhead_follows_the_transport_on_the_lane() {
        let grid = Grid {
            // Beat 19 = bar 5 (0-based 4) plus 3 beats.
            pos_beats: 19.0,
            samples_per_beat: 24_000.0,
            tempo_bpm: 120.0,
            time_sig: TimeSig {
                numerator: 4,
                denominator: 4,
            },
            origin_beats: 0.0,
            origin_bar: 0,
        };
        let now = TransportNow {
            frames: 1000,
            playing: true,
            grid: Some(grid),
        };
        // A lane starting at 0-based bar 4: 0.75 bars in = 1.5 s.
        assert_eq!(transport_playhead_s(&four_four(4), &now), Some(1.5));
        // A lane starting at bar 2: 2.75 bars in.
        assert_eq!(transport_playhead_s(&four_four(2), &now), Some(5.5));
        let stopped = TransportNow {
            playing: false,
            ..now
        };
        assert_eq!(transport_playhead_s(&four_four(4), &stopped), None);
        assert_eq!(transport_playhead_s(&Ruler::Seconds, &now), None);
    }

    #[test]
    fn lanes_on_one_grid_share_an_axis() {
        // A 4-bar prompt from bar 4 (0-based) plus the bar being played, takes at bars 4 and 5.
        let lanes = [
            (four_four(4), 10.0),
            (four_four(4), 2.0),
            (four_four(5), 2.0),
        ];
        let a = arrange(&lanes, MAX_SHARED_BARS);
        assert_eq!(a.shared, Some(four_four(4)));
        assert_eq!(a.offsets_s, vec![0.0, 0.0, 2.0]);
        assert_eq!(a.len_s, 10.0);
        // An earlier take widens the axis to the left.
        let lanes = [(four_four(8), 10.0), (four_four(6), 2.0)];
        let a = arrange(&lanes, MAX_SHARED_BARS);
        assert_eq!(a.shared, Some(four_four(6)));
        assert_eq!(a.offsets_s, vec![4.0, 0.0]);
        assert_eq!(a.len_s, 14.0);
    }

    #[test]
    fn lanes_apart_or_off_grid_start_at_the_left() {
        let far = [(four_four(100), 10.0), (four_four(4), 2.0)];
        let a = arrange(&far, MAX_SHARED_BARS);
        assert_eq!(a.shared, None);
        assert_eq!(a.offsets_s, vec![0.0, 0.0]);
        assert_eq!(a.len_s, 10.0);
        let other_tempo = Ruler::Bars {
            tempo_bpm: 90.0,
            time_sig: TimeSig {
                numerator: 4,
                denominator: 4,
            },
            first_bar: 4,
        };
        assert_eq!(
            arrange(&[(four_four(4), 2.0), (other_tempo, 2.0)], MAX_SHARED_BARS).shared,
            None
        );
        assert_eq!(
            arrange(
                &[(four_four(4), 2.0), (Ruler::Seconds, 3.0)],
                MAX_SHARED_BARS
            ),
            Arrangement {
                shared: None,
                offsets_s: vec![0.0, 0.0],
                len_s: 3.0
            }
        );
        assert_eq!(arrange(&[], MAX_SHARED_BARS).len_s, 0.0);
    }

    #[test]
    fn the_longest_lane_fills_the_width() {
        assert_eq!(px_per_s(800.0, [2.0, 8.0, 4.0]), Some(100.0));
        assert_eq!(px_per_s(800.0, []), None);
        assert_eq!(px_per_s(800.0, [0.0, f64::NAN]), None);
        assert_eq!(frames_to_s(96_000, 48_000.0), 2.0);
        assert_eq!(frames_to_s(10, 0.0), 0.0);
    }
}
