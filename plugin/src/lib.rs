//! Segue: a VST3/CLAP instrument that records what the host plays into it, continues it with
//! MusicGen and plays the continuation back in sync with the transport.
//!
//! This file holds only the [`Plugin`] implementation and the format exports; parameters live in
//! [`params`], the window in [`editor`], signal helpers in [`dsp`], the non-realtime side (the
//! controller thread that generates takes) in [`controller`]. The audio thread owns [`Segue`]'s
//! capture writer and player; what it shares is the `Arc<SegueParams>` and the
//! [`controller::Shared`] atomics.

use nice_plug::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod capture;
pub mod controller;
pub mod dsp;
pub mod editor;
pub mod export;
pub mod params;
pub mod playback;
pub mod status;
pub mod stream;
pub mod takes;
pub mod transport;

use capture::CaptureWriter;
use controller::{Controller, Shared};
use params::{CaptureSource, SegueParams};
use playback::{Player, PlayerSettings};
use transport::TransportSnapshot;

/// Longest the audio thread waits for a generation during an offline render, after which the
/// render goes on without the take.
const OFFLINE_WAIT_LIMIT: Duration = Duration::from_secs(600);

/// The plugin instance. Owned by the host wrapper; `process()` runs on the host's audio thread.
pub struct Segue {
    params: Arc<SegueParams>,
    /// Host sample rate in Hz, set in `activate()`.
    sample_rate: f32,
    /// What the non-realtime side and the audio thread share (created with the instance).
    shared: Arc<Shared>,
    /// Host rate the store's takes were built for (`None`: not built yet).
    takes_rate: Option<f64>,
    /// The audio thread's end of the capture history (from `activate()`).
    capture: Option<CaptureWriter>,
    /// The audio thread's player (from `activate()`).
    player: Option<Player>,
    /// The controller thread of the current activation.
    controller: Option<Controller>,
    /// The `generate` parameter's value in the previous block (for its rising edge).
    generate_was_on: bool,
    /// The host renders offline: generations are waited for.
    offline: bool,
}

impl Default for Segue {
    fn default() -> Self {
        // No expensive work here: hosts create instances just to scan them. No thread is
        // started before `activate()`.
        Self {
            params: Arc::new(SegueParams::default()),
            sample_rate: 44_100.0,
            shared: Arc::new(Shared::default()),
            takes_rate: None,
            capture: None,
            player: None,
            controller: None,
            generate_was_on: false,
            offline: false,
        }
    }
}

impl Segue {
    /// Index of the sidechain among the auxiliary inputs.
    const SIDECHAIN_PORT: usize = 0;

    /// Stops the controller thread and disconnects the audio thread's parts.
    fn shut_down(&mut self) {
        if let Some(mut controller) = self.controller.take() {
            controller.stop();
        }
        self.shared.store.lock().detach();
        *self.shared.capture.lock() = None;
        self.capture = None;
        self.player = None;
    }
}

impl Drop for Segue {
    fn drop(&mut self) {
        self.shut_down();
    }
}

impl Plugin for Segue {
    const NAME: &'static str = "Segue";
    const VENDOR: &'static str = "Segue developers";
    const URL: &'static str = "https://github.com/segue-audio/segue";
    const EMAIL: &'static str = "segue@example.org";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    // Stereo main input, a stereo sidechain (hosts such as Ableton Live hand instruments audio
    // only through a sidechain) and a stereo output.
    const AUDIO_IO_LAYOUTS: &'static [AudioIOLayout] = &[AudioIOLayout {
        main_input_channels: NonZeroU32::new(2),
        main_output_channels: NonZeroU32::new(2),
        aux_input_ports: &[new_nonzero_u32(2)],
        aux_output_ports: &[],
        names: PortNames {
            layout: Some("Stereo"),
            main_input: Some("Input"),
            main_output: Some("Output"),
            aux_inputs: &["Sidechain"],
            aux_outputs: &[],
        },
    }];

    const MIDI_INPUT: MidiConfig = MidiConfig::Basic;
    // Transport-synced work (generate requests, playback starts) must happen at the exact sample.
    const SAMPLE_ACCURATE_AUTOMATION: bool = true;

    type Editor = editor::SegueEditor;
    type SysExMessage = ();
    type BackgroundTask = ();

    fn params(&self) -> Arc<dyn Params> {
        self.params.clone()
    }

    fn editor(&mut self, _async_executor: AsyncExecutor<Self>) -> Option<Self::Editor> {
        Some(editor::SegueEditor::new(
            self.params.clone(),
            self.shared.clone(),
        ))
    }

    fn filter_state(state: &mut PluginState) {
        params::migrate_state(state);
    }

    fn activate(
        &mut self,
        _audio_io_layout: &AudioIOLayout,
        buffer_config: &BufferConfig,
        _context: &mut impl ActivateContext<Self>,
    ) -> bool {
        self.shut_down();
        self.sample_rate = buffer_config.sample_rate;
        self.offline = buffer_config.process_mode == ProcessMode::Offline;
        let sr = f64::from(buffer_config.sample_rate);
        // Everything the audio thread uses is allocated here, for the maximum size.
        let (writer, reader) = capture::capture_pair(sr, capture::MIN_HISTORY_SECONDS);
        let (player, handle) = playback::player_pair(sr);
        {
            let mut store = self.shared.store.lock();
            if self.takes_rate.is_some_and(|r| r != sr) {
                let rebuilt = store
                    .rebuild(|e| controller::build_take(e.id, sr, e.anchor.as_ref(), &e.source));
                if let Err(e) = rebuilt {
                    nice_warn!("takes could not be rebuilt for {sr} Hz: {e}");
                }
            }
            *self.shared.player_status.lock() = Some(handle.status().clone());
            if store.attach(handle).is_err() {
                nice_warn!("the new player's command queue is full");
            }
        }
        self.takes_rate = Some(sr);
        // A state the host loaded while inactive becomes playable takes before playback starts.
        controller::restore_if_loaded(&self.shared, &self.params, sr);
        *self.shared.capture.lock() = Some(reader);
        self.capture = Some(writer);
        self.player = Some(player);
        self.generate_was_on = self.params.generate.value();
        self.controller = Controller::start(self.shared.clone(), self.params.clone(), sr);
        true
    }

    fn deactivate(&mut self) {
        self.shut_down();
    }

    fn reset(&mut self) {
        self.params.gain.smoothed.reset(self.params.gain.value());
        if let Some(player) = &mut self.player {
            player.reset();
        }
    }

    fn process(
        &mut self,
        buffer: &mut Buffer,
        aux: &mut AuxiliaryBuffers,
        context: &mut impl ProcessContext<Self>,
    ) -> ProcessStatus {
        let (Some(capture), Some(player)) = (self.capture.as_mut(), self.player.as_mut()) else {
            for out in buffer.as_slice() {
                out.fill(0.0);
            }
            return ProcessStatus::KeepAlive;
        };
        let snap = TransportSnapshot::from_host(context.transport());
        let frames_before = capture.frames_written();

        // With sample-accurate automation the wrapper splits blocks at parameter changes, so a
        // parameter read here holds from this block's first sample: a `generate` rising edge
        // happened exactly at `frames_before`.
        let generate = self.params.generate.value();
        if generate && !self.generate_was_on {
            self.shared.request(frames_before);
        }
        self.generate_was_on = generate;
        let trigger = self.params.generate_note.value();
        while let Some(event) = context.next_event() {
            match event {
                NoteEvent::NoteOn {
                    timing,
                    key,
                    velocity,
                    ..
                } => {
                    // A wildcard key (no number) addresses no particular note: ignored.
                    let Some(note) = key.number() else { continue };
                    if i32::from(note) == trigger {
                        self.shared.request(frames_before + u64::from(timing));
                    } else {
                        player.note_on(timing as usize, note, velocity);
                    }
                }
                NoteEvent::NoteOff { timing, key, .. } => {
                    if let Some(note) = key.number().filter(|n| i32::from(*n) != trigger) {
                        player.note_off(timing as usize, note);
                    }
                }
                _ => {}
            }
        }

        // Capture before anything writes the output (the main input sits in `buffer`).
        let frames = buffer.samples();
        match self.params.capture_source.value() {
            CaptureSource::Main => capture.write_block(buffer.as_slice_immutable(), frames, &snap),
            CaptureSource::Sidechain => match aux.inputs.get(Self::SIDECHAIN_PORT) {
                Some(side) => capture.write_block(side.as_slice_immutable(), frames, &snap),
                None => capture.write_block::<&[f32]>(&[], frames, &snap),
            },
        }

        // Offline, a requested generation is waited for here, before playback goes on, so the
        // bounce holds the take where live playback would. (No realtime deadline applies; the
        // wait neither allocates nor locks.)
        if self.offline && self.shared.busy() {
            let start = Instant::now();
            while self.shared.busy() && start.elapsed() < OFFLINE_WAIT_LIMIT {
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        // With sample-accurate automation the wrapper splits blocks at parameter changes, so a
        // per-block read of `monitor` is exact.
        let monitor = self.params.monitor.value();
        let sidechain = aux
            .inputs
            .get(Self::SIDECHAIN_PORT)
            .map(|b| b.as_slice_immutable());
        let gain = &self.params.gain.smoothed;

        // Subnormal inputs are flushed before any arithmetic touches them: the wrapper enables
        // flush-to-zero (results) but not denormals-are-zero (operands), and arithmetic on
        // subnormal operands is many times slower on x86. `flush_denormal` only looks at bits.
        for (channel, out) in buffer.as_slice().iter_mut().enumerate() {
            // `out` already holds the main input: the wrapper copies it in (in-place processing).
            if !monitor {
                out.fill(0.0);
                continue;
            }
            match sidechain.as_ref().and_then(|s| s.get(channel)) {
                Some(side) => {
                    for (o, s) in out.iter_mut().zip(side.iter()) {
                        *o = dsp::flush_denormal(*o) + dsp::flush_denormal(*s);
                    }
                }
                None => {
                    for o in out.iter_mut() {
                        *o = dsp::flush_denormal(*o);
                    }
                }
            }
        }

        let settings = PlayerSettings {
            mode: self.params.playback_mode.value().mode(),
            quantise: self.params.midi_quantise.value().quantise(),
            release_ms: self.params.release_ms.value(),
            ..PlayerSettings::default()
        };
        player.process(buffer.as_slice(), &snap, &settings);

        // The gain is smoothed per sample while it moves and is a constant otherwise. Every
        // output sample is flushed too, for CPUs or hosts where flush-to-zero is not in effect.
        let outputs = buffer.as_slice();
        let frames = outputs.first().map_or(0, |c| c.len());
        if gain.is_smoothing() {
            for frame in 0..frames {
                let g = params::db_to_gain(gain.next());
                for out in outputs.iter_mut() {
                    out[frame] = dsp::flush_denormal(out[frame] * g);
                }
            }
        } else {
            let g = params::db_to_gain(gain.next());
            for out in outputs.iter_mut() {
                for sample in out.iter_mut() {
                    *sample = dsp::flush_denormal(*sample * g);
                }
            }
        }

        ProcessStatus::KeepAlive
    }
}

impl ClapPlugin for Segue {
    const CLAP_ID: &'static str = "audio.segue.segue";
    const CLAP_DESCRIPTION: Option<&'static str> =
        Some("Continues what you play with MusicGen, in time with the host");
    const CLAP_MANUAL_URL: Option<&'static str> = Some(Self::URL);
    const CLAP_SUPPORT_URL: Option<&'static str> = None;
    const CLAP_FEATURES: &'static [ClapFeature] = &[
        ClapFeature::Instrument,
        ClapFeature::Sampler,
        ClapFeature::Stereo,
    ];
}

impl Vst3Plugin for Segue {
    const VST3_CLASS_ID: [u8; 16] = *b"SegueMusicGenIns";
    const VST3_SUBCATEGORIES: &'static [Vst3SubCategory] =
        &[Vst3SubCategory::Instrument, Vst3SubCategory::Sampler];
}

nice_export_clap!(Segue);
nice_export_vst3!(Segue);
