//! Health checks, server reflection, and the order of shutdown.

use crate::common;

use std::time::Duration;

use acs_emulator::Fault;
use ccpa_gateway::proto::ccpa_v1::GetOptOutRequest;
use ccpa_gateway::server::{CCPA_SERVICE_NAME, ServerOptions, ShutdownOptions};
use common::{eventually, gateway, health_request};
use futures::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as ReflectionV1;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as RequestV1;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as ResponseV1;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as ReflectionV1Alpha;
use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as RequestV1Alpha;
use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as ResponseV1Alpha;

#[tokio::test]
async fn health_reports_the_server_and_the_service_serving() {
    let harness = gateway().start().await;
    let mut health = HealthClient::new(harness.channel.clone());
    for service in ["", CCPA_SERVICE_NAME] {
        let status = health
            .check(health_request(service))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    assert_eq!(CCPA_SERVICE_NAME, "ccpa.v1.CcpaService");
    let unknown = health.check(health_request("no.such.Service")).await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reflection_v1_lists_the_service_and_describes_it() {
    let harness = gateway().start().await;
    let mut reflection = ReflectionV1::new(harness.channel.clone());
    let request = |message| tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([
            request(RequestV1::ListServices(String::new())),
            request(RequestV1::FileContainingSymbol(CCPA_SERVICE_NAME.into())),
        ]))
        .await
        .unwrap()
        .into_inner();

    let Some(ResponseV1::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "ccpa.v1.CcpaService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }

    let Some(ResponseV1::FileDescriptorResponse(files)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_service() {
    let harness = gateway().start().await;
    let mut reflection = ReflectionV1Alpha::new(harness.channel.clone());
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([
            tonic_reflection::pb::v1alpha::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(RequestV1Alpha::ListServices(String::new())),
            },
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(ResponseV1Alpha::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    assert!(list.service.iter().any(|s| s.name == CCPA_SERVICE_NAME));
}

#[tokio::test]
async fn shutdown_reports_not_serving_then_drains_calls_in_flight() {
    let mut harness = gateway()
        .options(ServerOptions {
            shutdown: ShutdownOptions {
                drain_delay: Duration::from_millis(300),
                drain_timeout: Duration::from_secs(10),
            },
            ..Default::default()
        })
        .start()
        .await;
    let pkey = harness.profile(true);
    let mut health = HealthClient::new(harness.channel.clone());
    let mut server_watch = health.watch(health_request("")).await.unwrap().into_inner();
    let mut service_watch = health
        .watch(health_request(CCPA_SERVICE_NAME))
        .await
        .unwrap()
        .into_inner();
    for watch in [&mut server_watch, &mut service_watch] {
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32);
    }

    // A call that ACS answers slowly is in flight when shutdown begins.
    harness
        .emulator()
        .inject(Fault::Delay(Duration::from_millis(800)));
    let mut client = harness.client();
    let in_flight = tokio::spawn(async move {
        client
            .get_opt_out(GetOptOutRequest {
                pkey,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    });
    eventually("the call to reach ACS", || {
        std::future::ready((harness.emulator().request_count() > 0).then_some(()))
    })
    .await;
    harness.begin_shutdown();

    for watch in [&mut server_watch, &mut service_watch] {
        let next = watch.next().await.unwrap().unwrap();
        assert_eq!(next.status, ServingStatus::NotServing as i32);
    }
    // During the drain delay, health checks are still answered: NOT_SERVING.
    let status = health
        .check(health_request(CCPA_SERVICE_NAME))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);

    let answer = in_flight
        .await
        .unwrap()
        .expect("the call in flight completes");
    assert!(answer.ccpa_opt_out);
    tokio::time::timeout(Duration::from_secs(5), harness.shutdown())
        .await
        .expect("shutdown does not wait for the health watchers")
        .expect("a clean stop");
}
