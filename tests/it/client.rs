//! `ccpa_gateway::client`, the client for Rust services that call the gateway, against real
//! gateways on the emulator: set-up (TLS, mutual TLS, the caller's name), safe retries through
//! faults, typed errors, the bulk stream, and a dependency tree without the server.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acs_emulator::{EmulatorConfig, Fault, NewProfile};
use ccpa_gateway::client::{Client, ClientBuilder, Error, FieldProblem, Reason, RetryPolicy};
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, DeliveryState, GetOptOutRecordRequest, GetOptOutRequest,
    ListOptOutRecordsRequest, RequestSource, SetOptOutRequest,
};
use common::pki::{Ca, Name, client_tls};
use common::{QUICK_DELIVERY_ARGS, get, until_settled};
use futures::StreamExt as _;
use tonic::Code;

fn client_of(gw: &common::Gateway) -> ClientBuilder {
    ClientBuilder::new(format!("http://{}", gw.addr))
}

fn opt_out(pkey: &str) -> SetOptOutRequest {
    SetOptOutRequest {
        pkey: pkey.into(),
        ccpa_opt_out: Some(true),
        source: RequestSource::WebForm as i32,
        ..Default::default()
    }
}

/// Every record the ledger holds for `pkey`.
async fn records_of(
    client: &Client,
    pkey: &str,
) -> Vec<ccpa_gateway::proto::ccpa_v1::OptOutRecord> {
    client
        .list_opt_out_records(ListOptOutRecordsRequest {
            pkey: pkey.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .records
}

#[tokio::test]
async fn set_opt_out_sends_a_generated_request_id_and_the_callers_name() {
    let gw = common::gateway().start().await;
    let pkey = gw.profile(false);
    let client = client_of(&gw)
        .caller("billing-service")
        .connect()
        .await
        .unwrap();

    let answer = client.set_opt_out(opt_out(&pkey)).await.unwrap();
    assert_eq!(answer.state, DeliveryState::Applied as i32);
    let id = uuid::Uuid::parse_str(&answer.request_id).expect("a UUID the client made");
    assert_eq!(
        id.get_version_num(),
        7,
        "time-ordered, cheap for the ledger's index"
    );

    let record = client
        .get_opt_out_record(GetOptOutRecordRequest {
            request_id: answer.request_id.clone(),
        })
        .await
        .unwrap()
        .record
        .unwrap();
    assert_eq!(record.caller, "billing-service");
    assert!(client.get_opt_out(get(&pkey)).await.unwrap().ccpa_opt_out);

    // A request id the caller gives is the one used.
    let again = client
        .set_opt_out(SetOptOutRequest {
            request_id: "billing-42".into(),
            ..opt_out(&pkey)
        })
        .await
        .unwrap();
    assert_eq!(again.request_id, "billing-42");
}

/// A TCP relay in front of a gateway that can spoil one answer, as the network between a
/// service and the gateway can: while `cut_next_answer` is set, the first bytes the gateway
/// sends back are dropped and the connection is broken; while `delay_next_answer` holds a
/// delay, the first bytes back are held that long.
struct FlakyRelay {
    addr: std::net::SocketAddr,
    cut_next_answer: Arc<AtomicBool>,
    delay_next_answer: Arc<Mutex<Option<Duration>>>,
    connections: Arc<AtomicUsize>,
}

impl FlakyRelay {
    async fn start(gateway: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let relay = Self {
            addr,
            cut_next_answer: Arc::default(),
            delay_next_answer: Arc::default(),
            connections: Arc::default(),
        };
        let (cut, delay, count) = (
            relay.cut_next_answer.clone(),
            relay.delay_next_answer.clone(),
            relay.connections.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let upstream = tokio::net::TcpStream::connect(gateway).await.unwrap();
                tokio::spawn(relay_connection(
                    client,
                    upstream,
                    cut.clone(),
                    delay.clone(),
                ));
            }
        });
        relay
    }
}

async fn relay_connection(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    cut: Arc<AtomicBool>,
    delay: Arc<Mutex<Option<Duration>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let requests = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
    });
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match upstream_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if cut.swap(false, Ordering::SeqCst) {
            // The gateway answered; the caller never hears it.
            break;
        }
        let hold = delay.lock().unwrap().take();
        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
        }
        if client_write.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    requests.abort();
}

/// How many PATCHes the emulator has seen.
fn patches(gw: &common::Gateway) -> usize {
    gw.emulator()
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count()
}

#[tokio::test]
async fn a_set_opt_out_whose_answer_is_lost_is_retried_with_the_same_id_and_recorded_once() {
    let gw = common::gateway().start().await;
    let pkey = gw.profile(false);
    let relay = FlakyRelay::start(gw.addr).await;
    let client = ClientBuilder::new(format!("http://{}", relay.addr))
        .connect()
        .await
        .unwrap();
    // A first call settles the connection (HTTP/2's settings have crossed): the next bytes the
    // gateway sends are the answer to the call below.
    assert!(!client.get_opt_out(get(&pkey)).await.unwrap().ccpa_opt_out);

    relay.cut_next_answer.store(true, Ordering::SeqCst);
    let answer = client.set_opt_out(opt_out(&pkey)).await.unwrap();
    assert_eq!(
        relay.connections.load(Ordering::SeqCst),
        2,
        "the first answer was lost with its connection, and the retry came on a new one"
    );
    assert_eq!(answer.state, DeliveryState::Applied as i32);
    let records = records_of(&client, &pkey).await;
    assert_eq!(records.len(), 1, "one request, however many attempts");
    assert_eq!(records[0].request_id, answer.request_id);
    assert_eq!(
        patches(&gw),
        1,
        "the first attempt applied it; the retry was answered from the ledger"
    );
}

#[tokio::test]
async fn a_set_opt_out_whose_answer_comes_after_its_deadline_is_retried_with_the_same_id() {
    let gw = common::gateway().start().await;
    let pkey = gw.profile(false);
    let relay = FlakyRelay::start(gw.addr).await;
    let client = ClientBuilder::new(format!("http://{}", relay.addr))
        .deadline(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    assert!(!client.get_opt_out(get(&pkey)).await.unwrap().ccpa_opt_out);

    // The gateway answers in time; the network holds the answer past the caller's deadline,
    // which the client itself enforces (tonic reports that as CANCELLED; it is
    // DEADLINE_EXCEEDED, and retried).
    *relay.delay_next_answer.lock().unwrap() = Some(Duration::from_millis(1500));
    let answer = client.set_opt_out(opt_out(&pkey)).await.unwrap();
    assert_eq!(answer.state, DeliveryState::Applied as i32);
    let records = records_of(&client, &pkey).await;
    assert_eq!(records.len(), 1, "one request, however many attempts");
    assert_eq!(records[0].request_id, answer.request_id);
    assert_eq!(patches(&gw), 1, "the retry was answered from the ledger");

    // Without retries, the caller sees the deadline, not a cancellation.
    let once = ClientBuilder::new(format!("http://{}", relay.addr))
        .deadline(Duration::from_millis(300))
        .retry(RetryPolicy::no_retries())
        .connect()
        .await
        .unwrap();
    *relay.delay_next_answer.lock().unwrap() = Some(Duration::from_millis(1000));
    let error = once.get_opt_out(get(&pkey)).await.unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn a_read_past_its_deadline_is_retried() {
    let gw = common::gateway().start().await;
    let pkey = gw.profile(true);
    let client = client_of(&gw)
        .deadline(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    gw.emulator().inject(Fault::Delay(Duration::from_secs(2)));
    let answer = client.get_opt_out(get(&pkey)).await.unwrap();
    assert!(answer.ccpa_opt_out);
    let gets = gw
        .emulator()
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .count();
    assert_eq!(gets, 2, "the slow read, then the retry's");
}

#[tokio::test]
async fn an_unavailable_read_is_retried_after_the_delay_the_gateway_asks_for() {
    let gw = common::gateway().start().await;
    let pkey = gw.profile(true);
    let client = client_of(&gw).connect().await.unwrap();
    let gets = || {
        gw.emulator()
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .count()
    };

    // The gateway's own attempts at the read all meet a 503: its answer is UNAVAILABLE, and
    // the client's next attempt finds ACS back.
    let before = gets();
    for _ in 0..4 {
        gw.emulator().inject(Fault::html(503));
    }
    let started = std::time::Instant::now();
    let answer = client.get_opt_out(get(&pkey)).await.unwrap();
    assert!(answer.ccpa_opt_out);
    assert_eq!(gets() - before, 5, "four refused, then the client's retry");
    // The gateway's RetryInfo asked for a second (DEFAULT_RETRY_DELAY), and was honoured.
    assert!(started.elapsed() >= Duration::from_secs(1));

    // Without retries, the caller sees the typed failure and the delay asked for.
    let once = client_of(&gw)
        .retry(RetryPolicy::no_retries())
        .connect()
        .await
        .unwrap();
    for _ in 0..4 {
        gw.emulator().inject(Fault::html(503));
    }
    match once.get_opt_out(get(&pkey)).await.unwrap_err() {
        Error::Status {
            code,
            reason,
            retry_after,
            ..
        } => {
            assert_eq!(code, Code::Unavailable);
            assert_eq!(reason, Reason::AcsUnavailable);
            assert_eq!(retry_after, Some(Duration::from_secs(1)));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn errors_are_decoded_into_reasons_and_field_problems() {
    let gw = common::gateway().start().await;
    let client = client_of(&gw).connect().await.unwrap();

    let gone = gw.profile(false);
    gw.emulator().remove_profile(&gone);
    let error = client.get_opt_out(get(&gone)).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert_eq!(error.reason(), Some(&Reason::ProfileNotFound));
    assert!(!error.is_retryable());

    let seen_by_adobe = gw.emulator().requests().len();
    let error = client
        .set_opt_out(SetOptOutRequest {
            source: RequestSource::Unspecified as i32,
            ..opt_out("@bad/key")
        })
        .await
        .unwrap_err();
    let Error::Status {
        code,
        reason,
        violations,
        ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(*code, Code::InvalidArgument);
    assert_eq!(*reason, Reason::InvalidRequest);
    let problem_of = |field: &str| {
        violations
            .iter()
            .find(|v| v.field == field)
            .map(|v| v.problem.clone())
    };
    assert_eq!(
        problem_of("pkey"),
        Some(FieldProblem::Malformed),
        "{violations:?}"
    );
    assert_eq!(
        problem_of("source"),
        Some(FieldProblem::Required),
        "{violations:?}"
    );
    assert_eq!(
        gw.emulator().requests().len(),
        seen_by_adobe,
        "refused before Adobe"
    );

    let error = client
        .get_opt_out(GetOptOutRequest {
            email: "nobody.at.all@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.reason(), Some(&Reason::EmailNotFound));
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    for (builder, setting) in [
        (ClientBuilder::new("not a url"), "addr"),
        (
            ClientBuilder::new("http://127.0.0.1:1").tls_ca(&missing),
            "addr",
        ),
        (
            ClientBuilder::new("https://127.0.0.1:1").tls_ca(&missing),
            "tls_ca",
        ),
        (
            ClientBuilder::new("https://127.0.0.1:1").tls_identity(&missing, &missing),
            "tls_identity",
        ),
        (
            ClientBuilder::new("http://127.0.0.1:1").caller("caf\u{e9}"),
            "caller",
        ),
        (
            ClientBuilder::new("http://127.0.0.1:1").deadline(Duration::ZERO),
            "deadline",
        ),
        (
            ClientBuilder::new("http://127.0.0.1:1").deadline(Duration::MAX),
            "deadline",
        ),
        (
            ClientBuilder::new("http://127.0.0.1:1").connect_timeout(Duration::ZERO),
            "connect_timeout",
        ),
        (
            ClientBuilder::new("http://127.0.0.1:1").retry(RetryPolicy {
                max_attempts: 0,
                ..RetryPolicy::default()
            }),
            "retry",
        ),
    ] {
        match builder.connect().await {
            Err(Error::Config { setting: named, .. }) => assert_eq!(named, setting),
            other => panic!("{setting}: {other:?}"),
        }
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let error = ClientBuilder::new(format!("http://{addr}"))
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    assert_eq!(error.code(), Code::Unavailable);

    // Lazily, the unreachable gateway fails the first call instead, as UNAVAILABLE.
    let lazy = ClientBuilder::new(format!("http://{addr}"))
        .retry(RetryPolicy::no_retries())
        .connect_lazy()
        .unwrap();
    let error = lazy.get_opt_out(get("@abc")).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error:?}");
    for deadline in [Duration::ZERO, Duration::MAX] {
        assert!(matches!(
            lazy.with_deadline(deadline),
            Err(Error::Config {
                setting: "deadline",
                ..
            })
        ));
    }
}

/// Services call from handlers that tokio spawns: the calls' futures must be `Send`.
#[allow(dead_code)]
fn calls_can_be_spawned(client: Client) {
    fn spawnable<T: Send + 'static>(_: T) {}
    spawnable({
        let client = client.clone();
        async move { client.set_opt_out(opt_out("@abc")).await }
    });
    spawnable({
        let client = client.clone();
        async move { client.get_opt_out(get("@abc")).await }
    });
    spawnable(async move {
        client
            .bulk_set_opt_out(futures::stream::empty())
            .await
            .map(|answers| answers.count())
    });
}

#[tokio::test]
async fn mutual_tls_from_the_builder_carries_the_certificates_identity_and_its_limits() {
    const PORTAL: &str = "spiffe://corp.example/ns/web/sa/privacy-portal";
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ccpa client test CA");
    let (server_cert, server_key) = ca.server().write(dir.path(), "server");
    let portal = ca.client(Name::Uri(PORTAL));
    let (portal_cert, portal_key) = portal.write(dir.path(), "portal");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!("[[caller]]\nid = \"{PORTAL}\"\nallow = [\"read\", \"records\"]\n"),
    )
    .unwrap();
    let emulator = acs_emulator::Emulator::start(EmulatorConfig::default())
        .await
        .unwrap();
    let pkey = emulator.insert_profile(NewProfile::default());
    let path = |p: &std::path::Path| p.display().to_string();
    let gw = common::gateway()
        .args(QUICK_DELIVERY_ARGS)
        .args(&[
            "--tls-cert",
            &path(&server_cert),
            "--tls-key",
            &path(&server_key),
            "--tls-client-ca",
            &path(&ca_file),
            "--authz-policy",
            &path(&policy),
        ])
        .tls(client_tls(&ca.pem(), Some(&portal)))
        .spawn(Some(&emulator))
        .await;

    let client = ClientBuilder::new(format!("https://localhost:{}", gw.addr.port()))
        .tls_ca(&ca_file)
        .tls_identity(&portal_cert, &portal_key)
        .connect()
        .await
        .unwrap();
    assert!(!client.get_opt_out(get(&pkey)).await.unwrap().ccpa_opt_out);
    let denied = client.set_opt_out(opt_out(&pkey)).await.unwrap_err();
    match &denied {
        Error::Status {
            code,
            reason,
            missing_permission,
            ..
        } => {
            assert_eq!(*code, Code::PermissionDenied);
            assert_eq!(*reason, Reason::CallerNotAllowed);
            assert_eq!(missing_permission.as_deref(), Some("opt-out"));
        }
        other => panic!("{other:?}"),
    }
    assert!(records_of(&client, &pkey).await.is_empty());

    // Without a client certificate the handshake, or the call, is refused.
    let anonymous = ClientBuilder::new(format!("https://localhost:{}", gw.addr.port()))
        .tls_ca(&ca_file)
        .connect()
        .await;
    // Refused at the handshake (TLS 1.3 may report it only at the first call).
    let error = match anonymous {
        Ok(anonymous) => anonymous.get_opt_out(get(&pkey)).await.unwrap_err(),
        Err(error) => error,
    };
    assert!(
        matches!(error.code(), Code::Unavailable | Code::Unauthenticated),
        "{error:?}"
    );
}

#[tokio::test]
async fn the_bulk_helper_streams_any_items_and_fills_in_request_ids() {
    let gw = common::gateway()
        .emulator(EmulatorConfig::default())
        .start()
        .await;
    let keys: Vec<String> = (0..3).map(|_| gw.profile(false)).collect();
    let client = client_of(&gw).caller("bulk-test").connect().await.unwrap();
    let mut items: Vec<BulkSetOptOutRequest> = keys
        .iter()
        .map(|pkey| BulkSetOptOutRequest {
            item: Some(opt_out(pkey)),
            record_only: false,
        })
        .collect();
    items[1].item.as_mut().unwrap().request_id = "bulk-own-id".into();
    items.push(BulkSetOptOutRequest {
        item: Some(opt_out("@bad/key")),
        record_only: false,
    });

    let answers: Vec<_> = client
        .bulk_set_opt_out(futures::stream::iter(items))
        .await
        .unwrap()
        .collect()
        .await;
    let mut answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    answers.sort_by_key(|a| a.index);
    assert_eq!(answers.len(), 4);
    for answer in &answers[..3] {
        assert!(answer.error.is_none(), "{answer:?}");
    }
    assert!(uuid::Uuid::parse_str(&answers[0].request_id).is_ok());
    assert_eq!(answers[1].request_id, "bulk-own-id");
    match Error::from_item(answers[3].error.as_ref().unwrap()) {
        Error::Status {
            code,
            reason,
            violations,
            ..
        } => {
            assert_eq!(code, Code::InvalidArgument);
            assert_eq!(reason, Reason::InvalidRequest);
            assert!(
                violations.iter().any(|v| v.field.ends_with("pkey")),
                "{violations:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut raw = gw.client();
    until_settled(&mut raw).await;
    for pkey in &keys {
        assert_eq!(gw.emulator().profile(pkey).unwrap()["ccpaOptOut"], true);
        assert_eq!(records_of(&client, pkey).await.len(), 1);
    }
}

#[test]
fn the_client_alone_brings_nothing_of_the_server() {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--package",
            "ccpa-gateway",
            "--no-default-features",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(tree.contains("tonic "), "{tree}");
    for server_only in [
        "sqlx",
        "axum",
        "rusqlite",
        "libsqlite3-sys",
        "hdrhistogram",
        "acs-emulator",
        "acs-profile-client",
        "reqwest",
        "metrics",
    ] {
        assert!(
            !tree
                .lines()
                .any(|line| line.split_whitespace().next() == Some(server_only)),
            "{server_only} is in the client's tree:\n{tree}"
        );
    }
}
