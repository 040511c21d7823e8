//! Where each part of the window goes, as a pure function of the window's size, so the layout
//! is the same every frame, testable, and known to the host-level screenshot tests.
//!
//! ```text
//! ┌ header: name, model and device, status ───────────────────────────┐
//! │ settings column   │ timeline: prompt and take waveforms on bars   │
//! │ (prompt, model,   ├────────────────────────────────────────────────┤
//! │  sampling, seed)  │ take list                                      │
//! ├───────────────────┤                                                │
//! │ generate, cancel, ├────────────────────────────────────────────────┤
//! │ progress, errors  │ export: folder, rate, buttons, where it went   │
//! └───────────────────┴────────────────────────────────────────────────┘
//! ```

/// An axis-aligned rectangle in logical pixels (`x`, `y` of the top-left corner).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Area {
    /// Left edge.
    pub x: f32,
    /// Top edge.
    pub y: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
}

impl Area {
    /// Right edge.
    pub fn right(&self) -> f32 {
        self.x + self.w
    }

    /// Bottom edge.
    pub fn bottom(&self) -> f32 {
        self.y + self.h
    }

    /// The egui rectangle.
    pub fn rect(&self) -> egui::Rect {
        egui::Rect::from_min_size(egui::pos2(self.x, self.y), egui::vec2(self.w, self.h))
    }

    /// Whether `other` lies within this area.
    pub fn contains(&self, other: &Area) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.right() <= self.right() + 1e-3
            && other.bottom() <= self.bottom() + 1e-3
    }

    fn overlaps(&self, other: &Area) -> bool {
        self.x < other.right()
            && other.x < self.right()
            && self.y < other.bottom()
            && other.y < self.bottom()
    }
}

/// Gap between parts and around the window, in logical pixels.
pub const GAP: f32 = 8.0;
/// Height of the header.
pub const HEADER_H: f32 = 36.0;
/// Width of the settings column.
pub const SETTINGS_W: f32 = 340.0;
/// Height of the generate block (always visible, below the scrolling settings).
pub const GENERATE_H: f32 = 96.0;
/// Height of the export bar.
pub const EXPORT_H: f32 = 84.0;
/// Smallest and largest timeline height.
pub const TIMELINE_H: (f32, f32) = (150.0, 420.0);

/// The window's parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    /// Name, model, device, status.
    pub header: Area,
    /// Prompt, model, sampling settings (scrolls when the window is short).
    pub settings: Area,
    /// Generate and cancel, progress, errors.
    pub generate: Area,
    /// The waveform lanes.
    pub timeline: Area,
    /// The take list.
    pub takes: Area,
    /// Export folder, rate and buttons.
    pub export: Area,
}

impl Layout {
    /// The layout of a window `width` × `height` logical pixels. Below the minimum editor size
    /// parts get small but never negative or overlapping.
    pub fn for_size(width: f32, height: f32) -> Layout {
        let (w, h) = (width.max(0.0), height.max(0.0));
        let header = Area {
            x: GAP,
            y: GAP / 2.0,
            w: (w - 2.0 * GAP).max(0.0),
            h: HEADER_H,
        };
        let top = header.bottom() + GAP / 2.0;
        let body_h = (h - top - GAP).max(0.0);
        let settings_w = SETTINGS_W.min((w - 3.0 * GAP) / 2.0).max(0.0);
        let generate_h = GENERATE_H.min(body_h / 2.0);
        let settings = Area {
            x: GAP,
            y: top,
            w: settings_w,
            h: (body_h - generate_h - GAP).max(0.0),
        };
        let generate = Area {
            x: GAP,
            y: top + body_h - generate_h,
            w: settings_w,
            h: generate_h,
        };
        let right_x = settings.right() + GAP;
        let right_w = (w - right_x - GAP).max(0.0);
        let timeline_h = (body_h * 0.45)
            .clamp(TIMELINE_H.0, TIMELINE_H.1)
            .min((body_h - EXPORT_H - 2.0 * GAP).max(0.0) * 0.6);
        let timeline = Area {
            x: right_x,
            y: top,
            w: right_w,
            h: timeline_h,
        };
        let export = Area {
            x: right_x,
            y: (top + body_h - EXPORT_H).max(timeline.bottom()),
            w: right_w,
            h: EXPORT_H.min(body_h),
        };
        let takes_y = timeline.bottom() + GAP;
        let takes = Area {
            x: right_x,
            y: takes_y,
            w: right_w,
            h: (export.y - GAP - takes_y).max(0.0),
        };
        Layout {
            header,
            settings,
            generate,
            timeline,
            takes,
            export,
        }
    }

    /// Every part, for checks.
    pub fn parts(&self) -> [Area; 6] {
        [
            self.header,
            self.settings,
            self.generate,
            self.timeline,
            self.takes,
            self.export,
        ]
    }

    /// Whether no two parts overlap.
    pub fn is_disjoint(&self) -> bool {
        let parts = self.parts();
        (0..parts.len()).all(|i| {
            (i + 1..parts.len()).all(|j| {
                let (a, b) = (parts[i], parts[j]);
                a.w <= 0.0 || a.h <= 0.0 || b.w <= 0.0 || b.h <= 0.0 || !a.overlaps(&b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::DEFAULT_EDITOR_SIZE;

    #[test]
    fn parts_tile_the_window_without_overlap() {
        for (w, h) in [
            (
                DEFAULT_EDITOR_SIZE.width as f32,
                DEFAULT_EDITOR_SIZE.height as f32,
            ),
            (
                super::super::MIN_EDITOR_SIZE.width as f32,
                super::super::MIN_EDITOR_SIZE.height as f32,
            ),
            (1920.0, 1080.0),
            (3000.0, 400.0),
        ] {
            let l = Layout::for_size(w, h);
            let window = Area {
                x: 0.0,
                y: 0.0,
                w,
                h,
            };
            for part in l.parts() {
                assert!(window.contains(&part), "{part:?} outside {w}x{h}");
                assert!(part.w > 0.0 && part.h > 0.0, "{part:?} empty at {w}x{h}");
            }
            assert!(l.is_disjoint(), "{l:?}");
            // The right column is stacked: timeline, takes, export.
            assert!(l.timeline.bottom() <= l.takes.y);
            assert!(l.takes.bottom() <= l.export.y);
            assert_eq!(l.export.bottom(), h - GAP);
            assert_eq!(l.generate.bottom(), h - GAP);
            assert!(l.settings.bottom() <= l.generate.y);
            assert!(l.timeline.h >= TIMELINE_H.0.min(l.settings.h * 0.3));
            assert_eq!(l.generate.h, GENERATE_H);
        }
    }

    #[test]
    fn extra_room_goes_to_the_waveforms_and_the_list() {
        let small = Layout::for_size(900.0, 600.0);
        let big = Layout::for_size(1400.0, 900.0);
        assert_eq!(small.settings.w, big.settings.w);
        assert!(big.timeline.w > small.timeline.w);
        assert!(big.timeline.h > small.timeline.h);
        assert!(big.takes.h > small.takes.h);
    }

    #[test]
    fn tiny_windows_stay_sane() {
        for (w, h) in [(0.0, 0.0), (10.0, 10.0), (100.0, 50.0)] {
            let l = Layout::for_size(w, h);
            for part in l.parts() {
                assert!(part.w >= 0.0 && part.h >= 0.0, "{part:?} at {w}x{h}");
                assert!(part.x.is_finite() && part.y.is_finite());
            }
        }
    }
}
