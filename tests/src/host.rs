//! The host: a loaded plugin binary ([`PluginLibrary`]) and plugin instances ([`PluginInstance`]).
//!
//! One [`PluginInstance`] is one plugin instance plus everything a host keeps for it: the host
//! callbacks, the audio buffers (preallocated at activation for the maximum block size, for the
//! plugin's main stereo input, stereo sidechain input and stereo output), event queues, and the
//! editor window while it is open. Everything happens on the thread that created the instance,
//! which plays both the host's main thread and its audio thread; CLAP allows that as long as calls
//! do not overlap, and it keeps tests deterministic.
//!
//! Main-thread callbacks the plugin requests (`request_callback`) are delivered whenever the host
//! gets control back: after every processed block and while waiting for the editor.

use crate::gui::{EditorWindow, Screenshot, XServer};
use crate::locate;
use crate::transport::Transport;
use anyhow::{anyhow, bail, ensure, Context, Result};
use clack_extensions::audio_ports::{AudioPortInfoBuffer, PluginAudioPorts};
use clack_extensions::gui::{
    GuiApiType, GuiConfiguration, GuiSize, HostGui, HostGuiImpl, PluginGui, Window as ClapWindow,
};
use clack_extensions::latency::{HostLatency, HostLatencyImpl};
use clack_extensions::log::{HostLog, HostLogImpl, LogSeverity};
use clack_extensions::note_ports::{NoteDialect, NotePortInfoBuffer, PluginNotePorts};
use clack_extensions::params::{
    HostParams, HostParamsImplMainThread, HostParamsImplShared, ParamClearFlags, ParamInfoBuffer,
    ParamRescanFlags, PluginParams,
};
use clack_extensions::render::{PluginRender, RenderMode};
use clack_extensions::state::{HostState, HostStateImpl, PluginState};
use clack_host::events::event_types::{NoteOffEvent, NoteOnEvent, ParamValueEvent};
use clack_host::events::Match;
use clack_host::prelude::*;
use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Two channels of audio, left then right.
pub type StereoBuffer = [Vec<f32>; 2];

/// An event the host sends into a processed block. `time` is the sample offset inside the block
/// for [`PluginInstance::process_block`], and the absolute sample position for
/// [`crate::render()`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HostEvent {
    /// A parameter change. `value` is the CLAP value, which nice-plug normalises to `0..=1`.
    Param {
        /// Sample position.
        time: u32,
        /// CLAP parameter id; see [`crate::clap_param_id`].
        id: u32,
        /// Normalised value, `0..=1`.
        value: f64,
    },
    /// A note starts.
    NoteOn {
        /// Sample position.
        time: u32,
        /// MIDI channel, 0..=15.
        channel: u8,
        /// MIDI key, 0..=127.
        key: u8,
        /// Velocity, 0..=1.
        velocity: f64,
    },
    /// A note ends.
    NoteOff {
        /// Sample position.
        time: u32,
        /// MIDI channel, 0..=15.
        channel: u8,
        /// MIDI key, 0..=127.
        key: u8,
        /// Release velocity, 0..=1.
        velocity: f64,
    },
    /// The transport changes inside the block (a seek, a loop wrap, a tempo change).
    Transport {
        /// Sample position.
        time: u32,
        /// The transport from this sample on.
        transport: Transport,
    },
}

impl HostEvent {
    /// A change of the parameter with string id `id` (`#[id = "..."]`) to normalised `value`.
    pub fn param(time: u32, id: &str, value: f64) -> Self {
        HostEvent::Param {
            time,
            id: crate::clap_param_id(id),
            value,
        }
    }

    /// The event's sample position.
    pub fn time(&self) -> u32 {
        match *self {
            HostEvent::Param { time, .. }
            | HostEvent::NoteOn { time, .. }
            | HostEvent::NoteOff { time, .. }
            | HostEvent::Transport { time, .. } => time,
        }
    }

    /// The same event at another sample position.
    pub fn at(mut self, new_time: u32) -> Self {
        match &mut self {
            HostEvent::Param { time, .. }
            | HostEvent::NoteOn { time, .. }
            | HostEvent::NoteOff { time, .. }
            | HostEvent::Transport { time, .. } => *time = new_time,
        }
        self
    }

    fn push_to(&self, buffer: &mut EventBuffer) -> Result<()> {
        match *self {
            HostEvent::Param { time, id, value } => {
                let id = ClapId::from_raw(id).ok_or_else(|| anyhow!("invalid param id {id}"))?;
                buffer.push(&ParamValueEvent::new(time, id, Pckn::match_all(), value));
            }
            HostEvent::NoteOn {
                time,
                channel,
                key,
                velocity,
            } => buffer.push(&NoteOnEvent::new(
                time,
                Pckn::new(0u16, channel as u16, key as u16, Match::All),
                velocity,
            )),
            HostEvent::NoteOff {
                time,
                channel,
                key,
                velocity,
            } => buffer.push(&NoteOffEvent::new(
                time,
                Pckn::new(0u16, channel as u16, key as u16, Match::All),
                velocity,
            )),
            HostEvent::Transport { time, transport } => buffer.push(&transport.to_clap(time)),
        }
        Ok(())
    }
}

/// What the plugin told the host through its callbacks. Shared between threads, so everything is
/// atomic or locked; tests read it through [`PluginInstance::host_state`].
#[derive(Default)]
pub struct HostShared {
    callback_requested: AtomicBool,
    restart_requested: AtomicBool,
    process_requested: AtomicBool,
    flush_requested: AtomicBool,
    /// The editor told the host it was closed (`clap_host_gui.closed`).
    pub gui_closed: AtomicBool,
    /// Sizes the editor asked for through `clap_host_gui.request_resize`, in physical pixels.
    pub resize_requests: Mutex<Vec<(u32, u32)>>,
    /// Every message the plugin logged through `clap_host_log`, with its severity.
    pub log: Mutex<Vec<(String, String)>>,
    /// How often the plugin marked its state dirty (`clap_host_state.mark_dirty`).
    pub dirty_marks: AtomicU32,
    /// How often the plugin asked for a parameter rescan.
    pub param_rescans: AtomicU32,
}

impl<'a> SharedHandler<'a> for HostShared {
    fn request_restart(&self) {
        self.restart_requested.store(true, Ordering::SeqCst);
    }
    fn request_process(&self) {
        self.process_requested.store(true, Ordering::SeqCst);
    }
    fn request_callback(&self) {
        self.callback_requested.store(true, Ordering::SeqCst);
    }
}

impl HostLogImpl for HostShared {
    fn log(&self, severity: LogSeverity, message: &str) {
        eprintln!("[segue {severity}] {message}");
        if let Ok(mut log) = self.log.lock() {
            log.push((severity.to_string(), message.to_owned()));
        }
    }
}

impl HostGuiImpl for HostShared {
    fn resize_hints_changed(&self) {}

    fn request_resize(&self, new_size: GuiSize) -> Result<(), HostError> {
        self.resize_requests
            .lock()
            .map_err(|_| HostError::Message("resize log poisoned"))?
            .push((new_size.width, new_size.height));
        Ok(())
    }

    fn request_show(&self) -> Result<(), HostError> {
        Ok(())
    }

    fn request_hide(&self) -> Result<(), HostError> {
        Ok(())
    }

    fn closed(&self, _was_destroyed: bool) {
        self.gui_closed.store(true, Ordering::SeqCst);
    }
}

impl HostParamsImplShared for HostShared {
    fn request_flush(&self) {
        self.flush_requested.store(true, Ordering::SeqCst);
    }
}

/// The host's main-thread side of one instance.
pub struct HostMainThread<'a> {
    shared: &'a HostShared,
    latency_changes: Cell<u32>,
}

impl<'a> MainThreadHandler<'a> for HostMainThread<'a> {}

impl HostParamsImplMainThread for HostMainThread<'_> {
    fn rescan(&self, _flags: ParamRescanFlags) {
        self.shared.param_rescans.fetch_add(1, Ordering::SeqCst);
    }
    fn clear(&self, _param_id: ClapId, _flags: ParamClearFlags) {}
}

impl HostStateImpl for HostMainThread<'_> {
    fn mark_dirty(&self) {
        self.shared.dirty_marks.fetch_add(1, Ordering::SeqCst);
    }
}

impl HostLatencyImpl for HostMainThread<'_> {
    fn changed(&self) {
        self.latency_changes.set(self.latency_changes.get() + 1);
    }
}

/// The host type: which host extensions exist and who handles them.
pub struct TestHost;

impl HostHandlers for TestHost {
    type Shared<'a> = HostShared;
    type MainThread<'a> = HostMainThread<'a>;
    type AudioProcessor<'a> = ();

    fn declare_extensions(builder: &mut HostExtensions<Self>, _shared: &Self::Shared<'_>) {
        // The GUI host extension is required: nice-plug's CLAP wrapper expects it as soon as an
        // editor is created.
        builder
            .register::<HostLog>()
            .register::<HostGui>()
            .register::<HostParams>()
            .register::<HostState>()
            .register::<HostLatency>();
    }
}

/// The plugin's descriptor as the factory reports it.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// CLAP plugin id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Vendor.
    pub vendor: String,
    /// Version string.
    pub version: String,
    /// CLAP features (`instrument`, `sampler`, ...).
    pub features: Vec<String>,
}

/// A plugin binary loaded through its CLAP entry point.
pub struct PluginLibrary {
    entry: PluginEntry,
    path: PathBuf,
}

impl PluginLibrary {
    /// Loads the Segue binary cargo built (see [`locate::plugin_path`]).
    pub fn segue() -> Result<Self> {
        Self::load(&locate::plugin_path()?)
    }

    /// Loads the plugin binary or `.clap` bundle at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        // SAFETY: loading a CLAP binary runs its initialiser; the binary under test is a CLAP
        // plugin built from this workspace (or one named explicitly by the tester).
        let entry = unsafe { PluginEntry::load(path) }
            .with_context(|| format!("cannot load CLAP entry from {}", path.display()))?;
        Ok(Self {
            entry,
            path: path.to_path_buf(),
        })
    }

    /// Path the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Descriptors of every plugin in the library.
    pub fn descriptors(&self) -> Result<Vec<Descriptor>> {
        let factory = self
            .entry
            .get_plugin_factory()
            .context("the library has no CLAP plugin factory")?;
        let text = |s: Option<&CStr>| s.map(|s| s.to_string_lossy().into_owned());
        factory
            .plugin_descriptors()
            .map(|d| {
                Ok(Descriptor {
                    id: text(d.id()).context("plugin descriptor without id")?,
                    name: text(d.name()).unwrap_or_default(),
                    vendor: text(d.vendor()).unwrap_or_default(),
                    version: text(d.version()).unwrap_or_default(),
                    features: d
                        .features()
                        .map(|f| f.to_string_lossy().into_owned())
                        .collect(),
                })
            })
            .collect()
    }

    /// Creates and initialises an instance of Segue.
    pub fn instantiate(&self) -> Result<PluginInstance> {
        self.instantiate_id(crate::SEGUE_CLAP_ID)
    }

    /// Creates and initialises an instance of the plugin with CLAP id `id`.
    pub fn instantiate_id(&self, id: &str) -> Result<PluginInstance> {
        let host_info = HostInfo::new(
            "Segue test host",
            "Segue developers",
            "https://github.com/segue-audio/segue",
            env!("CARGO_PKG_VERSION"),
        )
        .context("host info")?;
        let id_c = CString::new(id).context("plugin id contains NUL")?;
        let instance = clack_host::plugin::PluginInstance::<TestHost>::new(
            |_| HostShared::default(),
            |shared| HostMainThread {
                shared,
                latency_changes: Cell::new(0),
            },
            &self.entry,
            &id_c,
            &host_info,
        )
        .with_context(|| format!("cannot instantiate {id} from {}", self.path.display()))?;
        Ok(PluginInstance {
            instance,
            audio: None,
            queued: Vec::new(),
            editor: None,
            threads_before_editor: Vec::new(),
            output_params: Vec::new(),
        })
    }
}

/// Information about one parameter, from the params extension.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDesc {
    /// CLAP id.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// Lowest CLAP value.
    pub min: f64,
    /// Highest CLAP value.
    pub max: f64,
    /// Default CLAP value.
    pub default: f64,
    /// Raw CLAP flags (`CLAP_PARAM_IS_*`).
    pub flags: u32,
}

/// Information about one audio port, from the audio-ports extension.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioPortDesc {
    /// Port name.
    pub name: String,
    /// Channel count.
    pub channels: u32,
    /// Raw CLAP flags (`CLAP_AUDIO_PORT_IS_MAIN`, ...).
    pub flags: u32,
    /// Port type (`"stereo"`, `"mono"`), if given.
    pub port_type: Option<String>,
}

/// Information about one note port, from the note-ports extension.
#[derive(Debug, Clone, PartialEq)]
pub struct NotePortDesc {
    /// Port name.
    pub name: String,
    /// Accepts CLAP note events.
    pub clap_dialect: bool,
    /// Accepts MIDI 1.0 events.
    pub midi_dialect: bool,
}

/// The audio side of an active instance. Buffers are sized for `max_frames` at activation and
/// never reallocated.
struct ActiveAudio {
    processor: StartedPluginAudioProcessor<TestHost>,
    sample_rate: f64,
    max_frames: usize,
    /// Main input L, R, then sidechain L, R.
    inputs: [Vec<f32>; 4],
    outputs: [Vec<f32>; 2],
    input_ports: AudioPorts,
    output_ports: AudioPorts,
    in_events: EventBuffer,
    out_events: EventBuffer,
    steady_time: u64,
}

/// Number of input ports Segue declares (main, sidechain) and the channels of each.
const INPUT_PORTS: usize = 2;
const CHANNELS: usize = 2;

/// One plugin instance and its host side.
pub struct PluginInstance {
    instance: clack_host::plugin::PluginInstance<TestHost>,
    audio: Option<ActiveAudio>,
    /// Events to send at the start of the next block (from [`Self::set_param`]).
    queued: Vec<HostEvent>,
    editor: Option<EditorWindow>,
    /// This process's thread ids just before the editor was created (see
    /// [`wait_for_threads_started_since`]).
    threads_before_editor: Vec<u32>,
    /// Parameter changes the plugin sent back (id, value), e.g. from its editor.
    output_params: Vec<(u32, f64)>,
}

impl PluginInstance {
    /// The host's record of the plugin's callbacks.
    pub fn host_state<R>(&mut self, read: impl FnOnce(&HostShared) -> R) -> R {
        self.instance.access_shared_handler(read)
    }

    /// Delivers a main-thread callback the plugin asked for, if it asked. Returns whether one was
    /// delivered.
    pub fn pump_main_thread(&mut self) -> bool {
        let requested = self
            .instance
            .access_shared_handler(|s| s.callback_requested.swap(false, Ordering::SeqCst));
        if requested {
            self.instance.call_on_main_thread_callback();
        }
        requested
    }

    /// Whether the instance is active.
    pub fn is_active(&self) -> bool {
        self.audio.is_some()
    }

    /// Sample rate of the current activation, in Hz.
    pub fn sample_rate(&self) -> Option<f64> {
        self.audio.as_ref().map(|a| a.sample_rate)
    }

    /// Largest block the current activation accepts, in frames.
    pub fn max_block(&self) -> Option<usize> {
        self.audio.as_ref().map(|a| a.max_frames)
    }

    /// Activates the plugin at `sample_rate` (Hz) for blocks of 1 to `max_frames` frames and
    /// starts processing. An active instance is deactivated first.
    pub fn activate(&mut self, sample_rate: f64, max_frames: usize) -> Result<()> {
        ensure!(max_frames > 0, "max block size must be positive");
        self.deactivate();
        let config = PluginAudioConfiguration {
            sample_rate,
            min_frames_count: 1,
            max_frames_count: max_frames as u32,
        };
        let stopped = self
            .instance
            .activate(|_, _| (), config)
            .with_context(|| format!("activate({sample_rate} Hz, 1..={max_frames} frames)"))?;
        let processor = stopped
            .start_processing()
            .map_err(|e| anyhow!("start_processing failed: {e}"))?;
        self.audio = Some(ActiveAudio {
            processor,
            sample_rate,
            max_frames,
            inputs: std::array::from_fn(|_| vec![0.0; max_frames]),
            outputs: std::array::from_fn(|_| vec![0.0; max_frames]),
            // clack-host 0.2.0 mis-rebuilds its pointer lists when these grow: size them up
            // front for every port and channel.
            input_ports: AudioPorts::with_capacity(INPUT_PORTS * CHANNELS, INPUT_PORTS),
            output_ports: AudioPorts::with_capacity(CHANNELS, 1),
            in_events: EventBuffer::with_capacity(1024),
            out_events: EventBuffer::with_capacity(1024),
            steady_time: 0,
        });
        Ok(())
    }

    /// Tells the plugin whether the host renders offline (CLAP render extension; `true`) or in
    /// real time. Takes effect at the next activation, as hosts reactivate after a change.
    pub fn set_render_mode(&mut self, offline: bool) -> Result<()> {
        let handle = self.instance.plugin_handle();
        let render: PluginRender = handle
            .get_extension()
            .context("plugin has no render extension")?;
        let mode = if offline {
            RenderMode::Offline
        } else {
            RenderMode::Realtime
        };
        render
            .set(&handle, mode)
            .map_err(|e| anyhow!("render.set({mode:?}) failed: {e}"))
    }

    /// Stops processing and deactivates, if active.
    pub fn deactivate(&mut self) {
        if let Some(audio) = self.audio.take() {
            let stopped = audio.processor.stop_processing();
            self.instance.deactivate(stopped);
        }
    }

    /// Queues a change of parameter `id` (string id) to normalised `value` for the start of the
    /// next block. When the instance is inactive the change is applied at once through the
    /// params extension's `flush`.
    pub fn set_param(&mut self, id: &str, value: f64) -> Result<()> {
        let event = HostEvent::param(0, id, value);
        if self.audio.is_some() {
            self.queued.push(event);
            return Ok(());
        }
        let mut events = EventBuffer::with_capacity(1);
        event.push_to(&mut events)?;
        let mut out = EventBuffer::with_capacity(16);
        let params: PluginParams = self
            .instance
            .plugin_handle()
            .get_extension()
            .context("plugin has no params extension")?;
        let mut handle = self
            .instance
            .inactive_plugin_handle()
            .context("instance unexpectedly active")?;
        params.flush(
            &mut handle,
            &InputEvents::from_buffer(&events),
            &mut OutputEvents::from_buffer(&mut out),
        );
        Ok(())
    }

    /// Current CLAP value (normalised, `0..=1`) of the parameter with string id `id`.
    pub fn param_value(&mut self, id: &str) -> Result<f64> {
        let clap_id = crate::clap_param_id(id);
        let handle = self.instance.plugin_handle();
        let params: PluginParams = handle
            .get_extension()
            .context("plugin has no params extension")?;
        let raw = ClapId::from_raw(clap_id).context("invalid param id")?;
        params
            .get_value(&handle, raw)
            .with_context(|| format!("plugin has no parameter `{id}` (CLAP id {clap_id})"))
    }

    /// The plugin's display text for a CLAP parameter value (e.g. `"-6.0 dB"`).
    pub fn param_text(&mut self, id: &str, value: f64) -> Result<String> {
        let handle = self.instance.plugin_handle();
        let params: PluginParams = handle
            .get_extension()
            .context("plugin has no params extension")?;
        let raw = ClapId::from_raw(crate::clap_param_id(id)).context("invalid param id")?;
        let mut buffer = [0u8; 256];
        let text = params
            .value_to_text(&handle, raw, value, &mut buffer)
            .with_context(|| format!("value_to_text({id}, {value}) failed"))?;
        Ok(String::from_utf8_lossy(text).into_owned())
    }

    /// Every parameter the plugin declares.
    pub fn params(&mut self) -> Result<Vec<ParamDesc>> {
        let handle = self.instance.plugin_handle();
        let params: PluginParams = handle
            .get_extension()
            .context("plugin has no params extension")?;
        let mut buffer = ParamInfoBuffer::new();
        (0..params.count(&handle))
            .map(|i| {
                let info = params
                    .get_info(&handle, i, &mut buffer)
                    .with_context(|| format!("params.get_info({i}) failed"))?;
                Ok(ParamDesc {
                    id: info.id.get(),
                    name: String::from_utf8_lossy(info.name).into_owned(),
                    min: info.min_value,
                    max: info.max_value,
                    default: info.default_value,
                    flags: info.flags.bits(),
                })
            })
            .collect()
    }

    /// The plugin's audio ports (`is_input` selects the direction).
    pub fn audio_ports(&mut self, is_input: bool) -> Result<Vec<AudioPortDesc>> {
        let handle = self.instance.plugin_handle();
        let ports: PluginAudioPorts = handle
            .get_extension()
            .context("plugin has no audio-ports extension")?;
        let mut buffer = AudioPortInfoBuffer::new();
        (0..ports.count(&handle, is_input))
            .map(|i| {
                let info = ports
                    .get(&handle, i, is_input, &mut buffer)
                    .with_context(|| format!("audio_ports.get({i}, {is_input}) failed"))?;
                Ok(AudioPortDesc {
                    name: String::from_utf8_lossy(info.name).into_owned(),
                    channels: info.channel_count,
                    flags: info.flags.bits(),
                    port_type: info.port_type.map(|t| t.0.to_string_lossy().into_owned()),
                })
            })
            .collect()
    }

    /// The plugin's note ports (`is_input` selects the direction).
    pub fn note_ports(&mut self, is_input: bool) -> Result<Vec<NotePortDesc>> {
        let handle = self.instance.plugin_handle();
        let Some(ports) = handle.get_extension::<PluginNotePorts>() else {
            return Ok(Vec::new());
        };
        let mut buffer = NotePortInfoBuffer::new();
        (0..ports.count(&handle, is_input))
            .map(|i| {
                let info = ports
                    .get(&handle, i, is_input, &mut buffer)
                    .with_context(|| format!("note_ports.get({i}, {is_input}) failed"))?;
                Ok(NotePortDesc {
                    name: String::from_utf8_lossy(info.name).into_owned(),
                    clap_dialect: info.supported_dialects.supports(NoteDialect::Clap),
                    midi_dialect: info.supported_dialects.supports(NoteDialect::Midi),
                })
            })
            .collect()
    }

    /// Processes one block.
    ///
    /// `main` and `sidechain` hold the two input ports' channels: two equally long slices each,
    /// or an empty slice for a silent port. `transport` becomes the block's CLAP transport
    /// (`None`: the host gives none). `events` must be sorted by `time`, which counts samples
    /// from the block start. Parameter changes queued by [`Self::set_param`] go first.
    ///
    /// Returns the stereo output, as long as the input.
    pub fn process_block(
        &mut self,
        main: &[&[f32]],
        sidechain: &[&[f32]],
        transport: Option<&Transport>,
        events: &[HostEvent],
    ) -> Result<StereoBuffer> {
        let frames = block_len(main, sidechain)?;
        let mut out = [vec![0.0; frames], vec![0.0; frames]];
        self.process_into(main, sidechain, transport, events, &mut out)?;
        Ok(out)
    }

    /// [`Self::process_block`] writing into `out` (two channels of the block's length).
    pub fn process_into(
        &mut self,
        main: &[&[f32]],
        sidechain: &[&[f32]],
        transport: Option<&Transport>,
        events: &[HostEvent],
        out: &mut [Vec<f32>; 2],
    ) -> Result<()> {
        let frames = block_len(main, sidechain)?;
        let audio = self
            .audio
            .as_mut()
            .context("process_block on an inactive instance; call activate() first")?;
        ensure!(
            frames >= 1 && frames <= audio.max_frames,
            "block of {frames} frames outside the activated 1..={}",
            audio.max_frames
        );
        ensure!(
            out.iter().all(|c| c.len() == frames),
            "output buffer is not {frames} frames long"
        );
        let mut last = 0;
        for e in events {
            ensure!(
                e.time() as usize >= last,
                "events not sorted by time: {e:?}"
            );
            ensure!(
                (e.time() as usize) < frames,
                "event past the block end: {e:?}"
            );
            last = e.time() as usize;
        }

        for (port, channels) in [main, sidechain].into_iter().enumerate() {
            for ch in 0..CHANNELS {
                let dst = &mut audio.inputs[port * CHANNELS + ch][..frames];
                match channels.get(ch) {
                    Some(src) => dst.copy_from_slice(src),
                    None => dst.fill(0.0),
                }
            }
        }
        for channel in &mut audio.outputs {
            // Garbage the plugin must overwrite: a plugin that leaves the output alone fails.
            channel[..frames].fill(f32::NAN);
        }

        audio.in_events.clear();
        for event in self.queued.drain(..).chain(events.iter().copied()) {
            event.push_to(&mut audio.in_events)?;
        }
        audio.out_events.clear();

        let [main_l, main_r, side_l, side_r] = &mut audio.inputs;
        let silent_main = main.is_empty();
        let silent_side = sidechain.is_empty();
        let input = audio.input_ports.with_input_buffers([
            AudioPortBuffer {
                latency: 0,
                channels: AudioPortBufferType::f32_input_only([
                    InputChannel::from_buffer(&mut main_l[..frames], silent_main),
                    InputChannel::from_buffer(&mut main_r[..frames], silent_main),
                ]),
            },
            AudioPortBuffer {
                latency: 0,
                channels: AudioPortBufferType::f32_input_only([
                    InputChannel::from_buffer(&mut side_l[..frames], silent_side),
                    InputChannel::from_buffer(&mut side_r[..frames], silent_side),
                ]),
            },
        ]);
        let [out_l, out_r] = &mut audio.outputs;
        let mut output = audio.output_ports.with_output_buffers([AudioPortBuffer {
            latency: 0,
            channels: AudioPortBufferType::f32_output_only(
                [&mut out_l[..frames], &mut out_r[..frames]].into_iter(),
            ),
        }]);
        let clap_transport = transport.map(|t| t.to_clap(0));
        audio
            .processor
            .process(
                &input,
                &mut output,
                &InputEvents::from_buffer(&audio.in_events),
                &mut OutputEvents::from_buffer(&mut audio.out_events),
                Some(audio.steady_time),
                clap_transport.as_ref(),
            )
            .with_context(|| format!("process() of a {frames}-frame block failed"))?;
        audio.steady_time += frames as u64;

        for event in audio.out_events.iter() {
            if let Some(p) = event.as_event::<ParamValueEvent>() {
                if let Some(id) = p.param_id() {
                    self.output_params.push((id.get(), p.value()));
                }
            }
        }
        for (dst, src) in out.iter_mut().zip(&audio.outputs) {
            dst.copy_from_slice(&src[..frames]);
        }
        self.pump_main_thread();
        Ok(())
    }

    /// Parameter changes the plugin reported to the host since the last call (CLAP id, value).
    pub fn take_output_params(&mut self) -> Vec<(u32, f64)> {
        std::mem::take(&mut self.output_params)
    }

    /// Saves the plugin's state through the CLAP state extension.
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        let handle = self.instance.plugin_handle();
        let state: PluginState = handle
            .get_extension()
            .context("plugin has no state extension")?;
        let mut bytes = Vec::new();
        state
            .save(&handle, &mut bytes)
            .map_err(|e| anyhow!("state.save failed: {e}"))?;
        Ok(bytes)
    }

    /// Loads a state through the CLAP state extension.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        let handle = self.instance.plugin_handle();
        let state: PluginState = handle
            .get_extension()
            .context("plugin has no state extension")?;
        let mut reader = bytes;
        state
            .load(&handle, &mut reader)
            .map_err(|e| anyhow!("state.load of {} bytes failed: {e}", bytes.len()))?;
        self.pump_main_thread();
        Ok(())
    }

    /// Opens the plugin's editor embedded in a new host window on `x` (CLAP GUI extension, X11
    /// API, never floating: nice-plug only embeds). Returns the editor's size in pixels.
    pub fn open_editor(&mut self, x: &'static XServer) -> Result<(u32, u32)> {
        ensure!(self.editor.is_none(), "the editor is already open");
        let handle = self.instance.plugin_handle();
        let gui: PluginGui = handle
            .get_extension()
            .context("plugin has no GUI extension")?;
        let config = GuiConfiguration {
            api_type: GuiApiType::X11,
            is_floating: false,
        };
        ensure!(
            gui.is_api_supported(&handle, config),
            "plugin does not support embedded X11 windows"
        );
        self.threads_before_editor = thread_ids();
        gui.create(&handle, config)
            .map_err(|e| anyhow!("gui.create failed: {e}"))?;
        let size = gui
            .get_size(&handle)
            .context("gui.get_size returned nothing")?;
        let window = match EditorWindow::create(x, size.width, size.height) {
            Ok(w) => w,
            Err(e) => {
                gui.destroy(&handle);
                return Err(e);
            }
        };
        // SAFETY: the window lives in `self.editor` until `close_editor` destroys the GUI.
        let attached =
            unsafe { gui.set_parent(&handle, ClapWindow::from_x11_handle(window.id().into())) };
        if let Err(e) = attached
            .map_err(|e| anyhow!("gui.set_parent failed: {e}"))
            .and_then(|_| {
                gui.show(&handle)
                    .map_err(|e| anyhow!("gui.show failed: {e}"))
            })
        {
            gui.destroy(&handle);
            return Err(e);
        }
        self.editor = Some(window);
        Ok((size.width, size.height))
    }

    /// The editor's current size through `gui.get_size`, in pixels.
    pub fn editor_size(&mut self) -> Result<(u32, u32)> {
        let handle = self.instance.plugin_handle();
        let gui: PluginGui = handle
            .get_extension()
            .context("plugin has no GUI extension")?;
        let size = gui
            .get_size(&handle)
            .context("gui.get_size returned nothing")?;
        Ok((size.width, size.height))
    }

    /// Resizes the open editor as a host does when the user drags its window edge: the host
    /// window first, then `gui.adjust_size` and `gui.set_size`. Returns the size the plugin
    /// accepted, in pixels.
    pub fn resize_editor(&mut self, width: u32, height: u32) -> Result<(u32, u32)> {
        let window = self.editor.as_ref().context("the editor is not open")?;
        let handle = self.instance.plugin_handle();
        let gui: PluginGui = handle
            .get_extension()
            .context("plugin has no GUI extension")?;
        ensure!(
            gui.can_resize(&handle),
            "the editor says it cannot be resized"
        );
        let wanted = GuiSize { width, height };
        let size = gui.adjust_size(&handle, wanted).unwrap_or(wanted);
        window.resize(size.width, size.height)?;
        gui.set_size(&handle, size)
            .map_err(|e| anyhow!("gui.set_size({}x{}) failed: {e}", size.width, size.height))?;
        Ok((size.width, size.height))
    }

    /// Waits until the open editor has drawn something that is not blank (see
    /// [`Screenshot::is_blank`]) and returns that screenshot, delivering main-thread callbacks
    /// meanwhile. Fails after `timeout` with the last screenshot's statistics.
    pub fn editor_screenshot(&mut self, timeout: Duration) -> Result<Screenshot> {
        let start = Instant::now();
        loop {
            self.pump_main_thread();
            let shot = self
                .editor
                .as_ref()
                .context("the editor is not open")?
                .screenshot()?;
            if !shot.is_blank() {
                return Ok(shot);
            }
            if start.elapsed() > timeout {
                bail!(
                    "the editor stayed blank for {timeout:?}: {} distinct colours, dominant colour \
                     covers {:.1}% of {}x{} pixels",
                    shot.distinct_colours(),
                    shot.dominant_fraction() * 100.0,
                    shot.width,
                    shot.height
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks at (`x`, `y`) pixels in the open editor (see [`EditorWindow::click`]),
    /// delivering main-thread callbacks meanwhile.
    pub fn click_editor(&mut self, x: i16, y: i16) -> Result<()> {
        self.editor
            .as_ref()
            .context("the editor is not open")?
            .click(x, y)?;
        self.pump_main_thread();
        Ok(())
    }

    /// Closes the editor (`gui.destroy`) and destroys the host window.
    pub fn close_editor(&mut self) -> Result<()> {
        let window = self.editor.take().context("the editor is not open")?;
        let handle = self.instance.plugin_handle();
        if let Some(gui) = handle.get_extension::<PluginGui>() {
            gui.destroy(&handle);
        }
        let destroyed = window.destroy();
        wait_for_threads_started_since(&self.threads_before_editor, Duration::from_secs(3));
        destroyed
    }
}

/// This process's thread ids (Linux: `/proc/self/task`; empty elsewhere).
fn thread_ids() -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A thread's name as the kernel has it (`comm`).
fn thread_name(tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Waits, at most `limit`, until the unnamed threads this thread started since `before` (a
/// [`thread_ids`] snapshot) have ended; unnamed threads carry their creator's name.
///
/// baseview's X11 window thread outlives the editor's destruction: its handle's `Drop` asks
/// the thread to stop, and when the thread stops answering before it has been joined it gives
/// up joining ("X11 thread disconnected" in the log). The thread then still closes its display
/// connection; a process that exits meanwhile crashes in the GL driver's exit handlers
/// (caught in a core dump: the main thread in `__run_exit_handlers`, calling into the unloaded
/// driver, while the window thread sits in `XCloseDisplay`). A host closes its editors long
/// before it exits; a test binary exits right after its last test, so the harness waits here.
fn wait_for_threads_started_since(before: &[u32], limit: Duration) {
    let Some(me) = std::fs::read_to_string("/proc/thread-self/comm")
        .ok()
        .map(|s| s.trim_end().to_string())
    else {
        return;
    };
    let start = Instant::now();
    while start.elapsed() < limit {
        let mine = thread_ids()
            .into_iter()
            .filter(|t| !before.contains(t))
            .any(|t| thread_name(t).as_deref() == Some(me.as_str()));
        if !mine {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        if self.editor.is_some() {
            let _ = self.close_editor();
        }
        self.deactivate();
    }
}

/// Frames in a block given its input ports, checking the ports agree.
fn block_len(main: &[&[f32]], sidechain: &[&[f32]]) -> Result<usize> {
    let mut len = None;
    for (name, port) in [("main", main), ("sidechain", sidechain)] {
        ensure!(
            port.is_empty() || port.len() == CHANNELS,
            "{name} input has {} channels; give {CHANNELS} or none for silence",
            port.len()
        );
        for channel in port {
            match len {
                None => len = Some(channel.len()),
                Some(l) => ensure!(
                    l == channel.len(),
                    "input channels differ in length ({l} and {})",
                    channel.len()
                ),
            }
        }
    }
    len.context("a block needs at least one input port with audio to define its length; use silent channels")
}
