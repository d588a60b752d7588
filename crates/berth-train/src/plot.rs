//! A run's curve.png, drawn with plotters from its metrics.jsonl: training loss (raw and
//! smoothed) on a left axis with values, the dev metric on its own labelled right axis, a
//! legend and a title, and the learning rate in a small panel below. Text uses an embedded
//! font (DejaVu Sans, `assets/`), so the picture looks the same on every machine; the PNG is
//! encoded here around plotters' RGB buffer (zlib by flate2).
use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Result, TrainError};

/// Width and height of curve.png in pixels.
pub const SIZE: (u32, u32) = (1000, 660);
/// Height of the title band, the loss / metric panel and (the rest) the learning-rate panel.
const TITLE: u32 = 40;
const MAIN: u32 = 440;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "berth-sans";

/// Colours: raw loss (light), smoothed loss, dev metric, learning rate.
const RAW: RGBColor = RGBColor(160, 196, 226);
const LOSS: RGBColor = RGBColor(31, 119, 180);
const METRIC: RGBColor = RGBColor(255, 127, 14);
const LR: RGBColor = RGBColor(44, 160, 44);

/// What a run logged: `(step, value)` series, in step order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Training loss at each logged step.
    pub loss: Vec<(f64, f64)>,
    /// Learning rate at each logged step.
    pub lr: Vec<(f64, f64)>,
    /// The dev metric at each evaluation.
    pub metric: Vec<(f64, f64)>,
}

impl History {
    /// The series of a run's metrics.jsonl, `metric` taken from its evaluation lines. A
    /// resumed run may have logged steps twice (after its last checkpoint and again after
    /// the resume): the later line counts.
    pub fn read(metrics: &Path, metric: &str) -> Result<Self> {
        let text = std::fs::read_to_string(metrics).map_err(crate::error::io(metrics))?;
        let mut h = History::default();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| TrainError::Checkpoint {
                    path: metrics.into(),
                    message: format!("line {}: {e}", i + 1),
                })?;
            let Some(step) = v["step"].as_f64() else {
                continue;
            };
            if let Some(eval) = v.get("eval") {
                if let Some(m) = eval[metric].as_f64() {
                    h.metric.push((step, m));
                }
            } else if let (Some(loss), Some(lr)) = (v["loss"].as_f64(), v["lr"].as_f64()) {
                h.loss.push((step, loss));
                h.lr.push((step, lr));
            }
        }
        for s in [&mut h.loss, &mut h.lr, &mut h.metric] {
            *s = last_per_step(s);
        }
        Ok(h)
    }
}

/// One point per step (the last one logged), sorted by step, finite values only.
fn last_per_step(s: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut by_step = std::collections::BTreeMap::new();
    for &(x, y) in s {
        if x.is_finite() && y.is_finite() {
            by_step.insert(x.to_bits(), (x, y));
        }
    }
    let mut v: Vec<(f64, f64)> = by_step.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// TensorBoard's smoothing: a debiased exponential moving average with weight `w`.
pub fn smooth(s: &[(f64, f64)], w: f64) -> Vec<(f64, f64)> {
    let (mut acc, mut norm) = (0.0, 0.0);
    s.iter()
        .map(|&(x, y)| {
            acc = w * acc + (1.0 - w) * y;
            norm = w * norm + (1.0 - w);
            (x, acc / norm)
        })
        .collect()
}

/// The smoothing weight for `n` logged points: none for a handful, up to 0.95 for long runs
/// (about `n / 10` points of memory).
pub fn smoothing_weight(n: usize) -> f64 {
    (1.0 - 10.0 / n.max(1) as f64).clamp(0.0, 0.95)
}

/// The metric axis, never stretched to the values' own range (a drop from 0.100 to 0.093
/// must look like what it is): [0, 1] for fractions, [-1, 1] for correlations, [0, 1.1 ×
/// max] for other non-negative metrics, else the values' range with a tenth of margin.
pub fn metric_range(values: &[f64]) -> (f64, f64) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || (lo >= 0.0 && hi <= 1.0) {
        (0.0, 1.0)
    } else if lo >= -1.0 && hi <= 1.0 {
        (-1.0, 1.0)
    } else if lo >= 0.0 {
        (0.0, hi * 1.1)
    } else {
        let span = (hi - lo).max(1e-9);
        (lo - span * 0.1, hi + span * 0.1)
    }
}

fn draw_error(e: impl std::fmt::Display) -> TrainError {
    TrainError::Config(format!("drawing curve.png: {e}"))
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font compiled into the binary.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// `history` drawn as an RGB image of [`SIZE`] (`3 × w × h` bytes, rows top to bottom).
pub fn render(title: &str, metric: &str, history: &History) -> Result<Vec<u8>> {
    register_font();
    let (w, h) = SIZE;
    let mut px = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut px, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (head, body) = root.split_vertically(TITLE);
        head.draw_text(
            title,
            &TextStyle::from((FAMILY, 20).into_font()).color(&BLACK),
            (16, 10),
        )
        .map_err(draw_error)?;
        let (upper, lower) = body.split_vertically(MAIN);
        let xmax = history
            .loss
            .iter()
            .chain(&history.metric)
            .chain(&history.lr)
            .map(|p| p.0)
            .fold(1.0, f64::max);
        let label = |size: u32| (FAMILY, size).into_font();

        // Loss (left axis) and the dev metric (right axis).
        let loss_hi = history.loss.iter().map(|p| p.1).fold(0.0, f64::max);
        let loss_lo = history.loss.iter().map(|p| p.1).fold(0.0, f64::min);
        let loss_hi = if loss_hi > loss_lo {
            loss_hi * 1.05
        } else {
            loss_lo + 1.0
        };
        let (m_lo, m_hi) = metric_range(&history.metric.iter().map(|p| p.1).collect::<Vec<_>>());
        let mut chart = ChartBuilder::on(&upper)
            .margin_left(12)
            .margin_right(12)
            .margin_top(8)
            .x_label_area_size(40)
            .y_label_area_size(72)
            .right_y_label_area_size(72)
            .build_cartesian_2d(0f64..xmax, loss_lo..loss_hi)
            .map_err(draw_error)?
            .set_secondary_coord(0f64..xmax, m_lo..m_hi);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("training loss")
            .label_style(label(13))
            .axis_desc_style(label(15))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()
            .map_err(draw_error)?;
        chart
            .configure_secondary_axes()
            .y_desc(format!("dev {metric}"))
            .label_style(label(13))
            .axis_desc_style(label(15))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .draw()
            .map_err(draw_error)?;
        let weight = smoothing_weight(history.loss.len());
        chart
            .draw_series(LineSeries::new(
                history.loss.iter().copied(),
                RAW.stroke_width(1),
            ))
            .map_err(draw_error)?
            .label("training loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RAW.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                smooth(&history.loss, weight),
                LOSS.stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(format!("training loss, smoothed (EMA {weight:.2})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], LOSS.stroke_width(2)));
        if !history.metric.is_empty() {
            chart
                .draw_secondary_series(LineSeries::new(
                    history.metric.iter().copied(),
                    METRIC.stroke_width(2),
                ))
                .map_err(draw_error)?
                .label(format!("dev {metric} (right axis)"))
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], METRIC.stroke_width(2))
                });
            chart
                .draw_secondary_series(
                    history
                        .metric
                        .iter()
                        .map(|&p| Circle::new(p, 4, METRIC.filled())),
                )
                .map_err(draw_error)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(label(13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(draw_error)?;

        // Learning rate.
        let lr_hi = history.lr.iter().map(|p| p.1).fold(0.0, f64::max);
        let lr_hi = if lr_hi > 0.0 { lr_hi * 1.1 } else { 1.0 };
        let mut lr_chart = ChartBuilder::on(&lower)
            .margin_left(12)
            .margin_right(12)
            .margin_bottom(6)
            .x_label_area_size(36)
            .y_label_area_size(72)
            .right_y_label_area_size(72)
            .build_cartesian_2d(0f64..xmax, 0f64..lr_hi)
            .map_err(draw_error)?;
        lr_chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("learning rate")
            .label_style(label(12))
            .axis_desc_style(label(14))
            .y_labels(4)
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.1e}"))
            .draw()
            .map_err(draw_error)?;
        lr_chart
            .draw_series(LineSeries::new(
                history.lr.iter().copied(),
                LR.stroke_width(2),
            ))
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(px)
}

/// Draws `RUN/metrics.jsonl` into `RUN/curve.png` (written atomically); returns its path.
pub fn write_run_curve(run: &Path, metric: &str, title: &str) -> Result<PathBuf> {
    let history = History::read(&run.join("metrics.jsonl"), metric)?;
    let px = render(title, metric, &history)?;
    let path = run.join("curve.png");
    crate::checkpoint::write_atomic(&path, &encode_png(&px, SIZE.0, SIZE.1))?;
    Ok(path)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An 8-bit RGB PNG of `w × h` pixels (`px`: 3 bytes per pixel, rows top to bottom).
pub fn encode_png(px: &[u8], w: u32, h: u32) -> Vec<u8> {
    let row = 3 * w as usize;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    for r in px.chunks(row).take(h as usize) {
        // Filter type 1 (sub): each byte minus the one a pixel to its left; flat plot
        // backgrounds become runs of zeros.
        let mut filtered = Vec::with_capacity(row + 1);
        filtered.push(1);
        filtered.extend((0..row).map(|i| r[i].wrapping_sub(if i >= 3 { r[i - 3] } else { 0 })));
        z.write_all(&filtered).expect("writing to memory");
    }
    let data = z.finish().expect("writing to memory");
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, adaptive filters, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &data);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PNG's pixels decoded back (zlib inflate, then undoing the sub filter).
    fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
        use std::io::Read;
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let (mut pos, mut idat, mut dims) = (8, Vec::new(), (0, 0));
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let data = &png[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            assert_eq!(crc, crc32fast::hash(&png[pos + 4..pos + 8 + len]));
            match kind {
                b"IHDR" => {
                    dims = (
                        u32::from_be_bytes(data[..4].try_into().unwrap()),
                        u32::from_be_bytes(data[4..8].try_into().unwrap()),
                    )
                }
                b"IDAT" => idat.extend_from_slice(data),
                _ => {}
            }
            pos += 12 + len;
        }
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut raw)
            .unwrap();
        let row = 3 * dims.0 as usize;
        assert_eq!(raw.len(), dims.1 as usize * (row + 1));
        let mut px = Vec::new();
        for r in raw.chunks(row + 1) {
            assert_eq!(r[0], 1);
            let start = px.len();
            for i in 0..row {
                let left = if i >= 3 { px[start + i - 3] } else { 0u8 };
                px.push(r[1 + i].wrapping_add(left));
            }
        }
        (dims.0, dims.1, px)
    }

    fn history(metric: &[(f64, f64)]) -> History {
        let loss: Vec<(f64, f64)> = (1..=200)
            .map(|s| {
                (
                    s as f64,
                    2.0 / (1.0 + s as f64 / 20.0) + 0.1 * ((s * 7) % 5) as f64,
                )
            })
            .collect();
        let lr = (1..=200)
            .map(|s| (s as f64, 5e-5 * (1.0 - s as f64 / 200.0)))
            .collect();
        History {
            loss,
            lr,
            metric: metric.to_vec(),
        }
    }

    /// Rows (in the loss / metric panel) holding pixels of `colour`.
    fn rows_with(px: &[u8], colour: RGBColor) -> Vec<u32> {
        let (w, _) = SIZE;
        (TITLE..TITLE + MAIN)
            .filter(|&y| {
                (0..w).any(|x| {
                    let i = 3 * (y * w + x) as usize;
                    px[i..i + 3] == [colour.0, colour.1, colour.2]
                })
            })
            .collect()
    }

    #[test]
    fn the_png_decodes_to_the_rendered_pixels() {
        let px = render("a run", "f1", &history(&[(50.0, 0.5), (100.0, 0.7)])).unwrap();
        let png = encode_png(&px, SIZE.0, SIZE.1);
        let (w, h, back) = decode(&png);
        assert_eq!((w, h), SIZE);
        assert!(back == px);
        // Compressed: far below the raw 2 MB.
        assert!(png.len() < 200_000, "{} bytes", png.len());
    }

    #[test]
    fn a_small_metric_change_is_drawn_small() {
        // An F1 drop from 0.100 to 0.093 spans 0.7 % of the [0, 1] axis, not its height.
        let px = render(
            "run",
            "f1",
            &history(&[(50.0, 0.100), (100.0, 0.093), (150.0, 0.095)]),
        )
        .unwrap();
        let rows = rows_with(&px, METRIC);
        // The legend's swatch is one short line; the series sits near the axis' bottom.
        let series: Vec<u32> = rows
            .iter()
            .copied()
            .filter(|&y| y > TITLE + MAIN / 2)
            .collect();
        let extent = series.iter().max().unwrap() - series.iter().min().unwrap();
        assert!(extent < 20, "metric series spans {extent} px: {series:?}");
    }

    #[test]
    fn axes_carry_text() {
        // Tick labels and axis titles: dark pixels left of the plot area and right of it
        // (the metric's axis), which the old hand-drawn canvas never had.
        let px = render("run", "accuracy", &history(&[(100.0, 0.8)])).unwrap();
        let (w, _) = SIZE;
        let dark = |x0: u32, x1: u32| {
            (TITLE..TITLE + MAIN)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| {
                    let i = 3 * (y * w + x) as usize;
                    px[i] < 100 && px[i + 1] < 100 && px[i + 2] < 100
                })
                .count()
        };
        assert!(dark(0, 70) > 200, "no left-axis text");
        assert!(dark(w - 70, w) > 200, "no right-axis text");
    }

    #[test]
    fn history_keeps_the_last_line_of_each_step() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"step":1,"total":3,"epoch":0.3,"loss":2.0,"lr":1e-4,"grad_norm":1,"tokens_per_s":9}"#, "\n",
                r#"{"step":2,"total":3,"epoch":0.6,"loss":1.5,"lr":1e-4,"grad_norm":1,"tokens_per_s":9}"#, "\n",
                r#"{"step":2,"epoch":0.6,"eval":{"f1":0.4}}"#, "\n",
                r#"{"step":2,"total":3,"epoch":0.6,"loss":1.4,"lr":1e-4,"grad_norm":1,"tokens_per_s":9}"#, "\n",
                r#"{"step":3,"total":3,"epoch":1.0,"loss":1.0,"lr":5e-5,"grad_norm":1,"tokens_per_s":9}"#, "\n",
                r#"{"step":3,"epoch":1.0,"eval":{"f1":0.6}}"#, "\n",
            ),
        )
        .unwrap();
        let h = History::read(&p, "f1").unwrap();
        assert_eq!(h.loss, vec![(1.0, 2.0), (2.0, 1.4), (3.0, 1.0)]);
        assert_eq!(h.metric, vec![(2.0, 0.4), (3.0, 0.6)]);
        assert_eq!(h.lr.len(), 3);
        std::fs::write(&p, "{\"step\":1}\nnot json\n").unwrap();
        let e = History::read(&p, "f1").unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn smoothing_is_tensorboards_debiased_ema() {
        let s = smooth(&[(1.0, 1.0), (2.0, 3.0)], 0.5);
        // Debiased: the first point is itself; the second (0.25 + 0.75) / 0.75.
        assert_eq!(s[0], (1.0, 1.0));
        assert!((s[1].1 - (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / 0.75).abs() < 1e-12);
        assert_eq!(metric_range(&[0.1, 0.093]), (0.0, 1.0));
        assert_eq!(metric_range(&[10.0, 9.3]), (0.0, 11.0));
        assert_eq!(metric_range(&[-0.2, 0.9]), (-1.0, 1.0));
        let (lo, hi) = metric_range(&[-3.0, 1.0]);
        assert!((lo + 3.4).abs() < 1e-12 && (hi - 1.4).abs() < 1e-12);
    }
}
