//! X11 for editor tests: a display, the host window an editor embeds into, screenshots.
//!
//! [`XServer::get`] uses the display in `DISPLAY` when one answers, and otherwise starts a private
//! `Xvfb` for the test process (it exits with the process: `-terminate` ends it when the last
//! client, the connection held here, goes away). The plugin's GUI toolkit opens its own
//! connection through `DISPLAY`, so a private server's name is put there before any editor opens.
//!
//! When no X server can be had, [`XServer::get`] says why; tests then skip with that reason,
//! except under CI (`CI` set), where a missing display is an error.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{
    ConfigureWindowAux, ConnectionExt as _, CreateWindowAux, EventMask, ImageFormat, ImageOrder,
    Visualtype, Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;

/// A connection to the X server editors are shown on.
pub struct XServer {
    /// Display name, e.g. `:0` or `:97`.
    pub display: String,
    conn: RustConnection,
    screen: usize,
    /// The private Xvfb, when this process started one.
    _xvfb: Option<Mutex<Child>>,
}

/// Display numbers tried for a private Xvfb.
const XVFB_DISPLAYS: std::ops::Range<u32> = 90..140;

impl XServer {
    /// The process-wide X server, started on first use. `Err` holds the reason none is available.
    pub fn get() -> Result<&'static XServer, String> {
        static SERVER: OnceLock<Result<XServer, String>> = OnceLock::new();
        SERVER
            .get_or_init(|| Self::connect_or_start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// [`Self::get`] for tests: `None` (after printing why) when no X server is available and
    /// skipping is allowed; panics under CI, where editor tests must run.
    pub fn for_test(test: &str) -> Option<&'static XServer> {
        match Self::get() {
            Ok(x) => Some(x),
            Err(reason) if std::env::var_os("CI").is_some() => {
                panic!("{test}: no X server under CI: {reason}")
            }
            Err(reason) => {
                println!("SKIPPED {test}: no X server could be started: {reason}");
                None
            }
        }
    }

    fn connect_or_start() -> Result<XServer> {
        if let Ok(display) = std::env::var("DISPLAY") {
            match x11rb::connect(Some(&display)) {
                Ok((conn, screen)) => {
                    return Ok(XServer {
                        display,
                        conn,
                        screen,
                        _xvfb: None,
                    })
                }
                Err(e) => eprintln!("DISPLAY={display} does not answer ({e}); starting Xvfb"),
            }
        }
        Self::start_xvfb()
    }

    fn start_xvfb() -> Result<XServer> {
        let mut last_error = anyhow!("no display number was free");
        for n in XVFB_DISPLAYS {
            if Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                || Path::new(&format!("/tmp/.X{n}-lock")).exists()
            {
                continue;
            }
            let display = format!(":{n}");
            let mut child = match Command::new("Xvfb")
                .args([
                    display.as_str(),
                    "-screen",
                    "0",
                    "1280x1024x24",
                    "-nolisten",
                    "tcp",
                    "-terminate",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => child,
                Err(e) => bail!("cannot run Xvfb (install the `xvfb` package): {e}"),
            };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = anyhow!("Xvfb {display} exited with {status}");
                    break;
                }
                if let Ok((conn, screen)) = x11rb::connect(Some(&display)) {
                    // The plugin's toolkit connects through DISPLAY. Set once, before any editor
                    // exists, by the only thread initialising this server.
                    std::env::set_var("DISPLAY", &display);
                    return Ok(XServer {
                        display,
                        conn,
                        screen,
                        _xvfb: Some(Mutex::new(child)),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(last_error)
    }

    fn root(&self) -> Window {
        self.conn.setup().roots[self.screen].root
    }

    fn visual(&self, id: u32) -> Option<Visualtype> {
        self.conn
            .setup()
            .roots
            .iter()
            .flat_map(|s| &s.allowed_depths)
            .flat_map(|d| &d.visuals)
            .find(|v| v.visual_id == id)
            .copied()
    }

    fn bits_per_pixel(&self, depth: u8) -> Option<u8> {
        self.conn
            .setup()
            .pixmap_formats
            .iter()
            .find(|f| f.depth == depth)
            .map(|f| f.bits_per_pixel)
    }
}

/// The host-side window an editor is embedded in.
pub struct EditorWindow {
    x: &'static XServer,
    id: Window,
}

impl EditorWindow {
    /// Creates and maps a top-level window of `width` x `height` pixels.
    pub fn create(x: &'static XServer, width: u32, height: u32) -> Result<Self> {
        let conn = &x.conn;
        let id = conn.generate_id().context("X: no window id")?;
        let screen = &conn.setup().roots[x.screen];
        conn.create_window(
            x11rb::COPY_DEPTH_FROM_PARENT,
            id,
            x.root(),
            0,
            0,
            width.clamp(1, u16::MAX as u32) as u16,
            height.clamp(1, u16::MAX as u32) as u16,
            0,
            WindowClass::INPUT_OUTPUT,
            x11rb::COPY_FROM_PARENT,
            &CreateWindowAux::new()
                .background_pixel(screen.black_pixel)
                .event_mask(EventMask::STRUCTURE_NOTIFY),
        )
        .context("X: create_window")?;
        conn.map_window(id).context("X: map_window")?;
        // A round trip, not just a flush: the plugin reparents into this window over its own
        // connection, so the server must have processed our requests before we hand out the id.
        conn.get_input_focus()
            .context("X: get_input_focus")?
            .reply()
            .context("X: round trip after creating the window")?;
        Ok(Self { x, id })
    }

    /// The X11 window id (what CLAP's `clap_window.x11` carries).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Resizes the host window, in pixels.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        self.x
            .conn
            .configure_window(
                self.id,
                &ConfigureWindowAux::new().width(width).height(height),
            )
            .context("X: configure_window")?;
        self.x
            .conn
            .get_input_focus()
            .context("X: get_input_focus")?
            .reply()
            .context("X: round trip after resizing the window")?;
        Ok(())
    }

    /// Clicks the left mouse button at (`x`, `y`) pixels in the embedded editor (the host
    /// window's first child), as a user would: the pointer moves there and the button goes down
    /// and up, through the XTEST extension, so the editor receives ordinary input events.
    pub fn click(&self, x: i16, y: i16) -> Result<()> {
        use x11rb::protocol::xproto::{
            BUTTON_PRESS_EVENT, BUTTON_RELEASE_EVENT, MOTION_NOTIFY_EVENT,
        };
        use x11rb::protocol::xtest::ConnectionExt as _;
        let conn = &self.x.conn;
        let children = conn
            .query_tree(self.id)
            .context("X: query_tree")?
            .reply()
            .context("X: query_tree reply")?
            .children;
        let target = children.first().copied().unwrap_or(self.id);
        // On top of any other window, so the click lands here.
        conn.configure_window(
            self.id,
            &ConfigureWindowAux::new().stack_mode(x11rb::protocol::xproto::StackMode::ABOVE),
        )
        .context("X: raise the window")?;
        let at = conn
            .translate_coordinates(target, self.x.root(), x, y)
            .context("X: translate_coordinates")?
            .reply()
            .context("X: translate_coordinates reply")?;
        let root = self.x.root();
        let (rx, ry) = (at.dst_x, at.dst_y);
        conn.xtest_fake_input(MOTION_NOTIFY_EVENT, 0, x11rb::CURRENT_TIME, root, rx, ry, 0)
            .context("X: XTEST motion (does the server have the XTEST extension?)")?;
        conn.sync_and_pause()?;
        conn.xtest_fake_input(BUTTON_PRESS_EVENT, 1, x11rb::CURRENT_TIME, root, rx, ry, 0)
            .context("X: XTEST button press")?;
        conn.sync_and_pause()?;
        conn.xtest_fake_input(
            BUTTON_RELEASE_EVENT,
            1,
            x11rb::CURRENT_TIME,
            root,
            rx,
            ry,
            0,
        )
        .context("X: XTEST button release")?;
        conn.sync_and_pause()?;
        Ok(())
    }

    /// A screenshot of the embedded editor: the host window's first child (the editor's own
    /// window, in its own visual), or the host window when it has no child yet.
    pub fn screenshot(&self) -> Result<Screenshot> {
        let conn = &self.x.conn;
        let children = conn
            .query_tree(self.id)
            .context("X: query_tree")?
            .reply()
            .context("X: query_tree reply")?
            .children;
        let target = children.first().copied().unwrap_or(self.id);
        let geometry = conn
            .get_geometry(target)
            .context("X: get_geometry")?
            .reply()
            .context("X: get_geometry reply")?;
        let image = conn
            .get_image(
                ImageFormat::Z_PIXMAP,
                target,
                0,
                0,
                geometry.width,
                geometry.height,
                !0,
            )
            .context("X: get_image")?
            .reply()
            .context("X: get_image reply (is the window mapped?)")?;
        let visual = self
            .x
            .visual(image.visual)
            .with_context(|| format!("X: unknown visual {}", image.visual))?;
        let bpp = self
            .x
            .bits_per_pixel(image.depth)
            .with_context(|| format!("X: no pixmap format for depth {}", image.depth))?;
        if bpp != 32 {
            bail!(
                "X: screenshots need 32 bits per pixel, the server uses {bpp} at depth {}",
                image.depth
            );
        }
        let lsb = conn.setup().image_byte_order == ImageOrder::LSB_FIRST;
        let (w, h) = (geometry.width as usize, geometry.height as usize);
        // Scanlines are padded to the server's scanline pad; with 32 bpp there is no padding.
        let mut rgb = Vec::with_capacity(w * h * 3);
        for px in image.data.chunks_exact(4).take(w * h) {
            let bytes = [px[0], px[1], px[2], px[3]];
            let value = if lsb {
                u32::from_le_bytes(bytes)
            } else {
                u32::from_be_bytes(bytes)
            };
            for mask in [visual.red_mask, visual.green_mask, visual.blue_mask] {
                rgb.push(channel(value, mask));
            }
        }
        if rgb.len() != w * h * 3 {
            bail!(
                "X: image of {} bytes is too short for {w}x{h}",
                image.data.len()
            );
        }
        Ok(Screenshot {
            width: w as u32,
            height: h as u32,
            rgb,
        })
    }

    /// Destroys the host window, after giving the embedded editor up to two seconds to remove
    /// its own window (hosts destroy the parent only after the plugin's GUI is gone).
    pub fn destroy(self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let children = self
                .x
                .conn
                .query_tree(self.id)
                .context("X: query_tree")?
                .reply()
                .context("X: query_tree reply")?
                .children;
            if children.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.x
            .conn
            .destroy_window(self.id)
            .context("X: destroy_window")?;
        self.x.conn.flush().context("X: flush")?;
        Ok(())
    }
}

/// A round trip (so the server has processed every request) and a short pause (so the editor's
/// own event loop, on its own connection, sees each input event in a frame of its own).
trait SyncAndPause {
    fn sync_and_pause(&self) -> Result<()>;
}

impl SyncAndPause for RustConnection {
    fn sync_and_pause(&self) -> Result<()> {
        self.get_input_focus()
            .context("X: get_input_focus")?
            .reply()
            .context("X: round trip")?;
        std::thread::sleep(Duration::from_millis(60));
        Ok(())
    }
}

/// Extracts the colour channel selected by `mask` as 8 bits.
fn channel(value: u32, mask: u32) -> u8 {
    if mask == 0 {
        return 0;
    }
    let shift = mask.trailing_zeros();
    let bits = (mask >> shift).count_ones();
    let v = (value & mask) >> shift;
    if bits >= 8 {
        (v >> (bits - 8)) as u8
    } else {
        // Scale up narrower channels (e.g. 5 or 6 bits) to the full 8-bit range.
        ((v * 255) / ((1 << bits) - 1)) as u8
    }
}

/// An RGB image, 8 bits per channel, rows top to bottom.
#[derive(Clone)]
pub struct Screenshot {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height` pixels of 3 bytes (R, G, B).
    pub rgb: Vec<u8>,
}

impl Screenshot {
    /// Number of different colours in the image.
    pub fn distinct_colours(&self) -> usize {
        let mut colours: Vec<u32> = self
            .rgb
            .chunks_exact(3)
            .map(|p| u32::from_be_bytes([0, p[0], p[1], p[2]]))
            .collect();
        colours.sort_unstable();
        colours.dedup();
        colours.len()
    }

    /// Fraction of pixels (0..=1) that have the most common colour.
    pub fn dominant_fraction(&self) -> f64 {
        let mut colours: Vec<u32> = self
            .rgb
            .chunks_exact(3)
            .map(|p| u32::from_be_bytes([0, p[0], p[1], p[2]]))
            .collect();
        if colours.is_empty() {
            return 1.0;
        }
        colours.sort_unstable();
        let mut best = 0;
        let mut run = 0;
        let mut prev = None;
        for c in &colours {
            if Some(c) == prev {
                run += 1;
            } else {
                run = 1;
                prev = Some(c);
            }
            best = best.max(run);
        }
        best as f64 / colours.len() as f64
    }

    /// Whether the image shows nothing worth calling a user interface: fewer than 16 colours (a
    /// flat fill, or an unpainted window), or one colour covering more than 99.5% of it. Text and
    /// widgets rendered with anti-aliasing easily give hundreds of colours.
    pub fn is_blank(&self) -> bool {
        self.distinct_colours() < 16 || self.dominant_fraction() > 0.995
    }

    /// The pixel at (`x`, `y`) as (R, G, B).
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// Writes the image as an 8-bit RGB PNG, creating parent directories.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .with_context(|| format!("cannot write PNG header to {}", path.display()))?;
        writer
            .write_image_data(&self.rgb)
            .with_context(|| format!("cannot write PNG data to {}", path.display()))?;
        writer
            .finish()
            .with_context(|| format!("cannot finish {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pixels: &[[u8; 3]], width: u32) -> Screenshot {
        Screenshot {
            width,
            height: pixels.len() as u32 / width,
            rgb: pixels.iter().flatten().copied().collect(),
        }
    }

    #[test]
    fn flat_image_is_blank() {
        let flat = image(&[[20, 20, 20]; 400], 20);
        assert_eq!(flat.distinct_colours(), 1);
        assert_eq!(flat.dominant_fraction(), 1.0);
        assert!(flat.is_blank());
    }

    #[test]
    fn varied_image_is_not_blank() {
        let pixels: Vec<[u8; 3]> = (0..400u32)
            .map(|i| [(i % 40) as u8, (i / 40) as u8, 7])
            .collect();
        let img = image(&pixels, 20);
        assert_eq!(img.distinct_colours(), 400);
        assert!(!img.is_blank());
        assert_eq!(img.pixel(1, 0), [1, 0, 7]);
    }

    #[test]
    fn mostly_flat_image_is_blank() {
        let mut pixels = vec![[0u8, 0, 0]; 10_000];
        for (i, p) in pixels.iter_mut().take(20).enumerate() {
            *p = [i as u8 + 1, 0, 0];
        }
        assert!(image(&pixels, 100).is_blank());
    }

    #[test]
    fn channel_masks() {
        assert_eq!(channel(0x00ab_cdef, 0x00ff_0000), 0xab);
        assert_eq!(channel(0x00ab_cdef, 0x0000_ff00), 0xcd);
        assert_eq!(channel(0x00ab_cdef, 0x0000_00ff), 0xef);
        // 5-6-5: full-scale 5-bit red is 255.
        assert_eq!(channel(0xf800, 0xf800), 255);
        assert_eq!(channel(0, 0), 0);
    }

    #[test]
    fn png_round_trip_header() {
        let img = image(&[[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], 2);
        let path = std::env::temp_dir().join(format!("segue-png-{}.png", std::process::id()));
        img.save_png(&path).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 2));
        assert_eq!(&buf[..info.buffer_size()], &img.rgb[..]);
        std::fs::remove_file(&path).unwrap();
    }
}
