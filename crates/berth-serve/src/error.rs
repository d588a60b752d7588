//! Errors as HTTP responses: a status and `{"error": ..., "error_type": ...}` (TEI's body).
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_tasks::TaskError;
use berth_text::TextError;

/// A request that could not be served.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// TEI's error class: `Validation`, `Overloaded`, `Empty`, `Unsupported`, `Backend`.
    pub error_type: &'static str,
    /// What went wrong, for the client.
    pub message: String,
}

impl ApiError {
    /// 422: the request is well-formed JSON but asks for something invalid.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Validation", message)
    }

    /// Any status.
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error_type,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.message, "error_type": self.error_type});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        match &e {
            TaskError::Text(TextError::TooLong { index, tokens, max }) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Validation",
                format!(
                    "input {index}: {tokens} tokens, longer than the model's maximum of {max}; \
                     send \"truncate\": true or start the server with --auto-truncate"
                ),
            ),
            TaskError::Text(TextError::EmptyText { .. } | TextError::NoTokens { .. }) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Empty", e.to_string())
            }
            TaskError::Text(_)
            | TaskError::Input { .. }
            | TaskError::Options(_)
            | TaskError::Model(berth_model::ModelError::HeadMissing { .. }) => {
                ApiError::validation(e.to_string())
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Backend", e.to_string()),
        }
    }
}
