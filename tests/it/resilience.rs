//! Surviving a real tenant, over real sockets: IMS tokens, deadlines, retries, throttling and
//! health, with the emulator producing the trouble.

use crate::common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use acs_emulator::{Emulator, EmulatorConfig, Fault, FaultSettings, NewProfile};
use acs_profile_client::{
    CallSettings, ClientConfig, Clock, ImsConfig, ImsSecret, ImsTokenSource, ManualClock,
    ThrottleSettings, TokioClock,
};
use ccpa_gateway::api::deadline::MARGIN;
use ccpa_gateway::backoff::Backoff;
use ccpa_gateway::optout::delivery::DeliverySettings;
use ccpa_gateway::proto::ccpa_v1::ccpa_service_client::CcpaServiceClient;
use ccpa_gateway::proto::ccpa_v1::{
    CreateProfileRequest, DeliveryState, GetOptOutRequest, RequestSource, SetOptOutRequest,
};
use ccpa_gateway::server::{CCPA_SERVICE_NAME, ServerOptions};
use common::{acs_config, eventually, eventually_within, health_request};
use futures::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

/// Client settings for the emulator's tenant, with OAuth tokens from its IMS endpoint.
fn oauth_config(emulator: &Emulator) -> ClientConfig {
    ClientConfig {
        tokens: Arc::new(ims_source(emulator, Arc::new(TokioClock))),
        ..acs_config(emulator)
    }
}

/// A token source for the emulator's IMS, its rules on `clock`.
fn ims_source(emulator: &Emulator, clock: Arc<dyn Clock>) -> ImsTokenSource {
    ImsTokenSource::with_clock(
        ImsConfig {
            url: emulator.url(),
            client_id: EmulatorConfig::DEFAULT_IMS_CLIENT_ID.into(),
            client_secret: ImsSecret::Value(EmulatorConfig::DEFAULT_IMS_CLIENT_SECRET.into()),
            scopes: ImsConfig::DEFAULT_SCOPES.into(),
            request_timeout: Duration::from_secs(10),
        },
        clock,
    )
    .unwrap()
}

/// Limits high enough to stay out of the way.
fn unthrottled() -> CallSettings {
    throttled(100_000, 2_000, 100_000)
}

/// The call rules with these throttle limits toward ACS.
fn throttled(max_rps: u32, max_in_flight: usize, max_queued: usize) -> CallSettings {
    CallSettings {
        throttle: ThrottleSettings {
            max_rps: NonZeroU32::new(max_rps).unwrap(),
            max_in_flight,
            max_queued,
        },
        ..Default::default()
    }
}

/// DEADLINE_EXCEEDED from the gateway, or tonic's own client-side expiry of the same deadline
/// (CANCELLED "Timeout expired", a transport error): with the other tests of this file sharing
/// two cores, the gateway's answer (sent 20 ms early) can still be in transit at the deadline.
/// For tests about something other than deadline precision, which has tests of its own.
fn past_deadline(status: &tonic::Status) -> bool {
    status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Cancelled
            && std::error::Error::source(status)
                .is_some_and(|source| format!("{source:?}").contains("TimeoutExpired")))
}

fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

async fn emulator(config: EmulatorConfig) -> (Emulator, String) {
    let emulator = Emulator::start(config).await.unwrap();
    let pkey = emulator.insert_profile(NewProfile {
        ccpa_opt_out: true,
        ..Default::default()
    });
    (emulator, pkey)
}

/// The life of the tokens in `a_thousand_calls_at_token_expiry_make_one_token_request`.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_at_token_expiry_make_one_token_request() {
    // The token source's rules read a clock the test moves: the token expires when the test
    // says, and however long the burst takes (it took seconds on a busy machine), no refresh
    // falls due during it. Only the count of token requests is left to check.
    let (emulator, pkey) = emulator(EmulatorConfig {
        token_lifetime: TOKEN_LIFETIME,
        ..Default::default()
    })
    .await;
    let clock = Arc::new(ManualClock::new());
    let gateway = common::gateway()
        .calling(ClientConfig {
            call: unthrottled(),
            tokens: Arc::new(ims_source(&emulator, clock.clone())),
            ..acs_config(&emulator)
        })
        .start()
        .await;
    let client = gateway.client();

    client
        .clone()
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(emulator.ims_request_count(), 1);

    // Past the token's expiry: every call needs a new one at the same moment.
    clock.advance(TOKEN_LIFETIME + Duration::from_millis(100));
    let calls = (0..1_000).map(|_| {
        let mut client = client.clone();
        let pkey = pkey.clone();
        tokio::spawn(async move {
            client
                .get_opt_out(GetOptOutRequest {
                    pkey,
                    ..Default::default()
                })
                .await
        })
    });
    for call in futures::future::join_all(calls).await {
        assert!(call.unwrap().unwrap().into_inner().ccpa_opt_out);
    }
    assert_eq!(
        emulator.ims_request_count(),
        2,
        "one refresh for a thousand calls"
    );
}

#[tokio::test]
async fn a_token_refused_as_expired_is_refreshed_once_and_the_call_retried_once() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    let gateway = common::gateway()
        .calling(oauth_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();
    client
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (emulator.ims_request_count(), emulator.request_count()),
        (1, 1)
    );

    // ACS now refuses the cached token with 401 401013, though it has not reached its refresh
    // time: one new token, one more attempt.
    emulator.expire_access_tokens();
    let answer = client
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(answer.into_inner().ccpa_opt_out);
    assert_eq!(
        (emulator.ims_request_count(), emulator.request_count()),
        (2, 3)
    );

    // A refusal that persists after the refresh is not retried again.
    emulator.inject(Fault::json(
        401,
        serde_json::json!({"error_code": "401013", "message": "Oauth token is not valid"}),
    ));
    emulator.inject(Fault::json(
        401,
        serde_json::json!({"error_code": "401013", "message": "Oauth token is not valid"}),
    ));
    let status = client
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(
        (emulator.ims_request_count(), emulator.request_count()),
        (3, 5)
    );
}

#[tokio::test]
async fn a_static_token_refused_as_expired_is_not_retried_in_a_loop() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();
    emulator.expire_access_tokens();
    let status = client
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(
        emulator.request_count(),
        2,
        "one retry, with the same token"
    );
}

#[tokio::test]
async fn failed_token_requests_are_retried_with_back_off() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.inject_ims(Fault::html(503));
    emulator.inject_ims(Fault::html(503));
    let gateway = common::gateway()
        .calling(oauth_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();

    let started = Instant::now();
    let answer = client
        .get_opt_out(with_deadline(
            GetOptOutRequest {
                pkey,
                ..Default::default()
            },
            Duration::from_secs(5),
        ))
        .await
        .unwrap();
    assert!(answer.into_inner().ccpa_opt_out);
    assert_eq!(emulator.ims_request_count(), 3);
    // 0.5 s, then 1 s, between the three requests.
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn refused_client_credentials_never_cause_a_storm_of_token_requests() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.set_ims_client_secret("rotated-elsewhere");
    let gateway = common::gateway()
        .calling(oauth_config(&emulator))
        .start()
        .await;
    let client = gateway.client();

    let calls = (0..50).map(|_| {
        let mut client = client.clone();
        let pkey = pkey.clone();
        tokio::spawn(async move {
            client
                .get_opt_out(with_deadline(
                    GetOptOutRequest {
                        pkey,
                        ..Default::default()
                    },
                    Duration::from_secs(1),
                ))
                .await
        })
    });
    for call in futures::future::join_all(calls).await {
        let status = call.unwrap().unwrap_err();
        // What this test is about is below: the token requests.
        assert!(
            past_deadline(&status) || status.code() == Code::Unavailable,
            "{status:?}"
        );
    }
    // Requests are serialised and spaced 0.5 s, then 1 s apart: two fit in the second.
    assert!(
        emulator.ims_request_count() <= 3,
        "{}",
        emulator.ims_request_count()
    );
    assert_eq!(
        emulator.request_count(),
        0,
        "nothing goes to ACS without a token"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_when_it_fits_the_deadline() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.inject(Fault::too_many_requests(Duration::from_secs(1)));
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();

    let answer = client
        .get_opt_out(with_deadline(
            GetOptOutRequest {
                pkey,
                ..Default::default()
            },
            Duration::from_secs(5),
        ))
        .await
        .unwrap();
    assert!(answer.into_inner().ccpa_opt_out);
    let requests = emulator.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].received_at - requests[0].received_at;
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert!(waited < Duration::from_millis(1_500), "{waited:?}");
}

#[tokio::test]
async fn a_creation_is_not_retried_once_it_may_have_reached_acs() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();
    let creation = || CreateProfileRequest {
        email: "once@example.com".into(),
        ..Default::default()
    };

    for fault in [
        Fault::BreakAfterHeaders,
        Fault::html(503),
        Fault::too_many_requests(Duration::ZERO),
        Fault::TruncateBody,
    ] {
        let before = emulator.request_count();
        for _ in 0..4 {
            emulator.inject(fault.clone());
        }
        let status = client.create_profile(creation()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{fault:?}: {status:?}");
        assert_eq!(
            emulator.request_count() - before,
            1,
            "{fault:?}: one POST only"
        );
        // Leave no queued fault for the next round.
        while emulator.request_count() - before < 4 {
            let _ = client
                .get_opt_out(GetOptOutRequest {
                    pkey: "@x".into(),
                    ..Default::default()
                })
                .await;
        }
    }
    // The truncated answer came after the profile was created: exactly one exists.
    assert_eq!(emulator.profile_count(), 1);
}

#[tokio::test]
async fn the_deadline_bounds_a_stalled_acs_and_leaves_nothing_running() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();

    for (stall, label) in [
        (
            FaultSettings {
                latency: Duration::from_secs(30),
                ..Default::default()
            },
            "no answer",
        ),
        (
            FaultSettings {
                stall: 1.0,
                stall_for: Duration::from_secs(30),
                ..Default::default()
            },
            "headers, then a stalled body",
        ),
    ] {
        emulator.set_faults(stall);
        let deadline = Duration::from_millis(400);
        let started = Instant::now();
        let status = client
            .get_opt_out(with_deadline(
                GetOptOutRequest {
                    pkey: pkey.clone(),
                    ..Default::default()
                },
                deadline,
            ))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{label}: {status:?}");
        assert!(
            took >= deadline - MARGIN - Duration::from_millis(10)
                && took <= deadline + Duration::from_millis(50),
            "{label}: answered after {took:?}"
        );
        // The gateway dropped its request: the emulator sees its client go away.
        eventually_within(
            Duration::from_secs(2),
            &format!("{label}: no request to be running"),
            || std::future::ready((emulator.active_requests() == 0).then_some(())),
        )
        .await;
    }
}

#[tokio::test]
async fn without_a_caller_deadline_the_upstream_budget_applies() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.set_faults(FaultSettings {
        latency: Duration::from_secs(30),
        ..Default::default()
    });
    let gateway = common::gateway()
        .calling(ClientConfig {
            call: CallSettings {
                default_budget: Duration::from_millis(300),
                ..Default::default()
            },
            ..acs_config(&emulator)
        })
        .start()
        .await;
    let mut client = gateway.client();
    let started = Instant::now();
    let status = client
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throttle_holds_the_rate_and_the_concurrency() {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    emulator.set_faults(FaultSettings {
        latency: Duration::from_millis(50),
        ..Default::default()
    });
    let gateway = common::gateway()
        .calling(ClientConfig {
            call: throttled(20, 3, 1_000),
            ..acs_config(&emulator)
        })
        .start()
        .await;
    let client = gateway.client();

    // 30 SetOptOuts, one per profile: 60 requests to ACS (a write and a read-back each), 3 s at
    // 20 per second.
    let profiles: Vec<String> = (0..30)
        .map(|_| emulator.insert_profile(NewProfile::default()))
        .collect();
    let calls = profiles.into_iter().map(|pkey| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .set_opt_out(with_deadline(
                    SetOptOutRequest {
                        pkey,
                        ccpa_opt_out: Some(true),
                        source: RequestSource::WebForm as i32,
                        ..Default::default()
                    },
                    Duration::from_secs(20),
                ))
                .await
        })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap().unwrap();
    }

    let arrivals: Vec<Instant> = emulator.requests().iter().map(|r| r.received_at).collect();
    assert_eq!(arrivals.len(), 60);
    let busiest_second = common::busiest_second(&arrivals);
    assert!(
        busiest_second <= 21,
        "{busiest_second} requests in one second"
    );
    assert!(
        emulator.peak_active_requests() <= 3,
        "{}",
        emulator.peak_active_requests()
    );
}

#[tokio::test]
async fn past_the_queue_bound_calls_fail_at_once_with_resource_exhausted() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.set_faults(FaultSettings {
        latency: Duration::from_millis(500),
        ..Default::default()
    });
    let gateway = common::gateway()
        .calling(ClientConfig {
            call: throttled(1_000, 1, 3),
            ..acs_config(&emulator)
        })
        .start()
        .await;
    let client = gateway.client();

    let calls = (0..10).map(|_| {
        let mut client = client.clone();
        let pkey = pkey.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .get_opt_out(with_deadline(
                    GetOptOutRequest {
                        pkey,
                        ..Default::default()
                    },
                    Duration::from_secs(10),
                ))
                .await;
            (result, started.elapsed())
        })
    });
    let mut refused = 0;
    for call in futures::future::join_all(calls).await {
        let (result, took) = call.unwrap();
        if let Err(status) = result {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                took < Duration::from_millis(200),
                "refused at once, not after {took:?}"
            );
            assert!(status.get_details_retry_info().is_some());
            refused += 1;
        }
    }
    assert_eq!(refused, 6, "one in flight, three queued, six refused");
}

async fn next_status(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a health change in time")
        .unwrap()
        .unwrap();
    ServingStatus::try_from(next.status).unwrap()
}

fn quick_probes() -> ServerOptions {
    ServerOptions {
        health_probe_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

#[tokio::test]
async fn health_turns_not_serving_without_a_token_and_recovers() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    let gateway = common::gateway()
        .calling(oauth_config(&emulator))
        .options(quick_probes())
        .start()
        .await;
    let channel = gateway.channel.clone();
    let mut client = CcpaServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let mut service = health
        .watch(health_request(CCPA_SERVICE_NAME))
        .await
        .unwrap()
        .into_inner();
    let mut server = health.watch(health_request("")).await.unwrap().into_inner();
    assert_eq!(next_status(&mut service).await, ServingStatus::Serving);
    assert_eq!(next_status(&mut server).await, ServingStatus::Serving);

    // IMS stops accepting our secret and ACS refuses the token we have.
    emulator.set_ims_client_secret("rotated-elsewhere");
    emulator.expire_access_tokens();
    let status = client
        .get_opt_out(with_deadline(
            GetOptOutRequest {
                pkey: pkey.clone(),
                ..Default::default()
            },
            Duration::from_secs(3),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(next_status(&mut service).await, ServingStatus::NotServing);
    assert_eq!(next_status(&mut server).await, ServingStatus::NotServing);
    let liveness = health
        .check(health_request("liveness"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(liveness.status, ServingStatus::Serving as i32);

    // The secret works again: the probe notices without any call.
    emulator.set_ims_client_secret(EmulatorConfig::DEFAULT_IMS_CLIENT_SECRET);
    assert_eq!(next_status(&mut service).await, ServingStatus::Serving);
    assert_eq!(next_status(&mut server).await, ServingStatus::Serving);
    client
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn health_turns_not_serving_when_acs_refuses_the_api_key_and_recovers() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .options(quick_probes())
        .start()
        .await;
    let channel = gateway.channel.clone();
    let mut client = CcpaServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let mut service = health
        .watch(health_request(CCPA_SERVICE_NAME))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut service).await, ServingStatus::Serving);

    emulator.set_api_key("rotated-api-key");
    let status = client
        .get_opt_out(GetOptOutRequest {
            pkey: pkey.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(next_status(&mut service).await, ServingStatus::NotServing);

    emulator.set_api_key(EmulatorConfig::DEFAULT_API_KEY);
    assert_eq!(next_status(&mut service).await, ServingStatus::Serving);
    client
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_404_that_is_not_acs_keeps_the_opt_out_pending_and_the_gateway_out_of_rotation() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    let options = ServerOptions {
        delivery: DeliverySettings {
            // An attempt that was answered keeps its profile's lease until it lapses (an
            // earlier attempt of the call may still be in flight): short, so that the test does
            // not wait a minute for the deliverer.
            lease: Duration::from_secs(2),
            poll_interval: Duration::from_millis(100),
            backoff: Backoff::LEDGER_DELIVERY
                .between(Duration::from_millis(100), Duration::from_millis(300))
                .unwrap(),
            ..Default::default()
        },
        ..quick_probes()
    };
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .options(options)
        .start()
        .await;
    let channel = gateway.channel.clone();
    let mut client = CcpaServiceClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let mut service = health
        .watch(health_request(CCPA_SERVICE_NAME))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut service).await, ServingStatus::Serving);

    // A proxy in front of ACS answers the PATCH with its own 404 page: nothing is known about
    // the profile, so the opt-in must not be failed for good.
    emulator.inject(Fault::html(404));
    let answer = client
        .set_opt_out(SetOptOutRequest {
            pkey: pkey.clone(),
            ccpa_opt_out: Some(false),
            source: RequestSource::WebForm as i32,
            request_id: "behind-a-proxy-404".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Pending as i32, "{answer:?}");
    let record = common::record(&mut client, "behind-a-proxy-404").await;
    assert_ne!(record.state, DeliveryState::Failed as i32, "{record:?}");
    assert_eq!(next_status(&mut service).await, ServingStatus::NotServing);

    // The route leads to ACS again: the probe puts the gateway back in rotation, and the
    // deliverer applies the request.
    assert_eq!(next_status(&mut service).await, ServingStatus::Serving);
    eventually("the request to be delivered", || {
        let mut client = client.clone();
        async move {
            let record = common::record(&mut client, "behind-a-proxy-404").await;
            if record.state == DeliveryState::Applied as i32 {
                return Ok(());
            }
            assert_eq!(record.state, DeliveryState::Pending as i32, "{record:?}");
            Err(record)
        }
    })
    .await;
    assert_eq!(emulator.profile(&pkey).unwrap()["ccpaOptOut"], false);
}

#[tokio::test]
async fn transient_failures_leave_health_alone() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .options(quick_probes())
        .start()
        .await;
    let channel = gateway.channel.clone();
    let mut client = CcpaServiceClient::new(channel.clone());
    let status = client
        .get_opt_out(GetOptOutRequest {
            pkey,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let mut health = HealthClient::new(channel);
    let service = health
        .check(health_request(CCPA_SERVICE_NAME))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(service.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm_when_acs_is_down() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    let gateway = common::gateway()
        .calling(ClientConfig {
            call: CallSettings {
                max_attempts: 4,
                backoff: Backoff::ACS_CALL
                    .between(Duration::from_millis(1), Duration::from_millis(5))
                    .unwrap(),
                retry_ratio: 0.2,
                min_retries_per_second: 1,
                ..unthrottled()
            },
            ..acs_config(&emulator)
        })
        .start()
        .await;
    let client = gateway.client();

    let calls = (0..100).map(|_| {
        let mut client = client.clone();
        let pkey = pkey.clone();
        tokio::spawn(async move {
            client
                .get_opt_out(GetOptOutRequest {
                    pkey,
                    ..Default::default()
                })
                .await
        })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap_err().code(), Code::Unavailable);
    }
    // Without a budget: 400 requests. With it: the 100 calls, 20% of them again, and the floor
    // of one retry a second over the budget's ten-second window.
    let requests = emulator.request_count();
    assert!(
        (100..=130).contains(&requests),
        "{requests} requests to ACS"
    );
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    let gateway = common::gateway()
        .calling(acs_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();
    // The date is taken once the gateway is up, so that starting it cannot eat into the wait.
    let in_two_seconds = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    emulator.inject(
        Fault::json(429, serde_json::json!({"message": "Too many requests"}))
            .with_header("Retry-After", &in_two_seconds),
    );
    client
        .get_opt_out(with_deadline(
            GetOptOutRequest {
                pkey,
                ..Default::default()
            },
            Duration::from_secs(5),
        ))
        .await
        .unwrap();
    let requests = emulator.requests();
    let waited = requests[1].received_at - requests[0].received_at;
    // The date has a resolution of one second.
    assert!(waited >= Duration::from_millis(1_000), "{waited:?}");
    assert!(waited <= Duration::from_millis(2_500), "{waited:?}");
}

#[tokio::test]
async fn a_slow_token_request_outlives_the_caller_that_started_it() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.inject_ims(Fault::Delay(Duration::from_millis(1_500)));
    let gateway = common::gateway()
        .calling(oauth_config(&emulator))
        .start()
        .await;
    let mut client = gateway.client();

    let status = client
        .get_opt_out(with_deadline(
            GetOptOutRequest {
                pkey: pkey.clone(),
                ..Default::default()
            },
            Duration::from_millis(500),
        ))
        .await
        .unwrap_err();
    assert!(past_deadline(&status), "{status:?}");

    // The token request went on without its caller (its 1.5 s in IMS have passed); the next
    // caller gets its token, and no other is asked for.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    client
        .get_opt_out(with_deadline(
            GetOptOutRequest {
                pkey,
                ..Default::default()
            },
            Duration::from_millis(500),
        ))
        .await
        .unwrap();
    assert_eq!(emulator.ims_request_count(), 1);
}

#[tokio::test]
async fn a_token_is_refreshed_in_the_background_before_it_expires() {
    let (emulator, pkey) = emulator(EmulatorConfig {
        token_lifetime: TOKEN_LIFETIME,
        ..Default::default()
    })
    .await;
    let clock = Arc::new(ManualClock::new());
    let gateway = common::gateway()
        .calling(ClientConfig {
            tokens: Arc::new(ims_source(&emulator, clock.clone())),
            ..acs_config(&emulator)
        })
        .start()
        .await;
    let mut client = gateway.client();
    let read = |deadline: Duration| {
        with_deadline(
            GetOptOutRequest {
                pkey: pkey.clone(),
                ..Default::default()
            },
            deadline,
        )
    };
    client
        .get_opt_out(read(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(emulator.ims_request_count(), 1);
    // The next token request is held up in IMS for 4 s: a caller that waited for it would miss
    // its 1 s deadline.
    emulator.inject_ims(Fault::Delay(Duration::from_secs(4)));

    // Past 80% of the lifetime, before expiry: answered with the current token while one
    // request fetches the next.
    clock.advance(TOKEN_LIFETIME.mul_f64(0.85));
    for _ in 0..20 {
        client
            .get_opt_out(read(Duration::from_secs(1)))
            .await
            .unwrap();
    }
    eventually_within(Duration::from_secs(10), "a refresh", || {
        std::future::ready((emulator.ims_request_count() >= 2).then_some(()))
    })
    .await;
    assert_eq!(
        emulator.ims_request_count(),
        2,
        "one refresh, in the background"
    );

    // Past the first token's expiry, the refreshed one serves (once its request has ended).
    clock.advance(TOKEN_LIFETIME.mul_f64(0.2));
    client
        .get_opt_out(read(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(emulator.ims_request_count(), 2);
}

/// The other side of the rule above: a creation whose connection could not even be made never
/// reached ACS, so it is retried, and the profile is created once.
#[tokio::test]
async fn a_creation_is_retried_when_acs_could_not_be_reached() {
    // An address where nothing listens yet: connections are refused.
    let gone = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let config = acs_config(&gone);
    let addr = gone.addr();
    drop(gone);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let gateway = common::gateway().calling(config).start().await;
    let mut client = gateway.client();

    let creation = tokio::spawn(async move {
        client
            .create_profile(with_deadline(
                CreateProfileRequest {
                    email: "late@example.com".into(),
                    ..Default::default()
                },
                Duration::from_secs(5),
            ))
            .await
    });
    // ACS comes up while the gateway backs off between attempts: after the first (made at
    // once), before the later ones (full jitter from 100 ms doubling: three retries all land in
    // the first 40 ms about once in a thousand runs).
    tokio::time::sleep(Duration::from_millis(40)).await;
    let emulator = Emulator::bind(addr, EmulatorConfig::default())
        .await
        .unwrap();
    let created = creation.await.unwrap().unwrap().into_inner();
    assert!(!created.profile.unwrap().pkey.is_empty());
    assert_eq!(emulator.profile_count(), 1, "created once");
    assert_eq!(emulator.request_count(), 1, "one POST reached ACS");
}

/// A call waiting in the throttle's queue waits only within its deadline: when that passes it
/// is answered DEADLINE_EXCEEDED promptly, and never sent.
#[tokio::test]
async fn a_call_queued_behind_the_throttle_ends_at_its_deadline() {
    let (emulator, pkey) = emulator(EmulatorConfig::default()).await;
    emulator.set_faults(FaultSettings {
        latency: Duration::from_secs(2),
        ..Default::default()
    });
    let gateway = common::gateway()
        .calling(ClientConfig {
            call: throttled(1_000, 1, 10),
            ..acs_config(&emulator)
        })
        .start()
        .await;
    let client = gateway.client();

    // The first call holds the one slot toward ACS for two seconds.
    let mut first = client.clone();
    let first_pkey = pkey.clone();
    let holder = tokio::spawn(async move {
        first
            .get_opt_out(with_deadline(
                GetOptOutRequest {
                    pkey: first_pkey,
                    ..Default::default()
                },
                Duration::from_secs(5),
            ))
            .await
    });
    eventually("the first call to reach ACS", || {
        std::future::ready((emulator.active_requests() > 0).then_some(()))
    })
    .await;
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let status = client
        .clone()
        .get_opt_out(with_deadline(
            GetOptOutRequest {
                pkey,
                ..Default::default()
            },
            deadline,
        ))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        took < deadline + Duration::from_millis(50),
        "answered {took:?} after a {deadline:?} deadline"
    );
    assert_eq!(
        emulator.request_count(),
        1,
        "the queued call was never sent"
    );
    assert!(holder.await.unwrap().is_ok());
}
