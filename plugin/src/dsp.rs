//! Small realtime-safe signal helpers (no allocation, no locks).

/// Replaces subnormal values by zero, looking only at the bits (no floating-point operation, so a
/// subnormal argument costs nothing extra). Flush-to-zero mode only flushes the results of
/// arithmetic that underflows: a subnormal copied through untouched would survive it, and
/// arithmetic on subnormal operands is slow unless denormals-are-zero is also set, which the
/// plugin wrapper does not do. So inputs go through this before arithmetic and outputs after.
#[inline]
pub fn flush_denormal(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormals_become_zero() {
        assert_eq!(flush_denormal(1e-40), 0.0);
        assert_eq!(flush_denormal(-1e-40), 0.0);
        assert_eq!(flush_denormal(f32::MIN_POSITIVE), f32::MIN_POSITIVE);
        assert_eq!(flush_denormal(0.5), 0.5);
        assert_eq!(flush_denormal(0.0), 0.0);
    }
}
