//! A loss / metric curve as a PNG, with no plotting or image dependency: a small RGB canvas,
//! lines drawn point to point, and a PNG written with stored (uncompressed) deflate blocks.
use std::path::Path;

use crate::error::Result;

const W: usize = 720;
const H: usize = 420;
const MARGIN: usize = 40;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![[255, 255, 255]; W * H],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    /// A 2-pixel-wide line (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            self.set(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
}

/// Draws `series` (each: points `(x, y)` and a colour) on shared axes: x from 0 to the
/// largest x; each series scaled to its own y range (the plot shows shapes, not values —
/// the numbers are in metrics.jsonl). Light grid lines mark tenths of each axis.
pub fn write_curves(path: &Path, series: &[(&[(f64, f64)], [u8; 3])]) -> Result<()> {
    let mut c = Canvas::new();
    let (x0, y0, x1, y1) = (
        MARGIN as i64,
        (H - MARGIN) as i64,
        (W - MARGIN / 2) as i64,
        (MARGIN / 2) as i64,
    );
    for i in 0..=10 {
        let gx = x0 + (x1 - x0) * i / 10;
        let gy = y0 + (y1 - y0) * i / 10;
        c.line((gx, y0), (gx, y1), [230, 230, 230]);
        c.line((x0, gy), (x1, gy), [230, 230, 230]);
    }
    c.line((x0, y0), (x1, y0), [0, 0, 0]);
    c.line((x0, y0), (x0, y1), [0, 0, 0]);
    let xmax = series
        .iter()
        .flat_map(|(p, _)| p.iter().map(|q| q.0))
        .fold(1e-12, f64::max);
    for (points, colour) in series {
        let finite: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
        if finite.is_empty() {
            continue;
        }
        let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        let at = |(x, y): (f64, f64)| {
            (
                x0 + ((x / xmax) * (x1 - x0) as f64) as i64,
                y0 + (((y - lo) / span) * (y1 - y0) as f64) as i64,
            )
        };
        for w in finite.windows(2) {
            c.line(at(w[0]), at(w[1]), *colour);
        }
        for &p in &finite {
            let (x, y) = at(p);
            for d in -2..=2 {
                c.set(x + d, y, *colour);
                c.set(x, y + d, *colour);
            }
        }
    }
    let png = encode_png(&c.px);
    // Written atomically, like every run artefact.
    crate::checkpoint::write_atomic(path, &png)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit RGB PNG of the `W × H` pixels.
fn encode_png(px: &[[u8; 3]]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(H * (1 + 3 * W));
    for row in px.chunks(W) {
        raw.push(0); // filter: none
        row.iter().for_each(|p| raw.extend_from_slice(p));
    }
    // zlib stream of stored deflate blocks (at most 65535 bytes each).
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(W as u32).to_be_bytes());
    ihdr.extend_from_slice(&(H as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_their_standard_check_values() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }
}
