//! A third party's webhook receiver on a real socket: it checks each delivery's signature with
//! the Standard Webhooks reference library (what receivers run), keeps what it received, and
//! answers as the test scripts it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// How the receiver answers a delivery.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, with a `Retry-After` header if given.
    Status(u16, Option<&'static str>),
    /// Never: the request hangs until the gateway gives up on it.
    Hang,
}

/// One delivery received.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `webhook-id`.
    pub id: String,
    /// `content-type`.
    pub content_type: String,
    /// The body, parsed.
    pub event: serde_json::Value,
    /// The raw body.
    pub body: String,
    /// Whether the reference library verified its signature.
    pub verified: bool,
    /// How many `v1,` signatures it carried.
    pub signatures: usize,
}

#[derive(Default)]
struct Script {
    next: VecDeque<Reply>,
    default: Option<Reply>,
    received: Vec<Delivery>,
}

/// A receiver listening on 127.0.0.1.
pub struct Receiver {
    pub addr: SocketAddr,
    /// Its secret, `whsec_…`.
    pub secret: String,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    secret: String,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    /// A receiver answering 204 unless told otherwise.
    pub async fn start() -> Self {
        use base64::Engine;
        let key: [u8; 32] = rand::random();
        let secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        );
        let script = Arc::new(Mutex::new(Script::default()));
        let shared = Shared {
            secret: secret.clone(),
            script: script.clone(),
        };
        let app = axum::Router::new().fallback(receive).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            secret,
            script,
            task,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/ccpa", self.addr)
    }

    /// Answers the next deliveries with `replies`, in order, then as before.
    pub fn answer_next(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().next.extend(replies);
    }

    /// Answers every delivery (after those scripted) with `reply`.
    pub fn answer_always(&self, reply: Reply) {
        self.script.lock().unwrap().default = Some(reply);
    }

    /// What it has received, in order.
    pub fn received(&self) -> Vec<Delivery> {
        self.script.lock().unwrap().received.clone()
    }

    /// Waits (up to [`PATIENCE`](super::PATIENCE)) until it has received `n` deliveries, and
    /// returns them all.
    pub async fn until_received(&self, n: usize) -> Vec<Delivery> {
        super::eventually(&format!("{n} deliveries"), || {
            let received = self.received();
            std::future::ready(if received.len() >= n {
                Ok(received)
            } else {
                Err(received)
            })
        })
        .await
    }

    /// Writes its secret to a file in `dir` and returns the path.
    pub fn secret_file(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.secret).unwrap();
        path
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let verified = standardwebhooks::Webhook::new(&shared.secret)
        .and_then(|webhook| webhook.verify(&body, &headers))
        .is_ok();
    let delivery = Delivery {
        id: header("webhook-id"),
        content_type: header("content-type"),
        event: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        body: String::from_utf8_lossy(&body).into_owned(),
        verified,
        signatures: header("webhook-signature")
            .split(' ')
            .filter(|s| s.starts_with("v1,"))
            .count(),
    };
    let reply = {
        let mut script = shared.script.lock().unwrap();
        script.received.push(delivery);
        script
            .next
            .pop_front()
            .or_else(|| script.default.clone())
            .unwrap_or(Reply::Status(204, None))
    };
    match reply {
        Reply::Status(status, retry_after) => {
            let mut response = StatusCode::from_u16(status).unwrap().into_response();
            if let Some(after) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from_static(after));
            }
            response
        }
        Reply::Hang => {
            std::future::pending::<()>().await;
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// One recipient of a recipients file.
pub struct RecipientSpec<'a> {
    pub id: &'a str,
    pub url: String,
    pub secret_file: PathBuf,
    pub events: &'a [&'a str],
    pub max_rps: u32,
}

/// Writes a recipients file of `recipients` at `path`.
pub fn write_recipients(path: &Path, recipients: &[RecipientSpec<'_>]) {
    let mut text = String::new();
    for r in recipients {
        text.push_str(&format!(
            "[[recipient]]\nid = {:?}\nurl = {:?}\nsecret_file = {:?}\nevents = {:?}\nmax_rps = {}\n\n",
            r.id,
            r.url,
            r.secret_file.display().to_string(),
            r.events,
            r.max_rps
        ));
    }
    // Written whole, then moved into place: a reload never reads half a file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, path).unwrap();
}
