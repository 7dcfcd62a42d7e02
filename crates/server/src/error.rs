//! The one error type of the HTTP edge, and the error policy of the whole server.
//!
//! Domain code returns typed `thiserror` enums (`KeyError`, `StoreError`, …); a
//! handler's `?` turns them into [`ApiError`], the only thing that becomes an error
//! response. Every error body has the SPEC §2 shape:
//! `{"error": {"code", "message", "requestId", …}}`. A 5xx says only "internal
//! error" and the request id; its cause goes to the log. Authentication failures
//! never say more than the SPEC codes do (the audit log keeps the precise reason).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sandgate_core::keys::KeyError;
use sandgate_core::keys::api::InvalidField;
use sandgate_core::sandboxes::SandboxError;
use sandgate_core::scopes::Scope;
use sandgate_core::store::StoreError;
use sandgate_core::templates::TemplateError;
use sandgate_core::webhooks::WebhookError;
use serde_json::{Map, Value, json};

use crate::request::current_request_id;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Extra members of the error object (`field`, `requiredScope`).
    extra: Map<String, Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message);
        if !field.is_empty() {
            e.extra.insert("field".into(), field.into());
        }
        e
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    pub fn key_expired() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "KEY_EXPIRED",
            "API key is expired or revoked",
        )
    }

    pub fn forbidden(scope: Scope, message: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", message);
        e.extra
            .insert("requiredScope".into(), scope.as_str().into());
        e
    }

    pub fn ip_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "IP_NOT_ALLOWED",
            "Client IP address is not allowed",
        )
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("{what} not found"),
        )
    }

    /// A 404 that says what is missing in its own words (E2B's `/files`).
    pub fn not_found_because(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    /// The sandbox's disk is full (E2B's `/files` answers 507).
    pub fn insufficient_storage(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "INSUFFICIENT_STORAGE",
            message,
        )
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "CONFLICT", message)
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("request body is over the limit of {limit} bytes"),
        )
    }

    /// A 413 that says which limit, in its own words.
    pub fn payload_too_large_because(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", message)
    }

    pub fn rate_limited(retry_after_sec: u64) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "Rate limit exceeded",
        );
        e.retry_after = Some(retry_after_sec.max(1));
        e
    }

    /// Every run slot stayed busy for the whole wait (SPEC has no 503 code: a
    /// full server is answered like a rate limit, with `Retry-After`).
    pub fn server_busy(retry_after_sec: u64) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "The server is running as many programs as it allows; retry shortly",
        );
        e.retry_after = Some(retry_after_sec.max(1));
        e
    }

    /// The tenant's cap on running sandboxes is reached.
    pub fn too_many_sandboxes(max: usize) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!("The tenant already runs {max} sandboxes, the most it may; kill one first"),
        );
        e.retry_after = Some(5);
        e
    }

    pub fn quota_exceeded() -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "QUOTA_EXCEEDED",
            "The key's executions limit is used up",
        )
    }

    /// The auth callback could not be asked (unreachable, timed out); the cause is
    /// logged by the caller, the client learns only the SPEC code.
    pub fn auth_callback_failed() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "AUTH_CALLBACK_FAILED",
            "authentication callback failed",
        )
    }

    /// Logs `cause` with the request id; the client learns nothing of it.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(request_id = %current_request_id(), error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "internal error",
        )
    }

    /// E2B's proxy answer for a sandbox that does not exist (for this caller):
    /// 502, saying it "was not found", which E2B's SDKs read as "not running".
    pub fn sandbox_not_running(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "NOT_FOUND",
            format!("The sandbox {id} was not found"),
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = Map::new();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.into());
        error.insert("requestId".into(), current_request_id().into());
        error.extend(self.extra);
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::NotFound => ApiError::not_found("sandbox"),
            SandboxError::FileNotFound => ApiError::not_found("file"),
            SandboxError::PortNotOpen => ApiError::not_found("port"),
            SandboxError::Conflict(m) => ApiError::conflict(m),
            SandboxError::Invalid(f) => f.into(),
            SandboxError::TooMany(max) => ApiError::too_many_sandboxes(max),
            SandboxError::Store(e) => e.into(),
            other => ApiError::internal(other),
        }
    }
}

impl From<InvalidField> for ApiError {
    fn from(e: InvalidField) -> ApiError {
        ApiError::invalid(e.field, e.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::internal(e)
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        match e {
            KeyError::NotFound => ApiError::not_found("key"),
            KeyError::Forbidden {
                required_scope,
                message,
            } => ApiError::forbidden(required_scope, message),
            KeyError::Invalid(field) => field.into(),
            KeyError::Conflict(message) => ApiError::conflict(message),
            KeyError::Store(e) => e.into(),
        }
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> ApiError {
        match e {
            TemplateError::NotFound => ApiError::not_found("template"),
            TemplateError::Conflict(message) => ApiError::conflict(message),
            TemplateError::Invalid(field) => field.into(),
            TemplateError::Store(e) => e.into(),
        }
    }
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> ApiError {
        match e {
            WebhookError::NotFound => ApiError::not_found("webhook"),
            WebhookError::Invalid(field) => field.into(),
            WebhookError::Store(e) => e.into(),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
