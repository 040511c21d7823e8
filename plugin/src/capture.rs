//! Capture: the history of what the host played into Segue, and the prompt region cut from it.
//!
//! Ownership and threads:
//! - [`capture_pair`] is called in `activate()` (non-realtime) and allocates everything for the
//!   host's sample rate: a stereo history of at least [`MIN_HISTORY_SECONDS`] and a ring of
//!   transport segments.
//! - [`CaptureWriter`] belongs to the audio thread. [`CaptureWriter::write_block`] runs once per
//!   block in `process()` and never allocates, locks, logs or makes a system call: it stores the
//!   block's audio and its [`TransportSnapshot`] and publishes how far it has written.
//! - [`CaptureReader`] is `Clone + Send + Sync` and is used off the audio thread (the thread that
//!   serves a generate request). [`CaptureReader::prompt`] copies the prompt region out of the
//!   history while the audio thread keeps writing.
//!
//! How the reader stays consistent without a lock (a seqlock over a ring): the writer first
//! *claims* the frames (and transport record) it is about to overwrite, then writes them, then
//! *publishes* them. The reader reads the published counters, copies what it needs, and then
//! re-reads the claimed counters: anything the writer may have started to overwrite in the
//! meantime is detected and reported as [`CaptureError::Overwritten`] instead of being returned
//! torn. Samples and record words are stored in relaxed atomics (plain loads and stores on every
//! platform we build for), so concurrent access is never undefined behaviour.
//!
//! Transport records: consecutive blocks that continue each other (same playing state, tempo,
//! signature and bar grid, and a position that follows on within half a sample) are merged into
//! one *segment*, so the ring holds one record per start, stop, seek, loop jump or tempo change,
//! not one per block. A segment ends where the next one starts (the newest ends at the published
//! write position).
//!
//! What "the last N bars" means: the prompt ends at the first sample of the most recent bar line
//! the transport *passed* while playing (a bar line reached from the sample before it, or at the
//! end of a run that jumped away exactly there, such as a loop end on a bar line; a bar line the
//! transport *jumped onto* was not passed). It reaches back N bars of played musical time, through
//! loop jumps and tempo changes, but not across a stop. Without a musical position from the host,
//! the prompt is the last `fallback_seconds` seconds instead.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::transport::{
    bar_line_at_or_before, first_sample_at_or_after, Grid, SampleSpan, TimeSig, TransportSnapshot,
    SAMPLE_EPSILON,
};

/// Shortest history the capture keeps, in seconds.
pub const MIN_HISTORY_SECONDS: f64 = 60.0;

/// Channels of the history (mono input is stored on both).
pub const CHANNELS: usize = 2;

/// 64-bit words per transport record; see [`Record`].
const RECORD_WORDS: usize = 6;

/// How many transport records the ring holds per second of history at most one block of
/// [`RECORD_BLOCK_HINT`] frames per record. Steady playback needs one record per run, so this
/// only matters for hosts that automate the tempo every block.
const RECORD_BLOCK_HINT: usize = 64;

/// Attempts at reading a consistent set of transport records before giving up.
const READ_ATTEMPTS: usize = 4;

/// Why a prompt could not be cut from the history.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CaptureError {
    /// Nothing was captured since `activate()`.
    #[error("nothing has been captured yet")]
    Empty,
    /// The host gives a musical position, but no bar line was passed while playing.
    #[error("no bar line has been passed while the transport was playing")]
    NoBarLine,
    /// Fewer bars than requested were played without a stop before the last bar line.
    #[error(
        "only {available:.2} of the {wanted} bars requested were played before the last bar line \
         without a stop or a gap in the capture history"
    )]
    TooShort {
        /// Bars requested.
        wanted: f64,
        /// Bars that could be taken (rounded down to a sample).
        available: f64,
    },
    /// Without a musical position: fewer seconds than requested are in the history.
    #[error("only {available:.2} s of the {wanted} s requested have been captured")]
    TooShortSeconds {
        /// Seconds requested.
        wanted: f64,
        /// Seconds held by the history.
        available: f64,
    },
    /// The region is older than the history (or was overwritten while it was being copied).
    #[error(
        "the prompt region starts {seconds_ago:.1} s ago but the capture history holds only \
         {history_seconds:.1} s"
    )]
    Overwritten {
        /// How long ago the region starts, in seconds.
        seconds_ago: f64,
        /// Length of the history in seconds.
        history_seconds: f64,
    },
    /// The transport records changed faster than they could be read consistently.
    #[error("the transport history changed too fast to be read consistently")]
    Busy,
    /// A request with a non-positive or non-finite length.
    #[error("invalid prompt request: {0}")]
    InvalidRequest(&'static str),
}

/// What to cut from the history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptRequest {
    /// Length in bars (when the host gives a musical position). May be fractional.
    pub bars: f64,
    /// Length in seconds when the host gives no musical position.
    pub fallback_seconds: f64,
    /// Cut as the history stood at this capture frame (exclusive; the frame where "generate" was
    /// pressed: [`CaptureWriter::frames_written`] before the block plus the event's offset), so a
    /// request served late does not pick a bar line passed after the press. `None`: now.
    pub at_frame: Option<u64>,
}

impl PromptRequest {
    /// The last `bars` bars (or `fallback_seconds` seconds) as the history stands now.
    pub fn now(bars: f64, fallback_seconds: f64) -> PromptRequest {
        PromptRequest {
            bars,
            fallback_seconds,
            at_frame: None,
        }
    }
}

/// The transport as of the newest captured frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransportNow {
    /// Frames captured so far (the capture frame after the newest).
    pub frames: u64,
    /// The transport is running.
    pub playing: bool,
    /// Musical position after the newest frame (extrapolated from its block), tempo and
    /// signature; `None` without a musical position.
    pub grid: Option<Grid>,
}

/// Where the prompt ends on the musical timeline: the bar line a continuation is anchored at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptAnchor {
    /// Position of the bar line in quarter-note beats (host timeline).
    pub beats: f64,
    /// How far the bar line lies before the prompt's end sample, in samples (`0.0..1.0`).
    pub frac: f64,
    /// Host tempo at the bar line, in beats per minute.
    pub tempo_bpm: f64,
    /// Time signature at the bar line.
    pub time_sig: TimeSig,
    /// Index of the bar that starts at the bar line, as the host counts (0-based).
    pub bar_index: i64,
}

/// A prompt region copied out of the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Planar audio at the host rate, [`CHANNELS`] channels of `span.len()` frames.
    pub audio: Vec<Vec<f32>>,
    /// Host sample rate in Hz.
    pub sample_rate: f64,
    /// The region in the capture's frame count (frame 0 = the first frame written after
    /// `activate()`); `span.end` is the first sample of the anchor bar line.
    pub span: SampleSpan,
    /// The bar line where the region ends; `None` for the seconds fallback.
    pub anchor: Option<PromptAnchor>,
    /// Length in bars (`None` for the seconds fallback).
    pub bars: Option<f64>,
}

impl Prompt {
    /// Length in frames.
    pub fn frames(&self) -> usize {
        self.audio.first().map_or(0, Vec::len)
    }
}

/// State shared by the writer and the readers. Allocated once, in [`capture_pair`].
struct Shared {
    /// Host sample rate in Hz.
    sample_rate: f64,
    /// History length in frames.
    capacity: usize,
    /// Planar history: channel `c`, frame `f` lives at `c * capacity + f % capacity`, as
    /// `f32::to_bits`.
    audio: Box<[AtomicU32]>,
    /// Number of transport records the ring holds.
    record_capacity: usize,
    /// Record `i` lives at words `(i % record_capacity) * RECORD_WORDS ..`.
    records: Box<[AtomicU64]>,
    /// Frames the writer has started to write (exclusive end).
    frames_claimed: AtomicU64,
    /// Frames fully written (exclusive end).
    frames_published: AtomicU64,
    /// Records the writer has started to write.
    records_claimed: AtomicU64,
    /// Records fully written.
    records_published: AtomicU64,
}

/// Creates the history for `sample_rate` Hz, holding `seconds` seconds (at least
/// [`MIN_HISTORY_SECONDS`]). Allocates; call it from `activate()`, never from `process()`.
pub fn capture_pair(sample_rate: f64, seconds: f64) -> (CaptureWriter, CaptureReader) {
    let sample_rate = if sample_rate.is_finite() && sample_rate > 0.0 {
        sample_rate
    } else {
        44_100.0
    };
    let seconds = if seconds.is_finite() {
        seconds.max(MIN_HISTORY_SECONDS)
    } else {
        MIN_HISTORY_SECONDS
    };
    let capacity = (seconds * sample_rate).ceil() as usize;
    let record_capacity = capacity / RECORD_BLOCK_HINT + 1024;
    let shared = Arc::new(Shared {
        sample_rate,
        capacity,
        audio: (0..CHANNELS * capacity)
            .map(|_| AtomicU32::new(0))
            .collect(),
        record_capacity,
        records: (0..record_capacity * RECORD_WORDS)
            .map(|_| AtomicU64::new(0))
            .collect(),
        frames_claimed: AtomicU64::new(0),
        frames_published: AtomicU64::new(0),
        records_claimed: AtomicU64::new(0),
        records_published: AtomicU64::new(0),
    });
    (
        CaptureWriter {
            shared: shared.clone(),
            written: 0,
            records: 0,
            open: None,
        },
        CaptureReader { shared },
    )
}

/// The transport of one segment, as the writer compares and stores it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Record {
    /// First frame of the segment.
    start: u64,
    /// Transport running.
    playing: bool,
    /// Musical grid at the segment's first frame; `None` when the host gives no tempo or beat
    /// position.
    grid: Option<Grid>,
}

impl Record {
    fn encode(&self) -> [u64; RECORD_WORDS] {
        let mut w = [0u64; RECORD_WORDS];
        w[0] = self.start;
        let mut flags = u64::from(self.playing);
        if let Some(g) = self.grid {
            flags |= 2;
            flags |= u64::from(g.time_sig.numerator.min(0xffff)) << 32;
            flags |= u64::from(g.time_sig.denominator.min(0xffff)) << 48;
            w[2] = g.tempo_bpm.to_bits();
            w[3] = g.pos_beats.to_bits();
            w[4] = g.origin_beats.to_bits();
            w[5] = g.origin_bar as u64;
        }
        w[1] = flags;
        w
    }

    /// Decodes a record for `sample_rate`. Total: garbage words give some record, never a panic
    /// (only validated records are decoded, but decoding must not trust them anyway).
    fn decode(w: &[u64; RECORD_WORDS], sample_rate: f64) -> Record {
        let flags = w[1];
        let grid = if flags & 2 != 0 {
            let tempo = f64::from_bits(w[2]);
            let time_sig = TimeSig {
                numerator: ((flags >> 32) & 0xffff) as u32,
                denominator: ((flags >> 48) & 0xffff) as u32,
            };
            Some(Grid {
                pos_beats: f64::from_bits(w[3]),
                samples_per_beat: crate::transport::samples_per_beat(tempo, sample_rate),
                tempo_bpm: tempo,
                time_sig,
                origin_beats: f64::from_bits(w[4]),
                origin_bar: w[5] as i64,
            })
            .filter(|g| {
                g.tempo_bpm.is_finite()
                    && g.tempo_bpm > 0.0
                    && g.pos_beats.is_finite()
                    && g.origin_beats.is_finite()
            })
        } else {
            None
        };
        Record {
            start: w[0],
            playing: flags & 1 != 0,
            grid,
        }
    }
}

/// True when a block with `playing` and `grid`, starting `elapsed` frames after `open` started,
/// continues the segment `open` rather than starting a new one.
fn continues(open: &Record, elapsed: u64, playing: bool, grid: Option<&Grid>) -> bool {
    if open.playing != playing {
        return false;
    }
    match (open.grid.as_ref(), grid) {
        (None, None) => true,
        // A stopped transport's position does not matter to the prompt; a host that starts
        // giving positions while stopped does not need a record of its own.
        (Some(_), Some(_)) | (None, Some(_)) | (Some(_), None) if !playing => {
            open.grid.is_some() == grid.is_some()
        }
        (Some(a), Some(b)) => {
            let bpb = a.time_sig.beats_per_bar();
            let bars_apart = (b.origin_beats - a.origin_beats) / bpb;
            let expected = a.pos_beats + elapsed as f64 / a.samples_per_beat;
            a.tempo_bpm == b.tempo_bpm
                && a.time_sig == b.time_sig
                && (bars_apart - bars_apart.round()).abs() < 1e-6
                && ((b.pos_beats - expected) * a.samples_per_beat).abs() <= 0.5
        }
        _ => false,
    }
}

/// The audio thread's end of the capture. Not `Clone`: there is exactly one writer.
pub struct CaptureWriter {
    shared: Arc<Shared>,
    /// Frames written so far (== `frames_published`).
    written: u64,
    /// Records written so far (== `records_published`).
    records: u64,
    /// The newest segment, for the continuity test.
    open: Option<Record>,
}

impl CaptureWriter {
    /// Host sample rate the history was made for, in Hz.
    pub fn sample_rate(&self) -> f64 {
        self.shared.sample_rate
    }

    /// Frames written since `activate()`.
    pub fn frames_written(&self) -> u64 {
        self.written
    }

    /// Records one block of `frames` frames: `input` holds the chosen input's channels (main or
    /// sidechain; a mono input is stored on both channels, missing channels as silence, extra
    /// channels ignored) and `transport` the host's transport at the block's first sample.
    ///
    /// Realtime-safe: no allocation, lock, log or system call.
    pub fn write_block<S: AsRef<[f32]>>(
        &mut self,
        input: &[S],
        frames: usize,
        transport: &TransportSnapshot,
    ) {
        if frames == 0 {
            return;
        }
        let shared = &*self.shared;
        let grid = transport
            .grid(shared.sample_rate)
            .filter(|g| g.pos_beats.is_finite() && g.origin_beats.is_finite());
        let start = self.written;
        let end = start + frames as u64;
        let new_segment = match &self.open {
            Some(open) => !continues(open, start - open.start, transport.playing, grid.as_ref()),
            None => true,
        };

        // Claim, then write, then publish (see the module comment).
        if new_segment {
            shared
                .records_claimed
                .store(self.records + 1, Ordering::Relaxed);
        }
        shared.frames_claimed.store(end, Ordering::Relaxed);
        fence(Ordering::Release);

        if new_segment {
            let record = Record {
                start,
                playing: transport.playing,
                grid,
            };
            let slot = (self.records % shared.record_capacity as u64) as usize * RECORD_WORDS;
            for (word, value) in shared.records[slot..slot + RECORD_WORDS]
                .iter()
                .zip(record.encode())
            {
                word.store(value, Ordering::Relaxed);
            }
            self.open = Some(record);
        }

        let cap = shared.capacity;
        for c in 0..CHANNELS {
            let source: Option<&[f32]> = input
                .get(c)
                .or_else(|| if c > 0 { input.first() } else { None })
                .map(|s| s.as_ref());
            let channel = &shared.audio[c * cap..(c + 1) * cap];
            let mut slot = (start % cap as u64) as usize;
            for i in 0..frames {
                let x = source.and_then(|s| s.get(i)).copied().unwrap_or(0.0);
                channel[slot].store(x.to_bits(), Ordering::Relaxed);
                slot += 1;
                if slot == cap {
                    slot = 0;
                }
            }
        }

        if new_segment {
            self.records += 1;
            shared
                .records_published
                .store(self.records, Ordering::Release);
        }
        self.written = end;
        shared.frames_published.store(end, Ordering::Release);
    }
}

/// One segment as the reader sees it: frames `start..end` under one transport record.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: u64,
    end: u64,
    playing: bool,
    grid: Option<Grid>,
}

/// The non-realtime end of the capture: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct CaptureReader {
    shared: Arc<Shared>,
}

impl CaptureReader {
    /// Host sample rate in Hz.
    pub fn sample_rate(&self) -> f64 {
        self.shared.sample_rate
    }

    /// History length in frames.
    pub fn capacity_frames(&self) -> usize {
        self.shared.capacity
    }

    /// Frames written so far (the audio thread's write position).
    pub fn frames_written(&self) -> u64 {
        self.shared.frames_published.load(Ordering::Acquire)
    }

    /// Cuts the prompt region (see the module comment for what it is) and copies it out.
    /// Allocates; never call it on the audio thread.
    pub fn prompt(&self, request: &PromptRequest) -> Result<Prompt, CaptureError> {
        let (published, segments) = self.segments(request.at_frame.unwrap_or(u64::MAX))?;
        let newest = segments.last().ok_or(CaptureError::Empty)?;
        if newest.grid.is_none() {
            return self.prompt_seconds(published, request.fallback_seconds);
        }
        if !(request.bars.is_finite() && request.bars > 0.0) {
            return Err(CaptureError::InvalidRequest("bars must be positive"));
        }
        let (index, anchor, end) =
            last_bar_line_passed(&segments).ok_or(CaptureError::NoBarLine)?;
        let start = walk_back(&segments, index, anchor.beats, request.bars)?;
        let span = SampleSpan {
            start: start as i64,
            end: end as i64,
        };
        let audio = self.copy_audio(start, end)?;
        Ok(Prompt {
            audio,
            sample_rate: self.shared.sample_rate,
            span,
            anchor: Some(anchor),
            bars: Some(request.bars),
        })
    }

    fn prompt_seconds(&self, published: u64, seconds: f64) -> Result<Prompt, CaptureError> {
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(CaptureError::InvalidRequest("seconds must be positive"));
        }
        let sr = self.shared.sample_rate;
        let span = crate::transport::prompt_span_seconds(published as i64, seconds, sr);
        let oldest = published.saturating_sub(self.shared.capacity as u64) as i64;
        if span.start < oldest {
            return Err(CaptureError::TooShortSeconds {
                wanted: seconds,
                available: (published as i64 - oldest) as f64 / sr,
            });
        }
        let audio = self.copy_audio(span.start as u64, span.end as u64)?;
        Ok(Prompt {
            audio,
            sample_rate: sr,
            span,
            anchor: None,
            bars: None,
        })
    }

    /// The transport after the newest captured frame (for the editor's playhead and for
    /// choosing the bar line a growing take may start at). Cheap: reads one record. `None`
    /// before anything was captured or if the writer raced ahead during every attempt.
    pub fn transport_now(&self) -> Option<TransportNow> {
        let shared = &*self.shared;
        let cap = shared.record_capacity as u64;
        for _ in 0..READ_ATTEMPTS {
            let published = shared.frames_published.load(Ordering::Acquire);
            let records = shared.records_published.load(Ordering::Acquire);
            if published == 0 || records == 0 {
                return None;
            }
            // The newest record that starts before `published` (a newer one may describe a
            // block not yet published): one of the last two.
            let mut found = None;
            for i in (records.saturating_sub(2)..records).rev() {
                let slot = (i % cap) as usize * RECORD_WORDS;
                let mut w = [0u64; RECORD_WORDS];
                for (k, word) in w.iter_mut().enumerate() {
                    *word = shared.records[slot + k].load(Ordering::Relaxed);
                }
                if w[0] < published {
                    found = Some((i, w));
                    break;
                }
            }
            fence(Ordering::Acquire);
            let claimed = shared.records_claimed.load(Ordering::Relaxed);
            let Some((i, w)) = found else { continue };
            if claimed > i + cap {
                continue;
            }
            let record = Record::decode(&w, shared.sample_rate);
            let grid = record.grid.map(|g| {
                if record.playing {
                    g.advanced((published - record.start) as usize)
                } else {
                    g
                }
            });
            return Some(TransportNow {
                frames: published,
                playing: record.playing,
                grid,
            });
        }
        None
    }

    /// A consistent list of the segments that cover published frames up to `limit`, oldest
    /// first, with the frame count they end at.
    fn segments(&self, limit: u64) -> Result<(u64, Vec<Segment>), CaptureError> {
        let shared = &*self.shared;
        let cap = shared.record_capacity as u64;
        for _ in 0..READ_ATTEMPTS {
            let published = shared.frames_published.load(Ordering::Acquire).min(limit);
            let records = shared.records_published.load(Ordering::Acquire);
            if published == 0 || records == 0 {
                return Err(CaptureError::Empty);
            }
            let first = records.saturating_sub(cap);
            let mut raw = Vec::with_capacity((records - first) as usize);
            for i in first..records {
                let slot = (i % cap) as usize * RECORD_WORDS;
                let mut w = [0u64; RECORD_WORDS];
                for (k, word) in w.iter_mut().enumerate() {
                    *word = shared.records[slot + k].load(Ordering::Relaxed);
                }
                raw.push(w);
            }
            fence(Ordering::Acquire);
            let claimed = shared.records_claimed.load(Ordering::Relaxed);
            // Record `i` is intact while the writer has not claimed record `i + cap`.
            let valid_from = claimed.saturating_sub(cap).max(first);
            if valid_from >= records {
                continue;
            }
            let skip = (valid_from - first) as usize;
            let mut segments: Vec<Segment> = raw[skip..]
                .iter()
                .map(|w| Record::decode(w, shared.sample_rate))
                // Records published after `published` was read describe later frames.
                .filter(|r| r.start < published)
                .map(|r| Segment {
                    start: r.start,
                    end: published,
                    playing: r.playing,
                    grid: r.grid,
                })
                .collect();
            for i in 1..segments.len() {
                segments[i - 1].end = segments[i].start;
            }
            if segments.is_empty() {
                continue;
            }
            return Ok((published, segments));
        }
        Err(CaptureError::Busy)
    }

    /// Copies frames `start..end` out of the history and checks that none of them was
    /// overwritten while it was read.
    fn copy_audio(&self, start: u64, end: u64) -> Result<Vec<Vec<f32>>, CaptureError> {
        let shared = &*self.shared;
        let cap = shared.capacity;
        let history_seconds = cap as f64 / shared.sample_rate;
        let too_old = |claimed: u64| CaptureError::Overwritten {
            seconds_ago: claimed.saturating_sub(start) as f64 / shared.sample_rate,
            history_seconds,
        };
        let claimed = shared.frames_claimed.load(Ordering::Relaxed);
        if start + (cap as u64) < claimed {
            return Err(too_old(claimed));
        }
        let frames = (end - start) as usize;
        let mut audio = Vec::with_capacity(CHANNELS);
        for c in 0..CHANNELS {
            let channel = &shared.audio[c * cap..(c + 1) * cap];
            let mut out = Vec::with_capacity(frames);
            let mut slot = (start % cap as u64) as usize;
            for _ in 0..frames {
                out.push(f32::from_bits(channel[slot].load(Ordering::Relaxed)));
                slot += 1;
                if slot == cap {
                    slot = 0;
                }
            }
            audio.push(out);
        }
        fence(Ordering::Acquire);
        let claimed = shared.frames_claimed.load(Ordering::Relaxed);
        // Frame `f` is intact while the writer has not claimed frame `f + cap`.
        if start + (cap as u64) < claimed {
            return Err(too_old(claimed));
        }
        Ok(audio)
    }
}

/// The most recent bar line passed while playing: the segment it lies in, the anchor, and the
/// absolute frame of its first sample (the prompt's exclusive end).
fn last_bar_line_passed(segments: &[Segment]) -> Option<(usize, PromptAnchor, u64)> {
    for (index, s) in segments.iter().enumerate().rev() {
        let Some(g) = s.grid.filter(|_| s.playing) else {
            continue;
        };
        let len = (s.end - s.start) as i64;
        let bpb = g.time_sig.beats_per_bar();
        let pos_end = g.pos_beats + len as f64 / g.samples_per_beat;
        let below = bar_line_at_or_before(pos_end, bpb, g.origin_beats);
        // Round-off can put the line at `pos_end` on either side; try the one above first.
        for line in [below + bpb, below, below - bpb] {
            let x = (line - g.pos_beats) * g.samples_per_beat;
            let offset = first_sample_at_or_after(x);
            // A line at offset 0 was jumped onto (or started from), not passed.
            if offset > 0 && offset <= len {
                let anchor = PromptAnchor {
                    beats: line,
                    frac: (offset as f64 - x).max(0.0),
                    tempo_bpm: g.tempo_bpm,
                    time_sig: g.time_sig,
                    bar_index: g.bar_index(line),
                };
                return Some((index, anchor, s.start + offset as u64));
            }
        }
    }
    None
}

/// The musical position where the run of `segment` ended: the bar line it reached if it ended on
/// one (a loop end, say: the position after its last sample is up to a sample past the line),
/// else the position after its last sample.
fn run_end_beats(segment: &Segment, g: &Grid) -> f64 {
    let len = (segment.end - segment.start) as i64;
    let end = g.pos_beats + len as f64 / g.samples_per_beat;
    let bpb = g.time_sig.beats_per_bar();
    let nearest = g.origin_beats + ((end - g.origin_beats) / bpb).round() * bpb;
    if first_sample_at_or_after((nearest - g.pos_beats) * g.samples_per_beat) == len {
        nearest
    } else {
        end
    }
}

/// The first frame of a region that reaches `bars` bars of played time back from the position
/// `end_beats` inside `segments[index]`.
fn walk_back(
    segments: &[Segment],
    index: usize,
    end_beats: f64,
    bars: f64,
) -> Result<u64, CaptureError> {
    let mut remaining = bars;
    let mut cur_beats = end_beats;
    let mut i = index;
    loop {
        let s = &segments[i];
        let g = match s.grid {
            Some(g) if s.playing => g,
            _ => break,
        };
        let bpb = g.time_sig.beats_per_bar();
        let available = cur_beats - g.pos_beats;
        let needed = remaining * bpb;
        if needed <= available + SAMPLE_EPSILON / g.samples_per_beat {
            let x = (cur_beats - needed - g.pos_beats) * g.samples_per_beat;
            return Ok(s.start + first_sample_at_or_after(x).max(0) as u64);
        }
        remaining -= available / bpb;
        if i == 0 {
            break;
        }
        i -= 1;
        let p = &segments[i];
        match p.grid {
            Some(pg) if p.playing => cur_beats = run_end_beats(p, &pg),
            _ => break,
        }
    }
    Err(CaptureError::TooShort {
        wanted: bars,
        available: (bars - remaining).max(0.0),
    })
}

#[cfg(test)]
// Sample-by-sample comparisons read best with explicit frame indices.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::transport::{bar_line_at_or_before, samples_per_beat};
    use nice_assert_no_alloc::assert_no_alloc;

    /// A value unique to each frame (for 1M frames) and channel, exactly representable.
    fn signal(frame: u64, channel: usize) -> f32 {
        let v = ((frame % 1_000_003) as f32 + 1.0) / 1_048_576.0;
        if channel == 0 {
            v
        } else {
            -v
        }
    }

    /// Block sizes: fixed, or a reproducible random split.
    #[derive(Clone, Copy)]
    enum Blocks {
        Fixed(usize),
        Random(u32),
    }

    impl Blocks {
        fn next(&mut self) -> usize {
            match self {
                Blocks::Fixed(n) => *n,
                Blocks::Random(state) => {
                    *state ^= *state << 13;
                    *state ^= *state >> 17;
                    *state ^= *state << 5;
                    1 + (*state % 1500) as usize
                }
            }
        }
    }

    const BLOCKS: [Blocks; 4] = [
        Blocks::Fixed(1),
        Blocks::Fixed(64),
        Blocks::Fixed(512),
        Blocks::Random(0x9e37_79b9),
    ];

    /// A host: a timeline position in samples, a tempo, a transport state, an optional loop
    /// (the host splits blocks at the loop end); it feeds `signal` of the capture frame.
    struct Host {
        sr: f64,
        tempo: Option<f64>,
        sig: TimeSig,
        timeline: i64,
        playing: bool,
        loop_range: Option<(i64, i64)>,
        blocks: Blocks,
        captured: u64,
        buf: [Vec<f32>; 2],
    }

    impl Host {
        fn new(sr: f64, tempo: f64, blocks: Blocks) -> Host {
            Host {
                sr,
                tempo: Some(tempo),
                sig: TimeSig::COMMON,
                timeline: 0,
                playing: true,
                loop_range: None,
                blocks,
                captured: 0,
                buf: [vec![0.0; 4096], vec![0.0; 4096]],
            }
        }

        fn spb(&self) -> f64 {
            samples_per_beat(self.tempo.unwrap_or(120.0), self.sr)
        }

        fn snapshot(&self) -> TransportSnapshot {
            let Some(tempo) = self.tempo else {
                return TransportSnapshot {
                    playing: self.playing,
                    ..TransportSnapshot::default()
                };
            };
            let spb = samples_per_beat(tempo, self.sr);
            let pos = self.timeline as f64 / spb;
            let bpb = self.sig.beats_per_bar();
            let bar_start = bar_line_at_or_before(pos, bpb, 0.0);
            TransportSnapshot {
                playing: self.playing,
                tempo_bpm: Some(tempo),
                time_sig: Some(self.sig),
                pos_beats: Some(pos),
                pos_samples: Some(self.timeline),
                bar_start_beats: Some(bar_start),
                bar_number: Some((bar_start / bpb).round() as i64),
                loop_beats: None,
            }
        }

        /// Runs `frames` frames through `writer`, checking that no block allocates.
        fn run(&mut self, writer: &mut CaptureWriter, frames: u64) {
            let mut left = frames;
            while left > 0 {
                let mut len = (self.blocks.next() as u64).min(left).min(4096);
                if let (true, Some((_, end))) = (self.playing, self.loop_range) {
                    if self.timeline < end {
                        len = len.min((end - self.timeline) as u64);
                    }
                }
                let len = len as usize;
                for c in 0..2 {
                    for i in 0..len {
                        self.buf[c][i] = signal(self.captured + i as u64, c);
                    }
                }
                let snap = self.snapshot();
                let input = [&self.buf[0][..len], &self.buf[1][..len]];
                assert_no_alloc(|| writer.write_block(&input, len, &snap));
                self.captured += len as u64;
                left -= len as u64;
                if self.playing {
                    self.timeline += len as i64;
                    if let Some((start, end)) = self.loop_range {
                        if self.timeline == end {
                            self.timeline = start;
                        }
                    }
                }
            }
        }
    }

    fn request(bars: f64) -> PromptRequest {
        PromptRequest::now(bars, 3.0)
    }

    fn assert_audio(prompt: &Prompt, start: u64) {
        for c in 0..CHANNELS {
            assert_eq!(prompt.audio[c].len() as i64, prompt.span.len());
            for (i, &x) in prompt.audio[c].iter().enumerate() {
                assert_eq!(x, signal(start + i as u64, c), "channel {c} frame {i}");
            }
        }
    }

    #[test]
    fn last_four_bars_are_the_captured_bars_one_to_four() {
        for &sr in &[44_100.0, 48_000.0] {
            for &tempo in &[120.0, 97.0] {
                for blocks in BLOCKS {
                    let (mut writer, reader) = capture_pair(sr, 60.0);
                    let mut host = Host::new(sr, tempo, blocks);
                    // A stopped pre-roll, then play from bar 1 into bar 5.
                    host.playing = false;
                    host.run(&mut writer, 5_000);
                    host.playing = true;
                    let spb = host.spb();
                    host.run(&mut writer, (18.3 * spb) as u64);
                    let prompt = reader.prompt(&request(4.0)).unwrap();
                    let bar5 = first_sample_at_or_after(16.0 * spb) as u64;
                    assert_eq!(prompt.span.start, 5_000, "sr {sr} tempo {tempo}");
                    assert_eq!(prompt.span.end as u64, 5_000 + bar5);
                    assert_audio(&prompt, 5_000);
                    let anchor = prompt.anchor.unwrap();
                    assert_eq!(anchor.beats, 16.0);
                    assert_eq!(anchor.bar_index, 4);
                    assert_eq!(anchor.tempo_bpm, tempo);
                    assert!((anchor.frac - (bar5 as f64 - 16.0 * spb)).abs() < 1e-6);
                    // Two bars: bars 3 and 4.
                    let two = reader.prompt(&request(2.0)).unwrap();
                    assert_eq!(
                        two.span.start as u64,
                        5_000 + first_sample_at_or_after(8.0 * spb) as u64
                    );
                    assert_eq!(two.span.end, prompt.span.end);
                    // Stopping keeps the prompt where it was.
                    host.playing = false;
                    host.run(&mut writer, 3_000);
                    assert_eq!(reader.prompt(&request(4.0)).unwrap(), prompt);
                }
            }
        }
    }

    #[test]
    fn a_bar_line_on_a_block_boundary_is_the_end() {
        // 120 BPM at 48 kHz: a bar is 96000 samples; 512-frame blocks put bar 5 (384000) on
        // a block boundary (750 blocks), and the request comes right after that block.
        let (mut writer, reader) = capture_pair(48_000.0, 60.0);
        let mut host = Host::new(48_000.0, 120.0, Blocks::Fixed(512));
        host.run(&mut writer, 384_000);
        let prompt = reader.prompt(&request(4.0)).unwrap();
        assert_eq!(
            prompt.span,
            SampleSpan {
                start: 0,
                end: 384_000
            }
        );
        assert_eq!(prompt.anchor.unwrap().beats, 16.0);
        assert_audio(&prompt, 0);
    }

    #[test]
    fn a_loop_over_two_bars_gives_both_passes() {
        for &(sr, tempo) in &[(44_100.0, 120.0), (48_000.0, 97.0)] {
            let (mut writer, reader) = capture_pair(sr, 60.0);
            let mut host = Host::new(sr, tempo, Blocks::Random(7));
            let spb = host.spb();
            let loop_end = first_sample_at_or_after(8.0 * spb);
            host.loop_range = Some((0, loop_end));
            // Two passes and a half.
            host.run(&mut writer, (2 * loop_end + loop_end / 4) as u64);
            let prompt = reader.prompt(&request(4.0)).unwrap();
            // The loop end is the bar line of bar 3, passed at the end of the second pass.
            assert_eq!(
                prompt.span,
                SampleSpan {
                    start: 0,
                    end: 2 * loop_end
                }
            );
            assert_eq!(prompt.anchor.unwrap().beats, 8.0);
            assert_audio(&prompt, 0);
            // One bar: the second half of the second pass.
            let one = reader.prompt(&request(1.0)).unwrap();
            assert_eq!(
                one.span.start,
                loop_end + first_sample_at_or_after(4.0 * spb)
            );
        }
    }

    #[test]
    fn a_tempo_change_is_followed() {
        let sr = 44_100.0;
        let (mut writer, reader) = capture_pair(sr, 60.0);
        let mut host = Host::new(sr, 120.0, Blocks::Fixed(100));
        // 2 bars at 120 BPM (176400 samples), then the host continues from beat 8 at 100 BPM.
        host.run(&mut writer, 176_400);
        host.tempo = Some(100.0);
        let spb100 = samples_per_beat(100.0, sr);
        // Beat 8 at 120 BPM is sample 176400; at 100 BPM the host's sample position would be
        // different, so position the timeline so that beats stay continuous.
        host.timeline = (8.0 * spb100).round() as i64;
        host.run(&mut writer, (12.5 * spb100) as u64);
        let prompt = reader.prompt(&request(4.0)).unwrap();
        // Ends at beat 20 (bar 6), 12 beats into the 100 BPM part; starts at beat 4.
        let end = 176_400 + (first_sample_at_or_after(20.0 * spb100) - host_offset(8.0 * spb100));
        assert_eq!(prompt.anchor.unwrap().beats, 20.0);
        assert_eq!(prompt.span.end, end);
        assert_eq!(prompt.span.start, 88_200);
        assert_audio(&prompt, 88_200);
    }

    /// The timeline sample the test host restarted from (it rounds to a whole sample).
    fn host_offset(x: f64) -> i64 {
        x.round() as i64
    }

    #[test]
    fn a_stop_limits_the_prompt() {
        let sr = 48_000.0;
        let (mut writer, reader) = capture_pair(sr, 60.0);
        let mut host = Host::new(sr, 120.0, Blocks::Fixed(64));
        host.run(&mut writer, 96_000 * 2 + 1_000);
        host.playing = false;
        host.run(&mut writer, 10_000);
        host.timeline = 96_000 * 2;
        host.playing = true;
        host.run(&mut writer, 96_000 * 2 + 500);
        // Bars 3 and 4 were played after the stop; the bar line at the restart was not passed.
        let err = reader.prompt(&request(4.0)).unwrap_err();
        match err {
            CaptureError::TooShort { wanted, available } => {
                assert_eq!(wanted, 4.0);
                assert!((available - 2.0).abs() < 1e-9, "{available}");
            }
            e => panic!("unexpected {e:?}"),
        }
        let two = reader.prompt(&request(2.0)).unwrap();
        let restart = 96_000 * 2 + 1_000 + 10_000;
        assert_eq!(
            two.span,
            SampleSpan {
                start: restart,
                end: restart + 192_000
            }
        );
        assert_audio(&two, restart as u64);
    }

    #[test]
    fn errors_before_anything_was_played() {
        let (mut writer, reader) = capture_pair(44_100.0, 60.0);
        assert_eq!(reader.prompt(&request(4.0)), Err(CaptureError::Empty));
        let mut host = Host::new(44_100.0, 120.0, Blocks::Fixed(512));
        host.playing = false;
        host.run(&mut writer, 100_000);
        assert_eq!(reader.prompt(&request(4.0)), Err(CaptureError::NoBarLine));
        assert!(matches!(
            reader.prompt(&request(0.0)),
            Err(CaptureError::InvalidRequest(_))
        ));
        // Playing from beat 0 into bar 1: the start is not a passed bar line.
        host.playing = true;
        host.run(&mut writer, 50_000);
        assert_eq!(reader.prompt(&request(4.0)), Err(CaptureError::NoBarLine));
    }

    #[test]
    fn without_a_musical_position_the_last_seconds() {
        let sr = 44_100.0;
        let (mut writer, reader) = capture_pair(sr, 60.0);
        let mut host = Host::new(sr, 120.0, Blocks::Random(3));
        host.tempo = None;
        host.run(&mut writer, 200_000);
        let prompt = reader.prompt(&request(4.0)).unwrap();
        assert_eq!(prompt.anchor, None);
        assert_eq!(
            prompt.span,
            SampleSpan {
                start: 200_000 - 132_300,
                end: 200_000
            }
        );
        assert_audio(&prompt, 200_000 - 132_300);
        let err = reader.prompt(&PromptRequest::now(4.0, 10.0)).unwrap_err();
        assert!(
            matches!(err, CaptureError::TooShortSeconds { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_region_older_than_the_history_is_refused() {
        let sr = 44_100.0;
        let (mut writer, reader) = capture_pair(sr, 60.0);
        assert!(reader.capacity_frames() >= 60 * 44_100);
        let mut host = Host::new(sr, 120.0, Blocks::Fixed(4096));
        // 40 bars at 120 BPM = 80 s.
        host.run(&mut writer, 44_100 * 81);
        let err = reader.prompt(&request(40.0)).unwrap_err();
        assert!(matches!(err, CaptureError::Overwritten { .. }), "{err:?}");
        // The last 20 bars (40 s) are still there.
        let prompt = reader.prompt(&request(20.0)).unwrap();
        assert_eq!(
            prompt.span,
            SampleSpan {
                start: 44_100 * 40,
                end: 44_100 * 80
            }
        );
        assert_audio(&prompt, 44_100 * 40);
    }

    #[test]
    fn mono_and_missing_inputs() {
        let (mut writer, reader) = capture_pair(44_100.0, 60.0);
        let snap = TransportSnapshot::default();
        let mono = [vec![0.25f32; 100]];
        writer.write_block(&mono, 100, &snap);
        let none: [&[f32]; 0] = [];
        writer.write_block(&none, 50, &snap);
        let p = reader
            .prompt(&PromptRequest::now(1.0, 150.0 / 44_100.0))
            .unwrap();
        assert_eq!(p.span, SampleSpan { start: 0, end: 150 });
        for c in 0..2 {
            assert!(p.audio[c][..100].iter().all(|&x| x == 0.25));
            assert!(p.audio[c][100..].iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn a_request_pinned_to_its_press_ignores_later_bar_lines() {
        let sr = 48_000.0;
        let (mut writer, reader) = capture_pair(sr, 60.0);
        let mut host = Host::new(sr, 120.0, Blocks::Fixed(256));
        // "Generate" pressed in bar 5 (frame 400000); the request is served in bar 6.
        host.run(&mut writer, 400_000);
        let press = writer.frames_written();
        host.run(&mut writer, 100_000);
        let pinned = reader
            .prompt(&PromptRequest {
                at_frame: Some(press),
                ..PromptRequest::now(4.0, 3.0)
            })
            .unwrap();
        assert_eq!(
            pinned.span,
            SampleSpan {
                start: 0,
                end: 384_000
            }
        );
        assert_eq!(pinned.anchor.unwrap().beats, 16.0);
        let now = reader.prompt(&request(4.0)).unwrap();
        assert_eq!(
            now.span,
            SampleSpan {
                start: 96_000,
                end: 480_000
            }
        );
    }

    #[test]
    fn transport_now_follows_the_newest_block() {
        let sr = 48_000.0;
        let (mut writer, reader) = capture_pair(sr, 60.0);
        assert_eq!(reader.transport_now(), None);
        let mut host = Host::new(sr, 120.0, Blocks::Random(9));
        host.run(&mut writer, 123_456);
        let now = reader.transport_now().unwrap();
        assert_eq!(now.frames, 123_456);
        assert!(now.playing);
        let g = now.grid.unwrap();
        assert!((g.pos_beats - 123_456.0 / 24_000.0).abs() < 1e-9);
        assert_eq!(g.tempo_bpm, 120.0);
        host.playing = false;
        host.run(&mut writer, 1_000);
        let now = reader.transport_now().unwrap();
        assert!(!now.playing);
        assert_eq!(now.frames, 124_456);
        host.tempo = None;
        host.playing = true;
        host.run(&mut writer, 1_000);
        assert_eq!(reader.transport_now().unwrap().grid, None);
    }

    #[test]
    fn absurd_host_positions_are_survived() {
        let (mut writer, reader) = capture_pair(48_000.0, 60.0);
        let input = [vec![0.1f32; 256], vec![0.2f32; 256]];
        for pos in [f64::INFINITY, f64::NAN, 1e300, -1e300, 0.0, 3.999_999_999] {
            for tempo in [120.0, 1e-300, 1e300, f64::NAN] {
                for (n, d) in [(4, 4), (0, 0), (u32::MAX as i32, 1)] {
                    let snap = TransportSnapshot {
                        playing: true,
                        tempo_bpm: Some(tempo),
                        time_sig: Some(TimeSig {
                            numerator: n as u32,
                            denominator: d,
                        }),
                        pos_beats: Some(pos),
                        bar_start_beats: Some(pos),
                        bar_number: Some(i64::MAX),
                        ..TransportSnapshot::default()
                    };
                    assert_no_alloc(|| writer.write_block(&input, 256, &snap));
                    let _ = reader.prompt(&request(4.0));
                    let _ = reader.transport_now();
                }
            }
        }
    }

    /// The reader copies while the writer keeps writing: every prompt it returns holds exactly
    /// the frames it claims to, never a torn mix.
    #[test]
    fn concurrent_reads_are_consistent() {
        let sr = 44_100.0;
        // 120 BPM: a bar is 88200 frames.
        let (mut writer, reader) = capture_pair(sr, 60.0);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = done.clone();
        let handle = std::thread::spawn(move || {
            let mut host = Host::new(sr, 120.0, Blocks::Random(11));
            // About 4 minutes of audio: the ring wraps several times.
            for _ in 0..2_400 {
                host.run(&mut writer, 4_410);
                std::thread::sleep(std::time::Duration::from_micros(500));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
        let mut ok = 0;
        let mut refused = 0;
        while !handle.is_finished() {
            match reader.prompt(&request(8.0)) {
                Ok(p) => {
                    assert_eq!(p.span.len(), 8 * 88_200);
                    assert_eq!(p.span.end % 88_200, 0);
                    assert_audio(&p, p.span.start as u64);
                    ok += 1;
                }
                Err(
                    CaptureError::NoBarLine | CaptureError::TooShort { .. } | CaptureError::Empty,
                ) => {}
                Err(CaptureError::Overwritten { .. }) => refused += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        done.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        assert!(ok > 0, "no prompt was read ({refused} refused)");
    }

    /// The allocation checks above only mean something if the allocator really aborts inside
    /// `assert_no_alloc`: run an allocating closure in a child process and expect it to die.
    #[test]
    fn allocation_guard_is_armed() {
        if std::env::var_os("SEGUE_ALLOC_PROBE").is_some() {
            let v = assert_no_alloc(|| vec![1u8; 1000]);
            // Only reached when the guard is not armed.
            println!("allocated {}", v.len());
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "capture::tests::allocation_guard_is_armed",
                "--nocapture",
            ])
            .env("SEGUE_ALLOC_PROBE", "1")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "allocating inside assert_no_alloc did not abort: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
