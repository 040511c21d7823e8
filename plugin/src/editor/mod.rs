//! The plugin window (egui through nice-plug-egui).
//!
//! [`SegueEditor`] is what the host wrapper owns; every time the host opens the window it builds a
//! fresh egui editor at the persisted size ([`SegueParams::editor_size`]) and records every resize
//! there, so the size survives closing the window and reloading the project. The UI itself is
//! [`SegueApp`].
//!
//! Data flow (nothing here ever makes the audio thread wait):
//! - Automatable parameters (prompt and continuation bars) change through the host's
//!   [`ParamSetter`]; persisted fields (prompt text, model, sampling settings) are written
//!   directly (they are read when a generation starts).
//! - Everything else goes to the controller thread as a [`Command`] (select, audition, rename,
//!   delete, extend, export, cancel). What it reports comes back in [`Shared::status`].
//! - Generate calls [`Shared::request`] with the capture's current frame: the prompt is cut as the
//!   history stood at the click, exactly as for a `generate` parameter press at that sample. (A
//!   press of the `generate` parameter through the [`ParamSetter`] would also work, but it
//!   depends on the host relaying editor changes to `process()` promptly, needs a second
//!   "release" change later, and records automation in hosts that write automation.)
//! - Waveforms are summarised here, on the GUI thread, only while the window is open, and cached
//!   per take ([`waveform::SummaryCache`]); the prompt region is copied out of the capture history
//!   at most [`PROMPT_REFRESH`] apart, and only while new audio arrives.
//! - Repaints: egui redraws on input and nice-plug-egui on parameter changes. The app asks for
//!   [`ANIMATION`]-spaced frames only while something moves (a generation runs, the transport
//!   plays, a take sounds) and otherwise one frame per [`IDLE_POLL`], to notice the transport
//!   starting or the host starting a generation.
//!
//! Drag and drop of takes onto a DAW track is not offered: baseview (the windowing layer under
//! nice-plug-egui) can receive drops but cannot start a drag out of the window on any platform.

pub mod layout;
pub mod settings;
pub mod take_list;
pub mod timeline;
pub mod waveform;

use crate::capture::{Prompt, PromptRequest};
use crate::controller::{Command, Shared};
use crate::export::{default_export_folder, ExportRate};
use crate::params::{EditorSize, SegueParams};
use crate::status::{format_duration, time_left, Phase, Status};
use crate::takes::{GenerationInfo, Take, TakeAnchor, TakeId};
use egui::{Align2, Color32, FontId, Pos2, Rect, Stroke, StrokeKind, UiBuilder};
use layout::{Area, Layout};
use nice_plug::context::gui::GuiContext;
use nice_plug::editor::dpi::NativeSize;
use nice_plug::editor::dpi::{LogicalSize, Size};
use nice_plug::editor::{HostMethods, SizeConstraints, SpawnedEditor};
use nice_plug::prelude::*;
use nice_plug_egui::widgets::ParamSlider;
use nice_plug_egui::{
    create_egui_editor, EguiEditor, EguiEditorHandle, EguiEditorState, EguiNiceSettings, Frame,
    NiceEguiApp, RepaintNotifier,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};
use take_list::ExportScope;
use timeline::{grid_lines, px_per_s, transport_playhead_s, Ruler};
use waveform::{summarise_planar, Column, SummaryCache};

/// Smallest window the layout still fits in, in logical pixels.
pub const MIN_EDITOR_SIZE: EditorSize = EditorSize {
    width: 760,
    height: 500,
};

/// Frame spacing while something moves (about 30 frames per second).
pub const ANIMATION: Duration = Duration::from_millis(33);
/// Frame spacing while nothing moves.
pub const IDLE_POLL: Duration = Duration::from_millis(250);
/// Shortest time between two copies of the prompt region out of the capture history.
pub const PROMPT_REFRESH: Duration = Duration::from_millis(300);

/// What the window remembers between openings (not saved in the project).
#[derive(Debug, Clone)]
struct Memory {
    export_folder: String,
    export_rate: ExportRate,
    /// A folder dialog is open (on its own thread, which writes `export_folder` when it closes).
    choosing: bool,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            export_folder: default_export_folder().display().to_string(),
            export_rate: ExportRate::Host,
            choosing: false,
        }
    }
}

/// The editor handed to the host wrapper (see [`Plugin::editor`]).
pub struct SegueEditor {
    params: Arc<SegueParams>,
    shared: Arc<Shared>,
    memory: Arc<Mutex<Memory>>,
    /// The egui editor of the window currently (or last) open; `None` before the first spawn.
    current: Mutex<Option<EguiEditor<SegueApp>>>,
}

impl SegueEditor {
    /// Creates the editor; cheap, nothing is opened until the host asks.
    pub fn new(params: Arc<SegueParams>, shared: Arc<Shared>) -> Self {
        Self {
            params,
            shared,
            memory: Arc::new(Mutex::new(Memory::default())),
            current: Mutex::new(None),
        }
    }

    fn resize_hint() -> ResizeHint {
        ResizeHint {
            can_resize: true,
            can_resize_horizontally: true,
            can_resize_vertically: true,
            size_constraints: SizeConstraints::Logical {
                min_size: Some(LogicalSize::new(
                    MIN_EDITOR_SIZE.width as f32,
                    MIN_EDITOR_SIZE.height as f32,
                )),
                max_size: None,
            },
            ..ResizeHint::NON_RESIZABLE
        }
    }

    fn persisted_size(&self) -> Size {
        let size = *self.params.editor_size.read();
        Size::Logical(LogicalSize::new(size.width as f64, size.height as f64))
    }
}

impl Editor for SegueEditor {
    type Handle = EguiEditorHandle;

    fn spawn(
        &self,
        parent: Option<ParentWindowHandle>,
        wait_for_parent: bool,
        fallback_scale_factor: Option<f64>,
        gui_context: GuiContext,
        host: Option<HostMethods>,
    ) -> Result<SpawnedEditor<Self::Handle>, Box<dyn Error>> {
        let state = EguiEditorState::from_size(self.persisted_size(), 1.0);
        let settings = EguiNiceSettings::new()
            .with_tile(format!("Segue {}", env!("CARGO_PKG_VERSION")))
            .with_resize_hint(Self::resize_hint());
        let editor = create_egui_editor(
            state,
            RepaintNotifier::new(),
            settings,
            SegueApp::new(
                self.params.clone(),
                self.shared.clone(),
                self.memory.clone(),
            ),
        )
        .ok_or("nice-plug-egui could not create the editor")?;
        let spawned = editor.spawn(
            parent,
            wait_for_parent,
            fallback_scale_factor,
            gui_context,
            host,
        )?;
        *self.current.lock() = Some(editor);
        Ok(spawned)
    }

    fn size(&self) -> NativeSize<u32> {
        match self.current.lock().as_ref() {
            Some(editor) => editor.size(),
            None => NativeSize::from_size(self.persisted_size(), 1.0),
        }
    }

    fn resize_hint(&self) -> ResizeHint {
        Self::resize_hint()
    }
}

/// One take as a row and a lane show it (copied out of the store each frame).
struct TakeView {
    id: TakeId,
    name: String,
    info: GenerationInfo,
    anchor: Option<TakeAnchor>,
    take: Arc<Take>,
}

/// The prompt region as last copied out of the capture history.
struct PromptView {
    /// Planar audio at the host rate.
    audio: Vec<Vec<f32>>,
    /// The last summary made, and its column count.
    summary: (usize, Vec<Column>),
    ruler: Ruler,
    /// Seconds of prompt audio.
    prompt_s: f64,
    /// Seconds the lane shows (the prompt plus the bar now being played).
    lane_s: f64,
    bars: Option<f64>,
}

impl PromptView {
    /// The prompt summarised into `columns` columns (cached while the count stays).
    fn columns(&mut self, columns: usize) -> &[Column] {
        if self.summary.0 != columns {
            self.summary = (columns, summarise_planar(&self.audio, columns));
        }
        &self.summary.1
    }
}

/// The egui application drawn in the window. Lives on the GUI thread.
pub struct SegueApp {
    params: Arc<SegueParams>,
    shared: Arc<Shared>,
    memory: Arc<Mutex<Memory>>,
    /// The host's GUI context, set when the window is built; needed to change parameters.
    gui: Option<GuiContext>,
    /// The prompt text being edited (written to the parameters on every change).
    prompt_text: String,
    /// The model field being edited (written when it loses focus or on Enter).
    model_text: String,
    /// The seed field being edited (written when it loses focus).
    seed_text: String,
    /// Take names being edited.
    names: HashMap<TakeId, String>,
    summaries: SummaryCache,
    prompt: Option<PromptView>,
    /// Why there is no prompt to show.
    prompt_missing: String,
    /// When the prompt region was last copied, and what it was cut from.
    prompt_checked: Option<PromptCheck>,
    /// The capture position last seen, and when it last changed.
    last_frames: (Option<u64>, Instant),
}

impl SegueApp {
    /// An app showing (and editing) `params` and the instance's `shared` state.
    fn new(params: Arc<SegueParams>, shared: Arc<Shared>, memory: Arc<Mutex<Memory>>) -> Self {
        let prompt_text = params.prompt_text.read().clone();
        let model_text = params.model.read().clone();
        Self {
            params,
            shared,
            memory,
            gui: None,
            prompt_text,
            model_text,
            seed_text: String::new(),
            names: HashMap::new(),
            summaries: SummaryCache::default(),
            prompt: None,
            prompt_missing: String::new(),
            prompt_checked: None,
            last_frames: (None, Instant::now()),
        }
    }

    fn send(&self, command: Command) {
        self.shared.send(command);
    }

    /// Asks for a generation at the capture's current frame (see the module comment).
    fn generate(&self) {
        let frame = self
            .shared
            .capture
            .lock()
            .as_ref()
            .map(|r| r.frames_written());
        match frame {
            Some(frame) => self.shared.request(frame),
            None => self.shared.status.lock().set_notice(Some(
                "the plugin is not running: start playback in the host (or enable the track)"
                    .to_owned(),
            )),
        }
    }

    fn takes(&self) -> (Vec<TakeView>, Option<TakeId>) {
        let store = self.shared.store.lock();
        let views = store
            .entries()
            .iter()
            .map(|e| TakeView {
                id: e.id,
                name: e.name.clone(),
                info: e.info.clone(),
                anchor: e.anchor,
                take: e.take.clone(),
            })
            .collect();
        (views, store.selected())
    }

    /// Copies the prompt region out of the history again when it changed: on the musical
    /// timeline only when a new bar line has passed (the region ends at the last one) or the
    /// prompt length changed; without one (the region is the last seconds), or while no prompt
    /// can be cut yet, at most every [`PROMPT_REFRESH`] while new audio arrives.
    fn refresh_prompt(&mut self) {
        let bars = self.params.prompt_bars.value();
        let reader = self.shared.capture.lock().clone();
        let Some(reader) = reader else {
            self.prompt = None;
            self.prompt_missing = "Not running: the host has not started the plugin.".to_owned();
            return;
        };
        let frames = reader.frames_written();
        let bar_line = reader.transport_now().and_then(|now| now.grid).map(|g| {
            crate::transport::bar_line_before(
                g.pos_beats,
                g.time_sig.beats_per_bar(),
                g.origin_beats,
            )
        });
        let check = PromptCheck {
            at: Instant::now(),
            frames,
            bars,
            bar_line,
        };
        if !prompt_due(self.prompt_checked.as_ref(), &check, self.prompt.is_some()) {
            return;
        }
        self.prompt_checked = Some(check);
        match reader.prompt(&PromptRequest::now(f64::from(bars), f64::from(bars))) {
            Ok(prompt) => {
                // The bar line the region really ends at: should the history not have reached
                // the one the transport suggests, the next check tries again.
                if let Some(c) = self.prompt_checked.as_mut() {
                    c.bar_line = prompt.anchor.map(|a| a.beats);
                }
                self.prompt = Some(prompt_view(prompt));
            }
            Err(e) => {
                self.prompt = None;
                self.prompt_missing = format!(
                    "Play something: the last {bars} bar{} before a bar line become the prompt.\n({e})",
                    if bars == 1 { "" } else { "s" }
                );
            }
        }
    }
}

/// What the prompt region was last cut from.
#[derive(Debug, Clone, Copy)]
pub struct PromptCheck {
    /// When.
    pub at: Instant,
    /// Capture frames written then.
    pub frames: u64,
    /// Prompt length in bars then.
    pub bars: i32,
    /// The last bar line passed then, in beats (`None` without a musical position).
    pub bar_line: Option<f64>,
}

/// Whether the prompt region must be cut again (see [`SegueApp`]'s `refresh_prompt`): never cut
/// or another length; otherwise at most every [`PROMPT_REFRESH`], and then on the musical
/// timeline only when the last bar line passed is not the one the region ends at (`last.bar_line`
/// holds the region's own), without one (or without a prompt so far: `have_prompt`) when new
/// audio arrived.
pub fn prompt_due(last: Option<&PromptCheck>, now: &PromptCheck, have_prompt: bool) -> bool {
    let Some(last) = last else {
        return true;
    };
    if last.bars != now.bars {
        return true;
    }
    if now.at.duration_since(last.at) < PROMPT_REFRESH {
        return false;
    }
    match (last.bar_line, now.bar_line) {
        (Some(a), Some(b)) if have_prompt => (a - b).abs() > 1e-9,
        _ => now.frames != last.frames,
    }
}

fn prompt_view(prompt: Prompt) -> PromptView {
    let prompt_s = timeline::frames_to_s(prompt.frames() as u64, prompt.sample_rate);
    let (ruler, lane_s) = match (&prompt.anchor, prompt.bars) {
        (Some(a), Some(bars)) => {
            let ruler = Ruler::Bars {
                tempo_bpm: a.tempo_bpm,
                time_sig: a.time_sig,
                first_bar: a.bar_index - bars.round() as i64,
            };
            let bar_s = ruler.seconds_per_bar().unwrap_or(0.0);
            (ruler, prompt_s + bar_s)
        }
        _ => (Ruler::Seconds, prompt_s),
    };
    PromptView {
        audio: prompt.audio,
        summary: (0, Vec::new()),
        ruler,
        prompt_s,
        lane_s,
        bars: prompt.bars,
    }
}

/// Colours of the window (on egui's dark theme).
mod palette {
    use egui::Color32;
    pub const LANE_BG: Color32 = Color32::from_rgb(24, 26, 30);
    pub const BAR_LINE: Color32 = Color32::from_rgb(70, 74, 82);
    pub const BEAT_LINE: Color32 = Color32::from_rgb(40, 43, 49);
    pub const PROMPT_WAVE: Color32 = Color32::from_rgb(120, 170, 230);
    pub const TAKE_WAVE: Color32 = Color32::from_rgb(120, 210, 160);
    pub const SELECTED_WAVE: Color32 = Color32::from_rgb(250, 200, 90);
    pub const PLAYHEAD: Color32 = Color32::from_rgb(255, 90, 80);
    pub const NOW_BAR: Color32 = Color32::from_rgb(36, 40, 48);
    pub const ROW_BG: Color32 = Color32::from_rgb(16, 17, 20);
    pub const ERROR: Color32 = Color32::from_rgb(255, 120, 110);
    pub const GOOD: Color32 = Color32::from_rgb(140, 210, 150);
    pub const LABEL: Color32 = Color32::from_rgb(200, 204, 210);
}

impl NiceEguiApp for SegueApp {
    fn build(
        &mut self,
        _egui_ctx: egui::Context,
        nice_gui_ctx: GuiContext,
        _frame: &mut Frame,
    ) -> Result<(), nice_plug_egui::baseview::HandlerError> {
        self.gui = Some(nice_gui_ctx);
        Ok(())
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut Frame) {
        let Some(gui) = self.gui.clone() else {
            return;
        };
        let setter = gui.param_setter();
        let status = self.shared.status.lock().clone();
        let (takes, selected) = self.takes();
        let player = self.shared.player_status.lock().clone();
        let playing = player.as_ref().and_then(|p| p.playing_take());
        let auditioning = player.as_ref().and_then(|p| p.auditioning());
        let transport = self
            .shared
            .capture
            .lock()
            .as_ref()
            .and_then(|r| r.transport_now());
        // Playheads only move while the host runs the audio thread (some hosts stop calling it
        // when idle, leaving the last "playing" report behind).
        let frames = transport.map(|t| t.frames);
        if frames != self.last_frames.0 {
            self.last_frames = (frames, Instant::now());
        }
        let audio_running = self.last_frames.1.elapsed() < IDLE_POLL * 2;
        ui.ctx().request_repaint_after(repaint_after(
            status.phase.is_running(),
            audio_running,
            transport.is_some_and(|t| t.playing) || playing.is_some() || auditioning.is_some(),
        ));

        let screen = ui.max_rect();
        let layout = Layout::for_size(screen.width(), screen.height());
        egui::CentralPanel::default().show(ui, |ui| {
            in_area(ui, layout.header, |ui| self.header(ui, &status));
            in_area(ui, layout.settings, |ui| {
                group(ui, |ui| {
                    egui::ScrollArea::vertical()
                        .id_salt("settings-scroll")
                        .show(ui, |ui| self.settings(ui, &setter, &takes));
                })
            });
            in_area(ui, layout.generate, |ui| {
                group(ui, |ui| self.generate_block(ui, &status))
            });
            in_area(ui, layout.timeline, |ui| {
                self.timeline(ui, &takes, selected, player.as_deref(), transport)
            });
            in_area(ui, layout.takes, |ui| {
                group(ui, |ui| {
                    self.take_list(ui, &takes, selected, auditioning.map(|a| a.0))
                })
            });
            in_area(ui, layout.export, |ui| {
                group(ui, |ui| self.export_bar(ui, &takes, selected, &status))
            });
        });
        let alive: Vec<TakeId> = takes.iter().map(|t| t.id).collect();
        self.summaries.retain(&alive);
        self.names.retain(|id, _| alive.contains(id));
    }

    fn resized(&mut self, new_size: nice_plug_egui::baseview::WindowSize) {
        *self.params.editor_size.write() = EditorSize {
            width: new_size.logical.width.round().max(1.0) as u32,
            height: new_size.logical.height.round().max(1.0) as u32,
        };
    }

    fn editor_closed(&mut self) {
        self.gui = None;
        // Nothing is computed for a closed window; summaries are rebuilt on the next opening.
        self.summaries = SummaryCache::default();
        self.prompt = None;
        self.prompt_checked = None;
    }
}

/// How soon the window draws again when nothing happens to it: [`ANIMATION`] while a generation
/// runs or, with the audio thread running (`audio_running`), while something moves under the
/// playhead (`moving`: the transport plays, a take or an audition sounds); else [`IDLE_POLL`].
pub fn repaint_after(generating: bool, audio_running: bool, moving: bool) -> Duration {
    if generating || (audio_running && moving) {
        ANIMATION
    } else {
        IDLE_POLL
    }
}

/// Runs `add` in a child UI confined to `area`.
fn in_area<R>(ui: &mut egui::Ui, area: Area, add: impl FnOnce(&mut egui::Ui) -> R) -> R {
    ui.scope_builder(UiBuilder::new().max_rect(area.rect()), |ui| {
        ui.set_clip_rect(area.rect());
        add(ui)
    })
    .inner
}

/// A framed group filling the available space.
fn group<R>(ui: &mut egui::Ui, add: impl FnOnce(&mut egui::Ui) -> R) -> R {
    let full = ui.available_rect_before_wrap();
    egui::Frame::group(ui.style())
        .show(ui, |ui| {
            let margin = 2.0 * 7.0;
            ui.set_min_size(egui::vec2(
                (full.width() - margin).max(0.0),
                (full.height() - margin).max(0.0),
            ));
            ui.set_max_size(ui.min_size());
            add(ui)
        })
        .inner
}

impl SegueApp {
    fn header(&self, ui: &mut egui::Ui, status: &Status) {
        ui.horizontal_centered(|ui| {
            ui.heading("Segue");
            ui.label(
                egui::RichText::new(format!("v{}", env!("CARGO_PKG_VERSION")))
                    .small()
                    .weak(),
            );
            ui.separator();
            let model = status
                .model
                .clone()
                .unwrap_or_else(|| self.params.model.read().clone());
            ui.label(settings::model_label(&model));
            match (&status.device, &status.device_note) {
                (Some(device), None) => {
                    ui.label(egui::RichText::new(format!("on {device}")).weak());
                }
                (Some(device), Some(note)) => {
                    ui.label(egui::RichText::new(format!("on {device}")).weak())
                        .on_hover_text(note);
                }
                (None, _) => {
                    ui.label(egui::RichText::new("not loaded yet").weak());
                }
            }
            ui.separator();
            let colour = match status.phase {
                Phase::Failed(_) => palette::ERROR,
                Phase::Ready { .. } => palette::GOOD,
                _ => palette::LABEL,
            };
            let line = match &status.phase {
                // The full reason is in the settings column.
                Phase::Failed(_) => "Generation failed".to_owned(),
                _ => status.line(),
            };
            ui.label(egui::RichText::new(line).color(colour));
        });
    }

    fn settings(&mut self, ui: &mut egui::Ui, setter: &ParamSetter, takes: &[TakeView]) {
        ui.spacing_mut().item_spacing.y = 6.0;
        ui.horizontal(|ui| {
            ui.strong("Prompt");
            ui.menu_button("Examples…", |ui| {
                for example in settings::EXAMPLE_PROMPTS {
                    if ui.button(example).clicked() {
                        self.prompt_text = example.to_owned();
                        *self.params.prompt_text.write() = self.prompt_text.clone();
                        ui.close();
                    }
                }
            });
        });
        let edit = ui.add(
            egui::TextEdit::multiline(&mut self.prompt_text)
                .desired_rows(3)
                .desired_width(f32::INFINITY)
                .hint_text("Describe the music to continue into…"),
        );
        if edit.changed() {
            *self.params.prompt_text.write() = self.prompt_text.clone();
        } else if !edit.has_focus() {
            // A state the host loaded shows up.
            let saved = self.params.prompt_text.read();
            if *saved != self.prompt_text {
                self.prompt_text = saved.clone();
            }
        }

        ui.add_space(4.0);
        ui.strong("Model");
        self.model_picker(ui);

        ui.add_space(4.0);
        ui.strong("Generation");
        let old = self.params.sampling.read().clone();
        let mut s = old.clone();
        let last_seed = takes.last().and_then(|t| t.info.seed);
        egui::Grid::new("sampling")
            .num_columns(2)
            .spacing([10.0, 6.0])
            .show(ui, |ui| {
                ui.label("Prompt bars");
                ui.add(ParamSlider::for_param(&self.params.prompt_bars, setter).with_width(150.0));
                ui.end_row();
                ui.label("Continuation bars");
                ui.add(
                    ParamSlider::for_param(&self.params.continuation_bars, setter)
                        .with_width(150.0),
                );
                ui.end_row();
                ui.label("Takes");
                ui.add(egui::Slider::new(&mut s.takes, settings::TAKES));
                ui.end_row();
                ui.label("Temperature");
                ui.add_enabled(
                    !s.greedy,
                    egui::Slider::new(&mut s.temperature, settings::TEMPERATURE).fixed_decimals(2),
                );
                ui.end_row();
                ui.label("Top-k");
                ui.add_enabled(
                    !s.greedy,
                    egui::Slider::new(&mut s.top_k, settings::TOP_K).logarithmic(true),
                );
                ui.end_row();
                ui.label("Top-p");
                ui.add_enabled(
                    !s.greedy,
                    egui::Slider::new(&mut s.top_p, settings::TOP_P).fixed_decimals(2),
                )
                .on_hover_text("1.00 = off");
                ui.end_row();
                ui.label("Guidance");
                ui.add(
                    egui::Slider::new(&mut s.guidance_scale, settings::GUIDANCE).fixed_decimals(1),
                )
                .on_hover_text("How closely the text prompt is followed (1 = ignore it)");
                ui.end_row();
                ui.label("Greedy");
                ui.checkbox(&mut s.greedy, "most likely token (no sampling)");
                ui.end_row();
            });
        // The seed row is wider than the grid's second column.
        ui.horizontal(|ui| {
            ui.label("Seed");
            let shown = settings::shown_seed(&s, last_seed);
            let mut locked = s.seed.is_some();
            let field = ui.add(
                egui::TextEdit::singleline(&mut self.seed_text)
                    .desired_width(120.0)
                    .char_limit(20),
            );
            if field.lost_focus() {
                match settings::parse_seed(&self.seed_text) {
                    Some(seed) if Some(seed) != s.seed => {
                        s = settings::with_seed_lock(&s, true, seed);
                    }
                    _ => self.seed_text = shown.to_string(),
                }
            } else if !field.has_focus() {
                self.seed_text = shown.to_string();
            }
            if ui
                .button("Random")
                .on_hover_text("A new random seed (locked)")
                .clicked()
            {
                s = settings::with_random_seed(&s);
            }
            if ui
                .checkbox(&mut locked, "Lock")
                .on_hover_text(
                    "Locked: every generation uses this seed. Unlocked: a fresh one each time.",
                )
                .changed()
            {
                s = settings::with_seed_lock(&s, locked, shown);
            }
        });
        if s != old {
            *self.params.sampling.write() = settings::clamped(&s);
        }
    }

    fn generate_block(&mut self, ui: &mut egui::Ui, status: &Status) {
        let running = status.phase.is_running() || self.shared.busy();
        ui.horizontal(|ui| {
            let generate = egui::Button::new(
                egui::RichText::new(if running {
                    "Generate again"
                } else {
                    "Generate"
                })
                .strong()
                .size(15.0),
            )
            .min_size(egui::vec2(130.0, 30.0));
            if ui
                .add(generate)
                .on_hover_text("Continue the last bars you played (from the last bar line)")
                .clicked()
            {
                self.generate();
            }
            if ui
                .add_enabled(
                    running,
                    egui::Button::new("Cancel").min_size(egui::vec2(80.0, 30.0)),
                )
                .clicked()
            {
                self.send(Command::Cancel);
            }
        });
        egui::ScrollArea::vertical()
            .id_salt("progress-scroll")
            .auto_shrink([false, true])
            .show(ui, |ui| self.progress(ui, status));
    }

    fn model_picker(&mut self, ui: &mut egui::Ui) {
        let current = self.params.model.read().clone();
        let is_choice = settings::MODEL_CHOICES.iter().any(|c| c.id == current);
        let mut chosen: Option<String> = None;
        egui::ComboBox::from_id_salt("model")
            .width(ui.available_width() - 8.0)
            .selected_text(settings::model_label(&current))
            .show_ui(ui, |ui| {
                for choice in settings::MODEL_CHOICES {
                    if ui
                        .selectable_label(current == choice.id, choice.label)
                        .on_hover_text(choice.id)
                        .clicked()
                    {
                        chosen = Some(choice.id.to_owned());
                    }
                }
                if ui
                    .selectable_label(!is_choice, "Local folder or other Hub id…")
                    .clicked()
                    && is_choice
                {
                    chosen = Some(String::new());
                }
            });
        if let Some(model) = chosen {
            if !model.is_empty() {
                *self.params.model.write() = model.clone();
            }
            self.model_text = model;
        }
        let is_choice = settings::MODEL_CHOICES
            .iter()
            .any(|c| c.id == *self.params.model.read());
        if !is_choice || self.model_text.is_empty() {
            let choosing = self.memory.lock().choosing;
            let field = ui
                .horizontal(|ui| {
                    let field = ui.add_enabled(
                        !choosing,
                        egui::TextEdit::singleline(&mut self.model_text)
                            .desired_width(ui.available_width() - 76.0)
                            .hint_text("/path/to/model folder or owner/name"),
                    );
                    if ui
                        .add_enabled(!choosing, egui::Button::new("Choose…"))
                        .on_hover_text("Pick a model folder (config.json, weights, tokenizer)")
                        .clicked()
                    {
                        let model = self.params.model.clone();
                        let start = take_list::expand_home(self.model_text.trim());
                        self.choose_folder("Model folder", start, move |folder| {
                            *model.write() = folder.display().to_string();
                        });
                    }
                    field
                })
                .inner;
            // (A single-line field loses focus on Enter too.)
            if field.lost_focus() && !self.model_text.trim().is_empty() {
                *self.params.model.write() = self.model_text.trim().to_owned();
            } else if !field.has_focus() && (!self.model_text.is_empty() || !is_choice) {
                let saved = self.params.model.read();
                if *saved != self.model_text {
                    self.model_text = saved.clone();
                }
            }
        } else {
            self.model_text = self.params.model.read().clone();
        }
    }

    fn progress(&self, ui: &mut egui::Ui, status: &Status) {
        match &status.phase {
            Phase::Generating {
                step,
                total,
                steps_per_s,
            } => {
                let fraction = if *total > 0 {
                    *step as f32 / *total as f32
                } else {
                    0.0
                };
                let mut text = format!("step {step} of {total}");
                if *steps_per_s > 0.0 {
                    text.push_str(&format!(" · {steps_per_s:.1} steps/s"));
                }
                if let Some(left) = time_left(*step, *total, *steps_per_s) {
                    text.push_str(&format!(" · {} left", format_duration(left)));
                }
                ui.add(egui::ProgressBar::new(fraction).text(text));
            }
            Phase::Starting => {
                ui.add(egui::ProgressBar::new(0.0).animate(true).text("starting…"));
            }
            Phase::Loading(loading) => {
                let text = status.line();
                let bar = match loading.fraction() {
                    Some(f) => egui::ProgressBar::new(f).text(text),
                    None => egui::ProgressBar::new(0.0).animate(true).text(text),
                };
                ui.add(bar);
            }
            Phase::Failed(reason) => {
                ui.label(
                    egui::RichText::new(format!("Generation failed: {reason}"))
                        .color(palette::ERROR),
                );
            }
            Phase::Cancelled => {
                ui.label("Cancelled.");
            }
            // The header says it.
            Phase::Idle | Phase::Ready { .. } => {}
        }
        if let Some(notice) = &status.notice {
            ui.horizontal_wrapped(|ui| {
                ui.label(egui::RichText::new(notice).color(palette::ERROR));
                if ui.small_button("Dismiss").clicked() {
                    self.shared.status.lock().set_notice(None);
                }
            });
        }
    }

    fn timeline(
        &mut self,
        ui: &mut egui::Ui,
        takes: &[TakeView],
        selected: Option<TakeId>,
        player: Option<&crate::playback::PlayerStatus>,
        transport: Option<crate::capture::TransportNow>,
    ) {
        let area = ui.max_rect();
        let painter = ui.painter_at(area);
        painter.rect_filled(area, 4.0, palette::ROW_BG);
        let inner = area.shrink(6.0);
        self.refresh_prompt();

        // Lanes: the prompt first, then the takes (oldest first), as many as fit; the selected
        // take always among them.
        let lane_gap = 4.0;
        let min_lane_h = 34.0;
        let fit = (((inner.height() + lane_gap) / (min_lane_h + lane_gap)).floor() as usize).max(1);
        let mut shown: Vec<&TakeView> = takes.iter().collect();
        if shown.len() + 1 > fit {
            let keep = fit - 1;
            let mut kept: Vec<&TakeView> = shown.iter().rev().take(keep).copied().collect();
            if let Some(sel) = selected.and_then(|s| shown.iter().find(|t| t.id == s)) {
                if keep > 0 && !kept.iter().any(|t| t.id == sel.id) {
                    kept.pop();
                    kept.push(sel);
                }
            }
            kept.sort_by_key(|t| takes.iter().position(|x| x.id == t.id));
            shown = kept;
        }
        let mut specs: Vec<(Ruler, f64)> = Vec::new();
        if let Some(p) = &self.prompt {
            specs.push((p.ruler, p.lane_s));
        }
        for t in &shown {
            let len_s = timeline::frames_to_s(t.take.capacity() as u64, t.take.sample_rate());
            specs.push((Ruler::for_take(t.anchor.as_ref()), len_s));
        }
        let arrangement = timeline::arrange(&specs, timeline::MAX_SHARED_BARS);
        let width = inner.width().max(1.0) as f64;
        let Some(scale) = px_per_s(width, [arrangement.len_s]) else {
            let galley = painter.layout(
                self.prompt_missing.clone(),
                FontId::proportional(13.0),
                ui.visuals().weak_text_color(),
                inner.width() - 40.0,
            );
            painter.galley(
                inner.center() - galley.size() / 2.0,
                galley,
                ui.visuals().weak_text_color(),
            );
            return;
        };
        let lanes = specs.len() + usize::from(self.prompt.is_none());
        let lane_h = ((inner.height() - lane_gap * (lanes - 1) as f32) / lanes as f32).min(140.0);
        let x_of = |s: f64| inner.left() + (s * scale) as f32;
        let shared = arrangement.shared;
        let row_at = |i: usize| {
            Rect::from_min_size(
                Pos2::new(inner.left(), inner.top() + i as f32 * (lane_h + lane_gap)),
                egui::vec2(inner.width(), lane_h),
            )
        };

        // Grid and labels of a lane: the shared ruler over the whole row, or the lane's own.
        let draw_grid = |row: Rect, ruler: &Ruler, offset_s: f64, len_s: f64| {
            let (ruler, from, len) = match &shared {
                Some(r) => (r, 0.0, arrangement.len_s),
                None => (ruler, offset_s, len_s),
            };
            let mut labels = Vec::new();
            for line in grid_lines(ruler, len, scale, 8.0, 28.0) {
                let x = x_of(from + line.at_s);
                let colour = if line.major {
                    palette::BAR_LINE
                } else {
                    palette::BEAT_LINE
                };
                painter.line_segment(
                    [Pos2::new(x, row.top()), Pos2::new(x, row.bottom())],
                    Stroke::new(1.0, colour),
                );
                if let Some(label) = line.label {
                    if x < row.right() - 14.0 {
                        labels.push((x, label));
                    }
                }
            }
            labels
        };
        let draw_labels = |row: Rect, labels: Vec<(f32, String)>, title: &str| {
            for (x, label) in labels {
                painter.text(
                    Pos2::new(x + 3.0, row.bottom() - 2.0),
                    Align2::LEFT_BOTTOM,
                    label,
                    FontId::monospace(10.0),
                    palette::LABEL.gamma_multiply(0.6),
                );
            }
            painter.text(
                row.left_top() + egui::vec2(5.0, 3.0),
                Align2::LEFT_TOP,
                title,
                FontId::proportional(12.0),
                palette::LABEL,
            );
        };

        let mut lane_index = 0;
        let prompt_row = row_at(0);
        match self.prompt.as_mut() {
            Some(p) => {
                let offset = arrangement.offsets_s[0];
                let body = Rect::from_min_max(
                    Pos2::new(x_of(offset), prompt_row.top()),
                    Pos2::new(
                        x_of(offset + p.lane_s).min(prompt_row.right()),
                        prompt_row.bottom(),
                    ),
                );
                painter.rect_filled(body, 3.0, palette::LANE_BG);
                // The bar being played now, after the prompt.
                painter.rect_filled(
                    Rect::from_min_max(Pos2::new(x_of(offset + p.prompt_s), body.top()), body.max),
                    0.0,
                    palette::NOW_BAR,
                );
                let labels = draw_grid(prompt_row, &p.ruler, offset, p.lane_s);
                let cols = (p.prompt_s * scale).round().max(0.0) as usize;
                draw_wave(&painter, body, p.columns(cols), palette::PROMPT_WAVE);
                let title = match p.bars {
                    Some(b) => format!("Prompt · the last {b} bars"),
                    None => format!("Prompt · the last {:.0} s", p.prompt_s),
                };
                draw_labels(prompt_row, labels, &title);
                if shared.is_none() {
                    if let Some(at) = transport.and_then(|t| transport_playhead_s(&p.ruler, &t)) {
                        draw_playhead(&painter, prompt_row, x_of(offset + at), body);
                    }
                }
                lane_index += 1;
            }
            None => {
                painter.rect_filled(prompt_row, 3.0, palette::LANE_BG);
                let galley = painter.layout(
                    self.prompt_missing.clone(),
                    FontId::proportional(12.0),
                    ui.visuals().weak_text_color(),
                    prompt_row.width() - 20.0,
                );
                painter.galley(
                    prompt_row.center() - galley.size() / 2.0,
                    galley,
                    ui.visuals().weak_text_color(),
                );
            }
        }
        for (k, t) in shown.iter().enumerate() {
            // Row 0 is the prompt's, with or without a prompt.
            let row = row_at(1 + k);
            let (ruler, len_s) = specs[lane_index];
            let offset = arrangement.offsets_s[lane_index];
            lane_index += 1;
            let body = Rect::from_min_max(
                Pos2::new(x_of(offset), row.top()),
                Pos2::new(x_of(offset + len_s).min(row.right()), row.bottom()),
            );
            let is_selected = selected == Some(t.id);
            painter.rect_filled(body, 3.0, palette::LANE_BG);
            let labels = draw_grid(row, &ruler, offset, len_s);
            let cols = ((len_s * scale).round() as usize).max(1);
            let colour = if is_selected {
                palette::SELECTED_WAVE
            } else {
                palette::TAKE_WAVE
            };
            draw_wave(&painter, body, self.summaries.take(&t.take, cols), colour);
            draw_labels(row, labels, &t.name);
            if is_selected {
                painter.rect_stroke(
                    body,
                    3.0,
                    Stroke::new(1.5, palette::SELECTED_WAVE),
                    StrokeKind::Inside,
                );
            }
            // Where the player is in this take (any mode, or the audition).
            let rate = t.take.sample_rate();
            let at = player.and_then(|p| {
                if p.playing_take() == Some(t.id) {
                    Some(timeline::frames_to_s(p.frame(), rate))
                } else {
                    p.auditioning()
                        .filter(|(id, _)| *id == t.id)
                        .map(|(_, frame)| timeline::frames_to_s(frame, rate))
                }
            });
            let at = match (at, shared) {
                (Some(at), _) => Some(at),
                // Each lane on its own: the transport where it runs over the take.
                (None, None) => transport
                    .and_then(|now| transport_playhead_s(&ruler, &now))
                    .filter(|s| (0.0..len_s).contains(s)),
                (None, Some(_)) => None,
            };
            if let Some(at) = at {
                draw_playhead(&painter, row, x_of(offset + at), body);
            }
            let click = ui.interact(
                row,
                egui::Id::unique(("segue-lane", t.id.0)),
                egui::Sense::click(),
            );
            if click.clicked() && !is_selected {
                self.send(Command::Select(Some(t.id)));
            }
            click.on_hover_text("Click to play this take");
        }
        // On a shared axis, the transport's playhead runs over every lane.
        if let Some(ruler) = shared {
            if let Some(at) = transport.and_then(|now| transport_playhead_s(&ruler, &now)) {
                if (0.0..=arrangement.len_s).contains(&at) {
                    let bottom = row_at(lanes - 1).bottom();
                    let x = x_of(at);
                    painter.line_segment(
                        [Pos2::new(x, inner.top()), Pos2::new(x, bottom)],
                        Stroke::new(2.0, palette::PLAYHEAD),
                    );
                }
            }
        }
    }

    fn take_list(
        &mut self,
        ui: &mut egui::Ui,
        takes: &[TakeView],
        selected: Option<TakeId>,
        auditioning: Option<TakeId>,
    ) {
        ui.horizontal(|ui| {
            ui.strong("Takes");
            ui.label(
                egui::RichText::new(match takes.len() {
                    0 => "none yet: press Generate after playing a few bars".to_owned(),
                    1 => "1 take".to_owned(),
                    n => format!("{n} takes"),
                })
                .weak(),
            );
        });
        egui::ScrollArea::vertical()
            .id_salt("takes-scroll")
            .auto_shrink([false, false])
            .show(ui, |ui| {
                for t in takes.iter().rev() {
                    self.take_row(ui, t, selected, auditioning);
                    ui.separator();
                }
            });
    }

    fn take_row(
        &mut self,
        ui: &mut egui::Ui,
        t: &TakeView,
        selected: Option<TakeId>,
        auditioning: Option<TakeId>,
    ) {
        let is_selected = selected == Some(t.id);
        ui.horizontal(|ui| {
            if ui
                .radio(is_selected, "")
                .on_hover_text(if is_selected {
                    "This take plays (click to silence it)"
                } else {
                    "Play this take"
                })
                .clicked()
            {
                self.send(take_list::select_command(t.id, selected));
            }
            let name = self.names.entry(t.id).or_insert_with(|| t.name.clone());
            let edit = ui.add(egui::TextEdit::singleline(name).desired_width(130.0));
            if edit.lost_focus() {
                match take_list::rename_command(t.id, &t.name, name) {
                    Some(cmd) => self.send(cmd),
                    None => *name = t.name.clone(),
                }
            } else if !edit.has_focus() && *name != t.name {
                *name = t.name.clone();
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if ui.small_button("Delete").clicked() {
                    self.send(Command::Delete(t.id));
                }
                if ui
                    .small_button("Extend")
                    .on_hover_text("Continue this take from its end")
                    .clicked()
                {
                    self.send(Command::Extend(t.id));
                }
                if ui.small_button("Export").clicked() {
                    self.export(ExportScope::One(t.id), &[t.id], selected);
                }
                let auditioned = auditioning == Some(t.id);
                if ui
                    .small_button(if auditioned { "Stop" } else { "Audition" })
                    .on_hover_text("Hear the take from its start now, whatever the transport does")
                    .clicked()
                {
                    self.send(take_list::audition_command(t.id, auditioning));
                }
            });
        });
        let (valid, complete) = t.take.available();
        let mut place = take_list::place_line(t.anchor.as_ref(), valid, t.take.sample_rate());
        if !complete {
            place.push_str(" (arriving)");
        }
        ui.label(
            egui::RichText::new(format!("{place} · {}", take_list::info_line(&t.info)))
                .small()
                .weak(),
        )
        .on_hover_text(if t.info.text.is_empty() {
            "(no text prompt)".to_owned()
        } else {
            format!("“{}”", t.info.text)
        });
    }

    /// Opens the system's folder dialog on its own thread (it blocks until the user picks), so
    /// the window keeps drawing; `deliver` gets the folder picked, if any.
    fn choose_folder(
        &self,
        title: &'static str,
        start: std::path::PathBuf,
        deliver: impl FnOnce(std::path::PathBuf) + Send + 'static,
    ) {
        let memory = self.memory.clone();
        memory.lock().choosing = true;
        let spawned = std::thread::Builder::new()
            .name("segue-folder-dialog".into())
            .spawn({
                let memory = memory.clone();
                move || {
                    let mut dialog = rfd::AsyncFileDialog::new().set_title(title);
                    if start.is_dir() {
                        dialog = dialog.set_directory(&start);
                    }
                    let picked = pollster::block_on(dialog.pick_folder());
                    if let Some(folder) = picked {
                        deliver(folder.path().to_path_buf());
                    }
                    memory.lock().choosing = false;
                }
            });
        if let Err(e) = spawned {
            memory.lock().choosing = false;
            self.shared
                .status
                .lock()
                .set_notice(Some(format!("cannot open the folder dialog: {e}")));
        }
    }

    fn export(&self, scope: ExportScope, ids: &[TakeId], selected: Option<TakeId>) {
        let memory = self.memory.lock().clone();
        if let Some(request) = take_list::export_request(
            scope,
            ids,
            selected,
            &memory.export_folder,
            memory.export_rate,
        ) {
            self.send(Command::Export(request));
        }
    }

    fn export_bar(
        &mut self,
        ui: &mut egui::Ui,
        takes: &[TakeView],
        selected: Option<TakeId>,
        status: &Status,
    ) {
        let host_rate = takes
            .first()
            .map(|t| t.take.sample_rate())
            .or_else(|| self.shared.capture.lock().as_ref().map(|r| r.sample_rate()));
        let ids: Vec<TakeId> = takes.iter().map(|t| t.id).collect();
        ui.horizontal(|ui| {
            ui.strong("Export to");
            let choosing = self.memory.lock().choosing;
            {
                let mut memory = self.memory.lock();
                ui.add_enabled(
                    !choosing,
                    egui::TextEdit::singleline(&mut memory.export_folder)
                        .desired_width((ui.available_width() - 320.0).max(100.0)),
                );
            }
            if ui
                .add_enabled(!choosing, egui::Button::new("Choose…"))
                .on_hover_text("Pick the folder in the system's dialog")
                .clicked()
            {
                let memory = self.memory.clone();
                let start = take_list::expand_home(&memory.lock().export_folder);
                self.choose_folder("Export takes to", start, move |folder| {
                    memory.lock().export_folder = folder.display().to_string();
                });
            }
            let mut memory = self.memory.lock();
            let host_label = match host_rate {
                Some(r) => format!("{:.1} kHz", r / 1000.0),
                None => "host rate".to_owned(),
            };
            ui.radio_value(&mut memory.export_rate, ExportRate::Host, host_label)
                .on_hover_text("As the plugin plays it");
            ui.radio_value(&mut memory.export_rate, ExportRate::Model, "32 kHz")
                .on_hover_text("As the model made it");
        });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(selected.is_some(), egui::Button::new("Export selected"))
                .clicked()
            {
                self.export(ExportScope::Selected, &ids, selected);
            }
            if ui
                .add_enabled(!ids.is_empty(), egui::Button::new("Export all"))
                .clicked()
            {
                self.export(ExportScope::All, &ids, selected);
            }
            match &status.export {
                Some(Ok(report)) => {
                    let names: Vec<String> = report
                        .files
                        .iter()
                        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .collect();
                    let folder = report.folder.display().to_string();
                    if ui.small_button("Show folder").clicked() {
                        ui.ctx()
                            .open_url(egui::OpenUrl::new_tab(format!("file://{folder}")));
                    }
                    ui.label(
                        egui::RichText::new(format!("Wrote {} to {folder}", names.join(", ")))
                            .color(palette::GOOD),
                    )
                    .on_hover_text(folder);
                }
                Some(Err(e)) => {
                    ui.label(
                        egui::RichText::new(format!("Export failed: {e}")).color(palette::ERROR),
                    );
                }
                None => {
                    ui.label(
                        egui::RichText::new(
                            "32-bit float WAV; existing files are never overwritten",
                        )
                        .weak(),
                    );
                }
            }
        });
    }
}

/// The waveform: one vertical stroke per column from its minimum to its maximum.
fn draw_wave(painter: &egui::Painter, lane: Rect, columns: &[Column], colour: Color32) {
    let mid = lane.center().y;
    let half = lane.height() * 0.45;
    let shapes = columns.iter().enumerate().map(|(i, c)| {
        let x = lane.left() + i as f32 + 0.5;
        let top = mid - c.max.clamp(-1.0, 1.0) * half;
        let bottom = (mid - c.min.clamp(-1.0, 1.0) * half).max(top + 1.0);
        egui::Shape::line_segment(
            [Pos2::new(x, top), Pos2::new(x, bottom)],
            Stroke::new(1.0, colour),
        )
    });
    painter.extend(shapes);
}

/// A playhead at `x` over `row`, where it falls within the lane's `body`.
fn draw_playhead(painter: &egui::Painter, row: Rect, x: f32, body: Rect) {
    if x < body.left() || x > body.right() {
        return;
    }
    painter.line_segment(
        [Pos2::new(x, row.top()), Pos2::new(x, row.bottom())],
        Stroke::new(2.0, palette::PLAYHEAD),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_is_cut_again_only_when_it_changes() {
        let t0 = Instant::now();
        let at = |ms: u64, frames: u64, bars: i32, bar_line: Option<f64>| PromptCheck {
            at: t0 + Duration::from_millis(ms),
            frames,
            bars,
            bar_line,
        };
        let first = at(0, 1000, 4, Some(16.0));
        assert!(prompt_due(None, &first, false), "never cut");
        // Playing on within the bar: the region (ending at beat 16) stays.
        assert!(!prompt_due(
            Some(&first),
            &at(900, 90_000, 4, Some(16.0)),
            true
        ));
        // The next bar line passed (seen at the next check).
        assert!(!prompt_due(
            Some(&first),
            &at(40, 2000, 4, Some(20.0)),
            true
        ));
        assert!(prompt_due(
            Some(&first),
            &at(400, 2000, 4, Some(20.0)),
            true
        ));
        // Another length.
        assert!(prompt_due(Some(&first), &at(1, 1000, 2, Some(16.0)), true));
        // No prompt yet (too little played): retried while audio arrives, not every frame.
        assert!(!prompt_due(
            Some(&first),
            &at(100, 5000, 4, Some(16.0)),
            false
        ));
        assert!(prompt_due(
            Some(&first),
            &at(400, 5000, 4, Some(16.0)),
            false
        ));
        assert!(!prompt_due(
            Some(&first),
            &at(400, 1000, 4, Some(16.0)),
            false
        ));
        // No musical position: the last seconds, refreshed as audio arrives.
        let free = at(0, 1000, 4, None);
        assert!(!prompt_due(Some(&free), &at(100, 9000, 4, None), true));
        assert!(prompt_due(Some(&free), &at(400, 9000, 4, None), true));
        assert!(!prompt_due(Some(&free), &at(400, 1000, 4, None), true));
    }

    #[test]
    fn the_window_animates_only_while_something_moves() {
        assert_eq!(repaint_after(false, false, false), IDLE_POLL);
        assert_eq!(
            repaint_after(false, true, false),
            IDLE_POLL,
            "stopped transport"
        );
        assert_eq!(repaint_after(false, true, true), ANIMATION, "playing");
        assert_eq!(
            repaint_after(false, false, true),
            IDLE_POLL,
            "a host that stopped calling the audio thread leaves nothing moving"
        );
        assert_eq!(repaint_after(true, false, false), ANIMATION, "generating");
        assert!(IDLE_POLL >= ANIMATION * 5);
    }
}
