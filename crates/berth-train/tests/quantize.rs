//! `berth quantize` checkpoints: loading one packs exactly the tiles quantize-at-load packs
//! from the f32 original, for every architecture and weight layout of the tiny fixtures.
use std::path::{Path, PathBuf};

use berth_kernels::amx::int8::PackedI8;
use berth_kernels::amx::PackedBf16;
use berth_model::{Model, Precision, Weights};
use berth_train::quantize::quantize_checkpoint;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tiny")
        .join(name)
}

const FIXTURES: [&str; 8] = [
    "bert-base",
    "bert-base-bin",
    "bert-base-sharded",
    "bert-seqcls",
    "distilbert-tokcls",
    "electra-qa",
    "roberta-mlm",
    "roberta-base",
];

#[test]
fn int8_checkpoints_pack_the_tiles_quantize_at_load_packs() {
    for name in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("q8");
        let report = quantize_checkpoint(&tiny(name), &out, Precision::Int8).unwrap();
        assert!(report.matrices > 0, "{name}");
        assert!(!out.with_extension("partial").exists());
        let (orig, _) = Model::load(&tiny(name), false).unwrap();
        let (q, load) = Model::load(&out, false).unwrap();
        // The scale tensors are consumed by the int8 weights, not reported as unused.
        assert!(
            load.unused.iter().all(|k| !k.ends_with("_scale")),
            "{name}: {:?}",
            load.unused
        );
        let (a, b) = (orig.packed_linears(), q.packed_linears());
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(&b) {
            let stored = b
                .int8
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: {:?} not int8", b.weight_keys));
            let at_load = PackedI8::from_tensors(&a.weight, &a.bias).unwrap();
            let bias = b.bias.to_vec1::<f32>().unwrap();
            let from_file = PackedI8::from_quantized(
                &stored.q,
                &stored.scale,
                &bias,
                stored.outputs,
                stored.inputs,
            );
            assert!(
                at_load == from_file,
                "{name}: {:?} packs differently",
                a.weight_keys
            );
            // The f32 view of the stored weight is the dequantized one, within half a step.
            let w = a.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let d = b.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (r, (wr, dr)) in w
                .chunks(stored.inputs)
                .zip(d.chunks(stored.inputs))
                .enumerate()
            {
                for (x, y) in wr.iter().zip(dr) {
                    assert!(
                        (x - y).abs() <= stored.scale[r] * 0.5001,
                        "{name} row {r}: {x} vs {y}"
                    );
                }
            }
        }
        // Everything that is not an encoder matrix is stored unchanged.
        let (ot, _) = Weights::read_dir(&tiny(name)).unwrap();
        let (qt, _) = Weights::read_dir(&out).unwrap();
        let packed: Vec<String> = a.iter().flat_map(|l| l.weight_keys.clone()).collect();
        for (k, t) in &ot {
            if !packed.contains(k) {
                let x = t
                    .flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap();
                let y = qt[k]
                    .flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap();
                assert_eq!(
                    x.to_vec1::<f64>().unwrap(),
                    y.to_vec1::<f64>().unwrap(),
                    "{name}: {k}"
                );
            }
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["berth_quantization"]["dtype"], "int8");
    }
}

#[test]
fn bf16_checkpoints_pack_the_tiles_bf16_at_load_packs() {
    for name in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("bf16");
        quantize_checkpoint(&tiny(name), &out, Precision::Bf16).unwrap();
        let (orig, _) = Model::load(&tiny(name), false).unwrap();
        let (q, _) = Model::load(&out, false).unwrap();
        for (a, b) in orig.packed_linears().iter().zip(&q.packed_linears()) {
            assert!(b.int8.is_none());
            let x = PackedBf16::from_tensors(&a.weight, &a.bias).unwrap();
            let y = PackedBf16::from_tensors(&b.weight, &b.bias).unwrap();
            assert!(x == y, "{name}: {:?} packs differently", a.weight_keys);
        }
    }
}

#[test]
fn quantize_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q8");
    let e = quantize_checkpoint(&tiny("bert-base"), &out, Precision::F32).unwrap_err();
    assert!(e.to_string().contains("int8 or bf16"), "{e}");
    quantize_checkpoint(&tiny("bert-base"), &out, Precision::Int8).unwrap();
    let e = quantize_checkpoint(&tiny("bert-base"), &out, Precision::Int8).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    let e = quantize_checkpoint(&out, &tmp.path().join("again"), Precision::Bf16).unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");
    assert!(!tmp.path().join("again").exists());
}

/// An int8 weight whose scale is missing, mis-shaped or not positive is a corrupt file.
#[test]
fn int8_weights_need_their_scales() {
    use safetensors::Dtype;
    struct T(Dtype, Vec<usize>, Vec<u8>);
    impl safetensors::View for &T {
        fn dtype(&self) -> Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            (&self.2[..]).into()
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }
    let q = T(Dtype::I8, vec![2, 3], vec![1, 2, 3, 0xFF, 0x81, 0]);
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let cases: Vec<(Option<T>, &str)> = vec![
        (None, "has no \"w_scale\""),
        (
            Some(T(Dtype::F32, vec![3], f32s(&[1.0, 1.0, 1.0]))),
            "expected F32 [2]",
        ),
        (
            Some(T(Dtype::F32, vec![2], f32s(&[1.0, 0.0]))),
            "finite and positive",
        ),
        (
            Some(T(Dtype::F32, vec![2], f32s(&[1.0, f32::NAN]))),
            "finite and positive",
        ),
    ];
    let src = Path::new("bad.safetensors");
    for (scale, needle) in cases {
        let mut views = vec![("w".to_string(), &q)];
        if let Some(s) = &scale {
            views.push(("w_scale".to_string(), s));
        }
        let bytes = safetensors::serialize(views, None).unwrap();
        let e = Weights::parse_safetensors(&bytes, src)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(needle) && e.contains("bad.safetensors"),
            "{needle}: {e}"
        );
    }
    // With a good scale: the dequantized values, the scale key consumed.
    let s = T(Dtype::F32, vec![2], f32s(&[0.5, 2.0]));
    let bytes = safetensors::serialize(
        vec![("w".to_string(), &q), ("w_scale".to_string(), &s)],
        None,
    )
    .unwrap();
    let t = Weights::parse_safetensors(&bytes, src).unwrap();
    assert_eq!(t.len(), 1);
    let w = t["w"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(w, vec![0.5, 1.0, 1.5, -2.0, -254.0, 0.0]);
}
