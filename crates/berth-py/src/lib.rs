//! `berth._berth`: the native module behind the `berth` Python package. It loads berth-tasks
//! pipelines (the CLI's loading and defaults) and runs them with the GIL released; the
//! Python layer (`python/berth/__init__.py`) shapes inputs and outputs as
//! sentence-transformers and transformers' pipelines do.
use std::path::PathBuf;

use berth_model::Precision;
use berth_tasks::{
    Aggregation, ClassFunction, ClassifyOptions, EmbedOptions, NerOptions, Pipeline,
    PipelineOptions, QaInput, QaOptions, TaskError,
};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyByteArray;

/// berth's error as the Python exception a user expects: `ValueError` for bad input or
/// options, `FileNotFoundError` for a model that is not there, `OSError` for unreadable or
/// malformed files, `RuntimeError` otherwise. The message is berth's.
fn py_err(e: TaskError) -> PyErr {
    let msg = e.to_string();
    match e {
        TaskError::Input { .. } | TaskError::Options(_) => PyValueError::new_err(msg),
        TaskError::Text(
            berth_text::TextError::EmptyText { .. }
            | berth_text::TextError::NoTokens { .. }
            | berth_text::TextError::TooLong { .. }
            | berth_text::TextError::Window { .. },
        ) => PyValueError::new_err(msg),
        TaskError::Model(berth_model::ModelError::HeadMissing { .. }) => PyValueError::new_err(msg),
        TaskError::NotFound(_) => PyFileNotFoundError::new_err(msg),
        TaskError::Config { .. } | TaskError::Text(_) | TaskError::Model(_) => {
            PyOSError::new_err(msg)
        }
        _ => PyRuntimeError::new_err(msg),
    }
}

fn precision(dtype: &str) -> PyResult<Precision> {
    match dtype {
        "f32" | "float32" => Ok(Precision::F32),
        "bf16" | "bfloat16" => Ok(Precision::Bf16),
        "int8" => Ok(Precision::Int8),
        other => Err(PyValueError::new_err(format!(
            "dtype {other:?}: use \"f32\", \"bf16\" or \"int8\""
        ))),
    }
}

/// A loaded pipeline and, when asked for a thread count, its own thread pool.
struct Engine {
    pipeline: Pipeline,
    dir: PathBuf,
    pool: Option<rayon::ThreadPool>,
}

impl Engine {
    fn load(
        py: Python<'_>,
        model: Option<&str>,
        dtype: &str,
        max_length: Option<usize>,
        threads: Option<usize>,
        sentence: bool,
    ) -> PyResult<Self> {
        let precision = precision(dtype)?;
        if threads == Some(0) {
            return Err(PyValueError::new_err("threads must be at least 1"));
        }
        let model = model.map(str::to_string);
        py.allow_threads(move || {
            let dir = berth_tasks::resolve::model_dir(model.as_deref()).map_err(py_err)?;
            let opts = PipelineOptions {
                precision,
                max_length,
                ..Default::default()
            };
            let (pipeline, _) = if sentence {
                Pipeline::load_sentence(&dir, &opts)
            } else {
                Pipeline::load(&dir, &opts)
            }
            .map_err(py_err)?;
            let pool = threads
                .map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build())
                .transpose()
                .map_err(|e| PyRuntimeError::new_err(format!("thread pool: {e}")))?;
            Ok(Engine {
                pipeline,
                dir,
                pool,
            })
        })
    }

    /// Runs `f` on `p` (a per-call copy of the pipeline) with the GIL released, in the
    /// engine's thread pool when it has one.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        p: &Pipeline,
        f: impl FnOnce(&Pipeline) -> berth_tasks::Result<T> + Send,
    ) -> PyResult<T> {
        py.allow_threads(|| match &self.pool {
            Some(pool) => pool.install(|| f(p)),
            None => f(p),
        })
        .map_err(py_err)
    }

    fn pipeline(&self, batch_tokens: Option<usize>) -> PyResult<Pipeline> {
        let mut p = self.pipeline.clone();
        if let Some(b) = batch_tokens {
            if b == 0 {
                return Err(PyValueError::new_err("batch_tokens must be at least 1"));
            }
            p.batch_tokens = b;
        }
        Ok(p)
    }
}

/// Texts per chunk of `encode`: one chunk is tokenized while the one before it runs.
const CHUNK: usize = 2048;

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Sentence embeddings (the model's sentence-transformers pooling and normalisation).
#[pyclass(frozen, module = "berth._berth")]
struct Encoder {
    e: Engine,
}

#[pymethods]
impl Encoder {
    #[new]
    #[pyo3(signature = (model=None, dtype="f32", max_length=None, threads=None))]
    fn new(
        py: Python<'_>,
        model: Option<&str>,
        dtype: &str,
        max_length: Option<usize>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        Ok(Encoder {
            e: Engine::load(py, model, dtype, max_length, threads, true)?,
        })
    }

    /// Vector size.
    #[getter]
    fn dimension(&self) -> usize {
        self.e.pipeline.model.config.hidden_size
    }

    /// Token limit per text.
    #[getter]
    fn max_length(&self) -> usize {
        self.e.pipeline.max_length
    }

    /// The model directory.
    #[getter]
    fn model_dir(&self) -> String {
        self.e.dir.to_string_lossy().into_owned()
    }

    /// Whether the model's config normalises its vectors.
    #[getter]
    fn normalizes(&self) -> bool {
        self.e.pipeline.embedding(None, false).1
    }

    /// Pooled vectors of `texts` as little-endian float32 bytes, `(bytes, n, d)`.
    #[pyo3(signature = (texts, batch_tokens=None, normalize=None))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        batch_tokens: Option<usize>,
        normalize: Option<bool>,
    ) -> PyResult<(Bound<'py, PyByteArray>, usize, usize)> {
        let p = self.e.pipeline(batch_tokens)?;
        let (pooling, default_normalize) = p.embedding(None, false);
        let opts = EmbedOptions {
            pooling,
            normalize: normalize.unwrap_or(default_normalize),
            windows: None,
        };
        let d = self.dimension();
        let n = texts.len();
        let bytes = self.e.run(py, &p, move |p| {
            // As `berth embed --input`: the next chunk is tokenized while this one runs.
            let mut bytes = Vec::with_capacity(n * d * 4);
            let chunks = texts.chunks(CHUNK).enumerate();
            let tokenize = |(c, chunk): (usize, &[String])| {
                berth_tasks::encode_for_embedding(p, chunk, &opts, c * CHUNK)
            };
            berth_tasks::pipelined(chunks, tokenize, |encoded| {
                for v in berth_tasks::embed_encoded(p, &encoded?, &opts)? {
                    bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
                }
                Ok::<_, TaskError>(())
            })?;
            Ok(bytes)
        })?;
        Ok((PyByteArray::new(py, &bytes), n, d))
    }

    /// Tokens of each text (special tokens included, truncated to the limit), as JSON.
    fn tokenize(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<String> {
        let p = self.e.pipeline(None)?;
        let encs = self.e.run(py, &p, move |p| p.encode(&texts, 0))?;
        let out: Vec<serde_json::Value> = encs
            .iter()
            .map(|e| {
                serde_json::json!({
                    "input_ids": e.ids,
                    "token_type_ids": e.type_ids,
                    "tokens": e.tokens,
                    "offsets": e.offsets,
                    "truncated": e.truncated,
                })
            })
            .collect();
        json(&out)
    }
}

/// A cross-encoder (sequence classification with one output).
#[pyclass(frozen, module = "berth._berth")]
struct CrossEncoder {
    e: Engine,
}

#[pymethods]
impl CrossEncoder {
    #[new]
    #[pyo3(signature = (model, dtype="f32", max_length=None, threads=None))]
    fn new(
        py: Python<'_>,
        model: &str,
        dtype: &str,
        max_length: Option<usize>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let e = Engine::load(py, Some(model), dtype, max_length, threads, false)?;
        berth_tasks::require_head(
            &e.pipeline.model,
            berth_model::HeadKind::SequenceClassification,
        )
        .map_err(py_err)?;
        Ok(CrossEncoder { e })
    }

    /// Scores of `(a, b)` pairs in order: the model's activation, or logits with `raw_scores`.
    #[pyo3(signature = (pairs, raw_scores=false, batch_tokens=None))]
    fn predict(
        &self,
        py: Python<'_>,
        pairs: Vec<(String, String)>,
        raw_scores: bool,
        batch_tokens: Option<usize>,
    ) -> PyResult<Vec<f32>> {
        let p = self.e.pipeline(batch_tokens)?;
        let pairs: Vec<_> = pairs.into_iter().map(|(a, b)| (a, Some(b))).collect();
        self.e.run(py, &p, move |p| {
            if pairs.is_empty() {
                return Ok(Vec::new());
            }
            berth_tasks::cross_encode(p, &pairs, raw_scores, 0)
        })
    }
}

/// A transformers-style pipeline; each method returns its results as JSON.
#[pyclass(frozen, module = "berth._berth")]
struct TaskPipeline {
    e: Engine,
}

#[pymethods]
impl TaskPipeline {
    #[new]
    #[pyo3(signature = (model=None, dtype="f32", max_length=None, threads=None, sentence=false))]
    fn new(
        py: Python<'_>,
        model: Option<&str>,
        dtype: &str,
        max_length: Option<usize>,
        threads: Option<usize>,
        sentence: bool,
    ) -> PyResult<Self> {
        Ok(TaskPipeline {
            e: Engine::load(py, model, dtype, max_length, threads, sentence)?,
        })
    }

    /// The model directory.
    #[getter]
    fn model_dir(&self) -> String {
        self.e.dir.to_string_lossy().into_owned()
    }

    /// Sequence classification: per input, labels with scores best first.
    #[pyo3(signature = (texts, pairs=None, top_k=None, function=None))]
    fn classify(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        pairs: Option<Vec<String>>,
        top_k: Option<usize>,
        function: Option<&str>,
    ) -> PyResult<String> {
        let function = match function {
            None => None,
            Some("softmax") => Some(ClassFunction::Softmax),
            Some("sigmoid") => Some(ClassFunction::Sigmoid),
            Some("none") => Some(ClassFunction::Identity),
            Some(f) => {
                return Err(PyValueError::new_err(format!(
                    "function_to_apply {f:?}: use \"softmax\", \"sigmoid\" or \"none\""
                )))
            }
        };
        let inputs: Vec<_> = match pairs {
            Some(b) if b.len() != texts.len() => {
                return Err(PyValueError::new_err("text_pair needs one pair per text"))
            }
            Some(b) => texts.into_iter().zip(b.into_iter().map(Some)).collect(),
            None => texts.into_iter().map(|t| (t, None)).collect(),
        };
        let opts = ClassifyOptions {
            top_k,
            function,
            windows: None,
        };
        let p = self.e.pipeline(None)?;
        let out = self.e.run(py, &p, move |p| {
            Ok(berth_tasks::classify(p, &inputs, &opts, 0)?.0)
        })?;
        json(&out)
    }

    /// Token classification: per input, its entities.
    #[pyo3(signature = (texts, aggregation_strategy="none", ignore_labels=None, stride=None))]
    fn ner(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        aggregation_strategy: &str,
        ignore_labels: Option<Vec<String>>,
        stride: Option<usize>,
    ) -> PyResult<String> {
        let aggregation = match aggregation_strategy {
            "none" => Aggregation::None,
            "simple" => Aggregation::Simple,
            "first" => Aggregation::First,
            "average" => Aggregation::Average,
            "max" => Aggregation::Max,
            a => {
                return Err(PyValueError::new_err(format!(
                    "aggregation_strategy {a:?}: use none, simple, first, average or max"
                )))
            }
        };
        let opts = NerOptions {
            aggregation,
            ignore_labels: ignore_labels.unwrap_or_else(|| vec!["O".into()]),
            stride,
            bioes: false,
        };
        let p = self.e.pipeline(None)?;
        let out = self.e.run(py, &p, move |p| {
            Ok(berth_tasks::token_classify(p, &texts, &opts, 0)?.0)
        })?;
        json(&out)
    }

    /// Extractive QA: per (question, context), its answers best first.
    #[pyo3(signature = (questions, contexts, top_k=1, max_answer_len=15, max_seq_len=None,
                        doc_stride=None, max_question_len=64, handle_impossible_answer=false,
                        align_to_words=true))]
    #[allow(clippy::too_many_arguments)]
    fn qa(
        &self,
        py: Python<'_>,
        questions: Vec<String>,
        contexts: Vec<String>,
        top_k: usize,
        max_answer_len: usize,
        max_seq_len: Option<usize>,
        doc_stride: Option<usize>,
        max_question_len: usize,
        handle_impossible_answer: bool,
        align_to_words: bool,
    ) -> PyResult<String> {
        if questions.len() != contexts.len() {
            return Err(PyValueError::new_err("one context per question"));
        }
        let inputs: Vec<QaInput> = questions
            .into_iter()
            .zip(contexts)
            .map(|(question, context)| QaInput { question, context })
            .collect();
        let opts = QaOptions {
            top_k,
            max_seq_len,
            doc_stride,
            max_answer_len,
            max_question_len,
            handle_impossible_answer,
            align_to_words,
        };
        let p = self.e.pipeline(None)?;
        let out = self
            .e
            .run(py, &p, move |p| berth_tasks::answer(p, &inputs, &opts, 0))?;
        json(&out)
    }

    /// Fill-mask: per text, per mask, the top-k predictions.
    #[pyo3(signature = (texts, top_k=5))]
    fn fill_mask(&self, py: Python<'_>, texts: Vec<String>, top_k: usize) -> PyResult<String> {
        if top_k == 0 {
            return Err(PyValueError::new_err("top_k must be at least 1"));
        }
        let p = self.e.pipeline(None)?;
        let out = self.e.run(py, &p, move |p| {
            let encs = p.encode(&texts, 0)?;
            berth_tasks::fill_mask(p, &encs, top_k, 0)
        })?;
        json(&out)
    }

    /// Feature extraction: per text, every token's last hidden state.
    fn features(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<String> {
        let p = self.e.pipeline(None)?;
        let out = self.e.run(py, &p, move |p| {
            Ok(berth_tasks::token_embeddings(p, &texts)?.0)
        })?;
        json(&out)
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (libmimalloc-sys 0.1.49).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The native module.
#[pymodule]
fn _berth(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // As the CLI: keep freed memory for the next batch instead of returning it to the OS.
    // SAFETY: sets a process-wide mimalloc option; called once, at import.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    m.add_class::<Encoder>()?;
    m.add_class::<CrossEncoder>()?;
    m.add_class::<TaskPipeline>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
