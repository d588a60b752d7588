//! `berth eval`: scores a predictions file against a gold file, for each task's format; or,
//! with `--model DIR --data FILE`, runs a trained model on labelled data and reports the
//! task's metrics (the same evaluation `berth finetune` runs on its dev set).
use std::collections::HashMap;

use anyhow::{bail, Context};
use berth_tasks::metrics::{self, conlleval, squad};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use crate::input::read_lines;

#[derive(Clone, Copy, ValueEnum)]
enum Task {
    /// Labels, one per line: accuracy, precision / recall / F1 (macro, micro, weighted, per
    /// class), ROC-AUC with --positive.
    Classify,
    /// CoNLL column files: entity P / R / F1 exactly as conlleval.pl (its report is printed).
    Ner,
    /// SQuAD JSON gold, predictions as {"id": "answer"} JSON or `berth qa` JSON Lines: EM / F1.
    Qa,
    /// BEIR qrels TSV gold (query-id, corpus-id, score) and a run TSV of the same columns:
    /// MRR@k and nDCG@k.
    Rerank,
    /// Scores, one per line (or a TSV's --label-column, e.g. STS-B's `score`; `berth
    /// similarity --pair` output): Pearson and Spearman.
    Similarity,
    /// A bi-encoder (--model) retrieving from a BEIR --corpus for --queries, scored against
    /// --qrels: nDCG@10, MRR@10, Recall@100, MAP@100 (as pytrec_eval / BEIR), with timings.
    Retrieval,
    /// With --model: a bi-encoder on (anchor, positive[, negative]) rows: MRR@10, nDCG@10,
    /// accuracy@1 of each anchor retrieving its positive among all the file's candidates.
    Embed,
    /// With --model: a masked-LM on a text corpus (fixed seeded masking): loss, perplexity,
    /// masked accuracy.
    Pretrain,
}

/// Arguments of `berth eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// The task format.
    #[arg(long, value_enum)]
    task: Task,
    /// Gold file (with --predictions).
    #[arg(long, required_unless_present_any = ["model", "qrels"])]
    gold: Option<String>,
    /// A trained model to run on --data (instead of --gold / --predictions).
    #[arg(long, conflicts_with_all = ["gold", "predictions"])]
    model: Option<String>,
    /// Labelled data for --model, in `berth finetune`'s formats: CSV / TSV / JSON Lines
    /// (classify, embed, rerank), CoNLL (ner), SQuAD JSON (qa).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// --model: the data's columns (as `berth finetune` takes them).
    #[command(flatten)]
    columns: crate::train_args::ColumnArgs,
    /// --model: token limit per example (default 128; qa: 384).
    #[arg(long)]
    max_length: Option<usize>,
    /// --model pretrain: fraction of tokens masked.
    #[arg(long, default_value_t = 0.15)]
    mask_rate: f64,
    /// --model pretrain: mask whole words.
    #[arg(long)]
    whole_word: bool,
    /// --model pretrain: seed of the (fixed) masking.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Predictions file. For `ner` it may be left out when the gold file is conlleval input
    /// (gold tag second to last, predicted tag last).
    #[arg(long)]
    predictions: Option<String>,
    /// classify: the positive label, for ROC-AUC from the predictions' scores of it (needs
    /// `berth classify --top-k 0` output).
    #[arg(long)]
    positive: Option<String>,
    /// rerank: cutoff for MRR@k and nDCG@k.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// --model qa: tokens shared by consecutive windows of a long context.
    #[arg(long, default_value_t = 128)]
    doc_stride: usize,
    /// --model qa: longest answer in tokens (`berth qa`'s default).
    #[arg(long, default_value_t = 15)]
    max_answer_len: usize,
    /// ner: print JSON instead of conlleval's report.
    #[arg(long)]
    json: bool,
    /// retrieval: BEIR qrels TSV (query-id, corpus-id, score).
    #[arg(long)]
    qrels: Option<std::path::PathBuf>,
    #[command(flatten)]
    retrieval: crate::search::RetrievalArgs,
}

/// `--model DIR --data FILE`: the fine-tuning evaluation on a file.
fn run_model(a: &EvalArgs, model: &str) -> anyhow::Result<()> {
    use crate::train_args::{data_config, FinetuneTask, TaskExtras};
    use berth_train::objectives::{TaskConfig, TaskKind};
    let dir = crate::resolve::model_dir(Some(model))?;
    let data = a
        .data
        .clone()
        .context("--data FILE is needed with --model")?;
    let finetune = match a.task {
        Task::Classify => Some(FinetuneTask::Classify),
        Task::Ner => Some(FinetuneTask::Ner),
        Task::Qa => Some(FinetuneTask::Qa),
        Task::Rerank => Some(FinetuneTask::Rerank),
        Task::Embed => Some(FinetuneTask::Embed),
        Task::Pretrain => None,
        Task::Similarity => {
            bail!("--task similarity scores prediction files: use --gold and --predictions")
        }
        Task::Retrieval => unreachable!("handled in run"),
    };
    let kind = match finetune {
        Some(t) => a.columns.task(
            t,
            &TaskExtras {
                doc_stride: a.doc_stride,
                max_answer_len: a.max_answer_len,
                ..TaskExtras::default()
            },
        )?,
        None => {
            // An ELECTRA discriminator is scored by replaced-token detection with its
            // generator; any other masked-LM by masked-token prediction.
            let config = berth_model::EncoderConfig::from_file(&dir.join("config.json"))?;
            if config
                .architectures
                .iter()
                .any(|c| c == "ElectraForPreTraining")
            {
                TaskKind::Rtd(berth_train::objectives::rtd::RtdConfig {
                    mask_rate: a.mask_rate,
                    whole_word: a.whole_word,
                    ..Default::default()
                })
            } else {
                TaskKind::Pretrain(berth_train::objectives::mlm::MlmConfig {
                    mask_rate: a.mask_rate,
                    whole_word: a.whole_word,
                    sentence_objective: None,
                    distill: None,
                })
            }
        }
    };
    let qa = finetune == Some(FinetuneTask::Qa);
    let task = TaskConfig {
        data: data_config(data.clone(), &dir, a.max_length, qa)?,
        kind,
    };
    let report = berth_train::objectives::evaluate_checkpoint(&task, &dir, &data, a.seed)
        .with_context(|| format!("evaluating {} on {}", dir.display(), data.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if let Task::Retrieval = a.task {
        let qrels = a
            .qrels
            .as_ref()
            .context("--task retrieval needs --qrels FILE")?;
        let report = crate::search::evaluate(a.model.as_deref(), &a.retrieval, qrels)?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if let Some(m) = &a.model {
        return run_model(&a, m);
    }
    let gold = a
        .gold
        .clone()
        .context("--gold FILE is needed (or --model with --data)")?;
    let preds = || {
        a.predictions
            .as_deref()
            .context("--predictions FILE is needed for this task")
    };
    let report = match a.task {
        Task::Classify => classify(&a, &gold, preds()?)?,
        Task::Ner => return ner(&a, &gold),
        Task::Qa => qa(&gold, preds()?)?,
        Task::Rerank => rerank(&gold, preds()?, a.k)?,
        Task::Similarity => similarity(&gold, preds()?, &a.columns.label_column)?,
        Task::Embed | Task::Pretrain => bail!("this task needs --model and --data"),
        Task::Retrieval => unreachable!("handled above"),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn same_length(gold: &str, g: usize, pred: &str, p: usize) -> anyhow::Result<()> {
    if g != p {
        bail!("{pred}: {p} lines but {gold} has {g}: predictions must be line-aligned with the gold file");
    }
    Ok(())
}

/// Gold labels: JSON Lines with "label", a TSV with a header naming `column`, or the last
/// tab-separated field of each line.
fn gold_labels(path: &str, column: &str) -> anyhow::Result<Vec<String>> {
    let lines = read_lines(path)?;
    if lines[0].trim_start().starts_with('{') {
        return lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l)
                    .with_context(|| format!("{path}:{}: invalid JSON", i + 1))?;
                scalar(&v["label"]).with_context(|| format!("{path}:{}: no \"label\"", i + 1))
            })
            .collect();
    }
    let header: Vec<&str> = lines[0].split('\t').collect();
    let (col, skip) = match header.iter().position(|h| *h == column) {
        Some(c) => (Some(c), 1),
        None => (None, 0),
    };
    lines[skip..]
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let f: Vec<&str> = l.split('\t').collect();
            let v = match col {
                Some(c) => f.get(c).copied(),
                None => f.last().copied(),
            };
            v.map(|s| s.trim().to_string())
                .with_context(|| format!("{path}:{}: no column {column}", i + 1 + skip))
        })
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Multi-label scores: gold rows of labels split on `--label-separator`; predictions as
/// label lists (same separator) or `berth classify` output, where a label is predicted when
/// its score passes 0.5 (the sigmoid of a positive logit). Labels are those either side
/// names, sorted.
fn multi_label(a: &EvalArgs, gold_path: &str, pred_path: &str) -> anyhow::Result<Value> {
    let sep = a.columns.label_separator.as_str();
    let split = |s: &str| -> Vec<String> {
        s.split(sep)
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let gold: Vec<Vec<String>> = gold_labels(gold_path, &a.columns.label_column)?
        .iter()
        .map(|g| split(g))
        .collect();
    let lines = read_lines(pred_path)?;
    same_length(gold_path, gold.len(), pred_path, lines.len())?;
    let mut pred = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        if !l.trim_start().starts_with('{') {
            pred.push(split(l));
            continue;
        }
        let v: Value = serde_json::from_str(l)
            .with_context(|| format!("{pred_path}:{}: invalid JSON", i + 1))?;
        let labels = v["labels"].as_array().with_context(|| {
            format!(
                "{pred_path}:{}: no \"labels\" list (berth classify output)",
                i + 1
            )
        })?;
        pred.push(
            labels
                .iter()
                .filter(|x| x["score"].as_f64().is_some_and(|s| s > 0.5))
                .filter_map(|x| x["label"].as_str().map(str::to_string))
                .collect(),
        );
    }
    let names: std::collections::BTreeSet<&String> = gold.iter().chain(&pred).flatten().collect();
    let names: Vec<&String> = names.into_iter().collect();
    let rows: Vec<(Vec<f32>, Vec<bool>)> = gold
        .iter()
        .zip(&pred)
        .map(|(g, p)| {
            (
                names.iter().map(|n| g.contains(n) as u8 as f32).collect(),
                names.iter().map(|n| p.contains(n)).collect(),
            )
        })
        .collect();
    let r = metrics::multi_label(&rows, names.len());
    let mut out = serde_json::to_value(r)?;
    out["labels"] = json!(names);
    out["rows"] = json!(rows.len());
    Ok(out)
}

fn classify(a: &EvalArgs, gold_path: &str, pred_path: &str) -> anyhow::Result<Value> {
    if a.columns.multi_label {
        return multi_label(a, gold_path, pred_path);
    }
    let gold = gold_labels(gold_path, &a.columns.label_column)?;
    let lines = read_lines(pred_path)?;
    same_length(gold_path, gold.len(), pred_path, lines.len())?;
    let mut pred = Vec::with_capacity(lines.len());
    let mut positive_scores = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !l.trim_start().starts_with('{') {
            pred.push(l.trim().to_string());
            continue;
        }
        let v: Value = serde_json::from_str(l)
            .with_context(|| format!("{pred_path}:{}: invalid JSON", i + 1))?;
        let labels = v["labels"].as_array().with_context(|| {
            format!(
                "{pred_path}:{}: no \"labels\" list (berth classify output)",
                i + 1
            )
        })?;
        let top = labels
            .first()
            .and_then(|x| x["label"].as_str())
            .with_context(|| format!("{pred_path}:{}: empty labels", i + 1))?;
        pred.push(top.to_string());
        if let Some(pos) = &a.positive {
            let s = labels
                .iter()
                .find(|x| x["label"].as_str() == Some(pos))
                .and_then(|x| x["score"].as_f64());
            positive_scores.push(s.with_context(|| {
                format!(
                    "{pred_path}:{}: no score for {pos} (classify with --top-k 0)",
                    i + 1
                )
            })?);
        }
    }
    let r = metrics::classification_report(&gold, &pred);
    let mut out = serde_json::to_value(&r)?;
    if let Some(pos) = &a.positive {
        let is_pos: Vec<bool> = gold.iter().map(|g| g == pos).collect();
        out["roc_auc"] = json!(metrics::roc_auc(&is_pos, &positive_scores));
    }
    Ok(out)
}

/// Tags (last field) of a CoNLL column file, with the first field for alignment checks;
/// blank lines are sentence breaks.
fn conll(path: &str) -> anyhow::Result<Vec<Option<(String, String)>>> {
    Ok(read_lines(path)?
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (!f.is_empty()).then(|| (f[0].to_string(), f[f.len() - 1].to_string()))
        })
        .collect())
}

fn ner(a: &EvalArgs, gold_path: &str) -> anyhow::Result<()> {
    let r = match &a.predictions {
        None => {
            let lines = read_lines(gold_path)?;
            let delimiter = if lines.iter().any(|l| l.contains('\t')) {
                '\t'
            } else {
                ' '
            };
            conlleval::evaluate(lines.iter().map(String::as_str), delimiter)
                .map_err(|e| anyhow::anyhow!("{}:{}: {}", gold_path, e.line, e.message))?
        }
        Some(pred_path) => {
            let (gold, pred) = (conll(gold_path)?, conll(pred_path)?);
            same_length(gold_path, gold.len(), pred_path, pred.len())?;
            let mut lines = Vec::with_capacity(gold.len());
            for (i, (g, p)) in gold.iter().zip(&pred).enumerate() {
                lines.push(match (g, p) {
                    (None, None) => String::new(),
                    (Some((tok, gt)), Some((ptok, pt))) if tok == ptok => {
                        format!("{tok} {gt} {pt}")
                    }
                    (Some((tok, _)), Some((ptok, _))) => bail!(
                        "{pred_path}:{}: token {ptok:?} where {} has {tok:?}",
                        i + 1,
                        gold_path
                    ),
                    _ => bail!(
                        "{pred_path}:{}: sentence breaks differ from {}",
                        i + 1,
                        gold_path
                    ),
                });
            }
            conlleval::evaluate(lines.iter().map(String::as_str), ' ')
                .map_err(|e| anyhow::anyhow!("{}:{}: {}", gold_path, e.line, e.message))?
        }
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        // Fractions in [0, 1] like every berth metric; the text report is conlleval's own
        // (percentages).
        v["precision"] = json!(r.overall.precision() / 100.0);
        v["recall"] = json!(r.overall.recall() / 100.0);
        v["f1"] = json!(r.overall.f1() / 100.0);
        v["accuracy"] = json!(r.accuracy() / 100.0);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", r.report());
    }
    Ok(())
}

fn qa(gold_path: &str, pred_path: &str) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(gold_path).with_context(|| format!("{gold_path}: cannot read"))?;
    let gold: Value =
        serde_json::from_str(&text).with_context(|| format!("{gold_path}: invalid JSON"))?;
    let articles = gold["data"]
        .as_array()
        .with_context(|| format!("{gold_path}: no \"data\" list (SQuAD format)"))?;
    let ptext =
        std::fs::read_to_string(pred_path).with_context(|| format!("{pred_path}: cannot read"))?;
    let mut preds: HashMap<String, String> = HashMap::new();
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&ptext) {
        for (k, v) in m {
            let answer = v
                .as_str()
                .with_context(|| format!("{pred_path}: answer of {k} is not a string"))?
                .to_string();
            preds.insert(k, answer);
        }
    } else {
        for (i, l) in ptext
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(l).with_context(|| {
                format!(
                    "{pred_path}:{}: neither a JSON object nor JSON Lines",
                    i + 1
                )
            })?;
            let id =
                scalar(&v["id"]).with_context(|| format!("{pred_path}:{}: no \"id\"", i + 1))?;
            let ans = v["answers"][0]["answer"].as_str().unwrap_or_default();
            preds.insert(id, ans.to_string());
        }
    }
    let (mut em, mut f1, mut n, mut missing) = (0.0, 0.0, 0usize, 0usize);
    for qa in articles
        .iter()
        .flat_map(|a| a["paragraphs"].as_array().into_iter().flatten())
        .flat_map(|p| p["qas"].as_array().into_iter().flatten())
    {
        let id =
            scalar(&qa["id"]).with_context(|| format!("{gold_path}: a question without \"id\""))?;
        let golds: Vec<String> = qa["answers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["text"].as_str().map(str::to_string))
            .collect();
        n += 1;
        match preds.get(&id) {
            Some(p) => {
                let (e, f) = squad::score(&golds, p);
                em += e;
                f1 += f;
            }
            None => missing += 1, // scored 0, as the official script does
        }
    }
    if missing > 0 {
        eprintln!("warning: {missing} of {n} questions have no prediction and score 0");
    }
    if n == 0 {
        bail!("{gold_path}: no questions");
    }
    Ok(
        json!({"exact_match": em / n as f64, "f1": f1 / n as f64, "questions": n, "unanswered": missing}),
    )
}

/// (query, doc, value) rows of a TSV, skipping a header whose third field is not a number.
fn triples(path: &str) -> anyhow::Result<Vec<(String, String, f64)>> {
    let mut out = Vec::new();
    for (i, l) in read_lines(path)?.iter().enumerate() {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() < 3 {
            bail!(
                "{path}:{}: expected query-id<TAB>corpus-id<TAB>score",
                i + 1
            );
        }
        match f[2].trim().parse::<f64>() {
            Ok(v) => out.push((f[0].to_string(), f[1].to_string(), v)),
            Err(_) if i == 0 => {} // header
            Err(_) => bail!("{path}:{}: score {:?} is not a number", i + 1, f[2]),
        }
    }
    Ok(out)
}

fn rerank(gold_path: &str, pred_path: &str, k: usize) -> anyhow::Result<Value> {
    let mut qrels: HashMap<String, HashMap<String, f64>> = HashMap::new();
    for (q, d, r) in triples(gold_path)? {
        qrels.entry(q).or_default().insert(d, r);
    }
    let mut runs: HashMap<String, Vec<(String, f64)>> = HashMap::new();
    for (q, d, s) in triples(pred_path)? {
        runs.entry(q).or_default().push((d, s));
    }
    let (mut mrr, mut ndcg) = (0.0, 0.0);
    for (q, rels) in &qrels {
        let run = runs.get(q).map(Vec::as_slice).unwrap_or_default();
        let scores: Vec<f64> = run.iter().map(|(_, s)| *s).collect();
        let relevance: Vec<f64> = run
            .iter()
            .map(|(d, _)| rels.get(d).copied().unwrap_or(0.0))
            .collect();
        mrr += metrics::reciprocal_rank(&scores, &relevance, k);
        // Relevant documents the run never retrieved still count in the ideal ranking.
        let judged: Vec<f64> = rels.values().copied().collect();
        ndcg +=
            metrics::ndcg_of_ranking(&metrics::ranked_relevance(&scores, &relevance), &judged, k);
    }
    let missing = qrels.keys().filter(|q| !runs.contains_key(*q)).count();
    if missing > 0 {
        eprintln!(
            "warning: {missing} of {} queries in {gold_path} have no results in {pred_path} (they score 0)",
            qrels.len()
        );
    }
    let n = qrels.len().max(1) as f64;
    Ok(json!({
        format!("mrr@{k}"): mrr / n,
        format!("ndcg@{k}"): ndcg / n,
        "queries": qrels.len(),
        "queries_without_results": missing,
    }))
}

/// Numbers, one per line: the last tab-separated field, JSON Lines' `"score"`, or — in a
/// TSV whose header names `column` (STS-B's `score`) — that column.
fn numbers(path: &str, column: &str) -> anyhow::Result<Vec<f64>> {
    let lines = read_lines(path)?;
    let header_col = lines
        .first()
        .and_then(|h| h.split('\t').position(|f| f.trim() == column));
    let skip = usize::from(header_col.is_some());
    lines
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(i, l)| {
            let v = if l.trim_start().starts_with('{') {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v["score"].as_f64())
            } else {
                let mut fields = l.split('\t');
                match header_col {
                    Some(c) => fields.nth(c),
                    None => fields.next_back(),
                }
                .and_then(|s| s.trim().parse().ok())
            };
            v.with_context(|| format!("{path}:{}: not a number", i + 1))
        })
        .collect()
}

fn similarity(gold_path: &str, pred_path: &str, column: &str) -> anyhow::Result<Value> {
    let (g, p) = (numbers(gold_path, column)?, numbers(pred_path, column)?);
    same_length(gold_path, g.len(), pred_path, p.len())?;
    Ok(
        json!({"pearson": metrics::pearson(&g, &p), "spearman": metrics::spearman(&g, &p), "pairs": g.len()}),
    )
}
