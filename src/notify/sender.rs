//! One attempt to deliver one notification: a signed POST, and what its answer means.
//!
//! The sender decides nothing about retries beyond classing the answer: the delivery loop owns
//! back-off, rates and giving up. What it never does is follow a redirect (the recipient named
//! where its notifications go; a 3xx could send a consumer's request elsewhere), read more than
//! [`MAX_RESPONSE_BYTES`] of an answer, or put a URL's path or query, or a body, in an error or
//! a log line (a recipient may take a token there).

use std::time::{Duration, SystemTime};

use reqwest::header::{self, HeaderMap, HeaderValue};
use url::Url;

use super::event::CONTENT_TYPE;
use super::signing::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};

/// The most of a response body that is read. It is read at all only so that the connection
/// can serve the next notification; past this, the connection is dropped instead.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The `user-agent` of every notification.
pub const USER_AGENT: &str = concat!("ccpa-gateway/", env!("CARGO_PKG_VERSION"));

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The recipient took it (2xx).
    Delivered {
        /// The status it answered.
        status: u16,
    },
    /// Worth trying again: 408, 429, 5xx, a timeout or a failed connection.
    Retry {
        /// Why, for the ledger and the metrics: `http_<status>`, `timeout` or `connection`.
        class: String,
        /// How long the recipient asked to be left alone (`Retry-After`), if it said.
        retry_after: Option<Duration>,
    },
    /// Refused for good: any other status (3xx included, since redirects are not followed).
    Rejected {
        /// Why: `http_<status>`, or `invalid_request` when the message's own headers could not
        /// be sent.
        class: String,
    },
}

impl Answer {
    /// The failure's class, if the attempt failed.
    pub fn failure_class(&self) -> Option<&str> {
        match self {
            Answer::Delivered { .. } => None,
            Answer::Retry { class, .. } | Answer::Rejected { class } => Some(class),
        }
    }
}

/// Sends notifications. Built once: it holds a connection pool, shared by every recipient.
#[derive(Clone)]
pub struct Sender {
    http: reqwest::Client,
}

impl Sender {
    /// A sender whose every attempt, from connecting to the end of the answer's headers and
    /// what is read of its body, takes at most `timeout`.
    ///
    /// TLS is reqwest's default, rustls (with aws-lc-rs) verifying against the platform's
    /// roots; proxies named in the environment (`HTTPS_PROXY`, `NO_PROXY`) are used.
    pub fn new(timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| format!("cannot build the notification HTTP client: {e}"))?;
        Ok(Self { http })
    }

    /// POSTs one signed notification to `url` and classes the answer.
    pub async fn send(
        &self,
        url: &Url,
        msg_id: &str,
        timestamp_s: i64,
        signature: &str,
        body: Vec<u8>,
    ) -> Answer {
        let Some(headers) = headers(msg_id, timestamp_s, signature) else {
            return Answer::Rejected {
                class: "invalid_request".into(),
            };
        };
        let response = match self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => return failed(url, &error),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| retry_after(value, SystemTime::now()));
        drain(response).await;
        classify(status.as_u16(), retry_after)
    }
}

/// The message's headers; `None` when one cannot be a header value (a caller's bug: the id,
/// timestamp and signature the gateway makes are ASCII).
fn headers(msg_id: &str, timestamp_s: i64, signature: &str) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    headers.insert(WEBHOOK_ID, HeaderValue::from_str(msg_id).ok()?);
    headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp_s));
    headers.insert(WEBHOOK_SIGNATURE, HeaderValue::from_str(signature).ok()?);
    Some(headers)
}

/// What a status means for the notification.
fn classify(status: u16, retry_after: Option<Duration>) -> Answer {
    match status {
        200..=299 => Answer::Delivered { status },
        408 | 429 | 500..=599 => Answer::Retry {
            class: format!("http_{status}"),
            retry_after,
        },
        _ => Answer::Rejected {
            class: format!("http_{status}"),
        },
    }
}

/// A request that got no answer: a timeout, or (whatever else failed on the way: DNS, TCP,
/// TLS, a connection closed before the answer) a connection failure. Both are retried.
fn failed(url: &Url, error: &reqwest::Error) -> Answer {
    if error.is_timeout() {
        return Answer::Retry {
            class: "timeout".into(),
            retry_after: None,
        };
    }
    // The cause is what tells an operator a certificate from a refused port; reqwest's own
    // message would quote the whole URL, so it is left out, and the host alone named.
    let mut causes = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push_str(": ");
        causes.push_str(&cause.to_string());
        source = cause.source();
    }
    tracing::warn!(
        host = url.host_str().unwrap_or_default(),
        error = %causes.trim_start_matches(": "),
        "a notification got no answer"
    );
    Answer::Retry {
        class: "connection".into(),
        retry_after: None,
    }
}

/// Reads what is left of the answer, up to [`MAX_RESPONSE_BYTES`], so that a connection that
/// ends its answer can be used again; the rest is never read. What it holds does not matter:
/// the status decides, and a failure reading it changes nothing.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0usize;
    while read <= MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => return,
        }
    }
    // Dropping an answer before its end closes its connection.
}

/// A `Retry-After` value as a wait from `now`: a number of seconds, or an HTTP date (one in the
/// past is no wait). `None` when it is neither.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // A number too big for u64 is as good as forever.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classed() {
        for status in [200, 201, 202, 204, 299] {
            assert_eq!(classify(status, None), Answer::Delivered { status });
        }
        for status in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(
                classify(status, Some(Duration::from_secs(3))),
                Answer::Retry {
                    class: format!("http_{status}"),
                    retry_after: Some(Duration::from_secs(3)),
                }
            );
        }
        for status in [
            100, 301, 302, 304, 307, 308, 400, 401, 403, 404, 409, 410, 413, 422,
        ] {
            assert_eq!(
                classify(status, Some(Duration::from_secs(3))),
                Answer::Rejected {
                    class: format!("http_{status}"),
                }
            );
        }
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(120)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(120));
        assert_eq!(retry_after(&earlier, now), Some(Duration::ZERO));
        for nonsense in ["", "-1", "1.5", "soon", "7s"] {
            assert_eq!(retry_after(nonsense, now), None, "{nonsense:?}");
        }
    }

    #[test]
    fn headers_that_cannot_be_sent_are_refused() {
        assert!(headers("msg_1", 1, "v1,abc").is_some());
        assert!(headers("msg_\n1", 1, "v1,abc").is_none());
        assert!(headers("msg_1", 1, "v1,\r\nx").is_none());
    }

    #[test]
    fn the_user_agent_names_the_version() {
        assert_eq!(
            USER_AGENT,
            format!("ccpa-gateway/{}", env!("CARGO_PKG_VERSION"))
        );
    }
}
