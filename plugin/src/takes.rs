//! Takes: the audio of generated continuations, how it reaches the audio thread, and how it is
//! saved in the plugin state.
//!
//! Ownership and threads:
//! - A [`Take`] is immutable audio at the host rate behind an `Arc`, plus a published length.
//!   The non-realtime side builds it (after resampling the model's output off the audio thread);
//!   the audio thread only reads it ([`Take::available`], [`Take::sample`]).
//! - A growing take (streaming) is written by exactly one [`TakeWriter`], on a non-realtime
//!   thread, into storage preallocated for its final length: frames are written first, then the
//!   new valid length is published with release ordering, so the audio thread never sees a frame
//!   before it is written. Samples are relaxed atomics, so reads and writes of different frames
//!   never race.
//! - [`TakeStore`] lives on the non-realtime side (behind the plugin's non-realtime lock, used by
//!   the editor and the generation thread). It owns every take's metadata and its audio at the
//!   model's rate (what is saved), and it keeps a clone of every `Arc<Take>` it ever handed to the
//!   player until the player has let go of it. That is how the audio thread never frees memory:
//!   when the player drops its clone, the store's clone is still alive, and the store frees the
//!   take later in [`TakeStore::collect_garbage`], on its own thread.
//! - State: [`encode_state`] / [`decode_state`] turn the saved takes into a compact, versioned
//!   JSON string (16-bit PCM, base64) for a `#[persist]` field, and reject corrupt or foreign
//!   input with a [`StateError`], never a panic.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::playback::{PlayerCommand, PlayerHandle};
use crate::stream::Pace;

/// Most channels a take may have.
pub const MAX_CHANNELS: usize = 2;

/// Identity of a take, unique within the process; kept when a take is rebuilt at another sample
/// rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TakeId(pub u64);

impl TakeId {
    /// A new id, never returned before in this process.
    pub fn fresh() -> TakeId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TakeId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Why a take could not be built or extended.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TakeError {
    /// A take needs 1 or 2 channels.
    #[error("a take needs 1 to {MAX_CHANNELS} channels, got {0}")]
    Channels(usize),
    /// Channels of different lengths.
    #[error("channel {channel} has {len} frames, channel 0 has {expected}")]
    ChannelLengths {
        /// The offending channel.
        channel: usize,
        /// Its length in frames.
        len: usize,
        /// Channel 0's length in frames.
        expected: usize,
    },
    /// Not a usable sample rate.
    #[error("invalid sample rate {0} Hz")]
    SampleRate(f64),
    /// An anchor that is not a finite number of beats.
    #[error("invalid anchor position {0} beats")]
    Anchor(f64),
    /// A growing take would exceed the length it was allocated for.
    #[error("the take holds at most {capacity} frames; {requested} were written")]
    Full {
        /// Frames allocated.
        capacity: usize,
        /// Frames the append would have needed.
        requested: usize,
    },
}

/// Audio of one take at the host rate, shared by the store and the player.
pub struct Take {
    id: TakeId,
    /// Host sample rate the audio is at, in Hz.
    sample_rate: f64,
    channels: usize,
    /// Frames allocated per channel.
    capacity: usize,
    /// Planar: channel `c`, frame `f` at `c * capacity + f`, as `f32::to_bits`.
    samples: Box<[AtomicU32]>,
    /// Frames written and published (`<= capacity`).
    valid: AtomicUsize,
    /// No more frames will come.
    complete: AtomicBool,
    /// Position of frame 0 on the host timeline, in quarter-note beats (the bar line where the
    /// prompt ended). `None` for a take that can only be launched or played from MIDI.
    anchor_beats: Option<f64>,
    /// How a growing take's audio arrives (see [`crate::stream`]); written by its writer.
    pace: PaceCell,
}

/// A [`Pace`] in atomics: written by one thread, read by the audio thread. A read that overlaps a
/// write may mix fields of two consecutive estimates, which are both usable.
#[derive(Debug, Default)]
struct PaceCell {
    set: AtomicBool,
    fields: [AtomicU64; 6],
}

impl PaceCell {
    fn store(&self, p: &Pace) {
        let values = [
            p.generated,
            p.final_frames,
            p.frames_per_s,
            p.lookahead,
            p.chunk,
            p.delay_s,
        ];
        for (f, v) in self.fields.iter().zip(values) {
            f.store(v.to_bits(), Ordering::Relaxed);
        }
        self.set.store(true, Ordering::Release);
    }

    fn load(&self) -> Option<Pace> {
        if !self.set.load(Ordering::Acquire) {
            return None;
        }
        let v = |i: usize| f64::from_bits(self.fields[i].load(Ordering::Relaxed));
        Some(Pace {
            generated: v(0),
            final_frames: v(1),
            frames_per_s: v(2),
            lookahead: v(3),
            chunk: v(4),
            delay_s: v(5),
        })
    }
}

impl std::fmt::Debug for Take {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (valid, complete) = self.available();
        f.debug_struct("Take")
            .field("id", &self.id)
            .field("sample_rate", &self.sample_rate)
            .field("channels", &self.channels)
            .field("capacity", &self.capacity)
            .field("valid", &valid)
            .field("complete", &complete)
            .field("anchor_beats", &self.anchor_beats)
            .finish()
    }
}

fn check_rate_anchor(sample_rate: f64, anchor_beats: Option<f64>) -> Result<(), TakeError> {
    if !(sample_rate.is_finite() && sample_rate > 0.0) {
        return Err(TakeError::SampleRate(sample_rate));
    }
    match anchor_beats {
        Some(a) if !a.is_finite() => Err(TakeError::Anchor(a)),
        _ => Ok(()),
    }
}

impl Take {
    fn alloc(
        id: TakeId,
        sample_rate: f64,
        anchor_beats: Option<f64>,
        channels: usize,
        capacity: usize,
    ) -> Result<Take, TakeError> {
        check_rate_anchor(sample_rate, anchor_beats)?;
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(TakeError::Channels(channels));
        }
        Ok(Take {
            id,
            sample_rate,
            channels,
            capacity,
            samples: (0..channels * capacity)
                .map(|_| AtomicU32::new(0))
                .collect(),
            valid: AtomicUsize::new(0),
            complete: AtomicBool::new(false),
            anchor_beats,
            pace: PaceCell::default(),
        })
    }

    /// A finished take from planar audio at `sample_rate` Hz (the host rate). Allocates; call it
    /// off the audio thread.
    pub fn complete<S: AsRef<[f32]>>(
        id: TakeId,
        sample_rate: f64,
        anchor_beats: Option<f64>,
        planar: &[S],
    ) -> Result<Arc<Take>, TakeError> {
        let frames = planar.first().map_or(0, |c| c.as_ref().len());
        let take = Take::alloc(id, sample_rate, anchor_beats, planar.len(), frames)?;
        let mut writer = TakeWriter {
            take: Arc::new(take),
        };
        writer.append(planar)?;
        let take = writer.take.clone();
        writer.finish();
        Ok(take)
    }

    /// An empty take with room for `capacity` frames, to be filled while it plays, and its one
    /// writer. Allocates; call it off the audio thread.
    pub fn growing(
        id: TakeId,
        sample_rate: f64,
        anchor_beats: Option<f64>,
        channels: usize,
        capacity: usize,
    ) -> Result<(Arc<Take>, TakeWriter), TakeError> {
        let take = Arc::new(Take::alloc(
            id,
            sample_rate,
            anchor_beats,
            channels,
            capacity,
        )?);
        Ok((take.clone(), TakeWriter { take }))
    }

    /// The take's id.
    pub fn id(&self) -> TakeId {
        self.id
    }

    /// Sample rate of the audio in Hz (the host rate it was built for).
    pub fn sample_rate(&self) -> f64 {
        self.sample_rate
    }

    /// Number of channels (1 or 2).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Frames allocated (the final length of a growing take, at most).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Position of frame 0 on the host timeline, in beats.
    pub fn anchor_beats(&self) -> Option<f64> {
        self.anchor_beats
    }

    /// `(frames readable, complete)`. When `complete` is true, the frame count is final.
    /// Realtime-safe (two atomic loads).
    #[inline]
    pub fn available(&self) -> (usize, bool) {
        // `complete` is stored after the last `valid`: read it first, so `complete == true`
        // guarantees the final length is seen.
        let complete = self.complete.load(Ordering::Acquire);
        let valid = self.valid.load(Ordering::Acquire);
        (valid, complete)
    }

    /// Sample `frame` of channel `channel` (a missing second channel reads the first). Frames
    /// beyond the allocation read as silence. Only frames below [`Take::available`]'s count hold
    /// audio. Realtime-safe.
    #[inline]
    pub fn sample(&self, channel: usize, frame: usize) -> f32 {
        let c = channel.min(self.channels - 1);
        if frame >= self.capacity {
            return 0.0;
        }
        f32::from_bits(self.samples[c * self.capacity + frame].load(Ordering::Relaxed))
    }

    /// How a growing take's audio arrives, once its writer has measured it. Realtime-safe.
    #[inline]
    pub fn pace(&self) -> Option<Pace> {
        self.pace.load()
    }

    /// The readable frames copied out as planar audio (for export, waveforms, tests). Allocates.
    pub fn to_planar(&self) -> Vec<Vec<f32>> {
        let (valid, _) = self.available();
        (0..self.channels)
            .map(|c| (0..valid).map(|f| self.sample(c, f)).collect())
            .collect()
    }
}

/// The single writer of a growing take. Dropping it marks the take complete (a cancelled
/// generation leaves a shorter take, not one the player waits for forever).
pub struct TakeWriter {
    take: Arc<Take>,
}

impl TakeWriter {
    /// The take being written.
    pub fn take(&self) -> &Arc<Take> {
        &self.take
    }

    /// Appends planar frames (final audio: frames, once published, never change) and publishes
    /// them. All or nothing: on error nothing is written.
    pub fn append<S: AsRef<[f32]>>(&mut self, planar: &[S]) -> Result<(), TakeError> {
        let take = &*self.take;
        if planar.len() != take.channels {
            return Err(TakeError::Channels(planar.len()));
        }
        let frames = planar[0].as_ref().len();
        for (channel, c) in planar.iter().enumerate() {
            let len = c.as_ref().len();
            if len != frames {
                return Err(TakeError::ChannelLengths {
                    channel,
                    len,
                    expected: frames,
                });
            }
        }
        let start = take.valid.load(Ordering::Relaxed);
        let end = start + frames;
        if end > take.capacity {
            return Err(TakeError::Full {
                capacity: take.capacity,
                requested: end,
            });
        }
        for (c, channel) in planar.iter().enumerate() {
            let base = c * take.capacity + start;
            for (slot, &x) in take.samples[base..base + frames]
                .iter()
                .zip(channel.as_ref())
            {
                slot.store(x.to_bits(), Ordering::Relaxed);
            }
        }
        take.valid.store(end, Ordering::Release);
        Ok(())
    }

    /// Publishes how the take's audio arrives (for the player's start judgment).
    pub fn set_pace(&self, pace: &Pace) {
        self.take.pace.store(pace);
    }

    /// Marks the take complete: its current length is final.
    pub fn finish(self) {
        // Drop does it.
    }
}

impl Drop for TakeWriter {
    fn drop(&mut self) {
        self.take.complete.store(true, Ordering::Release);
    }
}

/// The generation settings a take was made with, shown in the editor and saved with it. Every
/// field has a serde default so older states load.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationInfo {
    /// Model id (Hub id or local folder).
    pub model: String,
    /// Text prompt.
    pub text: String,
    /// Random seed.
    pub seed: Option<u64>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: u32,
    /// Top-p (0 = off).
    pub top_p: f32,
    /// Classifier-free guidance scale.
    pub guidance: f32,
    /// Prompt length in bars.
    pub prompt_bars: f32,
    /// Continuation length in bars.
    pub continuation_bars: f32,
}

/// Where a take sits on the host timeline, saved with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TakeAnchor {
    /// Bar line of the take's first sample, in quarter-note beats.
    pub beats: f64,
    /// Host tempo at capture, in beats per minute.
    pub tempo_bpm: f64,
    /// Time signature numerator at capture.
    pub time_sig_numerator: u32,
    /// Time signature denominator at capture.
    pub time_sig_denominator: u32,
    /// Index of the anchor's bar (0-based, as the host counts).
    pub bar_index: i64,
}

/// Planar audio at the model's rate (32 kHz for MusicGen): what a take is saved as and rebuilt
/// from when the host rate changes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceAudio {
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// 1 or 2 channels of equal length.
    pub channels: Vec<Vec<f32>>,
}

impl SourceAudio {
    /// Length in frames.
    pub fn frames(&self) -> usize {
        self.channels.first().map_or(0, Vec::len)
    }
}

/// A take as the non-realtime side knows it.
#[derive(Debug, Clone)]
pub struct TakeEntry {
    /// The take's id (== `take.id()`).
    pub id: TakeId,
    /// User-visible name.
    pub name: String,
    /// How it was generated.
    pub info: GenerationInfo,
    /// Where it sits on the timeline.
    pub anchor: Option<TakeAnchor>,
    /// Audio at the model's rate (saved in the state).
    pub source: SourceAudio,
    /// Audio at the host rate, shared with the player.
    pub take: Arc<Take>,
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// No take with this id.
    #[error("no take with id {0:?}")]
    NoSuchTake(TakeId),
    /// The player's command queue is full (the audio thread is not running); try again later.
    #[error("the audio thread's command queue is full")]
    QueueFull,
    /// Audio of another channel count (or ragged channels).
    #[error(
        "audio with {got} channels (or channels of different lengths) for a take with {expected}"
    )]
    Shape {
        /// Channels of the take.
        expected: usize,
        /// Channels given.
        got: usize,
    },
}

/// Every take of the plugin instance, its selection and the player's command queue. Lives on
/// the non-realtime side; nothing in it is touched by the audio thread except through the
/// player's queue.
#[derive(Default)]
pub struct TakeStore {
    entries: Vec<TakeEntry>,
    selected: Option<TakeId>,
    /// Takes removed from `entries` (or replaced) that the player may still hold: freed by
    /// [`TakeStore::collect_garbage`] once the store's clone is the last.
    graveyard: Vec<Arc<Take>>,
    player: Option<PlayerHandle>,
    /// Takes being generated or extended, with the frames of their source the state saves
    /// meanwhile (0: a new take, not saved until complete; an extended take saves its old
    /// audio until the extension completes).
    growing: Vec<(TakeId, usize)>,
}

impl TakeStore {
    /// An empty store without a player.
    pub fn new() -> TakeStore {
        TakeStore::default()
    }

    /// Connects the player created in `activate()` and tells it the current selection (a new
    /// player starts with none). Replaces (and drops) the previous handle.
    pub fn attach(&mut self, handle: PlayerHandle) -> Result<(), StoreError> {
        self.player = Some(handle);
        let take = self
            .selected
            .and_then(|id| self.get(id))
            .map(|e| e.take.clone());
        self.send(PlayerCommand::Select {
            take,
            not_before_beats: None,
        })
    }

    /// Disconnects the player (in `deactivate()`).
    pub fn detach(&mut self) {
        self.player = None;
    }

    /// Every take, oldest first.
    pub fn entries(&self) -> &[TakeEntry] {
        &self.entries
    }

    /// The take with this id.
    pub fn get(&self, id: TakeId) -> Option<&TakeEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// The take with this id, to change.
    fn entry_mut(&mut self, id: TakeId) -> Result<&mut TakeEntry, StoreError> {
        self.entries
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or(StoreError::NoSuchTake(id))
    }

    /// The selected take's id.
    pub fn selected(&self) -> Option<TakeId> {
        self.selected
    }

    /// Adds a take (not selected). Returns its id.
    pub fn insert(&mut self, entry: TakeEntry) -> TakeId {
        let id = entry.id;
        self.entries.push(entry);
        id
    }

    /// Selects the take the player plays (`None`: silence). In next-bar mode the player launches
    /// it at the first bar line at or after `not_before_beats` (and after its arrival).
    pub fn select(
        &mut self,
        id: Option<TakeId>,
        not_before_beats: Option<f64>,
    ) -> Result<(), StoreError> {
        let take = match id {
            Some(id) => Some(self.get(id).ok_or(StoreError::NoSuchTake(id))?.take.clone()),
            None => None,
        };
        self.send(PlayerCommand::Select {
            take,
            not_before_beats,
        })?;
        self.selected = id;
        Ok(())
    }

    /// Appends audio at the model's rate to a growing take's saved source (the host-rate audio
    /// goes through its [`TakeWriter`]). Channel count and lengths must match the source.
    pub fn append_source<S: AsRef<[f32]>>(
        &mut self,
        id: TakeId,
        planar: &[S],
    ) -> Result<(), StoreError> {
        let entry = self.entry_mut(id)?;
        let source = &mut entry.source.channels;
        let frames = planar.first().map_or(0, |c| c.as_ref().len());
        if planar.len() != source.len() || planar.iter().any(|c| c.as_ref().len() != frames) {
            return Err(StoreError::Shape {
                expected: source.len(),
                got: planar.len(),
            });
        }
        for (dst, src) in source.iter_mut().zip(planar) {
            dst.extend_from_slice(src.as_ref());
        }
        Ok(())
    }

    /// Marks a take as growing: until [`TakeStore::end_growing`], the state saves only the
    /// first `saved_frames` frames of its source (none when 0: the take is left out).
    pub fn begin_growing(&mut self, id: TakeId, saved_frames: usize) {
        self.growing.retain(|(g, _)| *g != id);
        self.growing.push((id, saved_frames));
    }

    /// The take's audio is final: the state saves all of it.
    pub fn end_growing(&mut self, id: TakeId) {
        self.growing.retain(|(g, _)| *g != id);
    }

    /// Whether a take is growing (see [`TakeStore::begin_growing`]).
    pub fn is_growing(&self, id: TakeId) -> bool {
        self.growing.iter().any(|(g, _)| *g == id)
    }

    /// Replaces a take's host-rate audio by `take` (same id: the audio it had, possibly followed
    /// by more) and its saved source by `source`. The player, if it plays the take, goes on in
    /// the new audio from where it is.
    pub fn replace_take(
        &mut self,
        id: TakeId,
        take: Arc<Take>,
        source: SourceAudio,
    ) -> Result<(), StoreError> {
        let entry = self.entry_mut(id)?;
        debug_assert_eq!(take.id(), id);
        let old = std::mem::replace(&mut entry.take, take);
        entry.source = source;
        self.graveyard.push(old);
        if self.selected == Some(id) {
            self.select(Some(id), None)?;
        }
        self.collect_garbage();
        Ok(())
    }

    /// Replaces the generation settings a take is saved with.
    pub fn set_info(&mut self, id: TakeId, info: GenerationInfo) -> Result<(), StoreError> {
        let entry = self.entry_mut(id)?;
        entry.info = info;
        Ok(())
    }

    /// Plays a take from its start now on the player's audition voice, whatever the mode and
    /// the transport (`None`: fade the audition out).
    pub fn audition(&mut self, id: Option<TakeId>) -> Result<(), StoreError> {
        let take = match id {
            Some(id) => Some(self.get(id).ok_or(StoreError::NoSuchTake(id))?.take.clone()),
            None => None,
        };
        self.send(PlayerCommand::Audition(take))
    }

    /// Renames a take.
    pub fn rename(&mut self, id: TakeId, name: &str) -> Result<(), StoreError> {
        let entry = self.entry_mut(id)?;
        entry.name = name.to_owned();
        Ok(())
    }

    /// Removes a take; if it was selected, the player is told to stop it.
    pub fn remove(&mut self, id: TakeId) -> Result<TakeEntry, StoreError> {
        let index = self
            .entries
            .iter()
            .position(|e| e.id == id)
            .ok_or(StoreError::NoSuchTake(id))?;
        if self.selected == Some(id) {
            self.select(None, None)?;
        }
        self.end_growing(id);
        let entry = self.entries.remove(index);
        self.graveyard.push(entry.take.clone());
        self.collect_garbage();
        Ok(entry)
    }

    /// Replaces every take's host-rate audio (after the host rate changed): `rebuild` makes the
    /// new `Arc<Take>` from an entry (resampling its source). The old ones go to the graveyard;
    /// the player is re-sent the selection.
    pub fn rebuild<E>(
        &mut self,
        mut rebuild: impl FnMut(&TakeEntry) -> Result<Arc<Take>, E>,
    ) -> Result<(), E> {
        for entry in &mut self.entries {
            let new = rebuild(entry)?;
            let old = std::mem::replace(&mut entry.take, new);
            self.graveyard.push(old);
        }
        if self.player.is_some() {
            // A full queue leaves the old selection playing; the next select fixes it.
            let _ = self.select(self.selected, None);
        }
        self.collect_garbage();
        Ok(())
    }

    /// Frees the removed takes the player no longer holds. Call it regularly from a
    /// non-realtime thread (any store operation also does). Returns how many are still held.
    pub fn collect_garbage(&mut self) -> usize {
        self.graveyard.retain(|t| Arc::strong_count(t) > 1);
        self.graveyard.len()
    }

    /// What the state saves: every take's source audio, metadata and the selection. A growing
    /// take is saved as it was before its generation (a new one not at all), so a project saved
    /// mid-generation holds only final audio.
    pub fn to_state(&self) -> TakesState {
        let mut takes = Vec::with_capacity(self.entries.len());
        let mut selected = None;
        for e in &self.entries {
            let saved_frames = self
                .growing
                .iter()
                .find(|(g, _)| *g == e.id)
                .map(|(_, n)| *n);
            let source = match saved_frames {
                None => e.source.clone(),
                Some(0) => continue,
                Some(n) => SourceAudio {
                    sample_rate: e.source.sample_rate,
                    channels: e
                        .source
                        .channels
                        .iter()
                        .map(|c| c[..n.min(c.len())].to_vec())
                        .collect(),
                },
            };
            if self.selected == Some(e.id) {
                selected = Some(takes.len());
            }
            takes.push(SavedTake {
                name: e.name.clone(),
                info: e.info.clone(),
                anchor: e.anchor,
                source,
            });
        }
        TakesState { takes, selected }
    }

    /// Replaces every take by those of a loaded state. `build` makes each take's host-rate audio
    /// (resampling the source off the audio thread). Takes that fail to build are skipped and
    /// their errors returned, so one bad take does not lose the others.
    pub fn restore<E>(
        &mut self,
        state: TakesState,
        mut build: impl FnMut(TakeId, &SavedTake) -> Result<Arc<Take>, E>,
    ) -> Vec<E> {
        let mut errors = Vec::new();
        self.growing.clear();
        let old = std::mem::take(&mut self.entries);
        self.graveyard.extend(old.into_iter().map(|e| e.take));
        let mut selected = None;
        for (index, saved) in state.takes.into_iter().enumerate() {
            let id = TakeId::fresh();
            match build(id, &saved) {
                Ok(take) => {
                    if state.selected == Some(index) {
                        selected = Some(id);
                    }
                    self.entries.push(TakeEntry {
                        id,
                        name: saved.name,
                        info: saved.info,
                        anchor: saved.anchor,
                        source: saved.source,
                        take,
                    });
                }
                Err(e) => errors.push(e),
            }
        }
        self.selected = None;
        if self.player.is_some() {
            let _ = self.select(selected, None);
        }
        self.selected = selected;
        self.collect_garbage();
        errors
    }

    fn send(&mut self, command: PlayerCommand) -> Result<(), StoreError> {
        if let PlayerCommand::Select {
            take: Some(take), ..
        }
        | PlayerCommand::Audition(Some(take)) = &command
        {
            // The store must hold every take the player can hold (see the module comment).
            debug_assert!(self.entries.iter().any(|e| Arc::ptr_eq(&e.take, take)));
        }
        match &mut self.player {
            Some(player) => player.send(command).map_err(|_| StoreError::QueueFull),
            None => Ok(()),
        }
    }
}

/// Version of the takes state written by this build.
pub const TAKES_STATE_VERSION: u32 = 1;

/// Largest encoded takes state, in bytes. nice-plug refuses a whole plugin state over 256 MiB;
/// this leaves room for the rest (about 25 minutes of stereo audio at 32 kHz).
pub const MAX_STATE_BYTES: usize = 192 << 20;

/// Highest sample rate a saved take may claim, in Hz.
const MAX_SAVED_RATE: u32 = 384_000;

/// One take in the saved state.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTake {
    /// User-visible name.
    pub name: String,
    /// How it was generated.
    pub info: GenerationInfo,
    /// Where it sits on the timeline.
    pub anchor: Option<TakeAnchor>,
    /// Its audio (16-bit precision once saved).
    pub source: SourceAudio,
}

/// Every take of a plugin instance, as saved.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TakesState {
    /// The takes, in the store's order.
    pub takes: Vec<SavedTake>,
    /// Index of the selected take.
    pub selected: Option<usize>,
}

/// Why a takes state could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not JSON, or not the expected structure.
    #[error("takes state is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// No version field: not a takes state.
    #[error("takes state has no version field")]
    NoVersion,
    /// Written by a newer build (or something else).
    #[error(
        "takes state version {0} is not supported (this build reads up to {TAKES_STATE_VERSION})"
    )]
    UnsupportedVersion(u32),
    /// The audio of a take is malformed.
    #[error("take {index} ({name:?}): {problem}")]
    Audio {
        /// Index of the take in the state.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The encoded state would exceed [`MAX_STATE_BYTES`].
    #[error("the takes would need {bytes} bytes of plugin state, more than the {MAX_STATE_BYTES} allowed; delete some takes")]
    TooLarge {
        /// Bytes needed.
        bytes: usize,
    },
}

#[derive(Deserialize)]
struct VersionProbe {
    version: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct StateV1 {
    version: u32,
    selected: Option<usize>,
    takes: Vec<SavedTakeV1>,
}

#[derive(Serialize, Deserialize)]
struct SavedTakeV1 {
    name: String,
    #[serde(default)]
    info: GenerationInfo,
    anchor: Option<TakeAnchor>,
    sample_rate: u32,
    channels: u32,
    frames: u64,
    /// Planar (channel 0, then channel 1) little-endian signed 16-bit PCM, standard base64.
    pcm16: String,
}

/// Quantises a sample to 16 bits (clipping at full scale).
fn to_pcm16(x: f32) -> i16 {
    let x = if x.is_finite() {
        x.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    (x * 32767.0).round() as i16
}

fn from_pcm16(x: i16) -> f32 {
    (f32::from(x) / 32767.0).max(-1.0)
}

/// Rounds audio in place to exactly what the saved state stores (16-bit PCM), so a take sounds
/// the same before and after the project is saved and reopened.
pub fn quantise_to_state(samples: &mut [f32]) {
    for x in samples {
        *x = from_pcm16(to_pcm16(*x));
    }
}

/// Encodes the takes as a compact, versioned JSON string (see [`SavedTakeV1`]), refusing more
/// than [`MAX_STATE_BYTES`].
pub fn encode_state(state: &TakesState) -> Result<String, StateError> {
    encode_state_within(state, MAX_STATE_BYTES)
}

fn encode_state_within(state: &TakesState, max_bytes: usize) -> Result<String, StateError> {
    let mut takes = Vec::with_capacity(state.takes.len());
    let mut bytes = 0usize;
    for (index, t) in state.takes.iter().enumerate() {
        let bad = |problem: String| StateError::Audio {
            index,
            name: t.name.clone(),
            problem,
        };
        let channels = t.source.channels.len();
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(bad(format!("{channels} channels")));
        }
        if t.source.sample_rate == 0 || t.source.sample_rate > MAX_SAVED_RATE {
            return Err(bad(format!("sample rate {} Hz", t.source.sample_rate)));
        }
        let frames = t.source.frames();
        if t.source.channels.iter().any(|c| c.len() != frames) {
            return Err(bad("channels of different lengths".to_owned()));
        }
        // base64 makes 4 characters of 3 bytes.
        bytes += (frames * channels * 2).div_ceil(3) * 4;
        if bytes > max_bytes {
            return Err(StateError::TooLarge { bytes });
        }
        let mut pcm = Vec::with_capacity(frames * channels * 2);
        for c in &t.source.channels {
            for &x in c {
                pcm.extend_from_slice(&to_pcm16(x).to_le_bytes());
            }
        }
        takes.push(SavedTakeV1 {
            name: t.name.clone(),
            info: t.info.clone(),
            anchor: t.anchor,
            sample_rate: t.source.sample_rate,
            channels: channels as u32,
            frames: frames as u64,
            pcm16: base64::engine::general_purpose::STANDARD.encode(&pcm),
        });
    }
    let json = serde_json::to_string(&StateV1 {
        version: TAKES_STATE_VERSION,
        selected: state.selected.filter(|&i| i < state.takes.len()),
        takes,
    })?;
    if json.len() > max_bytes {
        return Err(StateError::TooLarge { bytes: json.len() });
    }
    Ok(json)
}

/// Decodes a string written by [`encode_state`] (any supported version). Corrupt or foreign
/// input gives an error, never a panic.
pub fn decode_state(json: &str) -> Result<TakesState, StateError> {
    let probe: VersionProbe = serde_json::from_str(json)?;
    match probe.version {
        None => Err(StateError::NoVersion),
        Some(1) => decode_v1(serde_json::from_str(json)?),
        Some(v) => Err(StateError::UnsupportedVersion(v)),
    }
}

fn decode_v1(state: StateV1) -> Result<TakesState, StateError> {
    let mut takes = Vec::with_capacity(state.takes.len().min(1024));
    for (index, t) in state.takes.into_iter().enumerate() {
        let bad = |problem: String| StateError::Audio {
            index,
            name: t.name.clone(),
            problem,
        };
        let channels = t.channels as usize;
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(bad(format!("{channels} channels")));
        }
        if t.sample_rate == 0 || t.sample_rate > MAX_SAVED_RATE {
            return Err(bad(format!("sample rate {} Hz", t.sample_rate)));
        }
        if let Some(a) = &t.anchor {
            if !(a.beats.is_finite() && a.tempo_bpm.is_finite() && a.tempo_bpm > 0.0) {
                return Err(bad("anchor is not a finite position and tempo".to_owned()));
            }
        }
        let pcm = base64::engine::general_purpose::STANDARD
            .decode(t.pcm16.as_bytes())
            .map_err(|e| bad(format!("audio is not base64: {e}")))?;
        let expected = usize::try_from(t.frames)
            .ok()
            .and_then(|f| f.checked_mul(channels))
            .and_then(|n| n.checked_mul(2));
        if expected != Some(pcm.len()) {
            return Err(bad(format!(
                "{} bytes of audio for {} frames of {channels} channels",
                pcm.len(),
                t.frames
            )));
        }
        let frames = t.frames as usize;
        let samples: Vec<f32> = pcm
            .chunks_exact(2)
            .map(|b| from_pcm16(i16::from_le_bytes([b[0], b[1]])))
            .collect();
        let channels = samples.chunks(frames.max(1)).map(<[f32]>::to_vec).collect();
        let source = if frames == 0 {
            SourceAudio {
                sample_rate: t.sample_rate,
                channels: vec![Vec::new(); t.channels as usize],
            }
        } else {
            SourceAudio {
                sample_rate: t.sample_rate,
                channels,
            }
        };
        takes.push(SavedTake {
            name: t.name,
            info: t.info,
            anchor: t.anchor,
            source,
        });
    }
    let selected = state.selected.filter(|&i| i < takes.len());
    Ok(TakesState { takes, selected })
}

#[cfg(test)]
// Sample-by-sample comparisons read best with explicit frame indices.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::playback::{player_pair, PlayerSettings};
    use crate::transport::TransportSnapshot;

    fn source(frames: usize, channels: usize) -> SourceAudio {
        SourceAudio {
            sample_rate: 32_000,
            channels: (0..channels)
                .map(|c| {
                    (0..frames)
                        .map(|i| ((i * 7 + c * 13) % 200) as f32 / 100.0 - 1.0)
                        .collect()
                })
                .collect(),
        }
    }

    fn saved(name: &str, frames: usize, channels: usize) -> SavedTake {
        SavedTake {
            name: name.to_owned(),
            info: GenerationInfo {
                model: "facebook/musicgen-small".to_owned(),
                text: "warm \"lo-fi\" piano\n".to_owned(),
                seed: Some(42),
                temperature: 1.0,
                top_k: 250,
                top_p: 0.0,
                guidance: 3.0,
                prompt_bars: 4.0,
                continuation_bars: 8.0,
            },
            anchor: Some(TakeAnchor {
                beats: 16.0,
                tempo_bpm: 97.0,
                time_sig_numerator: 7,
                time_sig_denominator: 8,
                bar_index: 4,
            }),
            source: source(frames, channels),
        }
    }

    fn entry(frames: usize) -> TakeEntry {
        let id = TakeId::fresh();
        let audio = vec![vec![0.5f32; frames], vec![-0.5f32; frames]];
        TakeEntry {
            id,
            name: format!("take {}", id.0),
            info: GenerationInfo::default(),
            anchor: None,
            source: source(frames, 2),
            take: Take::complete(id, 48_000.0, Some(0.0), &audio).unwrap(),
        }
    }

    #[test]
    fn state_round_trip() {
        let state = TakesState {
            takes: vec![
                saved("first", 3_200, 2),
                saved("mono", 1_000, 1),
                saved("empty", 0, 2),
            ],
            selected: Some(1),
        };
        let json = encode_state(&state).unwrap();
        let back = decode_state(&json).unwrap();
        assert_eq!(back.selected, Some(1));
        assert_eq!(back.takes.len(), 3);
        for (a, b) in state.takes.iter().zip(&back.takes) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.info, b.info);
            assert_eq!(a.anchor, b.anchor);
            assert_eq!(b.source.sample_rate, 32_000);
            assert_eq!(a.source.channels.len(), b.source.channels.len());
            for (ca, cb) in a.source.channels.iter().zip(&b.source.channels) {
                assert_eq!(ca.len(), cb.len());
                for (x, y) in ca.iter().zip(cb) {
                    assert!((x - y).abs() <= 0.5 / 32767.0 + 1e-7, "{x} vs {y}");
                }
            }
        }
        // 16-bit is exact on a second round trip, and compact: 2 bytes a sample, base64.
        assert_eq!(encode_state(&back).unwrap(), json);
        let pcm_bytes = (3_200 * 2 + 1_000) * 2;
        assert!(
            json.len() < pcm_bytes * 4 / 3 + 2_000,
            "{} bytes",
            json.len()
        );
    }

    #[test]
    fn pcm16_clips_and_rounds() {
        assert_eq!(to_pcm16(1.0), 32767);
        assert_eq!(to_pcm16(2.0), 32767);
        assert_eq!(to_pcm16(-1.0), -32767);
        assert_eq!(to_pcm16(-3.0), -32767);
        assert_eq!(to_pcm16(f32::NAN), 0);
        assert_eq!(to_pcm16(0.5 / 32767.0 + 1e-6), 1);
        assert_eq!(from_pcm16(i16::MIN), -1.0);
        assert_eq!(from_pcm16(32767), 1.0);
    }

    #[test]
    fn corrupt_or_foreign_states_are_errors() {
        let good = encode_state(&TakesState {
            takes: vec![saved("a", 300, 2)],
            selected: Some(0),
        })
        .unwrap();
        let cases: Vec<String> = vec![
            String::new(),
            "null".into(),
            "[1,2,3]".into(),
            "{}".into(),
            r#"{"gain": 0.5}"#.into(),
            r#"{"version": 2, "takes": []}"#.into(),
            r#"{"version": 1}"#.into(),
            r#"{"version": "1", "takes": []}"#.into(),
            good.replace("\"channels\":2", "\"channels\":0"),
            good.replace("\"channels\":2", "\"channels\":3"),
            good.replace("\"channels\":2", "\"channels\":1"),
            good.replace("\"frames\":300", "\"frames\":301"),
            good.replace("\"frames\":300", "\"frames\":18446744073709551615"),
            good.replace("\"sample_rate\":32000", "\"sample_rate\":0"),
            good.replace("\"pcm16\":\"", "\"pcm16\":\"!!"),
            good.replace("\"beats\":16.0", "\"beats\":1e999"),
            good[..good.len() / 2].to_owned(),
        ];
        for (i, case) in cases.iter().enumerate() {
            assert!(decode_state(case).is_err(), "case {i} decoded: {case:.200}");
        }
        assert!(matches!(
            decode_state(r#"{"version": 7, "takes": []}"#),
            Err(StateError::UnsupportedVersion(7))
        ));
        assert!(matches!(decode_state("{}"), Err(StateError::NoVersion)));
        // An out-of-range selection is dropped, not an error.
        let odd = good.replace("\"selected\":0", "\"selected\":5");
        assert_eq!(decode_state(&odd).unwrap().selected, None);
    }

    /// Every truncation and many single-byte corruptions decode to a value or an error, never
    /// a panic.
    #[test]
    fn mangled_states_never_panic() {
        let good = encode_state(&TakesState {
            takes: vec![saved("a", 40, 2), saved("b", 10, 1)],
            selected: None,
        })
        .unwrap();
        for cut in 0..good.len() {
            let _ = decode_state(&good[..cut]);
        }
        let bytes = good.as_bytes();
        let mut rng = 0x1357_9bdfu32;
        for _ in 0..3_000 {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            let mut b = bytes.to_vec();
            let at = rng as usize % b.len();
            b[at] = b"0123456789{}[]\",:-.eE\\ azAZ+/="[(rng >> 16) as usize % 30];
            if let Ok(s) = String::from_utf8(b) {
                let _ = decode_state(&s);
            }
        }
    }

    #[test]
    fn too_large_a_state_is_refused() {
        let state = TakesState {
            takes: vec![saved("a", 3_000, 2), saved("b", 3_000, 2)],
            selected: None,
        };
        // Each take needs 3000 * 2 * 2 bytes of PCM, 16000 characters of base64.
        assert!(encode_state_within(&state, 40_000).is_ok());
        assert!(matches!(
            encode_state_within(&state, 30_000),
            Err(StateError::TooLarge { bytes: 32_000 })
        ));
        // The JSON around the audio counts too.
        assert!(matches!(
            encode_state_within(&state, 32_000),
            Err(StateError::TooLarge { .. })
        ));
    }

    #[test]
    fn growing_take_appends_and_publishes() {
        let (take, mut writer) =
            Take::growing(TakeId::fresh(), 48_000.0, Some(4.0), 2, 10).unwrap();
        assert_eq!(take.available(), (0, false));
        writer.append(&[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).unwrap();
        assert_eq!(take.available(), (3, false));
        assert_eq!(take.sample(1, 2), 6.0);
        // Too long, wrong channel count, ragged: refused, nothing written.
        assert_eq!(
            writer.append(&[[0.0; 8], [0.0; 8]]),
            Err(TakeError::Full {
                capacity: 10,
                requested: 11
            })
        );
        assert_eq!(writer.append(&[[0.0; 2]]), Err(TakeError::Channels(1)));
        assert!(matches!(
            writer.append(&[&[0.0f32; 2][..], &[0.0f32; 1][..]]),
            Err(TakeError::ChannelLengths { .. })
        ));
        assert_eq!(take.available(), (3, false));
        writer.append(&[[7.0], [8.0]]).unwrap();
        drop(writer);
        assert_eq!(take.available(), (4, true));
        assert_eq!(
            take.to_planar(),
            vec![vec![1.0, 2.0, 3.0, 7.0], vec![4.0, 5.0, 6.0, 8.0]]
        );
        // Out of range reads are silence, a mono take reads its one channel everywhere.
        assert_eq!(take.sample(0, 1_000), 0.0);
        let mono = Take::complete(TakeId::fresh(), 48_000.0, None, &[[0.25f32; 4]]).unwrap();
        assert_eq!(mono.sample(1, 3), 0.25);
        assert!(Take::complete(TakeId::fresh(), 0.0, None, &[[0.0f32; 4]]).is_err());
        assert!(Take::complete(TakeId::fresh(), 48_000.0, Some(f64::NAN), &[[0.0f32; 4]]).is_err());
        let none: [&[f32]; 0] = [];
        assert_eq!(
            Take::complete(TakeId::fresh(), 48_000.0, None, &none).unwrap_err(),
            TakeError::Channels(0)
        );
    }

    /// A reader on another thread sees the valid length grow and never a frame that was not
    /// written yet.
    #[test]
    fn growing_take_concurrent_reader() {
        let n = 200_000;
        let (take, mut writer) = Take::growing(TakeId::fresh(), 48_000.0, None, 1, n).unwrap();
        let reader = {
            let take = take.clone();
            std::thread::spawn(move || {
                let mut last = 0;
                loop {
                    let (valid, complete) = take.available();
                    assert!(valid >= last);
                    for f in last..valid {
                        assert_eq!(take.sample(0, f), f as f32 + 1.0);
                    }
                    last = valid;
                    if complete {
                        return valid;
                    }
                }
            })
        };
        let data: Vec<f32> = (0..n).map(|f| f as f32 + 1.0).collect();
        for chunk in data.chunks(1_237) {
            writer.append(&[chunk]).unwrap();
        }
        writer.finish();
        assert_eq!(reader.join().unwrap(), n);
    }

    #[test]
    fn store_operations_and_garbage() {
        let (mut player, handle) = player_pair(48_000.0);
        let mut store = TakeStore::new();
        store.attach(handle).unwrap();
        let a = store.insert(entry(1_000));
        let b = store.insert(entry(1_000));
        store.select(Some(a), None).unwrap();
        assert_eq!(store.selected(), Some(a));
        store.rename(b, "keeper").unwrap();
        assert_eq!(store.get(b).unwrap().name, "keeper");
        assert_eq!(
            store.select(Some(TakeId(u64::MAX)), None),
            Err(StoreError::NoSuchTake(TakeId(u64::MAX)))
        );
        // The player picks the selection up.
        let mut out = [vec![0.0f32; 64], vec![0.0f32; 64]];
        let snap = TransportSnapshot {
            playing: true,
            tempo_bpm: Some(120.0),
            pos_beats: Some(0.0),
            ..TransportSnapshot::default()
        };
        player.process(&mut out, &snap, &PlayerSettings::default());
        assert_eq!(player_status(&store).playing_take(), Some(a));
        // Removing the playing take: it stays alive (the player holds it) until the player lets
        // go, then the store frees it, on this thread.
        let weak = Arc::downgrade(&store.get(a).unwrap().take);
        let removed = store.remove(a).unwrap();
        drop(removed);
        assert_eq!(store.selected(), None);
        assert_eq!(store.collect_garbage(), 1);
        assert!(weak.upgrade().is_some());
        nice_assert_no_alloc::assert_no_alloc(|| {
            player.process(&mut out, &snap, &PlayerSettings::default());
        });
        // Fading out takes a few blocks.
        for _ in 0..10 {
            nice_assert_no_alloc::assert_no_alloc(|| {
                player.process(&mut out, &snap, &PlayerSettings::default());
            });
        }
        assert_eq!(player_status(&store).playing_take(), None);
        assert_eq!(store.collect_garbage(), 0);
        assert!(weak.upgrade().is_none());
        assert_eq!(store.entries().len(), 1);
        // A growing take's source grows with it.
        store.append_source(b, &[[0.5f32; 10], [0.25; 10]]).unwrap();
        assert_eq!(store.get(b).unwrap().source.frames(), 1_010);
        assert!(matches!(
            store.append_source(b, &[[0.5f32; 10]]),
            Err(StoreError::Shape {
                expected: 2,
                got: 1
            })
        ));
    }

    /// Growing takes are saved as they were before their generation: a new one not at all, an
    /// extended one with its old frames; the selection index counts only saved takes.
    #[test]
    fn growing_takes_save_only_final_audio() {
        let mut store = TakeStore::new();
        let a = store.insert(entry(100));
        let b = store.insert(entry(300));
        let c = store.insert(entry(50));
        store.select(Some(c), None).unwrap();
        store.begin_growing(a, 0);
        store.begin_growing(b, 120);
        assert!(store.is_growing(a) && store.is_growing(b) && !store.is_growing(c));
        let state = store.to_state();
        assert_eq!(state.takes.len(), 2);
        assert_eq!(state.takes[0].source.frames(), 120);
        assert_eq!(
            state.takes[0].source.channels[1][..],
            store.get(b).unwrap().source.channels[1][..120]
        );
        assert_eq!(state.takes[1].source.frames(), 50);
        assert_eq!(state.selected, Some(1));
        store.end_growing(a);
        store.end_growing(b);
        let state = store.to_state();
        assert_eq!(state.takes.len(), 3);
        assert_eq!(state.takes[1].source.frames(), 300);
        assert_eq!(state.selected, Some(2));
        // Replacing a take's audio keeps its place, id and selection.
        store.begin_growing(c, 50);
        let (longer, _writer) = Take::growing(c, 48_000.0, Some(0.0), 2, 500).unwrap();
        store
            .replace_take(c, longer.clone(), source(80, 2))
            .unwrap();
        assert!(Arc::ptr_eq(&store.get(c).unwrap().take, &longer));
        assert_eq!(store.get(c).unwrap().source.frames(), 80);
        assert_eq!(store.selected(), Some(c));
        assert_eq!(store.to_state().takes[2].source.frames(), 50);
        assert!(store
            .replace_take(TakeId(u64::MAX), longer, source(1, 2))
            .is_err());
        // Removing a growing take forgets it.
        store.remove(c).unwrap();
        assert!(!store.is_growing(c));
    }

    fn player_status(store: &TakeStore) -> Arc<crate::playback::PlayerStatus> {
        store.player.as_ref().unwrap().status().clone()
    }

    #[test]
    fn store_state_restore_keeps_selection_and_reports_bad_takes() {
        let mut store = TakeStore::new();
        let a = store.insert(entry(100));
        let _b = store.insert(entry(200));
        store.select(Some(a), None).unwrap();
        let state = store.to_state();
        assert_eq!(state.selected, Some(0));
        let json = encode_state(&state).unwrap();
        let decoded = decode_state(&json).unwrap();
        let mut restored = TakeStore::new();
        let errors = restored.restore(decoded, |id, saved| {
            if saved.source.frames() == 200 {
                return Err("no");
            }
            Take::complete(
                id,
                48_000.0,
                saved.anchor.map(|x| x.beats),
                &saved.source.channels,
            )
            .map_err(|_| "bad")
        });
        assert_eq!(errors, vec!["no"]);
        assert_eq!(restored.entries().len(), 1);
        assert_eq!(restored.selected(), Some(restored.entries()[0].id));
        assert_eq!(restored.entries()[0].source.frames(), 100);
    }
}
