//! Failures a test can make the emulator produce, one request at a time.

use std::time::Duration;

/// One failure to inject. Queued faults are taken in order, one per incoming request, before
/// the request is authenticated or handled (as a proxy in front of ACS would fail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this instead of handling the request; the profiles are left untouched.
    Respond {
        /// The HTTP status.
        status: u16,
        /// The `Content-Type` header, if any.
        content_type: Option<String>,
        /// The body, sent as is.
        body: String,
        /// Extra headers, such as `Retry-After`.
        headers: Vec<(String, String)>,
    },
    /// Wait this long, then handle the request normally.
    Delay(Duration),
    /// Send the status line and headers of a 200, then break the connection before any body.
    BreakAfterHeaders,
}

impl Fault {
    /// A JSON error body with the given status, as ACS or its gateway sends it.
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self::Respond {
            status,
            content_type: Some("application/json;charset=utf-8".into()),
            body: body.to_string(),
            headers: Vec::new(),
        }
    }

    /// An answer with no body at all, such as the empty 401 some proxies send.
    pub fn empty(status: u16) -> Self {
        Self::Respond {
            status,
            content_type: None,
            body: String::new(),
            headers: Vec::new(),
        }
    }

    /// An HTML error page, as a load balancer in front of ACS sends with a 502 or 503.
    pub fn html(status: u16) -> Self {
        Self::Respond {
            status,
            content_type: Some("text/html".into()),
            body: format!(
                "<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>"
            ),
            headers: Vec::new(),
        }
    }

    /// Adds a header to a [`Fault::Respond`]; other faults are returned unchanged.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Respond { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}
