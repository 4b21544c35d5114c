//! The denial answers: every refusal keygate can give, its status and code, and how it is written
//! in the OpenAI, Anthropic and Google error shapes.
//!
//! A denial is a value, not an error: the checks return `Result<_, Denial>` and the Pingora layer
//! writes the answer. `pingora::Error` is kept for real faults.

use std::borrow::Cow;
use std::fmt;

/// Why a request was refused. Each reason has a fixed HTTP status and a stable `code` string that
/// clients and dashboards rely on (see SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No credential in any of the places keygate looks.
    MissingApiKey,
    /// A credential that matches no key.
    InvalidApiKey,
    /// The key exists but its status is `disabled`.
    KeyDisabled,
    /// The key's `expires_at` has passed.
    KeyExpired,
    /// The client IP is outside the key's `allow_ips`.
    IpNotAllowed,
    /// The endpoint needs a model and the request names none.
    ModelRequired,
    /// The `model` field is present but is not a usable model name (not a string, too long).
    InvalidModel,
    /// The key or its group may not use this model.
    ModelNotAllowed,
    /// No configured upstream serves this model.
    ModelNotFound,
    /// The model has no price in the sync file (and no `"*"` entry) and the key is limited.
    ModelNotPriced,
    /// The key's remaining quota cannot cover the call.
    InsufficientQuota,
    /// The quota ledger could not record the reservation durably in time.
    QuotaBackendUnavailable,
    /// The body is larger than `max_body_bytes`.
    RequestTooLarge,
    /// The body is not valid JSON, or not a JSON object.
    InvalidJson,
    /// A chunked body too large to be buffered without a declared length.
    LengthRequired,
    /// The request head is too large.
    HeadersTooLarge,
    /// The client closed or stalled before sending the whole body it announced.
    IncompleteBody,
    /// The request head or body was not received within its time limit.
    RequestTimeout,
    /// The upstream could not be reached or failed before answering.
    UpstreamError,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// Every target of the upstream is cooling down after a `Retry-After`.
    UpstreamRateLimited,
    /// The key's account is disabled (SPEC §7).
    AccountDisabled,
    /// An rpm, tpm or concurrency limit of the key or its account is reached.
    RateLimitExceeded,
    /// The period budget of the key or its account is spent.
    BudgetExceeded,
}

impl Reason {
    /// Every reason, for metrics pre-registration and docs.
    pub const ALL: [Reason; 24] = [
        Reason::MissingApiKey,
        Reason::InvalidApiKey,
        Reason::KeyDisabled,
        Reason::KeyExpired,
        Reason::IpNotAllowed,
        Reason::ModelRequired,
        Reason::InvalidModel,
        Reason::ModelNotAllowed,
        Reason::ModelNotFound,
        Reason::ModelNotPriced,
        Reason::InsufficientQuota,
        Reason::QuotaBackendUnavailable,
        Reason::RequestTooLarge,
        Reason::InvalidJson,
        Reason::LengthRequired,
        Reason::HeadersTooLarge,
        Reason::IncompleteBody,
        Reason::RequestTimeout,
        Reason::UpstreamError,
        Reason::UpstreamTimeout,
        Reason::UpstreamRateLimited,
        Reason::AccountDisabled,
        Reason::RateLimitExceeded,
        Reason::BudgetExceeded,
    ];

    /// The HTTP status of the answer.
    pub fn status(self) -> u16 {
        match self {
            Reason::MissingApiKey | Reason::InvalidApiKey => 401,
            Reason::KeyDisabled | Reason::KeyExpired | Reason::AccountDisabled => 401,
            Reason::IpNotAllowed | Reason::ModelNotAllowed | Reason::ModelNotPriced => 403,
            Reason::ModelRequired | Reason::InvalidModel | Reason::InvalidJson => 400,
            Reason::IncompleteBody => 400,
            Reason::ModelNotFound => 404,
            Reason::RequestTimeout => 408,
            Reason::LengthRequired => 411,
            Reason::HeadersTooLarge => 431,
            Reason::RequestTooLarge => 413,
            Reason::InsufficientQuota
            | Reason::UpstreamRateLimited
            | Reason::RateLimitExceeded
            | Reason::BudgetExceeded => 429,
            Reason::UpstreamError => 502,
            Reason::QuotaBackendUnavailable => 503,
            Reason::UpstreamTimeout => 504,
        }
    }

    /// The stable machine-readable code (`error.code` in the OpenAI shape).
    pub fn code(self) -> &'static str {
        match self {
            Reason::MissingApiKey => "missing_api_key",
            Reason::InvalidApiKey => "invalid_api_key",
            Reason::KeyDisabled => "key_disabled",
            Reason::KeyExpired => "key_expired",
            Reason::IpNotAllowed => "ip_not_allowed",
            Reason::ModelRequired => "model_required",
            Reason::InvalidModel => "invalid_model",
            Reason::ModelNotAllowed => "model_not_allowed",
            Reason::ModelNotFound => "model_not_found",
            Reason::ModelNotPriced => "model_not_priced",
            Reason::InsufficientQuota => "insufficient_quota",
            Reason::QuotaBackendUnavailable => "quota_backend_unavailable",
            Reason::RequestTooLarge => "request_too_large",
            Reason::InvalidJson => "invalid_json",
            Reason::LengthRequired => "length_required",
            Reason::HeadersTooLarge => "request_header_fields_too_large",
            Reason::IncompleteBody => "incomplete_body",
            Reason::RequestTimeout => "request_timeout",
            Reason::UpstreamError => "upstream_error",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::UpstreamRateLimited => "upstream_rate_limited",
            Reason::AccountDisabled => "account_disabled",
            Reason::RateLimitExceeded => "rate_limit_exceeded",
            Reason::BudgetExceeded => "budget_exceeded",
        }
    }

    /// The default human-readable message.
    pub fn default_message(self) -> &'static str {
        match self {
            Reason::MissingApiKey => {
                "No API key provided. Send it as 'Authorization: Bearer sk-...'."
            }
            Reason::InvalidApiKey => "Incorrect API key provided.",
            Reason::KeyDisabled => "This API key has been disabled.",
            Reason::KeyExpired => "This API key has expired.",
            Reason::IpNotAllowed => "This API key may not be used from this IP address.",
            Reason::ModelRequired => "This endpoint needs a 'model'.",
            Reason::InvalidModel => "The 'model' field must be a model name string.",
            Reason::ModelNotAllowed => "This API key may not use this model.",
            Reason::ModelNotFound => "No upstream serves this model.",
            Reason::ModelNotPriced => "This model has no price on this gateway.",
            Reason::InsufficientQuota => "This API key has not enough quota left for this call.",
            Reason::QuotaBackendUnavailable => "The quota ledger is not available; try again.",
            Reason::RequestTooLarge => "The request body is larger than this gateway accepts.",
            Reason::InvalidJson => "The request body is not valid JSON.",
            Reason::LengthRequired => {
                "A chunked request body this large needs a Content-Length header."
            }
            Reason::IncompleteBody => "The request body ended before its announced length.",
            Reason::RequestTimeout => "The request was not received in time.",
            Reason::HeadersTooLarge => "The request head is too large.",
            Reason::UpstreamError => "The upstream service could not be reached.",
            Reason::UpstreamTimeout => "The upstream service did not answer in time.",
            Reason::UpstreamRateLimited => {
                "Every upstream for this model is rate limited; retry after the time in Retry-After."
            }
            Reason::AccountDisabled => "The account of this API key has been disabled.",
            Reason::RateLimitExceeded => "Rate limit reached for this API key.",
            Reason::BudgetExceeded => "The budget for the current period is spent.",
        }
    }

    fn openai_type(self) -> &'static str {
        match self {
            Reason::InsufficientQuota => "insufficient_quota",
            Reason::UpstreamRateLimited => "rate_limit_error",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::RateLimitExceeded => "requests",
            Reason::UpstreamError | Reason::UpstreamTimeout | Reason::QuotaBackendUnavailable => {
                "server_error"
            }
            Reason::IpNotAllowed | Reason::ModelNotAllowed | Reason::ModelNotPriced => {
                "permission_error"
            }
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            502 | 504 => "api_error",
            503 => "overloaded_error",
            _ => "invalid_request_error",
        }
    }

    fn google_status(self) -> &'static str {
        match self.status() {
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            429 => "RESOURCE_EXHAUSTED",
            502 | 503 => "UNAVAILABLE",
            408 | 504 => "DEADLINE_EXCEEDED",
            _ => "INVALID_ARGUMENT",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Which client family's error shape to answer in, chosen from the request path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ErrorShape {
    /// `{"error":{"message","type","param","code"}}`
    #[default]
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`
    Anthropic,
    /// `{"error":{"code","message","status"}}`
    Gemini,
}

impl ErrorShape {
    /// The shape a client on `path` expects: Anthropic on `/v1/messages`, Google on Gemini paths.
    pub fn for_path(path: &str) -> ErrorShape {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            ErrorShape::Anthropic
        } else if path.starts_with("/v1beta/")
            || (path.starts_with("/v1/models/") && path.contains(':'))
        {
            ErrorShape::Gemini
        } else {
            ErrorShape::OpenAi
        }
    }
}

/// A refusal: the reason plus a message for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// Why.
    pub reason: Reason,
    /// What the client is told.
    pub message: Cow<'static, str>,
    /// Seconds the client should wait (`Retry-After`), when waiting helps.
    pub retry_after: Option<u64>,
    /// The OpenAI `error.type` when it is not the reason's default (`tokens`, `concurrency`).
    pub kind: Option<&'static str>,
}

impl Denial {
    /// A denial with the reason's default message.
    pub fn new(reason: Reason) -> Self {
        Denial {
            reason,
            message: Cow::Borrowed(reason.default_message()),
            retry_after: None,
            kind: None,
        }
    }

    /// A denial with a specific message.
    pub fn with_message(reason: Reason, message: impl Into<Cow<'static, str>>) -> Self {
        Denial {
            reason,
            message: message.into(),
            retry_after: None,
            kind: None,
        }
    }

    /// The same denial with a `Retry-After` of `seconds`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The same denial with OpenAI `error.type` `kind`.
    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = Some(kind);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.reason.status()
    }

    /// The answer as one in-band event of a stream that already began, in the shape's stream
    /// format: OpenAI and Gemini `data: {"error":…}`, Anthropic `event: error`.
    pub fn stream_event(&self, shape: ErrorShape) -> Vec<u8> {
        let body = self.body(shape);
        let mut out = Vec::with_capacity(body.len() + 24);
        if shape == ErrorShape::Anthropic {
            out.extend_from_slice(b"event: error\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\n\n");
        out
    }

    /// The JSON body in the given shape.
    pub fn body(&self, shape: ErrorShape) -> Vec<u8> {
        let value = match shape {
            ErrorShape::OpenAi => serde_json::json!({
                "error": {
                    "message": self.message,
                    "type": self.kind.unwrap_or(self.reason.openai_type()),
                    "param": null,
                    "code": self.reason.code(),
                }
            }),
            ErrorShape::Anthropic => serde_json::json!({
                "type": "error",
                "error": {
                    "type": self.reason.anthropic_type(),
                    "message": self.message,
                    "code": self.reason.code(),
                }
            }),
            ErrorShape::Gemini => serde_json::json!({
                "error": {
                    "code": self.status(),
                    "message": self.message,
                    "status": self.reason.google_status(),
                    "details": [{
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": self.reason.code(),
                        "domain": "keygate",
                    }],
                }
            }),
        };
        // Serializing a `Value` built from strings and integers cannot fail.
        serde_json::to_vec(&value).unwrap_or_default()
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status(),
            self.reason.code(),
            self.message
        )
    }
}

impl From<Reason> for Denial {
    fn from(reason: Reason) -> Self {
        Denial::new(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_has_code_type_and_null_param() {
        let body = Denial::new(Reason::InvalidApiKey).body(ErrorShape::OpenAi);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn anthropic_and_gemini_shapes() {
        let d = Denial::new(Reason::KeyExpired);
        let a: serde_json::Value = serde_json::from_slice(&d.body(ErrorShape::Anthropic)).unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "authentication_error");
        let g: serde_json::Value = serde_json::from_slice(&d.body(ErrorShape::Gemini)).unwrap();
        assert_eq!(g["error"]["code"], 401);
        assert_eq!(g["error"]["status"], "UNAUTHENTICATED");
    }

    #[test]
    fn a_stream_error_event_in_each_shape() {
        let d = Denial::new(Reason::UpstreamError);
        let o = String::from_utf8(d.stream_event(ErrorShape::OpenAi)).unwrap();
        assert!(
            o.starts_with("data: {\"error\":") && o.ends_with("\n\n"),
            "{o}"
        );
        let a = String::from_utf8(d.stream_event(ErrorShape::Anthropic)).unwrap();
        assert!(
            a.starts_with("event: error\ndata: {") && a.contains("\"type\":\"error\""),
            "{a}"
        );
        let g = String::from_utf8(d.stream_event(ErrorShape::Gemini)).unwrap();
        assert!(g.starts_with("data: {\"error\":{\"code\":502"), "{g}");
    }

    #[test]
    fn upstream_rate_limited_is_a_429_in_every_shape() {
        let d = Denial::new(Reason::UpstreamRateLimited);
        assert_eq!(d.status(), 429);
        let o: serde_json::Value = serde_json::from_slice(&d.body(ErrorShape::OpenAi)).unwrap();
        assert_eq!(o["error"]["code"], "upstream_rate_limited");
        let a: serde_json::Value = serde_json::from_slice(&d.body(ErrorShape::Anthropic)).unwrap();
        assert_eq!(a["error"]["type"], "rate_limit_error");
        let g: serde_json::Value = serde_json::from_slice(&d.body(ErrorShape::Gemini)).unwrap();
        assert_eq!(g["error"]["status"], "RESOURCE_EXHAUSTED");
    }

    #[test]
    fn shape_follows_the_path() {
        assert_eq!(ErrorShape::for_path("/v1/messages"), ErrorShape::Anthropic);
        assert_eq!(
            ErrorShape::for_path("/v1beta/models/gemini-pro:generateContent"),
            ErrorShape::Gemini
        );
        assert_eq!(
            ErrorShape::for_path("/v1/chat/completions"),
            ErrorShape::OpenAi
        );
    }
}
