//! Segue: a VST3/CLAP instrument that records what the host plays into it, continues it with
//! MusicGen and plays the continuation back in sync with the transport.
//!
//! This file holds only the [`Plugin`] implementation and the format exports; parameters live in
//! [`params`], the window in [`editor`], signal helpers in [`dsp`]. The audio thread owns
//! [`Segue`]; what it shares with the editor and the host is the `Arc<SegueParams>`.

use nice_plug::prelude::*;
use std::sync::Arc;

pub mod capture;
pub mod dsp;
pub mod editor;
pub mod params;
pub mod playback;
pub mod takes;
pub mod transport;

use params::SegueParams;

/// The plugin instance. Owned by the host wrapper; `process()` runs on the host's audio thread.
pub struct Segue {
    params: Arc<SegueParams>,
    /// Host sample rate in Hz, set in `activate()`.
    sample_rate: f32,
}

impl Default for Segue {
    fn default() -> Self {
        // No expensive work here: hosts create instances just to scan them.
        Self {
            params: Arc::new(SegueParams::default()),
            sample_rate: 44_100.0,
        }
    }
}

impl Segue {
    /// Index of the sidechain among the auxiliary inputs.
    const SIDECHAIN_PORT: usize = 0;
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
        Some(editor::SegueEditor::new(self.params.clone()))
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
        self.sample_rate = buffer_config.sample_rate;
        true
    }

    fn reset(&mut self) {
        self.params.gain.smoothed.reset(self.params.gain.value());
    }

    fn process(
        &mut self,
        buffer: &mut Buffer,
        aux: &mut AuxiliaryBuffers,
        context: &mut impl ProcessContext<Self>,
    ) -> ProcessStatus {
        // Note events are drained so the queue never backs up; capture/playback will use them.
        while context.next_event().is_some() {}

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
