//! Test signals and comparisons.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `len` samples of a sine of `freq` Hz at `sample_rate` Hz with peak `amplitude`, starting at
/// phase `phase` (radians).
pub fn sine(freq: f64, sample_rate: f64, len: usize, amplitude: f32, phase: f64) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let t = i as f64 / sample_rate;
            amplitude * (std::f64::consts::TAU * freq * t + phase).sin() as f32
        })
        .collect()
}

/// `len` samples of uniform white noise in `[-amplitude, amplitude]`, reproducible from `seed`.
pub fn noise(seed: u64, len: usize, amplitude: f32) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| rng.random_range(-amplitude..=amplitude))
        .collect()
}

/// `len` subnormal samples of alternating sign spanning the subnormal range (the smallest
/// positive subnormal up to just below `f32::MIN_POSITIVE`).
pub fn subnormals(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let bits = 1 + (i as u32).wrapping_mul(2_654_435_761) % 0x007f_fffe;
            let x = f32::from_bits(bits);
            debug_assert!(x.is_subnormal());
            if i % 2 == 0 {
                x
            } else {
                -x
            }
        })
        .collect()
}

/// Largest absolute difference between two equally long signals (`inf` if the lengths differ,
/// NaN if either contains NaN).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m, d| {
            if d.is_nan() || m.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

/// Index of the first sample where `a` and `b` differ by more than `tolerance`, with both values.
pub fn first_difference(a: &[f32], b: &[f32], tolerance: f32) -> Option<(usize, f32, f32)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| {
            let d = (*x - *y).abs();
            // NaN differences count as differences.
            d.is_nan() || d > tolerance
        })
        .map(|(i, (x, y))| (i, *x, *y))
}

/// Root mean square of a signal (0 for an empty one).
pub fn rms(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt() as f32
}

/// Element-wise sum of two equally long signals.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "adding signals of different lengths");
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormals_are_subnormal() {
        let s = subnormals(10_000);
        assert!(s.iter().all(|x| x.is_subnormal()));
        assert!(s.iter().any(|x| *x < 0.0) && s.iter().any(|x| *x > 0.0));
    }

    #[test]
    fn noise_is_reproducible_and_bounded() {
        let a = noise(7, 1000, 0.5);
        assert_eq!(a, noise(7, 1000, 0.5));
        assert_ne!(a, noise(8, 1000, 0.5));
        assert!(a.iter().all(|x| x.abs() <= 0.5));
        assert!(rms(&a) > 0.2);
    }

    #[test]
    fn comparisons() {
        let a = [0.0, 1.0, 2.0];
        let b = [0.0, 1.5, 2.0];
        assert_eq!(max_abs_diff(&a, &b), 0.5);
        assert_eq!(first_difference(&a, &b, 0.1), Some((1, 1.0, 1.5)));
        assert_eq!(first_difference(&a, &a, 0.0), None);
        assert!(max_abs_diff(&a, &[0.0]).is_infinite());
        assert!(first_difference(&[f32::NAN], &[0.0], 1.0).is_some());
        let s = sine(1000.0, 48_000.0, 48, 1.0, 0.0);
        assert!((rms(&s) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-3);
    }
}
