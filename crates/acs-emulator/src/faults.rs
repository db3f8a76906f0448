//! Failures a test (or `ccpa-gateway emulator --fail-...`) can make the emulator produce: one at a
//! time from a queue ([`Fault`]), or at random rates with added latency ([`FaultSettings`]).

use std::time::Duration;

/// One failure to inject. Queued faults are taken in order, one per incoming request, before
/// the request is authenticated (as a proxy in front of ACS would fail); the `*Body` faults let
/// the request be handled, then spoil the answer.
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
    /// The request is not handled.
    BreakAfterHeaders,
    /// Handle the request (its change is applied), then send the headers and hold the body for
    /// this long before sending it.
    StallBody(Duration),
    /// Handle the request, then send only the first half of the JSON answer (a complete HTTP
    /// message whose body does not parse).
    TruncateBody,
    /// Handle the request, then answer `200` with a body that is not JSON.
    MalformedBody,
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

    /// ACS's gateway when overloaded: 429 with `Retry-After` in seconds.
    pub fn too_many_requests(retry_after: Duration) -> Self {
        Self::json(
            429,
            serde_json::json!({"error_code": "429050", "message": "Too many requests"}),
        )
        .with_header("Retry-After", &retry_after.as_secs().to_string())
    }

    /// Adds a header to a [`Fault::Respond`]; other faults are returned unchanged.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Respond { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}

/// Latency and random failures applied to every profile request (not to the IMS token
/// endpoint). Rates are probabilities between 0 and 1; their sum should not exceed 1. A request
/// with a queued [`Fault`] gets that fault instead of a random one.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSettings {
    /// Added to every answer.
    pub latency: Duration,
    /// A random extra delay between zero and this, on top of `latency`.
    pub latency_jitter: Duration,
    /// Rate of 429 answers carrying `Retry-After`.
    pub too_many_requests: f64,
    /// The `Retry-After` of those 429 answers.
    pub retry_after: Duration,
    /// Rate of 500 answers (a JSON ACS error).
    pub internal_error: f64,
    /// Rate of 502 answers with an HTML body.
    pub bad_gateway: f64,
    /// Rate of 503 answers.
    pub unavailable: f64,
    /// Rate of connections broken after the headers ([`Fault::BreakAfterHeaders`]).
    pub reset: f64,
    /// Rate of answers whose body stalls ([`Fault::StallBody`]) for `stall_for`.
    pub stall: f64,
    /// How long a stalled body is held.
    pub stall_for: Duration,
    /// Rate of truncated JSON answers ([`Fault::TruncateBody`]).
    pub truncated: f64,
    /// Rate of answers that are not JSON at all ([`Fault::MalformedBody`]).
    pub malformed: f64,
}

impl Default for FaultSettings {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            too_many_requests: 0.0,
            retry_after: Duration::from_secs(1),
            internal_error: 0.0,
            bad_gateway: 0.0,
            unavailable: 0.0,
            reset: 0.0,
            stall: 0.0,
            stall_for: Duration::from_secs(30),
            truncated: 0.0,
            malformed: 0.0,
        }
    }
}

impl FaultSettings {
    /// The delay to add to one answer.
    pub(crate) fn delay(&self) -> Duration {
        if self.latency_jitter.is_zero() {
            return self.latency;
        }
        self.latency + self.latency_jitter.mul_f64(rand::random::<f64>())
    }

    /// Draws the fault for one request, if any.
    pub(crate) fn draw(&self) -> Option<Fault> {
        let roll: f64 = rand::random();
        let choices = [
            (
                self.too_many_requests,
                Fault::too_many_requests(self.retry_after),
            ),
            (
                self.internal_error,
                Fault::json(
                    500,
                    serde_json::json!({"code": 500, "message": "Oops. Something went wrong."}),
                ),
            ),
            (self.bad_gateway, Fault::html(502)),
            (self.unavailable, Fault::html(503)),
            (self.reset, Fault::BreakAfterHeaders),
            (self.stall, Fault::StallBody(self.stall_for)),
            (self.truncated, Fault::TruncateBody),
            (self.malformed, Fault::MalformedBody),
        ];
        let mut threshold = 0.0;
        for (rate, fault) in choices {
            threshold += rate;
            if roll < threshold {
                return Some(fault);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_honoured_roughly() {
        let settings = FaultSettings {
            bad_gateway: 0.25,
            unavailable: 0.25,
            ..Default::default()
        };
        let faults = (0..10_000).filter_map(|_| settings.draw()).count();
        assert!((4_500..5_500).contains(&faults), "{faults} of 10000");
        assert_eq!(FaultSettings::default().draw(), None);
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let settings = FaultSettings {
            latency: Duration::from_millis(10),
            latency_jitter: Duration::from_millis(5),
            ..Default::default()
        };
        for _ in 0..1000 {
            let delay = settings.delay();
            assert!(delay >= Duration::from_millis(10) && delay <= Duration::from_millis(15));
        }
    }
}
