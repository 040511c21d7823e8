//! The editor, embedded in a host window on X11 (a private Xvfb when no display is set).
//! Screenshots are written to `target/screenshots/`.
//!
//! Where the waveforms are drawn comes from the editor's own layout function
//! ([`segue::editor::layout::Layout`]); Xvfb runs at scale 1, so logical pixels are pixels.

use anyhow::{bail, ensure, Result};
use segue::editor::layout::{Area, Layout};
use segue::editor::MIN_EDITOR_SIZE;
use segue::params::DEFAULT_EDITOR_SIZE;
use segue::takes::decode_state;
use segue_host_tests::gui::{Screenshot, XServer};
use segue_host_tests::locate::target_dir;
use segue_host_tests::signal::noise;
use segue_host_tests::transport::TimeSignature;
use segue_host_tests::{
    render, BlockSplit, HostEvent, PluginInstance, PluginLibrary, RenderRequest, Transport,
};
use std::time::{Duration, Instant};

const DRAW_TIMEOUT: Duration = Duration::from_secs(20);

/// The tests of this file take turns: their host windows all sit at the top left of one X
/// server, and a click must land in the window of the test that makes it.
fn one_window_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a region of a screenshot holds: the fraction of its pixels that differ from its most
/// common colour, and how many colours it has.
fn region_stats(shot: &Screenshot, area: &Area) -> (f64, usize) {
    let (x0, y0) = (area.x.ceil() as u32, area.y.ceil() as u32);
    let x1 = (area.right().floor() as u32).min(shot.width);
    let y1 = (area.bottom().floor() as u32).min(shot.height);
    let mut pixels: Vec<[u8; 3]> = Vec::new();
    for y in y0..y1 {
        for x in x0..x1 {
            pixels.push(shot.pixel(x, y));
        }
    }
    let mut sorted = pixels.clone();
    sorted.sort_unstable();
    let mut best = (0usize, [0u8; 3]);
    let mut run = 0usize;
    for (i, p) in sorted.iter().enumerate() {
        run = if i > 0 && sorted[i - 1] == *p {
            run + 1
        } else {
            1
        };
        if run > best.0 {
            best = (run, *p);
        }
    }
    sorted.dedup();
    let other = pixels.iter().filter(|p| **p != best.1).count();
    (other as f64 / pixels.len().max(1) as f64, sorted.len())
}

/// The waveform lanes of a window of `size`, inset past the panel's rounded border.
fn lanes_area(size: (u32, u32)) -> Area {
    let t = Layout::for_size(size.0 as f32, size.1 as f32).timeline;
    Area {
        x: t.x + 8.0,
        y: t.y + 8.0,
        w: t.w - 16.0,
        h: t.h - 16.0,
    }
}

#[test]
fn editor_opens_draws_and_reopens() -> Result<()> {
    let Some(x) = XServer::for_test("editor_opens_draws_and_reopens") else {
        return Ok(());
    };
    let _turn = one_window_at_a_time();
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    plugin.activate(48_000.0, 512)?;

    let size = plugin.open_editor(x)?;
    assert_eq!(
        size,
        (DEFAULT_EDITOR_SIZE.width, DEFAULT_EDITOR_SIZE.height),
        "a new instance opens at the default size (scale 1 on Xvfb)"
    );
    // Audio keeps running while the window is open.
    let input = noise(4, 512, 0.5);
    for _ in 0..10 {
        let out = plugin.process_block(&[&input, &input], &[], None, &[])?;
        assert_eq!(out[0], input);
    }
    let shot = plugin.editor_screenshot(DRAW_TIMEOUT)?;
    let path = target_dir()?.join("screenshots").join("editor-default.png");
    shot.save_png(&path)?;
    println!(
        "editor screenshot: {} ({}x{}, {} colours)",
        path.display(),
        shot.width,
        shot.height,
        shot.distinct_colours()
    );
    assert_eq!(
        (shot.width, shot.height),
        size,
        "the editor window has the size it reported"
    );
    assert!(!shot.is_blank());
    // Nothing was generated: the waveform region holds only its hint text.
    let (ink, _) = region_stats(&shot, &lanes_area(size));
    assert!(
        ink < 0.05,
        "the empty editor's waveform region is {:.1}% ink",
        ink * 100.0
    );
    plugin.close_editor()?;

    // Hosts close and reopen editors all the time.
    let size_again = plugin.open_editor(x)?;
    assert_eq!(size_again, size);
    let again = plugin.editor_screenshot(DRAW_TIMEOUT)?;
    assert!(!again.is_blank());
    plugin.close_editor()?;
    assert!(plugin.host_state(|h| h
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|(sev, _)| !sev.contains("rror"))));
    Ok(())
}

#[test]
fn editor_size_follows_the_host_and_is_saved() -> Result<()> {
    let Some(x) = XServer::for_test("editor_size_follows_the_host_and_is_saved") else {
        return Ok(());
    };
    let _turn = one_window_at_a_time();
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    plugin.open_editor(x)?;
    plugin.editor_screenshot(DRAW_TIMEOUT)?;
    let wanted = (
        DEFAULT_EDITOR_SIZE.width + 160,
        DEFAULT_EDITOR_SIZE.height + 100,
    );
    let accepted = plugin.resize_editor(wanted.0, wanted.1)?;
    assert_eq!(
        accepted, wanted,
        "a size above the minimum is accepted as it is"
    );
    // The plugin's window follows asynchronously; wait for it to report the new size.
    let start = std::time::Instant::now();
    while plugin.editor_size()? != wanted {
        assert!(
            start.elapsed() < DRAW_TIMEOUT,
            "editor size stayed {:?}, expected {wanted:?}",
            plugin.editor_size()?
        );
        plugin.pump_main_thread();
        std::thread::sleep(Duration::from_millis(20));
    }
    let shot = plugin.editor_screenshot(DRAW_TIMEOUT)?;
    assert_eq!((shot.width, shot.height), wanted);
    shot.save_png(&target_dir()?.join("screenshots").join("editor-resized.png"))?;
    plugin.close_editor()?;

    // The size is part of the saved state: a project reopens the window as the user left it.
    let state = plugin.save_state()?;
    let mut restored = lib.instantiate()?;
    restored.load_state(&state)?;
    assert_eq!(restored.open_editor(x)?, wanted);
    restored.close_editor()?;
    Ok(())
}

/// Points every instance of this test process at the tiny mono checkpoint (only this file's
/// generation tests need it; the others only show its name), and their exports at a scratch
/// folder under `target/` (never the user's music folder).
fn use_tiny_model() -> std::path::PathBuf {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let exports = target_dir()
        .expect("no target folder")
        .join(format!("editor-exports-{}", std::process::id()));
    ONCE.call_once(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../engine/fixtures/tiny-musicgen-mono")
            .canonicalize()
            .expect("the tiny fixture checkpoint is missing");
        std::env::set_var(segue::params::MODEL_ENV, dir);
        std::env::set_var(segue::export::EXPORT_DIR_ENV, &exports);
    });
    exports
}

/// The number of takes in the plugin's saved state.
fn saved_take_count(plugin: &mut PluginInstance) -> Result<usize> {
    let bytes = plugin.save_state()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..])?;
    let Some(field) = json["fields"]["takes"].as_str() else {
        bail!("no takes field in {json}");
    };
    let encoded: String = serde_json::from_str(field)?;
    if encoded.is_empty() {
        return Ok(0);
    }
    Ok(decode_state(&encoded)?.takes.len())
}

/// Plays `bars` bars of noise from `from_beat` (4/4 at `tempo`), pressing `generate` a quarter
/// note into the last bar when `press` is set.
fn play_bars(
    plugin: &mut PluginInstance,
    rate: f64,
    tempo: f64,
    from_beat: f64,
    bars: usize,
    press: bool,
    seed: u64,
) -> Result<()> {
    let spb = rate * 60.0 / tempo;
    let n = (bars as f64 * 4.0 * spb).round() as usize;
    // A phrase that swells and fades within each bar, so the waveform has a visible shape.
    let shape = |x: Vec<f32>| -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, v)| {
                let phase = (i as f64 / (4.0 * spb)).fract();
                v * (0.15 + 0.85 * (std::f64::consts::PI * phase).sin()) as f32
            })
            .collect()
    };
    let left = shape(noise(seed, n, 0.6));
    let right = shape(noise(seed + 1, n, 0.6));
    let mut events = Vec::new();
    if press {
        let at = ((bars as f64 - 1.0) * 4.0 * spb + spb).round() as u32;
        events.push(HostEvent::param(at, "generate", 1.0));
        events.push(HostEvent::param(at + 64, "generate", 0.0));
    }
    let request = RenderRequest::new([&left, &right], [&[], &[]], BlockSplit::Fixed(512))
        .with_transport(Transport::playing(tempo, TimeSignature::COMMON).at_beats(from_beat))
        .with_events(events);
    render(plugin, &request)?;
    Ok(())
}

fn wait_for_take_count(plugin: &mut PluginInstance, count: usize) -> Result<()> {
    let start = Instant::now();
    while saved_take_count(plugin)? < count {
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "still fewer than {count} takes after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn editor_shows_the_prompt_and_two_takes() -> Result<()> {
    let Some(x) = XServer::for_test("editor_shows_the_prompt_and_two_takes") else {
        return Ok(());
    };
    let _turn = one_window_at_a_time();
    use_tiny_model();
    let (rate, tempo) = (48_000.0, 120.0);
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    plugin.set_param("monitor", 0.0)?;
    // One-bar continuations (nice-plug gives stepped parameters the CLAP range 0..=steps).
    plugin.set_param("continuation-bars", 0.0)?;
    plugin.activate(rate, 512)?;

    // Five bars in, generate a quarter into bar 5; then a bar more and generate again.
    play_bars(&mut plugin, rate, tempo, 0.0, 5, true, 11)?;
    wait_for_take_count(&mut plugin, 1)?;
    play_bars(&mut plugin, rate, tempo, 20.0, 1, true, 21)?;
    wait_for_take_count(&mut plugin, 2)?;

    let size = plugin.open_editor(x)?;
    // Keep the transport running while the window draws, so the playhead moves.
    let lanes = lanes_area(size);
    let start = Instant::now();
    let mut beat = 24.0;
    let shot = loop {
        play_bars(&mut plugin, rate, tempo, beat, 1, false, 31)?;
        beat += 4.0;
        let shot = plugin.editor_screenshot(DRAW_TIMEOUT)?;
        let (ink, colours) = region_stats(&shot, &lanes);
        // Three lanes of waveforms (prompt and two takes) with their rulers and labels.
        if ink > 0.15 && colours > 40 {
            break shot;
        }
        ensure!(
            start.elapsed() < DRAW_TIMEOUT,
            "the waveform region stayed nearly empty: {:.1}% ink, {colours} colours",
            ink * 100.0
        );
    };
    let path = target_dir()?.join("screenshots").join("editor-takes.png");
    shot.save_png(&path)?;
    let (ink, colours) = region_stats(&shot, &lanes);
    println!(
        "editor screenshot with takes: {} ({:.1}% ink, {colours} colours in the waveforms)",
        path.display(),
        ink * 100.0
    );
    // The take list is not empty either.
    let list = Layout::for_size(size.0 as f32, size.1 as f32).takes;
    let (list_ink, _) = region_stats(&shot, &list);
    assert!(list_ink > 0.03, "take list {:.1}% ink", list_ink * 100.0);

    // The smallest window still shows every part, laid out for its size.
    let min = (MIN_EDITOR_SIZE.width, MIN_EDITOR_SIZE.height);
    assert_eq!(plugin.resize_editor(min.0, min.1)?, min);
    let start = Instant::now();
    let small = loop {
        plugin.pump_main_thread();
        let shot = plugin.editor_screenshot(DRAW_TIMEOUT)?;
        // The export bar's frame is drawn where the layout puts it at the new size (its top
        // edge differs from the background), i.e. the window redrew for the new size.
        let export = Layout::for_size(min.0 as f32, min.1 as f32).export;
        let edge = shot.pixel((export.x + export.w / 2.0) as u32, export.y as u32);
        let inside = shot.pixel((export.x + export.w / 2.0) as u32, export.y as u32 + 4);
        if (shot.width, shot.height) == min
            && edge != inside
            && region_stats(&shot, &lanes_area(min)).0 > 0.15
        {
            break shot;
        }
        ensure!(
            start.elapsed() < DRAW_TIMEOUT,
            "the editor did not redraw at {min:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    small.save_png(
        &target_dir()?
            .join("screenshots")
            .join("editor-takes-small.png"),
    )?;
    plugin.close_editor()?;
    Ok(())
}

#[test]
fn the_generate_button_makes_a_take_at_the_last_bar_line() -> Result<()> {
    let Some(x) = XServer::for_test("the_generate_button_makes_a_take_at_the_last_bar_line") else {
        return Ok(());
    };
    let _turn = one_window_at_a_time();
    let exports = use_tiny_model();
    let (rate, tempo) = (44_100.0, 120.0);
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    plugin.set_param("monitor", 0.0)?;
    plugin.set_param("continuation-bars", 0.0)?;
    plugin.activate(rate, 512)?;
    // Five and a half bars: the last bar line passed is bar 6's (0-based 5, beat 20).
    play_bars(&mut plugin, rate, tempo, 0.0, 5, false, 41)?;
    let spb = rate * 60.0 / tempo;
    let half = (2.0 * spb) as usize;
    let quiet = vec![0.01f32; half];
    render(
        &mut plugin,
        &RenderRequest::new([&quiet, &quiet], [&[], &[]], BlockSplit::Fixed(512))
            .with_transport(Transport::playing(tempo, TimeSignature::COMMON).at_beats(20.0)),
    )?;
    let size = plugin.open_editor(x)?;
    plugin.editor_screenshot(DRAW_TIMEOUT)?;
    assert_eq!(saved_take_count(&mut plugin)?, 0);

    // The Generate button sits at the top left of the generate block, inside its frame.
    let block = Layout::for_size(size.0 as f32, size.1 as f32).generate;
    plugin.click_editor((block.x + 60.0) as i16, (block.y + 22.0) as i16)?;
    wait_for_take_count(&mut plugin, 1)?;
    let bytes = plugin.save_state()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..])?;
    let encoded: String = serde_json::from_str(json["fields"]["takes"].as_str().unwrap())?;
    let state = decode_state(&encoded)?;
    let anchor = state.takes[0]
        .anchor
        .expect("the take sits on the timeline");
    assert_eq!(anchor.beats, 20.0, "the take starts at the last bar line");
    assert_eq!(anchor.bar_index, 5);
    assert_eq!(state.selected, Some(0), "and plays");

    // With the transport stopped the selected take is silent (it sits on the timeline), but
    // the row's Audition button plays it from its start at once.
    let list = Layout::for_size(size.0 as f32, size.1 as f32).takes;
    let silence = vec![0.0f32; 512];
    let stopped = Transport::playing(tempo, TimeSignature::COMMON)
        .at_beats(40.0)
        .stopped();
    let out = plugin.process_block(&[&silence, &silence], &[], Some(&stopped), &[])?;
    assert!(
        out[0].iter().all(|x| *x == 0.0),
        "nothing plays before the audition"
    );
    plugin.click_editor((list.right() - 231.0) as i16, (list.y + 40.0) as i16)?;
    let start = Instant::now();
    let mut heard = 0usize;
    while heard == 0 {
        ensure!(start.elapsed() < DRAW_TIMEOUT, "the audition stayed silent");
        let out = plugin.process_block(&[&silence, &silence], &[], Some(&stopped), &[])?;
        heard += out[0].iter().filter(|x| x.abs() > 1e-4).count();
        std::thread::sleep(Duration::from_millis(5));
    }

    // "Export all" writes the take, as the plugin plays it, into the export folder.
    let bar = Layout::for_size(size.0 as f32, size.1 as f32).export;
    plugin.click_editor((bar.x + 157.0) as i16, (bar.y + 40.0) as i16)?;
    let file = exports.join("Take 1.wav");
    let start = Instant::now();
    while !file.exists() {
        ensure!(
            start.elapsed() < DRAW_TIMEOUT,
            "nothing was exported to {}",
            exports.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let wav = segue_engine::audio::read_wav(&file)?;
    assert_eq!(wav.sample_rate, 44_100);
    let saved = &state.takes[0].source;
    let host_frames = (saved.frames() as f64 * rate / f64::from(saved.sample_rate)).round();
    assert_eq!(
        wav.frames() as f64,
        host_frames,
        "the whole take at the host rate"
    );
    assert_eq!(wav.channels.len(), saved.channels.len());
    // Sample for sample what the plugin plays: the saved 32 kHz source resampled as it does.
    let played = segue_engine::audio::resample(
        &segue_engine::audio::Audio {
            sample_rate: saved.sample_rate,
            channels: saved.channels.clone(),
        },
        44_100,
    )?;
    assert_eq!(wav.channels, played.channels);
    assert!(
        wav.channels[0].iter().any(|x| x.abs() > 1e-3),
        "not silence"
    );
    std::fs::remove_dir_all(&exports)?;

    // The row's Delete button, the rightmost of the first row of the take list.
    plugin.click_editor((list.right() - 34.0) as i16, (list.y + 40.0) as i16)?;
    let start = Instant::now();
    while saved_take_count(&mut plugin)? != 0 {
        ensure!(start.elapsed() < DRAW_TIMEOUT, "the take was not deleted");
        std::thread::sleep(Duration::from_millis(20));
    }
    plugin.close_editor()?;
    Ok(())
}
