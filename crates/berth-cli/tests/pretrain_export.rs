//! A model `berth pretrain` trained (fixtures/pretrain/bert-mlm, scripts/make_pretrain_reference.py)
//! loads in transformers' BertForMaskedLM unchanged, and its masked-LM logits there equal
//! berth's (≤ 1e-4).
use berth_model::{Batch, Model};

mod common;
use common::*;

#[test]
fn pretrained_checkpoints_give_transformers_the_same_mlm_logits() {
    let dir = root().join("fixtures/pretrain");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let (model, report) = Model::load(&dir.join("bert-mlm"), false).unwrap();
    assert!(
        report.unused.is_empty(),
        "unused weights {:?}",
        report.unused
    );
    let tok = berth_text::TextTokenizer::from_dir(&dir.join("bert-mlm")).unwrap();
    let mut worst = 0f32;
    for (t, case) in reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["cases"].as_array().unwrap())
    {
        let enc = tok
            .encode(
                t.as_str().unwrap(),
                None,
                64,
                berth_text::Truncation::Error,
                0,
            )
            .unwrap();
        let want_ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(enc.ids, want_ids);
        let batch = Batch::from_sequences([(enc.ids.as_slice(), enc.type_ids.as_slice())]).unwrap();
        let hidden = model.forward(&batch).unwrap();
        let logits = model.mlm_logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
        for (r, want) in case["rows"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["logits"].as_array().unwrap())
        {
            let row = &logits[r.as_u64().unwrap() as usize];
            for (a, b) in row.iter().zip(want.as_array().unwrap()) {
                worst = worst.max((a - b.as_f64().unwrap() as f32).abs());
            }
        }
    }
    println!("berth-pretrained BERT: max abs MLM logit difference to transformers {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
}
