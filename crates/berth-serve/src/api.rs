//! Routes: request and response shapes of TEI (`/embed`, `/predict`, `/rerank`, ...),
//! OpenAI (`/v1/embeddings`) and transformers' pipelines (`/ner`, `/qa`, `/fill-mask`).
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use berth_tasks::{
    Aggregation, ClassFunction, ClassifyOptions, EmbedOptions, LabelScore, NerOptions, QaInput,
    QaOptions,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::metrics::{secs, RequestLabels};
use crate::{ApiError, App};
use tokio::sync::OwnedSemaphorePermit;

type Shared = State<Arc<App>>;
type Body = Result<Bytes, BytesRejection>;
type Reply = Result<Response, ApiError>;

/// Every route, with the request counter / timer around it.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/embed", post(embed))
        .route("/embed_all", post(embed_all))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/similarity", post(similarity))
        .route("/predict", post(predict))
        .route("/rerank", post(rerank))
        .route("/ner", post(ner))
        .route("/qa", post(qa))
        .route("/fill-mask", post(fill_mask))
        .route("/tokenize", post(tokenize))
        .route("/decode", post(decode))
        .route("/info", get(info))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), track))
        .layer(DefaultBodyLimit::max(app.config.payload_limit))
        .with_state(app)
}

/// Counts and times every response by route and status; one debug log line per request.
async fn track(State(app): Shared, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let t = Instant::now();
    let resp = next.run(req).await;
    let labels = RequestLabels {
        route,
        status: resp.status().as_u16(),
    };
    let m = &app.metrics;
    m.requests.get_or_create(&labels).inc();
    m.request_seconds
        .get_or_create(&labels)
        .observe(secs(t.elapsed()));
    tracing::debug!(
        route = labels.route,
        status = labels.status,
        ms = t.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "Validation",
        format!(
            "no route {} {} (see GET /openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The body as `T`: 413 over the size limit, 422 for anything that is not `T` as JSON
/// (malformed JSON, invalid UTF-8, wrong types, unknown fields).
fn parse<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        ApiError::new(status, "Validation", e.body_text())
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::validation(format!("invalid request body: {e}")))
}

/// A route's request body: the model it names and how many inputs it carries.
trait ApiRequest: DeserializeOwned {
    fn model(&self) -> Option<&str>;
    fn inputs(&self) -> usize;
}

/// Implements [`ApiRequest`] for a request with a `model` field; `$count` counts its inputs.
macro_rules! api_request {
    ($t:ty, |$r:ident| $count:expr) => {
        impl ApiRequest for $t {
            fn model(&self) -> Option<&str> {
                self.model.as_deref()
            }
            fn inputs(&self) -> usize {
                let $r = self;
                $count
            }
        }
    };
}

/// What every route does first: admission (429), the body (413 / 422), the model (404 /
/// 422 when it cannot serve `route`), the input count (422 / 413).
fn begin<'a, R: ApiRequest>(
    app: &'a App,
    body: Body,
    route: &str,
) -> Result<(OwnedSemaphorePermit, R, &'a crate::Served), ApiError> {
    let permit = app.admit()?;
    let req: R = parse(body)?;
    let m = app.model(req.model(), route)?;
    app.check_count(req.inputs())?;
    Ok((permit, req, m))
}

fn ok<T: Serialize>(v: T) -> Reply {
    Ok(Json(v).into_response())
}

/// A string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Inputs {
    One(String),
    Many(Vec<String>),
}

impl Inputs {
    fn len(&self) -> usize {
        match self {
            Inputs::One(_) => 1,
            Inputs::Many(v) => v.len(),
        }
    }

    fn into_vec(self) -> (Vec<String>, bool) {
        match self {
            Inputs::One(s) => (vec![s], true),
            Inputs::Many(v) => (v, false),
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedRequest {
    inputs: Inputs,
    #[serde(default = "yes")]
    normalize: bool,
    truncate: Option<bool>,
    model: Option<String>,
}

/// The model's sentence vectors of `texts` (its pooling; normalised when asked) and their
/// encodings.
async fn sentence_vectors(
    app: &App,
    permit: OwnedSemaphorePermit,
    m: &crate::Served,
    texts: Vec<String>,
    normalize: bool,
    truncate: Option<bool>,
) -> Result<(Vec<Vec<f32>>, Vec<berth_text::Encoded>), ApiError> {
    let opts = EmbedOptions {
        pooling: m.pooling().0,
        normalize,
        windows: None,
    };
    let (vecs, encs) = app
        .run(permit, m, truncate, move |p| {
            berth_tasks::embed_texts(p, &texts, &opts, 0)
        })
        .await?;
    app.count_truncated(m, &encs);
    Ok((vecs, encs))
}

/// Pooled (and normalised unless asked not to) vectors, as TEI's `/embed`.
async fn embed(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<EmbedRequest>(&app, body, "/embed")?;
    let (texts, _) = req.inputs.into_vec();
    let (vecs, _) = sentence_vectors(&app, permit, m, texts, req.normalize, req.truncate).await?;
    ok(vecs)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedAllRequest {
    inputs: Inputs,
    truncate: Option<bool>,
    model: Option<String>,
}

/// Every token's last hidden state, per input (`[input][token][hidden]`), as TEI.
async fn embed_all(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<EmbedAllRequest>(&app, body, "/embed_all")?;
    let (texts, _) = req.inputs.into_vec();
    let (out, encs) = app
        .run(permit, m, req.truncate, move |p| {
            berth_tasks::token_embeddings(p, &texts)
        })
        .await?;
    app.count_truncated(m, &encs);
    ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiRequest {
    input: Inputs,
    model: Option<String>,
    #[serde(default)]
    encoding_format: EncodingFormat,
    /// OpenAI's end-user id: accepted, not used.
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// OpenAI's embeddings API: normalised vectors (as TEI's `/v1/embeddings`), as floats or
/// base64 of little-endian float32.
async fn openai_embeddings(State(app): Shared, body: Body) -> Reply {
    use base64::Engine;
    let (permit, req, m) = begin::<OpenAiRequest>(&app, body, "/v1/embeddings")?;
    let (texts, _) = req.input.into_vec();
    let (vecs, encs) = sentence_vectors(&app, permit, m, texts, true, None).await?;
    let tokens: usize = encs.iter().map(|e| e.len()).sum();
    let data: Vec<OpenAiEmbedding> = vecs
        .into_iter()
        .enumerate()
        .map(|(index, v)| OpenAiEmbedding {
            object: "embedding",
            index,
            embedding: match req.encoding_format {
                EncodingFormat::Float => OneOrList::List(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    OneOrList::One(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            },
        })
        .collect();
    ok(OpenAiList {
        object: "list",
        data,
        model: &m.name,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}

/// OpenAI's embeddings response.
#[derive(Serialize)]
struct OpenAiList<'a> {
    object: &'static str,
    data: Vec<OpenAiEmbedding>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// One vector of `/v1/embeddings`: floats, or a base64 string.
#[derive(Serialize)]
struct OpenAiEmbedding {
    object: &'static str,
    index: usize,
    embedding: OneOrList<String, f32>,
}

/// One item or a list (pipelines answer one input with its result, a list with a list).
#[derive(Serialize)]
#[serde(untagged)]
enum OneOrList<T, L = T> {
    One(T),
    List(Vec<L>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimilarityInputs {
    source_sentence: String,
    sentences: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimilarityRequest {
    inputs: SimilarityInputs,
    truncate: Option<bool>,
    model: Option<String>,
}

/// Cosine similarity of the source sentence to each sentence, as TEI's `/similarity`.
async fn similarity(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<SimilarityRequest>(&app, body, "/similarity")?;
    let SimilarityInputs {
        source_sentence,
        sentences,
    } = req.inputs;
    let mut texts = vec![source_sentence];
    texts.extend(sentences);
    let (vecs, _) = sentence_vectors(&app, permit, m, texts, false, req.truncate).await?;
    let sims: Vec<f32> = vecs[1..]
        .iter()
        .map(|v| berth_tasks::cosine(&vecs[0], v))
        .collect();
    ok(sims)
}

/// A text, a sentence pair, or a text in a one-element list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Sequence {
    Single(String),
    Pair(String, String),
    Listed((String,)),
}

/// TEI's predict input: one sequence or a list of them. As in TEI, a list of exactly two
/// strings is one pair; two single texts are `[["a"], ["b"]]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PredictInputs {
    One(Sequence),
    Many(Vec<Sequence>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    inputs: PredictInputs,
    #[serde(default)]
    raw_scores: bool,
    truncate: Option<bool>,
    model: Option<String>,
}

/// Sequence classification, every label best first, as TEI's `/predict`: one input gives
/// `[{label, score}]`, a list `[[{label, score}]]`. `raw_scores`: the logits.
async fn predict(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<PredictRequest>(&app, body, "/predict")?;
    let (seqs, single) = match req.inputs {
        PredictInputs::One(s) => (vec![s], true),
        PredictInputs::Many(v) => (v, false),
    };
    let inputs: Vec<berth_tasks::TextPair> = seqs
        .into_iter()
        .map(|s| match s {
            Sequence::Single(t) | Sequence::Listed((t,)) => (t, None),
            Sequence::Pair(a, b) => (a, Some(b)),
        })
        .collect();
    let opts = ClassifyOptions {
        top_k: None,
        function: req.raw_scores.then_some(ClassFunction::Identity),
        windows: None,
    };
    let (mut out, encs): (Vec<Vec<LabelScore>>, _) = app
        .run(permit, m, req.truncate, move |p| {
            berth_tasks::classify(p, &inputs, &opts, 0)
        })
        .await?;
    app.count_truncated(m, &encs);
    if single {
        return ok(out.remove(0));
    }
    ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RerankRequest {
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
    truncate: Option<bool>,
    model: Option<String>,
}

/// Cross-encoder scores of each text against the query, best first, as TEI's `/rerank`.
async fn rerank(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<RerankRequest>(&app, body, "/rerank")?;
    let RerankRequest {
        query,
        texts,
        raw_scores,
        return_text,
        truncate,
        ..
    } = req;
    let (ranked, texts) = app
        .run(permit, m, truncate, move |p| {
            Ok((berth_tasks::rerank(p, &query, &texts, raw_scores)?, texts))
        })
        .await?;
    let out: Vec<RankedText> = ranked
        .iter()
        .map(|r| RankedText {
            index: r.corpus_id,
            score: r.score,
            text: return_text.then(|| texts[r.corpus_id].as_str()),
        })
        .collect();
    ok(out)
}

/// One `/rerank` result.
#[derive(Serialize)]
struct RankedText<'a> {
    index: usize,
    score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum AggregationName {
    None,
    Simple,
    First,
    Average,
    Max,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NerRequest {
    inputs: Inputs,
    aggregation_strategy: Option<AggregationName>,
    ignore_labels: Option<Vec<String>>,
    stride: Option<usize>,
    truncate: Option<bool>,
    model: Option<String>,
}

/// Entities per input, as `berth ner` (and transformers' token-classification pipeline):
/// one input gives its entity list, a list of inputs a list of lists.
async fn ner(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<NerRequest>(&app, body, "/ner")?;
    let (texts, single) = req.inputs.into_vec();
    let aggregation = match req.aggregation_strategy.unwrap_or(AggregationName::Simple) {
        AggregationName::None => Aggregation::None,
        AggregationName::Simple => Aggregation::Simple,
        AggregationName::First => Aggregation::First,
        AggregationName::Average => Aggregation::Average,
        AggregationName::Max => Aggregation::Max,
    };
    let opts = NerOptions {
        aggregation,
        ignore_labels: req.ignore_labels.unwrap_or_else(|| vec!["O".into()]),
        stride: req.stride,
        bioes: false,
    };
    let (mut out, encs) = app
        .run(permit, m, req.truncate, move |p| {
            berth_tasks::token_classify(p, &texts, &opts, 0)
        })
        .await?;
    if req.stride.is_none() {
        app.count_truncated(m, &encs);
    }
    if single {
        return ok(out.remove(0));
    }
    ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QaRequest {
    question: String,
    context: String,
    #[serde(default = "one")]
    top_k: usize,
    max_seq_len: Option<usize>,
    doc_stride: Option<usize>,
    max_answer_len: Option<usize>,
    max_question_len: Option<usize>,
    #[serde(default)]
    handle_impossible_answer: bool,
    #[serde(default = "yes")]
    align_to_words: bool,
    model: Option<String>,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
#[serde(untagged)]
enum QaRequests {
    One(QaRequest),
    Many(Vec<QaRequest>),
}

impl QaRequest {
    fn options(&self) -> QaOptions {
        let d = QaOptions::default();
        QaOptions {
            top_k: self.top_k,
            max_seq_len: self.max_seq_len,
            doc_stride: self.doc_stride,
            max_answer_len: self.max_answer_len.unwrap_or(d.max_answer_len),
            max_question_len: self.max_question_len.unwrap_or(d.max_question_len),
            handle_impossible_answer: self.handle_impossible_answer,
            align_to_words: self.align_to_words,
        }
    }
}

/// Answers as `berth qa` (transformers' question-answering pipeline): with `top_k` 1 one
/// answer object, else a list; a list of questions gives a list of those.
async fn qa(State(app): Shared, body: Body) -> Reply {
    let permit = app.admit()?;
    let (reqs, single) = match parse::<QaRequests>(body)? {
        QaRequests::One(r) => (vec![r], true),
        QaRequests::Many(v) => (v, false),
    };
    app.check_count(reqs.len())?;
    let name = reqs[0].model.clone();
    if reqs.iter().any(|r| r.model != name) {
        return Err(ApiError::validation(
            "every question of one request must name the same model",
        ));
    }
    let m = app.model(name.as_deref(), "/qa")?;
    let answers = app
        .run(permit, m, Some(true), move |p| {
            // Questions with the same options run in one call (their windows batched).
            let mut out = vec![Vec::new(); reqs.len()];
            let mut done = vec![false; reqs.len()];
            for i in 0..reqs.len() {
                if done[i] {
                    continue;
                }
                let opts = reqs[i].options();
                let group: Vec<usize> = (i..reqs.len())
                    .filter(|&j| !done[j] && same_options(&reqs[j].options(), &opts))
                    .collect();
                let inputs: Vec<QaInput> = group
                    .iter()
                    .map(|&j| QaInput {
                        question: reqs[j].question.clone(),
                        context: reqs[j].context.clone(),
                    })
                    .collect();
                for (&j, a) in group.iter().zip(berth_tasks::answer(p, &inputs, &opts, i)?) {
                    out[j] = a;
                    done[j] = true;
                }
            }
            Ok(out
                .into_iter()
                .zip(reqs.iter().map(|r| r.top_k))
                .collect::<Vec<_>>())
        })
        .await?;
    let mut shaped: Vec<OneOrList<berth_tasks::Answer>> = answers
        .into_iter()
        .map(|(mut a, k)| {
            if k == 1 && a.len() == 1 {
                OneOrList::One(a.remove(0))
            } else {
                OneOrList::List(a)
            }
        })
        .collect();
    if single {
        return ok(shaped.remove(0));
    }
    ok(shaped)
}

fn same_options(a: &QaOptions, b: &QaOptions) -> bool {
    (
        a.top_k,
        a.max_seq_len,
        a.doc_stride,
        a.max_answer_len,
        a.max_question_len,
    ) == (
        b.top_k,
        b.max_seq_len,
        b.doc_stride,
        b.max_answer_len,
        b.max_question_len,
    ) && (a.handle_impossible_answer, a.align_to_words)
        == (b.handle_impossible_answer, b.align_to_words)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FillMaskRequest {
    inputs: Inputs,
    #[serde(default = "five")]
    top_k: usize,
    truncate: Option<bool>,
    model: Option<String>,
}

fn five() -> usize {
    5
}

/// Top-k tokens per mask, as transformers' fill-mask pipeline: a text with one mask gives
/// its list of predictions, with several masks a list per mask; a list of texts a list of
/// those.
async fn fill_mask(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<FillMaskRequest>(&app, body, "/fill-mask")?;
    let (texts, single) = req.inputs.into_vec();
    if req.top_k == 0 {
        return Err(ApiError::validation("top_k must be at least 1"));
    }
    let top_k = req.top_k;
    let out = app
        .run(permit, m, req.truncate, move |p| {
            let encs = p.encode(&texts, 0)?;
            berth_tasks::fill_mask(p, &encs, top_k, 0)
        })
        .await?;
    let mut shaped: Vec<OneOrList<Vec<berth_tasks::Prediction>>> = out
        .into_iter()
        .map(|mut masks| {
            if masks.len() == 1 {
                OneOrList::One(masks.remove(0))
            } else {
                OneOrList::List(masks)
            }
        })
        .collect();
    if single {
        return ok(shaped.remove(0));
    }
    ok(shaped)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    inputs: Inputs,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    model: Option<String>,
}

#[derive(Serialize)]
struct Token {
    id: u32,
    text: String,
    special: bool,
    /// Character offsets in the input (`null` for special tokens).
    start: Option<usize>,
    stop: Option<usize>,
}

/// Tokens of each input, as TEI's `/tokenize` (offsets count characters, as Python does).
async fn tokenize(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<TokenizeRequest>(&app, body, "/tokenize")?;
    let (texts, _) = req.inputs.into_vec();
    let special = req.add_special_tokens;
    let out = app
        .run(permit, m, Some(true), move |p| {
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let e = p.tokenizer.encode(
                        t,
                        None,
                        usize::MAX,
                        berth_text::Truncation::Truncate,
                        i,
                    )?;
                    Ok((0..e.len())
                        .filter(|&k| special || !e.special[k])
                        .map(|k| Token {
                            id: e.ids[k],
                            text: e.tokens[k].clone(),
                            special: e.special[k],
                            start: (!e.special[k]).then_some(e.offsets[k].0),
                            stop: (!e.special[k]).then_some(e.offsets[k].1),
                        })
                        .collect::<Vec<_>>())
                })
                .collect::<berth_tasks::Result<Vec<_>>>()
        })
        .await?;
    ok(out)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Ids {
    One(Vec<u32>),
    Many(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecodeRequest {
    ids: Ids,
    #[serde(default = "yes")]
    skip_special_tokens: bool,
    model: Option<String>,
}

/// Text of each id list, as TEI's `/decode`.
async fn decode(State(app): Shared, body: Body) -> Reply {
    let (permit, req, m) = begin::<DecodeRequest>(&app, body, "/decode")?;
    let lists = match req.ids {
        Ids::One(v) => vec![v],
        Ids::Many(v) => v,
    };
    let vocab = m.pipeline.tokenizer.vocab_size();
    if let Some((i, id)) = lists.iter().enumerate().find_map(|(i, l)| {
        l.iter()
            .find(|&&id| id as usize >= vocab)
            .map(|&id| (i, id))
    }) {
        return Err(ApiError::validation(format!(
            "ids {i}: token id {id} is outside the vocabulary of {vocab}"
        )));
    }
    let skip = req.skip_special_tokens;
    let out = app
        .run(permit, m, None, move |p| {
            lists
                .iter()
                .map(|l| Ok(p.tokenizer.decode(l, skip)?))
                .collect::<berth_tasks::Result<Vec<String>>>()
        })
        .await?;
    ok(out)
}

/// Models, their tasks and routes, the limits, the version.
async fn info(State(app): Shared) -> Reply {
    let c = &app.config;
    let models: Vec<Value> = app
        .models
        .iter()
        .map(|m| {
            let cfg = &m.pipeline.model.config;
            let (pooling, normalize) = m.pooling();
            json!({
                "name": m.name,
                "dir": m.dir,
                "task": m.task.name(),
                "routes": m.task.routes(),
                "model_type": cfg.model_type,
                "architectures": cfg.architectures,
                "hidden_size": cfg.hidden_size,
                "max_input_length": m.pipeline.max_length,
                "pooling": format!("{pooling:?}").to_lowercase(),
                "normalize": normalize,
                "labels": cfg.id2label,
            })
        })
        .collect();
    ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "dtype": format!("{:?}", c.precision).to_lowercase(),
        "models": models,
        "max_batch_tokens": c.max_batch_tokens,
        "max_concurrent_requests": c.max_concurrent_requests,
        "max_client_batch_size": c.max_client_batch_size,
        "auto_truncate": c.auto_truncate,
        "payload_limit": c.payload_limit,
    }))
}

async fn health() -> Reply {
    ok(json!({"status": "ok"}))
}

async fn metrics(State(app): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Reply {
    ok(crate::openapi::document())
}

api_request!(EmbedRequest, |r| r.inputs.len());

api_request!(EmbedAllRequest, |r| r.inputs.len());

api_request!(OpenAiRequest, |r| r.input.len());

api_request!(FillMaskRequest, |r| r.inputs.len());

api_request!(TokenizeRequest, |r| r.inputs.len());

api_request!(NerRequest, |r| r.inputs.len());

api_request!(SimilarityRequest, |r| r.inputs.sentences.len());

api_request!(PredictRequest, |r| match &r.inputs {
    PredictInputs::One(_) => 1,
    PredictInputs::Many(v) => v.len(),
});

api_request!(RerankRequest, |r| r.texts.len());

api_request!(DecodeRequest, |r| match &r.ids {
    Ids::One(_) => 1,
    Ids::Many(v) => v.len(),
});
