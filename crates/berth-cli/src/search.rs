//! `berth search` (dense retrieval over a BEIR corpus, an on-disk index, an optional
//! cross-encoder rerank) and `berth eval --task retrieval` (the same pipeline scored against
//! qrels: nDCG@10, MRR@10, Recall@100, MAP@100).
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use berth_model::Precision;
use berth_tasks::search::{self, Hit, Index, Similarity, Texts};
use berth_tasks::{Pipeline, PipelineOptions};
use berth_text::Truncation;
use clap::Args;

use crate::resolve;

/// The retrieval pipeline's flags, shared by `search` and `eval --task retrieval`.
#[derive(Args)]
pub struct RetrievalArgs {
    /// BEIR corpus.jsonl (`_id`, `title`, `text`; a document is `title + " " + text`).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// BEIR queries.jsonl (`_id`, `text`).
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// Corpus vectors kept in FILE: reused when the model, its settings and the corpus are
    /// unchanged, rebuilt (and rewritten) otherwise.
    #[arg(long, value_name = "FILE")]
    pub index: Option<PathBuf>,
    /// Rerank the first --rerank-top candidates of each query with this cross-encoder.
    #[arg(long, value_name = "MODEL")]
    pub rerank: Option<String>,
    /// Candidates per query the cross-encoder rescores.
    #[arg(long, default_value_t = 100)]
    pub rerank_top: usize,
    /// Number format of the encoders' matrix products (as `berth embed --dtype`).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Tokens per packed batch.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
}

/// Arguments of `berth search`.
#[derive(Args)]
pub struct SearchArgs {
    /// Bi-encoder (sentence-transformers model; default: all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    retrieval: RetrievalArgs,
    /// A query (repeatable), instead of --queries.
    #[arg(long, conflicts_with = "queries")]
    query: Vec<String>,
    /// Results per query.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
}

/// A loaded retrieval pipeline: the bi-encoder, its similarity, the corpus and its index,
/// and the optional reranker.
struct Retriever {
    encoder: Pipeline,
    sim: Similarity,
    corpus: Texts,
    index: Index,
    reranker: Option<Pipeline>,
    rerank_top: usize,
    index_seconds: f64,
    reused: bool,
}

fn options(r: &RetrievalArgs) -> PipelineOptions {
    PipelineOptions {
        precision: r.dtype,
        max_length: None,
        truncation: Truncation::Truncate,
        batch_tokens: r.batch_tokens,
    }
}

impl Retriever {
    fn open(model: Option<&str>, r: &RetrievalArgs) -> anyhow::Result<Self> {
        let corpus_path = r.corpus.as_ref().context("--corpus FILE is needed")?;
        let dir = resolve::model_dir(model)?;
        let (encoder, report) = Pipeline::load_sentence(&dir, &options(r))?;
        crate::embed::report_load(&report);
        let sim = Similarity::of_model(&dir)?;
        let corpus = search::read_beir(corpus_path)?;
        let dtype = format!("{:?}", r.dtype);
        let fingerprint = Index::fingerprint(&dir, &encoder, &dtype, sim, &corpus);
        let t = Instant::now();
        let (index, reused) =
            search::open_or_build(r.index.as_ref(), &encoder, &corpus, sim, fingerprint)?;
        let index_seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "index: {} documents x {} dimensions, {} in {index_seconds:.1} s",
            index.ids.len(),
            index.dim,
            if reused { "loaded" } else { "embedded" }
        );
        let reranker = match &r.rerank {
            Some(m) => {
                let (p, report) = Pipeline::load(&resolve::model_dir(Some(m))?, &options(r))?;
                crate::embed::report_load(&report);
                berth_tasks::require_head(&p.model, berth_model::HeadKind::SequenceClassification)?;
                Some(p)
            }
            None => None,
        };
        Ok(Retriever {
            encoder,
            sim,
            corpus,
            index,
            reranker,
            rerank_top: r.rerank_top,
            index_seconds,
            reused,
        })
    }

    /// The top `k` (at least the rerank depth) hits of each query, reranked if asked.
    fn search(&self, queries: &[String], k: usize) -> anyhow::Result<Vec<Vec<Hit>>> {
        let depth = if self.reranker.is_some() {
            k.max(self.rerank_top)
        } else {
            k
        };
        let mut hits = search::search(&self.encoder, &self.index, queries, self.sim, depth)?;
        if let Some(ce) = &self.reranker {
            search::rerank_hits(ce, queries, &self.corpus, &mut hits, self.rerank_top)?;
        }
        for h in &mut hits {
            h.truncate(k);
        }
        Ok(hits)
    }
}

pub fn run(a: SearchArgs) -> anyhow::Result<()> {
    let queries = match (&a.retrieval.queries, a.query.is_empty()) {
        (Some(path), _) => search::read_beir(path)?,
        (None, false) => Texts {
            ids: (0..a.query.len()).map(|i| i.to_string()).collect(),
            texts: a.query.clone(),
        },
        (None, true) => anyhow::bail!("no queries: give --query TEXT or --queries FILE"),
    };
    if a.top_k == 0 {
        anyhow::bail!("--top-k must be at least 1");
    }
    let r = Retriever::open(a.model.as_deref(), &a.retrieval)?;
    let hits = r.search(&queries.texts, a.top_k)?;
    let mut out = crate::output::stdout();
    for ((id, text), h) in queries.ids.iter().zip(&queries.texts).zip(&hits) {
        let line = serde_json::json!({"query_id": id, "query": text, "results": h});
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// `eval --task retrieval`: the pipeline over every query of `qrels`, scored.
pub fn evaluate(
    model: Option<&str>,
    r: &RetrievalArgs,
    qrels_path: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    let queries_path = r.queries.as_ref().context("--queries FILE is needed")?;
    let qrels = search::read_qrels(qrels_path)?;
    let all = search::read_beir(queries_path)?;
    // The judged queries, in file order.
    let (ids, texts): (Vec<String>, Vec<String>) = all
        .ids
        .into_iter()
        .zip(all.texts)
        .filter(|(id, _)| qrels.contains_key(id))
        .unzip();
    let missing = qrels.len() - ids.len();
    if missing > 0 {
        eprintln!(
            "warning: {missing} judged queries of {} are not in {} (they score 0)",
            qrels_path.display(),
            queries_path.display()
        );
    }
    let retriever = Retriever::open(model, r)?;
    let t = Instant::now();
    let hits = retriever.search(&texts, 100)?;
    let search_seconds = t.elapsed().as_secs_f64();
    let run: HashMap<String, Vec<Hit>> = ids.into_iter().zip(hits).collect();
    let mut report = search::retrieval_metrics(&qrels, &run, 10, 100);
    report.insert("documents".into(), retriever.index.ids.len().into());
    report.insert(
        if retriever.reused {
            "index_load_seconds"
        } else {
            "index_seconds"
        }
        .into(),
        retriever.index_seconds.into(),
    );
    report.insert("search_seconds".into(), search_seconds.into());
    report.insert("reranked".into(), retriever.reranker.is_some().into());
    Ok(serde_json::Value::Object(report))
}
