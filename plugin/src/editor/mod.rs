//! The plugin window (egui through nice-plug-egui).
//!
//! [`SegueEditor`] is what the host wrapper owns; every time the host opens the window it builds a
//! fresh egui editor at the persisted size ([`SegueParams::editor_size`]) and records every resize
//! there, so the size survives closing the window and reloading the project. The UI itself is
//! [`SegueApp`]; it reads the shared parameters and changes them only through the host's
//! [`ParamSetter`], never by touching audio-thread state.

use crate::params::{EditorSize, SegueParams};
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
use std::error::Error;
use std::sync::Arc;

/// Smallest window the layout still fits in, in logical pixels.
pub const MIN_EDITOR_SIZE: EditorSize = EditorSize {
    width: 420,
    height: 260,
};

/// The editor handed to the host wrapper (see [`Plugin::editor`]).
pub struct SegueEditor {
    params: Arc<SegueParams>,
    /// The egui editor of the window currently (or last) open; `None` before the first spawn.
    current: Mutex<Option<EguiEditor<SegueApp>>>,
}

impl SegueEditor {
    /// Creates the editor; cheap, nothing is opened until the host asks.
    pub fn new(params: Arc<SegueParams>) -> Self {
        Self {
            params,
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
            SegueApp::new(self.params.clone()),
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

/// The egui application drawn in the window. Lives on the GUI thread.
pub struct SegueApp {
    params: Arc<SegueParams>,
    /// The host's GUI context, set when the window is built; needed to change parameters.
    gui: Option<GuiContext>,
}

impl SegueApp {
    /// An app showing (and editing) `params`.
    pub fn new(params: Arc<SegueParams>) -> Self {
        Self { params, gui: None }
    }
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
        let Some(gui) = self.gui.as_ref() else {
            return;
        };
        let setter = gui.param_setter();
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("Segue");
                ui.label(format!("v{}", env!("CARGO_PKG_VERSION")));
            });
            ui.label("Continues what you play with MusicGen, in time with the host.");
            ui.separator();
            egui::Grid::new("segue-params")
                .num_columns(2)
                .spacing([16.0, 8.0])
                .show(ui, |ui| {
                    ui.label(self.params.gain.name());
                    ui.add(ParamSlider::for_param(&self.params.gain, &setter).with_width(220.0));
                    ui.end_row();

                    ui.label(self.params.monitor.name());
                    let mut monitor = self.params.monitor.value();
                    if ui.checkbox(&mut monitor, "pass input through").changed() {
                        setter.begin_set_parameter(&self.params.monitor);
                        setter.set_parameter(&self.params.monitor, monitor);
                        setter.end_set_parameter(&self.params.monitor);
                    }
                    ui.end_row();
                });
        });
    }

    fn resized(&mut self, new_size: nice_plug_egui::baseview::WindowSize) {
        *self.params.editor_size.write() = EditorSize {
            width: new_size.logical.width.round().max(1.0) as u32,
            height: new_size.logical.height.round().max(1.0) as u32,
        };
    }

    fn editor_closed(&mut self) {
        self.gui = None;
    }
}
