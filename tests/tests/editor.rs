//! The editor, embedded in a host window on X11 (a private Xvfb when no display is set).
//! Screenshots are written to `target/screenshots/`.

use anyhow::Result;
use segue::params::DEFAULT_EDITOR_SIZE;
use segue_host_tests::gui::XServer;
use segue_host_tests::locate::target_dir;
use segue_host_tests::signal::noise;
use segue_host_tests::PluginLibrary;
use std::time::Duration;

const DRAW_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn editor_opens_draws_and_reopens() -> Result<()> {
    let Some(x) = XServer::for_test("editor_opens_draws_and_reopens") else {
        return Ok(());
    };
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
