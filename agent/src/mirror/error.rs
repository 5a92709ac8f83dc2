//! Registry-style JSON errors (`{"errors":[{"code":..,"message":..}]}`), as the distribution spec
//! defines them, so containerd prints something meaningful.

use http::StatusCode;

/// One error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Distribution error code (`DIGEST_INVALID`, ...).
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    pub fn unsupported(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", format!("no such endpoint {path:?}; the mirror serves /v2/, manifests and blobs"))
    }

    pub fn name_invalid(name: &str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", format!("invalid repository name {name:?}"))
    }

    pub fn digest_invalid(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
    }

    pub fn tag_invalid(tag: &str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", format!("invalid tag {tag:?}"))
    }

    pub fn unknown_registry(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "UNKNOWN_REGISTRY", message)
    }

    pub fn range_not_satisfiable(len: u64) -> ApiError {
        ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID", format!("range outside the blob of {len} bytes"))
    }

    pub fn upstream(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "UNAVAILABLE", message)
    }

    pub fn manifest_invalid(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", message)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "errors": [{ "code": self.code, "message": self.message }] }).to_string()
    }
}
