//! Errors as the API shows them: `{"error": {"code", "message", "field"}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An invalid input, naming the field that is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize, ToSchema)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// Dotted path of the offending field, e.g. `resources.memory_mib`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// A validation error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The body of every API error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    /// The error.
    pub error: ApiError,
}

/// One API error: a stable machine-readable code, a message for people, and the field
/// at fault when the input was invalid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable code: `invalid`, `not_found`, `conflict`, `unauthorized`, `unplaceable`,
    /// `too_large`, `unavailable`, `internal`, ...
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// The field at fault, for `invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiErrorBody {
    /// An error body with a code and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiErrorBody {
            error: ApiError {
                code: code.into(),
                message: message.into(),
                field: None,
            },
        }
    }
}

impl From<ValidationError> for ApiErrorBody {
    fn from(e: ValidationError) -> Self {
        ApiErrorBody {
            error: ApiError {
                code: "invalid".into(),
                message: e.to_string(),
                field: Some(e.field),
            },
        }
    }
}
