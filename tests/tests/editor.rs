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
