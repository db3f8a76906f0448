//! What the generated client cannot know from the spec: ACS's headers, and error bodies that are
//! not JSON.

use bytes::{Bytes, BytesMut};
use progenitor_client::{ClientHooks, ClientInfo, Error, OperationInfo};
use reqwest::header::{self, HeaderName, HeaderValue};
use secrecy::ExposeSecret;

use crate::generated::Client;
use crate::observe::{self, Operation, RequestMeter};
use crate::{ClientContext, types};

/// The content type ACS documents for every request.
pub(crate) const ACS_CONTENT_TYPE: &str = "application/json;charset=utf-8";

/// Progenitor sends the spec's `info.version` in this header on its own; ACS documents no
/// version header, so it is removed rather than sent to a gateway that may one day reject it.
const PROGENITOR_API_VERSION_HEADER: &str = "api-version";

/// An error body is read only up to this size: enough for any JSON error ACS sends, small
/// enough that a proxy's error page cannot make us buffer megabytes.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Marks errors raised by [`ClientHooks::pre`] when the token source fails. Progenitor carries
/// hook errors as `Error::Custom(String)`; this prefix lets [`crate::Failure::classify`] tell
/// them apart without parsing free text.
pub(crate) const TOKEN_ERROR_PREFIX: &str = "token source: ";

impl ClientHooks<ClientContext> for Client {
    async fn pre<E>(
        &self,
        request: &mut reqwest::Request,
        _info: &OperationInfo,
    ) -> Result<(), Error<E>> {
        let context = self.inner();
        let token = context
            .tokens
            .access_token()
            .await
            .map_err(|e| Error::Custom(format!("{TOKEN_ERROR_PREFIX}{}", e.reason())))?;

        let headers = request.headers_mut();
        headers.remove(PROGENITOR_API_VERSION_HEADER);
        headers.insert(
            header::AUTHORIZATION,
            sensitive_header(&format!("Bearer {}", token.expose()), "access token")
                .map_err(Error::InvalidRequest)?,
        );
        headers.insert(
            HeaderName::from_static("x-api-key"),
            sensitive_header(context.api_key.expose_secret(), "API key")
                .map_err(Error::InvalidRequest)?,
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(ACS_CONTENT_TYPE),
        );
        Ok(())
    }

    async fn exec(
        &self,
        request: reqwest::Request,
        info: &OperationInfo,
    ) -> reqwest::Result<reqwest::Response> {
        let mut request = request;
        let operation = Operation::of(info.operation_id);
        let span = observe::request_span(operation, &mut request);
        // The span is not entered around the send: nothing inside reqwest makes spans the
        // application exports, and entering on every poll is paid per request. It ends when
        // the meter does, at the answer's head.
        let meter = RequestMeter::start(operation, span);
        let response = match self.client().execute(request).await {
            Ok(response) => response,
            Err(error) => {
                meter.failed(&error);
                return Err(error);
            }
        };
        let status = response.status();
        meter.answered(status);
        tracing::debug!(
            operation = info.operation_id,
            status = status.as_u16(),
            "ACS answered"
        );
        if status.is_success() {
            return Ok(response);
        }
        normalize_error_body(response).await
    }
}

/// A header value that `Debug` output and HTTP/2 header compression treat as secret. The error
/// names what was wrong, never the value.
fn sensitive_header(value: &str, what: &str) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| format!("the {what} is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Makes every error response parse as [`types::AcsError`], so that progenitor reports it as
/// `Error::ErrorResponse` with its HTTP status.
///
/// Left alone, a body that is not an ACS error (an HTML 502 from a proxy, an empty 401) makes
/// progenitor answer `InvalidResponsePayload`, which has no status: a transient 502 would then
/// be indistinguishable from a garbled success. Such a body is replaced by an ACS-shaped error
/// that says what arrived (its type and size), never what it said: it may quote personal data.
async fn normalize_error_body(response: reqwest::Response) -> reqwest::Result<reqwest::Response> {
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let (body, truncated) = read_bounded(response).await?;

    let body = if !truncated && serde_json::from_slice::<types::AcsError>(&body).is_ok() {
        body
    } else {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type");
        let size = if truncated {
            format!("over {MAX_ERROR_BODY_BYTES} bytes")
        } else {
            format!("{} bytes", body.len())
        };
        let replacement = types::AcsError {
            message: Some(format!(
                "HTTP {status} with a body that is not an ACS error ({content_type}, {size})"
            )),
            ..Default::default()
        };
        Bytes::from(serde_json::to_vec(&replacement).unwrap_or_default())
    };

    let mut rebuilt = http::Response::new(body);
    *rebuilt.status_mut() = status;
    *rebuilt.version_mut() = version;
    *rebuilt.headers_mut() = headers;
    // The body changed length (or encoding): the old framing headers would lie about it.
    rebuilt.headers_mut().remove(header::CONTENT_LENGTH);
    rebuilt.headers_mut().remove(header::TRANSFER_ENCODING);
    rebuilt.headers_mut().remove(header::CONTENT_ENCODING);
    Ok(reqwest::Response::from(rebuilt))
}

/// Reads at most [`MAX_ERROR_BODY_BYTES`] of a body; says whether more was left unread.
async fn read_bounded(mut response: reqwest::Response) -> reqwest::Result<(Bytes, bool)> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ERROR_BODY_BYTES {
            return Ok((body.freeze(), true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), false))
}
