//! Musical time: beats <-> samples, bar lines, the prompt region.
//!
//! Everything here is a pure function over plain numbers (no nice-plug types except the one
//! conversion [`TransportSnapshot::from_host`]), cheap and allocation-free, so the audio thread
//! may call any of it.
//!
//! Conventions (shared with `capture`, `playback` and `takes`):
//! - A *beat* is a quarter note, as hosts report `pos_beats` (CLAP, VST3 and nice-plug all do).
//!   A bar of `n/d` lasts `n * 4 / d` beats: 4/4 = 4, 3/4 = 3, 6/8 = 3, 7/8 = 3.5.
//! - Sample `i` of a block sits at the block's start position plus `i` samples. A musical
//!   position that falls between two samples belongs to the *next* sample: the first sample of
//!   a bar is the first sample at or after the bar line ([`first_sample_at_or_after`]). A bar line
//!   exactly on a sample (within [`SAMPLE_EPSILON`]) is that sample.
//! - Bar lines sit at `origin + k * beats_per_bar` beats. The origin is the host's
//!   `bar_start_pos_beats` when it gives one (it knows about signature changes), else beat 0.

/// Tolerance, in samples, under which a musical position counts as falling exactly on a sample.
/// Hosts quantise positions: CLAP sends beats as fixed point with 2^31 steps per beat, an error
/// of up to 2^-32 beats, which is 5e-6 samples at 120 BPM and 44.1 kHz and 3e-4 samples at
/// 20 BPM and 192 kHz. A thousandth of a sample covers that and is inaudible as an offset.
pub const SAMPLE_EPSILON: f64 = 1e-3;

/// Tolerance, in beats, for "this position is on a bar line".
pub const BEAT_EPSILON: f64 = 1e-9;

/// A time signature, `numerator / denominator` (e.g. 7/8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSig {
    /// Beats in a bar, counted in `denominator` notes.
    pub numerator: u32,
    /// The note value of one counted beat (4 = quarter, 8 = eighth).
    pub denominator: u32,
}

impl TimeSig {
    /// 4/4, what a host without a time signature is assumed to play.
    pub const COMMON: TimeSig = TimeSig {
        numerator: 4,
        denominator: 4,
    };

    /// Bar length in quarter-note beats (4/4 = 4, 6/8 = 3, 7/8 = 3.5). Degenerate signatures
    /// (a zero numerator or denominator) count as 4/4 rather than dividing by zero.
    pub fn beats_per_bar(self) -> f64 {
        if self.numerator == 0 || self.denominator == 0 {
            return 4.0;
        }
        self.numerator as f64 * 4.0 / self.denominator as f64
    }
}

/// Samples per quarter-note beat at `tempo_bpm` and `sample_rate` (Hz).
#[inline]
pub fn samples_per_beat(tempo_bpm: f64, sample_rate: f64) -> f64 {
    sample_rate * 60.0 / tempo_bpm
}

/// A position in beats as a (fractional) sample count at a constant tempo.
#[inline]
pub fn beats_to_samples(beats: f64, tempo_bpm: f64, sample_rate: f64) -> f64 {
    beats * samples_per_beat(tempo_bpm, sample_rate)
}

/// A (fractional) sample count as beats at a constant tempo.
#[inline]
pub fn samples_to_beats(samples: f64, tempo_bpm: f64, sample_rate: f64) -> f64 {
    samples / samples_per_beat(tempo_bpm, sample_rate)
}

/// Length of `bars` bars in seconds at a constant tempo.
#[inline]
pub fn bars_to_seconds(bars: f64, time_sig: TimeSig, tempo_bpm: f64) -> f64 {
    bars * time_sig.beats_per_bar() * 60.0 / tempo_bpm
}

/// The first integer sample at or after the fractional sample position `x`; positions within
/// [`SAMPLE_EPSILON`] above an integer count as that integer.
#[inline]
pub fn first_sample_at_or_after(x: f64) -> i64 {
    (x - SAMPLE_EPSILON).ceil() as i64
}

/// The bar line at or after `pos_beats` (a position on a bar line is its own answer).
pub fn bar_line_at_or_after(pos_beats: f64, beats_per_bar: f64, origin_beats: f64) -> f64 {
    let k = ((pos_beats - origin_beats) / beats_per_bar - BEAT_EPSILON).ceil();
    origin_beats + k * beats_per_bar
}

/// The bar line at or before `pos_beats` (the start of the bar that contains it).
pub fn bar_line_at_or_before(pos_beats: f64, beats_per_bar: f64, origin_beats: f64) -> f64 {
    let k = ((pos_beats - origin_beats) / beats_per_bar + BEAT_EPSILON).floor();
    origin_beats + k * beats_per_bar
}

/// The last bar line strictly before `pos_beats`.
pub fn bar_line_before(pos_beats: f64, beats_per_bar: f64, origin_beats: f64) -> f64 {
    let k = ((pos_beats - origin_beats) / beats_per_bar - BEAT_EPSILON).ceil() - 1.0;
    origin_beats + k * beats_per_bar
}

/// Index of the bar that starts at `bar_line_beats`, counted from the bar at the origin, whose
/// index is `origin_bar` (the host's `bar_number`, else `floor(origin / beats_per_bar)`).
pub fn bar_index(
    bar_line_beats: f64,
    beats_per_bar: f64,
    origin_beats: f64,
    origin_bar: i64,
) -> i64 {
    // Saturating: a host's absurd bar number must not panic (overflow checks in debug builds).
    origin_bar.saturating_add(((bar_line_beats - origin_beats) / beats_per_bar).round() as i64)
}

/// A grid line (bar line, or beat with `grid = 1.0`) whose first sample falls inside a block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridHit {
    /// Offset of the line's first sample inside the block, `0..block_len`.
    pub offset: usize,
    /// Position of the line in beats.
    pub beats: f64,
    /// How far (in samples, `0.0..1.0`) the line lies before the sample at `offset`.
    pub frac: f64,
}

/// The first grid line (`origin + k * grid` beats) whose first sample lies in the block of
/// `block_len` samples starting at `block_beats`, at `samples_per_beat`. `None` when no line
/// starts a sample in this block. A line that falls between the previous block's last sample and
/// this block's first belongs to this block (offset 0), matching [`first_sample_at_or_after`].
pub fn grid_line_in_block(
    block_beats: f64,
    block_len: usize,
    samples_per_beat: f64,
    grid_beats: f64,
    origin_beats: f64,
) -> Option<GridHit> {
    // `is_finite() && > 0` also rejects NaN, which a plain `<= 0.0` test would let through.
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if block_len == 0 || !positive(samples_per_beat) || !positive(grid_beats) {
        return None;
    }
    // Earliest line whose first sample can be >= 0: up to one sample before the block start.
    let earliest = block_beats - (1.0 - SAMPLE_EPSILON) / samples_per_beat;
    let mut k = ((earliest - origin_beats) / grid_beats).floor() - 1.0;
    // At most a few steps: `k` starts one or two lines early because of round-off.
    for _ in 0..4 {
        let line = origin_beats + k * grid_beats;
        let x = (line - block_beats) * samples_per_beat;
        let offset = first_sample_at_or_after(x);
        if offset >= 0 {
            if (offset as usize) < block_len {
                return Some(GridHit {
                    offset: offset as usize,
                    beats: line,
                    // A line up to SAMPLE_EPSILON after the sample counts as on it: frac 0, not
                    // a tiny negative number.
                    frac: (offset as f64 - x).max(0.0),
                });
            }
            return None;
        }
        k += 1.0;
    }
    None
}

/// The first bar line in a block; see [`grid_line_in_block`].
pub fn bar_line_in_block(
    block_beats: f64,
    block_len: usize,
    samples_per_beat: f64,
    time_sig: TimeSig,
    origin_beats: f64,
) -> Option<GridHit> {
    grid_line_in_block(
        block_beats,
        block_len,
        samples_per_beat,
        time_sig.beats_per_bar(),
        origin_beats,
    )
}

/// Where a prompt region lies in a sample timeline (the capture history's frame counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSpan {
    /// First sample of the region (inclusive).
    pub start: i64,
    /// One past the last sample: the first sample of the bar after the prompt, where a take that
    /// continues it is anchored.
    pub end: i64,
}

impl SampleSpan {
    /// Length in samples.
    pub fn len(&self) -> i64 {
        self.end - self.start
    }
    /// True for an empty span.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// The last `bars` bars ending at a bar line whose first sample is `bar_line_sample`, where
/// the exact bar line lies `frac` samples before it (see [`GridHit::frac`]). The region's first
/// sample is the first sample of the bar line `bars` bars earlier, so regions computed on either
/// side of a fractional bar line agree with [`first_sample_at_or_after`].
pub fn prompt_span_bars(
    bar_line_sample: i64,
    frac: f64,
    bars: f64,
    time_sig: TimeSig,
    samples_per_beat: f64,
) -> SampleSpan {
    let length = bars * time_sig.beats_per_bar() * samples_per_beat;
    // ceil(bar_line_sample - frac - length) == bar_line_sample - floor(frac + length).
    let back = (frac + length + SAMPLE_EPSILON).floor() as i64;
    SampleSpan {
        start: bar_line_sample - back,
        end: bar_line_sample,
    }
}

/// The last `seconds` seconds ending at `end_sample` (used when the host gives no musical
/// position).
pub fn prompt_span_seconds(end_sample: i64, seconds: f64, sample_rate: f64) -> SampleSpan {
    let length = (seconds * sample_rate).round() as i64;
    SampleSpan {
        start: end_sample - length.max(0),
        end: end_sample,
    }
}

/// What the host said about its transport for one block, reduced to plain data. Built once per
/// block on the audio thread ([`TransportSnapshot::from_host`]); `Copy`, so storing it never
/// allocates.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TransportSnapshot {
    /// The transport is running.
    pub playing: bool,
    /// Tempo in quarter-note beats per minute.
    pub tempo_bpm: Option<f64>,
    /// Time signature.
    pub time_sig: Option<TimeSig>,
    /// Position of the block's first sample in quarter-note beats.
    pub pos_beats: Option<f64>,
    /// Position of the block's first sample in samples since the timeline's zero.
    pub pos_samples: Option<i64>,
    /// Start of the bar that contains the block's first sample, in beats.
    pub bar_start_beats: Option<f64>,
    /// Index of that bar as the host counts (0-based in nice-plug).
    pub bar_number: Option<i64>,
    /// Loop range in beats (start, end) when the host loops.
    pub loop_beats: Option<(f64, f64)>,
}

impl TransportSnapshot {
    /// Reduces nice-plug's transport to a snapshot, deriving missing positions the way nice-plug
    /// does (samples from seconds or beats, beats from samples).
    pub fn from_host(t: &nice_plug::prelude::Transport) -> Self {
        let sig = match (t.time_sig_numerator, t.time_sig_denominator) {
            (Some(n), Some(d)) if n > 0 && d > 0 => Some(TimeSig {
                numerator: n as u32,
                denominator: d as u32,
            }),
            _ => None,
        };
        Self {
            playing: t.playing,
            tempo_bpm: t.tempo.filter(|x| x.is_finite() && *x > 0.0),
            time_sig: sig,
            pos_beats: t.pos_beats().filter(|x| x.is_finite()),
            pos_samples: t.pos_samples(),
            bar_start_beats: t.bar_start_pos_beats.filter(|x| x.is_finite()),
            bar_number: t.bar_number.map(i64::from),
            loop_beats: t.loop_range_beats,
        }
    }

    /// The musical grid of this block, when the host gives tempo and beat position.
    pub fn grid(&self, sample_rate: f64) -> Option<Grid> {
        let tempo = self.tempo_bpm.filter(|t| *t > 0.0)?;
        let pos_beats = self.pos_beats?;
        let time_sig = self.time_sig.unwrap_or(TimeSig::COMMON);
        let bpb = time_sig.beats_per_bar();
        let (origin_beats, origin_bar) = match self.bar_start_beats {
            Some(b) => (b, self.bar_number.unwrap_or((b / bpb).round() as i64)),
            None => (0.0, 0),
        };
        Some(Grid {
            pos_beats,
            samples_per_beat: samples_per_beat(tempo, sample_rate),
            tempo_bpm: tempo,
            time_sig,
            origin_beats,
            origin_bar,
        })
    }
}

/// Tempo, signature and bar origin of one block: enough to place bar lines and beats in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    /// Position of the block's first sample in beats.
    pub pos_beats: f64,
    /// Samples per quarter-note beat.
    pub samples_per_beat: f64,
    /// Tempo in beats per minute.
    pub tempo_bpm: f64,
    /// Time signature.
    pub time_sig: TimeSig,
    /// A bar line, in beats, from which the others follow.
    pub origin_beats: f64,
    /// Index of the bar that starts at `origin_beats`.
    pub origin_bar: i64,
}

impl Grid {
    /// First bar line whose first sample falls inside this block of `len` samples.
    pub fn bar_line_in_block(&self, len: usize) -> Option<GridHit> {
        bar_line_in_block(
            self.pos_beats,
            len,
            self.samples_per_beat,
            self.time_sig,
            self.origin_beats,
        )
    }

    /// First beat line whose first sample falls inside this block of `len` samples.
    pub fn beat_in_block(&self, len: usize) -> Option<GridHit> {
        grid_line_in_block(
            self.pos_beats,
            len,
            self.samples_per_beat,
            1.0,
            self.origin_beats,
        )
    }

    /// Bar index of the bar that starts at `bar_line_beats`.
    pub fn bar_index(&self, bar_line_beats: f64) -> i64 {
        bar_index(
            bar_line_beats,
            self.time_sig.beats_per_bar(),
            self.origin_beats,
            self.origin_bar,
        )
    }

    /// This grid moved `offset` samples into the block.
    pub fn advanced(&self, offset: usize) -> Grid {
        Grid {
            pos_beats: self.pos_beats + offset as f64 / self.samples_per_beat,
            ..*self
        }
    }
}

/// The frame of a take that sounds at the musical position `pos_beats`, for a take whose frame 0
/// is the first sample at or after `anchor_beats`, at `samples_per_beat`. Negative before the
/// anchor. For a block starting at `pos_beats`, frame `i` of the block plays take frame
/// `take_frame_at(pos_beats, ..) + i`; the take's first frame falls on the block's sample
/// `-take_frame_at(..)`, the same sample [`first_sample_at_or_after`] gives for the anchor.
#[inline]
pub fn take_frame_at(pos_beats: f64, anchor_beats: f64, samples_per_beat: f64) -> i64 {
    ((pos_beats - anchor_beats) * samples_per_beat + SAMPLE_EPSILON).floor() as i64
}

/// Position in beats just after a block of `len` samples that started at `pos_beats`.
#[inline]
pub fn block_end_beats(pos_beats: f64, len: usize, samples_per_beat: f64) -> f64 {
    pos_beats + len as f64 / samples_per_beat
}

/// True when a block starting at `pos_beats` continues the previous block, which ended at
/// `expected_beats` ([`block_end_beats`]): within half a sample. Anything else is a seek, a loop
/// jump or a host that skipped time.
#[inline]
pub fn continues_at(expected_beats: f64, pos_beats: f64, samples_per_beat: f64) -> bool {
    ((pos_beats - expected_beats) * samples_per_beat).abs() <= 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGS: [(u32, u32); 4] = [(4, 4), (3, 4), (7, 8), (6, 8)];

    fn sig(n: u32, d: u32) -> TimeSig {
        TimeSig {
            numerator: n,
            denominator: d,
        }
    }

    #[test]
    fn beats_per_bar_of_common_signatures() {
        assert_eq!(sig(4, 4).beats_per_bar(), 4.0);
        assert_eq!(sig(3, 4).beats_per_bar(), 3.0);
        assert_eq!(sig(7, 8).beats_per_bar(), 3.5);
        assert_eq!(sig(6, 8).beats_per_bar(), 3.0);
        assert_eq!(sig(0, 4).beats_per_bar(), 4.0);
    }

    #[test]
    fn beats_samples_round_trip() {
        for &sr in &[44_100.0, 48_000.0] {
            for &tempo in &[120.0, 97.0, 133.33] {
                for &beats in &[0.0, 0.25, 1.0, 3.5, 16.0, 1234.5678] {
                    let s = beats_to_samples(beats, tempo, sr);
                    let back = samples_to_beats(s, tempo, sr);
                    assert!((back - beats).abs() < 1e-9, "{beats} -> {s} -> {back}");
                }
            }
        }
        assert_eq!(beats_to_samples(1.0, 120.0, 44_100.0), 22_050.0);
        assert_eq!(beats_to_samples(16.0, 120.0, 48_000.0), 384_000.0);
        // 97 BPM: one beat is 44100 * 60 / 97 = 27278.35... samples.
        assert!((samples_per_beat(97.0, 44_100.0) - 27_278.350_515_463_9).abs() < 1e-6);
    }

    #[test]
    fn bars_to_seconds_follows_tempo_and_signature() {
        assert!((bars_to_seconds(4.0, TimeSig::COMMON, 120.0) - 8.0).abs() < 1e-12);
        assert!((bars_to_seconds(4.0, TimeSig::COMMON, 97.0) - 16.0 * 60.0 / 97.0).abs() < 1e-12);
        assert!((bars_to_seconds(2.0, sig(7, 8), 120.0) - 3.5).abs() < 1e-12);
        assert!((bars_to_seconds(1.0, sig(6, 8), 90.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn bar_lines_around_positions() {
        for &(n, d) in &SIGS {
            let bpb = sig(n, d).beats_per_bar();
            for &origin in &[0.0, 1.5, -bpb] {
                for k in -3..10 {
                    let line = origin + k as f64 * bpb;
                    // On the line.
                    assert_eq!(bar_line_at_or_after(line, bpb, origin), line);
                    assert_eq!(bar_line_at_or_before(line, bpb, origin), line);
                    assert_eq!(bar_line_before(line, bpb, origin), line - bpb);
                    // Fractionally inside the bar.
                    for &f in &[0.001, 0.37, 0.999] {
                        let pos = line + f * bpb;
                        assert!(
                            (bar_line_at_or_after(pos, bpb, origin) - (line + bpb)).abs() < 1e-9
                        );
                        assert!((bar_line_at_or_before(pos, bpb, origin) - line).abs() < 1e-9);
                        assert!((bar_line_before(pos, bpb, origin) - line).abs() < 1e-9);
                    }
                }
            }
        }
    }

    #[test]
    fn bar_index_counts_from_host_origin() {
        assert_eq!(bar_index(16.0, 4.0, 0.0, 0), 4);
        assert_eq!(bar_index(16.0, 4.0, 8.0, 2), 4);
        assert_eq!(bar_index(7.0, 3.5, 0.0, 0), 2);
    }

    /// Walks the timeline in blocks and checks that every bar line is found exactly once, in
    /// the block and at the offset of its first sample.
    fn walk(sr: f64, tempo: f64, ts: TimeSig, blocks: &[usize]) {
        let spb = samples_per_beat(tempo, sr);
        let bpb = ts.beats_per_bar();
        let mut pos = 0i64;
        let mut found = Vec::new();
        for &len in blocks {
            let block_beats = pos as f64 / spb;
            let mut start = 0;
            // Several bar lines can fall in one long block: look again after each.
            while start < len {
                let b = block_beats + start as f64 / spb;
                match bar_line_in_block(b, len - start, spb, ts, 0.0) {
                    Some(hit) => {
                        found.push((pos + (start + hit.offset) as i64, hit.beats));
                        assert!(hit.frac >= 0.0 && hit.frac < 1.0 + 1e-9);
                        start += hit.offset + 1;
                    }
                    None => break,
                }
            }
            pos += len as i64;
        }
        let total = pos;
        let mut expected = Vec::new();
        let mut k = 0;
        loop {
            let line = k as f64 * bpb;
            let first = (line * spb - SAMPLE_EPSILON).ceil() as i64;
            if first >= total {
                break;
            }
            expected.push((first, line));
            k += 1;
        }
        assert_eq!(found.len(), expected.len(), "sr {sr} tempo {tempo} {ts:?}");
        for (f, e) in found.iter().zip(&expected) {
            assert_eq!(f.0, e.0, "sr {sr} tempo {tempo} {ts:?}");
            assert!((f.1 - e.1).abs() < 1e-9);
        }
    }

    #[test]
    fn every_bar_line_found_once_at_its_first_sample() {
        let mut rng = 0x1234_5678u32;
        let mut random_blocks = Vec::new();
        for _ in 0..300 {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            random_blocks.push(1 + (rng % 3000) as usize);
        }
        for &sr in &[44_100.0, 48_000.0] {
            for &tempo in &[120.0, 97.0] {
                for &(n, d) in &SIGS {
                    let ts = sig(n, d);
                    walk(sr, tempo, ts, &[64; 12_000]);
                    walk(sr, tempo, ts, &[512; 1_500]);
                    walk(sr, tempo, ts, &random_blocks);
                }
            }
        }
    }

    #[test]
    fn block_straddling_a_bar_line() {
        // 120 BPM, 44.1 kHz: bar 2 (beat 4) starts at sample 88200 exactly.
        let spb = samples_per_beat(120.0, 44_100.0);
        let block_start = 88_200 - 100;
        let hit = bar_line_in_block(block_start as f64 / spb, 512, spb, TimeSig::COMMON, 0.0)
            .expect("bar line in block");
        assert_eq!(hit.offset, 100);
        assert_eq!(hit.beats, 4.0);
        assert!(hit.frac.abs() < 1e-6);
        // The block that ends right before it sees nothing; the one starting on it sees offset 0.
        assert_eq!(
            bar_line_in_block((88_200 - 512) as f64 / spb, 512, spb, TimeSig::COMMON, 0.0),
            None
        );
        let hit = bar_line_in_block(88_200.0 / spb, 512, spb, TimeSig::COMMON, 0.0).unwrap();
        assert_eq!(hit.offset, 0);
        // 97 BPM: bar 5 (beat 16) lies at 436453.608 samples; its first sample is 436454.
        let spb = samples_per_beat(97.0, 44_100.0);
        let hit = bar_line_in_block(436_400.0 / spb, 64, spb, TimeSig::COMMON, 0.0).unwrap();
        assert_eq!(hit.offset, 54);
        assert!((hit.frac - (436_454.0 - 16.0 * spb)).abs() < 1e-6);
        // A host bar origin that is not a multiple of the bar length moves the lines.
        let hit = bar_line_in_block(0.0, 100_000, spb, TimeSig::COMMON, 1.0).unwrap();
        assert_eq!(hit.offset as i64, first_sample_at_or_after(spb));
    }

    #[test]
    fn prompt_span_is_the_last_bars_before_the_bar_line() {
        for &sr in &[44_100.0, 48_000.0] {
            for &tempo in &[120.0, 97.0] {
                for &(n, d) in &SIGS {
                    let ts = sig(n, d);
                    let spb = samples_per_beat(tempo, sr);
                    let bpb = ts.beats_per_bar();
                    for bars in [1.0, 2.0, 4.0] {
                        for end_bar in [4i64, 5, 9] {
                            let exact = end_bar as f64 * bpb * spb;
                            let first = first_sample_at_or_after(exact);
                            let frac = first as f64 - exact;
                            let span = prompt_span_bars(first, frac, bars, ts, spb);
                            let start_exact = (end_bar as f64 - bars) * bpb * spb;
                            assert_eq!(span.start, first_sample_at_or_after(start_exact));
                            assert_eq!(span.end, first);
                        }
                    }
                }
            }
        }
        // 120 BPM 4/4 at 48 kHz: 4 bars = 8 s = 384000 samples, exactly.
        let span = prompt_span_bars(768_000, 0.0, 4.0, TimeSig::COMMON, 24_000.0);
        assert_eq!(
            span,
            SampleSpan {
                start: 384_000,
                end: 768_000
            }
        );
        let span = prompt_span_seconds(100_000, 1.5, 48_000.0);
        assert_eq!(span.len(), 72_000);
        assert_eq!(span.end, 100_000);
    }

    #[test]
    fn grid_from_snapshot() {
        let snap = TransportSnapshot {
            playing: true,
            tempo_bpm: Some(120.0),
            time_sig: Some(sig(3, 4)),
            pos_beats: Some(7.5),
            pos_samples: Some(165_375),
            bar_start_beats: Some(6.0),
            bar_number: Some(2),
            loop_beats: None,
        };
        let g = snap.grid(44_100.0).unwrap();
        assert_eq!(g.samples_per_beat, 22_050.0);
        assert_eq!(g.bar_index(9.0), 3);
        // The next bar line (beat 9) is 1.5 beats = 33075 samples away.
        assert_eq!(g.bar_line_in_block(40_000).unwrap().offset, 33_075);
        assert_eq!(g.beat_in_block(40_000).unwrap().offset, 11_025);
        assert!(TransportSnapshot::default().grid(44_100.0).is_none());
    }

    #[test]
    fn take_frame_matches_first_sample_of_the_anchor() {
        for &sr in &[44_100.0, 48_000.0] {
            for &tempo in &[120.0, 97.0] {
                let spb = samples_per_beat(tempo, sr);
                let anchor = 16.0;
                let first = first_sample_at_or_after(anchor * spb);
                // Blocks starting before, on and after the anchor's first sample.
                for start in [first - 1000, first - 1, first, first + 1, first + 777] {
                    let t = take_frame_at(start as f64 / spb, anchor, spb);
                    assert_eq!(start - t, first, "sr {sr} tempo {tempo} start {start}");
                }
            }
        }
        assert_eq!(take_frame_at(4.0, 4.0, 22_050.0), 0);
        assert_eq!(take_frame_at(3.0, 4.0, 22_050.0), -22_050);
        assert_eq!(take_frame_at(5.5, 4.0, 22_050.0), 33_075);
    }

    #[test]
    fn continuity_within_half_a_sample() {
        let spb = samples_per_beat(97.0, 44_100.0);
        let end = block_end_beats(3.0, 512, spb);
        assert!(continues_at(end, end, spb));
        assert!(continues_at(end, end + 0.4 / spb, spb));
        assert!(!continues_at(end, end + 0.6 / spb, spb));
        assert!(!continues_at(end, 0.0, spb));
    }
}
