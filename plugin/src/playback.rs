//! Playback: the player the audio thread runs every block, and its command queue.
//!
//! Ownership and threads:
//! - [`player_pair`] is called in `activate()` (non-realtime): it allocates the command queue
//!   (an `rtrb` SPSC ring) and returns the [`Player`], owned by the audio thread, and the
//!   [`PlayerHandle`], owned by the non-realtime [`crate::takes::TakeStore`].
//! - Everything on [`Player`] runs on the audio thread and never allocates, locks, logs or makes
//!   a system call: [`Player::note_on`] / [`Player::note_off`] queue the block's MIDI notes into
//!   a fixed array, [`Player::process`] drains the command queue and adds the selected take to
//!   the output. Takes arrive as `Arc<Take>` clones through the queue; the store keeps its own
//!   clone of each, so the player's drops never free memory (see [`crate::takes`]).
//! - [`PlayerStatus`] (an `Arc` of atomics) tells the editor what plays where, and counts
//!   underruns of growing takes.
//!
//! Modes ([`PlaybackMode`]):
//! - Timeline: a take anchored at a bar line (in beats) sounds whenever the playing transport is
//!   over its span. Each block, the take frame under the block's first sample is computed from
//!   the host's position, tempo and the sample rate ([`take_frame_at`]); while the transport runs
//!   on continuously, the voice simply advances one frame per sample (no drift, no jitter). A
//!   seek, loop jump or restart into the span fades the old voice out and the new one in; a take
//!   reached by playing onto its anchor starts unfaded on exactly the anchor's first sample.
//! - Next bar: the selected take starts (unfaded, from its first frame) at the first bar line at
//!   or after its arrival (and after an optional earliest beat) and then plays on linearly, like
//!   a launched clip; a transport stop fades it out.
//! - MIDI: a note-on plays the selected take from its first frame, at once or on the next beat;
//!   velocity scales it linearly; the note-off releases it over `release_ms`; a new note cuts the
//!   old one with a short fade. The transport does not matter except for quantising.
//!
//! Every cut (stop, seek, loop, reselection, retrigger) fades over [`FADE_MS`]; a complete take's
//! last [`FADE_MS`] fade out. A growing take (streaming) starts, in every mode, only where it can
//! play through to its end at its measured pace ([`crate::stream::plays_through`]): next-bar mode
//! delays the launch to such a bar line, timeline mode waits silently in place and joins at one,
//! MIDI waits in place and comes in as soon as it can; waiting to start is not an underrun. A
//! growing take whose audio runs out anyway fades out in time (ending on the last written frame),
//! counts an underrun, keeps its place silently and resumes with a fade-in at the first bar line
//! (MIDI: at once) from which it can again play through. A new version of the playing take (same
//! id: an extension) takes over from the old one where the voice is, unheard.

use std::mem;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::stream::plays_through;
use crate::takes::{Take, TakeId};
use crate::transport::{
    block_end_beats, continues_at, take_frame_at, Grid, TransportSnapshot, BEAT_EPSILON,
};

/// Length of every fade (starts mid-take, stops, seeks, cuts, a take's end), in milliseconds.
pub const FADE_MS: f64 = 5.0;

/// Commands the queue holds before [`PlayerHandle::send`] reports it full.
pub const COMMAND_CAPACITY: usize = 64;

/// MIDI notes a block can carry to the player; later ones in the same block are dropped.
pub const MAX_EVENTS: usize = 512;

/// Voices that can fade out at the same time as the main one plays.
const TAILS: usize = 3;

/// How the selected take is played.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlaybackMode {
    /// Anchored on the host timeline at the bar line where its prompt ended.
    #[default]
    Timeline,
    /// Launched at the next bar line after it arrives, then played through.
    NextBar,
    /// Played from its start by MIDI notes.
    Midi,
}

/// When a note-on starts the take in MIDI mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MidiQuantise {
    /// On the note-on's own sample.
    #[default]
    Immediate,
    /// On the first beat at or after the note-on (at once when the transport is stopped).
    NextBeat,
}

/// The player's settings for one block (built from the parameters in `process()`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlayerSettings {
    /// Playback mode.
    pub mode: PlaybackMode,
    /// MIDI note-on quantisation.
    pub quantise: MidiQuantise,
    /// Fade after a MIDI note-off, in milliseconds.
    pub release_ms: f32,
    /// Audio a starved growing take needs ahead of the play position before it resumes, in
    /// milliseconds.
    pub resume_margin_ms: f32,
}

impl Default for PlayerSettings {
    fn default() -> Self {
        Self {
            mode: PlaybackMode::Timeline,
            quantise: MidiQuantise::Immediate,
            release_ms: 30.0,
            resume_margin_ms: 500.0,
        }
    }
}

/// What the non-realtime side tells the player.
pub enum PlayerCommand {
    /// Plays this take from now on (`None`: silence). In next-bar mode it is launched at the
    /// first bar line at or after `not_before_beats` (and after it arrives).
    Select {
        /// The take, or none.
        take: Option<Arc<Take>>,
        /// Earliest launch position in beats (next-bar mode; for growing takes).
        not_before_beats: Option<f64>,
    },
    /// Fades out whatever plays and forgets pending launches and notes.
    Stop,
    /// Plays this take from its first frame now, on its own voice, whatever the mode and the
    /// transport do (the editor's audition); `None` fades the audition out.
    Audition(Option<Arc<Take>>),
}

/// What the player reports, for the editor (playhead) and the generation thread (underruns).
#[derive(Debug, Default)]
pub struct PlayerStatus {
    take: AtomicU64,
    frame: AtomicU64,
    underruns: AtomicU64,
    waiting: AtomicBool,
    rate_mismatch: AtomicBool,
    audition_take: AtomicU64,
    audition_frame: AtomicU64,
}

impl PlayerStatus {
    /// The take the main voice plays, if any.
    pub fn playing_take(&self) -> Option<TakeId> {
        match self.take.load(Ordering::Relaxed) {
            0 => None,
            id => Some(TakeId(id)),
        }
    }

    /// The main voice's next frame in its take.
    pub fn frame(&self) -> u64 {
        self.frame.load(Ordering::Relaxed)
    }

    /// How many times a growing take ran out of audio while playing.
    pub fn underruns(&self) -> u64 {
        self.underruns.load(Ordering::Relaxed)
    }

    /// The main voice waits for a growing take's audio.
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A take at another sample rate than the player's was selected (and ignored): the takes
    /// must be rebuilt for the host rate.
    pub fn rate_mismatch(&self) -> bool {
        self.rate_mismatch.load(Ordering::Relaxed)
    }

    /// The take being auditioned and its next frame, if any.
    pub fn auditioning(&self) -> Option<(TakeId, u64)> {
        match self.audition_take.load(Ordering::Relaxed) {
            0 => None,
            id => Some((TakeId(id), self.audition_frame.load(Ordering::Relaxed))),
        }
    }
}

/// The non-realtime end of the player's command queue.
pub struct PlayerHandle {
    producer: rtrb::Producer<PlayerCommand>,
    status: Arc<PlayerStatus>,
}

impl PlayerHandle {
    /// Queues a command; gives it back when the queue is full (the audio thread is not running).
    pub fn send(&mut self, command: PlayerCommand) -> Result<(), PlayerCommand> {
        self.producer.push(command).map_err(|e| match e {
            rtrb::PushError::Full(c) => c,
        })
    }

    /// The player's status.
    pub fn status(&self) -> &Arc<PlayerStatus> {
        &self.status
    }
}

/// Creates the player for `sample_rate` Hz and its command handle. Allocates; call it in
/// `activate()`.
pub fn player_pair(sample_rate: f64) -> (Player, PlayerHandle) {
    let sample_rate = if sample_rate.is_finite() && sample_rate > 0.0 {
        sample_rate
    } else {
        44_100.0
    };
    let (producer, consumer) = rtrb::RingBuffer::new(COMMAND_CAPACITY);
    let status = Arc::new(PlayerStatus::default());
    let player = Player {
        sample_rate,
        fade: ms_to_frames(FADE_MS, sample_rate),
        commands: consumer,
        status: status.clone(),
        selected: None,
        launch_pending: false,
        launch_not_before: None,
        pending_note: None,
        main: Voice::default(),
        tails: Default::default(),
        audition: Default::default(),
        events: [TimedEvent::default(); MAX_EVENTS],
        n_events: 0,
        last_end_beats: None,
        last_mode: PlaybackMode::default(),
    };
    (player, PlayerHandle { producer, status })
}

fn ms_to_frames(ms: f64, sample_rate: f64) -> usize {
    if ms.is_finite() && ms > 0.0 {
        ((ms * 1e-3 * sample_rate).round() as usize).max(1)
    } else {
        1
    }
}

/// Gain after `done` of `len` frames of a linear ramp from `from` to `to` (`to` once done).
#[inline]
pub(crate) fn ramp_gain(from: f32, to: f32, done: u32, len: u32) -> f32 {
    if done >= len {
        to
    } else {
        from + (to - from) * (done as f32 / len as f32)
    }
}

/// A linear gain ramp; `next()` returns the gain of the next frame.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ramp {
    from: f32,
    to: f32,
    len: u32,
    done: u32,
}

impl Default for Ramp {
    fn default() -> Self {
        Ramp::constant(1.0)
    }
}

impl Ramp {
    fn constant(gain: f32) -> Ramp {
        Ramp {
            from: gain,
            to: gain,
            len: 0,
            done: 0,
        }
    }

    fn towards(from: f32, to: f32, len: usize) -> Ramp {
        Ramp {
            from,
            to,
            len: len.clamp(1, u32::MAX as usize) as u32,
            done: 0,
        }
    }

    #[inline]
    fn value(&self) -> f32 {
        ramp_gain(self.from, self.to, self.done, self.len)
    }

    #[inline]
    fn next(&mut self) -> f32 {
        if self.done < self.len {
            self.done += 1;
        }
        self.value()
    }

    fn finished(&self) -> bool {
        self.done >= self.len
    }

    /// Frames until silence when ramping to zero; `usize::MAX` otherwise.
    fn frames_to_silence(&self) -> usize {
        if self.to == 0.0 {
            (self.len - self.done.min(self.len)) as usize
        } else {
            usize::MAX
        }
    }
}

/// What a voice does when its gain ramp reaches zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Ending {
    /// Nothing planned.
    #[default]
    None,
    /// Stop and let go of the take.
    Release,
    /// The take ran out of audio: wait, silent, for more.
    Starve,
}

/// One reading position in one take.
#[derive(Debug, Default)]
struct Voice {
    take: Option<Arc<Take>>,
    /// Next take frame to play.
    pos: usize,
    gain: Ramp,
    /// Linear gain from the note's velocity (1 outside MIDI mode).
    velocity: f32,
    /// The MIDI note that started it.
    note: Option<u8>,
    ending: Ending,
    /// Waiting for audio: silent, `pos` keeps advancing with time.
    starved: bool,
}

impl Voice {
    fn start(take: Arc<Take>, pos: usize, fade_in: Option<usize>, velocity: f32) -> Voice {
        Voice {
            take: Some(take),
            pos,
            gain: match fade_in {
                Some(frames) => Ramp::towards(0.0, 1.0, frames),
                None => Ramp::constant(1.0),
            },
            velocity,
            note: None,
            ending: Ending::None,
            starved: false,
        }
    }

    fn active(&self) -> bool {
        self.take.is_some()
    }

    /// Fades out over `frames` (or sooner if already fading out faster) and then stops.
    fn release(&mut self, frames: usize) {
        if self.starved {
            *self = Voice::default();
            return;
        }
        if self.gain.frames_to_silence() > frames {
            self.gain = Ramp::towards(self.gain.value(), 0.0, frames);
        }
        self.ending = Ending::Release;
    }

    /// Leaves the starved state with a fade-in.
    fn resume(&mut self, fade: usize) {
        self.starved = false;
        self.ending = Ending::None;
        self.gain = Ramp::towards(0.0, 1.0, fade);
    }

    /// Adds frames `a..b` of the voice to `out`. Returns true when a growing take ran out of
    /// audio here (an underrun).
    fn render<O: AsMut<[f32]>>(&mut self, out: &mut [O], a: usize, b: usize, fade: usize) -> bool {
        let Some(take) = self.take.take() else {
            return false;
        };
        let (valid, complete) = take.available();
        let mut underrun = false;
        let mut finished = false;
        let mut i = a;
        while i < b {
            if self.starved {
                self.pos += b - i;
                // A take that completed short of the waiting position has nothing more.
                finished = complete && self.pos >= valid;
                break;
            }
            let t = self.pos;
            if t >= valid {
                if complete {
                    finished = true;
                    break;
                }
                // Ran dry without warning (cannot happen with a fade shorter than the data
                // published so far, but stay silent rather than read unwritten frames).
                self.starved = true;
                self.ending = Ending::None;
                underrun = true;
                continue;
            }
            let left = valid - t;
            if !complete && left <= fade && self.gain.frames_to_silence() > left {
                if self.ending == Ending::None {
                    self.ending = Ending::Starve;
                    underrun = true;
                }
                self.gain = Ramp::towards(self.gain.value(), 0.0, left);
            }
            let tail = if complete && left < fade {
                left as f32 / fade as f32
            } else {
                1.0
            };
            let g = self.gain.next() * self.velocity * tail;
            for (c, o) in out.iter_mut().enumerate() {
                o.as_mut()[i] += take.sample(c, t) * g;
            }
            self.pos += 1;
            i += 1;
            if self.gain.to == 0.0 && self.gain.finished() {
                match self.ending {
                    Ending::Release => {
                        finished = true;
                        break;
                    }
                    Ending::Starve => {
                        self.starved = true;
                        self.ending = Ending::None;
                    }
                    Ending::None => {}
                }
            }
        }
        if finished {
            // Not the last reference: the store holds one (see `crate::takes`).
            drop(take);
            *self = Voice::default();
        } else {
            self.take = Some(take);
        }
        underrun
    }
}

/// True when `take` played from `frame` from now on plays through to its end: a complete take
/// has audio there; a growing one has `margin` frames beyond it and, at its measured pace, keeps
/// ahead of playback (see [`crate::stream::plays_through`]).
fn ready(take: &Take, frame: usize, margin: usize) -> bool {
    let (valid, complete) = take.available();
    plays_through(
        frame,
        valid,
        complete,
        take.pace().as_ref(),
        take.sample_rate(),
        margin,
    )
}

#[derive(Debug, Clone, Copy, Default)]
enum Event {
    #[default]
    None,
    NoteOn {
        note: u8,
        velocity: f32,
    },
    NoteOff {
        note: u8,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct TimedEvent {
    offset: usize,
    event: Event,
}

/// The audio thread's player. See the module comment.
pub struct Player {
    sample_rate: f64,
    /// [`FADE_MS`] in frames.
    fade: usize,
    commands: rtrb::Consumer<PlayerCommand>,
    status: Arc<PlayerStatus>,
    /// The take the modes play.
    selected: Option<Arc<Take>>,
    /// Next-bar mode: `selected` waits for its bar line.
    launch_pending: bool,
    launch_not_before: Option<f64>,
    /// MIDI mode: a quantised note waiting for its beat `(note, velocity)`.
    pending_note: Option<(u8, f32)>,
    main: Voice,
    tails: [Voice; TAILS],
    /// The editor's audition, independent of the modes, and the one it replaced (fading out).
    audition: [Voice; 2],
    events: [TimedEvent; MAX_EVENTS],
    n_events: usize,
    /// Where the previous block ended, in beats, when it played with a musical position.
    last_end_beats: Option<f64>,
    last_mode: PlaybackMode,
}

impl Player {
    /// Sample rate in Hz.
    pub fn sample_rate(&self) -> f64 {
        self.sample_rate
    }

    /// Length of the fades, in frames.
    pub fn fade_frames(&self) -> usize {
        self.fade
    }

    /// Queues a note-on at `offset` samples into the next [`Player::process`] block, with
    /// `velocity` in `0..=1` (0 means note-off). Events must be queued in offset order.
    pub fn note_on(&mut self, offset: usize, note: u8, velocity: f32) {
        let velocity = if velocity.is_finite() {
            velocity.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.push_event(offset, Event::NoteOn { note, velocity });
    }

    /// Queues a note-off at `offset` samples into the next block.
    pub fn note_off(&mut self, offset: usize, note: u8) {
        self.push_event(offset, Event::NoteOff { note });
    }

    fn push_event(&mut self, offset: usize, event: Event) {
        if self.n_events < MAX_EVENTS {
            self.events[self.n_events] = TimedEvent { offset, event };
            self.n_events += 1;
        }
    }

    /// Forgets every voice, pending launch and note (host `reset()`).
    pub fn reset(&mut self) {
        self.main = Voice::default();
        for t in self.tails.iter_mut().chain(&mut self.audition) {
            *t = Voice::default();
        }
        self.launch_pending = false;
        self.pending_note = None;
        self.n_events = 0;
        self.last_end_beats = None;
        self.publish_status();
    }

    /// Adds this block's playback to `out` (every channel the same length), given the host's
    /// transport at the block's first sample. Realtime-safe.
    pub fn process<O: AsMut<[f32]>>(
        &mut self,
        out: &mut [O],
        transport: &TransportSnapshot,
        settings: &PlayerSettings,
    ) {
        let n = out.iter_mut().map(|o| o.as_mut().len()).min().unwrap_or(0);
        if settings.mode != self.last_mode {
            self.cut_main();
            self.launch_pending = settings.mode == PlaybackMode::NextBar && self.selected.is_some();
            self.launch_not_before = None;
            self.pending_note = None;
            self.last_mode = settings.mode;
        }
        self.drain_commands(settings.mode);
        let grid = transport
            .grid(self.sample_rate)
            .filter(|g| transport.playing && g.pos_beats.is_finite() && g.origin_beats.is_finite());
        if n > 0 {
            let continuous = match (self.last_end_beats, grid) {
                (Some(end), Some(g)) => continues_at(end, g.pos_beats, g.samples_per_beat),
                _ => false,
            };
            match settings.mode {
                PlaybackMode::Timeline => self.timeline(out, n, grid, continuous, settings),
                PlaybackMode::NextBar => self.next_bar(out, n, transport.playing, grid, settings),
                PlaybackMode::Midi => self.midi(out, n, grid, settings),
            }
            for voice in &mut self.audition {
                voice.render(out, 0, n, self.fade);
            }
        }
        self.last_end_beats = grid.map(|g| block_end_beats(g.pos_beats, n, g.samples_per_beat));
        self.n_events = 0;
        self.publish_status();
    }

    fn publish_status(&self) {
        let s = &*self.status;
        let id = self.main.take.as_ref().map_or(0, |t| t.id().0);
        s.take.store(id, Ordering::Relaxed);
        s.frame.store(self.main.pos as u64, Ordering::Relaxed);
        s.waiting.store(self.main.starved, Ordering::Relaxed);
        let audition = &self.audition[0];
        let id = audition.take.as_ref().map_or(0, |t| t.id().0);
        s.audition_take.store(id, Ordering::Relaxed);
        s.audition_frame
            .store(audition.pos as u64, Ordering::Relaxed);
    }

    fn drain_commands(&mut self, mode: PlaybackMode) {
        while let Ok(command) = self.commands.pop() {
            match command {
                PlayerCommand::Select {
                    take,
                    not_before_beats,
                } => {
                    let rate = self.sample_rate;
                    let take = take.filter(|t| {
                        let ok = t.sample_rate() == rate;
                        self.status.rate_mismatch.store(!ok, Ordering::Relaxed);
                        ok
                    });
                    if let Some(new) = take.as_ref().filter(|t| self.extends_main(t)) {
                        // A new version of the take the main voice plays (an extension: the
                        // same audio followed by more): it goes on in it where it is.
                        self.main.take = Some(new.clone());
                        // The old version is dropped here: not the last reference.
                        self.selected = take;
                        continue;
                    }
                    let same = match (&take, &self.selected) {
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        (None, None) => true,
                        _ => false,
                    };
                    // The previous selection is dropped here: not the last reference.
                    self.selected = take;
                    match mode {
                        // Re-selecting the playing take (the store re-sends its selection
                        // after `attach`) does not restart it.
                        PlaybackMode::Timeline if same => {}
                        PlaybackMode::Timeline => self.cut_main(),
                        PlaybackMode::NextBar => {
                            self.launch_pending = self.selected.is_some();
                            self.launch_not_before = not_before_beats;
                            if self.selected.is_none() {
                                self.cut_main();
                            }
                        }
                        // A sounding note rings on; the next note plays the new take.
                        PlaybackMode::Midi => {}
                    }
                }
                PlayerCommand::Stop => {
                    self.cut_main();
                    self.launch_pending = false;
                    self.pending_note = None;
                }
                PlayerCommand::Audition(take) => {
                    // The fading voice it replaces is dropped here: not the last reference.
                    let mut old = mem::take(&mut self.audition[0]);
                    old.release(self.fade);
                    self.audition[1] = old;
                    let rate = self.sample_rate;
                    if let Some(take) = take.filter(|t| t.sample_rate() == rate) {
                        self.audition[0] = Voice::start(take, 0, None, 1.0);
                    }
                }
            }
        }
    }

    /// Whether `take` is another version of the main voice's take (same id) that has audio where
    /// the voice is (or the voice waits anyway), so the voice can move over to it unheard.
    fn extends_main(&self, take: &Arc<Take>) -> bool {
        let Some(old) = &self.main.take else {
            return false;
        };
        if Arc::ptr_eq(old, take) || old.id() != take.id() {
            return false;
        }
        let (valid, complete) = take.available();
        let pos = self.main.pos;
        self.main.starved || (complete && pos < valid) || valid >= pos + self.fade
    }

    /// Moves the main voice to a tail slot, fading out.
    fn cut_main(&mut self) {
        if !self.main.active() {
            return;
        }
        let mut voice = mem::take(&mut self.main);
        voice.release(self.fade);
        if !voice.active() {
            return;
        }
        // A free slot, else the quietest one is cut short.
        let slot = self
            .tails
            .iter()
            .position(|t| !t.active())
            .unwrap_or_else(|| {
                let mut quietest = 0;
                for (i, t) in self.tails.iter().enumerate() {
                    if t.gain.value() < self.tails[quietest].gain.value() {
                        quietest = i;
                    }
                }
                quietest
            });
        self.tails[slot] = voice;
    }

    fn render<O: AsMut<[f32]>>(&mut self, out: &mut [O], a: usize, b: usize) {
        if a >= b {
            return;
        }
        let mut underrun = self.main.render(out, a, b, self.fade);
        for t in &mut self.tails {
            underrun |= t.render(out, a, b, self.fade);
        }
        if underrun {
            self.status.underruns.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the main voice on `take` at `frame`, waiting (starved) when a growing take has
    /// not enough audio there yet.
    fn start_main(
        &mut self,
        take: Arc<Take>,
        frame: usize,
        fade_in: bool,
        velocity: f32,
        margin: usize,
    ) {
        let ready = ready(&take, frame, margin);
        let fade = fade_in.then_some(self.fade);
        self.main = Voice::start(take, frame, fade, velocity);
        if !ready {
            // Waiting for a growing take to start is not an underrun: nothing was cut.
            self.main.starved = true;
        }
    }

    /// If the main voice is starved and a bar line in `0..n` finds enough audio, renders up to
    /// it, resumes there and returns the offset.
    fn resume_at_bar<O: AsMut<[f32]>>(
        &mut self,
        out: &mut [O],
        n: usize,
        g: &Grid,
        margin: usize,
    ) -> bool {
        if !(self.main.active() && self.main.starved) {
            return false;
        }
        let Some(hit) = g.bar_line_in_block(n) else {
            return false;
        };
        let ok = self
            .main
            .take
            .as_ref()
            .is_some_and(|t| ready(t, self.main.pos + hit.offset, margin));
        if !ok {
            return false;
        }
        self.render(out, 0, hit.offset);
        self.main.resume(self.fade);
        self.render(out, hit.offset, n);
        true
    }

    fn margin_frames(&self, settings: &PlayerSettings) -> usize {
        ms_to_frames(f64::from(settings.resume_margin_ms), self.sample_rate)
    }

    fn timeline<O: AsMut<[f32]>>(
        &mut self,
        out: &mut [O],
        n: usize,
        grid: Option<Grid>,
        continuous: bool,
        settings: &PlayerSettings,
    ) {
        let target = grid.zip(
            self.selected
                .as_ref()
                .and_then(|t| t.anchor_beats().map(|a| (t.clone(), a))),
        );
        let Some((g, (take, anchor))) = target else {
            // Stopped, no musical position, no take or a take without an anchor.
            self.cut_main();
            self.render(out, 0, n);
            return;
        };
        let margin = self.margin_frames(settings);
        if self.main.active() && continuous {
            if !self.resume_at_bar(out, n, &g, margin) {
                self.render(out, 0, n);
            }
            return;
        }
        // Not playing yet, or the transport jumped: place the take from the host position.
        self.cut_main();
        let t0 = take_frame_at(g.pos_beats, anchor, g.samples_per_beat);
        let (valid, complete) = take.available();
        if t0 >= 0 {
            let t = t0 as usize;
            if !(complete && t >= valid) {
                self.start_main(take, t, t > 0, 1.0, margin);
            }
            self.render(out, 0, n);
        } else if t0.unsigned_abs() < n as u64 {
            let o = t0.unsigned_abs() as usize;
            self.render(out, 0, o);
            self.start_main(take, 0, false, 1.0, margin);
            self.render(out, o, n);
        } else {
            self.render(out, 0, n);
        }
    }

    /// The first bar line in `0..n` at or after the launch's earliest beat.
    fn launch_offset(&self, g: &Grid, n: usize) -> Option<usize> {
        let mut cursor = 0;
        while cursor < n {
            let hit = g.advanced(cursor).bar_line_in_block(n - cursor)?;
            let offset = cursor + hit.offset;
            if self
                .launch_not_before
                .is_none_or(|nb| hit.beats >= nb - BEAT_EPSILON)
            {
                return Some(offset);
            }
            cursor = offset + 1;
        }
        None
    }

    fn next_bar<O: AsMut<[f32]>>(
        &mut self,
        out: &mut [O],
        n: usize,
        playing: bool,
        grid: Option<Grid>,
        settings: &PlayerSettings,
    ) {
        if !playing {
            self.cut_main();
            self.render(out, 0, n);
            return;
        }
        let margin = self.margin_frames(settings);
        if self.launch_pending {
            match self.selected.clone() {
                Some(take) => {
                    let offset = match &grid {
                        // A growing take launches at the first bar line from which it plays
                        // through (it is checked at the bar line in this block: the judgment
                        // only changes between blocks).
                        Some(g) => self.launch_offset(g, n).filter(|_| ready(&take, 0, margin)),
                        // No musical position: no bar lines to wait for.
                        None => self.launch_not_before.is_none().then_some(0),
                    };
                    if let Some(o) = offset {
                        self.render(out, 0, o);
                        self.cut_main();
                        self.launch_pending = false;
                        self.start_main(take, 0, false, 1.0, margin);
                        self.render(out, o, n);
                        return;
                    }
                }
                None => self.launch_pending = false,
            }
        }
        let resumed = match &grid {
            Some(g) => self.resume_at_bar(out, n, g, margin),
            None => false,
        };
        if !resumed {
            self.render(out, 0, n);
        }
    }

    fn start_note(&mut self, note: u8, velocity: f32, margin: usize) {
        let Some(take) = self.selected.clone() else {
            return;
        };
        self.cut_main();
        self.start_main(take, 0, false, velocity, margin);
        self.main.note = Some(note);
    }

    fn midi<O: AsMut<[f32]>>(
        &mut self,
        out: &mut [O],
        n: usize,
        grid: Option<Grid>,
        settings: &PlayerSettings,
    ) {
        let margin = self.margin_frames(settings);
        let release = ms_to_frames(f64::from(settings.release_ms), self.sample_rate);
        let mut cursor = 0;
        for k in 0..self.n_events {
            let e = self.events[k];
            let o = e.offset.clamp(cursor, n - 1);
            self.midi_span(out, cursor, o, grid.as_ref(), margin);
            cursor = o;
            match e.event {
                Event::NoteOn { note, velocity } if velocity > 0.0 => {
                    if settings.quantise == MidiQuantise::NextBeat && grid.is_some() {
                        self.pending_note = Some((note, velocity));
                    } else {
                        self.start_note(note, velocity, margin);
                    }
                }
                Event::NoteOn { note, .. } | Event::NoteOff { note } => {
                    if self.pending_note.is_some_and(|p| p.0 == note) {
                        self.pending_note = None;
                    }
                    if self.main.active() && self.main.note == Some(note) {
                        self.main.release(release);
                    }
                }
                Event::None => {}
            }
        }
        self.midi_span(out, cursor, n, grid.as_ref(), margin);
    }

    /// Renders `a..b` in MIDI mode, starting a quantised note on its beat.
    fn midi_span<O: AsMut<[f32]>>(
        &mut self,
        out: &mut [O],
        a: usize,
        b: usize,
        grid: Option<&Grid>,
        margin: usize,
    ) {
        if a >= b {
            return;
        }
        if let Some((note, velocity)) = self.pending_note {
            match grid {
                Some(g) => {
                    if let Some(hit) = g.advanced(a).beat_in_block(b - a) {
                        let o = a + hit.offset;
                        self.render(out, a, o);
                        self.pending_note = None;
                        self.start_note(note, velocity, margin);
                        self.render(out, o, b);
                        return;
                    }
                }
                // The transport stopped while the note waited: no beat will come.
                None => {
                    self.pending_note = None;
                    self.start_note(note, velocity, margin);
                }
            }
        }
        if self.main.active()
            && self.main.starved
            && self
                .main
                .take
                .as_ref()
                .is_some_and(|t| ready(t, self.main.pos, margin))
        {
            self.main.resume(self.fade);
        }
        self.render(out, a, b);
    }
}

#[cfg(test)]
// Sample-by-sample comparisons read best with explicit frame indices.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use crate::transport::{
        bar_line_at_or_before, first_sample_at_or_after, samples_per_beat, TimeSig,
    };
    use nice_assert_no_alloc::assert_no_alloc;

    /// Take audio: every frame non-zero and different from its neighbours, exactly
    /// representable.
    fn take_audio(frames: usize) -> Vec<Vec<f32>> {
        let ch0: Vec<f32> = (0..frames)
            .map(|k| ((k % 4093) as f32 + 1.0) / 8192.0)
            .collect();
        let ch1 = ch0.iter().map(|x| -x).collect();
        vec![ch0, ch1]
    }

    /// The gain the player applies to a complete take's frame with `left` frames to its end.
    fn tail(left: usize, fade: usize) -> f32 {
        if left < fade {
            left as f32 / fade as f32
        } else {
            1.0
        }
    }

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
        Blocks::Random(0x2545_f491),
    ];

    /// A host driving the player block by block: timeline position in samples, transport
    /// state, an optional loop, MIDI notes at output frames. Every `process` call runs under
    /// `assert_no_alloc`.
    struct Sim {
        sr: f64,
        tempo: f64,
        timeline: i64,
        playing: bool,
        loop_range: Option<(i64, i64)>,
        /// The host splits blocks at the loop end (else the jump shows in the next block).
        split_loops: bool,
        blocks: Blocks,
        /// `(output frame, velocity or None for a note-off, note)`.
        notes: Vec<(usize, Option<f32>, u8)>,
        /// Captures `input(frame)` before the player runs, as `process()` will.
        capture: Option<crate::capture::CaptureWriter>,
        out: [Vec<f32>; 2],
        buf: [Vec<f32>; 2],
    }

    impl Sim {
        fn new(sr: f64, tempo: f64, blocks: Blocks) -> Sim {
            Sim {
                sr,
                tempo,
                timeline: 0,
                playing: true,
                loop_range: None,
                split_loops: true,
                blocks,
                notes: Vec::new(),
                capture: None,
                out: [Vec::new(), Vec::new()],
                buf: [vec![0.0; 4096], vec![0.0; 4096]],
            }
        }

        fn spb(&self) -> f64 {
            samples_per_beat(self.tempo, self.sr)
        }

        /// Timeline sample of the first sample at or after `beats`.
        fn at(&self, beats: f64) -> i64 {
            first_sample_at_or_after(beats * self.spb())
        }

        fn frame(&self) -> usize {
            self.out[0].len()
        }

        fn snapshot(&self) -> TransportSnapshot {
            let pos = self.timeline as f64 / self.spb();
            let bar_start = bar_line_at_or_before(pos, 4.0, 0.0);
            TransportSnapshot {
                playing: self.playing,
                tempo_bpm: Some(self.tempo),
                time_sig: Some(TimeSig::COMMON),
                pos_beats: Some(pos),
                pos_samples: Some(self.timeline),
                bar_start_beats: Some(bar_start),
                bar_number: Some((bar_start / 4.0).round() as i64),
                loop_beats: None,
            }
        }

        fn run(&mut self, player: &mut Player, settings: &PlayerSettings, frames: usize) {
            let end = self.frame() + frames;
            while self.frame() < end {
                let mut len = self.blocks.next().min(end - self.frame()).min(4096);
                if let (true, true, Some((_, loop_end))) =
                    (self.playing, self.split_loops, self.loop_range)
                {
                    if self.timeline < loop_end {
                        len = len.min((loop_end - self.timeline) as usize);
                    }
                }
                let start = self.frame();
                let snap = self.snapshot();
                let notes = &self.notes;
                let [b0, b1] = &mut self.buf;
                for i in 0..len {
                    b0[i] = input(start + i);
                    b1[i] = -input(start + i);
                }
                if let Some(writer) = &mut self.capture {
                    let chans = [&b0[..len], &b1[..len]];
                    assert_no_alloc(|| writer.write_block(&chans, len, &snap));
                }
                // The player adds to the output; this host starts from silence (no monitoring).
                b0[..len].fill(0.0);
                b1[..len].fill(0.0);
                let mut chans: [&mut [f32]; 2] = [&mut b0[..len], &mut b1[..len]];
                assert_no_alloc(|| {
                    for &(f, velocity, note) in notes {
                        if f >= start && f < start + len {
                            match velocity {
                                Some(v) => player.note_on(f - start, note, v),
                                None => player.note_off(f - start, note),
                            }
                        }
                    }
                    player.process(&mut chans, &snap, settings);
                });
                for c in 0..2 {
                    self.out[c].extend_from_slice(&self.buf[c][..len]);
                }
                if self.playing {
                    self.timeline += len as i64;
                    if let Some((loop_start, loop_end)) = self.loop_range {
                        if self.timeline >= loop_end {
                            self.timeline = loop_start + (self.timeline - loop_end);
                        }
                    }
                }
            }
        }
    }

    /// What the host plays into the plugin at output frame `frame` (channel 1 is its negative).
    fn input(frame: usize) -> f32 {
        ((frame % 10_007) as f32 + 1.0) / 16_384.0
    }

    fn select(handle: &mut PlayerHandle, take: &Arc<Take>, not_before: Option<f64>) {
        assert!(handle
            .send(PlayerCommand::Select {
                take: Some(take.clone()),
                not_before_beats: not_before,
            })
            .is_ok());
    }

    fn timeline() -> PlayerSettings {
        PlayerSettings::default()
    }

    #[test]
    fn timeline_take_starts_on_the_first_sample_of_its_bar() {
        for &sr in &[44_100.0, 48_000.0] {
            for &tempo in &[120.0, 97.0] {
                for blocks in BLOCKS {
                    let (mut player, mut handle) = player_pair(sr);
                    let fade = player.fade_frames();
                    let mut sim = Sim::new(sr, tempo, blocks);
                    let len = sim.at(4.0) as usize;
                    let audio = take_audio(len);
                    let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &audio).unwrap();
                    select(&mut handle, &take, None);
                    sim.timeline = (13.3 * sim.spb()) as i64;
                    let first = (sim.at(16.0) - sim.timeline) as usize;
                    sim.run(&mut player, &timeline(), first + len + 1000);
                    for c in 0..2 {
                        let out = &sim.out[c];
                        assert!(
                            out[..first].iter().all(|&x| x == 0.0),
                            "sr {sr} tempo {tempo}"
                        );
                        for j in 0..len {
                            let expected = audio[c][j] * tail(len - j, fade);
                            assert_eq!(out[first + j], expected, "sr {sr} tempo {tempo} frame {j}");
                        }
                        assert!(out[first + len..].iter().all(|&x| x == 0.0));
                    }
                }
            }
        }
    }

    #[test]
    fn seeking_into_the_take_plays_from_that_offset() {
        for &sr in &[44_100.0, 48_000.0] {
            for &tempo in &[120.0, 97.0] {
                for blocks in BLOCKS {
                    let (mut player, mut handle) = player_pair(sr);
                    let fade = player.fade_frames();
                    let mut sim = Sim::new(sr, tempo, blocks);
                    let len = sim.at(8.0) as usize;
                    let audio = take_audio(len);
                    let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &audio).unwrap();
                    select(&mut handle, &take, None);
                    sim.timeline = sim.at(8.0);
                    sim.run(&mut player, &timeline(), 3000);
                    // Jump to 12345 samples into the take (while playing).
                    let offset = 12_345;
                    sim.timeline = sim.at(16.0) + offset as i64;
                    let s = sim.frame();
                    sim.run(&mut player, &timeline(), fade + 5000);
                    assert!(sim.out[0][..s].iter().all(|&x| x == 0.0));
                    for c in 0..2 {
                        for j in 0..fade + 5000 {
                            let g = if j < fade {
                                ramp_gain(0.0, 1.0, j as u32 + 1, fade as u32)
                            } else {
                                1.0
                            };
                            assert_eq!(sim.out[c][s + j], audio[c][offset + j] * g, "frame {j}");
                        }
                    }
                    // Stopping, seeking further while stopped and starting again.
                    sim.playing = false;
                    sim.run(&mut player, &timeline(), fade + 100);
                    sim.timeline = sim.at(16.0) + 50_000;
                    sim.playing = true;
                    let s = sim.frame();
                    sim.run(&mut player, &timeline(), fade + 100);
                    for j in fade..fade + 100 {
                        assert_eq!(sim.out[0][s + j], audio[0][50_000 + j]);
                    }
                }
            }
        }
    }

    #[test]
    fn a_loop_over_the_take_replays_it() {
        for &(sr, tempo) in &[(44_100.0, 120.0), (48_000.0, 97.0)] {
            for blocks in [Blocks::Fixed(1), Blocks::Fixed(512), Blocks::Random(99)] {
                let (mut player, mut handle) = player_pair(sr);
                let fade = player.fade_frames();
                let mut sim = Sim::new(sr, tempo, blocks);
                let len = sim.at(8.0) as usize;
                let audio = take_audio(len);
                let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &audio).unwrap();
                select(&mut handle, &take, None);
                // Loop over bar 5, the first bar of the take.
                let (loop_start, loop_end) = (sim.at(16.0), sim.at(20.0));
                let bar = (loop_end - loop_start) as usize;
                sim.loop_range = Some((loop_start, loop_end));
                sim.timeline = sim.at(14.0);
                let first = (loop_start - sim.timeline) as usize;
                sim.run(&mut player, &timeline(), first + 3 * bar);
                for c in 0..2 {
                    let out = &sim.out[c];
                    for pass in 0..3 {
                        let s = first + pass * bar;
                        for j in 0..bar {
                            let mut expected = audio[c][j];
                            if pass > 0 && j < fade {
                                // The previous pass fades out over the new one.
                                let g = ramp_gain(1.0, 0.0, j as u32 + 1, fade as u32);
                                expected = (0.0 + audio[c][j]) + audio[c][bar + j] * g;
                            }
                            assert_eq!(out[s + j], expected, "pass {pass} frame {j}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_loop_jump_inside_a_block_replays_it_after_the_fade() {
        let sr = 48_000.0;
        let (mut player, mut handle) = player_pair(sr);
        let fade = player.fade_frames();
        let mut sim = Sim::new(sr, 120.0, Blocks::Fixed(500));
        sim.split_loops = false;
        let audio = take_audio(192_000);
        let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &audio).unwrap();
        select(&mut handle, &take, None);
        // Bar 5 starts at 384000; the loop of one bar ends at 480000, inside a block of 500
        // frames that starts at 479500 + 20 (the start position is not a multiple of 500).
        sim.loop_range = Some((384_000, 480_000));
        sim.timeline = 384_000 - 1_980;
        sim.run(&mut player, &timeline(), 1_980 + 96_000 + 20_000);
        let out = &sim.out[0];
        // The block that straddles the loop end plays on (the host said nothing of a loop).
        let straddle = 1_980 + 95_520;
        for j in 0..500 {
            assert_eq!(out[straddle + j], audio[0][95_520 + j]);
        }
        // The next block starts at 384000 + 20: the take from frame 20, faded in, with the old
        // position faded out over it; then exactly the take.
        let s = straddle + 500;
        for j in 0..fade {
            let g_in = ramp_gain(0.0, 1.0, j as u32 + 1, fade as u32);
            let g_out = ramp_gain(1.0, 0.0, j as u32 + 1, fade as u32);
            let expected = (0.0 + audio[0][20 + j] * g_in) + audio[0][96_020 + j] * g_out;
            assert_eq!(out[s + j], expected);
        }
        for j in fade..19_000 {
            assert_eq!(out[s + j], audio[0][20 + j]);
        }
    }

    #[test]
    fn stopping_silences_within_the_fade() {
        for &sr in &[44_100.0, 48_000.0] {
            for blocks in BLOCKS {
                let (mut player, mut handle) = player_pair(sr);
                let fade = player.fade_frames();
                let mut sim = Sim::new(sr, 97.0, blocks);
                let audio = take_audio(sim.at(8.0) as usize);
                let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &audio).unwrap();
                select(&mut handle, &take, None);
                sim.timeline = sim.at(16.0) + 1_000;
                sim.run(&mut player, &timeline(), 10_000);
                assert_eq!(player.status.playing_take(), Some(take.id()));
                sim.playing = false;
                let s = sim.frame();
                sim.run(&mut player, &timeline(), fade + 20_000);
                for j in 0..fade {
                    let g = ramp_gain(1.0, 0.0, j as u32 + 1, fade as u32);
                    assert_eq!(sim.out[0][s + j], audio[0][11_000 + j] * g);
                }
                assert!(sim.out[0][s + fade - 1..].iter().all(|&x| x == 0.0));
                assert!(sim.out[1][s + fade - 1..].iter().all(|&x| x == 0.0));
                assert_eq!(player.status.playing_take(), None);
            }
        }
    }

    #[test]
    fn next_bar_mode_launches_at_the_next_bar_line() {
        let settings = PlayerSettings {
            mode: PlaybackMode::NextBar,
            ..PlayerSettings::default()
        };
        for &(sr, tempo) in &[(44_100.0, 120.0), (48_000.0, 97.0)] {
            for blocks in BLOCKS {
                let (mut player, mut handle) = player_pair(sr);
                let mut sim = Sim::new(sr, tempo, blocks);
                let audio = take_audio(sim.at(4.0) as usize);
                // No anchor: next-bar mode does not need one.
                let take = Take::complete(TakeId::fresh(), sr, None, &audio).unwrap();
                sim.timeline = (5.3 * sim.spb()) as i64;
                sim.run(&mut player, &settings, 700);
                select(&mut handle, &take, None);
                let origin = sim.timeline - sim.frame() as i64;
                // Launches on bar 3 (beat 8); a seek while it plays does not disturb it.
                let start = (sim.at(8.0) - origin) as usize;
                sim.run(&mut player, &settings, start - sim.frame() + 5_000);
                sim.timeline += 100_000;
                sim.run(&mut player, &settings, 5_000);
                let out = &sim.out[0];
                assert!(out[..start].iter().all(|&x| x == 0.0));
                for j in 0..10_000 {
                    assert_eq!(out[start + j], audio[0][j], "frame {j}");
                }
                // Relaunch, not before beat 40: the bar line at beat 40 (bar 11).
                select(&mut handle, &take, Some(40.0));
                sim.timeline = sim.at(30.0);
                let s = sim.frame();
                sim.run(
                    &mut player,
                    &settings,
                    (sim.at(40.0) - sim.at(30.0)) as usize + 1_000,
                );
                let launch = s + (sim.at(40.0) - sim.at(30.0)) as usize;
                // The first launch (one bar long) ended long before: only the new one sounds.
                assert!(sim.out[0][launch - 1_000..launch].iter().all(|&x| x == 0.0));
                for j in 0..1_000 {
                    assert_eq!(sim.out[0][launch + j], audio[0][j]);
                }
                // A stop fades it out.
                sim.playing = false;
                let s = sim.frame();
                let fade = player.fade_frames();
                sim.run(&mut player, &settings, 2 * fade);
                assert!(sim.out[0][s + fade..].iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn midi_notes_play_the_take_with_velocity_and_release() {
        let sr = 48_000.0;
        let settings = PlayerSettings {
            mode: PlaybackMode::Midi,
            ..PlayerSettings::default()
        };
        for blocks in BLOCKS {
            let (mut player, mut handle) = player_pair(sr);
            let fade = player.fade_frames();
            let release = ms_to_frames(f64::from(settings.release_ms), sr);
            let audio = take_audio(50_000);
            let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &audio).unwrap();
            select(&mut handle, &take, None);
            let mut sim = Sim::new(sr, 120.0, blocks);
            // The transport is stopped: MIDI mode plays anyway.
            sim.playing = false;
            sim.notes = vec![
                (1_000, Some(0.5), 60),
                (3_000, None, 61), // another note's release: ignored
                (5_000, None, 60),
                (10_000, Some(1.0), 62),
                (12_000, Some(0.8), 64), // retrigger: cuts the first with a fade
                (20_000, Some(0.0), 64), // velocity 0 = note-off
            ];
            sim.run(&mut player, &settings, 30_000);
            let out = &sim.out[0];
            assert!(out[..1_000].iter().all(|&x| x == 0.0));
            for j in 0..4_000 {
                assert_eq!(out[1_000 + j], audio[0][j] * 0.5);
            }
            for k in 0..release {
                let g = ramp_gain(1.0, 0.0, k as u32 + 1, release as u32) * 0.5;
                assert_eq!(out[5_000 + k], audio[0][4_000 + k] * g);
            }
            assert!(out[5_000 + release..10_000].iter().all(|&x| x == 0.0));
            for j in 0..2_000 {
                assert_eq!(out[10_000 + j], audio[0][j]);
            }
            for j in 0..8_000 {
                let mut expected = audio[0][j] * 0.8;
                if j < fade {
                    let g = ramp_gain(1.0, 0.0, j as u32 + 1, fade as u32);
                    expected = (0.0 + expected) + audio[0][2_000 + j] * g;
                }
                assert_eq!(out[12_000 + j], expected, "frame {j}");
            }
            assert!(out[20_000 + release..].iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn midi_notes_quantised_to_the_next_beat() {
        let settings = PlayerSettings {
            mode: PlaybackMode::Midi,
            quantise: MidiQuantise::NextBeat,
            ..PlayerSettings::default()
        };
        for &(sr, tempo) in &[(48_000.0, 120.0), (44_100.0, 97.0)] {
            for blocks in BLOCKS {
                let (mut player, mut handle) = player_pair(sr);
                let audio = take_audio(30_000);
                let take = Take::complete(TakeId::fresh(), sr, None, &audio).unwrap();
                select(&mut handle, &take, None);
                let mut sim = Sim::new(sr, tempo, blocks);
                // Output frame == timeline sample. A note between beats 1 and 2.
                let beat2 = sim.at(2.0) as usize;
                sim.notes = vec![(sim.at(1.3) as usize, Some(1.0), 60)];
                sim.run(&mut player, &settings, beat2 + 20_000);
                let out = &sim.out[1];
                assert!(out[..beat2].iter().all(|&x| x == 0.0));
                for j in 0..20_000 {
                    assert_eq!(out[beat2 + j], audio[1][j]);
                }
            }
        }
    }

    #[test]
    fn reselecting_crossfades_to_the_other_take() {
        let sr = 44_100.0;
        let (mut player, mut handle) = player_pair(sr);
        let fade = player.fade_frames();
        let mut sim = Sim::new(sr, 120.0, Blocks::Fixed(64));
        let a = take_audio(200_000);
        let b: Vec<Vec<f32>> = a
            .iter()
            .map(|c| c.iter().map(|x| x * 0.5).collect())
            .collect();
        let take_a = Take::complete(TakeId::fresh(), sr, Some(16.0), &a).unwrap();
        let take_b = Take::complete(TakeId::fresh(), sr, Some(16.0), &b).unwrap();
        select(&mut handle, &take_a, None);
        sim.timeline = 352_800; // bar 5 at 120 BPM, 44.1 kHz
        sim.run(&mut player, &timeline(), 6_400);
        select(&mut handle, &take_b, None);
        sim.run(&mut player, &timeline(), 6_400);
        let out = &sim.out[0];
        for j in 0..fade {
            let g_in = ramp_gain(0.0, 1.0, j as u32 + 1, fade as u32);
            let g_out = ramp_gain(1.0, 0.0, j as u32 + 1, fade as u32);
            let t = 6_400 + j;
            assert_eq!(out[t], (0.0 + b[0][t] * g_in) + a[0][t] * g_out);
        }
        for t in 6_400 + fade..12_800 {
            assert_eq!(out[t], b[0][t]);
        }
        assert_eq!(player.status.playing_take(), Some(take_b.id()));
    }

    #[test]
    fn reselecting_the_same_take_does_not_restart_it() {
        let sr = 44_100.0;
        let (mut player, mut handle) = player_pair(sr);
        let mut sim = Sim::new(sr, 120.0, Blocks::Fixed(64));
        let a = take_audio(20_000);
        let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &a).unwrap();
        select(&mut handle, &take, None);
        sim.timeline = 352_800;
        sim.run(&mut player, &timeline(), 6_400);
        select(&mut handle, &take, None);
        sim.run(&mut player, &timeline(), 6_400);
        for t in 0..12_800 {
            assert_eq!(sim.out[0][t], a[0][t]);
        }
    }

    #[test]
    fn a_growing_take_fades_out_where_its_audio_ends_and_resumes_at_a_bar_line() {
        let sr = 44_100.0;
        let (mut player, mut handle) = player_pair(sr);
        let fade = player.fade_frames();
        let bar = 88_200; // 120 BPM
        let audio = take_audio(3 * bar);
        let (take, mut writer) =
            Take::growing(TakeId::fresh(), sr, Some(16.0), 2, 3 * bar).unwrap();
        let part = |from: usize, to: usize| [&audio[0][from..to], &audio[1][from..to]];
        writer.append(&part(0, 30_000)).unwrap();
        select(&mut handle, &take, None);
        let mut sim = Sim::new(sr, 120.0, Blocks::Random(5));
        sim.timeline = 4 * bar as i64 - 5_000;
        sim.run(&mut player, &timeline(), 5_000 + 60_000);
        let out = &sim.out[0][5_000..];
        for j in 0..30_000 - fade {
            assert_eq!(out[j], audio[0][j]);
        }
        for k in 0..fade {
            let j = 30_000 - fade + k;
            let g = ramp_gain(1.0, 0.0, k as u32 + 1, fade as u32);
            assert_eq!(out[j], audio[0][j] * g);
        }
        assert!(out[29_999..60_000].iter().all(|&x| x == 0.0));
        assert_eq!(player.status.underruns(), 1);
        assert!(player.status.waiting());
        // The rest arrives in bar 5: playback resumes on bar 6, faded in.
        writer.append(&part(30_000, 3 * bar)).unwrap();
        writer.finish();
        sim.run(&mut player, &timeline(), bar);
        let out = &sim.out[0][5_000..];
        assert!(out[60_000..bar].iter().all(|&x| x == 0.0));
        for j in 0..fade {
            let g = ramp_gain(0.0, 1.0, j as u32 + 1, fade as u32);
            assert_eq!(out[bar + j], audio[0][bar + j] * g);
        }
        for j in bar + fade..bar + 60_000 {
            assert_eq!(out[j], audio[0][j]);
        }
        assert!(!player.status.waiting());
        assert_eq!(player.status.underruns(), 1);
    }

    /// A simulated generation feeding a growing take as the controller does: chunks of
    /// `chunk` frames arriving at `speed` times real time (after a first one of `first` frames
    /// at `first_at` frames of output), the pace republished with every step of the simulation.
    struct Feed {
        audio: Vec<Vec<f32>>,
        writer: Option<crate::takes::TakeWriter>,
        speed: f64,
        /// Output frames `(from, len)` during which generation stalls (another job, a busy
        /// machine); the pace still claims `speed`.
        stall: (usize, usize),
        first: usize,
        first_at: usize,
        chunk: usize,
        written: usize,
    }

    impl Feed {
        /// Frames generated by output frame `now`.
        fn generated(&self, now: usize) -> f64 {
            if now < self.first_at {
                return 0.0;
            }
            let (from, len) = self.stall;
            let stalled = now.clamp(from, from + len) - from;
            (self.first as f64 + (now - self.first_at - stalled) as f64 * self.speed)
                .min(self.audio[0].len() as f64)
        }

        fn update(&mut self, now: usize) {
            let total = self.audio[0].len();
            let generated = self.generated(now) as usize;
            let Some(writer) = self.writer.as_mut() else {
                return;
            };
            // Whole chunks only (the last one when everything is generated).
            let mut end = self.written;
            while end < total {
                let next = if end == 0 {
                    self.first
                } else {
                    end + self.chunk
                }
                .min(total);
                if next > generated {
                    break;
                }
                end = next;
            }
            if end > self.written {
                let part = [
                    &self.audio[0][self.written..end],
                    &self.audio[1][self.written..end],
                ];
                writer.append(&part).unwrap();
                self.written = end;
            }
            writer.set_pace(&crate::stream::Pace {
                generated: generated as f64,
                final_frames: total as f64,
                frames_per_s: 44_100.0 * self.speed,
                lookahead: 0.0,
                chunk: self.chunk as f64,
                delay_s: 0.0,
            });
            if self.written == total {
                self.writer.take();
            }
        }
    }

    /// The chunk boundary (first chunk `first`, then `chunk` each) at or after `frame`.
    fn feed_chunks_end(first: usize, chunk: usize, frame: usize) -> usize {
        let mut end = first;
        while end < frame {
            end += chunk;
        }
        end
    }

    fn run_fed(
        sim: &mut Sim,
        player: &mut Player,
        settings: &PlayerSettings,
        feed: &mut Feed,
        frames: usize,
    ) {
        let end = sim.frame() + frames;
        while sim.frame() < end {
            feed.update(sim.frame());
            let n = 256.min(end - sim.frame());
            sim.run(player, settings, n);
        }
    }

    /// Next-bar mode: a growing take launches at the first bar line from which it plays
    /// through, from its first frame, and then plays without a gap, at any generation speed.
    #[test]
    fn a_growing_take_launches_where_it_plays_through() {
        let sr = 44_100.0;
        let settings = PlayerSettings {
            mode: PlaybackMode::NextBar,
            ..PlayerSettings::default()
        };
        let bar = 88_200; // 120 BPM, 4/4
        let mut starts = Vec::new();
        for speed in [4.0, 1.5, 0.6] {
            let (mut player, mut handle) = player_pair(sr);
            let mut sim = Sim::new(sr, 120.0, Blocks::Random(9));
            let audio = take_audio(6 * bar);
            let (take, writer) = Take::growing(TakeId::fresh(), sr, None, 2, 6 * bar).unwrap();
            let mut feed = Feed {
                audio: audio.clone(),
                writer: Some(writer),
                speed,
                stall: (0, 0),
                first: 22_050,
                first_at: 20_000,
                chunk: 176_400,
                written: 0,
            };
            // The take is selected when its first chunk arrives.
            run_fed(&mut sim, &mut player, &settings, &mut feed, 20_000);
            feed.update(20_000);
            select(&mut handle, &take, None);
            run_fed(&mut sim, &mut player, &settings, &mut feed, 60 * bar);
            let out = &sim.out[0];
            let start = out.iter().position(|&x| x != 0.0).unwrap();
            assert_eq!(
                start % bar,
                0,
                "speed {speed}: starts at {start}, not on a bar line"
            );
            for j in 0..audio[0].len() {
                assert_eq!(
                    out[start + j],
                    audio[0][j] * tail(audio[0].len() - j, player.fade_frames()),
                    "speed {speed}: frame {j}"
                );
            }
            assert_eq!(player.status.underruns(), 0, "speed {speed}");
            starts.push(start / bar);
        }
        // Four times real time: the first bar line after the second chunk (at 0.45 + 1 s);
        // slower generation waits longer.
        assert_eq!(starts[0], 1);
        assert!(starts[0] < starts[1] && starts[1] < starts[2], "{starts:?}");
    }

    /// Timeline mode: a growing take anchored where its prompt ended joins at the first bar line
    /// from which the timeline position stays covered, fades in there and plays on in place.
    #[test]
    fn a_growing_take_joins_the_timeline_where_it_has_caught_up() {
        let sr = 44_100.0;
        let bar = 88_200;
        let (mut player, mut handle) = player_pair(sr);
        let mut sim = Sim::new(sr, 120.0, Blocks::Fixed(512));
        let audio = take_audio(8 * bar);
        // Anchored at beat 0: the press, at the start of the simulation.
        let (take, writer) = Take::growing(TakeId::fresh(), sr, Some(0.0), 2, 8 * bar).unwrap();
        let mut feed = Feed {
            audio: audio.clone(),
            writer: Some(writer),
            speed: 3.0,
            stall: (0, 0),
            first: 22_050,
            first_at: 30_000,
            chunk: 176_400,
            written: 0,
        };
        run_fed(&mut sim, &mut player, &timeline(), &mut feed, 30_000);
        feed.update(30_000);
        select(&mut handle, &take, None);
        run_fed(&mut sim, &mut player, &timeline(), &mut feed, 9 * bar);
        let out = &sim.out[0];
        let start = out.iter().position(|&x| x != 0.0).unwrap();
        let fade = player.fade_frames();
        assert_eq!(start % bar, 0, "joins at {start}");
        assert!(start > 0);
        for j in start + fade..8 * bar {
            assert_eq!(out[j], audio[0][j] * tail(8 * bar - j, fade), "frame {j}");
        }
        assert_eq!(player.status.underruns(), 0);
    }

    /// Generation falls behind the estimate (it stalls for three bars just after the start): the take fades out where
    /// its audio runs out (an underrun), waits in place and resumes, faded in, on a later bar
    /// line, from where the time since its start says, and plays on to its end.
    #[test]
    fn a_take_that_falls_behind_fades_out_and_resumes_on_a_bar_line() {
        let sr = 44_100.0;
        let bar = 88_200;
        let settings = PlayerSettings {
            mode: PlaybackMode::NextBar,
            ..PlayerSettings::default()
        };
        let (mut player, mut handle) = player_pair(sr);
        let mut sim = Sim::new(sr, 120.0, Blocks::Fixed(300));
        let audio = take_audio(16 * bar);
        let (take, writer) = Take::growing(TakeId::fresh(), sr, None, 2, 16 * bar).unwrap();
        let mut feed = Feed {
            audio: audio.clone(),
            writer: Some(writer),
            speed: 2.0,
            stall: (2 * bar, 3 * bar),
            first: 22_050,
            first_at: 10_000,
            chunk: 176_400,
            written: 0,
        };
        run_fed(&mut sim, &mut player, &settings, &mut feed, 10_000);
        feed.update(10_000);
        select(&mut handle, &take, None);
        run_fed(&mut sim, &mut player, &settings, &mut feed, 30 * bar);
        let out = &sim.out[0];
        let fade = player.fade_frames();
        let start = out.iter().position(|&x| x != 0.0).unwrap();
        assert_eq!(start % bar, 0);
        // The first silence after the start: the last written frame, where the fade-out ends
        // (at gain 0).
        let gap = start + out[start..].iter().position(|&x| x == 0.0).unwrap();
        assert!(gap < start + 16 * bar, "no gap");
        let end = gap + 1;
        for k in 0..fade {
            let j = end - start - fade + k;
            let g = ramp_gain(1.0, 0.0, k as u32 + 1, fade as u32);
            assert_eq!(out[end - fade + k], audio[0][j] * g, "fade-out frame {k}");
        }
        assert_eq!(end - start, feed_chunks_end(22_050, 176_400, end - start));
        // It resumes on a bar line, in place (the take frame the elapsed time says), faded in.
        let resume = gap + out[gap..].iter().position(|&x| x != 0.0).unwrap();
        assert_eq!(resume % bar, 0, "resumes at {resume}");
        let j0 = resume - start;
        for k in 0..fade {
            let g = ramp_gain(0.0, 1.0, k as u32 + 1, fade as u32);
            assert_eq!(out[resume + k], audio[0][j0 + k] * g, "fade-in frame {k}");
        }
        assert!(j0 < 16 * bar, "resumed after the take's end");
        for j in j0 + fade..16 * bar {
            assert_eq!(
                out[start + j],
                audio[0][j] * tail(16 * bar - j, fade),
                "frame {j}"
            );
        }
        assert_eq!(player.status.underruns(), 1);
    }

    /// A new version of the playing take (an extension: same id, same audio, then more) takes
    /// over without a sound: the output is the longer audio throughout.
    #[test]
    fn an_extended_take_plays_on_seamlessly() {
        let sr = 44_100.0;
        let bar = 88_200;
        for mode in [PlaybackMode::Timeline, PlaybackMode::NextBar] {
            let settings = PlayerSettings {
                mode,
                ..PlayerSettings::default()
            };
            let (mut player, mut handle) = player_pair(sr);
            let mut sim = Sim::new(sr, 120.0, Blocks::Random(3));
            let long = take_audio(3 * bar);
            let id = TakeId::fresh();
            let short = [&long[0][..bar], &long[1][..bar]];
            let old = Take::complete(id, sr, Some(4.0), &short).unwrap();
            select(&mut handle, &old, None);
            sim.timeline = sim.at(3.0);
            sim.run(&mut player, &settings, bar / 2);
            let (new, mut writer) = Take::growing(id, sr, Some(4.0), 2, 3 * bar).unwrap();
            writer
                .append(&[&long[0][..2 * bar], &long[1][..2 * bar]])
                .unwrap();
            select(&mut handle, &new, None);
            sim.run(&mut player, &settings, bar);
            writer
                .append(&[&long[0][2 * bar..], &long[1][2 * bar..]])
                .unwrap();
            writer.finish();
            sim.run(&mut player, &settings, 3 * bar);
            let out = &sim.out[0];
            let start = out.iter().position(|&x| x != 0.0).unwrap();
            assert_eq!(start, sim.spb() as usize, "{mode:?}");
            for j in 0..3 * bar {
                assert_eq!(
                    out[start + j],
                    long[0][j] * tail(3 * bar - j, player.fade_frames()),
                    "{mode:?}: frame {j}"
                );
            }
            assert_eq!(player.status.underruns(), 0);
        }
    }

    /// Capture, prompt, take, store and player together, as `process()` and the generation
    /// thread will use them: after a 4-bar phrase the continuation starts on the first sample
    /// of bar 5, and it survives a state round trip.
    #[test]
    fn captured_phrase_to_continuation_on_bar_five() {
        use crate::capture::{capture_pair, PromptRequest};
        use crate::takes::{decode_state, encode_state, SourceAudio, TakeEntry, TakeStore};
        for &(sr, tempo) in &[(44_100.0, 120.0), (48_000.0, 97.0)] {
            for blocks in [Blocks::Fixed(64), Blocks::Fixed(512), Blocks::Random(77)] {
                // activate()
                let (writer, reader) = capture_pair(sr, 60.0);
                let (mut player, handle) = player_pair(sr);
                let mut store = TakeStore::new();
                store.attach(handle).unwrap();
                let mut sim = Sim::new(sr, tempo, blocks);
                sim.capture = Some(writer);
                // The musician plays bars 1-4 and presses "generate" early in bar 5.
                let bar5 = sim.at(16.0) as usize;
                sim.run(&mut player, &timeline(), bar5 + 1_000);
                let press = sim.capture.as_ref().unwrap().frames_written() - 500;
                // The generation thread: the prompt, then (standing in for the model) a
                // continuation that is the prompt's first bar, at the host rate.
                let prompt = reader
                    .prompt(&PromptRequest {
                        at_frame: Some(press),
                        ..PromptRequest::now(4.0, 8.0)
                    })
                    .unwrap();
                assert_eq!(prompt.span.start, 0);
                assert_eq!(prompt.span.end as usize, bar5);
                for (i, &x) in prompt.audio[0].iter().enumerate() {
                    assert_eq!(x, input(i));
                }
                let anchor = prompt.anchor.unwrap();
                let len = sim.at(4.0) as usize;
                let continuation: Vec<Vec<f32>> =
                    prompt.audio.iter().map(|c| c[..len].to_vec()).collect();
                let id = TakeId::fresh();
                let take = Take::complete(id, sr, Some(anchor.beats), &continuation).unwrap();
                store.insert(TakeEntry {
                    id,
                    name: "take 1".to_owned(),
                    info: Default::default(),
                    anchor: None,
                    source: SourceAudio {
                        sample_rate: sr as u32,
                        channels: continuation.clone(),
                    },
                    take,
                });
                store.select(Some(id), None).unwrap();
                // The host goes back to bar 4 and plays on: the take continues bar 4 on bar 5.
                sim.timeline = sim.at(12.0);
                let s = sim.frame();
                sim.run(&mut player, &timeline(), 2 * len);
                let first = s + (bar5 - sim.at(12.0) as usize);
                let fade = player.fade_frames();
                for c in 0..2 {
                    assert!(sim.out[c][s + fade..first].iter().all(|&x| x == 0.0));
                    for j in 0..len {
                        let expected = continuation[c][j] * tail(len - j, fade);
                        assert_eq!(sim.out[c][first + j], expected, "frame {j}");
                    }
                }
                // Saved and loaded (16-bit): a new store plays it again at the same place.
                let json = encode_state(&store.to_state()).unwrap();
                let (mut player, handle) = player_pair(sr);
                let mut loaded = TakeStore::new();
                let errors = loaded.restore(decode_state(&json).unwrap(), |id, saved| {
                    Take::complete(id, sr, Some(anchor.beats), &saved.source.channels)
                });
                assert!(errors.is_empty());
                loaded.attach(handle).unwrap();
                let restored = loaded.entries()[0].take.to_planar();
                sim.timeline = sim.at(15.0);
                let s = sim.frame();
                sim.run(&mut player, &timeline(), 2 * len);
                let first = s + (bar5 - sim.at(15.0) as usize);
                for j in 0..len - fade {
                    assert_eq!(sim.out[0][first + j], restored[0][j]);
                    assert!((restored[0][j] - continuation[0][j]).abs() < 1.0 / 32767.0);
                }
            }
        }
    }

    #[test]
    fn a_take_at_another_rate_is_not_played() {
        let (mut player, mut handle) = player_pair(48_000.0);
        let take = Take::complete(TakeId::fresh(), 44_100.0, Some(0.0), &take_audio(1000)).unwrap();
        select(&mut handle, &take, None);
        let mut sim = Sim::new(48_000.0, 120.0, Blocks::Fixed(256));
        sim.run(&mut player, &timeline(), 2_000);
        assert!(sim.out[0].iter().all(|&x| x == 0.0));
        assert!(player.status.rate_mismatch());
    }

    #[test]
    fn absurd_host_positions_are_survived() {
        let sr = 48_000.0;
        let (mut player, mut handle) = player_pair(sr);
        let take = Take::complete(TakeId::fresh(), sr, Some(16.0), &take_audio(1000)).unwrap();
        select(&mut handle, &take, None);
        let mut out = [vec![0.0f32; 64], vec![0.0f32; 64]];
        for pos in [
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            1e300,
            -1e300,
            f64::MAX,
        ] {
            for tempo in [120.0, 1e-300, 1e300, f64::NAN] {
                let snap = TransportSnapshot {
                    playing: true,
                    tempo_bpm: Some(tempo),
                    pos_beats: Some(pos),
                    bar_start_beats: Some(pos),
                    ..TransportSnapshot::default()
                };
                for mode in [
                    PlaybackMode::Timeline,
                    PlaybackMode::NextBar,
                    PlaybackMode::Midi,
                ] {
                    let settings = PlayerSettings {
                        mode,
                        quantise: MidiQuantise::NextBeat,
                        ..PlayerSettings::default()
                    };
                    player.note_on(3, 60, 1.0);
                    player.process(&mut out, &snap, &settings);
                    assert!(out.iter().flatten().all(|x| x.is_finite()));
                }
            }
        }
    }

    #[test]
    fn a_full_queue_gives_the_command_back() {
        let (_player, mut handle) = player_pair(48_000.0);
        for _ in 0..COMMAND_CAPACITY {
            assert!(handle.send(PlayerCommand::Stop).is_ok());
        }
        assert!(matches!(
            handle.send(PlayerCommand::Stop),
            Err(PlayerCommand::Stop)
        ));
    }

    #[test]
    fn audition_plays_from_the_start_whatever_the_transport() {
        for &sr in &[44_100.0, 48_000.0] {
            for blocks in BLOCKS {
                let (mut player, mut handle) = player_pair(sr);
                let fade = player.fade_frames();
                let mut sim = Sim::new(sr, 120.0, blocks);
                // Stopped, far from the take's anchor, in timeline mode: the selection is silent
                // but the audition sounds from its first frame on the next block's first sample.
                sim.playing = false;
                let audio = take_audio(6_000);
                let take = Take::complete(TakeId::fresh(), sr, Some(64.0), &audio).unwrap();
                select(&mut handle, &take, None);
                sim.run(&mut player, &timeline(), 300);
                assert!(sim.out[0].iter().all(|&x| x == 0.0));
                assert!(handle
                    .send(PlayerCommand::Audition(Some(take.clone())))
                    .is_ok());
                let s = sim.frame();
                sim.run(&mut player, &timeline(), 8_000);
                for j in 0..6_000 {
                    let want = audio[0][j] * tail(6_000 - j, fade);
                    assert_eq!(sim.out[0][s + j], want, "frame {j}");
                    assert_eq!(sim.out[1][s + j], -want, "frame {j}");
                }
                assert!(sim.out[0][s + 6_000..].iter().all(|&x| x == 0.0));
                assert_eq!(player.status.auditioning(), None, "ended with the take");

                // Stopping an audition fades it out.
                assert!(handle
                    .send(PlayerCommand::Audition(Some(take.clone())))
                    .is_ok());
                sim.run(&mut player, &timeline(), 1_000);
                assert_eq!(
                    player.status.auditioning().map(|(id, _)| id),
                    Some(take.id())
                );
                assert!(handle.send(PlayerCommand::Audition(None)).is_ok());
                let s = sim.frame();
                sim.run(&mut player, &timeline(), fade + 100);
                assert_ne!(sim.out[0][s], 0.0);
                assert!(sim.out[0][s + fade..].iter().all(|&x| x == 0.0));
                assert_eq!(player.status.auditioning(), None);
            }
        }
    }
}
