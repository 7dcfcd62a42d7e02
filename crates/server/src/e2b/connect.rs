//! The Connect RPC protocol (connectrpc.com), JSON codec only, as E2B's envd
//! speaks it: unary calls are a JSON body in and out (`application/json`);
//! server-streaming and client-streaming calls exchange *envelopes* (one flag
//! byte, a big-endian u32 length, the JSON message) under
//! `application/connect+json`, the response ending with an end-of-stream
//! envelope (flag `0x02`) that carries the error, if any. Errors of unary calls
//! are `{"code": "not_found", "message": …}` with the code's HTTP status.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

/// Largest message accepted in one envelope or unary body.
const MAX_MESSAGE: usize = 32 << 20;
const END_STREAM: u8 = 0x02;
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";

/// A Connect error: a code of the protocol and a message.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: &'static str,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &'static str, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> RpcError {
        RpcError::new("invalid_argument", message)
    }
    pub fn not_found(message: impl Into<String>) -> RpcError {
        RpcError::new("not_found", message)
    }
    pub fn internal() -> RpcError {
        RpcError::new("internal", "internal error")
    }
    pub fn unimplemented(what: &str) -> RpcError {
        RpcError::new(
            "unimplemented",
            format!("{what} is not supported by sandgate"),
        )
    }

    /// The HTTP status of a unary error with this code (the protocol's table).
    fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> serde_json::Value {
        json!({"code": self.code, "message": self.message})
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            self.body().to_string(),
        )
            .into_response()
    }
}

/// The message of a unary call.
pub fn unary_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| RpcError::invalid(format!("invalid request: {e}")))
}

/// The answer of a unary call.
pub fn unary_response<T: Serialize>(message: &T) -> Response {
    match serde_json::to_vec(message) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => RpcError::internal().into_response(),
    }
}

/// Splits a streaming request body into its envelopes' messages.
pub fn envelopes(mut body: &[u8]) -> Result<Vec<&[u8]>, RpcError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let (message, rest) = one_envelope(body)?;
        if let Some(m) = message {
            out.push(m);
        }
        body = rest;
    }
    Ok(out)
}

/// The first envelope of `buf`: its message (`None` for an end-of-stream
/// envelope) and the rest; an error when it is cut short or too large.
fn one_envelope(buf: &[u8]) -> Result<(Option<&[u8]>, &[u8]), RpcError> {
    if buf.len() < 5 {
        return Err(RpcError::invalid("a message envelope is cut short"));
    }
    let flags = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(RpcError::new("resource_exhausted", "message too large"));
    }
    if flags & 0x01 != 0 {
        return Err(RpcError::invalid("compressed messages are not accepted"));
    }
    let end = 5 + len;
    if buf.len() < end {
        return Err(RpcError::invalid("a message envelope is cut short"));
    }
    let message = (flags & END_STREAM == 0).then_some(&buf[5..end]);
    Ok((message, &buf[end..]))
}

/// Reads envelopes from a streaming request body as they arrive.
#[derive(Debug)]
pub struct EnvelopeReader {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
}

impl EnvelopeReader {
    pub fn new(body: Body) -> EnvelopeReader {
        EnvelopeReader {
            body: body.into_data_stream(),
            buf: Vec::new(),
        }
    }

    /// The next message; `None` at the end of the body.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, RpcError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(RpcError::new("resource_exhausted", "message too large"));
                }
                if self.buf.len() >= 5 + len {
                    let (message, _) = one_envelope(&self.buf)?;
                    let parsed = match message {
                        Some(m) => Some(
                            serde_json::from_slice(m)
                                .map_err(|e| RpcError::invalid(format!("invalid message: {e}")))?,
                        ),
                        None => None,
                    };
                    self.buf.drain(..5 + len);
                    match parsed {
                        Some(p) => return Ok(Some(p)),
                        None => continue,
                    }
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) => return Err(RpcError::new("canceled", "the request body ended")),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(RpcError::invalid("a message envelope is cut short")),
            }
        }
    }
}

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// One message of a stream, in its envelope.
pub fn message_envelope<T: Serialize>(message: &T) -> Bytes {
    envelope(
        0,
        &serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

/// The end of a stream: success, or the error that ended it.
pub fn end_envelope(error: Option<&RpcError>) -> Bytes {
    let end = match error {
        None => json!({}),
        Some(e) => json!({"error": e.body()}),
    };
    envelope(END_STREAM, end.to_string().as_bytes())
}

/// A streaming answer: whatever `messages` yields (already enveloped), sent as
/// it comes; the producer sends [`end_envelope`] last.
pub fn stream_response(messages: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(messages, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    (
        [(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A streaming call answered with only its end (an error before any message).
pub fn stream_error(error: &RpcError) -> Response {
    (
        [(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)],
        Body::from(end_envelope(Some(error))),
    )
        .into_response()
}

/// `Connect-Timeout-Ms`, when the client set a deadline.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// `Keepalive-Ping-Interval` (seconds): how often an idle stream sends a
/// keepalive message (envd's extension); at least 1 s, at most 5 minutes.
pub fn keepalive(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.clamp(1, 300)))
}

/// Whether a streaming call's content type is the one spoken here.
pub fn is_streaming_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim() == STREAM_CONTENT_TYPE)
}

/// Whether a unary call's content type is JSON.
pub fn is_unary_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.split(';').next().unwrap_or("").trim() == "application/json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_refuse_short_ones() {
        let mut body = message_envelope(&json!({"a": 1})).to_vec();
        body.extend_from_slice(&message_envelope(&json!({"b": 2})));
        body.extend_from_slice(&end_envelope(None));
        let messages = envelopes(&body).expect("parses");
        assert_eq!(messages, [&br#"{"a":1}"#[..], &br#"{"b":2}"#[..]]);
        assert!(envelopes(&body[..body.len() - 1]).is_err());
        assert!(envelopes(&[0, 0, 0]).is_err());
        let end = end_envelope(Some(&RpcError::not_found("no such process")));
        assert_eq!(end[0], END_STREAM);
        let text: serde_json::Value = serde_json::from_slice(&end[5..]).expect("json");
        assert_eq!(text["error"]["code"], "not_found");
    }
}
