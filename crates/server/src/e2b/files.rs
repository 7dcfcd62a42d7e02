//! envd's `/files`: `GET` streams a file out of the sandbox (gzip when the
//! client accepts it), `POST` writes one or several files, from a raw body
//! (`application/octet-stream`, `?path=`) or a multipart form (parts named
//! `file`, each with its path in its filename unless `?path=` is given),
//! either possibly `Content-Encoding: gzip`; the answer lists what was
//! written as `[{path, name, type}]`.
//!
//! Nothing is held whole in memory: bytes move between the connection and the
//! sandbox's file in chunks, through a blocking thread. A request body, after
//! gzip decoding, is at most the server's body limit (413 past it, and the
//! target file left as it was); a full sandbox disk is a 507. Errors carry
//! envd's `{"code", "message"}` (see [`super::e2b_error_shape`]).

use std::io::{self, Read, Write};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use sandgate_core::sandboxes::SandboxError;
use sandgate_core::sandboxes::files::{Download, FsError, Upload, check_username, envd_path};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::SandboxId;
use crate::error::ApiError;
use crate::extract::{ApiQuery, Caller};
use crate::state::AppState;

/// Bytes moved at a time.
const CHUNK: usize = 64 << 10;

/// `?path=&username=` (envd's signing parameters are not used: the access
/// token is required).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
}

/// One written file, as envd lists it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WrittenFile {
    pub path: String,
    pub name: String,
    /// Always `file`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl WrittenFile {
    fn at(path: String) -> WrittenFile {
        let name = path.rsplit('/').next().unwrap_or_default().to_owned();
        WrittenFile {
            path,
            name,
            kind: "file",
        }
    }
}

fn api_error(e: FsError, id: &str) -> ApiError {
    match e {
        FsError::NotFound(m) => ApiError::not_found_because(m),
        FsError::AlreadyExists(m) => ApiError::conflict(m),
        FsError::Invalid(m) | FsError::Denied(m) => ApiError::invalid("path", m),
        FsError::NoSpace(m) => ApiError::insufficient_storage(m),
        FsError::TooLarge(m) => ApiError::payload_too_large_because(m),
        FsError::UnknownUser(_) => ApiError::unauthorized(e.to_string()),
        FsError::Sandbox(SandboxError::NotFound) => ApiError::sandbox_not_running(id),
        other => ApiError::internal(other),
    }
}

/// A body that failed to arrive whole: over the limit, cut, or not gzip.
fn body_error(e: &io::Error, limit: u64) -> ApiError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        ApiError::payload_too_large_because(format!(
            "the request body is over the limit of {limit} bytes"
        ))
    } else {
        ApiError::bad_request(format!("the request body could not be read: {e}"))
    }
}

fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::FileTooLarge, "over the body limit")
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Whether to answer in gzip, as envd decides: the client's codings by
/// quality, the first acceptable of `gzip` and `identity` wins (`*` stands for
/// identity unless identity is refused).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut codings: Vec<(String, f32)> = header_str(headers, header::ACCEPT_ENCODING)
        .split(',')
        .filter(|c| !c.trim().is_empty())
        .map(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            (name, q)
        })
        .collect();
    codings.sort_by(|a, b| b.1.total_cmp(&a.1));
    let identity_refused = codings.iter().any(|(n, q)| n == "identity" && *q == 0.0);
    for (name, q) in &codings {
        match name.as_str() {
            _ if *q == 0.0 => {}
            "gzip" => return true,
            "identity" => return false,
            "*" => return identity_refused,
            _ => {}
        }
    }
    false
}

/// `GET /files?path=`: the file's bytes.
pub async fn download(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    ApiQuery(q): ApiQuery<FilesQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_username(q.username.as_deref()).map_err(|e| api_error(e, &id))?;
    let path = q.path.unwrap_or_default();
    let file = state.sandboxes().open_download(&caller, &id, &path).await;
    let file = file.map_err(|e| api_error(e, &id))?;
    Ok(file_response(file, accepts_gzip(&headers)))
}

/// Streams `file` (its size when opened, no more), read on a blocking thread.
fn file_response(file: Download, gzip: bool) -> Response {
    let size = file.size;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || send_file(file, gzip, &tx));
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    } else {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    response
}

fn send_file(mut file: Download, gzip: bool, tx: &mpsc::Sender<io::Result<Bytes>>) {
    let mut left = file.size;
    let mut buf = vec![0u8; CHUNK];
    let mut encoder =
        gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match file.file.read(&mut buf[..want]) {
            Ok(0) => {
                // Shorter than when it was opened: the answer is cut.
                let _ = tx.blocking_send(Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(path = %file.path, error = %e, "reading a file to send failed");
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        left -= n as u64;
        let chunk = match encoder.as_mut() {
            None => Bytes::copy_from_slice(&buf[..n]),
            Some(enc) => {
                if let Err(e) = enc.write_all(&buf[..n]) {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
                Bytes::from(std::mem::take(enc.get_mut()))
            }
        };
        if !chunk.is_empty() && tx.blocking_send(Ok(chunk)).is_err() {
            return; // the client went away
        }
    }
    if let Some(enc) = encoder {
        let _ = tx.blocking_send(enc.finish().map(Bytes::from));
    }
}

/// `POST /files`: writes the body's file(s); what was written.
pub async fn upload(
    State(state): State<AppState>,
    Caller(caller): Caller,
    SandboxId(id): SandboxId,
    ApiQuery(q): ApiQuery<FilesQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Vec<WrittenFile>>, ApiError> {
    let limit = state.config().max_body_bytes as u64;
    // Read from here on, whatever the answer (see `limited`).
    let bytes = limited(body, limit);
    check_username(q.username.as_deref()).map_err(|e| api_error(e, &id))?;
    let bytes = decoded(bytes, &headers, limit)?;
    let target = Target {
        state: &state,
        caller: &caller,
        id: &id,
        limit,
    };
    let content_type = header_str(&headers, header::CONTENT_TYPE);
    Ok(Json(target.write(bytes, content_type, q.path).await?))
}

/// The body as its `Content-Encoding` says (gzip or none), refused at once
/// when its declared length is over the limit.
fn decoded(
    bytes: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    headers: &HeaderMap,
    limit: u64,
) -> Result<BoxStream<'static, io::Result<Bytes>>, ApiError> {
    let declared = header_str(headers, header::CONTENT_LENGTH).parse::<u64>();
    if declared.is_ok_and(|n| n > limit) {
        return Err(body_error(&too_large(), limit));
    }
    match header_str(headers, header::CONTENT_ENCODING).trim() {
        "" | "identity" => Ok(bytes.boxed()),
        e if e.eq_ignore_ascii_case("gzip") => Ok(gunzip(bytes, limit).boxed()),
        other => Err(ApiError::bad_request(format!(
            "unsupported Content-Encoding `{other}` (gzip or none)"
        ))),
    }
}

/// Where an upload goes.
struct Target<'a> {
    state: &'a AppState,
    caller: &'a sandgate_core::principal::Principal,
    id: &'a str,
    limit: u64,
}

impl Target<'_> {
    /// A multipart form's files, or the raw body as `path`.
    async fn write(
        &self,
        bytes: BoxStream<'static, io::Result<Bytes>>,
        content_type: &str,
        path: Option<String>,
    ) -> Result<Vec<WrittenFile>, ApiError> {
        if let Ok(boundary) = multer::parse_boundary(content_type) {
            return self.multipart(bytes, boundary, path).await;
        }
        let Some(path) = path.filter(|p| !p.is_empty()) else {
            return Err(ApiError::invalid(
                "path",
                "name the file to write in ?path=",
            ));
        };
        Ok(vec![self.one(&path, bytes).await?])
    }

    /// Writes `path` from `bytes`.
    async fn one<S, E>(&self, path: &str, bytes: S) -> Result<WrittenFile, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: Into<io::Error>,
    {
        let upload = self
            .state
            .sandboxes()
            .start_upload(self.caller, self.id, path, self.limit)
            .await
            .map_err(|e| api_error(e, self.id))?;
        write_all(upload, bytes, self.limit, self.id)
            .await
            .map(WrittenFile::at)
    }

    /// Writes every `file` part of a multipart body, in order.
    async fn multipart(
        &self,
        bytes: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
        boundary: String,
        path: Option<String>,
    ) -> Result<Vec<WrittenFile>, ApiError> {
        let mut form = multer::Multipart::new(bytes, boundary);
        let mut written: Vec<WrittenFile> = Vec::new();
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| multipart_error(e, self.limit))?
        {
            if field.name() != Some("file") {
                continue;
            }
            let named = match (&path, field.file_name()) {
                (Some(p), _) if !p.is_empty() => p.clone(),
                (_, Some(name)) if !name.is_empty() => form_unescaped(name),
                _ => {
                    return Err(ApiError::invalid(
                        "path",
                        "a file part names its path in its filename, or ?path= does",
                    ));
                }
            };
            let resolved = envd_path(&named).map_err(|e| api_error(e, self.id))?;
            if written.iter().any(|w| w.path == resolved) {
                return Err(ApiError::invalid(
                    "path",
                    format!(
                        "you cannot upload multiple files to the same path '{resolved}' in one upload request"
                    ),
                ));
            }
            let field = field.map(|chunk| chunk.map_err(multer_io));
            written.push(self.one(&named, field).await?);
        }
        if written.is_empty() {
            return Err(ApiError::bad_request("the form has no `file` part"));
        }
        Ok(written)
    }
}

/// A filename as HTML5 forms (and httpx) escape it: `"` as `%22`, `\` doubled.
fn form_unescaped(name: &str) -> String {
    name.replace("%22", "\"").replace("\\\\", "\\")
}

fn multer_io(e: multer::Error) -> io::Error {
    match e {
        multer::Error::StreamReadFailed(inner) => match inner.downcast::<io::Error>() {
            Ok(io) => *io,
            Err(other) => io::Error::other(other.to_string()),
        },
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

fn multipart_error(e: multer::Error, limit: u64) -> ApiError {
    body_error(&multer_io(e), limit)
}

/// Streams `bytes` into `upload` on a blocking thread, then puts the file in
/// place; a body that fails or overflows leaves the target as it was.
async fn write_all<S, E>(
    upload: Upload,
    mut bytes: S,
    limit: u64,
    id: &str,
) -> Result<String, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<io::Error>,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = upload;
        while let Some(chunk) = rx.blocking_recv() {
            upload.write(&chunk)?;
        }
        Ok::<_, FsError>(upload)
    });
    let mut cut = None;
    while let Some(chunk) = bytes.next().await {
        match chunk {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed: its error says why
                }
            }
            Err(e) => {
                cut = Some(e.into());
                break;
            }
        }
    }
    drop(tx);
    let upload = writer
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| api_error(e, id))?;
    match cut {
        Some(e) => {
            // Dropped off the async threads: the temporary file goes.
            tokio::task::spawn_blocking(move || drop(upload));
            Err(body_error(&e, limit))
        }
        None => tokio::task::spawn_blocking(move || upload.finish())
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| api_error(e, id)),
    }
}

/// How long a refused body is still read, and thrown away.
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// The body's bytes, failing once more than `limit` have come. When nobody
/// reads them any more (a refusal, or the limit), the rest of the body is
/// read and thrown away — up to `limit` bytes more, for 30 s at most — so that
/// a client still sending reads the answer instead of a reset connection.
fn limited(body: Body, limit: u64) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let mut body = body.into_data_stream();
        let mut seen = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(io::Error::other);
            seen += chunk.as_ref().map_or(0, |c| c.len() as u64);
            let item = if seen > limit {
                Err(too_large())
            } else {
                chunk
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                break;
            }
        }
        drop(tx);
        let drain = async {
            while let Some(Ok(chunk)) = body.next().await {
                seen += chunk.len() as u64;
                if seen > limit.saturating_mul(2) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
}

/// `input` gzip-decoded (one member or several), on a blocking thread, at
/// most `limit` bytes of it.
fn gunzip(
    input: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    limit: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (in_tx, in_rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let (out_tx, out_rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let mut input = std::pin::pin!(input);
        while let Some(chunk) = input.next().await {
            let failed = chunk.is_err();
            if in_tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    tokio::task::spawn_blocking(move || {
        let mut decoder = flate2::read::MultiGzDecoder::new(ChannelReader::new(in_rx));
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let out = match decoder.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    total += n as u64;
                    if total > limit {
                        Err(too_large())
                    } else {
                        Ok(Bytes::copy_from_slice(&buf[..n]))
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = out.is_err();
            if out_tx.blocking_send(out).is_err() || failed {
                return;
            }
        }
    });
    futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
}

/// `Read` over chunks arriving on a channel (blocking: a blocking thread's).
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> ChannelReader {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_taken_unless_refused() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        for (value, takes) in [
            ("gzip", true),
            ("gzip, deflate", true),
            ("br, GZIP;q=0.5", true),
            ("gzip;q=0", false),
            ("identity", false),
            ("identity, gzip;q=0.5", false),
            ("*", false),
            ("identity;q=0, *", true),
        ] {
            h.insert(header::ACCEPT_ENCODING, value.parse().unwrap());
            assert_eq!(accepts_gzip(&h), takes, "{value}");
        }
    }

    #[test]
    fn form_filenames_are_unescaped() {
        assert_eq!(
            form_unescaped("/home/user/a%22b\\\\c"),
            "/home/user/a\"b\\c"
        );
        assert_eq!(WrittenFile::at("/home/user/x.txt".into()).name, "x.txt");
    }
}
