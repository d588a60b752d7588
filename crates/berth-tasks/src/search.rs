//! Dense retrieval as BEIR and "Utilizing BERT for IR" run it: a corpus in the BEIR layout
//! (`corpus.jsonl` with `_id`, `title`, `text`, encoded as `title + " " + text`), its vectors
//! kept in an on-disk index that later searches reuse, exact top-k search by a matrix product
//! of query and corpus vectors (cosine, or the dot product when the sentence-transformers
//! config says so), an optional cross-encoder rerank of the first candidates, and the
//! retrieval metrics trec_eval / pytrec_eval compute (nDCG@k, MAP@k, recall@k) plus BEIR's
//! MRR@k.
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::embed::{embed_texts, EmbedOptions};
use crate::error::{Result, TaskError};
use crate::Pipeline;

/// Documents or queries: ids and texts, in file order.
#[derive(Debug, Clone, Default)]
pub struct Texts {
    /// `_id` of each.
    pub ids: Vec<String>,
    /// The text encoded (a document: title and text joined by a space).
    pub texts: Vec<String>,
}

fn bad(path: &Path, line: usize, message: impl Into<String>) -> TaskError {
    let message = message.into();
    TaskError::Config {
        path: path.into(),
        message: if line > 0 {
            format!("line {line}: {message}")
        } else {
            message
        },
    }
}

/// Reads a BEIR `corpus.jsonl` / `queries.jsonl` (`_id`, `text`, optional `title`): each
/// entry's text is `title + " " + text`, trimmed, as BEIR's sentence-transformers wrapper
/// encodes documents. Ids must be unique and texts non-empty.
pub fn read_beir(path: &Path) -> Result<Texts> {
    let text =
        berth_text::limits::read_text(path, u64::MAX).map_err(|e| bad(path, 0, e.to_string()))?;
    let mut out = Texts::default();
    let mut seen = std::collections::HashSet::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(l.trim_start_matches('\u{feff}'))
            .map_err(|e| bad(path, i + 1, format!("invalid JSON: {e}")))?;
        let field = |k: &str| match &v[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let id = field("_id").ok_or_else(|| bad(path, i + 1, "no \"_id\" string"))?;
        let body = field("text").ok_or_else(|| bad(path, i + 1, "no \"text\" string"))?;
        let joined = match field("title").filter(|t| !t.is_empty()) {
            Some(t) => format!("{t} {body}"),
            None => body,
        };
        let joined = joined.trim().to_string();
        if joined.is_empty() {
            return Err(bad(path, i + 1, format!("{id:?}: empty text")));
        }
        if !seen.insert(id.clone()) {
            return Err(bad(path, i + 1, format!("duplicate _id {id:?}")));
        }
        out.ids.push(id);
        out.texts.push(joined);
    }
    if out.ids.is_empty() {
        return Err(bad(path, 0, "no entries"));
    }
    Ok(out)
}

/// Relevance judgements: query id → document id → grade (BEIR's `qrels/*.tsv`: a header,
/// then `query-id<TAB>corpus-id<TAB>score`).
pub type Qrels = HashMap<String, HashMap<String, f64>>;

/// Reads a BEIR qrels TSV (a header line is skipped).
pub fn read_qrels(path: &Path) -> Result<Qrels> {
    let text =
        berth_text::limits::read_text(path, u64::MAX).map_err(|e| bad(path, 0, e.to_string()))?;
    let mut q: Qrels = HashMap::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let f: Vec<&str> = l.split('\t').map(str::trim).collect();
        if f.len() < 3 {
            return Err(bad(path, i + 1, "want query-id, corpus-id and score"));
        }
        match f[f.len() - 1].parse::<f64>() {
            Ok(s) if s.is_finite() => {
                q.entry(f[0].to_string())
                    .or_default()
                    .insert(f[f.len() - 2].to_string(), s);
            }
            _ if i == 0 => {} // header
            _ => {
                return Err(bad(
                    path,
                    i + 1,
                    format!("score {:?} is not a number", f[f.len() - 1]),
                ))
            }
        }
    }
    if q.is_empty() {
        return Err(bad(path, 0, "no judgements"));
    }
    Ok(q)
}

/// How query and document vectors are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Similarity {
    /// Cosine (vectors normalised once, then dot products).
    Cosine,
    /// Plain dot product.
    Dot,
}

impl Similarity {
    /// The model's: `similarity_fn_name` of config_sentence_transformers.json (cosine when
    /// absent, as sentence-transformers defaults).
    pub fn of_model(dir: &Path) -> Result<Self> {
        let path = dir.join("config_sentence_transformers.json");
        if !path.is_file() {
            return Ok(Similarity::Cosine);
        }
        let text = berth_text::limits::read_text(&path, berth_text::limits::MAX_JSON_BYTES)
            .map_err(|e| bad(&path, 0, e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&path, 0, format!("invalid JSON: {e}")))?;
        match v["similarity_fn_name"].as_str() {
            None | Some("cosine") => Ok(Similarity::Cosine),
            Some("dot") => Ok(Similarity::Dot),
            Some(other) => Err(bad(
                &path,
                0,
                format!("similarity_fn_name {other:?} is not supported (cosine, dot)"),
            )),
        }
    }
}

/// Corpus vectors ready for search.
pub struct Index {
    /// Document ids, row order.
    pub ids: Vec<String>,
    /// Vector width.
    pub dim: usize,
    /// Row-major vectors (normalised for cosine).
    pub vectors: Vec<f32>,
    /// Identifies the model, its settings and the corpus the vectors came from.
    pub fingerprint: String,
}

const INDEX_MAGIC: &[u8; 8] = b"BERTHIDX";

/// FNV-1a 64 over `parts`: a stable fingerprint (not a cryptographic one).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Index {
    /// The fingerprint of `model` (its config and weight file size), the pipeline's token
    /// limit, the number format `dtype`, the similarity and the corpus texts.
    pub fn fingerprint(
        model: &Path,
        p: &Pipeline,
        dtype: &str,
        sim: Similarity,
        corpus: &Texts,
    ) -> String {
        let weights = [
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
        ]
        .iter()
        .filter_map(|f| std::fs::metadata(model.join(f)).ok())
        .map(|m| m.len().to_le_bytes())
        .next()
        .unwrap_or_default();
        let config = std::fs::read(model.join("config.json")).unwrap_or_default();
        let settings = format!("{} {dtype} {sim:?}", p.max_length);
        let mut docs = Vec::new();
        for (id, t) in corpus.ids.iter().zip(&corpus.texts) {
            docs.extend_from_slice(id.as_bytes());
            docs.push(0);
            docs.extend_from_slice(t.as_bytes());
            docs.push(0);
        }
        format!(
            "{:016x}",
            fnv(&[&config, &weights, settings.as_bytes(), &docs])
        )
    }

    /// Embeds `corpus` with `p` (the sentence pipeline's pooling; normalised for cosine).
    pub fn build(
        p: &Pipeline,
        corpus: &Texts,
        sim: Similarity,
        fingerprint: String,
    ) -> Result<Self> {
        let (pooling, normalize) = p.embedding(None, false);
        let opts = EmbedOptions {
            pooling,
            normalize: normalize || sim == Similarity::Cosine,
            windows: None,
        };
        let (vecs, _) = embed_texts(p, &corpus.texts, &opts, 0)?;
        let dim = vecs.first().map_or(0, Vec::len);
        Ok(Index {
            ids: corpus.ids.clone(),
            dim,
            vectors: vecs.into_iter().flatten().collect(),
            fingerprint,
        })
    }

    /// Writes the index (magic, a JSON header with ids, dim and fingerprint, then the
    /// vectors as little-endian f32) through a temporary file renamed into place.
    pub fn save(&self, path: &Path) -> Result<()> {
        let header =
            serde_json::json!({"dim": self.dim, "fingerprint": self.fingerprint, "ids": self.ids})
                .to_string();
        let tmp = path.with_extension(format!("partial-{}", std::process::id()));
        let io = |e: std::io::Error| bad(path, 0, e.to_string());
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        f.write_all(INDEX_MAGIC).map_err(io)?;
        f.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        f.write_all(header.as_bytes()).map_err(io)?;
        for v in &self.vectors {
            f.write_all(&v.to_le_bytes()).map_err(io)?;
        }
        f.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads an index written by [`Index::save`], checking its structure.
    pub fn load(path: &Path) -> Result<Self> {
        let corrupt = |m: &str| bad(path, 0, format!("not a berth index: {m}"));
        berth_text::limits::regular_file(path, u64::MAX)
            .map_err(|e| bad(path, 0, e.to_string()))?;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| bad(path, 0, e.to_string()))?;
        if bytes.len() < 16 || &bytes[..8] != INDEX_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
        let header = bytes
            .get(16..16usize.saturating_add(n))
            .ok_or_else(|| corrupt("truncated header"))?;
        let h: serde_json::Value =
            serde_json::from_slice(header).map_err(|_| corrupt("bad header"))?;
        let dim = h["dim"].as_u64().ok_or_else(|| corrupt("no dim"))? as usize;
        let ids: Vec<String> =
            serde_json::from_value(h["ids"].clone()).map_err(|_| corrupt("no ids"))?;
        let fingerprint = h["fingerprint"]
            .as_str()
            .ok_or_else(|| corrupt("no fingerprint"))?
            .to_string();
        let body = &bytes[16 + n..];
        if Some(body.len()) != ids.len().checked_mul(dim).and_then(|x| x.checked_mul(4)) {
            return Err(corrupt("vector data does not match ids x dim"));
        }
        let vectors = body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Index {
            ids,
            dim,
            vectors,
            fingerprint,
        })
    }
}

/// One retrieved document.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Hit {
    /// Row of the document in the index.
    #[serde(skip)]
    pub row: usize,
    /// Its `_id`.
    pub corpus_id: String,
    /// Similarity (or the cross-encoder's score after a rerank).
    pub score: f32,
}

/// Orders hits best first, ties by descending id (as trec_eval breaks them).
fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| b.corpus_id.cmp(&a.corpus_id))
    });
}

/// Exact top-`k` of every query against the index: query vectors (normalised for cosine)
/// times the corpus matrix, in blocks of queries.
pub fn search(
    p: &Pipeline,
    index: &Index,
    queries: &[String],
    sim: Similarity,
    k: usize,
) -> Result<Vec<Vec<Hit>>> {
    let (pooling, normalize) = p.embedding(None, false);
    let opts = EmbedOptions {
        pooling,
        normalize: normalize || sim == Similarity::Cosine,
        windows: None,
    };
    let (q, _) = embed_texts(p, queries, &opts, 0)?;
    let n = index.ids.len();
    if q.first().is_some_and(|v| v.len() != index.dim) {
        return Err(TaskError::Options(format!(
            "query vectors have {} dimensions, the index {}: the index was built with another model",
            q[0].len(),
            index.dim
        )));
    }
    let corpus = Tensor::from_slice(&index.vectors, (n, index.dim), &Device::Cpu)?.t()?;
    let mut out = Vec::with_capacity(q.len());
    for block in q.chunks(1024) {
        let flat: Vec<f32> = block.iter().flatten().copied().collect();
        let qt = Tensor::from_vec(flat, (block.len(), index.dim), &Device::Cpu)?;
        let scores: Vec<Vec<f32>> = qt.matmul(&corpus)?.to_vec2()?;
        for row in scores {
            let mut order: Vec<usize> = (0..n).collect();
            let take = k.min(n);
            let cmp = |a: &usize, b: &usize| {
                row[*b]
                    .total_cmp(&row[*a])
                    .then_with(|| index.ids[*b].cmp(&index.ids[*a]))
            };
            if take < n {
                order.select_nth_unstable_by(take, cmp);
                order.truncate(take);
            }
            let mut hits: Vec<Hit> = order
                .into_iter()
                .map(|i| Hit {
                    row: i,
                    corpus_id: index.ids[i].clone(),
                    score: row[i],
                })
                .collect();
            sort_hits(&mut hits);
            out.push(hits);
        }
    }
    Ok(out)
}

/// Rescores the first `top` hits of each query with a cross-encoder (the rest keep their
/// order below them), as a retrieve-then-rerank pipeline does.
pub fn rerank_hits(
    ce: &Pipeline,
    queries: &[String],
    corpus: &Texts,
    hits: &mut [Vec<Hit>],
    top: usize,
) -> Result<()> {
    let mut pairs = Vec::new();
    for (q, h) in queries.iter().zip(hits.iter()) {
        for hit in h.iter().take(top) {
            pairs.push((q.clone(), Some(corpus.texts[hit.row].clone())));
        }
    }
    let scores = crate::rerank::cross_encode(ce, &pairs, true, 0)?;
    let mut at = 0;
    for h in hits.iter_mut() {
        let m = top.min(h.len());
        for hit in h.iter_mut().take(m) {
            hit.score = scores[at];
            at += 1;
        }
        sort_hits(&mut h[..m]);
    }
    Ok(())
}

/// Retrieval metrics over the queries of `qrels` (documents graded > 0 are relevant):
/// `ndcg@{k}` (linear gains, log2 discount, ideal from the judgements), `mrr@{k}` (BEIR's),
/// `recall@{r}` and `map@{r}` (trec_eval's `recall_r` / `map_cut_r`). A query without
/// results scores 0.
pub fn retrieval_metrics(
    qrels: &Qrels,
    run: &HashMap<String, Vec<Hit>>,
    k: usize,
    r: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let (mut ndcg, mut mrr, mut recall, mut map) = (0.0, 0.0, 0.0, 0.0);
    let mut judged_queries = 0usize;
    // In id order, so the sums (and their last digits) are the same on every run.
    let mut order: Vec<(&String, &HashMap<String, f64>)> = qrels.iter().collect();
    order.sort_by(|a, b| a.0.cmp(b.0));
    for (q, rels) in order {
        let relevant = rels.values().filter(|&&g| g > 0.0).count();
        if relevant == 0 {
            continue; // trec_eval skips queries with nothing relevant
        }
        judged_queries += 1;
        let hits = run.get(q).map(Vec::as_slice).unwrap_or_default();
        let grades: Vec<f64> = hits
            .iter()
            .map(|h| rels.get(&h.corpus_id).copied().unwrap_or(0.0))
            .collect();
        let judged: Vec<f64> = rels.values().copied().filter(|g| *g > 0.0).collect();
        ndcg += crate::metrics::ndcg_of_ranking(&grades, &judged, k);
        mrr += grades
            .iter()
            .take(k)
            .position(|&g| g > 0.0)
            .map_or(0.0, |i| 1.0 / (i + 1) as f64);
        let mut found = 0usize;
        let mut ap = 0.0;
        for (i, &g) in grades.iter().take(r).enumerate() {
            if g > 0.0 {
                found += 1;
                ap += found as f64 / (i + 1) as f64;
            }
        }
        recall += found as f64 / relevant as f64;
        map += ap / relevant as f64;
    }
    let n = judged_queries.max(1) as f64;
    let mut out = serde_json::Map::new();
    out.insert(format!("ndcg@{k}"), (ndcg / n).into());
    out.insert(format!("mrr@{k}"), (mrr / n).into());
    out.insert(format!("recall@{r}"), (recall / n).into());
    out.insert(format!("map@{r}"), (map / n).into());
    out.insert("queries".into(), judged_queries.into());
    out
}

/// The index at `path` if it matches `fingerprint`, else a new one built (and written there
/// when a path is given). Returns the index and whether it was reused.
pub fn open_or_build(
    path: Option<&PathBuf>,
    p: &Pipeline,
    corpus: &Texts,
    sim: Similarity,
    fingerprint: String,
) -> Result<(Index, bool)> {
    if let Some(path) = path.filter(|p| p.exists()) {
        let index = Index::load(path)?;
        if index.fingerprint == fingerprint {
            return Ok((index, true));
        }
    }
    let index = Index::build(p, corpus, sim, fingerprint)?;
    if let Some(path) = path {
        index.save(path)?;
    }
    Ok((index, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: &str) -> Hit {
        Hit {
            row: 0,
            corpus_id: id.into(),
            score: 0.0,
        }
    }

    /// Hand-computed trec_eval values: relevant {d1, d3}, ranking d2 d1 d4 d3.
    #[test]
    fn metrics_follow_trec_eval_definitions() {
        let mut qrels: Qrels = HashMap::new();
        qrels.insert(
            "q".into(),
            [
                ("d1".to_string(), 1.0),
                ("d3".to_string(), 1.0),
                ("d9".to_string(), 0.0),
            ]
            .into_iter()
            .collect(),
        );
        let run: HashMap<String, Vec<Hit>> = [(
            "q".to_string(),
            vec![hit("d2"), hit("d1"), hit("d4"), hit("d3")],
        )]
        .into_iter()
        .collect();
        let m = retrieval_metrics(&qrels, &run, 10, 100);
        let close = |k: &str, want: f64| {
            let got = m[k].as_f64().unwrap();
            assert!((got - want).abs() < 1e-12, "{k}: {got} vs {want}");
        };
        // AP = (1/2 + 2/4) / 2; recall 1; MRR 1/2;
        // nDCG = (1/log2 3 + 1/log2 5) / (1 + 1/log2 3).
        close("map@100", 0.5);
        close("recall@100", 1.0);
        close("mrr@10", 0.5);
        close(
            "ndcg@10",
            (1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (1.0 + 1.0 / 3f64.log2()),
        );
        // Cut at 2: only d1 is within.
        let m = retrieval_metrics(&qrels, &run, 2, 2);
        assert!((m["recall@2"].as_f64().unwrap() - 0.5).abs() < 1e-12);
        assert!((m["map@2"].as_f64().unwrap() - 0.25).abs() < 1e-12);
    }
}
