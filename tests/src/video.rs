//! The test camera's pictures (`melange-test-camera`), shared with the tests that
//! check what arrives: each frame says which it is.
//!
//! - [`Pattern::Counter`], for raw frames that must arrive byte for byte: frame `n` has
//!   `n` in its first 8 bytes (little-endian) and every other byte `i` is
//!   `(n * 31 + i / 7) mod 256`, so order, loss and corruption all show.
//! - [`Pattern::Smooth`], for encoded frames that arrive near, not exact: a moving soft
//!   gradient an encoder can code well, with the frame's number in a row of 16 black
//!   or white 16x16 blocks at the top left, which survive any sane encoder. Compared
//!   with [`psnr`].

/// Which picture the test camera makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Exact bytes: see the module docs.
    Counter,
    /// A moving gradient with the number in blocks: see the module docs.
    Smooth,
}

/// Bytes of a packed I420 frame.
pub fn i420_bytes(width: usize, height: usize) -> usize {
    width * height + 2 * (width.div_ceil(2) * height.div_ceil(2))
}

/// Bits of the frame number [`Pattern::Smooth`] shows, and the side of each block.
const CODE_BITS: usize = 16;
const BLOCK: usize = 16;

/// Frame `n` of `pattern` at `width` x `height`, packed I420.
pub fn frame(pattern: Pattern, width: usize, height: usize, n: u64) -> Vec<u8> {
    let size = i420_bytes(width, height);
    match pattern {
        Pattern::Counter => {
            let mut f: Vec<u8> = (0..size).map(|i| (n as usize).wrapping_mul(31).wrapping_add(i / 7) as u8).collect();
            f[..8].copy_from_slice(&n.to_le_bytes());
            f
        }
        Pattern::Smooth => {
            let mut f = vec![128u8; size];
            let shift = n as f64 * 3.0;
            for y in 0..height {
                for x in 0..width {
                    let v = 128.0 + 70.0 * ((x as f64 + shift) / 53.0).sin() * ((y as f64 - shift * 0.5) / 41.0).cos();
                    f[y * width + x] = v.clamp(16.0, 235.0) as u8;
                }
            }
            let code = (n as usize) & ((1 << CODE_BITS) - 1);
            for bit in 0..CODE_BITS {
                let v = if code >> bit & 1 == 1 { 235 } else { 16 };
                for y in 0..BLOCK.min(height) {
                    for x in bit * BLOCK..((bit + 1) * BLOCK).min(width) {
                        f[y * width + x] = v;
                    }
                }
            }
            let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
            for plane in 0..2 {
                let base = width * height + plane * cw * ch;
                for y in 0..ch {
                    for x in 0..cw {
                        let t = if plane == 0 { x as f64 + shift } else { y as f64 - shift };
                        f[base + y * cw + x] = (128.0 + 30.0 * (t / 37.0).sin()) as u8;
                    }
                }
            }
            f
        }
    }
}

/// The number a frame of `pattern` says it is.
pub fn number(pattern: Pattern, width: usize, f: &[u8]) -> u64 {
    match pattern {
        Pattern::Counter => u64::from_le_bytes(f[..8].try_into().unwrap_or_default()),
        Pattern::Smooth => (0..CODE_BITS)
            .map(|bit| {
                // The block's centre, away from the edges coding smears.
                let (y, x) = (BLOCK / 2, bit * BLOCK + BLOCK / 2);
                let v = f.get(y * width + x).copied().unwrap_or(0);
                u64::from(v > 128) << bit
            })
            .sum(),
    }
}

/// The number a [`Pattern::Smooth`] frame scaled by `scale` (same aspect) says it is:
/// its blocks are `scale` times as large.
pub fn number_scaled(width: usize, f: &[u8], scale: f64) -> u64 {
    number_at(width, f, scale, 0, 0)
}

/// As [`number_scaled`], the picture's top left corner at (`x0`, `y0`) of the frame
/// (a picture scaled into a frame of another aspect, with borders).
pub fn number_at(width: usize, f: &[u8], scale: f64, x0: usize, y0: usize) -> u64 {
    (0..CODE_BITS)
        .map(|bit| {
            let y = y0 + (BLOCK as f64 / 2.0 * scale) as usize;
            let x = x0 + ((bit * BLOCK) as f64 * scale + BLOCK as f64 / 2.0 * scale) as usize;
            u64::from(f.get(y * width + x).copied().unwrap_or(0) > 128) << bit
        })
        .sum()
}

/// Packed YUY2 (`Y0 U Y1 V`) of `width` x `height` back to I420, the chroma of each even
/// row kept.
pub fn yuy2_to_i420(f: &[u8], width: usize, height: usize) -> Vec<u8> {
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    let stride = 4 * cw;
    let mut out = vec![0u8; i420_bytes(width, height)];
    for y in 0..height {
        for x in 0..width {
            out[y * width + x] = f[y * stride + 2 * x];
        }
    }
    for y2 in 0..ch {
        for x2 in 0..cw {
            out[width * height + y2 * cw + x2] = f[2 * y2 * stride + 4 * x2 + 1];
            out[width * height + cw * ch + y2 * cw + x2] = f[2 * y2 * stride + 4 * x2 + 3];
        }
    }
    out
}

/// Peak signal-to-noise ratio of `got` against `want` over all planes, dB (infinite
/// when equal).
pub fn psnr(got: &[u8], want: &[u8]) -> f64 {
    let n = got.len().min(want.len()).max(1);
    let mse = got.iter().zip(want).map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum::<f64>() / n as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pattern_says_its_number() {
        for n in [0, 1, 2, 77, 1000, 65_535] {
            for p in [Pattern::Counter, Pattern::Smooth] {
                assert_eq!(number(p, 640, &frame(p, 640, 360, n)), n, "{p:?}");
            }
        }
        let f = frame(Pattern::Smooth, 640, 360, 5);
        assert_eq!(f.len(), 640 * 360 * 3 / 2);
        assert!(psnr(&f, &f).is_infinite());
        assert!(psnr(&f, &frame(Pattern::Smooth, 640, 360, 6)) < 35.0, "frames differ enough to tell");
    }
}
