//! The plugin's non-realtime side: what the audio thread shares, and the controller thread that
//! turns generate requests into takes.
//!
//! Ownership and threads:
//! - [`Shared`] is one `Arc` per plugin instance, created with it. Its locks are taken only off
//!   the audio thread; the audio thread touches only its atomics ([`Shared::request`],
//!   [`Shared::busy`]).
//! - [`Controller`] owns one thread, started in `activate()` and stopped and joined in
//!   `deactivate()` or when the plugin is dropped, so no thread of ours outlives the instance.
//!   The thread polls (every [`POLL`]): a pending generate request, a state the host loaded, and
//!   the engine's events. The audio thread never wakes it (that would need a system call).
//! - Generation: the prompt is cut from the capture history as it stood at the press, resampled
//!   to 32 kHz (rubato, through `segue_engine::audio::resample`) and sent to the engine service
//!   ([`Engine::shared`], one inference thread for every instance in the process).
//! - Streaming: the engine sends each take's continuation in chunks. Each chunk is rounded to the
//!   state's 16-bit precision (so a reloaded project sounds the same), resampled to the host rate
//!   by a [`StreamResampler`] carried from chunk to chunk (its output is bit for bit the one-shot
//!   resampling a reloaded take gets) and appended to a growing [`Take`] and to its 32 kHz
//!   source. A new take is inserted into the [`TakeStore`] (and the first one selected) when its
//!   first chunk arrives; the store hands it to the audio thread through the player's lock-free
//!   queue, and the player starts it where it can play through (see [`crate::stream`]): after
//!   every decoder step the take's [`Pace`] is republished. `Finished` flushes the resampler
//!   and completes the take; only then is it saved in the state (a project saved meanwhile holds
//!   what was final). A cancelled or failed generation removes its partial takes: the take list
//!   only holds takes a musician can keep (the part heard so far was a preview).
//! - Extend ([`Command::Extend`]): the take's tail is the prompt; the same take (id, name,
//!   anchor) is replaced by a growing one holding its old audio followed by the continuation, so
//!   it plays on seamlessly from the old end; the state keeps the old audio until the extension
//!   completes, and a cancelled extension puts the old take back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nice_plug::prelude::*;
use parking_lot::Mutex;
use segue_engine::audio::{resample, Audio, StreamResampler};
use segue_engine::service::{
    Client, DTypeChoice, DeviceChoice, Engine, EventKind, GenerateRequest, JobId, ModelSpec, Policy,
};
use segue_engine::stream::StreamConfig;

use crate::capture::{CaptureReader, PromptAnchor, PromptRequest};
use crate::editor::settings;
use crate::export::{export_takes, ExportRequest};
use crate::params::SegueParams;
use crate::playback::PlayerStatus;
use crate::status::{Phase, Status};
use crate::stream::Pace;
use crate::takes::{
    decode_state, encode_state, quantise_to_state, GenerationInfo, SourceAudio, Take, TakeAnchor,
    TakeEntry, TakeId, TakeStore, TakeWriter, TakesState,
};
use crate::transport::{bars_to_seconds, TimeSig};

/// How often the controller thread looks for work.
pub const POLL: Duration = Duration::from_millis(5);

/// Sample rate of MusicGen's audio (prompts are sent, takes arrive and are saved at this rate).
pub const MODEL_RATE: u32 = 32_000;

/// Value of [`Shared::generate_at`] meaning "no request pending".
const NO_REQUEST: u64 = u64::MAX;

/// What the editor (or any non-realtime caller) asks of the controller thread. Sent with
/// [`Shared::send`]; handled in order on the controller thread, which reports failures in
/// [`Shared::status`]. Never sent by the audio thread.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Stop the running generation (its partial takes are dropped).
    Cancel,
    /// Play this take (`None`: none).
    Select(Option<TakeId>),
    /// Give a take a new name.
    Rename(TakeId, String),
    /// Remove a take (stopping it if it plays).
    Delete(TakeId),
    /// Continue a take from its end: its tail is the prompt, the result one longer take.
    Extend(TakeId),
    /// Write takes as WAV files; the outcome lands in [`Status::export`].
    Export(ExportRequest),
    /// Play a take from its start now, whatever the transport does (`None`: stop auditioning).
    Audition(Option<TakeId>),
}

/// What one plugin instance's audio thread, controller thread and editor share.
pub struct Shared {
    /// Every take and the player's command queue.
    pub store: Mutex<TakeStore>,
    /// The reading end of the capture history of the current activation.
    pub capture: Mutex<Option<CaptureReader>>,
    /// The current player's status (playhead, underruns).
    pub player_status: Mutex<Option<Arc<PlayerStatus>>>,
    /// Capture frame where generate was pressed, or `u64::MAX` for none. Written by the audio
    /// thread, taken by the controller.
    generate_at: AtomicU64,
    /// A generation was requested and has not ended (set by the audio thread on a request,
    /// cleared by the controller when the request ends with a take or an error).
    busy: AtomicBool,
    /// [`crate::params::TakesField::loaded`] as of the last time the store was rebuilt from it.
    takes_loaded: AtomicU64,
    /// What the controller is doing, for the editor ([`Status::line`] for the log).
    pub status: Mutex<Status>,
    /// The sending end of the command queue (cloned by whoever sends).
    commands_tx: Sender<Command>,
    /// The receiving end, read by the controller thread of the current activation.
    commands_rx: Receiver<Command>,
}

impl Default for Shared {
    fn default() -> Self {
        let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
        Self {
            store: Mutex::new(TakeStore::new()),
            capture: Mutex::new(None),
            player_status: Mutex::new(None),
            generate_at: AtomicU64::new(NO_REQUEST),
            busy: AtomicBool::new(false),
            takes_loaded: AtomicU64::new(0),
            status: Mutex::new(Status::default()),
            commands_tx,
            commands_rx,
        }
    }
}

impl Shared {
    /// Requests a generation whose prompt ends at the last bar line before capture frame
    /// `frame`. Realtime-safe (two atomic stores). A later request replaces a pending one.
    #[inline]
    pub fn request(&self, frame: u64) {
        self.busy.store(true, Ordering::Release);
        self.generate_at.store(frame, Ordering::Release);
    }

    /// Whether a requested generation has not ended yet. Realtime-safe.
    #[inline]
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire) || self.generate_at.load(Ordering::Acquire) != NO_REQUEST
    }

    /// Queues a command for the controller thread. Not realtime-safe (the queue allocates);
    /// commands sent while the plugin is inactive wait for the next activation.
    pub fn send(&self, command: Command) {
        // Both ends live in `self`, so the queue cannot be disconnected.
        let _ = self.commands_tx.send(command);
    }

    /// Records a notice in plain words (something that went wrong outside a generation).
    fn set_status(&self, text: String) {
        self.status.lock().set_notice(Some(text));
    }

    /// Moves the generation to `phase`.
    fn set_phase(&self, phase: Phase) {
        self.status.lock().set_phase(phase);
    }

    /// The status in one line (for the log).
    pub fn status_line(&self) -> String {
        self.status.lock().line()
    }
}

/// Builds a take's host-rate audio from its saved source (resampling off the audio thread).
pub fn build_take(
    id: TakeId,
    sample_rate: f64,
    anchor: Option<&TakeAnchor>,
    source: &SourceAudio,
) -> Result<Arc<Take>, String> {
    let audio = Audio {
        sample_rate: source.sample_rate,
        channels: source.channels.clone(),
    };
    let rate = sample_rate.round() as u32;
    let resampled = resample(&audio, rate).map_err(|e| e.to_string())?;
    Take::complete(
        id,
        sample_rate,
        anchor.map(|a| a.beats),
        &resampled.channels,
    )
    .map_err(|e| e.to_string())
}

/// Rebuilds the store from the takes state held by the persisted field if the host loaded one
/// since the last call. A corrupt or foreign state gives no takes and a logged warning.
pub fn restore_if_loaded(shared: &Shared, params: &SegueParams, sample_rate: f64) {
    let loaded = params.takes.loaded();
    if shared.takes_loaded.swap(loaded, Ordering::AcqRel) == loaded {
        return;
    }
    let json = params.takes.json();
    let state = if json.trim().is_empty() {
        TakesState::default()
    } else {
        match decode_state(&json) {
            Ok(state) => state,
            Err(e) => {
                nice_warn!("the saved takes cannot be read and are ignored: {e}");
                params.takes.store(String::new());
                TakesState::default()
            }
        }
    };
    let mut store = shared.store.lock();
    let errors = store.restore(state, |id, saved| {
        build_take(id, sample_rate, saved.anchor.as_ref(), &saved.source)
    });
    for e in errors {
        nice_warn!("a saved take could not be restored: {e}");
    }
}

/// Saves the store into the persisted field (after every change of the store).
fn save_store(store: &TakeStore, params: &SegueParams) {
    match encode_state(&store.to_state()) {
        Ok(json) => params.takes.store(json),
        Err(e) => nice_warn!("the takes cannot be saved in the project: {e}"),
    }
}

/// The controller thread of one activation.
pub struct Controller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Controller {
    /// Starts the thread for an activation at `sample_rate` Hz. `None` (and a logged error) if
    /// the system refuses a thread: the plugin then plays and records but cannot generate.
    pub fn start(
        shared: Arc<Shared>,
        params: Arc<SegueParams>,
        sample_rate: f64,
    ) -> Option<Controller> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("segue-controller".into())
            .spawn(move || {
                let mut worker = Worker {
                    shared,
                    params,
                    sample_rate,
                    engine: None,
                    job: None,
                };
                while !flag.load(Ordering::Acquire) {
                    // A bug in one iteration must not take the host down with it.
                    let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        worker.step();
                    }));
                    if step.is_err() {
                        worker.fail("internal error in the controller thread".to_owned());
                    }
                }
            });
        match spawned {
            Ok(thread) => Some(Controller {
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                nice_error!("cannot start the controller thread: {e}");
                None
            }
        }
    }

    /// Stops the thread and waits for it (cancelling a running generation).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A generation the engine is working on.
struct Job {
    id: JobId,
    anchor: Option<TakeAnchor>,
    info: GenerationInfo,
    /// A new take, or the extension of an existing one.
    kind: JobKind,
    /// Frames of continuation (32 kHz) each take will have.
    expected_frames: usize,
    /// The growing take of each take index, from its first chunk on.
    streams: Vec<Option<Growing>>,
    /// Take indices whose take left the store while growing (deleted, or replaced by a loaded
    /// state): the rest of their audio is dropped.
    gone: Vec<bool>,
    /// The last progress: `(step, total, steps per second)`, and when it arrived.
    progress: Option<(usize, usize, f64)>,
    progress_at: Option<Instant>,
    /// Longest wait seen between a progress event and the chunk after it, in seconds (the
    /// chunk's decoding and hand-off).
    chunk_delay_s: f64,
}

/// What a job makes.
enum JobKind {
    /// New takes, inserted when their first chunk arrives.
    New,
    /// One longer take replacing take `id`: its audio (`source`, 32 kHz) followed by the
    /// continuation.
    Extend { id: TakeId, source: SourceAudio },
}

/// One take being streamed in.
struct Growing {
    id: TakeId,
    writer: TakeWriter,
    /// 32 kHz to the host rate, carried across chunks (bit-identical to resampling the whole
    /// source at once, which is how a saved take is rebuilt).
    resampler: StreamResampler,
    /// Continuation frames (32 kHz) received.
    received: usize,
    /// Frames of the take (host rate) before the continuation (an extended take's old audio).
    offset_host: usize,
    /// Frames of the take (host rate) when complete.
    final_host: usize,
}

/// Frames at `to` Hz of `frames` frames at `from` Hz, counted as the resampler counts them.
fn frames_at(frames: usize, from: u32, to: u32) -> usize {
    ((frames as u128 * u128::from(to) + u128::from(from) / 2) / u128::from(from)) as usize
}

/// Samples per codec frame at [`MODEL_RATE`] (MusicGen's EnCodec: 50 frames a second).
const HOP: usize = 640;

/// Codebooks of the delay pattern: a frame is complete this many steps after its first code.
const DELAY_STEPS: usize = 4;

/// Continuation frames (32 kHz) the engine generates for `duration_s` seconds (whole 50 Hz
/// frames, at least one; as the service rounds).
fn continuation_frames(duration_s: f64) -> usize {
    ((duration_s * 50.0).round() as usize).max(1) * HOP
}

/// Seconds of `bars` bars at the anchor's tempo and metre (bars count as seconds without one).
fn bars_seconds(bars: f64, anchor: Option<&TakeAnchor>) -> f64 {
    match anchor {
        Some(a) => bars_to_seconds(
            bars,
            TimeSig {
                numerator: a.time_sig_numerator,
                denominator: a.time_sig_denominator,
            },
            a.tempo_bpm,
        ),
        None => bars,
    }
}

/// The longest prompt sent for an extension, in seconds (the engine keeps at most a window's
/// worth anyway; this avoids sending minutes of audio).
const MAX_EXTEND_PROMPT_S: usize = 30;

struct Worker {
    shared: Arc<Shared>,
    params: Arc<SegueParams>,
    sample_rate: f64,
    /// Started on the first request (no engine, and no inference thread, before that).
    engine: Option<(Arc<Engine>, Client)>,
    job: Option<Job>,
}

impl Worker {
    fn step(&mut self) {
        restore_if_loaded(&self.shared, &self.params, self.sample_rate);
        let at = self.shared.generate_at.swap(NO_REQUEST, Ordering::AcqRel);
        if at != NO_REQUEST {
            if let Err(e) = self.start(at) {
                self.fail(e);
            }
        }
        while let Ok(command) = self.shared.commands_rx.try_recv() {
            if let Err(e) = self.command(command) {
                nice_warn!("{e}");
                self.shared.set_status(e);
            }
        }
        let event = match &self.engine {
            Some((_, client)) if self.job.is_some() => client.events.recv_timeout(POLL).ok(),
            _ => {
                std::thread::sleep(POLL);
                None
            }
        };
        if let Some(event) = event {
            self.handle(event.job, event.kind);
            // Whatever else is queued now, so chunks reach the take (and their arrival times
            // the pace estimate) without waiting for a poll each.
            while let Some(event) = self
                .engine
                .as_ref()
                .filter(|_| self.job.is_some())
                .and_then(|(_, client)| client.events.try_recv().ok())
            {
                self.handle(event.job, event.kind);
            }
        }
        self.shared.store.lock().collect_garbage();
    }

    fn fail(&mut self, message: String) {
        nice_warn!("generation failed: {message}");
        self.end(Phase::Failed(message));
    }

    /// Ends the current generation in `phase`, discarding what it streamed so far unless it
    /// finished (see [`Worker::discard`]).
    fn end(&mut self, phase: Phase) {
        self.shared.set_phase(phase);
        if let Some(job) = self.job.take() {
            self.discard(job);
        }
        if self.shared.generate_at.load(Ordering::Acquire) == NO_REQUEST {
            self.shared.busy.store(false, Ordering::Release);
        }
    }

    fn command(&mut self, command: Command) -> Result<(), String> {
        match command {
            Command::Cancel => {
                if let (Some(job), Some((_, client))) = (&self.job, &self.engine) {
                    client.cancel(job.id);
                }
                Ok(())
            }
            Command::Select(id) => self
                .shared
                .store
                .lock()
                .select(id, None)
                .map_err(|e| format!("cannot play the take: {e}")),
            Command::Rename(id, name) => {
                let mut store = self.shared.store.lock();
                store
                    .rename(id, &name)
                    .map_err(|e| format!("cannot rename the take: {e}"))?;
                save_store(&store, &self.params);
                Ok(())
            }
            Command::Delete(id) => {
                let mut store = self.shared.store.lock();
                store
                    .remove(id)
                    .map_err(|e| format!("cannot delete the take: {e}"))?;
                save_store(&store, &self.params);
                Ok(())
            }
            Command::Extend(id) => self.extend(id),
            Command::Export(request) => {
                // Copies of the audio, so the store's lock is not held while files are written.
                let takes: Vec<_> = {
                    let store = self.shared.store.lock();
                    request
                        .takes
                        .iter()
                        .filter_map(|id| store.get(*id))
                        .map(|e| (e.name.clone(), e.source.clone(), e.take.clone()))
                        .collect()
                };
                let outcome = export_takes(&request, &takes).map_err(|e| e.to_string());
                if let Err(e) = &outcome {
                    nice_warn!("export failed: {e}");
                }
                let mut status = self.shared.status.lock();
                status.export = Some(outcome);
                status.revision += 1;
                Ok(())
            }
            Command::Audition(id) => self
                .shared
                .store
                .lock()
                .audition(id)
                .map_err(|e| format!("cannot audition the take: {e}")),
        }
    }

    /// Starts a generation that continues take `id` from its end: its tail (from its 32 kHz
    /// source) is the prompt, the continuation length is the continuation-bars parameter at the
    /// take's own tempo and metre. The result is one longer take with the same id, name and
    /// anchor: the old audio followed by the new, growing while it is generated (the player goes
    /// on into it seamlessly where the old audio ended). Until it completes, the state saves the
    /// old take; a cancelled or failed extension leaves the old take as it was.
    fn extend(&mut self, id: TakeId) -> Result<(), String> {
        let (source, anchor, info) = {
            let store = self.shared.store.lock();
            if store.is_growing(id) {
                return Err("cannot extend a take that is still being generated".to_owned());
            }
            let entry = store
                .get(id)
                .ok_or_else(|| format!("cannot extend the take: no take with id {}", id.0))?;
            (entry.source.clone(), entry.anchor, entry.info.clone())
        };
        if source.frames() == 0 {
            return Err("cannot extend an empty take".to_owned());
        }
        let keep = (MAX_EXTEND_PROMPT_S * source.sample_rate as usize).min(source.frames());
        let prompt = Audio {
            sample_rate: source.sample_rate,
            channels: source
                .channels
                .iter()
                .map(|c| c[c.len() - keep..].to_vec())
                .collect(),
        };
        let bars = self.params.continuation_bars.value();
        let duration_s = bars_seconds(f64::from(bars), anchor.as_ref());
        let mut info = GenerationInfo {
            continuation_bars: info.continuation_bars + bars as f32,
            ..info
        };
        let request = self.request(prompt, duration_s, 1, &mut info);
        self.submit(request, anchor, info, JobKind::Extend { id, source })?;
        self.shared.busy.store(true, Ordering::Release);
        self.shared.set_phase(Phase::Starting);
        Ok(())
    }

    /// A streaming request for the current settings; fills in `info`'s model, text, seed and
    /// sampling.
    fn request(
        &self,
        prompt: Audio,
        duration_s: f64,
        takes: usize,
        info: &mut GenerationInfo,
    ) -> GenerateRequest {
        let params = &*self.params;
        let model = params.model.read().clone();
        let text = params.prompt_text.read().clone();
        // The editor's ranges: whatever a project or automation holds makes a valid request.
        let settings = settings::clamped(&params.sampling.read());
        let seed = settings.seed.unwrap_or_else(settings::random_seed);
        let sampling = settings::sampling_params(&settings);
        info.model = model.clone();
        info.text = text.clone();
        info.seed = Some(seed);
        info.temperature = settings.temperature as f32;
        info.top_k = settings.top_k as u32;
        info.top_p = settings.top_p as f32;
        info.guidance = settings.guidance_scale as f32;
        GenerateRequest {
            model: ModelSpec {
                source: model,
                device: DeviceChoice::Auto,
                dtype: DTypeChoice::F32,
                quant: None,
            },
            text,
            prompt: Some(prompt),
            duration_s,
            sampling,
            seed,
            takes,
            // Takes play while they are generated (see `crate::stream`).
            stream: true,
            // Longer than one window of the model: the authors' window and stride.
            window: None,
        }
    }

    /// Sends `request` to the engine (replacing a running job, whose partial takes are
    /// discarded) and makes it the current job.
    fn submit(
        &mut self,
        request: GenerateRequest,
        anchor: Option<TakeAnchor>,
        info: GenerationInfo,
        kind: JobKind,
    ) -> Result<(), String> {
        if self.engine.is_none() {
            let engine = Engine::shared().map_err(|e| e.to_string())?;
            let client = engine.client();
            self.engine = Some((engine, client));
        }
        if let Some(old) = self.job.take() {
            self.discard(old);
        }
        let expected_frames = continuation_frames(request.duration_s);
        let takes = request.takes;
        let (_, client) = self.engine.as_ref().ok_or("no engine")?;
        let id = client.generate(request, Policy::Replace);
        self.job = Some(Job::new(id, anchor, info, kind, expected_frames, takes));
        Ok(())
    }

    fn start(&mut self, at_frame: u64) -> Result<(), String> {
        let reader = self
            .shared
            .capture
            .lock()
            .clone()
            .ok_or("nothing is being captured")?;
        let params = &*self.params;
        let prompt_bars = params.prompt_bars.value();
        let cont_bars = params.continuation_bars.value();
        let prompt = reader
            .prompt(&PromptRequest {
                bars: f64::from(prompt_bars),
                // Without a musical position, bars count as seconds.
                fallback_seconds: f64::from(prompt_bars),
                at_frame: Some(at_frame),
            })
            .map_err(|e| format!("no prompt: {e}"))?;
        let anchor = prompt.anchor.map(|a: PromptAnchor| TakeAnchor {
            beats: a.beats,
            tempo_bpm: a.tempo_bpm,
            time_sig_numerator: a.time_sig.numerator,
            time_sig_denominator: a.time_sig.denominator,
            bar_index: a.bar_index,
        });
        let duration_s = bars_seconds(f64::from(cont_bars), anchor.as_ref());
        let audio = resample(
            &Audio {
                sample_rate: prompt.sample_rate.round() as u32,
                channels: prompt.audio,
            },
            MODEL_RATE,
        )
        .map_err(|e| format!("cannot resample the prompt: {e}"))?;
        let takes = params.sampling.read().takes.clamp(1, 4);
        let mut info = GenerationInfo {
            prompt_bars: prompt_bars as f32,
            continuation_bars: cont_bars as f32,
            ..GenerationInfo::default()
        };
        let request = self.request(audio, duration_s, takes, &mut info);
        self.submit(request, anchor, info, JobKind::New)?;
        self.shared.set_phase(Phase::Starting);
        Ok(())
    }

    fn handle(&mut self, job: JobId, kind: EventKind) {
        if self.job.as_ref().is_none_or(|j| j.id != job) {
            return;
        }
        match kind {
            EventKind::Finished(takes) => {
                if let Some(mut job) = self.job.take() {
                    if let Err(e) = self.finish(&mut job, takes) {
                        self.job = Some(job);
                        self.fail(e);
                        return;
                    }
                }
                if self.shared.generate_at.load(Ordering::Acquire) == NO_REQUEST {
                    self.shared.busy.store(false, Ordering::Release);
                }
            }
            EventKind::Failed(reason) => self.fail(reason),
            EventKind::Cancelled => self.end(Phase::Cancelled),
            EventKind::Progress {
                step,
                total,
                steps_per_s,
            } => {
                self.progress(step, total, steps_per_s);
                self.shared.set_phase(Phase::Generating {
                    step,
                    total,
                    steps_per_s,
                });
            }
            EventKind::Load(stage) => self.shared.set_phase(Phase::from_load(stage)),
            EventKind::ModelReady(info) => {
                let mut status = self.shared.status.lock();
                status.model = Some(info.spec.source.clone());
                status.device = Some(info.device.clone());
                if status.device_note.is_some() && !info.device.starts_with("cpu") {
                    status.device_note = None;
                }
                status.revision += 1;
            }
            EventKind::DeviceFallback { reason, .. } => {
                let mut status = self.shared.status.lock();
                status.device_note = Some(format!("running on the CPU: {reason}"));
                status.revision += 1;
            }
            EventKind::Chunk {
                take,
                offset,
                audio,
            } => {
                if let Err(e) = self.chunk(take, offset, audio) {
                    self.fail(e);
                }
            }
            _ => {}
        }
    }

    /// Records a progress event and republishes every growing take's pace.
    fn progress(&mut self, step: usize, total: usize, steps_per_s: f64) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        job.progress = Some((step, total, steps_per_s));
        job.progress_at = Some(Instant::now());
        let measured = job.pace();
        for g in job.streams.iter().flatten() {
            if let Some(pace) = pace_of(&measured, g, self.sample_rate) {
                g.writer.set_pace(&pace);
            }
        }
    }

    /// Appends one streamed chunk (32 kHz continuation audio starting `offset` frames into the
    /// continuation) to take `index`, creating the growing take on its first chunk.
    fn chunk(&mut self, index: usize, offset: usize, audio: Audio) -> Result<(), String> {
        let sample_rate = self.sample_rate;
        let Some(mut job) = self.job.take() else {
            return Ok(());
        };
        let result = (|| {
            if let Some(at) = job.progress_at {
                job.chunk_delay_s = job.chunk_delay_s.max(at.elapsed().as_secs_f64().min(5.0));
            }
            if index >= job.streams.len() {
                return Err(format!(
                    "a chunk of take {index} arrived for {} takes",
                    job.streams.len()
                ));
            }
            if job.gone[index] {
                return Ok(());
            }
            let mut channels = audio.channels;
            for channel in &mut channels {
                quantise_to_state(channel);
            }
            if job.streams[index].is_none() {
                let growing = self.begin_take(&job, index, channels.len())?;
                job.streams[index] = Some(growing);
            }
            let measured = job.pace();
            let Some(g) = job.streams[index].as_mut() else {
                return Ok(());
            };
            if offset != g.received {
                return Err(format!(
                    "a chunk at frame {offset} arrived after {} frames",
                    g.received
                ));
            }
            let host = g
                .resampler
                .push(&channels)
                .map_err(|e| format!("cannot resample the take: {e}"))?;
            g.writer
                .append(&host)
                .map_err(|e| format!("cannot grow the take: {e}"))?;
            g.received += channels.first().map_or(0, Vec::len);
            let id = g.id;
            if let Some(pace) = pace_of(&measured, g, sample_rate) {
                g.writer.set_pace(&pace);
            }
            // Deleted meanwhile (or replaced by a loaded state): it just stops growing.
            if self
                .shared
                .store
                .lock()
                .append_source(id, &channels)
                .is_err()
            {
                job.streams[index] = None;
                job.gone[index] = true;
            }
            Ok(())
        })();
        self.job = Some(job);
        result
    }

    /// Creates the growing take of take `index` of `job` at its first chunk, puts it in the
    /// store (a new take: inserted, and selected when it is the first; an extension: replacing
    /// the old take, whose audio it starts with).
    fn begin_take(&self, job: &Job, index: usize, channels: usize) -> Result<Growing, String> {
        let host_rate = self.sample_rate.round() as u32;
        let mut resampler = StreamResampler::new(MODEL_RATE, host_rate, channels)
            .map_err(|e| format!("cannot resample the take: {e}"))?;
        let anchor_beats = job.anchor.map(|a| a.beats);
        match &job.kind {
            JobKind::New => {
                let id = TakeId::fresh();
                let final_host = frames_at(job.expected_frames, MODEL_RATE, host_rate);
                let (take, writer) = Take::growing(
                    id,
                    self.sample_rate,
                    anchor_beats,
                    channels,
                    final_host + host_rate as usize,
                )
                .map_err(|e| e.to_string())?;
                let mut store = self.shared.store.lock();
                let number = store.entries().len() + 1;
                store.insert(TakeEntry {
                    id,
                    name: format!("Take {number}"),
                    info: job.info.clone(),
                    anchor: job.anchor,
                    source: SourceAudio {
                        sample_rate: MODEL_RATE,
                        channels: vec![Vec::new(); channels],
                    },
                    take,
                });
                store.begin_growing(id, 0);
                if index == 0 {
                    store
                        .select(Some(id), None)
                        .map_err(|e| format!("cannot play the new take: {e}"))?;
                }
                Ok(Growing {
                    id,
                    writer,
                    resampler,
                    received: 0,
                    offset_host: 0,
                    final_host,
                })
            }
            JobKind::Extend { id, source } => {
                if source.channels.len() != channels {
                    return Err(format!(
                        "the take has {} channels, the model makes {channels}",
                        source.channels.len()
                    ));
                }
                let old_host = frames_at(source.frames(), MODEL_RATE, host_rate);
                let final_host =
                    frames_at(source.frames() + job.expected_frames, MODEL_RATE, host_rate);
                let (take, mut writer) = Take::growing(
                    *id,
                    self.sample_rate,
                    anchor_beats,
                    channels,
                    final_host + host_rate as usize,
                )
                .map_err(|e| e.to_string())?;
                let head = resampler
                    .push(&source.channels)
                    .map_err(|e| format!("cannot resample the take: {e}"))?;
                writer
                    .append(&head)
                    .map_err(|e| format!("cannot grow the take: {e}"))?;
                let mut store = self.shared.store.lock();
                store
                    .replace_take(*id, take, source.clone())
                    .map_err(|e| format!("cannot extend the take: {e}"))?;
                store.begin_growing(*id, source.frames());
                Ok(Growing {
                    id: *id,
                    writer,
                    resampler,
                    received: 0,
                    offset_host: old_host,
                    final_host,
                })
            }
        }
    }

    /// Undoes what a job that will not finish left in the store: new growing takes are removed
    /// (a cancelled or failed generation leaves no half take behind: the take list holds only
    /// what the musician can keep), an extended take gets its old audio back.
    fn discard(&mut self, job: Job) {
        if let Some((_, client)) = &self.engine {
            client.cancel(job.id);
        }
        let mut store = self.shared.store.lock();
        for g in job.streams.into_iter().flatten() {
            let id = g.id;
            drop(g.writer);
            match &job.kind {
                JobKind::New => {
                    let _ = store.remove(id);
                }
                JobKind::Extend { source, .. } => {
                    store.end_growing(id);
                    let rebuilt = build_take(id, self.sample_rate, job.anchor.as_ref(), source)
                        .and_then(|take| {
                            store
                                .replace_take(id, take, source.clone())
                                .map_err(|e| e.to_string())
                        });
                    if let Err(e) = rebuilt {
                        nice_warn!("the take could not be restored after its extension: {e}");
                    }
                }
            }
        }
        save_store(&store, &self.params);
    }

    fn finish(
        &mut self,
        job: &mut Job,
        takes: Vec<segue_engine::service::Take>,
    ) -> Result<(), String> {
        let mut built = Vec::new();
        // Takes completed by this call (streamed ones included), for the status.
        let mut count = 0;
        for (i, take) in takes.into_iter().enumerate() {
            if job.gone.get(i).copied().unwrap_or(false) {
                continue;
            }
            let mut info = job.info.clone();
            info.seed = Some(take.meta.seed);
            if let Some(mut g) = job.streams.get_mut(i).and_then(Option::take) {
                // Streamed: the chunks tiled the continuation; flush the resampler.
                let tail = g
                    .resampler
                    .finish()
                    .map_err(|e| format!("cannot resample the take: {e}"))?;
                g.writer
                    .append(&tail)
                    .map_err(|e| format!("cannot grow the take: {e}"))?;
                let expected = take.continuation().frames();
                if g.received != expected {
                    nice_warn!(
                        "the streamed take has {} frames, the finished one {expected}",
                        g.received
                    );
                }
                let mut store = self.shared.store.lock();
                store.end_growing(g.id);
                // Gone when a state loaded meanwhile replaced the takes.
                let _ = store.set_info(g.id, info);
                drop(store);
                g.writer.finish();
                count += 1;
                continue;
            }
            if !matches!(job.kind, JobKind::New) {
                return Err("the extension arrived without its audio".to_owned());
            }
            // Not streamed (no chunk arrived): the whole take at once.
            let continuation = take.continuation();
            let mut source = SourceAudio {
                sample_rate: continuation.sample_rate,
                channels: continuation.channels,
            };
            for channel in &mut source.channels {
                quantise_to_state(channel);
            }
            let id = TakeId::fresh();
            let audio = build_take(id, self.sample_rate, job.anchor.as_ref(), &source)?;
            built.push((i, id, source, audio, info));
        }
        count += built.len();
        let mut store = self.shared.store.lock();
        for (i, id, source, take, info) in built {
            let number = store.entries().len() + 1;
            store.insert(TakeEntry {
                id,
                name: format!("Take {number}"),
                info,
                anchor: job.anchor,
                source,
                take,
            });
            if i == 0 {
                store
                    .select(Some(id), None)
                    .map_err(|e| format!("cannot play the new take: {e}"))?;
            }
        }
        save_store(&store, &self.params);
        drop(store);
        self.shared.set_phase(Phase::Ready { takes: count });
        Ok(())
    }
}

impl Drop for Worker {
    /// The controller stops (deactivation) with a job running: its engine job is cancelled (the
    /// client goes with the worker) and its partial takes are discarded, as on a cancel.
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.discard(job);
            if self.shared.generate_at.load(Ordering::Acquire) == NO_REQUEST {
                self.shared.busy.store(false, Ordering::Release);
            }
        }
    }
}

/// What a job measured of its speed.
#[derive(Clone, Copy)]
struct JobPace {
    progress: Option<(usize, usize, f64)>,
    chunk_delay_s: f64,
}

impl Job {
    /// A job of `takes` takes of `expected_frames` continuation frames each (32 kHz), before
    /// any event arrived.
    fn new(
        id: JobId,
        anchor: Option<TakeAnchor>,
        info: GenerationInfo,
        kind: JobKind,
        expected_frames: usize,
        takes: usize,
    ) -> Job {
        Job {
            id,
            anchor,
            info,
            kind,
            expected_frames,
            streams: (0..takes).map(|_| None).collect(),
            gone: vec![false; takes],
            progress: None,
            progress_at: None,
            chunk_delay_s: 0.0,
        }
    }

    fn pace(&self) -> JobPace {
        JobPace {
            progress: self.progress,
            chunk_delay_s: self.chunk_delay_s,
        }
    }
}

/// The pace of growing take `g` of `job` from the job's last progress (`None` before any):
/// generated frames, final length and speed in frames of the take at `sample_rate`, the
/// chunks' size and lookahead from the engine's stream configuration, and the measured chunk
/// delay.
fn pace_of(job: &JobPace, g: &Growing, sample_rate: f64) -> Option<Pace> {
    let (step, total, steps_per_s) = job.progress?;
    if total == 0 {
        return None;
    }
    let ratio = sample_rate / f64::from(MODEL_RATE);
    let continuation = (g.final_host - g.offset_host) as f64;
    let stream = StreamConfig::default();
    // The resampler holds back up to one input chunk (about 1024 frames) and half an output
    // chunk of filter delay.
    let resampler_latency = 2_048.0;
    Some(Pace {
        generated: g.offset_host as f64 + continuation * step.min(total) as f64 / total as f64,
        final_frames: g.final_host as f64,
        frames_per_s: steps_per_s * continuation / total as f64,
        lookahead: ((stream.right_context_frames + DELAY_STEPS) * HOP) as f64 * ratio
            + resampler_latency * ratio,
        chunk: (stream.chunk_frames * HOP) as f64 * ratio,
        delay_s: 0.1 + 1.5 * job.chunk_delay_s,
    })
}

#[cfg(test)]
mod tests {
    //! The chunk → growing take path, driven by the engine's events as the service sends them
    //! (the real engine runs in the host-level tests, `tests/tests/generation.rs`).

    use super::*;
    use crate::playback::player_pair;
    use segue_engine::service::TakeMeta;

    const SR: f64 = 44_100.0;

    fn worker() -> Worker {
        Worker {
            shared: Arc::new(Shared::default()),
            params: Arc::new(SegueParams::default()),
            sample_rate: SR,
            engine: None,
            job: None,
        }
    }

    fn anchor() -> TakeAnchor {
        TakeAnchor {
            beats: 16.0,
            tempo_bpm: 120.0,
            time_sig_numerator: 4,
            time_sig_denominator: 4,
            bar_index: 4,
        }
    }

    fn job(id: JobId, kind: JobKind, expected_frames: usize, takes: usize) -> Job {
        let info = GenerationInfo {
            continuation_bars: 1.0,
            ..GenerationInfo::default()
        };
        Job::new(id, Some(anchor()), info, kind, expected_frames, takes)
    }

    /// Mono audio with every sample different, some beyond the 16-bit grid.
    fn signal(frames: usize, seed: f32) -> Vec<f32> {
        (0..frames)
            .map(|i| ((i as f32 * 0.013 + seed).sin() * 0.6) + 1e-6)
            .collect()
    }

    fn finished(continuation: &[f32]) -> EventKind {
        EventKind::Finished(vec![segue_engine::service::Take {
            audio: Audio {
                sample_rate: MODEL_RATE,
                channels: vec![continuation.to_vec()],
            },
            prompt_samples: 0,
            codes: Vec::new(),
            prompt_frames: 0,
            meta: TakeMeta {
                model: String::new(),
                text: String::new(),
                seed: 99,
                sampling: segue_engine::sampling::SamplingParams::default(),
                prompt_s: 0.0,
                duration_s: 0.0,
                generation_s: 0.0,
                steps: 0,
                steps_per_s: 0.0,
                device: String::new(),
                text_truncated: false,
            },
        }])
    }

    fn chunk(offset: usize, audio: &[f32]) -> EventKind {
        EventKind::Chunk {
            take: 0,
            offset,
            audio: Audio {
                sample_rate: MODEL_RATE,
                channels: vec![audio.to_vec()],
            },
        }
    }

    fn saved(w: &Worker) -> TakesState {
        let json = w.params.takes.json();
        if json.is_empty() {
            TakesState::default()
        } else {
            decode_state(&json).unwrap()
        }
    }

    /// Chunks become one growing take, inserted and selected at the first chunk, not saved
    /// until complete; the finished take's audio equals the one-shot build from its source
    /// (what a reloaded project plays), sample for sample.
    #[test]
    fn chunks_grow_a_take_that_equals_the_one_shot_build() {
        let mut w = worker();
        let (_player, handle) = player_pair(SR);
        w.shared.store.lock().attach(handle).unwrap();
        let frames = 50 * HOP; // one second
        let audio = signal(frames, 0.3);
        w.job = Some(job(7, JobKind::New, frames, 1));
        w.handle(
            7,
            EventKind::Progress {
                step: 10,
                total: 54,
                steps_per_s: 100.0,
            },
        );
        let cuts = [0, 25 * HOP, 33 * HOP + 17, frames];
        w.handle(7, chunk(0, &audio[cuts[0]..cuts[1]]));
        let id = {
            let store = w.shared.store.lock();
            assert_eq!(store.entries().len(), 1);
            let e = &store.entries()[0];
            assert_eq!(store.selected(), Some(e.id));
            assert!(store.is_growing(e.id));
            assert_eq!(e.source.frames(), 25 * HOP);
            let (valid, complete) = e.take.available();
            assert!(!complete);
            // The resampler holds back less than a chunk of its own.
            let expected = frames_at(25 * HOP, MODEL_RATE, SR as u32);
            assert!(valid <= expected && valid + 2_048 > expected, "{valid}");
            let pace = e.take.pace().expect("no pace published");
            assert!(pace.is_valid());
            assert_eq!(
                pace.final_frames,
                frames_at(frames, MODEL_RATE, SR as u32) as f64
            );
            // 100 steps/s over 54 steps for a second of audio.
            assert!((pace.frames_per_s - 100.0 * SR / 54.0).abs() < 1.0);
            // Not in the state while it grows.
            assert!(store.to_state().takes.is_empty());
            e.id
        };
        // Out-of-order chunks are refused (and the partial take removed).
        let mut bad = worker();
        bad.job = Some(job(8, JobKind::New, frames, 1));
        bad.handle(8, chunk(0, &audio[..100]));
        bad.handle(8, chunk(200, &audio[200..300]));
        assert!(bad.job.is_none());
        assert!(bad.shared.store.lock().entries().is_empty());

        w.handle(7, chunk(cuts[1], &audio[cuts[1]..cuts[2]]));
        w.handle(7, chunk(cuts[2], &audio[cuts[2]..cuts[3]]));
        w.handle(7, finished(&audio));
        assert!(w.job.is_none());
        // The streamed take counts as made.
        assert_eq!(w.shared.status.lock().phase, Phase::Ready { takes: 1 });
        let store = w.shared.store.lock();
        let e = store.get(id).unwrap();
        assert!(!store.is_growing(id));
        assert_eq!(e.info.seed, Some(99));
        let mut quantised = audio.clone();
        quantise_to_state(&mut quantised);
        assert_eq!(e.source.channels, vec![quantised]);
        let (valid, complete) = e.take.available();
        assert!(complete);
        let one_shot = build_take(id, SR, e.anchor.as_ref(), &e.source).unwrap();
        assert_eq!(valid, one_shot.available().0);
        assert_eq!(e.take.to_planar(), one_shot.to_planar());
        assert_eq!(e.take.anchor_beats(), Some(16.0));
        drop(store);
        let state = saved(&w);
        assert_eq!(state.takes.len(), 1);
        assert_eq!(state.selected, Some(0));
        assert_eq!(state.takes[0].source.frames(), frames);
    }

    /// A take deleted while it grows stays deleted: its later chunks and the finished take are
    /// dropped.
    #[test]
    fn a_take_deleted_while_growing_stays_deleted() {
        let mut w = worker();
        let frames = 10 * HOP;
        let audio = signal(frames, 0.1);
        w.job = Some(job(5, JobKind::New, frames, 1));
        w.handle(5, chunk(0, &audio[..4 * HOP]));
        let id = w.shared.store.lock().entries()[0].id;
        w.command(Command::Delete(id)).unwrap();
        w.handle(5, chunk(4 * HOP, &audio[4 * HOP..]));
        w.handle(5, finished(&audio));
        assert!(w.job.is_none());
        assert!(w.shared.store.lock().entries().is_empty());
        assert!(saved(&w).takes.is_empty());
    }

    /// A controller stopped mid-generation (deactivation) leaves no partial take behind.
    #[test]
    fn stopping_the_controller_discards_the_partial_take() {
        let mut w = worker();
        let shared = w.shared.clone();
        w.job = Some(job(6, JobKind::New, 10 * HOP, 1));
        w.handle(6, chunk(0, &signal(4 * HOP, 0.2)));
        assert_eq!(shared.store.lock().entries().len(), 1);
        drop(w);
        assert!(shared.store.lock().entries().is_empty());
        assert!(!shared.store.lock().to_state().takes.iter().any(|_| true));
    }

    /// A cancelled or failed generation leaves no partial take.
    #[test]
    fn a_cancelled_stream_leaves_no_take() {
        for end in [EventKind::Cancelled, EventKind::Failed("boom".into())] {
            let mut w = worker();
            w.job = Some(job(3, JobKind::New, 10 * HOP, 2));
            let audio = signal(4 * HOP, 1.0);
            w.handle(3, chunk(0, &audio));
            w.handle(
                3,
                EventKind::Chunk {
                    take: 1,
                    offset: 0,
                    audio: Audio {
                        sample_rate: MODEL_RATE,
                        channels: vec![audio.clone()],
                    },
                },
            );
            let takes: Vec<Arc<Take>> = w
                .shared
                .store
                .lock()
                .entries()
                .iter()
                .map(|e| e.take.clone())
                .collect();
            assert_eq!(takes.len(), 2);
            w.handle(3, end);
            assert!(w.shared.store.lock().entries().is_empty());
            assert_eq!(w.shared.store.lock().selected(), None);
            // The player may still hold them: complete, so it never waits for more.
            assert!(takes.iter().all(|t| t.available().1));
            assert!(saved(&w).takes.is_empty());
        }
    }

    /// An extension grows the same take (same id, anchor, name): its old audio, then the
    /// continuation; the state keeps the old audio until it completes; a cancelled extension
    /// gives the old take back.
    #[test]
    fn an_extension_grows_the_same_take() {
        let old_frames = 30 * HOP;
        let old: Vec<f32> = {
            let mut a = signal(old_frames, 2.0);
            quantise_to_state(&mut a);
            a
        };
        let source = SourceAudio {
            sample_rate: MODEL_RATE,
            channels: vec![old.clone()],
        };
        for cancel in [false, true] {
            let mut w = worker();
            let id = TakeId::fresh();
            let take = build_take(id, SR, Some(&anchor()), &source).unwrap();
            let before = take.to_planar();
            {
                let mut store = w.shared.store.lock();
                store.insert(TakeEntry {
                    id,
                    name: "keeper".into(),
                    info: GenerationInfo::default(),
                    anchor: Some(anchor()),
                    source: source.clone(),
                    take,
                });
                store.select(Some(id), None).unwrap();
                save_store(&store, &w.params);
            }
            let new_frames = 40 * HOP;
            let more = signal(new_frames, 5.0);
            w.job = Some(job(
                4,
                JobKind::Extend {
                    id,
                    source: source.clone(),
                },
                new_frames,
                1,
            ));
            w.handle(4, chunk(0, &more[..25 * HOP]));
            {
                let store = w.shared.store.lock();
                assert_eq!(store.entries().len(), 1);
                let e = store.get(id).unwrap();
                assert_eq!(e.take.id(), id);
                assert_eq!(e.name, "keeper");
                assert_eq!(e.source.frames(), old_frames + 25 * HOP);
                // The old audio, unchanged but for the resampler's edge at its end (the last
                // input chunk of the old take was padded with zeros, now with the continuation:
                // about 1024 input frames, plus the filter's delay).
                let grown = e.take.to_planar();
                assert!(grown[0].len() > before[0].len());
                let first_change = (0..before[0].len())
                    .find(|&i| grown[0][i] != before[0][i])
                    .unwrap_or(before[0].len());
                assert!(
                    first_change + 3_000 > before[0].len(),
                    "changed from {first_change} of {}",
                    before[0].len()
                );
                // The state holds the old take meanwhile.
                let state = store.to_state();
                assert_eq!(state.takes[0].source.channels, vec![old.clone()]);
            }
            if cancel {
                w.handle(4, EventKind::Cancelled);
                let store = w.shared.store.lock();
                let e = store.get(id).unwrap();
                assert_eq!(e.source.channels, vec![old.clone()]);
                assert_eq!(e.take.to_planar(), before);
                assert!(e.take.available().1);
                assert_eq!(store.selected(), Some(id));
                continue;
            }
            w.handle(4, chunk(25 * HOP, &more[25 * HOP..]));
            w.handle(4, finished(&more));
            let store = w.shared.store.lock();
            let e = store.get(id).unwrap();
            assert_eq!(e.source.frames(), old_frames + new_frames);
            assert_eq!(e.source.channels[0][..old_frames], old[..]);
            let rebuilt = build_take(id, SR, e.anchor.as_ref(), &e.source).unwrap();
            assert_eq!(e.take.to_planar(), rebuilt.to_planar());
            assert!(e.take.available().1);
            drop(store);
            let state = saved(&w);
            assert_eq!(state.takes.len(), 1);
            assert_eq!(state.takes[0].source.frames(), old_frames + new_frames);
            assert_eq!(state.takes[0].anchor, Some(anchor()));
        }
    }

    /// Extending a take with the real engine (the tiny fixture checkpoint): the same take grows
    /// by the requested bars (the continuation-bars parameter, 4 by default, at the take's
    /// tempo), its old audio unchanged, and it survives a state round trip sample for sample.
    #[test]
    fn extend_with_the_real_engine_grows_the_take_by_the_requested_bars() {
        let mut w = worker();
        *w.params.model.write() = format!(
            "{}/../engine/fixtures/tiny-musicgen-mono",
            env!("CARGO_MANIFEST_DIR")
        );
        let bars = w.params.continuation_bars.value();
        assert_eq!(bars, crate::params::DEFAULT_CONTINUATION_BARS);
        // One bar at 120 BPM: 2 s.
        let mut old = signal(2 * MODEL_RATE as usize, 0.7);
        quantise_to_state(&mut old);
        let source = SourceAudio {
            sample_rate: MODEL_RATE,
            channels: vec![old.clone()],
        };
        let id = TakeId::fresh();
        {
            let mut store = w.shared.store.lock();
            store.insert(TakeEntry {
                id,
                name: "Take 1".into(),
                info: GenerationInfo {
                    continuation_bars: 1.0,
                    ..GenerationInfo::default()
                },
                anchor: Some(anchor()),
                source: source.clone(),
                take: build_take(id, SR, Some(&anchor()), &source).unwrap(),
            });
            store.select(Some(id), None).unwrap();
        }
        w.extend(id).unwrap();
        assert!(w.shared.busy());
        let started = Instant::now();
        while w.job.is_some() {
            assert!(started.elapsed() < Duration::from_secs(300), "no end");
            w.step();
        }
        assert!(!w.shared.busy(), "{}", w.shared.status_line());
        let store = w.shared.store.lock();
        assert_eq!(store.entries().len(), 1, "{}", w.shared.status_line());
        let e = store.get(id).unwrap();
        let added = continuation_frames(f64::from(bars) * 2.0);
        assert_eq!(e.source.frames(), old.len() + added);
        assert_eq!(added, bars as usize * 2 * MODEL_RATE as usize);
        assert_eq!(e.source.channels[0][..old.len()], old[..]);
        assert!(e.source.channels[0][old.len()..]
            .iter()
            .any(|x| x.abs() > 1e-3));
        assert_eq!(e.info.continuation_bars, 1.0 + bars as f32);
        assert_eq!(e.anchor, Some(anchor()));
        assert_eq!(store.selected(), Some(id));
        let live = e.take.to_planar();
        assert!(e.take.available().1);
        assert_eq!(
            live[0].len(),
            frames_at(e.source.frames(), MODEL_RATE, SR as u32)
        );
        drop(store);
        // Saved and restored: the same audio.
        let state = saved(&w);
        assert_eq!(state.takes.len(), 1);
        let mut restored = TakeStore::new();
        let errors = restored.restore(state, |id, saved| {
            build_take(id, SR, saved.anchor.as_ref(), &saved.source)
        });
        assert!(errors.is_empty());
        assert_eq!(restored.entries()[0].take.to_planar(), live);
        assert_eq!(restored.entries()[0].anchor, Some(anchor()));
    }
}

#[cfg(test)]
mod command_tests {
    //! Editor commands through the controller thread.

    use super::*;
    use crate::export::{ExportRate, ExportRequest};
    use segue_engine::audio::read_wav;
    use std::time::Instant;

    /// A store with one take "Riff" (host rate 48 kHz, source at 32 kHz).
    fn shared_with_a_take() -> (Arc<Shared>, TakeId, Vec<Vec<f32>>) {
        let shared = Arc::new(Shared::default());
        let source = SourceAudio {
            sample_rate: MODEL_RATE,
            channels: vec![(0..3_200)
                .map(|i| ((i % 50) as f32 - 25.0) / 64.0)
                .collect()],
        };
        let id = TakeId::fresh();
        let take = build_take(id, 48_000.0, None, &source).unwrap();
        let planar = take.to_planar();
        shared.store.lock().insert(TakeEntry {
            id,
            name: "Riff".into(),
            info: GenerationInfo::default(),
            anchor: None,
            source,
            take,
        });
        (shared, id, planar)
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(POLL);
        }
    }

    #[test]
    fn editor_commands_reach_the_store_and_report_back() {
        let (shared, id, planar) = shared_with_a_take();
        let params = Arc::new(SegueParams::default());
        let mut controller = Controller::start(shared.clone(), params.clone(), 48_000.0).unwrap();
        let folder = std::env::temp_dir().join(format!("segue-cmd-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&folder);

        shared.send(Command::Rename(id, "Chorus".into()));
        shared.send(Command::Export(ExportRequest {
            takes: vec![id],
            folder: folder.clone(),
            rate: ExportRate::Host,
        }));
        wait_for("no export report", || shared.status.lock().export.is_some());
        let report = shared.status.lock().export.clone().unwrap().unwrap();
        assert_eq!(report.files, vec![folder.join("Chorus.wav")]);
        let back = read_wav(&report.files[0]).unwrap();
        assert_eq!(back.sample_rate, 48_000);
        assert_eq!(back.channels, planar);
        // The rename was saved in the persisted takes too.
        assert!(params.takes.json().contains("Chorus"));

        // A folder that cannot be made is reported in plain words, not a panic.
        let blocker = folder.join("file");
        std::fs::write(&blocker, b"x").unwrap();
        shared.send(Command::Export(ExportRequest {
            takes: vec![id],
            folder: blocker.join("sub"),
            rate: ExportRate::Model,
        }));
        wait_for("no failed export", || {
            matches!(shared.status.lock().export, Some(Err(_)))
        });
        let Some(Err(e)) = shared.status.lock().export.clone() else {
            unreachable!()
        };
        assert!(e.starts_with("cannot create the folder"), "{e}");

        shared.send(Command::Delete(id));
        wait_for("take not deleted", || {
            shared.store.lock().entries().is_empty()
        });
        shared.send(Command::Audition(Some(id)));
        wait_for("no notice for a missing take", || {
            shared.status.lock().notice.is_some()
        });
        let notice = shared.status.lock().notice.clone().unwrap();
        assert!(notice.starts_with("cannot audition the take"), "{notice}");
        controller.stop();
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
