//! One training recipe in berth and in PyTorch (fixtures/train, made by
//! scripts/make_train_reference.py from the tiny checkpoints): same loss at every step,
//! same gradient for every parameter, same weights after three AdamW steps with warmup,
//! linear decay, weight-decay groups and gradient clipping.
use std::path::PathBuf;

use berth_model::HeadKind;
use berth_text::{TextTokenizer, Truncation};
use berth_train::distill::DistillConfig;
use berth_train::init::{load_for_task, TaskHead};
use berth_train::objective::{Companion, Env, Networks};
use berth_train::objectives::classify::{self, ClassifyExample, Target};
use berth_train::objectives::embed::{self, EmbedExample};
use berth_train::objectives::mlm::{masked_lm_loss, MaskedInput};
use berth_train::objectives::rerank::{self, RerankExample};
use berth_train::objectives::{ner, qa, rtd};
use berth_train::optim::{AdamW, AdamWConfig};
use berth_train::schedule::{Schedule, ScheduleKind};
use candle_core::Device;
use serde_json::Value;

/// Which head a parity case trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Classify,
    Ner,
    Qa,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check(name: &str, task: Task) {
    let recipe: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/train/recipe.json")).unwrap(),
    )
    .unwrap();
    let r = &recipe[name];
    let reference = candle_core::safetensors::load(
        root().join(format!("fixtures/train/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    // ModernBERT's recipes run on the checkpoints of fixtures/modernbert.
    let dir = match name.strip_prefix("modernbert-") {
        Some(rest) => root().join("fixtures/modernbert").join(rest),
        None => root().join("fixtures/tiny").join(name),
    };
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let cfg = berth_model::EncoderConfig::from_file(&dir.join("config.json")).unwrap();
    let kind = match task {
        Task::Classify => HeadKind::SequenceClassification,
        Task::Ner => HeadKind::TokenClassification,
        Task::Qa => HeadKind::QuestionAnswering,
    };
    let head = TaskHead {
        kind,
        labels: cfg.id2label.clone(),
        problem_type: None,
        sentence_order: false,
    };
    let (model, _) = load_for_task(&dir, &head, 0).unwrap();
    let encs = recipe_encodings(name, r, &tok);
    match task {
        Task::Classify => {
            let examples = class_examples(encs);
            let refs: Vec<&ClassifyExample> = examples.iter().collect();
            compare_steps(name, &model, &reference, r, false, &[], |m| {
                classify::loss(m, &refs, None).unwrap().unwrap()
            });
        }
        Task::Ner => {
            let examples: Vec<ner::NerExample> = encs
                .into_iter()
                .map(|(enc, l)| ner::NerExample {
                    enc,
                    token_labels: l
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|l| l.as_i64().filter(|&v| v >= 0).map(|v| v as u32))
                        .collect(),
                    words: Vec::new(),
                })
                .collect();
            let refs: Vec<&ner::NerExample> = examples.iter().collect();
            compare_steps(name, &model, &reference, r, false, &[], |m| {
                ner::loss(m, &refs, None).unwrap().unwrap()
            });
        }
        Task::Qa => {
            let examples: Vec<qa::QaExample> = encs
                .into_iter()
                .map(|(enc, l)| qa::QaExample {
                    enc,
                    span: (l[0].as_u64().unwrap() as u32, l[1].as_u64().unwrap() as u32),
                })
                .collect();
            let refs: Vec<&qa::QaExample> = examples.iter().collect();
            compare_steps(name, &model, &reference, r, true, &[], |m| {
                qa::loss(m, &refs, None).unwrap().unwrap()
            });
        }
    }
}

/// The recipe's texts (QA: question and text pairs) encoded as berth encodes them, checked
/// against the ids transformers gave, each with its labels.
fn recipe_encodings<'a>(
    name: &str,
    r: &'a Value,
    tok: &TextTokenizer,
) -> Vec<(berth_text::Encoded, &'a Value)> {
    r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // QA cases pair a question with each text.
            let (first, pair) = match r["questions"][i].as_str() {
                Some(q) => (q, Some(t.as_str().unwrap())),
                None => (t.as_str().unwrap(), None),
            };
            let enc = tok.encode(first, pair, 64, Truncation::Error, i).unwrap();
            let want: Vec<u32> = r["input_ids"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(enc.ids, want, "{name}: tokenization of text {i}");
            (enc, &r["labels"][i])
        })
        .collect()
}

/// Single-label classification examples from encodings and their class labels.
fn class_examples(encs: Vec<(berth_text::Encoded, &Value)>) -> Vec<ClassifyExample> {
    encs.into_iter()
        .map(|(enc, l)| ClassifyExample {
            enc,
            target: Target::Class(Some(l.as_u64().unwrap() as u32)),
        })
        .collect()
}

/// Distillation (`DistillConfig::blend` of the teacher's softened logits and the hard
/// labels) against PyTorch's `KLDivLoss(batchmean) * T²` + cross-entropy
/// (scripts/make_distill_reference.py): a one-layer student taken from the tiny two-layer
/// checkpoint by `init::write_student`, the checkpoint itself as the teacher.
fn check_distill(name: &str, task: Task) {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/train/distill.json")).unwrap(),
    )
    .unwrap();
    let r = &d[name];
    let reference = candle_core::safetensors::load(
        root().join(format!("fixtures/train/distill-{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let dir = root().join("fixtures/tiny").join(name);
    let tmp = tempfile::tempdir().unwrap();
    let student_dir = tmp.path().join("student");
    assert_eq!(
        berth_train::init::write_student(&dir, &student_dir, 1).unwrap(),
        [0]
    );
    let labels = berth_model::EncoderConfig::from_file(&dir.join("config.json"))
        .unwrap()
        .id2label;
    let kind = match task {
        Task::Classify => HeadKind::SequenceClassification,
        _ => HeadKind::TokenClassification,
    };
    let head = TaskHead {
        kind,
        labels: labels.clone(),
        problem_type: None,
        sentence_order: false,
    };
    let (student, _) = load_for_task(&student_dir, &head, 0).unwrap();
    assert_eq!(student.config.num_layers, 1);
    let dc = DistillConfig {
        teacher: dir.clone(),
        alpha: d["alpha"].as_f64().unwrap(),
        temperature: d["temperature"].as_f64().unwrap(),
    };
    let teacher = dc.load_teacher(&Env::new(&student_dir, 0), kind).unwrap();
    dc.check_labels(&teacher, &labels).unwrap();
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let encs = recipe_encodings(name, r, &tok);
    if task == Task::Classify {
        let examples = class_examples(encs);
        let refs: Vec<&ClassifyExample> = examples.iter().collect();
        compare_steps(name, &student, &reference, r, false, &[], |m| {
            classify::distilled_loss(m, &teacher, &refs, &dc, None)
                .unwrap()
                .unwrap()
        });
    } else {
        let examples: Vec<ner::NerExample> = encs
            .into_iter()
            .map(|(enc, l)| ner::NerExample {
                enc,
                token_labels: l
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_i64().filter(|&v| v >= 0).map(|v| v as u32))
                    .collect(),
                words: Vec::new(),
            })
            .collect();
        let refs: Vec<&ner::NerExample> = examples.iter().collect();
        compare_steps(name, &student, &reference, r, false, &[], |m| {
            ner::distilled_loss(m, &teacher, &refs, &dc, None)
                .unwrap()
                .unwrap()
        });
    }
}

#[test]
fn distilled_classifier_trains_like_pytorch_kl_with_temperature() {
    check_distill("bert-seqcls", Task::Classify);
}

#[test]
fn distilled_tagger_trains_like_pytorch_kl_with_temperature() {
    check_distill("bert-tokcls", Task::Ner);
}

/// Three AdamW steps (warmup 1 of 4, weight decay 0.01, clip 1.0) with `loss` against the
/// PyTorch run `name`: the loss of every step, each gradient at step 1, the gradient norm of
/// every step and the weights after the last. `untouched` names the parameters no loss
/// reaches (PyTorch leaves their .grad None); `qa` allows QA's extra zero gradients.
fn compare_steps(
    name: &str,
    model: &berth_model::Model,
    reference: &std::collections::HashMap<String, candle_core::Tensor>,
    r: &Value,
    qa: bool,
    untouched: &[&str],
    loss_of: impl Fn(&berth_model::Model) -> candle_core::Tensor,
) {
    compare_param_steps(
        name,
        &[model],
        &model.params,
        reference,
        r,
        qa,
        untouched,
        || loss_of(model),
    )
}

/// [`compare_steps`] over any parameter list (several networks trained together).
#[allow(clippy::too_many_arguments)]
fn compare_param_steps(
    name: &str,
    models: &[&berth_model::Model],
    params: &[berth_model::Param],
    reference: &std::collections::HashMap<String, candle_core::Tensor>,
    r: &Value,
    qa: bool,
    untouched: &[&str],
    loss_of: impl Fn() -> candle_core::Tensor,
) {
    let task = if qa { Task::Qa } else { Task::Classify };
    let adamw = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(params, adamw);
    let schedule = Schedule {
        kind: ScheduleKind::Linear,
        base_lr: 1e-3,
        warmup: 1,
        total: 4,
    };
    for step in 0..3u64 {
        let loss = loss_of();
        let l = loss.to_scalar::<f32>().unwrap() as f64;
        let want = r["losses"][step as usize].as_f64().unwrap();
        println!("{name} step {step}: loss {l:.7} vs PyTorch {want:.7}");
        assert!(
            (l - want).abs() <= 1e-5,
            "{name} step {step}: loss {l} vs {want}"
        );
        let mut grads = loss.backward().unwrap();
        for m in models {
            m.collect_grads(&mut grads).unwrap();
        }
        opt.accumulate(&grads, 1.0).unwrap();
        let mut none = opt.untouched();
        none.sort();
        assert_eq!(
            none,
            untouched.to_vec(),
            "{name}: parameters without a gradient"
        );
        if step == 1 {
            let mut worst = 0f64;
            for p in params
                .iter()
                .filter(|p| !untouched.contains(&p.name.as_str()))
            {
                let want = reference
                    .get(&format!("grad.{}", p.name))
                    .unwrap_or_else(|| panic!("{name}: PyTorch has no {}", p.name));
                let slot = params
                    .iter()
                    .find(|q| q.var.as_tensor().id() == p.var.as_tensor().id())
                    .unwrap();
                let full = candle_core::Tensor::from_vec(
                    opt.grad(&slot.name).unwrap(),
                    p.var.as_tensor().shape(),
                    &Device::Cpu,
                )
                .unwrap();
                let got = p
                    .view(&full)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                    / scale;
                assert!(
                    diff <= 1e-3,
                    "{name}: gradient of {} off by {diff} (relative to its max)",
                    p.name
                );
                worst = worst.max(diff as f64);
            }
            println!(
                "{name}: {} parameter gradients, worst relative difference {worst:.2e}",
                params.len()
            );
        }
        let norm = opt.clip(Some(1.0));
        let want_norm = r["grad_norms"][step as usize].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= 1e-4 * want_norm.max(1.0),
            "{name} step {step}: grad norm {norm} vs {want_norm}"
        );
        opt.step(schedule.lr(step)).unwrap();
    }
    // The key bias (and, for QA, see below) has an exactly-zero true gradient (softmax ignores a shift shared by a
    // row's scores): both sides hold rounding noise there, which Adam normalises to steps of
    // ±lr in arbitrary directions. Those parameters are held to Adam's step bound instead.
    let lr_sum: f64 = (0..3).map(|k| schedule.lr(k)).sum();
    let mut worst = 0f32;
    for p in params {
        let got = p
            .view(p.var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = reference[&format!("final.{}", p.name)]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        if untouched.contains(&p.name.as_str()) {
            // Neither side moves a parameter without a gradient.
            assert!(
                diff == 0.0,
                "{name}: {} has no gradient but moved {diff}",
                p.name
            );
            continue;
        }
        let g = reference[&format!("grad.{}", p.name)]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if g < 1e-6 {
            // Key biases always; in QA also qa_outputs.bias and the last LayerNorm bias, since the start / end
            // softmax runs over tokens and ignores a shift shared by all of them.
            let last_ln_bias = task == Task::Qa
                && p.name.ends_with("bias")
                && (p.name.starts_with("qa_outputs")
                    || p.name == "classifier.bias"
                    || (p.name.contains("layer.1.") && p.name.contains("output")));
            assert!(
                p.name.contains("key") || p.name.contains("k_lin") || last_ln_bias,
                "{name}: unexpected zero gradient for {}",
                p.name
            );
            assert!(
                (diff as f64) <= 2.0 * lr_sum,
                "{name}: {} moved {diff}, beyond Adam's bound",
                p.name
            );
            continue;
        }
        // 5e-5 is 5% of one full-rate step. Adam divides by sqrt(v), so an element whose
        // gradient is at rounding level (below 1e-6 of the parameter's largest) turns its
        // rounding difference into a step of arbitrary sign: such elements are held to
        // Adam's step bound instead.
        let grads = reference[&format!("grad.{}", p.name)]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut noise = 0;
        for ((a, b), gi) in got.iter().zip(&want).zip(&grads) {
            let d = (a - b).abs();
            if d > 5e-5 {
                assert!(
                    gi.abs() <= 1e-6 * g && (d as f64) <= 2.0 * lr_sum,
                    "{name}: {} after 3 AdamW steps off by {d} (gradient {gi}, largest {g})",
                    p.name
                );
                noise += 1;
            } else {
                worst = worst.max(d);
            }
        }
        if noise > 0 {
            println!(
                "{name}: {} has {noise} rounding-level-gradient elements beyond 5e-5",
                p.name
            );
        }
    }
    println!("{name}: weights after 3 steps, worst abs difference {worst:.2e}");
}

#[test]
fn bert_sequence_classification_trains_like_pytorch() {
    check("bert-seqcls", Task::Classify);
}

#[test]
fn roberta_sequence_classification_trains_like_pytorch() {
    check("roberta-seqcls", Task::Classify);
}

#[test]
fn distilbert_sequence_classification_trains_like_pytorch() {
    check("distilbert-seqcls", Task::Classify);
}

#[test]
fn bert_token_classification_trains_like_pytorch() {
    check("bert-tokcls", Task::Ner);
}

#[test]
fn distilbert_token_classification_trains_like_pytorch() {
    check("distilbert-tokcls", Task::Ner);
}

/// The weights PyTorch trained (three AdamW steps) saved as a checkpoint load in berth and
/// predict what PyTorch predicts.
#[test]
fn pytorch_trained_weights_load_and_predict_the_same() {
    for (name, task) in [
        ("bert-seqcls", Task::Classify),
        ("roberta-seqcls", Task::Classify),
        ("distilbert-tokcls", Task::Ner),
        ("bert-qa", Task::Qa),
    ] {
        let reference = candle_core::safetensors::load(
            root().join(format!("fixtures/train/{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(root().join("fixtures/tiny").join(name)).unwrap() {
            let e = e.unwrap();
            let f = e.file_name().to_string_lossy().into_owned();
            if !f.ends_with(".safetensors") {
                std::fs::copy(e.path(), tmp.path().join(&f)).unwrap();
            }
        }
        let trained: std::collections::HashMap<String, candle_core::Tensor> = reference
            .iter()
            .filter_map(|(k, t)| k.strip_prefix("final.").map(|n| (n.to_string(), t.clone())))
            .collect();
        candle_core::safetensors::save(&trained, tmp.path().join("model.safetensors")).unwrap();
        let (p, _) =
            berth_tasks::Pipeline::load(tmp.path(), &berth_tasks::PipelineOptions::default())
                .unwrap();
        let recipe: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("fixtures/train/recipe.json")).unwrap(),
        )
        .unwrap();
        let texts: Vec<String> = recipe[name]["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        let mut worst = 0f32;
        for (s, text) in texts.iter().enumerate() {
            let encs = match recipe[name]["questions"][s].as_str() {
                Some(q) => vec![p
                    .tokenizer
                    .encode(q, Some(text), 64, Truncation::Error, s)
                    .unwrap()],
                None => p.encode(std::slice::from_ref(text), 0).unwrap(),
            };
            let (batch, hidden) = p.run(&encs).unwrap();
            let got = match task {
                Task::Classify => p.model.sequence_logits(&hidden, &batch).unwrap(),
                Task::Ner => p.model.token_logits(&hidden).unwrap(),
                Task::Qa => {
                    let (a, b) = p.model.qa_logits(&hidden).unwrap();
                    candle_core::Tensor::stack(&[a, b], 1).unwrap()
                }
            };
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = reference[&format!("logits.{s}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got.len(), want.len());
            worst = got
                .iter()
                .zip(&want)
                .fold(worst, |m, (a, b)| m.max((a - b).abs()));
        }
        println!("{name}: PyTorch-trained model, max abs logit difference {worst:.2e}");
        assert!(worst <= 1e-4, "{name}: {worst}");
    }
}

#[test]
fn bert_question_answering_trains_like_pytorch() {
    check("bert-qa", Task::Qa);
}

#[test]
fn distilbert_question_answering_trains_like_pytorch() {
    check("distilbert-qa", Task::Qa);
}

fn recipe(
    name: &str,
) -> (
    Value,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let recipe: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/train/recipe.json")).unwrap(),
    )
    .unwrap();
    let reference = candle_core::safetensors::load(
        root().join(format!("fixtures/train/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    (recipe[name].clone(), reference)
}

/// Encodes `texts` (paired with `pairs` when given), checking the ids PyTorch saw.
fn encode(
    tok: &TextTokenizer,
    texts: &Value,
    pairs: Option<&Value>,
    ids: &Value,
) -> Vec<berth_text::Encoded> {
    (0..texts.as_array().unwrap().len())
        .map(|i| {
            let (first, second) = match pairs {
                Some(p) => (p[i].as_str().unwrap(), texts[i].as_str()),
                None => (texts[i].as_str().unwrap(), None),
            };
            let enc = tok.encode(first, second, 64, Truncation::Error, i).unwrap();
            let want: Vec<u32> = ids[i]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(enc.ids, want, "tokenization of text {i}");
            enc
        })
        .collect()
}

#[test]
fn multi_label_classification_trains_like_pytorch() {
    let (r, reference) = recipe("bert-multilabel");
    let dir = root().join("fixtures/tiny/bert-seqcls");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let cfg = berth_model::EncoderConfig::from_file(&dir.join("config.json")).unwrap();
    let head = TaskHead {
        kind: HeadKind::SequenceClassification,
        labels: cfg.id2label.clone(),
        problem_type: Some("multi_label_classification".into()),
        sentence_order: false,
    };
    let (model, _) = load_for_task(&dir, &head, 0).unwrap();
    let examples: Vec<ClassifyExample> = encode(&tok, &r["texts"], None, &r["input_ids"])
        .into_iter()
        .zip(r["labels"].as_array().unwrap())
        .map(|(enc, l)| ClassifyExample {
            target: Target::Labels(
                l.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect(),
            ),
            enc,
        })
        .collect();
    let refs: Vec<&ClassifyExample> = examples.iter().collect();
    compare_steps("bert-multilabel", &model, &reference, &r, false, &[], |m| {
        classify::loss(m, &refs, None).unwrap().unwrap()
    });
}

#[test]
fn cross_encoder_reranker_trains_like_sentence_transformers() {
    let (r, reference) = recipe("bert-rerank");
    let dir = root().join("fixtures/train/bert-rerank");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let head = TaskHead {
        kind: HeadKind::SequenceClassification,
        labels: vec!["LABEL_0".into()],
        problem_type: None,
        sentence_order: false,
    };
    let (model, _) = load_for_task(&dir, &head, 0).unwrap();
    let examples: Vec<RerankExample> =
        encode(&tok, &r["texts"], Some(&r["questions"]), &r["input_ids"])
            .into_iter()
            .zip(r["labels"].as_array().unwrap())
            .map(|(enc, v)| RerankExample {
                enc,
                relevance: v.as_f64().unwrap() as f32,
                group: 0,
            })
            .collect();
    let refs: Vec<&RerankExample> = examples.iter().collect();
    compare_steps("bert-rerank", &model, &reference, &r, false, &[], |m| {
        rerank::loss(m, &refs, None).unwrap().unwrap()
    });
}

#[test]
fn bi_encoder_with_in_batch_negatives_trains_like_sentence_transformers() {
    let (r, reference) = recipe("bert-embed");
    let dir = root().join("fixtures/tiny/bert-base");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let (model, _) = berth_train::init::load_encoder(&dir).unwrap();
    let ids = &r["input_ids"];
    let anchors = encode(&tok, &r["texts"], None, &ids[0]);
    let positives = encode(&tok, &r["questions"], None, &ids[1]);
    let negatives = encode(&tok, &r["negatives"], None, &ids[2]);
    let examples: Vec<EmbedExample> = anchors
        .into_iter()
        .zip(positives)
        .zip(negatives)
        .map(|((a, p), n)| EmbedExample {
            anchor: a,
            positive: p,
            negative: Some(n),
        })
        .collect();
    let refs: Vec<&EmbedExample> = examples.iter().collect();
    assert_eq!(r["scale"].as_f64().unwrap(), 20.0);
    let mean = berth_tasks::Pooling::Mean;
    compare_steps(
        "bert-embed",
        &model,
        &reference,
        &r,
        false,
        &["pooler.dense.bias", "pooler.dense.weight"],
        |m| {
            embed::mnrl_loss(m, &refs, mean, 20.0, None)
                .unwrap()
                .unwrap()
        },
    );
}

/// ModernBERT (pre-norm layers, rotary positions, GeGLU, sliding-window attention on texts
/// longer than the window of 8) under the recipe: every head, with and without biases.
#[test]
fn modernbert_sequence_classification_trains_like_pytorch() {
    check("modernbert-seqcls-mean", Task::Classify);
    check("modernbert-seqcls-cls-biased", Task::Classify);
}

#[test]
fn modernbert_token_classification_trains_like_pytorch() {
    check("modernbert-tokcls", Task::Ner);
}

#[test]
fn modernbert_question_answering_trains_like_pytorch() {
    check("modernbert-qa", Task::Qa);
}

/// ModernBertForMaskedLM (tied decoder with a bias) on masked texts.
#[test]
fn modernbert_masked_lm_trains_like_pytorch() {
    let name = "modernbert-mlm";
    let recipe: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/train/recipe.json")).unwrap(),
    )
    .unwrap();
    let r = &recipe[name];
    let reference = candle_core::safetensors::load(
        root().join(format!("fixtures/train/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let head = TaskHead {
        kind: HeadKind::MaskedLm,
        labels: Vec::new(),
        problem_type: None,
        sentence_order: false,
    };
    let (model, _) = load_for_task(&root().join("fixtures/modernbert/mlm"), &head, 0).unwrap();
    let ints = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let inputs: Vec<MaskedInput> = (0..r["texts"].as_array().unwrap().len())
        .map(|i| {
            let ids: Vec<u32> = ints(&r["input_ids"][i]).iter().map(|&x| x as u32).collect();
            let labels = ints(&r["labels"][i]);
            let chosen: Vec<u32> = (0..labels.len() as u32)
                .filter(|&j| labels[j as usize] >= 0)
                .collect();
            MaskedInput {
                type_ids: vec![0; ids.len()],
                ids,
                labels: chosen.iter().map(|&j| labels[j as usize] as u32).collect(),
                positions: chosen,
                pair_label: None,
            }
        })
        .collect();
    assert!(inputs.iter().all(|m| !m.positions.is_empty()));
    compare_steps(name, &model, &reference, r, false, &[], |m| {
        masked_lm_loss(m, &inputs, None).unwrap().unwrap()
    });
}

#[test]
fn masked_lm_with_sentence_order_trains_like_bert_for_pretraining() {
    // fixtures/pretrain/parity.*: BertForPreTraining from bert-sop on six masked pairs (three
    // in order, three swapped), made by scripts/make_pretrain_reference.py parity.
    let dir = root().join("fixtures/pretrain");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("parity.json")).unwrap()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("parity.safetensors"), &Device::Cpu).unwrap();
    let head = TaskHead {
        kind: HeadKind::MaskedLm,
        labels: Vec::new(),
        problem_type: None,
        sentence_order: true,
    };
    let (model, _) = load_for_task(&dir.join("bert-sop"), &head, 0).unwrap();
    let ints = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let inputs: Vec<MaskedInput> = r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let labels = ints(&c["labels"]);
            let chosen: Vec<u32> = (0..labels.len() as u32)
                .filter(|&j| labels[j as usize] >= 0)
                .collect();
            MaskedInput {
                ids: ints(&c["ids"]).iter().map(|&x| x as u32).collect(),
                type_ids: ints(&c["type_ids"]).iter().map(|&x| x as u32).collect(),
                labels: chosen.iter().map(|&j| labels[j as usize] as u32).collect(),
                positions: chosen,
                pair_label: Some(c["pair_label"].as_u64().unwrap() as u32),
            }
        })
        .collect();
    assert!(inputs.iter().any(|m| !m.positions.is_empty()));
    compare_steps(
        "bert-pretraining",
        &model,
        &reference,
        &r,
        false,
        &[],
        |m| masked_lm_loss(m, &inputs, None).unwrap().unwrap(),
    );
}

#[test]
fn replaced_token_detection_trains_like_electra() {
    // fixtures/pretrain/rtd.*: a one-layer ElectraForMaskedLM generator sharing the
    // embeddings of a two-layer ElectraForPreTraining discriminator; loss = generator MLM +
    // 50 x discriminator BCE on fixed masked pairs with fixed replacements (made by
    // scripts/make_pretrain_reference.py rtd).
    let dir = root().join("fixtures/pretrain");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rtd.json")).unwrap()).unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("rtd.safetensors"), &Device::Cpu).unwrap();
    let head = |kind| TaskHead {
        kind,
        labels: Vec::new(),
        problem_type: None,
        sentence_order: false,
    };
    let disc_dir = dir.join("electra-rtd");
    let (disc, _) = load_for_task(&disc_dir, &head(HeadKind::ReplacedTokenDetection), 0).unwrap();
    let (mut generator, _) =
        load_for_task(&disc_dir.join("generator"), &head(HeadKind::MaskedLm), 0).unwrap();
    rtd::share_embeddings(&mut generator, &disc).unwrap();
    let ints = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as u32)
            .collect()
    };
    let cases = r["cases"].as_array().unwrap();
    let inputs: Vec<MaskedInput> = cases
        .iter()
        .map(|c| {
            let labels: Vec<i64> = c["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            let chosen: Vec<u32> = (0..labels.len() as u32)
                .filter(|&j| labels[j as usize] >= 0)
                .collect();
            MaskedInput {
                ids: ints(&c["ids"]),
                type_ids: ints(&c["type_ids"]),
                labels: chosen.iter().map(|&j| labels[j as usize] as u32).collect(),
                positions: chosen,
                pair_label: None,
            }
        })
        .collect();
    // The generator's samples: the fixture's replacements, masked row by masked row.
    let samples: Vec<u32> = cases
        .iter()
        .zip(&inputs)
        .flat_map(|(c, m)| {
            let replaced = ints(&c["replaced"]);
            m.positions
                .iter()
                .map(|&p| replaced[p as usize])
                .collect::<Vec<_>>()
        })
        .collect();
    let weight = r["weight"].as_f64().unwrap();
    // The optimizer steps both networks as a run does (the generator as a companion).
    let params = Networks {
        main: disc.clone(),
        config: Value::Null,
        companions: vec![Companion {
            dir: rtd::GENERATOR_DIR,
            model: generator.clone(),
            config: Value::Null,
        }],
        frozen: Vec::new(),
    }
    .params();
    compare_param_steps(
        "electra-rtd",
        &[&generator, &disc],
        &params,
        &reference,
        &r,
        false,
        &[],
        || {
            let out = rtd::rtd_outputs(
                &generator,
                &disc,
                &inputs,
                &mut |row, _| samples[row],
                None,
                None,
            )
            .unwrap()
            .unwrap();
            // The targets berth derives (replaced = differs from the original) are PyTorch's.
            let flags: Vec<f32> = r["replaced_flags"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|f| {
                    f.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                })
                .collect();
            assert_eq!(out.replaced, flags);
            rtd::rtd_loss(&out, weight).unwrap()
        },
    );
}

/// The word table's gradient as rows (`Networks::use_sparse_word_grads`, on in one-process
/// fine-tuning) against the dense gradient candle's `index_select` backward builds: the
/// same accumulated gradient after every step and the same weights and moments after
/// three AdamW steps, bit for bit — for a bi-encoder (three lookups of the table per loss,
/// rows repeated within and across them) and a classifier, each with two accumulated
/// backward passes per step (the second adds to the first), with weight decay (every row
/// steps) and without (rows with neither gradient nor moments are skipped; the clipped
/// norm reads only rows with a gradient). A masked-LM head, whose
/// decoder may share the table, keeps the dense gradient.
#[test]
fn sparse_word_gradients_equal_dense_ones_bit_for_bit() {
    let (r, _) = recipe("bert-embed");
    let dir = root().join("fixtures/tiny/bert-base");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let ids = &r["input_ids"];
    let examples: Vec<EmbedExample> = encode(&tok, &r["texts"], None, &ids[0])
        .into_iter()
        .zip(encode(&tok, &r["questions"], None, &ids[1]))
        .zip(encode(&tok, &r["negatives"], None, &ids[2]))
        .map(|((anchor, positive), n)| EmbedExample {
            anchor,
            positive,
            negative: Some(n),
        })
        .collect();
    let refs: Vec<&EmbedExample> = examples.iter().collect();
    let embed_run = |sparse: bool, decay: f64| {
        let (model, _) = berth_train::init::load_encoder(&dir).unwrap();
        word_grad_steps(model, sparse, decay, |m, step| {
            embed::mnrl_loss(
                m,
                subset(&refs, step),
                berth_tasks::Pooling::Mean,
                20.0,
                None,
            )
            .unwrap()
            .unwrap()
        })
    };
    for decay in [0.0, 0.01] {
        assert_eq!(
            embed_run(true, decay),
            embed_run(false, decay),
            "bi-encoder, {decay}"
        );
    }

    let (r, _) = recipe("bert-seqcls");
    let dir = root().join("fixtures/tiny/bert-seqcls");
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let examples = class_examples(recipe_encodings("bert-seqcls", &r, &tok));
    let refs: Vec<&ClassifyExample> = examples.iter().collect();
    let cfg = berth_model::EncoderConfig::from_file(&dir.join("config.json")).unwrap();
    let head = TaskHead {
        kind: HeadKind::SequenceClassification,
        labels: cfg.id2label.clone(),
        problem_type: None,
        sentence_order: false,
    };
    let classify_run = |sparse: bool, decay: f64| {
        let (model, _) = load_for_task(&dir, &head, 0).unwrap();
        word_grad_steps(model, sparse, decay, |m, step| {
            classify::loss(m, subset(&refs, step), None)
                .unwrap()
                .unwrap()
        })
    };
    for decay in [0.0, 0.01] {
        assert_eq!(
            classify_run(true, decay),
            classify_run(false, decay),
            "classifier, {decay}"
        );
    }

    let mlm = TaskHead {
        kind: HeadKind::MaskedLm,
        labels: Vec::new(),
        problem_type: None,
        sentence_order: false,
    };
    let (mut model, _) = load_for_task(&root().join("fixtures/tiny/bert-base"), &mlm, 0).unwrap();
    assert!(!model.set_sparse_word_grads(true), "masked-LM head");
}

/// The examples of step `step`: all, then all but the first, then the first two — so
/// that some rows with moments get no gradient in a step.
fn subset<'a, T>(all: &'a [&'a T], step: usize) -> &'a [&'a T] {
    match step {
        0 => all,
        1 => &all[1..],
        _ => &all[..2],
    }
}

/// Three AdamW steps of two accumulated backward passes each, with or without row
/// gradients for the word table: per step the table's accumulated gradient (as bits),
/// then every parameter's values and the moments (as bits).
fn word_grad_steps(
    model: berth_model::Model,
    sparse: bool,
    weight_decay: f64,
    loss_of: impl Fn(&berth_model::Model, usize) -> candle_core::Tensor,
) -> Vec<Vec<u32>> {
    let table = model.embeddings.word_embeddings.id();
    let name = model
        .params
        .iter()
        .find(|p| p.var.as_tensor().id() == table)
        .expect("the word table is trained")
        .name
        .clone();
    let mut nets = Networks::single(model, Value::Null);
    if sparse {
        assert!(nets.use_sparse_word_grads());
    }
    let adamw = AdamWConfig {
        weight_decay,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(&nets.params(), adamw);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let mut out = Vec::new();
    for step in 0..3 {
        for _ in 0..2 {
            let g = nets.backward(&loss_of(&nets.main, step)).unwrap();
            // The sparse run's table gradient is rows only; the dense run has no rows.
            assert_eq!(g.rows.is_empty(), !sparse, "step {step}: row gradients");
            assert_eq!(
                g.dense.get(&nets.main.embeddings.word_embeddings).is_some(),
                !sparse,
                "step {step}: dense table gradient"
            );
            opt.accumulate_grads(&g, 0.5).unwrap();
        }
        assert!(
            !opt.untouched().contains(&name.as_str()),
            "{name} got no gradient"
        );
        out.push(bits(&opt.grad(&name).unwrap()));
        opt.clip(Some(1.0));
        opt.step(1e-3).unwrap();
    }
    for p in &nets.main.params {
        out.push(bits(
            &p.var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        ));
    }
    let state = opt.state_tensors().unwrap();
    let mut names: Vec<&String> = state.keys().collect();
    names.sort();
    for n in names {
        out.push(bits(
            &state[n].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        ));
    }
    out
}
