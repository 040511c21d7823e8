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
//!   ([`Engine::shared`], one inference thread for every instance in the process). Finished takes
//!   are rounded to the state's 16-bit precision (so a reloaded project sounds the same),
//!   resampled to the host rate, inserted into the [`TakeStore`] and selected; the store hands
//!   them to the audio thread through the player's lock-free queue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use nice_plug::prelude::*;
use parking_lot::Mutex;
use segue_engine::audio::{resample, Audio};
use segue_engine::sampling::SamplingParams;
use segue_engine::service::{
    Client, DTypeChoice, DeviceChoice, Engine, EventKind, GenerateRequest, JobId, ModelSpec, Policy,
};

use crate::capture::{CaptureReader, PromptAnchor, PromptRequest};
use crate::export::{export_takes, ExportRequest};
use crate::params::SegueParams;
use crate::playback::PlayerStatus;
use crate::status::{Phase, Status};
use crate::takes::{
    decode_state, encode_state, quantise_to_state, GenerationInfo, SourceAudio, Take, TakeAnchor,
    TakeEntry, TakeId, TakeStore, TakesState,
};
use crate::transport::bars_to_seconds;

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
    anchor: Option<PromptAnchor>,
    info: GenerationInfo,
}

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
        }
        self.shared.store.lock().collect_garbage();
    }

    fn fail(&mut self, message: String) {
        nice_warn!("generation failed: {message}");
        self.end(Phase::Failed(message));
    }

    /// Ends the current generation in `phase`.
    fn end(&mut self, phase: Phase) {
        self.shared.set_phase(phase);
        self.job = None;
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

    /// Starts a generation that continues take `id` from its end.
    fn extend(&mut self, id: TakeId) -> Result<(), String> {
        let _ = id;
        Err("extending a take is not available yet".to_owned())
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
        let duration_s = match &prompt.anchor {
            Some(a) => bars_to_seconds(f64::from(cont_bars), a.time_sig, a.tempo_bpm),
            None => f64::from(cont_bars),
        };
        let audio = resample(
            &Audio {
                sample_rate: prompt.sample_rate.round() as u32,
                channels: prompt.audio,
            },
            MODEL_RATE,
        )
        .map_err(|e| format!("cannot resample the prompt: {e}"))?;
        let model = params.model.read().clone();
        let text = params.prompt_text.read().clone();
        let settings = params.sampling.read().clone();
        let seed = settings.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let sampling = SamplingParams {
            greedy: settings.greedy,
            temperature: settings.temperature,
            top_k: settings.top_k,
            top_p: settings.top_p,
            guidance_scale: settings.guidance_scale,
        };
        let info = GenerationInfo {
            model: model.clone(),
            text: text.clone(),
            seed: Some(seed),
            temperature: settings.temperature as f32,
            top_k: settings.top_k as u32,
            top_p: settings.top_p as f32,
            guidance: settings.guidance_scale as f32,
            prompt_bars: prompt_bars as f32,
            continuation_bars: cont_bars as f32,
        };
        let request = GenerateRequest {
            model: ModelSpec {
                source: model,
                device: DeviceChoice::Auto,
                dtype: DTypeChoice::F32,
                quant: None,
            },
            text,
            prompt: Some(audio),
            duration_s,
            sampling,
            seed,
            takes: settings.takes.clamp(1, 4),
            // Takes arrive whole; playing a growing take is the streaming work still to come.
            stream: false,
            window: None,
        };
        if self.engine.is_none() {
            let engine = Engine::shared().map_err(|e| e.to_string())?;
            let client = engine.client();
            self.engine = Some((engine, client));
        }
        let (_, client) = self.engine.as_ref().ok_or("no engine")?;
        let id = client.generate(request, Policy::Replace);
        self.shared.set_phase(Phase::Starting);
        self.job = Some(Job {
            id,
            anchor: prompt.anchor,
            info,
        });
        Ok(())
    }

    fn handle(&mut self, job: JobId, kind: EventKind) {
        if self.job.as_ref().is_none_or(|j| j.id != job) {
            return;
        }
        match kind {
            EventKind::Finished(takes) => {
                if let Some(job) = self.job.take() {
                    if let Err(e) = self.finish(job, takes) {
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
            } => self.shared.set_phase(Phase::Generating {
                step,
                total,
                steps_per_s,
            }),
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
            _ => {}
        }
    }

    fn finish(&mut self, job: Job, takes: Vec<segue_engine::service::Take>) -> Result<(), String> {
        let anchor = job.anchor.map(|a| TakeAnchor {
            beats: a.beats,
            tempo_bpm: a.tempo_bpm,
            time_sig_numerator: a.time_sig.numerator,
            time_sig_denominator: a.time_sig.denominator,
            bar_index: a.bar_index,
        });
        let mut built = Vec::with_capacity(takes.len());
        for (i, take) in takes.into_iter().enumerate() {
            // The engine decodes prompt and continuation together; the take is the new part.
            let continuation = take.continuation();
            let mut source = SourceAudio {
                sample_rate: continuation.sample_rate,
                channels: continuation.channels,
            };
            for channel in &mut source.channels {
                quantise_to_state(channel);
            }
            let id = TakeId::fresh();
            let audio = build_take(id, self.sample_rate, anchor.as_ref(), &source)?;
            let mut info = job.info.clone();
            info.seed = Some(take.meta.seed);
            built.push((i, id, source, audio, info));
        }
        let count = built.len();
        let mut store = self.shared.store.lock();
        let mut first = None;
        for (i, id, source, take, info) in built {
            let number = store.entries().len() + 1;
            store.insert(TakeEntry {
                id,
                name: format!("Take {number}"),
                info,
                anchor,
                source,
                take,
            });
            if i == 0 {
                first = Some(id);
            }
        }
        if let Some(id) = first {
            store
                .select(Some(id), None)
                .map_err(|e| format!("cannot play the new take: {e}"))?;
        }
        save_store(&store, &self.params);
        drop(store);
        self.shared.set_phase(Phase::Ready { takes: count });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
