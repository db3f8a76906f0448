//! Opt-outs by email (every page, whole address, spellings, duplicates, create_if_missing) and in
//! bulk (the stream, a cut stream resumed, the CSV command).

use crate::common;

use std::time::Duration;

use acs_emulator::{Emulator, EmulatorConfig, Fault, FaultSettings, NewProfile};
use acs_profile_client::{CallSettings, ClientConfig, ThrottleSettings};
use ccpa_gateway::backoff::Backoff;
use ccpa_gateway::optout::delivery::DeliverySettings;
use ccpa_gateway::proto::ccpa_v1::{
    BulkSetOptOutRequest, DeliveryState, GetOptOutRequest, ListOptOutRecordsRequest, RequestSource,
    SetOptOutRequest,
};
use ccpa_gateway::server::ServerOptions;
use common::{GatewayBuilder, Store, bulk, eventually, opt_out_of, record, until_settled};
use futures::StreamExt;
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;

/// A gateway in front of a new emulator configured as `config`, on a SQLite ledger file, its
/// deliverer quick to retry.
fn quick(config: EmulatorConfig) -> GatewayBuilder {
    common::gateway()
        .emulator(config)
        .store(Store::sqlite())
        .options(ServerOptions {
            delivery: DeliverySettings {
                poll_interval: Duration::from_millis(100),
                backoff: Backoff::LEDGER_DELIVERY
                    .between(Duration::from_millis(100), Duration::from_millis(300))
                    .unwrap(),
                ..Default::default()
            },
            ..Default::default()
        })
}

/// Profiles sharing one address, spelled three ways, spread over several pages, beside
/// addresses ACS's filter also returns.
fn duplicates(emulator: &Emulator, count: usize, opted_out_every: usize) -> Vec<String> {
    let spellings = ["ada@example.com", "Ada@Example.com", "ADA@EXAMPLE.COM"];
    let mut keys = Vec::new();
    for i in 0..count {
        keys.push(emulator.insert_profile(NewProfile {
            email: spellings[i % 3].into(),
            ccpa_opt_out: opted_out_every > 0 && i % opted_out_every == 0,
            ..Default::default()
        }));
        emulator.insert_profile(NewProfile {
            email: "ada@example.com.au".into(),
            ..Default::default()
        });
    }
    keys
}

/// PATCHes each profile has received so far.
fn patches_per_profile(emulator: &Emulator) -> std::collections::HashMap<String, usize> {
    let mut patches = std::collections::HashMap::new();
    for request in emulator.requests().iter().filter(|r| r.method == "PATCH") {
        let pkey = request
            .path
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        *patches.entry(pkey).or_default() += 1;
    }
    patches
}

fn by_email(email: &str, opt_out: bool, request_id: &str) -> SetOptOutRequest {
    SetOptOutRequest {
        email: email.into(),
        ccpa_opt_out: Some(opt_out),
        request_id: request_id.into(),
        source: RequestSource::Email as i32,
        ..Default::default()
    }
}

/// Profiles at one address stored in each of `spellings`, `count` of each, interleaved with an
/// address ACS's prefix filter also returns; every `opted_out_every`-th one opted out. The keys,
/// per spelling.
fn spelled(
    emulator: &Emulator,
    spellings: &[&str],
    count: usize,
    opted_out_every: usize,
) -> Vec<Vec<String>> {
    let mut keys = vec![Vec::new(); spellings.len()];
    for i in 0..count * spellings.len() {
        keys[i % spellings.len()].push(emulator.insert_profile(NewProfile {
            email: spellings[i % spellings.len()].into(),
            ccpa_opt_out: opted_out_every > 0 && i % opted_out_every == 0,
            ..Default::default()
        }));
        emulator.insert_profile(NewProfile {
            email: "ada@example.com.au".into(),
            ..Default::default()
        });
    }
    keys
}

#[tokio::test]
async fn get_by_email_answers_every_matching_profile_and_protects() {
    let gw = quick(EmulatorConfig {
        relative_next_links: true,
        ..Default::default()
    })
    .start()
    .await;
    // Asked for as `ADA@example.COM`, then `ada@example.com` and `ADA@example.com`: ACS's byEmail
    // is taken to match case-sensitively, so the last spelling is the one it cannot find.
    let keys = spelled(
        gw.emulator(),
        &[
            "ADA@example.COM",
            "ada@example.com",
            "ADA@example.com",
            "Ada@Example.com",
        ],
        15,
        7,
    );

    let answer = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            email: "ADA@example.COM".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut answered: Vec<&str> = answer.profiles.iter().map(|p| p.pkey.as_str()).collect();
    answered.sort_unstable();
    let mut expected: Vec<&str> = keys[..3].iter().flatten().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(
        answered, expected,
        "every page, every spelling asked, no decoy"
    );
    assert!(answered.iter().all(|k| !keys[3].iter().any(|m| m == k)));
    assert!(answer.ccpa_opt_out, "some opted out: the protective answer");
    let opted_out = keys[..3]
        .iter()
        .flatten()
        .filter(|k| gw.emulator().profile(k).unwrap()["ccpaOptOut"] == true)
        .count();
    assert_eq!(
        answer.profiles.iter().filter(|p| p.ccpa_opt_out).count(),
        opted_out
    );

    let none = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            email: "nobody@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
}

#[tokio::test]
async fn set_by_email_applies_to_every_profile_each_with_its_record() {
    let gw = quick(EmulatorConfig::default()).start().await;
    // Asked for as given, in lower case, and with the domain in lower case; `ADA@EXAMPLE.COM` is
    // the spelling a case-sensitive byEmail leaves out (the documented limitation).
    let keys = spelled(
        gw.emulator(),
        &[
            "Ada@EXAMPLE.com",
            "ada@example.com",
            "Ada@example.com",
            "ADA@EXAMPLE.COM",
        ],
        10,
        0,
    );

    let answer = gw
        .client()
        .set_opt_out(by_email("Ada@EXAMPLE.com", true, "email-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.request_id, "email-1");
    assert_eq!(answer.state, DeliveryState::Applied as i32);
    assert_eq!(answer.profiles.len(), 30);
    for profile in &answer.profiles {
        assert_eq!(profile.state, DeliveryState::Applied as i32);
        assert!(profile.request_id.starts_with("email-1:"));
    }
    for key in keys[..3].iter().flatten() {
        assert_eq!(gw.emulator().profile(key).unwrap()["ccpaOptOut"], true);
    }
    for key in &keys[3] {
        assert_eq!(gw.emulator().profile(key).unwrap()["ccpaOptOut"], false);
    }

    let parent = record(&mut gw.client(), "email-1").await;
    assert!(parent.by_email && parent.pkey.is_empty());
    assert_eq!(parent.state, DeliveryState::Applied as i32);
    let child = record(&mut gw.client(), &answer.profiles[0].request_id).await;
    assert_eq!(child.parent_request_id, "email-1");
    assert_eq!(child.pkey, answer.profiles[0].pkey);

    // A replay answers the same and calls nothing.
    let requests = gw.emulator().request_count();
    let again = gw
        .client()
        .set_opt_out(by_email("Ada@EXAMPLE.com", true, "email-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.profiles.len(), 30);
    assert_eq!(gw.emulator().request_count(), requests);
}

#[tokio::test]
async fn on_a_large_table_every_profile_of_an_address_is_opted_out_past_the_first_page() {
    // A production tenant's profile table, past XtkBigTableThreshold: ACS links a second page
    // only for a lookup that asks with `_forcePagination=true`, and the first page alone looks
    // like the whole answer.
    let gw = quick(EmulatorConfig {
        big_table_threshold: EmulatorConfig::LARGE_TABLE,
        ..Default::default()
    })
    .start()
    .await;
    // More than ACS's 25 a page, fewer than --max-profiles-per-email's 100.
    let mut keys: Vec<String> = (0..30)
        .map(|_| {
            gw.emulator().insert_profile(NewProfile {
                email: "ada@example.com".into(),
                ..Default::default()
            })
        })
        .collect();
    keys.sort_unstable();
    let someone_else = gw.emulator().insert_profile(NewProfile {
        email: "grace@example.com".into(),
        ..Default::default()
    });

    let answer = gw
        .client()
        .set_opt_out(by_email("ada@example.com", true, "large-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.state, DeliveryState::Applied as i32);
    let mut answered: Vec<String> = answer.profiles.iter().map(|p| p.pkey.clone()).collect();
    answered.sort_unstable();
    assert_eq!(answered, keys, "both pages, each profile once");
    for key in &keys {
        assert_eq!(
            gw.emulator().profile(key).unwrap()["ccpaOptOut"],
            true,
            "{key}"
        );
    }
    assert_eq!(
        gw.emulator().profile(&someone_else).unwrap()["ccpaOptOut"],
        false
    );

    let read = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            email: "ada@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.ccpa_opt_out);
    let mut read_keys: Vec<String> = read.profiles.iter().map(|p| p.pkey.clone()).collect();
    read_keys.sort_unstable();
    assert_eq!(read_keys, keys);
    assert!(read.profiles.iter().all(|p| p.ccpa_opt_out));

    // Two lookups of two pages each, every page asked for with the parameter.
    let lookups: Vec<String> = gw
        .emulator()
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/byEmail"))
        .map(|r| r.query.clone().unwrap_or_default())
        .collect();
    assert_eq!(lookups.len(), 4, "{lookups:?}");
    for query in &lookups {
        assert!(
            query.split('&').any(|pair| pair == "_forcePagination=true"),
            "{query}"
        );
    }
}

#[tokio::test]
async fn an_unknown_address_is_not_found_unless_the_profile_may_be_created() {
    let gw = quick(EmulatorConfig::default()).start().await;
    let status = gw
        .client()
        .set_opt_out(by_email("new@example.com", true, "new-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let failed = record(&mut gw.client(), "new-1").await;
    assert_eq!(failed.state, DeliveryState::Failed as i32);
    assert_eq!(failed.failure_reason, "no profile has this email address");
    assert_eq!(gw.emulator().profile_count(), 0);

    let created = gw
        .client()
        .set_opt_out(SetOptOutRequest {
            create_if_missing: true,
            ..by_email("new@example.com", true, "new-2")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.profiles.len(), 1);
    assert!(created.profiles[0].created);
    let pkey = &created.profiles[0].pkey;
    let stored = gw.emulator().profile(pkey).unwrap();
    assert_eq!(stored["email"], "new@example.com");
    assert_eq!(stored["ccpaOptOut"], true);
    let read = gw
        .client()
        .get_opt_out(GetOptOutRequest {
            email: "NEW@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(read.ccpa_opt_out);
}

#[tokio::test]
async fn email_requests_are_checked_before_anything_is_sent() {
    let gw = quick(EmulatorConfig::default()).start().await;
    let pkey = gw.emulator().insert_profile(NewProfile::default());
    for (request, field) in [
        (
            SetOptOutRequest {
                pkey: pkey.clone(),
                ..by_email("ada@example.com", true, "")
            },
            "email",
        ),
        (by_email("not an address", true, ""), "email"),
        (
            SetOptOutRequest {
                create_if_missing: true,
                pkey: pkey.clone(),
                email: String::new(),
                ..by_email("", true, "")
            },
            "create_if_missing",
        ),
        (
            SetOptOutRequest {
                email: String::new(),
                ..by_email("", true, "")
            },
            "pkey",
        ),
    ] {
        let status = gw.client().set_opt_out(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<String> = status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert!(fields.contains(&field.to_owned()), "{field}: {fields:?}");
    }
    assert_eq!(gw.emulator().request_count(), 0);
}

#[tokio::test]
async fn a_failed_lookup_is_unavailable_and_recorded_with_its_basis() {
    let gw = quick(EmulatorConfig::default()).start().await;
    duplicates(gw.emulator(), 3, 0);
    gw.emulator().set_faults(FaultSettings {
        unavailable: 1.0,
        ..Default::default()
    });
    let status = gw
        .client()
        .set_opt_out(by_email("ada@example.com", true, "lookup-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let failed = record(&mut gw.client(), "lookup-1").await;
    assert_eq!(failed.state, DeliveryState::Failed as i32);
    assert!(
        failed.failure_reason.contains("ACS_UNAVAILABLE"),
        "{failed:?}"
    );
}

fn item(pkey: &str, request_id: &str) -> BulkSetOptOutRequest {
    BulkSetOptOutRequest {
        item: Some(SetOptOutRequest {
            pkey: pkey.into(),
            ccpa_opt_out: Some(true),
            request_id: request_id.into(),
            source: RequestSource::GlobalPrivacyControl as i32,
            ..Default::default()
        }),
        record_only: false,
    }
}

#[tokio::test]
async fn a_bulk_stream_answers_each_item_and_one_bad_item_fails_alone() {
    let gw = quick(EmulatorConfig::default()).start().await;
    let mut items = Vec::new();
    let mut keys = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..300 {
        if i % 50 == 7 {
            items.push(item("not-a-key", &format!("bulk-bad-{i}")));
            keys.push(None);
        } else if i % 50 == 23 {
            // Well formed, but ACS has no such profile (any more): it fails at ACS, alone.
            let pkey = gw.emulator().insert_profile(NewProfile::default());
            assert!(gw.emulator().remove_profile(&pkey));
            items.push(item(&pkey, &format!("bulk-gone-{i}")));
            keys.push(None);
            unknown.push(i);
        } else {
            let pkey = gw.emulator().insert_profile(NewProfile::default());
            items.push(item(&pkey, &format!("bulk-{i}")));
            keys.push(Some(pkey));
        }
    }
    let answers = bulk(&mut gw.client(), items).await;
    assert_eq!(answers.len(), 300);
    let mut seen = vec![false; 300];
    for answer in answers {
        let index = usize::try_from(answer.index).unwrap();
        assert!(
            !std::mem::replace(&mut seen[index], true),
            "one answer per item"
        );
        match &keys[index] {
            None if unknown.contains(&index) => {
                let error = answer.error.as_ref().unwrap();
                assert_eq!(error.code, "NOT_FOUND", "{error:?}");
                assert_eq!(answer.request_id, format!("bulk-gone-{index}"));
            }
            None => {
                let error = answer.error.unwrap();
                assert_eq!(error.code, "INVALID_ARGUMENT");
                assert_eq!(error.fields, ["pkey"]);
                assert_eq!(answer.request_id, format!("bulk-bad-{index}"));
            }
            Some(pkey) => {
                assert!(answer.error.is_none(), "{answer:?}");
                assert_eq!(answer.request_id, format!("bulk-{index}"));
                assert!(
                    answer.state == DeliveryState::Applied as i32
                        || answer.state == DeliveryState::Pending as i32,
                    "{answer:?}"
                );
                assert_eq!(answer.profiles.len(), 1);
                assert_eq!(&answer.profiles[0].pkey, pkey);
            }
        }
    }
    until_settled(&mut gw.client()).await;
    for pkey in keys.iter().flatten() {
        assert_eq!(gw.emulator().profile(pkey).unwrap()["ccpaOptOut"], true);
    }
    let recorded = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(recorded.len(), 294, "bad items record nothing");
    for index in unknown {
        let failed = recorded
            .iter()
            .find(|r| r.request_id == format!("bulk-gone-{index}"))
            .unwrap();
        assert_eq!(failed.state, DeliveryState::Failed as i32, "{failed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_keeps_to_the_acs_throttle() {
    let gw = quick(EmulatorConfig::default())
        .adjust_acs(|acs| ClientConfig {
            call: CallSettings {
                throttle: ThrottleSettings {
                    max_rps: std::num::NonZeroU32::new(50).unwrap(),
                    max_in_flight: 4,
                    max_queued: 1_000,
                },
                ..Default::default()
            },
            ..acs
        })
        .start()
        .await;
    gw.emulator().set_faults(FaultSettings {
        latency: Duration::from_millis(20),
        ..Default::default()
    });
    // 60 items: 120 requests to ACS (a write and a read-back each), 2.4 s at 50 per second,
    // while the stream offers 32 items at once.
    let items: Vec<_> = (0..60)
        .map(|i| {
            item(
                &gw.emulator().insert_profile(NewProfile::default()),
                &format!("rate-{i}"),
            )
        })
        .collect();
    let answers = bulk(&mut gw.client(), items).await;
    assert_eq!(answers.len(), 60);
    assert!(answers.iter().all(|a| a.error.is_none()));
    // Items whose turn came after their attempt's budget answered PENDING; the deliverer
    // finishes them, under the same throttle.
    until_settled(&mut gw.client()).await;

    let requests = gw.emulator().requests();
    let patched = patches_per_profile(gw.emulator());
    assert_eq!(patched.len(), 60, "every profile written");
    let arrivals: Vec<std::time::Instant> = requests.iter().map(|r| r.received_at).collect();
    let busiest_second = common::busiest_second(&arrivals);
    assert!(
        busiest_second <= 51,
        "{busiest_second} requests in one second"
    );
    assert!(
        gw.emulator().peak_active_requests() <= 4,
        "{} at once",
        gw.emulator().peak_active_requests()
    );
}

#[tokio::test]
async fn a_cut_stream_loses_nothing_acknowledged_and_resumes_without_duplicates() {
    let gw = quick(EmulatorConfig::default()).start().await;
    // More items than the cut leaves the gateway holding (the answers read, its window of items
    // in progress, the channel's buffer), so that the cut stops some of them.
    let total = 150 + ccpa_gateway::api::bulk::BULK_CONCURRENCY + 100;
    let keys: Vec<String> = (0..total)
        .map(|_| gw.emulator().insert_profile(NewProfile::default()))
        .collect();

    // First stream: cut after 150 answers.
    let (sender, receiver) = mpsc::channel(16);
    let feeder = {
        let keys = keys.clone();
        tokio::spawn(async move {
            for (i, pkey) in keys.iter().enumerate() {
                if sender.send(item(pkey, &format!("cut-{i}"))).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut answers = gw
        .client()
        .bulk_set_opt_out(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 150 {
        let answer = answers.next().await.unwrap().unwrap();
        acknowledged.push(answer.request_id);
    }
    drop(answers);
    feeder.abort();

    for request_id in &acknowledged {
        let recorded = record(&mut gw.client(), request_id).await;
        assert_ne!(recorded.state, DeliveryState::Failed as i32);
    }
    // Items the gateway took but never answered are recorded too, and delivered.
    until_settled(&mut gw.client()).await;
    let before = patches_per_profile(gw.emulator());
    let applied_before: Vec<usize> = (0..keys.len())
        .filter(|i| before.contains_key(&keys[*i]))
        .collect();
    assert!(applied_before.len() >= 150, "{}", applied_before.len());
    assert!(applied_before.len() < total, "the cut stopped the rest");

    // Second stream: everything again, same ids.
    let items: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, pkey)| item(pkey, &format!("cut-{i}")))
        .collect();
    let answers = bulk(&mut gw.client(), items).await;
    assert_eq!(answers.len(), total);
    assert!(answers.iter().all(|a| a.error.is_none()));
    until_settled(&mut gw.client()).await;
    let listed = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.records.len(), total, "each request recorded once");
    for pkey in &keys {
        assert_eq!(gw.emulator().profile(pkey).unwrap()["ccpaOptOut"], true);
    }
    // What was delivered before the cut is not delivered again: the replay called nothing
    // for those profiles.
    let after = patches_per_profile(gw.emulator());
    for i in applied_before {
        assert_eq!(after[&keys[i]], before[&keys[i]], "cut-{i} was sent again");
    }
}

#[tokio::test]
async fn the_csv_command_records_a_file_once_however_often_it_runs() {
    let gw = quick(EmulatorConfig::default()).start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("opt-outs.csv");
    let mut csv = String::from("pkey,email,opt_out,source,received_at,request_id\n");
    let mut expected_ok = 0;
    for i in 0..120 {
        match i % 40 {
            // Invalid rows: no opt_out, an unknown source, a bad instant, a bad key.
            5 => csv.push_str(",ada@example.com,,gpc,,\n"),
            6 => csv.push_str(",ada@example.com,true,carrier-pigeon,,\n"),
            7 => csv.push_str(",ada@example.com,true,gpc,yesterday,\n"),
            8 => csv.push_str("bad-key,,true,phone,,\n"),
            9 => {
                // By email: the address's profiles.
                csv.push_str(",ada@example.com,true,web-form,2026-01-02T03:04:05Z,\n");
                expected_ok += 1;
            }
            _ => {
                let pkey = gw.emulator().insert_profile(NewProfile::default());
                csv.push_str(&format!("{pkey},,yes,GPC,,\n"));
                expected_ok += 1;
            }
        }
    }
    duplicates(gw.emulator(), 3, 0);
    std::fs::write(&file, csv).unwrap();

    let run = || async {
        common::cli::ccpa_gateway()
            .args(["bulk-set-opt-out", "--file"])
            .arg(&file)
            .args(["--addr", &format!("http://{}", gw.addr)])
            .output()
            .await
            .unwrap()
    };
    let first = run().await;
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(
        first.status.code(),
        Some(7),
        "some rows are invalid: {stderr}"
    );
    assert!(stderr.contains("120 rows"), "{stderr}");
    let results = std::fs::read_to_string(dir.path().join("opt-outs.csv.results.csv")).unwrap();
    let lines: Vec<&str> = results.lines().collect();
    assert_eq!(lines.len(), 121, "a header and a line per row");
    let ok = lines.iter().filter(|l| l.contains(",OK,")).count();
    let invalid = lines.iter().filter(|l| l.contains("INVALID")).count();
    assert_eq!(ok, expected_ok);
    assert_eq!(invalid, 120 - expected_ok);
    assert!(
        results.contains("INVALID_ROW"),
        "rows refused before sending"
    );
    assert!(
        results.contains("INVALID_ARGUMENT"),
        "rows refused by the gateway"
    );

    let mut client = gw.client().clone();
    until_settled(&mut client).await;
    let ledger = gw.ledger.clone();
    let count = || async {
        use futures::TryStreamExt;
        let records: Vec<_> = ledger.export(0, i64::MAX).try_collect().await.unwrap();
        records.len()
    };
    let recorded = count().await;
    let requests = gw.emulator().request_count();

    let second = run().await;
    assert_eq!(second.status.code(), Some(7));
    assert_eq!(
        count().await,
        recorded,
        "the same file records nothing twice"
    );
    let lookups = gw
        .emulator()
        .requests()
        .iter()
        .skip(requests)
        .filter(|r| r.method != "GET" || !r.path.ends_with("/byEmail"))
        .count();
    assert_eq!(
        lookups, 0,
        "replays call nothing in ACS but the email lookup"
    );
}

/// Runs `bulk-set-opt-out --file FILE` against the gateway at `addr`.
async fn bulk_csv(addr: std::net::SocketAddr, file: &std::path::Path) -> std::process::Output {
    common::cli::ccpa_gateway()
        .args(["bulk-set-opt-out", "--file"])
        .arg(file)
        .args(["--addr", &format!("http://{addr}")])
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap()
}

/// The results file of `file`, by line: `[request_id, outcome, code, message]`.
fn results_by_line(file: &std::path::Path) -> std::collections::BTreeMap<u64, [String; 4]> {
    let mut path = file.as_os_str().to_owned();
    path.push(".results.csv");
    let mut reader = csv::Reader::from_path(path).unwrap();
    assert_eq!(
        reader.headers().unwrap(),
        vec!["line", "request_id", "outcome", "code", "message"]
    );
    let mut by_line = std::collections::BTreeMap::new();
    for record in reader.records() {
        let record = record.unwrap();
        let line: u64 = record[0].parse().unwrap();
        let row = [1, 2, 3, 4].map(|i| record[i].to_owned());
        assert!(
            by_line.insert(line, row).is_none(),
            "line {line} answered twice"
        );
    }
    by_line
}

#[tokio::test]
async fn the_results_file_is_safe_in_a_spreadsheet_and_a_failure_to_write_it_fails_the_command() {
    let gw = quick(EmulatorConfig::default()).start().await;
    let keys: Vec<String> = (0..2)
        .map(|_| gw.emulator().insert_profile(NewProfile::default()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("formulas.csv");
    // Request ids and a value a spreadsheet would run as formulas.
    std::fs::write(
        &file,
        format!(
            "pkey,email,opt_out,source,received_at,request_id\n\
             {},,true,gpc,,=HYPERLINK(\"http://evil.example\")\n\
             {},,true,gpc,,@SUM(1+1)\n\
             {},,true,=cmd|calc!A0,,-2+3\n",
            keys[0], keys[1], keys[1]
        ),
    )
    .unwrap();
    let output = bulk_csv(gw.addr, &file).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(7),
        "one row is invalid: {stderr}"
    );
    let results = results_by_line(&file);
    assert_eq!(results[&2][0], "'=HYPERLINK(\"http://evil.example\")");
    assert_eq!(results[&3][0], "'@SUM(1+1)");
    assert_eq!(results[&4][0], "'-2+3");
    for [id, outcome, code, message] in results.values() {
        for cell in [id, outcome, code, message] {
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "{cell:?}"
            );
        }
    }

    // A results file that cannot be written (a full disk): the command fails, saying so.
    let output = common::cli::ccpa_gateway()
        .args(["bulk-set-opt-out", "--file"])
        .arg(&file)
        .args(["--results", "/dev/full"])
        .args(["--addr", &format!("http://{}", gw.addr)])
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--results"), "{stderr}");
}

#[tokio::test]
async fn the_csv_command_answers_a_bad_row_alone_at_its_own_line() {
    let gw = quick(EmulatorConfig::default()).start().await;
    let keys: Vec<String> = (0..8)
        .map(|i| {
            gw.emulator().insert_profile(NewProfile {
                // The last row opts back in: its profile starts opted out.
                ccpa_opt_out: i == 7,
                ..Default::default()
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("exported.csv");
    // A spreadsheet's export: a byte order mark, CRLF line ends, quotes where needed.
    let mut csv = b"\xEF\xBB\xBFpkey,email,opt_out,source,received_at,request_id\r\n".to_vec();
    for row in [
        format!("{},,true,gpc,,\r\n", keys[0]),                  // 2
        "\r\n".to_owned(),                                       // 3: blank, not a row
        format!("{},,yes,web-form,,\"csv-row,4\"\r\n", keys[1]), // 4
        format!("{},,true,phone\r\n", keys[2]),                  // 5: too few fields
        format!("{},,true,gpc,,,extra\r\n", keys[3]),            // 6: too many
        "   \r\n".to_owned(),                                    // 7: spaces only
        format!("{},,maybe,gpc,,\r\n", keys[4]),                 // 8: not a boolean
    ] {
        csv.extend_from_slice(row.as_bytes());
    }
    csv.extend_from_slice(format!("{},,true,email,,", keys[5]).as_bytes()); // 9: not UTF-8
    csv.extend_from_slice(b"\xFF\xFE\r\n");
    for row in [
        format!("{},,true,\"web\r\nform\",,\r\n", keys[6]), // 10-11: one field, two lines
        "\r\n".to_owned(),                                  // 12: blank
        format!("{},,0,internal,2026-01-02T03:04:05Z,\r\n", keys[7]), // 13
    ] {
        csv.extend_from_slice(row.as_bytes());
    }
    std::fs::write(&file, &csv).unwrap();
    let digest: String = sha2::Sha256::digest(&csv)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let generated = |line: u64| format!("bulk-{digest}-{line}");

    let output = bulk_csv(gw.addr, &file).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "rows were refused: {stderr}");
    assert!(stderr.contains("9 rows: "), "{stderr}");
    assert!(stderr.contains("6 ERROR"), "{stderr}");
    let results = results_by_line(&file);
    assert_eq!(
        results.keys().copied().collect::<Vec<_>>(),
        [2, 4, 5, 6, 7, 8, 9, 10, 13],
        "one result per row, at the row's own line: {results:#?}"
    );
    for (line, request_id) in [
        (2, generated(2)),
        (4, "csv-row,4".into()),
        (13, generated(13)),
    ] {
        let [id, outcome, code, _] = &results[&line];
        assert_eq!(id, &request_id, "line {line}");
        assert!(
            outcome == "APPLIED" || outcome == "PENDING",
            "line {line}: {outcome}"
        );
        assert_eq!(code, "OK", "line {line}");
    }
    for (line, problem) in [
        (5, "the row has 4 fields; the header has 6"),
        (6, "the row has 7 fields; the header has 6"),
        (7, "the row is empty"),
        (8, "opt_out must be true or false"),
        (9, "the row is not UTF-8"),
        (10, "source is not one of the known manners of request"),
    ] {
        let [id, outcome, code, message] = &results[&line];
        assert_eq!(id, &generated(line), "line {line}");
        assert_eq!(
            [outcome.as_str(), code, message],
            ["ERROR", "INVALID_ROW", problem],
            "line {line}"
        );
    }

    // The valid rows were applied; the others changed nothing and recorded nothing.
    until_settled(&mut gw.client()).await;
    for (key, opt_out) in [(&keys[0], true), (&keys[1], true), (&keys[7], false)] {
        let read = opt_out_of(&mut gw.client(), key).await;
        assert_eq!(read.ccpa_opt_out, opt_out, "{key}");
        assert!(!read.change_pending);
    }
    for key in &keys[2..7] {
        assert_eq!(
            gw.emulator().profile(key).unwrap()["ccpaOptOut"],
            false,
            "{key}"
        );
    }
    let recorded = record(&mut gw.client(), "csv-row,4").await;
    assert_eq!(recorded.pkey, keys[1]);
    assert_eq!(recorded.source, RequestSource::WebForm as i32);
    let recorded = record(&mut gw.client(), &generated(13)).await;
    assert_eq!(recorded.source, RequestSource::Internal as i32);
    assert_eq!(recorded.received_at.unwrap().seconds, 1_767_323_045);
    let listed = gw
        .client()
        .list_opt_out_records(ListOptOutRecordsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(listed.len(), 3, "only the valid rows are recorded");
}

#[tokio::test]
async fn the_csv_command_exits_7_when_a_row_failed() {
    let gw = quick(EmulatorConfig::default()).start().await;
    let dir = tempfile::tempdir().unwrap();

    // Refused: no profile has the address (NOT_FOUND, answered with an error).
    let unknown = dir.path().join("unknown.csv");
    std::fs::write(
        &unknown,
        "email,opt_out,source\nnobody@example.com,true,email\n",
    )
    .unwrap();
    let output = bulk_csv(gw.addr, &unknown).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "{stderr}");
    let [_, outcome, code, _] = &results_by_line(&unknown)[&2];
    assert_eq!([outcome.as_str(), code], ["ERROR", "NOT_FOUND"]);

    // Failed: by email, the one profile's delivery fails for good (ACS no longer has it). The
    // answer carries no error, only its state, FAILED.
    let pkey = gw.emulator().insert_profile(NewProfile {
        email: "ada@example.com".into(),
        ..Default::default()
    });
    let failing = dir.path().join("failing.csv");
    std::fs::write(
        &failing,
        "email,opt_out,source,request_id\nada@example.com,true,email,failing-1\n",
    )
    .unwrap();
    // The lookup goes through; the PATCH after it is answered 404.
    gw.emulator().inject(Fault::Delay(Duration::ZERO));
    gw.emulator().inject(Fault::json(
        404,
        serde_json::json!({"code": 404, "message": "RST-360011 An error has occurred"}),
    ));
    let output = bulk_csv(gw.addr, &failing).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let [id, outcome, _, message] = &results_by_line(&failing)[&2];
    assert_eq!([id.as_str(), outcome], ["failing-1", "FAILED"], "{stderr}");
    assert_eq!(message, "failed for the records failing-1:1", "{stderr}");
    assert_eq!(
        output.status.code(),
        Some(7),
        "a FAILED row fails: {stderr}"
    );
    assert!(stderr.contains("1 FAILED"), "{stderr}");
    let child = record(&mut gw.client(), "failing-1:1").await;
    assert_eq!(child.pkey, pkey);
    assert_eq!(child.state, DeliveryState::Failed as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_call_goes_before_a_record_only_backlog() {
    // Five requests a second: the deliverer's sixteen attempts at a time would keep a call
    // waiting for three seconds if it queued behind them, past its attempt's budget (800 ms).
    let gw = quick(EmulatorConfig::default())
        .options(ServerOptions {
            delivery: DeliverySettings {
                poll_interval: Duration::from_millis(100),
                attempt_budget: Duration::from_millis(800),
                ..Default::default()
            },
            ..Default::default()
        })
        .adjust_acs(|acs| ClientConfig {
            call: CallSettings {
                throttle: ThrottleSettings {
                    max_rps: std::num::NonZeroU32::new(5).unwrap(),
                    max_in_flight: 4,
                    max_queued: 1_000,
                },
                ..Default::default()
            },
            ..acs
        })
        .start()
        .await;
    let items: Vec<_> = (0..200)
        .map(|i| BulkSetOptOutRequest {
            record_only: true,
            ..item(
                &gw.emulator().insert_profile(NewProfile::default()),
                &format!("backlog-{i}"),
            )
        })
        .collect();
    let answers = bulk(&mut gw.client(), items).await;
    assert!(
        answers
            .iter()
            .all(|a| a.error.is_none() && a.state == DeliveryState::Pending as i32)
    );
    // The deliverer is working the backlog.
    eventually("PATCHes for three profiles of the backlog", || {
        let patched = patches_per_profile(gw.emulator());
        std::future::ready(if patched.len() >= 3 {
            Ok(())
        } else {
            Err(patched)
        })
    })
    .await;

    for n in 0..3 {
        let pkey = gw.emulator().insert_profile(NewProfile::default());
        let answer = gw
            .client()
            .set_opt_out(SetOptOutRequest {
                pkey: pkey.clone(),
                ccpa_opt_out: Some(true),
                request_id: format!("interactive-{n}"),
                source: RequestSource::WebForm as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.state,
            DeliveryState::Applied as i32,
            "applied in its own call: {answer:?}"
        );
        assert_eq!(gw.emulator().profile(&pkey).unwrap()["ccpaOptOut"], true);
    }
    let delivered = patches_per_profile(gw.emulator()).len();
    assert!(
        delivered < 200,
        "the backlog was still being worked ({delivered} profiles written)"
    );
}
