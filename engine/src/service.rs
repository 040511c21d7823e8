//! The inference service: one long-lived thread per [`Engine`] that owns the loaded models and
//! runs every load and generation job, and cheap [`Client`] handles that talk to it.
//!
//! Data flow: a client's request becomes a job in the engine's queue (a `parking_lot` mutex and
//! condition variable rather than a channel, because the replace policy and cancellation remove
//! queued jobs). The inference thread takes jobs one at a time in arrival order and sends
//! [`Event`]s to the client that asked, on that client's own `crossbeam` channel. Cancelling a
//! running job sets its flag, which the generation loop reads after every decoder step, so it
//! takes effect within one step; cancelling a queued job removes it at once.
//!
//! Models are shared: a [`ModelSpec`] (source, device, dtype) maps to one loaded model, held by
//! the set of clients that used it. Three plugin instances on one checkpoint load its weights once;
//! the weights are dropped when the last holder lets go ([`Client::unload`], or the client being
//! dropped) and no job is using them.
//!
//! Nothing here is realtime: the plugin's audio thread never calls into this module (the plugin's
//! non-realtime side does, and hands results to the audio thread lock-free).

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device, DeviceLocation};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use crate::audio::Audio;
use crate::decoder::Quant;
use crate::generate::{AudioRequest, Control, GenerateError};
use crate::hub::{self, HubProgress, ModelFiles};
use crate::longform::{generate_long_audio, LongOptions, WindowConfig};
use crate::model::{GenerationConfig, Musicgen};
use crate::sampling::SamplingParams;
use crate::stream::StreamConfig;

/// Errors of the service itself (a job's errors arrive as [`EventKind::Failed`]).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot start the inference thread: {0}")]
    Spawn(std::io::Error),
}

/// Identifies one job (load or generation) for the lifetime of its [`Engine`].
pub type JobId = u64;
/// Identifies one [`Client`] of an [`Engine`].
pub type ClientId = u64;

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// Where to run a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature and a GPU; else the CPU is used and an
    /// [`Event::DeviceFallback`] says so).
    Cuda(usize),
    /// An Apple GPU (needs the `metal` feature; else the CPU, with a fallback event).
    Metal,
    /// The first GPU there is, else the CPU (no fallback event: the CPU is an expected answer).
    Auto,
}

/// Numeric type of the decoder weights. The codec and text encoder always run in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DTypeChoice {
    F32,
    F16,
    Bf16,
}

/// One model as the service shares it: two requests with equal specs share one loaded copy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    /// A local folder or a Hugging Face Hub id (`facebook/musicgen-small`).
    pub source: String,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    /// Quantised decoder weights (`None`: the decoder runs in `dtype`).
    #[serde(default)]
    pub quant: Option<Quant>,
}

impl ModelSpec {
    /// `source` on the CPU in f32.
    pub fn cpu(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            device: DeviceChoice::Cpu,
            dtype: DTypeChoice::F32,
            quant: None,
        }
    }
}

/// What to do with a client's new request while one of its jobs is queued or running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// Run it after the client's earlier jobs.
    #[default]
    Queue,
    /// Cancel every earlier job of the client (running or queued), then run this one.
    Replace,
}

/// Window and stride of long-form generation, in seconds (see [`crate::longform`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSeconds {
    /// Seconds of one generation window, prompt included (at most the model's maximum).
    pub window_s: f64,
    /// Seconds each window after the first adds; later windows are prompted with the last
    /// `window_s - stride_s` seconds.
    pub stride_s: f64,
}

/// One generation: text and/or an audio prompt, continued for `duration_s` seconds, `takes`
/// times with seeds `seed`, `seed + 1`, …
///
/// Any length: what does not fit one window of the model (30 s, prompt included) is generated
/// by windowed extension; a prompt longer than fits is cut to its most recent part.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub model: ModelSpec,
    /// The text prompt; empty (or blank) for unconditional generation.
    pub text: String,
    /// Audio to continue, at any sample rate and channel count (resampled to 32 kHz and mixed to
    /// the model's channels by the service). `None` for text-only generation.
    pub prompt: Option<Audio>,
    /// Length of the new audio in seconds (rounded to whole 50 Hz frames, at least one).
    pub duration_s: f64,
    pub sampling: SamplingParams,
    /// Seed of the first take; take `i` uses `seed + i`.
    pub seed: u64,
    /// Number of takes generated together in one batch (at least 1).
    pub takes: usize,
    /// Send the continuation in [`EventKind::Chunk`]s while it is generated.
    pub stream: bool,
    /// Long-form window and stride; `None`: the authors' 30 s and 18 s.
    pub window: Option<WindowSeconds>,
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// A message from the service about one job. Every job ends with exactly one terminal event
/// ([`EventKind::is_terminal`]); events of one job arrive in the order they happened.
#[derive(Clone, Debug)]
pub struct Event {
    pub job: JobId,
    pub kind: EventKind,
}

/// Stages of getting a model ready.
#[derive(Clone, Debug, PartialEq)]
pub enum LoadStage {
    /// A file is being downloaded from the Hub (`bytes` so far of `total`).
    Downloading {
        file: String,
        bytes: u64,
        total: Option<u64>,
    },
    /// A file finished downloading (or was found complete in the cache).
    Downloaded { file: String },
    /// Reading the weights into memory.
    Loading,
}

/// What happened.
#[derive(Clone, Debug)]
pub enum EventKind {
    /// The inference thread began working on the job.
    Started,
    /// Progress of getting the job's model ready (only when it was not loaded yet).
    Load(LoadStage),
    /// The requested device is unavailable; the model runs on the CPU instead.
    DeviceFallback {
        requested: DeviceChoice,
        reason: String,
    },
    /// The job's model is loaded and usable (the job goes on).
    ModelReady(ModelInfo),
    /// A [`Client::load`] job is done: the model is loaded and held for the client. Terminal.
    Loaded,
    /// Decoded continuation of one take while it is generated (streaming requests only):
    /// `audio` (32 kHz, the model's channels) starts `offset` samples after the start of the
    /// continuation. Chunks of a take arrive in order and tile it without gaps or overlaps;
    /// together they are exactly the take's [`Take::continuation`] in [`EventKind::Finished`].
    Chunk {
        take: usize,
        offset: usize,
        audio: Audio,
    },
    /// One decoder step is done (`step` of `total`, 1-based, over the whole take: every
    /// window of a long one).
    Progress {
        step: usize,
        total: usize,
        steps_per_s: f64,
    },
    /// The generation finished: one take per requested take, in seed order. Terminal.
    Finished(Vec<Take>),
    /// The job failed; a readable, one-paragraph reason. Terminal.
    Failed(String),
    /// The job was cancelled before it finished. Terminal.
    Cancelled,
}

impl EventKind {
    /// Whether this ends its job.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Loaded | Self::Finished(_) | Self::Failed(_) | Self::Cancelled
        )
    }
}

/// A loaded model, as events report it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub spec: ModelSpec,
    /// The device it runs on, in words (`"cpu"`, `"cuda:0"`).
    pub device: String,
    /// Audio channels it generates (1 or 2).
    pub channels: usize,
    /// The most audio (prompt included) one generation window may hold, in seconds. Longer
    /// requests are generated window by window (see [`GenerateRequest`]).
    pub max_duration_s: f64,
    /// Whether the weights were loaded by this job (false: shared with an earlier one).
    pub freshly_loaded: bool,
    /// The checkpoint's own sampling defaults (`generation_config.json`).
    pub defaults: GenerationConfig,
}

/// One finished take: the new audio and how it was made.
#[derive(Clone, Debug)]
pub struct Take {
    /// The decode of every code, prompt first, 32 kHz, the model's channels;
    /// [`Take::continuation`] is the new part.
    pub audio: Audio,
    /// Samples of `audio` that belong to the prompt.
    pub prompt_samples: usize,
    /// Every undelayed code, prompt first: `(codebooks, prompt_frames + new frames)` (stereo
    /// interleaved left/right). What an "extend" continues from, and what a streaming decode
    /// re-decodes.
    pub codes: Vec<Vec<u32>>,
    /// Frames of `codes` that belong to the prompt.
    pub prompt_frames: usize,
    pub meta: TakeMeta,
}

/// How a take was made, for the take list and for reproducing it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TakeMeta {
    pub model: String,
    pub text: String,
    pub seed: u64,
    pub sampling: SamplingParams,
    /// Seconds of prompt audio the take continues (0 for text-only).
    pub prompt_s: f64,
    /// Seconds of new audio.
    pub duration_s: f64,
    /// Wall-clock seconds the whole batch took, its decoder steps and their speed.
    pub generation_s: f64,
    pub steps: usize,
    pub steps_per_s: f64,
    pub device: String,
    /// The text was longer than the tokenizer's limit and was cut.
    pub text_truncated: bool,
}

impl Take {
    /// Only the new audio (after the prompt).
    pub fn continuation(&self) -> Audio {
        self.audio.from_frame(self.prompt_samples)
    }
}

// ---------------------------------------------------------------------------------------------
// Engine and clients
// ---------------------------------------------------------------------------------------------

/// Counters for tests, benchmarks and the editor's status line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Times model weights were read from disk since the engine started.
    pub loads: usize,
    /// Models held in memory now.
    pub loaded_models: usize,
    /// Jobs waiting.
    pub queued: usize,
    /// Whether a job is running.
    pub running: bool,
    /// Decoder steps done by the running job (0 when none runs or it has not started decoding).
    pub running_step: usize,
}

enum Work {
    Load(ModelSpec),
    Generate(Box<GenerateRequest>),
    /// Panics inside the job (tests of the thread's resilience only).
    #[cfg(test)]
    Panic,
}

struct Job {
    id: JobId,
    client: ClientId,
    work: Work,
    cancel: Arc<AtomicBool>,
    /// Decoder steps done, for [`EngineStats::running_step`].
    step: Arc<AtomicUsize>,
    events: Sender<Event>,
}

struct Running {
    id: JobId,
    client: ClientId,
    cancel: Arc<AtomicBool>,
    step: Arc<AtomicUsize>,
}

struct ModelEntry {
    model: Arc<LoadedModel>,
    holders: HashSet<ClientId>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    running: Option<Running>,
    models: HashMap<ModelSpec, ModelEntry>,
    /// Clients alive now: a model is held only for these (a client dropped while its job was
    /// loading must not end up holding the model forever).
    clients: HashSet<ClientId>,
    shutdown: bool,
}

/// What the engine thread and every client share.
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    next_job: AtomicU64,
    next_client: AtomicU64,
    loads: AtomicUsize,
}

impl Shared {
    fn drop_unheld_models(state: &mut State) {
        state.models.retain(|_, e| !e.holders.is_empty());
    }
}

/// The inference service: owns one inference thread and the loaded models. Dropping it cancels
/// what runs (within one decoder step), fails what waits, and joins the thread.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts a new engine with its own thread and no models loaded.
    pub fn new() -> Result<Self, ServiceError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            next_job: AtomicU64::new(1),
            next_client: AtomicU64::new(1),
            loads: AtomicUsize::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("segue-inference".into())
            .spawn(move || worker_loop(&worker))
            .map_err(ServiceError::Spawn)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The engine shared by everything in this process (every plugin instance), started on
    /// first use and stopped when the last `Arc` is dropped, so a host that unloads the plugin
    /// library finds no thread of ours running.
    pub fn shared() -> Result<Arc<Engine>, ServiceError> {
        static SHARED: OnceLock<Mutex<std::sync::Weak<Engine>>> = OnceLock::new();
        let slot = SHARED.get_or_init(|| Mutex::new(std::sync::Weak::new()));
        let mut weak = slot.lock();
        if let Some(engine) = weak.upgrade() {
            return Ok(engine);
        }
        let engine = Arc::new(Engine::new()?);
        *weak = Arc::downgrade(&engine);
        Ok(engine)
    }

    /// A new client with its own event channel.
    pub fn client(&self) -> Client {
        let (tx, rx) = crossbeam_channel::unbounded();
        let id = self.shared.next_client.fetch_add(1, Ordering::Relaxed);
        self.shared.state.lock().clients.insert(id);
        Client {
            id,
            shared: self.shared.clone(),
            events_tx: tx,
            events: rx,
        }
    }

    pub fn stats(&self) -> EngineStats {
        let state = self.shared.state.lock();
        EngineStats {
            loads: self.shared.loads.load(Ordering::Relaxed),
            loaded_models: state.models.len(),
            queued: state.queue.len(),
            running: state.running.is_some(),
            running_step: state
                .running
                .as_ref()
                .map_or(0, |r| r.step.load(Ordering::Relaxed)),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        {
            let mut state = self.shared.state.lock();
            state.shutdown = true;
            if let Some(r) = &state.running {
                r.cancel.store(true, Ordering::Relaxed);
            }
            for job in state.queue.drain(..) {
                let _ = job.events.send(Event {
                    job: job.id,
                    kind: EventKind::Cancelled,
                });
            }
            state.models.clear();
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One user of the engine (a plugin instance, the CLI): sends requests, receives the events of
/// its own jobs. Cheap; dropping it cancels its jobs and releases its models.
pub struct Client {
    id: ClientId,
    shared: Arc<Shared>,
    events_tx: Sender<Event>,
    /// This client's events, in order per job. Poll with `try_recv` from a GUI timer or block
    /// with `recv_timeout`.
    pub events: Receiver<Event>,
}

impl Client {
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Loads `spec` (or takes a share of it if loaded) and holds it for this client until
    /// [`Client::unload`] or drop. Sends `ModelReady`, then ends with `Loaded`, `Failed` or `Cancelled`.
    pub fn load(&self, spec: ModelSpec, policy: Policy) -> JobId {
        self.submit(Work::Load(spec), policy)
    }

    /// Queues a generation; its model is loaded first if needed (and then held for this
    /// client, like [`Client::load`]).
    pub fn generate(&self, request: GenerateRequest, policy: Policy) -> JobId {
        self.submit(Work::Generate(Box::new(request)), policy)
    }

    #[cfg(test)]
    fn panic_job(&self) -> JobId {
        self.submit(Work::Panic, Policy::Queue)
    }

    fn submit(&self, work: Work, policy: Policy) -> JobId {
        let id = self.shared.next_job.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            id,
            client: self.id,
            work,
            cancel: Arc::new(AtomicBool::new(false)),
            step: Arc::new(AtomicUsize::new(0)),
            events: self.events_tx.clone(),
        };
        {
            let mut state = self.shared.state.lock();
            if state.shutdown {
                let _ = self.events_tx.send(Event {
                    job: id,
                    kind: EventKind::Failed("the inference engine has stopped".into()),
                });
                return id;
            }
            if policy == Policy::Replace {
                self.cancel_where(&mut state, |_| true);
            }
            state.queue.push_back(job);
        }
        self.shared.wake.notify_all();
        id
    }

    /// Cancels one of this client's jobs: a queued one at once, a running one within one
    /// decoder step. Its terminal event is `Cancelled` (unless it finished first). Unknown or
    /// finished jobs are ignored.
    pub fn cancel(&self, job: JobId) {
        let mut state = self.shared.state.lock();
        self.cancel_where(&mut state, |id| id == job);
    }

    /// Cancels every job of this client.
    pub fn cancel_all(&self) {
        let mut state = self.shared.state.lock();
        self.cancel_where(&mut state, |_| true);
    }

    fn cancel_where(&self, state: &mut State, which: impl Fn(JobId) -> bool) {
        if let Some(r) = &state.running {
            if r.client == self.id && which(r.id) {
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
        let mut kept = VecDeque::with_capacity(state.queue.len());
        for job in state.queue.drain(..) {
            if job.client == self.id && which(job.id) {
                let _ = job.events.send(Event {
                    job: job.id,
                    kind: EventKind::Cancelled,
                });
            } else {
                kept.push_back(job);
            }
        }
        state.queue = kept;
    }

    /// Lets go of this client's share of `spec`; the weights are freed when no client holds
    /// them and no job uses them.
    pub fn unload(&self, spec: &ModelSpec) {
        let mut state = self.shared.state.lock();
        if let Some(e) = state.models.get_mut(spec) {
            e.holders.remove(&self.id);
        }
        Shared::drop_unheld_models(&mut state);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock();
        self.cancel_where(&mut state, |_| true);
        state.clients.remove(&self.id);
        for e in state.models.values_mut() {
            e.holders.remove(&self.id);
        }
        Shared::drop_unheld_models(&mut state);
    }
}

// ---------------------------------------------------------------------------------------------
// The inference thread
// ---------------------------------------------------------------------------------------------

fn worker_loop(shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.state.lock();
            loop {
                if state.shutdown {
                    return;
                }
                if let Some(job) = state.queue.pop_front() {
                    state.running = Some(Running {
                        id: job.id,
                        client: job.client,
                        cancel: job.cancel.clone(),
                        step: job.step.clone(),
                    });
                    break job;
                }
                shared.wake.wait(&mut state);
            }
        };
        let send = |kind: EventKind| {
            let _ = job.events.send(Event { job: job.id, kind });
        };
        send(EventKind::Started);
        let outcome = catch_unwind(AssertUnwindSafe(|| run_job(shared, &job, &send)));
        let terminal = match outcome {
            Ok(Ok(kind)) => kind,
            Ok(Err(JobError::Cancelled)) => EventKind::Cancelled,
            Ok(Err(JobError::Failed(msg))) => EventKind::Failed(msg),
            Err(panic) => EventKind::Failed(format!(
                "internal error (the engine recovered; please report this): {}",
                panic_message(&panic)
            )),
        };
        // Not running any more before anyone hears that the job ended: a client that reads
        // the stats after the terminal event sees the engine idle.
        shared.state.lock().running = None;
        send(terminal);
        Shared::drop_unheld_models(&mut shared.state.lock());
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

enum JobError {
    Cancelled,
    Failed(String),
}

impl<E: std::fmt::Display> From<E> for JobError {
    fn from(e: E) -> Self {
        JobError::Failed(e.to_string())
    }
}

/// Runs one job on the inference thread; returns its terminal event.
fn run_job(shared: &Shared, job: &Job, send: &dyn Fn(EventKind)) -> Result<EventKind, JobError> {
    match &job.work {
        Work::Load(spec) => {
            let info = acquire_model(shared, job, spec, send)?.1;
            send(EventKind::ModelReady(info));
            Ok(EventKind::Loaded)
        }
        Work::Generate(req) => {
            let (model, info) = acquire_model(shared, job, &req.model, send)?;
            send(EventKind::ModelReady(info));
            let takes = model.generate(
                req,
                &job.cancel,
                &mut |step, total, steps_per_s| {
                    job.step.store(step, Ordering::Relaxed);
                    send(EventKind::Progress {
                        step,
                        total,
                        steps_per_s,
                    })
                },
                &mut |take, offset, audio| {
                    send(EventKind::Chunk {
                        take,
                        offset,
                        audio,
                    })
                },
            )?;
            Ok(EventKind::Finished(takes))
        }
        #[cfg(test)]
        Work::Panic => panic!("deliberate test panic"),
    }
}

/// The shared copy of `spec` (loading it if no client holds it), now also held by the job's
/// client.
fn acquire_model(
    shared: &Shared,
    job: &Job,
    spec: &ModelSpec,
    send: &dyn Fn(EventKind),
) -> Result<(Arc<LoadedModel>, ModelInfo), JobError> {
    {
        let mut state = shared.state.lock();
        let live = state.clients.contains(&job.client);
        if let Some(e) = state.models.get_mut(spec) {
            if live {
                e.holders.insert(job.client);
            }
            let mut info = e.model.info.clone();
            info.freshly_loaded = false;
            return Ok((e.model.clone(), info));
        }
    }
    if job.cancel.load(Ordering::Relaxed) {
        return Err(JobError::Cancelled);
    }
    // Loading happens without the lock: clients can queue and cancel meanwhile. Only this
    // thread loads, so no other load of the same spec can race with this one.
    let model = Arc::new(LoadedModel::load(spec, &job.cancel, send)?);
    shared.loads.fetch_add(1, Ordering::Relaxed);
    let mut state = shared.state.lock();
    if state.clients.contains(&job.client) {
        let entry = state
            .models
            .entry(spec.clone())
            .or_insert_with(|| ModelEntry {
                model: model.clone(),
                holders: HashSet::new(),
            });
        entry.holders.insert(job.client);
    }
    let info = model.info.clone();
    Ok((model, info))
}

// ---------------------------------------------------------------------------------------------
// The model behind the service: MusicGen and its codec on one device
// ---------------------------------------------------------------------------------------------

/// A checkpoint ready to generate (the MusicGen LM and its EnCodec, on one device). Immutable;
/// shared between jobs and clients through an `Arc`.
struct LoadedModel {
    musicgen: Musicgen,
    info: ModelInfo,
}

/// The candle device for `choice`, and why the CPU stands in for it when it does.
fn resolve_device(choice: DeviceChoice) -> (Device, Option<String>) {
    let fallback = |what: &str, err: candle_core::Error| {
        (
            Device::Cpu,
            Some(format!(
                "{what} is not available ({err}); running on the CPU"
            )),
        )
    };
    match choice {
        DeviceChoice::Cpu => (Device::Cpu, None),
        DeviceChoice::Cuda(i) => match Device::new_cuda(i) {
            Ok(d) => (d, None),
            Err(e) => fallback(&format!("CUDA GPU {i}"), e),
        },
        DeviceChoice::Metal => match Device::new_metal(0) {
            Ok(d) => (d, None),
            Err(e) => fallback("the Metal GPU", e),
        },
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return (d, None);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return (d, None);
                }
            }
            (Device::Cpu, None)
        }
    }
}

fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Bytes of memory available to a new allocation, where the system says (Linux), else `None`.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Refuses a load that cannot fit in memory, before it starts: running out of memory half-way
/// would abort the whole process (and the musician's DAW with it).
fn check_memory(files: &ModelFiles, dtype: DType, device: &Device) -> Result<(), JobError> {
    if !device.is_cpu() {
        return Ok(()); // GPU memory errors come back from the driver as ordinary errors.
    }
    let stored: u64 = files
        .weights
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    // The checkpoints store f32; half-precision decoder weights take about half.
    let needed = match dtype {
        DType::F32 => stored,
        _ => stored / 2 + stored / 8,
    };
    if let Some(available) = available_memory() {
        if needed > available {
            const GIB: f64 = (1u64 << 30) as f64;
            return Err(JobError::Failed(format!(
                "not enough memory to load {}: it needs about {:.1} GiB and {:.1} GiB are free; \
                 close other programs or choose a smaller model",
                files.dir.display(),
                needed as f64 / GIB,
                available as f64 / GIB
            )));
        }
    }
    Ok(())
}

impl LoadedModel {
    fn load(
        spec: &ModelSpec,
        cancel: &AtomicBool,
        send: &dyn Fn(EventKind),
    ) -> Result<Self, JobError> {
        let (device, fallback) = resolve_device(spec.device);
        if let Some(reason) = fallback {
            send(EventKind::DeviceFallback {
                requested: spec.device,
                reason,
            });
        }
        let files = hub::resolve(&spec.source, &mut |p| {
            send(EventKind::Load(match p {
                HubProgress::Downloading { file, bytes, total } => {
                    LoadStage::Downloading { file, bytes, total }
                }
                HubProgress::Done { file } => LoadStage::Downloaded { file },
            }))
        })
        .map_err(|e| JobError::Failed(format!("model {}: {e}", spec.source)))?;
        if cancel.load(Ordering::Relaxed) {
            return Err(JobError::Cancelled);
        }
        let dtype = match spec.dtype {
            DTypeChoice::F32 => DType::F32,
            DTypeChoice::F16 => DType::F16,
            DTypeChoice::Bf16 => DType::BF16,
        };
        check_memory(&files, dtype, &device)?;
        send(EventKind::Load(LoadStage::Loading));
        let musicgen = Musicgen::load_with(&files, dtype, &device, spec.quant)
            .map_err(|e| JobError::Failed(format!("model {}: {e}", spec.source)))?;
        let info = ModelInfo {
            spec: spec.clone(),
            device: device_name(&device),
            channels: musicgen.channels(),
            max_duration_s: musicgen.max_frames() as f64 / musicgen.frame_rate(),
            freshly_loaded: true,
            defaults: musicgen.generation_config().clone(),
        };
        Ok(Self { musicgen, info })
    }

    /// Runs one generation request to finished takes. `progress(step, total, steps_per_s)`
    /// after every decoder step; `chunk(take, offset, audio)` for every streamed chunk;
    /// `cancel` is read after every step.
    fn generate(
        &self,
        req: &GenerateRequest,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(usize, usize, f64),
        chunk: &mut dyn FnMut(usize, usize, Audio),
    ) -> Result<Vec<Take>, JobError> {
        let started = Instant::now();
        if !(req.duration_s.is_finite() && req.duration_s > 0.0) {
            return Err(JobError::Failed(format!(
                "the continuation length must be a positive number of seconds (got {})",
                req.duration_s
            )));
        }
        if let Some(prompt) = &req.prompt {
            let bad = prompt.non_finite_count();
            if bad > 0 {
                return Err(JobError::Failed(format!(
                    "the prompt audio has {bad} samples that are not numbers (NaN or infinity)"
                )));
            }
        }
        let new_frames = ((req.duration_s * self.musicgen.frame_rate()).round() as usize).max(1);
        let audio_request = AudioRequest {
            text: req.text.clone(),
            prompt: req.prompt.clone(),
            new_frames,
            sampling: req.sampling.clone(),
            seed: req.seed,
            takes: req.takes,
        };
        let mut opts = LongOptions::for_model(&self.musicgen);
        if let Some(w) = req.window {
            opts.window =
                WindowConfig::from_seconds(w.window_s, w.stride_s, self.musicgen.frame_rate())?;
        }
        if req.stream {
            opts.stream = Some(StreamConfig::default());
        }
        let out = generate_long_audio(
            &self.musicgen,
            &audio_request,
            &opts,
            &mut |info| {
                if cancel.load(Ordering::Relaxed) {
                    return Control::Stop;
                }
                let secs = info.elapsed.as_secs_f64();
                let rate = if secs > 0.0 {
                    info.step as f64 / secs
                } else {
                    0.0
                };
                progress(info.step, info.total, rate);
                Control::Continue
            },
            &mut |c| {
                for (take, audio) in c.audio.iter().enumerate() {
                    chunk(take, c.offset, audio.clone());
                }
            },
        );
        let out = match out {
            Ok(out) => out,
            Err(GenerateError::Cancelled { .. }) => return Err(JobError::Cancelled),
            Err(e) => return Err(JobError::Failed(e.to_string())),
        };
        let (out, prompt_s) = out;
        let generation_s = started.elapsed().as_secs_f64();
        let steps_per_s = out.timings.generate.steps_per_second(out.steps);
        Ok(out
            .takes
            .into_iter()
            .map(|take| Take {
                meta: TakeMeta {
                    model: req.model.source.clone(),
                    text: req.text.clone(),
                    seed: take.seed,
                    sampling: req.sampling.clone(),
                    prompt_s,
                    duration_s: (take.audio.frames() - take.prompt_samples) as f64
                        / f64::from(take.audio.sample_rate),
                    generation_s,
                    steps: out.steps,
                    steps_per_s,
                    device: self.info.device.clone(),
                    text_truncated: out.text_truncated,
                },
                audio: take.audio,
                prompt_samples: take.prompt_samples,
                codes: take.codes,
                prompt_frames: out.prompt_frames,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    //! The real service on the tiny fixture checkpoints (random weights, real topology).

    use super::*;
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(120);

    fn fixture(name: &str) -> String {
        format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn mono() -> ModelSpec {
        ModelSpec::cpu(fixture("tiny-musicgen-mono"))
    }

    fn request(duration_s: f64) -> GenerateRequest {
        GenerateRequest {
            model: mono(),
            text: "calm lo-fi piano".into(),
            prompt: None,
            duration_s,
            sampling: SamplingParams::default(),
            seed: 7,
            takes: 1,
            stream: false,
            window: None,
        }
    }

    /// Every event of `job` up to and including its terminal one; fails on a timeout.
    fn events_of(client: &Client, job: JobId) -> Vec<EventKind> {
        let mut out = Vec::new();
        loop {
            let ev = client
                .events
                .recv_timeout(TIMEOUT)
                .expect("the job's events stopped before its terminal event");
            if ev.job != job {
                continue;
            }
            let terminal = ev.kind.is_terminal();
            out.push(ev.kind);
            if terminal {
                return out;
            }
        }
    }

    /// Events of several jobs of one client, grouped per job, until each has ended.
    fn drain_jobs(client: &Client, jobs: &[JobId]) -> HashMap<JobId, Vec<EventKind>> {
        let mut per: HashMap<JobId, Vec<EventKind>> = HashMap::new();
        let mut open: HashSet<JobId> = jobs.iter().copied().collect();
        let mut order = Vec::new();
        while !open.is_empty() {
            let ev = client.events.recv_timeout(TIMEOUT).expect("events stopped");
            assert!(
                !per.get(&ev.job)
                    .is_some_and(|v| v.last().is_some_and(EventKind::is_terminal)),
                "job {} sent {:?} after its terminal event",
                ev.job,
                ev.kind
            );
            if ev.kind.is_terminal() {
                open.remove(&ev.job);
            }
            order.push(ev.job);
            per.entry(ev.job).or_default().push(ev.kind);
        }
        per
    }

    #[test]
    fn generation_finishes_with_one_take_per_seed() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        let mut req = request(0.3);
        req.takes = 2;
        let job = client.generate(req, Policy::Queue);
        let events = events_of(&client, job);
        assert!(matches!(events[0], EventKind::Started), "{:?}", events[0]);
        let steps: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                EventKind::Progress { step, .. } => Some(*step),
                _ => None,
            })
            .collect();
        assert!(!steps.is_empty());
        assert!(
            steps.windows(2).all(|w| w[1] == w[0] + 1),
            "steps out of order: {steps:?}"
        );
        let EventKind::Finished(takes) = events.last().unwrap() else {
            panic!("expected Finished, got {:?}", events.last());
        };
        assert_eq!(takes.len(), 2);
        assert_eq!(takes[0].meta.seed, 7);
        assert_eq!(takes[1].meta.seed, 8);
        for take in takes {
            assert_eq!(take.audio.sample_rate, 32_000);
            assert_eq!(take.audio.channels.len(), 1);
            // 0.3 s = 15 frames of 640 samples, after no prompt.
            assert_eq!(take.prompt_samples, 0);
            assert_eq!(take.continuation().frames(), 15 * 640);
            assert_eq!(take.codes[0].len(), 15);
            assert!(take.audio.channels[0].iter().all(|s| s.is_finite()));
        }
        assert_ne!(
            takes[0].audio, takes[1].audio,
            "different seeds gave identical takes"
        );
    }

    /// A streamed request longer than its window: progress over the whole take, chunks of
    /// every take that tile its continuation and are exactly the finished take.
    #[test]
    fn streamed_long_generation_sends_chunks_that_are_the_take() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        let mut req = request(4.0);
        req.takes = 2;
        req.stream = true;
        req.window = Some(WindowSeconds {
            window_s: 2.0,
            stride_s: 1.2,
        });
        let job = client.generate(req, Policy::Queue);
        let events = events_of(&client, job);
        let EventKind::Finished(takes) = events.last().unwrap() else {
            panic!("expected Finished, got {:?}", events.last());
        };
        // 200 frames in windows of 100, 60 and 40 new frames, 3 delay steps each.
        let progress: Vec<(usize, usize)> = events
            .iter()
            .filter_map(|e| match e {
                EventKind::Progress { step, total, .. } => Some((*step, *total)),
                _ => None,
            })
            .collect();
        assert_eq!(progress, (1..=209).map(|s| (s, 209)).collect::<Vec<_>>());
        for (t, take) in takes.iter().enumerate() {
            assert_eq!(take.codes[0].len(), 200);
            let mut at = 0;
            let mut audio: Vec<f32> = Vec::new();
            for e in &events {
                if let EventKind::Chunk {
                    take: ct,
                    offset,
                    audio: a,
                } = e
                {
                    if *ct == t {
                        assert_eq!(*offset, at);
                        at += a.frames();
                        audio.extend_from_slice(&a.channels[0]);
                    }
                }
            }
            assert_eq!(at, 200 * 640);
            assert_eq!(audio, take.continuation().channels[0]);
        }
        // Without streaming: no chunks, the same takes.
        let mut plain = request(4.0);
        plain.takes = 2;
        plain.window = Some(WindowSeconds {
            window_s: 2.0,
            stride_s: 1.2,
        });
        let job = client.generate(plain, Policy::Queue);
        let events = events_of(&client, job);
        assert!(!events.iter().any(|e| matches!(e, EventKind::Chunk { .. })));
        let EventKind::Finished(again) = events.last().unwrap() else {
            panic!("expected Finished");
        };
        for (a, b) in takes.iter().zip(again) {
            assert_eq!(a.audio, b.audio);
        }
    }

    #[test]
    fn same_seed_gives_same_audio_and_prompted_stereo_works() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        let prompt = Audio {
            sample_rate: 44_100,
            channels: vec![
                (0..9000).map(|i| (i as f32 * 0.03).sin() * 0.5).collect(),
                (0..9000).map(|i| (i as f32 * 0.05).sin() * 0.4).collect(),
            ],
        };
        let mut req = request(0.2);
        req.model = ModelSpec::cpu(fixture("tiny-musicgen-stereo"));
        req.prompt = Some(prompt);
        let a = client.generate(req.clone(), Policy::Queue);
        let b = client.generate(req, Policy::Queue);
        let take = |job| match events_of(&client, job).pop() {
            Some(EventKind::Finished(mut t)) => t.remove(0),
            other => panic!("expected Finished, got {other:?}"),
        };
        let (ta, tb) = (take(a), take(b));
        assert_eq!(ta.audio.channels.len(), 2);
        // 9000 samples at 44.1 kHz = 6531 at 32 kHz = 11 frames (rounded up) of prompt.
        assert_eq!(ta.prompt_frames, 11);
        assert_eq!(ta.prompt_samples, 11 * 640);
        assert_eq!(ta.continuation().frames(), 10 * 640);
        assert_eq!(ta.codes.len(), 8);
        assert_eq!(ta.codes[0].len(), 21);
        assert!((ta.meta.prompt_s - 9000.0 / 44_100.0).abs() < 1e-9);
        assert_eq!(
            ta.audio, tb.audio,
            "same seed and inputs must give the same audio"
        );
        assert_eq!(
            engine.stats().loads,
            1,
            "the second job must reuse the loaded model"
        );
    }

    #[test]
    fn cancel_lands_within_one_step() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        let job = client.generate(request(20.0), Policy::Queue);
        // Wait until decoding is under way.
        loop {
            let ev = client.events.recv_timeout(TIMEOUT).unwrap();
            assert!(
                !ev.kind.is_terminal(),
                "ended before it could be cancelled: {:?}",
                ev.kind
            );
            if matches!(ev.kind, EventKind::Progress { step, .. } if step >= 3) {
                break;
            }
        }
        let step_at_cancel = engine.stats().running_step;
        client.cancel(job);
        let rest = events_of(&client, job);
        assert!(
            matches!(rest.last(), Some(EventKind::Cancelled)),
            "{:?}",
            rest.last()
        );
        let last_step = rest
            .iter()
            .filter_map(|e| match e {
                EventKind::Progress { step, .. } => Some(*step),
                _ => None,
            })
            .max()
            .unwrap_or(step_at_cancel);
        assert!(
            last_step <= step_at_cancel + 1,
            "cancelled at step {step_at_cancel} but decoding went on to step {last_step}"
        );
        assert!(!engine.stats().running);
    }

    #[test]
    fn queue_runs_in_order_and_replace_cancels_earlier_jobs() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        // Queue: the second job starts only after the first has ended.
        let first = client.generate(request(0.2), Policy::Queue);
        let second = client.generate(request(0.2), Policy::Queue);
        let mut seen = Vec::new();
        while seen
            .iter()
            .filter(|(_, k): &&(JobId, EventKind)| k.is_terminal())
            .count()
            < 2
        {
            let ev = client.events.recv_timeout(TIMEOUT).unwrap();
            seen.push((ev.job, ev.kind));
        }
        let first_end = seen
            .iter()
            .position(|(j, k)| *j == first && k.is_terminal())
            .unwrap();
        let second_start = seen
            .iter()
            .position(|(j, k)| *j == second && matches!(k, EventKind::Started))
            .unwrap();
        assert!(
            second_start > first_end,
            "the queued job started before the first ended"
        );

        // Replace: a long running job and a queued one are cancelled; the new one runs.
        let long = client.generate(request(20.0), Policy::Queue);
        let queued = client.generate(request(20.0), Policy::Queue);
        loop {
            let ev = client.events.recv_timeout(TIMEOUT).unwrap();
            if ev.job == long && matches!(ev.kind, EventKind::Progress { .. }) {
                break;
            }
        }
        let replacement = client.generate(request(0.2), Policy::Replace);
        let per = drain_jobs(&client, &[long, queued, replacement]);
        assert!(matches!(per[&long].last(), Some(EventKind::Cancelled)));
        assert_eq!(
            per[&queued].len(),
            1,
            "a queued job must end without starting"
        );
        assert!(matches!(per[&queued][0], EventKind::Cancelled));
        assert!(matches!(
            per[&replacement].last(),
            Some(EventKind::Finished(_))
        ));
    }

    #[test]
    fn clients_share_one_loaded_model_until_the_last_lets_go() {
        let engine = Engine::new().unwrap();
        let (a, b) = (engine.client(), engine.client());
        let ja = a.load(mono(), Policy::Queue);
        let ea = events_of(&a, ja);
        let jb = b.load(mono(), Policy::Queue);
        let eb = events_of(&b, jb);
        assert!(matches!(ea.last(), Some(EventKind::Loaded)));
        assert!(matches!(eb.last(), Some(EventKind::Loaded)));
        let ready = |evs: &[EventKind]| {
            evs.iter()
                .find_map(|e| match e {
                    EventKind::ModelReady(i) => Some(i.clone()),
                    _ => None,
                })
                .expect("no ModelReady event")
        };
        assert!(ready(&ea).freshly_loaded);
        assert!(!ready(&eb).freshly_loaded);
        assert_eq!(ready(&ea).device, "cpu");
        assert!((ready(&ea).max_duration_s - 30.0).abs() < 1e-9);
        assert_eq!(
            engine.stats().loads,
            1,
            "two clients must share one copy of the weights"
        );
        assert_eq!(engine.stats().loaded_models, 1);
        a.unload(&mono());
        assert_eq!(engine.stats().loaded_models, 1, "b still holds the model");
        drop(b);
        assert_eq!(engine.stats().loaded_models, 0, "the last holder let go");
        let again = a.load(mono(), Policy::Queue);
        events_of(&a, again);
        assert_eq!(engine.stats().loads, 2);
    }

    #[test]
    fn failing_and_panicking_jobs_do_not_kill_the_service() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        let mut bad = request(0.2);
        bad.model = ModelSpec::cpu(fixture("no-such-model"));
        let missing = client.generate(bad, Policy::Queue);
        let panicking = client.panic_job();
        let mut zero = request(0.2);
        zero.takes = 0;
        let no_takes = client.generate(zero, Policy::Queue);
        let good = client.generate(request(0.2), Policy::Queue);
        let per = drain_jobs(&client, &[missing, panicking, no_takes, good]);
        match per[&missing].last() {
            Some(EventKind::Failed(msg)) => assert!(msg.contains("no-such-model"), "{msg}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        match per[&panicking].last() {
            Some(EventKind::Failed(msg)) => assert!(msg.contains("deliberate test panic"), "{msg}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        match per[&no_takes].last() {
            Some(EventKind::Failed(msg)) => assert!(msg.contains("take"), "{msg}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(matches!(per[&good].last(), Some(EventKind::Finished(_))));
    }

    #[test]
    fn events_are_ordered_with_exactly_one_terminal_per_job() {
        let engine = Engine::new().unwrap();
        let (a, b) = (engine.client(), engine.client());
        let ja: Vec<JobId> = (0..3)
            .map(|_| a.generate(request(0.1), Policy::Queue))
            .collect();
        let jb: Vec<JobId> = (0..2)
            .map(|_| b.generate(request(0.1), Policy::Queue))
            .collect();
        a.cancel(ja[2]);
        for (client, jobs) in [(&a, &ja), (&b, &jb)] {
            let per = drain_jobs(client, jobs);
            for job in jobs {
                let evs = &per[job];
                assert_eq!(evs.iter().filter(|e| e.is_terminal()).count(), 1, "{evs:?}");
                assert!(evs.last().unwrap().is_terminal());
                if !matches!(evs[0], EventKind::Cancelled) {
                    assert!(matches!(evs[0], EventKind::Started), "{evs:?}");
                }
            }
            assert!(
                client.events.try_recv().is_err(),
                "events after every job ended"
            );
        }
    }

    #[test]
    fn unavailable_device_falls_back_to_cpu_and_says_so() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        // No machine has a 65th GPU (and builds without the `cuda` feature have none at all).
        let spec = ModelSpec {
            device: DeviceChoice::Cuda(64),
            ..mono()
        };
        let job = client.load(spec, Policy::Queue);
        let evs = events_of(&client, job);
        assert!(
            evs.iter()
                .any(|e| matches!(e, EventKind::DeviceFallback { .. })),
            "{evs:?}"
        );
        assert!(evs
            .iter()
            .any(|e| matches!(e, EventKind::ModelReady(i) if i.device == "cpu")));
        assert!(matches!(evs.last(), Some(EventKind::Loaded)));
    }

    #[test]
    fn dropping_the_engine_stops_a_running_job_promptly() {
        let engine = Engine::new().unwrap();
        let client = engine.client();
        let job = client.generate(request(25.0), Policy::Queue);
        loop {
            let ev = client.events.recv_timeout(TIMEOUT).unwrap();
            if matches!(ev.kind, EventKind::Progress { .. }) {
                break;
            }
        }
        let t = Instant::now();
        drop(engine);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "drop waited {:?}",
            t.elapsed()
        );
        let rest = events_of(&client, job);
        assert!(matches!(rest.last(), Some(EventKind::Cancelled)));
        let late = client.generate(request(0.1), Policy::Queue);
        assert!(matches!(
            events_of(&client, late).last(),
            Some(EventKind::Failed(_))
        ));
    }
}
