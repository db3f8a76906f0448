//! The webhook parts over real sockets: the `webhook-receiver` command verifying what
//! `notify::sender::Sender` signs and sends, and the sender's reading of every kind of answer.

use crate::common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use ccpa_gateway::cli::listen_addr;
use ccpa_gateway::notify::event::{self, Notice};
use ccpa_gateway::notify::recipients::Secrets;
use ccpa_gateway::notify::sender::{Answer, Sender};
use ccpa_gateway::notify::signing;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout};
use url::Url;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WRONG: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// A running `ccpa-gateway webhook-receiver`, its address, and its standard output.
struct Receiver {
    _child: Child,
    _dir: tempfile::TempDir,
    url: Url,
    lines: Lines<BufReader<ChildStdout>>,
}

async fn receiver(secret_file_text: &str) -> Receiver {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, secret_file_text).unwrap();
    let addr_file = dir.path().join("addr");
    let mut child = common::cli::ccpa_gateway()
        .arg("webhook-receiver")
        .args(["--listen", "127.0.0.1:0", "--secret-file"])
        .arg(&secret_file)
        .arg("--listen-addr-file")
        .arg(&addr_file)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = listen_addr::wait(&addr_file, Duration::from_secs(30))
        .await
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Receiver {
        _child: child,
        _dir: dir,
        url: Url::parse(&format!("http://{addr}/ccpa/hook")).unwrap(),
        lines,
    }
}

impl Receiver {
    async fn next_line(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("a line within 10 s")
            .unwrap()
            .expect("the receiver goes on");
        serde_json::from_str(&line).unwrap()
    }
}

fn notice(request_id: &str) -> Notice {
    Notice {
        request_id: request_id.into(),
        recipient: "ad-platform-sync".into(),
        pkey: Some("@AAAxyz".into()),
        opt_out: true,
        source: "WEB_FORM",
        received_at_ms: 1_714_564_799_000,
        email_sha256: Some(event::email_sha256("someone@example.com")),
    }
}

/// Signs `notice`'s event with `secret` and sends it to `url`; returns the answer and the body.
async fn send_signed(
    sender: &Sender,
    url: &Url,
    notice: &Notice,
    secret: &str,
) -> (Answer, Vec<u8>) {
    let body = event::body(notice, 1_714_564_800_000);
    let msg_id = event::event_id(&notice.request_id, &notice.recipient);
    let now = now_s();
    let signature =
        signing::signature_header(&Secrets::parse(secret).unwrap(), &msg_id, now, &body);
    let answer = sender
        .send(url, &msg_id, now, &signature, body.clone())
        .await;
    (answer, body)
}

#[tokio::test]
async fn the_receiver_prints_what_is_signed_and_refuses_what_is_not() {
    let mut receiver = receiver(&format!("{SECRET}\n")).await;
    let sender = Sender::new(Duration::from_secs(10)).unwrap();

    let first = notice("req-1");
    let (answer, body) = send_signed(&sender, &receiver.url, &first, SECRET).await;
    assert_eq!(answer, Answer::Delivered { status: 204 });
    let printed = receiver.next_line().await;
    assert_eq!(
        printed["webhook_id"],
        event::event_id("req-1", "ad-platform-sync")
    );
    assert_eq!(
        printed["event"],
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    );
    assert_eq!(printed["event"]["type"], "ccpa.v1.opt_out.recorded");
    assert_eq!(printed["event"]["data"]["request_id"], "req-1");

    // Signed with a key it does not hold: 401, a failure for good, and nothing printed.
    let (answer, _) = send_signed(&sender, &receiver.url, &notice("req-forged"), WRONG).await;
    assert_eq!(
        answer,
        Answer::Rejected {
            class: "http_401".into()
        }
    );
    // Signed, but too long ago.
    let stale = notice("req-stale");
    let body = event::body(&stale, 0);
    let msg_id = event::event_id(&stale.request_id, &stale.recipient);
    let then = now_s() - 3600;
    let signature =
        signing::signature_header(&Secrets::parse(SECRET).unwrap(), &msg_id, then, &body);
    assert_eq!(
        sender
            .send(&receiver.url, &msg_id, then, &signature, body)
            .await,
        Answer::Rejected {
            class: "http_401".into()
        }
    );

    // The next line printed is the next good delivery's: the refused ones printed nothing.
    let (answer, _) = send_signed(&sender, &receiver.url, &notice("req-2"), SECRET).await;
    assert_eq!(answer, Answer::Delivered { status: 204 });
    let printed = receiver.next_line().await;
    assert_eq!(printed["event"]["data"]["request_id"], "req-2");
}

#[tokio::test]
async fn the_receiver_accepts_any_of_its_secrets() {
    // Two secrets, as during a rotation: either one's signature is enough.
    let mut receiver = receiver(&format!("{SECRET}\n{WRONG}\n")).await;
    let sender = Sender::new(Duration::from_secs(10)).unwrap();
    for (n, secret) in [WRONG, SECRET].into_iter().enumerate() {
        let (answer, _) =
            send_signed(&sender, &receiver.url, &notice(&format!("r{n}")), secret).await;
        assert_eq!(answer, Answer::Delivered { status: 204 });
        assert_eq!(
            receiver.next_line().await["event"]["data"]["request_id"],
            format!("r{n}")
        );
    }
}

#[tokio::test]
async fn the_receiver_refuses_to_start_without_usable_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "hunter2\n").unwrap();
    let output = common::cli::ccpa_gateway()
        .args([
            "webhook-receiver",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
        ])
        .arg(&secret_file)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--secret-file"), "{stderr}");
    assert!(stderr.contains("does not start with whsec_"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A recipient of the test's own making, answering as `app` says; returns its base URL.
async fn recipient(app: Router) -> Url {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Url::parse(&format!("http://{addr}/")).unwrap()
}

async fn post_to(sender: &Sender, url: &Url) -> Answer {
    send_signed(sender, url, &notice("req"), SECRET).await.0
}

#[tokio::test]
async fn the_sender_classes_each_answer() {
    let app = Router::new()
        .route(
            "/redirect",
            post(|| async { (StatusCode::FOUND, [(header::LOCATION, "/ok")]) }),
        )
        .route("/ok", post(|| async { StatusCode::OK }))
        .route(
            "/busy",
            post(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "7")],
                )
            }),
        )
        .route(
            "/slow-down",
            post(|| async {
                let at = SystemTime::now() + Duration::from_secs(60);
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, httpdate::fmt_http_date(at))],
                )
            }),
        )
        .route("/timeout", post(|| async { StatusCode::REQUEST_TIMEOUT }))
        .route("/gone", post(|| async { StatusCode::GONE }))
        .route("/bad", post(|| async { StatusCode::BAD_REQUEST }))
        .route(
            "/headers",
            post(|headers: axum::http::HeaderMap| async move {
                let get = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
                let good = get("content-type") == "application/cloudevents+json"
                    && get("user-agent").starts_with("ccpa-gateway/")
                    && get("webhook-id") == event::event_id("req", "ad-platform-sync")
                    && get("webhook-timestamp").parse::<i64>().is_ok()
                    && get("webhook-signature").starts_with("v1,");
                if good {
                    StatusCode::ACCEPTED
                } else {
                    StatusCode::BAD_REQUEST
                }
            }),
        );
    let base = recipient(app).await;
    let sender = Sender::new(Duration::from_secs(10)).unwrap();
    let at = |path: &str| base.join(path).unwrap();

    assert_eq!(
        post_to(&sender, &at("ok")).await,
        Answer::Delivered { status: 200 }
    );
    assert_eq!(
        post_to(&sender, &at("headers")).await,
        Answer::Delivered { status: 202 }
    );
    // Not followed, and not worth retrying.
    assert_eq!(
        post_to(&sender, &at("redirect")).await,
        Answer::Rejected {
            class: "http_302".into()
        }
    );
    assert_eq!(
        post_to(&sender, &at("busy")).await,
        Answer::Retry {
            class: "http_503".into(),
            retry_after: Some(Duration::from_secs(7))
        }
    );
    match post_to(&sender, &at("slow-down")).await {
        Answer::Retry {
            class,
            retry_after: Some(wait),
        } => {
            assert_eq!(class, "http_429");
            assert!(
                wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
                "{wait:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        post_to(&sender, &at("timeout")).await,
        Answer::Retry {
            class: "http_408".into(),
            retry_after: None
        }
    );
    assert_eq!(
        post_to(&sender, &at("gone")).await,
        Answer::Rejected {
            class: "http_410".into()
        }
    );
    assert_eq!(
        post_to(&sender, &at("bad")).await,
        Answer::Rejected {
            class: "http_400".into()
        }
    );
    assert_eq!(
        post_to(&sender, &at("nowhere")).await,
        Answer::Rejected {
            class: "http_404".into()
        }
    );
}

#[tokio::test]
async fn a_recipient_that_never_answers_is_a_timeout() {
    let base = recipient(Router::new().route(
        "/",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK
        }),
    ))
    .await;
    let sender = Sender::new(Duration::from_millis(500)).unwrap();
    let started = Instant::now();
    assert_eq!(
        post_to(&sender, &base).await,
        Answer::Retry {
            class: "timeout".into(),
            retry_after: None
        }
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_closed_port_is_a_connection_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    let sender = Sender::new(Duration::from_secs(5)).unwrap();
    let url = Url::parse(&format!("http://{addr}/hook?token=secret-in-query")).unwrap();
    assert_eq!(
        post_to(&sender, &url).await,
        Answer::Retry {
            class: "connection".into(),
            retry_after: None
        }
    );
}

#[tokio::test]
async fn an_endless_answer_is_cut_short() {
    // 1 MiB chunks forever: read whole, it would never end, nor fit in memory.
    let base = recipient(Router::new().route(
        "/",
        post(|| async {
            let chunk = axum::body::Bytes::from(vec![b'x'; 1 << 20]);
            let endless =
                futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
            (StatusCode::OK, Body::from_stream(endless)).into_response()
        }),
    ))
    .await;
    let sender = Sender::new(Duration::from_secs(60)).unwrap();
    let started = Instant::now();
    assert_eq!(
        post_to(&sender, &base).await,
        Answer::Delivered { status: 200 }
    );
    // Well within the timeout: the body was not read to its (absent) end.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
