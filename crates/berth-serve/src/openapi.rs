//! The OpenAPI 3 description served at `/openapi.json`: every route with its request body
//! and an example.
use serde_json::{json, Value};

/// A POST route taking JSON.
fn post(summary: &str, properties: Value, required: &[&str], example: Value) -> Value {
    json!({"post": {
        "summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {
            "schema": {"type": "object", "properties": properties, "required": required},
            "example": example,
        }}},
        "responses": {
            "200": {"description": "the result, as JSON"},
            "404": {"description": "unknown model", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "413": {"description": "too many inputs, body too large, or an input over the token limit without truncation", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "422": {"description": "invalid request (malformed JSON, wrong types, empty input, a route the model cannot serve)", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "429": {"description": "too many requests in flight", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
        },
    }})
}

fn get(summary: &str) -> Value {
    json!({"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}})
}

/// The whole document.
pub fn document() -> Value {
    let text_or_list =
        json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]});
    let model =
        json!({"type": "string", "description": "a served model's name (default: the first)"});
    let truncate = json!({"type": "boolean", "description": "cut inputs over the token limit instead of refusing them"});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "berth", "version": env!("CARGO_PKG_VERSION"),
                 "description": "BERT-family inference: TEI- and OpenAI-compatible routes plus NER, QA and fill-mask"},
        "paths": {
            "/embed": post("Sentence embeddings (TEI)",
                json!({"inputs": text_or_list, "normalize": {"type": "boolean", "default": true}, "truncate": truncate, "model": model}),
                &["inputs"], json!({"inputs": ["What is BERT?", "A bidirectional encoder."]})),
            "/embed_all": post("Every token's hidden state (TEI)",
                json!({"inputs": text_or_list, "truncate": truncate, "model": model}),
                &["inputs"], json!({"inputs": "What is BERT?"})),
            "/v1/embeddings": post("Embeddings (OpenAI)",
                json!({"input": text_or_list, "model": model, "encoding_format": {"type": "string", "enum": ["float", "base64"]}, "user": {"type": "string"}}),
                &["input"], json!({"input": "What is BERT?", "encoding_format": "float"})),
            "/similarity": post("Cosine similarity of a sentence to others (TEI)",
                json!({"inputs": {"type": "object", "properties": {"source_sentence": {"type": "string"}, "sentences": {"type": "array", "items": {"type": "string"}}}}, "truncate": truncate, "model": model}),
                &["inputs"], json!({"inputs": {"source_sentence": "A cat sits.", "sentences": ["A cat is sitting.", "Stocks fell."]}})),
            "/predict": post("Sequence classification (TEI); a two-string list is a sentence pair",
                json!({"inputs": {"description": "a text, a [text, pair], or a list of those"}, "raw_scores": {"type": "boolean", "default": false}, "truncate": truncate, "model": model}),
                &["inputs"], json!({"inputs": ["I love it.", "It is awful."]})),
            "/rerank": post("Cross-encoder reranking, best first (TEI)",
                json!({"query": {"type": "string"}, "texts": {"type": "array", "items": {"type": "string"}}, "raw_scores": {"type": "boolean"}, "return_text": {"type": "boolean"}, "truncate": truncate, "model": model}),
                &["query", "texts"], json!({"query": "What is Paris?", "texts": ["Paris is the capital of France.", "Berlin is in Germany."], "return_text": true})),
            "/ner": post("Named entities (transformers' token-classification pipeline)",
                json!({"inputs": text_or_list, "aggregation_strategy": {"type": "string", "enum": ["none", "simple", "first", "average", "max"], "default": "simple"}, "ignore_labels": {"type": "array", "items": {"type": "string"}}, "stride": {"type": "integer"}, "truncate": truncate, "model": model}),
                &["inputs"], json!({"inputs": "George Washington lived in Virginia.", "aggregation_strategy": "simple"})),
            "/qa": post("Extractive question answering (transformers' pipeline); a list of such objects is accepted too",
                json!({"question": {"type": "string"}, "context": {"type": "string"}, "top_k": {"type": "integer", "default": 1}, "max_seq_len": {"type": "integer"}, "doc_stride": {"type": "integer"}, "max_answer_len": {"type": "integer", "default": 15}, "max_question_len": {"type": "integer", "default": 64}, "handle_impossible_answer": {"type": "boolean"}, "align_to_words": {"type": "boolean", "default": true}, "model": model}),
                &["question", "context"], json!({"question": "Where do I live?", "context": "My name is Wolfgang and I live in Berlin."})),
            "/fill-mask": post("Masked-token predictions (transformers' pipeline)",
                json!({"inputs": text_or_list, "top_k": {"type": "integer", "default": 5}, "truncate": truncate, "model": model}),
                &["inputs"], json!({"inputs": "Paris is the [MASK] of France."})),
            "/tokenize": post("Tokens with character offsets (TEI)",
                json!({"inputs": text_or_list, "add_special_tokens": {"type": "boolean", "default": true}, "model": model}),
                &["inputs"], json!({"inputs": "What is BERT?"})),
            "/decode": post("Text of token ids (TEI)",
                json!({"ids": {"description": "a list of ids or a list of lists"}, "skip_special_tokens": {"type": "boolean", "default": true}, "model": model}),
                &["ids"], json!({"ids": [101, 2054, 2003, 14324, 1029, 102]})),
            "/info": get("Models, tasks, routes, dtype, limits, version"),
            "/health": get("200 while the server serves"),
            "/metrics": get("Prometheus / OpenMetrics text"),
            "/openapi.json": get("This document"),
        },
        "components": {"schemas": {"Error": {"type": "object", "properties": {
            "error": {"type": "string"}, "error_type": {"type": "string"}}}}},
    })
}
