//! Audio through the plugin: pass-through, gain, monitoring, denormals, transport and events, at
//! 44.1 and 48 kHz and block sizes from 1 to 4096 frames, fixed and randomly split.

use anyhow::Result;
use segue::params::{GAIN_MAX_DB, GAIN_MIN_DB, GAIN_SMOOTHING_MS};
use segue_host_tests::signal::{add, first_difference, noise, sine, subnormals};
use segue_host_tests::transport::TimeSignature;
use segue_host_tests::{
    render, BlockSplit, HostEvent, PluginInstance, PluginLibrary, RenderRequest, Transport,
};

const RATES: [f64; 2] = [44_100.0, 48_000.0];
const BLOCK_SIZES: [usize; 4] = [1, 64, 512, 4096];

/// Every block split the tests run: the fixed sizes and two random ones.
fn splits() -> Vec<BlockSplit> {
    let mut splits: Vec<BlockSplit> = BLOCK_SIZES.iter().map(|n| BlockSplit::Fixed(*n)).collect();
    splits.push(BlockSplit::Random { seed: 1, max: 4096 });
    splits.push(BlockSplit::Random { seed: 2, max: 97 });
    splits
}

/// Normalised CLAP value of an output gain in dB.
fn gain_norm(db: f32) -> f64 {
    ((db - GAIN_MIN_DB) / (GAIN_MAX_DB - GAIN_MIN_DB)) as f64
}

fn db_to_gain(db: f32) -> f32 {
    10f32.powf(db / 20.0)
}

fn active(lib: &PluginLibrary, rate: f64, max_block: usize) -> Result<PluginInstance> {
    let mut plugin = lib.instantiate()?;
    plugin.activate(rate, max_block)?;
    Ok(plugin)
}

/// Test material: noise on the main input, a sine on the sidechain; `seconds` long.
fn material(rate: f64, seconds: f64) -> ([Vec<f32>; 2], [Vec<f32>; 2]) {
    let n = (rate * seconds) as usize;
    (
        [noise(11, n, 0.5), noise(12, n, 0.5)],
        [
            sine(440.0, rate, n, 0.25, 0.0),
            sine(660.0, rate, n, 0.25, 1.0),
        ],
    )
}

fn stereo(x: &[Vec<f32>; 2]) -> [&[f32]; 2] {
    [&x[0], &x[1]]
}

const SILENT: [&[f32]; 2] = [&[], &[]];

fn assert_same(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some((i, g, w)) = first_difference(got, want, tolerance) {
        panic!("{what}: sample {i} is {g}, expected {w} (tolerance {tolerance})");
    }
}

#[test]
fn monitoring_passes_main_plus_sidechain_at_every_rate_and_block_size() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    for rate in RATES {
        let (main, side) = material(rate, 0.25);
        let want = [add(&main[0], &side[0]), add(&main[1], &side[1])];
        for split in splits() {
            let mut plugin = active(&lib, rate, split.max_len())?;
            let transport = Transport::playing(120.0, TimeSignature::COMMON);
            let request = RenderRequest::new(stereo(&main), stereo(&side), split.clone())
                .with_transport(transport);
            let out = render(&mut plugin, &request)?;
            for ch in 0..2 {
                // Unity gain and a plain sum: bit-exact.
                assert_same(
                    &format!("{rate} Hz, {split:?}, channel {ch}"),
                    &out[ch],
                    &want[ch],
                    0.0,
                );
            }
        }
    }
    Ok(())
}

#[test]
fn main_and_sidechain_each_pass_through_alone() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let rate = 48_000.0;
    let (main, side) = material(rate, 0.1);
    let mut plugin = active(&lib, rate, 512)?;
    let out = render(
        &mut plugin,
        &RenderRequest::new(stereo(&main), SILENT, BlockSplit::Fixed(512)),
    )?;
    assert_same("main only, L", &out[0], &main[0], 0.0);
    assert_same("main only, R", &out[1], &main[1], 0.0);
    let out = render(
        &mut plugin,
        &RenderRequest::new(SILENT, stereo(&side), BlockSplit::Fixed(512)),
    )?;
    assert_same("sidechain only, L", &out[0], &side[0], 0.0);
    assert_same("sidechain only, R", &out[1], &side[1], 0.0);
    Ok(())
}

#[test]
fn monitoring_off_silences_the_input() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    for rate in RATES {
        let (main, side) = material(rate, 0.1);
        for split in splits() {
            let mut plugin = active(&lib, rate, split.max_len())?;
            plugin.set_param("monitor", 0.0)?;
            let out = render(
                &mut plugin,
                &RenderRequest::new(stereo(&main), stereo(&side), split.clone()),
            )?;
            assert!(
                out.iter().flatten().all(|x| *x == 0.0),
                "{rate} Hz {split:?}: output not silent with monitoring off"
            );
            assert_eq!(plugin.param_value("monitor")?, 0.0);
        }
    }
    Ok(())
}

#[test]
fn monitoring_switches_at_the_exact_sample() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let rate = 44_100.0;
    let (main, _) = material(rate, 0.2);
    for split in splits() {
        let mut plugin = active(&lib, rate, split.max_len())?;
        // Off at 1000, on again at 5001: the events land inside blocks of every split.
        let request = RenderRequest::new(stereo(&main), SILENT, split.clone()).with_events([
            HostEvent::param(1000, "monitor", 0.0),
            HostEvent::param(5001, "monitor", 1.0),
        ]);
        let out = render(&mut plugin, &request)?;
        for ch in 0..2 {
            let what = format!("{split:?} channel {ch}");
            assert_same(&what, &out[ch][..1000], &main[ch][..1000], 0.0);
            assert!(
                out[ch][1000..5001].iter().all(|x| *x == 0.0),
                "{what}: not silent in 1000..5001"
            );
            assert_same(&what, &out[ch][5001..], &main[ch][5001..], 0.0);
        }
    }
    Ok(())
}

#[test]
fn output_gain_glides_to_its_target() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    for rate in RATES {
        let n = (rate * 0.2) as usize;
        let dc = vec![0.5f32; n];
        let glide = (rate * GAIN_SMOOTHING_MS as f64 / 1000.0).ceil() as usize;
        for split in splits() {
            let mut plugin = active(&lib, rate, split.max_len())?;
            plugin.set_param("gain", gain_norm(-6.0))?;
            let out = render(
                &mut plugin,
                &RenderRequest::new([&dc, &dc], SILENT, split.clone()),
            )?;
            let target = 0.5 * db_to_gain(-6.0);
            let what = format!("{rate} Hz {split:?}");
            // During the glide the level moves monotonically from unity towards the target.
            assert!(
                out[0][0] <= 0.5 && out[0][0] > target,
                "{what}: first sample {}",
                out[0][0]
            );
            assert!(
                out[0][..glide].windows(2).all(|w| w[1] <= w[0] + 1e-7),
                "{what}: the glide is not monotonic"
            );
            // Afterwards it sits at the target.
            for (ch, channel) in out.iter().enumerate() {
                for (i, x) in channel[glide + 1..].iter().enumerate() {
                    assert!(
                        (x - target).abs() < 1e-5,
                        "{what}: channel {ch} sample {} is {x}, expected {target}",
                        glide + 1 + i
                    );
                }
            }
            assert!((plugin.param_value("gain")? - gain_norm(-6.0)).abs() < 1e-6);
        }
    }
    Ok(())
}

#[test]
fn denormal_input_never_gives_denormal_output() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let rate = 48_000.0;
    let n = 48_000;
    let tiny = subnormals(n);
    // Normal numbers that become subnormal when attenuated by the lowest gain (-60 dB).
    let small: Vec<f32> = (0..n).map(|i| 1e-36 * (1.0 + (i % 7) as f32)).collect();
    for db in [0.0, -60.0, 12.0] {
        for split in [
            BlockSplit::Fixed(64),
            BlockSplit::Random { seed: 5, max: 4096 },
        ] {
            let mut plugin = active(&lib, rate, split.max_len())?;
            plugin.set_param("gain", gain_norm(db))?;
            for (what, main, side) in [
                ("subnormal input", &tiny, &tiny),
                ("tiny input", &small, &small),
                ("subnormal main, tiny sidechain", &tiny, &small),
            ] {
                let out = render(
                    &mut plugin,
                    &RenderRequest::new([main, main], [side, side], split.clone()),
                )?;
                let bad = out.iter().flatten().filter(|x| x.is_subnormal()).count();
                assert_eq!(
                    bad, 0,
                    "{what} at {db} dB, {split:?}: {bad} subnormal output samples"
                );
                assert!(out.iter().flatten().all(|x| x.is_finite()));
            }
        }
    }
    Ok(())
}

#[test]
fn transport_scripts_and_notes_leave_the_audio_path_intact() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let seven_eight = TimeSignature {
        numerator: 7,
        denominator: 8,
    };
    let transports = [
        Some(Transport::playing(120.0, TimeSignature::COMMON)),
        Some(
            Transport::playing(120.0, TimeSignature::COMMON)
                .at_bar(3)
                .stopped(),
        ),
        // A short loop so the wrap falls inside blocks of every split.
        Some(
            Transport::playing(97.0, seven_eight)
                .at_beats(3.0)
                .looping(3.5, 4.0),
        ),
        Some(Transport::free_running()),
        None,
    ];
    for rate in RATES {
        let (main, side) = material(rate, 1.0);
        let want = [add(&main[0], &side[0]), add(&main[1], &side[1])];
        let n = main[0].len() as u32;
        for transport in transports {
            for split in [
                BlockSplit::Fixed(4096),
                BlockSplit::Random { seed: 9, max: 4096 },
            ] {
                let mut plugin = active(&lib, rate, split.max_len())?;
                let mut request = RenderRequest::new(stereo(&main), stereo(&side), split.clone())
                    .with_events((0..40).flat_map(|i| {
                        let t = i * n / 40;
                        [
                            HostEvent::NoteOn {
                                time: t,
                                channel: (i % 16) as u8,
                                key: 36 + i as u8,
                                velocity: 0.8,
                            },
                            HostEvent::NoteOff {
                                time: t + 100,
                                channel: (i % 16) as u8,
                                key: 36 + i as u8,
                                velocity: 0.0,
                            },
                        ]
                    }));
                if let Some(t) = transport {
                    request = request
                        .with_transport(t)
                        .with_events([HostEvent::Transport {
                            time: n / 2,
                            transport: t.at_beats(16.0),
                        }]);
                }
                let out = render(&mut plugin, &request)?;
                for ch in 0..2 {
                    assert_same(
                        &format!("{rate} Hz {transport:?} {split:?}"),
                        &out[ch],
                        &want[ch],
                        0.0,
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn reactivation_at_another_rate_and_block_size() -> Result<()> {
    let lib = PluginLibrary::segue()?;
    let mut plugin = lib.instantiate()?;
    for (rate, block) in [
        (44_100.0, 4096),
        (48_000.0, 1),
        (44_100.0, 64),
        (48_000.0, 512),
    ] {
        plugin.activate(rate, block)?;
        let (main, side) = material(rate, 0.05);
        let out = render(
            &mut plugin,
            &RenderRequest::new(stereo(&main), stereo(&side), BlockSplit::Fixed(block)),
        )?;
        assert_same(
            &format!("{rate} Hz / {block}"),
            &out[0],
            &add(&main[0], &side[0]),
            0.0,
        );
        plugin.deactivate();
        assert!(!plugin.is_active());
    }
    Ok(())
}
