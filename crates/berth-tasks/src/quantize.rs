//! Embedding storage formats, as sentence-transformers' `quantize_embeddings` makes them:
//! float16; int8 / uint8 by per-dimension buckets between the minimum and maximum of the
//! embeddings (floor, clipped to 0..=255, int8 shifted by -128; a constant dimension has
//! step 1); binary / ubinary by the sign bit (`> 0`) packed eight to a byte, most significant
//! bit first (numpy's `packbits`), binary shifted by -128.

/// A storage format of output vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum VectorDtype {
    /// float32 (no change).
    F32,
    /// float16 (rounded to nearest even).
    F16,
    /// Signed bytes over per-dimension ranges.
    Int8,
    /// Unsigned bytes over per-dimension ranges.
    Uint8,
    /// Sign bits packed into signed bytes.
    Binary,
    /// Sign bits packed into unsigned bytes.
    Ubinary,
}

impl VectorDtype {
    /// Whether it needs per-dimension ranges (computed from all the vectors).
    pub fn needs_ranges(self) -> bool {
        matches!(self, VectorDtype::Int8 | VectorDtype::Uint8)
    }

    /// numpy's type code of an element (`descr` of a .npy header).
    pub fn npy_descr(self) -> &'static str {
        match self {
            VectorDtype::F32 => "<f4",
            VectorDtype::F16 => "<f2",
            VectorDtype::Int8 | VectorDtype::Binary => "|i1",
            VectorDtype::Uint8 | VectorDtype::Ubinary => "|u1",
        }
    }
}

/// Each dimension's minimum and maximum over `vecs` (the int8 / uint8 buckets).
pub fn ranges(vecs: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>) {
    let d = vecs.first().map_or(0, Vec::len);
    let (mut lo, mut hi) = (vec![f32::INFINITY; d], vec![f32::NEG_INFINITY; d]);
    for v in vecs {
        for (j, &x) in v.iter().enumerate() {
            lo[j] = lo[j].min(x);
            hi[j] = hi[j].max(x);
        }
    }
    (lo, hi)
}

/// One quantized vector: float16 values (as f32) or integers (bytes as i32).
#[derive(Debug, Clone, PartialEq)]
pub enum Quantized {
    /// F32 / F16 values.
    Floats(Vec<f32>),
    /// Int8 / Uint8 / Binary / Ubinary values.
    Ints(Vec<i32>),
}

/// `v` in format `dtype`; `ranges` (from [`ranges`]) for int8 / uint8.
pub fn quantize(v: &[f32], dtype: VectorDtype, ranges: Option<&(Vec<f32>, Vec<f32>)>) -> Quantized {
    match dtype {
        VectorDtype::F32 => Quantized::Floats(v.to_vec()),
        VectorDtype::F16 => {
            Quantized::Floats(v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect())
        }
        VectorDtype::Int8 | VectorDtype::Uint8 => {
            let (lo, hi) = ranges.expect("int8 / uint8 need ranges; this is a bug");
            let shift = if dtype == VectorDtype::Int8 { 128 } else { 0 };
            Quantized::Ints(
                v.iter()
                    .zip(lo.iter().zip(hi))
                    .map(|(&x, (&s, &e))| {
                        // float32 arithmetic, as numpy does it on float32 arrays.
                        let step = (e - s) / 255.0;
                        let step = if step == 0.0 { 1.0 } else { step };
                        ((x - s) / step).floor().clamp(0.0, 255.0) as i32 - shift
                    })
                    .collect(),
            )
        }
        VectorDtype::Binary | VectorDtype::Ubinary => {
            let shift = if dtype == VectorDtype::Binary { 128 } else { 0 };
            Quantized::Ints(
                v.chunks(8)
                    .map(|c| {
                        let byte = c
                            .iter()
                            .enumerate()
                            .filter(|(_, &x)| x > 0.0)
                            .fold(0i32, |b, (i, _)| b | (0x80 >> i));
                        byte - shift
                    })
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against sentence-transformers' `quantize_embeddings` and numpy's float16
    /// (`fixtures/quantize`, `scripts/make_quantize_reference.py`): every value equal.
    #[test]
    fn quantization_matches_sentence_transformers() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/quantize/reference.json");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<Vec<f32>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect()
        };
        let e = floats(&r["embeddings"]);
        let rg = ranges(&e);
        let want_ranges = floats(&r["ranges"]);
        assert_eq!(
            (rg.0.clone(), rg.1.clone()),
            (want_ranges[0].clone(), want_ranges[1].clone())
        );
        for (key, dtype) in [
            ("int8", VectorDtype::Int8),
            ("uint8", VectorDtype::Uint8),
            ("binary", VectorDtype::Binary),
            ("ubinary", VectorDtype::Ubinary),
        ] {
            for (i, v) in e.iter().enumerate() {
                let want: Vec<i32> = r[key][i]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap() as i32)
                    .collect();
                assert_eq!(
                    quantize(v, dtype, Some(&rg)),
                    Quantized::Ints(want),
                    "{key} row {i}"
                );
            }
        }
        let f16 = floats(&r["float16"]);
        for (v, want) in e.iter().zip(f16) {
            assert_eq!(quantize(v, VectorDtype::F16, None), Quantized::Floats(want));
        }
    }
}
