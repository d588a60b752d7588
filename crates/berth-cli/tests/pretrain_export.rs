//! A model `berth pretrain` trained (fixtures/pretrain/bert-mlm and modernbert-berth,
//! scripts/make_pretrain_reference.py) loads in transformers' BertForMaskedLM /
//! ModernBertForMaskedLM unchanged, and its masked-LM logits there equal berth's (≤ 1e-4).
use berth_model::{Batch, Model};

mod common;
use common::*;

/// `text` encoded by berth (which must give transformers' `ids`) as a one-sequence batch.
fn packed(tok: &berth_text::TextTokenizer, text: &str, ids: &serde_json::Value) -> Batch {
    let enc = tok
        .encode(text, None, 64, berth_text::Truncation::Error, 0)
        .unwrap();
    let want: Vec<u32> = ids
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(enc.ids, want);
    Batch::from_sequences([(enc.ids.as_slice(), enc.type_ids.as_slice())]).unwrap()
}

/// The masked-LM logits berth computes from `fixtures/pretrain/{ckpt}` against
/// transformers' in `reference` (rows at the mask and the first word of each text).
fn mlm_logits_match(ckpt: &str, reference: &str) -> f32 {
    let dir = root().join("fixtures/pretrain");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(reference)).unwrap()).unwrap();
    let (model, report) = Model::load(&dir.join(ckpt), false).unwrap();
    assert!(
        report.unused.is_empty(),
        "unused weights {:?}",
        report.unused
    );
    let tok = berth_text::TextTokenizer::from_dir(&dir.join(ckpt)).unwrap();
    let mut worst = 0f32;
    for (t, case) in reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["cases"].as_array().unwrap())
    {
        let batch = packed(&tok, t.as_str().unwrap(), &case["ids"]);
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
    assert!(worst <= 1e-4, "{ckpt}: {worst}");
    worst
}

#[test]
fn pretrained_checkpoints_give_transformers_the_same_mlm_logits() {
    let worst = mlm_logits_match("bert-mlm", "reference.json");
    println!("berth-pretrained BERT: max abs MLM logit difference to transformers {worst:.2e}");
}

/// `berth pretrain --arch modernbert` writes a ModernBertForMaskedLM that transformers loads
/// with no missing, unexpected or mismatched weights, and whose masked-LM logits there equal
/// berth's (fixtures/pretrain/modernbert-berth, reference-modernbert.json).
#[test]
fn pretrained_modernbert_loads_in_transformers_unchanged() {
    let dir = root().join("fixtures/pretrain");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference-modernbert.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(reference["class"], "ModernBertForMaskedLM");
    for (what, keys) in reference["loading_info"].as_object().unwrap() {
        assert_eq!(
            keys.as_array().unwrap().len(),
            0,
            "transformers reported {what}: {keys}"
        );
    }
    let worst = mlm_logits_match("modernbert-berth", "reference-modernbert.json");
    println!(
        "berth-pretrained ModernBERT: max abs MLM logit difference to transformers {worst:.2e}"
    );
}

/// `berth pretrain --objective sop` writes a `BertForPreTraining`; transformers computes the
/// same masked-LM and sentence-pair logits from it (fixtures/pretrain/bert-sop).
#[test]
fn sentence_order_checkpoints_give_transformers_the_same_pair_logits() {
    let dir = root().join("fixtures/pretrain");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference-sop.json")).unwrap())
            .unwrap();
    let ckpt = dir.join("bert-sop");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForPreTraining");
    let (model, report) = Model::load(&ckpt, false).unwrap();
    assert!(report.unused.is_empty(), "unused {:?}", report.unused);
    let tok = berth_text::TextTokenizer::from_dir(&ckpt).unwrap();
    let ints = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let (mut worst_mlm, mut worst_pair) = (0f32, 0f32);
    for case in reference["cases"].as_array().unwrap() {
        let enc = tok
            .encode(
                case["a"].as_str().unwrap(),
                Some(case["b"].as_str().unwrap()),
                64,
                berth_text::Truncation::Error,
                0,
            )
            .unwrap();
        assert_eq!(enc.ids, ints(&case["ids"]));
        assert_eq!(enc.type_ids, ints(&case["type_ids"]));
        let batch = Batch::from_sequences([(enc.ids.as_slice(), enc.type_ids.as_slice())]).unwrap();
        let hidden = model.forward(&batch).unwrap();
        let mlm = model.mlm_logits(&hidden).unwrap().to_vec2::<f32>().unwrap();
        let row = case["row"].as_u64().unwrap() as usize;
        for (a, b) in mlm[row].iter().zip(case["mlm_logits"].as_array().unwrap()) {
            worst_mlm = worst_mlm.max((a - b.as_f64().unwrap() as f32).abs());
        }
        let pair = model
            .sentence_pair_logits(&hidden, &batch)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (a, b) in pair[0].iter().zip(case["pair_logits"].as_array().unwrap()) {
            worst_pair = worst_pair.max((a - b.as_f64().unwrap() as f32).abs());
        }
    }
    println!("BertForPreTraining: max abs difference to transformers: MLM {worst_mlm:.2e}, pair {worst_pair:.2e}");
    assert!(
        worst_mlm <= 1e-4 && worst_pair <= 1e-4,
        "{worst_mlm} {worst_pair}"
    );
}

/// `berth pretrain --objective rtd` writes an `ElectraForPreTraining` with its generator
/// (`ElectraForMaskedLM`) in `generator/`; transformers loads both with no missing or unused
/// weights and computes the same discriminator and masked-LM logits
/// (fixtures/pretrain/electra-berth, reference-rtd.json).
#[test]
fn electra_checkpoints_give_transformers_the_same_discriminator_and_generator_logits() {
    let dir = root().join("fixtures/pretrain");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference-rtd.json")).unwrap())
            .unwrap();
    let ckpt = dir.join("electra-berth");
    let (disc, report) = Model::load(&ckpt, false).unwrap();
    assert!(report.unused.is_empty(), "unused {:?}", report.unused);
    let (generator, report) = Model::load(&ckpt.join("generator"), false).unwrap();
    assert!(report.unused.is_empty(), "unused {:?}", report.unused);
    let tok = berth_text::TextTokenizer::from_dir(&ckpt).unwrap();
    let (mut worst_rtd, mut worst_mlm) = (0f32, 0f32);
    for (t, case) in reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["cases"].as_array().unwrap())
    {
        let batch = packed(&tok, t.as_str().unwrap(), &case["ids"]);
        let rtd = disc
            .replaced_token_logits(&disc.forward(&batch).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in rtd.iter().zip(case["rtd_logits"].as_array().unwrap()) {
            worst_rtd = worst_rtd.max((a - b.as_f64().unwrap() as f32).abs());
        }
        let mlm = generator
            .mlm_logits(&generator.forward(&batch).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, want) in case["rows"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["mlm_logits"].as_array().unwrap())
        {
            for (a, b) in mlm[r.as_u64().unwrap() as usize]
                .iter()
                .zip(want.as_array().unwrap())
            {
                worst_mlm = worst_mlm.max((a - b.as_f64().unwrap() as f32).abs());
            }
        }
    }
    println!("berth-pretrained ELECTRA: max abs difference to transformers: discriminator {worst_rtd:.2e}, generator MLM {worst_mlm:.2e}");
    assert!(
        worst_rtd <= 1e-4 && worst_mlm <= 1e-4,
        "{worst_rtd} {worst_mlm}"
    );
}
