//! The generated client and its hand-written hooks, over HTTP against the emulator.

use std::sync::Arc;

use acs_emulator::{Emulator, EmulatorConfig, Fault, NewProfile};
use acs_profile_client::{
    AccessToken, ApiError, Client, ClientConfig, ConfigError, Failure, SharedToken, types,
};
use serde_json::json;

fn client_for(emulator: &Emulator, tokens: Arc<SharedToken>) -> Client {
    let config = emulator.config();
    Client::from_config(ClientConfig::new(
        emulator.url(),
        config.tenant.clone(),
        config.api_key.clone(),
        tokens,
    ))
    .expect("valid configuration")
}

fn default_tokens() -> Arc<SharedToken> {
    Arc::new(SharedToken::new(AccessToken::new(
        EmulatorConfig::DEFAULT_ACCESS_TOKEN,
    )))
}

async fn started() -> (Emulator, Client) {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let client = client_for(&emulator, default_tokens());
    (emulator, client)
}

fn ada() -> NewProfile {
    NewProfile {
        email: "ada@example.com".into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        ccpa_opt_out: false,
    }
}

#[tokio::test]
async fn every_request_carries_acs_headers_and_no_api_version() {
    let (emulator, client) = started().await;
    let pkey = emulator.insert_profile(ada());

    client.read_profile(&pkey, None).await.unwrap();
    client.set_ccpa_opt_out(&pkey, true, None).await.unwrap();
    client
        .create_profile(&types::ProfileInput {
            email: Some("new@example.com".into()),
            ..Default::default()
        })
        .await
        .unwrap();

    let requests = emulator.requests();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(
            request.header("authorization"),
            Some("Bearer emulator-access-token"),
            "{} {}",
            request.method,
            request.path
        );
        assert_eq!(request.header("x-api-key"), Some("emulator-api-key"));
        assert_eq!(request.header("cache-control"), Some("no-cache"));
        assert_eq!(
            request.header("content-type"),
            Some("application/json;charset=utf-8")
        );
        assert_eq!(request.header("api-version"), None);
    }
    assert_eq!(requests[0].method, "GET");
    assert_eq!(
        requests[0].path,
        format!("/emulated-tenant/campaign/profileAndServices/profile/{pkey}")
    );
}

#[tokio::test]
async fn opt_out_patch_sends_exactly_the_flag_and_answers_a_reference() {
    let (emulator, client) = started().await;
    let pkey = emulator.insert_profile(ada());

    let reference = client.set_ccpa_opt_out(&pkey, true, None).await.unwrap();

    let patch = emulator.requests().pop().unwrap();
    assert_eq!(patch.method, "PATCH");
    assert_eq!(&patch.body[..], br#"{"ccpaOptOut":true}"#);
    assert_eq!(reference.p_key.as_deref(), Some(pkey.as_str()));
    assert!(reference.href.unwrap().ends_with(&pkey));

    let profile = client.read_profile(&pkey, None).await.unwrap().unwrap();
    assert_eq!(profile.ccpa_opt_out, Some(true));
    assert_eq!(profile.email.as_deref(), Some("ada@example.com"));
    let changed_at = profile.ccpa_opt_out_last_modified.unwrap();
    assert!(
        chrono_like(&changed_at),
        "ACS timestamp form expected, got {changed_at}"
    );
}

/// `2020-07-31 11:19:00.304Z`: a date, a space, a time with milliseconds, and `Z`.
fn chrono_like(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 24 && bytes[10] == b' ' && bytes[19] == b'.' && text.ends_with('Z')
}

#[tokio::test]
async fn creation_answers_201_with_the_new_profile() {
    let (emulator, client) = started().await;
    let created = client
        .create_profile(&types::ProfileInput {
            email: Some("new@example.com".into()),
            first_name: Some("New".into()),
            ccpa_opt_out: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let profile = created.into_inner();
    let pkey = profile.p_key.unwrap();
    assert_eq!(profile.ccpa_opt_out, Some(true));
    assert_eq!(emulator.profile(&pkey).unwrap()["email"], "new@example.com");
    let post = emulator.requests().pop().unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(
        sent,
        json!({"email": "new@example.com", "firstName": "New", "ccpaOptOut": true})
    );
}

#[tokio::test]
async fn reads_accept_a_profile_wrapped_in_a_collection() {
    let emulator = Emulator::start(EmulatorConfig {
        wrap_reads_in_collection: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = client_for(&emulator, default_tokens());
    let pkey = emulator.insert_profile(NewProfile {
        ccpa_opt_out: true,
        ..ada()
    });
    let profile = client.read_profile(&pkey, None).await.unwrap().unwrap();
    assert_eq!(profile.ccpa_opt_out, Some(true));
}

#[tokio::test]
async fn the_token_is_read_again_for_every_request() {
    let (emulator, _) = started().await;
    let tokens = default_tokens();
    let client = client_for(&emulator, tokens.clone());
    let pkey = emulator.insert_profile(ada());
    client.read_profile(&pkey, None).await.unwrap();

    emulator.add_access_token("rotated-token");
    emulator.revoke_access_token(EmulatorConfig::DEFAULT_ACCESS_TOKEN);
    let refused = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(Failure::classify(&refused), Failure::TokenRejected);

    tokens.replace(AccessToken::new("rotated-token"));
    assert!(client.read_profile(&pkey, None).await.unwrap().is_some());
}

/// One GET, without the call rules (no retry, no refresh): what the hooks alone make of an answer.
async fn read_once(client: &Client, pkey: &str) -> Result<Option<types::Profile>, ApiError> {
    Ok(client.get_profile(pkey).await?.into_inner().into_profile())
}

fn status_of(error: &ApiError) -> Option<u16> {
    error.status().map(|s| s.as_u16())
}

#[tokio::test]
async fn non_json_error_bodies_keep_their_status() {
    let (emulator, client) = started().await;
    let pkey = emulator.insert_profile(ada());

    emulator.inject(Fault::html(502));
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(status_of(&error), Some(502));
    assert!(matches!(error, acs_profile_client::Error::ErrorResponse(_)));
    assert_eq!(
        Failure::classify(&error),
        Failure::Transient {
            status: reqwest_status(502)
        }
    );

    emulator.inject(Fault::empty(401));
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(status_of(&error), Some(401));
    assert_eq!(Failure::classify(&error), Failure::TokenRejected);

    // A JSON error that is not an object is not ACS's shape either.
    emulator.inject(Fault::json(503, json!(["overloaded"])));
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(status_of(&error), Some(503));
}

fn reqwest_status(code: u16) -> http::StatusCode {
    http::StatusCode::from_u16(code).unwrap()
}

#[tokio::test]
async fn replaced_error_bodies_say_what_arrived_but_not_its_content() {
    let (emulator, client) = started().await;
    let pkey = emulator.insert_profile(ada());
    emulator.inject(Fault::Respond {
        status: 502,
        content_type: Some("text/html".into()),
        body: "<p>secret-person@example.com</p>".into(),
        headers: vec![],
    });
    let acs_profile_client::Error::ErrorResponse(response) =
        read_once(&client, &pkey).await.unwrap_err()
    else {
        panic!("expected an error response");
    };
    let message = response.message.clone().unwrap();
    assert!(message.contains("text/html"), "{message}");
    assert!(!message.contains("secret-person"), "{message}");
}

#[tokio::test]
async fn acs_errors_are_classified() {
    let (emulator, client) = started().await;
    let pkey = emulator.insert_profile(ada());

    let other = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let foreign = other.insert_profile(ada());
    let error = read_once(&client, &foreign).await.unwrap_err();
    assert_eq!(status_of(&error), Some(500));
    assert_eq!(Failure::classify(&error), Failure::UnparsableKey);

    emulator.remove_profile(&pkey);
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(Failure::classify(&error), Failure::NotFound);

    // A 404 that is not ACS's own answer about a profile (a proxy's page, another host's JSON)
    // says nothing about the profile.
    emulator.inject(Fault::html(404));
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(Failure::classify(&error), Failure::EndpointNotFound);
    emulator.inject(Fault::json(
        404,
        json!({"code": 404, "message": "Not Found"}),
    ));
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(Failure::classify(&error), Failure::EndpointNotFound);
    assert!(!Failure::classify(&error).is_transient());

    emulator.inject(Fault::json(
        500,
        json!({"code": 500, "message": "PGS-220000 PostgreSQL error: duplicate key"}),
    ));
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(Failure::classify(&error), Failure::Conflict);

    emulator.inject(Fault::json(500, json!({"code": 500, "message": "Oops."})));
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(
        Failure::classify(&error),
        Failure::ServerError {
            status: reqwest_status(500)
        }
    );
    assert!(!Failure::classify(&error).is_transient());

    emulator.inject(Fault::BreakAfterHeaders);
    let error = read_once(&client, &pkey).await.unwrap_err();
    assert_eq!(
        Failure::classify(&error),
        Failure::Interrupted { timed_out: false }
    );
}

#[tokio::test]
async fn wrong_credentials_and_tenant_are_told_apart() {
    let (emulator, _) = started().await;
    let pkey = emulator.insert_profile(ada());

    let wrong_key = Client::from_config(ClientConfig::new(
        emulator.url(),
        emulator.config().tenant.clone(),
        "not-the-key",
        default_tokens(),
    ))
    .unwrap();
    let error = read_once(&wrong_key, &pkey).await.unwrap_err();
    assert_eq!(status_of(&error), Some(403));
    assert_eq!(Failure::classify(&error), Failure::AccessDenied);

    let wrong_tenant = Client::from_config(ClientConfig::new(
        emulator.url(),
        "someone-else",
        emulator.config().api_key.clone(),
        default_tokens(),
    ))
    .unwrap();
    let error = read_once(&wrong_tenant, &pkey).await.unwrap_err();
    assert_eq!(status_of(&error), Some(500));
    let acs_profile_client::Error::ErrorResponse(response) = &error else {
        panic!("expected an error response, got {error:?}");
    };
    assert!(response.mentions("Check your URI"));
}

#[tokio::test]
async fn an_unreachable_acs_is_reported_as_such() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::from_config(ClientConfig::new(
        format!("http://{closed_port}"),
        "tenant",
        "key",
        default_tokens(),
    ))
    .unwrap();
    let error = read_once(&client, "@abc").await.unwrap_err();
    assert_eq!(Failure::classify(&error), Failure::Unreachable);
    assert!(Failure::classify(&error).is_transient());
}

#[test]
fn bad_configuration_is_refused_with_the_setting_named() {
    let build = |base: &str, tenant: &str, key: &str| {
        Client::from_config(ClientConfig::new(base, tenant, key, default_tokens())).map(|_| ())
    };
    assert!(matches!(
        build("not a url", "t", "k"),
        Err(ConfigError::BaseUrl(_))
    ));
    assert!(matches!(
        build("ftp://example.com", "t", "k"),
        Err(ConfigError::BaseUrl(_))
    ));
    assert_eq!(
        build("https://mc.adobe.io", "a/b", "k"),
        Err(ConfigError::Tenant)
    );
    assert_eq!(
        build("https://mc.adobe.io", "", "k"),
        Err(ConfigError::Tenant)
    );
    assert_eq!(
        build("https://mc.adobe.io", "t", ""),
        Err(ConfigError::ApiKey)
    );
    assert_eq!(
        acs_profile_client::tenant_base_url("https://mc.adobe.io/", "acme-mkt-stage1"),
        Ok("https://mc.adobe.io/acme-mkt-stage1/campaign".to_owned())
    );
}

#[test]
fn debug_output_shows_no_secret() {
    let client = Client::from_config(ClientConfig::new(
        "https://mc.adobe.io",
        "tenant",
        "super-secret-api-key",
        Arc::new(SharedToken::new(AccessToken::new("super-secret-token"))),
    ))
    .unwrap();
    let debug = format!("{client:?}");
    assert!(!debug.contains("super-secret"), "{debug}");
}

#[tokio::test]
async fn profiles_by_email_follows_every_page_and_matches_the_whole_address() {
    for relative_next_links in [false, true] {
        let emulator = Emulator::start(EmulatorConfig {
            relative_next_links,
            ..Default::default()
        })
        .await
        .unwrap();
        let client = client_for(&emulator, default_tokens());
        // As asked, all in lower case (both found), and a local part cased otherwise, which a
        // case-sensitive ACS does not answer to any of the spellings asked for.
        let spellings = ["ada@EXAMPLE.com", "ada@example.com", "Ada@Example.COM"];
        let mut expected = Vec::new();
        let mut missed = Vec::new();
        for i in 0..60 {
            let pkey = emulator.insert_profile(NewProfile {
                email: spellings[i % 3].into(),
                ..Default::default()
            });
            if i % 3 == 2 {
                missed.push(pkey);
            } else {
                expected.push(pkey);
            }
            // Addresses ACS's filter also returns, which are not this one.
            emulator.insert_profile(NewProfile {
                email: "ada@example.com.evil.test".into(),
                ..Default::default()
            });
        }
        emulator.insert_profile(NewProfile {
            email: "grace@example.com".into(),
            ..Default::default()
        });

        let found = client
            .profiles_by_email("ada@EXAMPLE.com", None)
            .await
            .unwrap();
        let mut keys: Vec<String> = found.iter().map(|p| p.p_key.clone().unwrap()).collect();
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected, "relative links: {relative_next_links}");
        assert!(keys.iter().all(|k| !missed.contains(k)));
        let queries = by_email_queries(&emulator);
        assert_eq!(
            queries.len(),
            5,
            "20 as given on one page, then 20 and 60 decoys in lower case at 25 a page"
        );
        assert_eq!(queries[0], "_forcePagination=true&email=ada%40EXAMPLE.com");
        assert_eq!(queries[1], "_forcePagination=true&email=ada%40example.com");
        assert!(
            client
                .profiles_by_email("nobody@example.com", None)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

#[tokio::test]
async fn a_profile_answered_for_two_spellings_is_listed_once() {
    let (emulator, client) = started().await;
    let pkey = emulator.insert_profile(ada());
    // What an ACS that ignores case would answer to the first spelling asked (`ADA@...`): the
    // same profile the lower-case spelling finds next.
    emulator.inject(Fault::json(
        200,
        json!({"content": [emulator.profile(&pkey).unwrap()]}),
    ));
    let found = client
        .profiles_by_email("ADA@example.com", None)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].p_key.as_deref(), Some(pkey.as_str()));
    assert_eq!(by_email_queries(&emulator).len(), 2);
}

#[tokio::test]
async fn a_retry_after_beyond_any_deadline_means_no_retry() {
    let (emulator, client) = started().await;
    let pkey = emulator.insert_profile(ada());
    // Seconds at the end of u64, and the last date HTTP can write: far past any deadline, and
    // the first past the end of the clock.
    for retry_after in ["18446744073709551615", "Fri, 31 Dec 9999 23:59:59 GMT"] {
        let before = emulator.request_count();
        emulator.inject(
            Fault::json(503, json!({"error_code": "503000", "message": "Too busy"}))
                .with_header("Retry-After", retry_after),
        );
        let started = std::time::Instant::now();
        let error = client.read_profile(&pkey, None).await.unwrap_err();
        let acs_profile_client::CallError::Api(error) = error else {
            panic!("ACS's answer expected, got {error:?}");
        };
        assert_eq!(status_of(&error), Some(503), "{retry_after}");
        assert_eq!(emulator.request_count() - before, 1, "not retried");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}

/// The byEmail requests the emulator received, with their queries as sent.
fn by_email_queries(emulator: &Emulator) -> Vec<String> {
    emulator
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/byEmail"))
        .map(|r| r.query.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn next_links_are_followed_as_given_whatever_they_hold() {
    for (relative_next_links, without_line_start) in [(false, false), (true, true), (false, true)] {
        let emulator = Emulator::start(EmulatorConfig {
            relative_next_links,
            ..Default::default()
        })
        .await
        .unwrap();
        emulator.set_next_links_without_line_start(without_line_start);
        let client = client_for(&emulator, default_tokens());
        for _ in 0..80 {
            emulator.insert_profile(ada());
        }

        let found = client
            .profiles_by_email("ada@example.com", None)
            .await
            .unwrap();
        let case = format!("relative: {relative_next_links}, no _lineStart: {without_line_start}");
        assert_eq!(found.len(), 80, "nothing truncated ({case})");

        let queries = by_email_queries(&emulator);
        assert_eq!(queries.len(), 4, "80 at 25 a page ({case})");
        assert_eq!(queries[0], "_forcePagination=true&email=ada%40example.com");
        let position = if without_line_start {
            "_cursor="
        } else {
            "_lineStart="
        };
        for query in &queries[1..] {
            // The link's own parameters, which the client has no reason to know, all went back.
            assert!(query.contains("_lineCount=25"), "{query}");
            assert!(query.contains("&_listing="), "{query}");
            // Not in the emulator's links (nor, as documented, in ACS's): added to each.
            assert!(query.ends_with("&_forcePagination=true"), "{query}");
            assert!(query.contains(position), "{query}");
            assert_eq!(
                query.contains("_lineStart="),
                !without_line_start,
                "{query}"
            );
        }
    }
}

#[tokio::test]
async fn a_rebuilt_next_link_is_refused_by_the_emulator() {
    // What the emulator makes of a client that keeps `_lineStart` and drops the rest: a 400,
    // so the test above would catch one.
    let (emulator, client) = started().await;
    for _ in 0..30 {
        emulator.insert_profile(ada());
    }
    let first = client
        .list_profiles_by_email(None, None, None, "ada@example.com")
        .await
        .unwrap()
        .into_inner();
    let href = first.next.and_then(|n| n.href).unwrap();
    let url = reqwest::Url::parse(&href).unwrap();
    let line_start = url
        .query_pairs()
        .find(|(name, _)| name == "_lineStart")
        .map(|(_, value)| value.into_owned())
        .unwrap();
    assert!(line_start.parse::<u64>().is_err(), "an opaque token");
    let rebuilt = client
        .list_profiles_by_email(None, None, Some(&line_start), "ada@example.com")
        .await
        .unwrap_err();
    assert_eq!(status_of(&rebuilt), Some(400));
}

/// Whether a byEmail query, as sent, says `_forcePagination=true`.
fn forces_pagination(query: &str) -> bool {
    reqwest::Url::parse(&format!("http://query.test/?{query}"))
        .unwrap()
        .query_pairs()
        .any(|(name, value)| name == "_forcePagination" && value == "true")
}

#[tokio::test]
async fn on_a_large_table_every_page_is_asked_for_with_force_pagination() {
    for relative_next_links in [false, true] {
        let emulator = Emulator::start(EmulatorConfig {
            relative_next_links,
            big_table_threshold: EmulatorConfig::LARGE_TABLE,
            ..Default::default()
        })
        .await
        .unwrap();
        let client = client_for(&emulator, default_tokens());
        // Four pages: a page asked for without the parameter ends the lookup there, the second
        // and third included (the emulator's links never carry it).
        let mut expected: Vec<String> = (0..80).map(|_| emulator.insert_profile(ada())).collect();

        let found = client
            .profiles_by_email("ada@example.com", None)
            .await
            .unwrap();
        let mut keys: Vec<String> = found.iter().map(|p| p.p_key.clone().unwrap()).collect();
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected, "relative links: {relative_next_links}");
        let queries = by_email_queries(&emulator);
        assert_eq!(queries.len(), 4, "80 at 25 a page");
        for query in &queries {
            assert!(forces_pagination(query), "{query}");
        }
    }
}

#[tokio::test]
async fn a_large_table_answers_no_next_link_unless_pagination_is_forced() {
    // The emulator's model of ACS past XtkBigTableThreshold, through the generated operation.
    let emulator = Emulator::start(EmulatorConfig {
        big_table_threshold: EmulatorConfig::LARGE_TABLE,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = client_for(&emulator, default_tokens());
    for _ in 0..60 {
        emulator.insert_profile(ada());
    }
    for force_pagination in [None, Some(false)] {
        let page = client
            .list_profiles_by_email(force_pagination, None, None, "ada@example.com")
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.content.len(), 25, "{force_pagination:?}");
        assert!(
            page.next.is_none(),
            "a first page that looks like the only one"
        );
    }
    let first = client
        .list_profiles_by_email(Some(true), None, None, "ada@example.com")
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.content.len(), 25);
    let href = first.next.and_then(|n| n.href).unwrap();
    assert!(!href.contains("_forcePagination"), "{href}");

    // The link followed exactly as written, without the parameter: the second page is answered
    // and ends the listing, 10 profiles short.
    let second: serde_json::Value = reqwest::Client::new()
        .get(&href)
        .bearer_auth(EmulatorConfig::DEFAULT_ACCESS_TOKEN)
        .header("X-Api-Key", EmulatorConfig::DEFAULT_API_KEY)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["content"].as_array().unwrap().len(), 25);
    assert!(second.get("next").is_none(), "{second}");

    // A small table (ACS's default threshold) links its pages whether asked or not.
    let (small, client) = started().await;
    for _ in 0..30 {
        small.insert_profile(ada());
    }
    let page = client
        .list_profiles_by_email(None, None, None, "ada@example.com")
        .await
        .unwrap()
        .into_inner();
    assert!(page.next.is_some());
}

#[tokio::test]
async fn a_next_link_to_another_origin_is_not_followed() {
    let (emulator, client) = started().await;
    let elsewhere = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let foreign = format!(
        "{}/emulated-tenant/campaign/profileAndServices/profile/byEmail?email=ada%40example.com&_lineStart=x",
        elsewhere.url()
    );
    emulator.inject(Fault::json(
        200,
        json!({"content": [], "next": {"href": foreign}}),
    ));
    let error = client
        .profiles_by_email("ada@example.com", None)
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, acs_profile_client::CallError::Api(_)),
        "{message}"
    );
    assert_eq!(elsewhere.request_count(), 0, "the token went nowhere else");
    assert!(
        !message.contains("ada"),
        "the address is not quoted: {message}"
    );
}

/// ACS writes empty strings for missing values, in fields the spec would otherwise type as
/// numbers (`age` of a profile without a birth date): the profile must still read.
#[test]
fn a_profile_with_empty_strings_for_missing_values_reads() {
    for age in [json!(""), json!(0), json!(42)] {
        let profile: types::Profile = serde_json::from_value(json!({
            "PKey": "@abc",
            "email": "",
            "birthDate": "",
            "age": age,
            "gender": "unknown",
            "ccpaOptOut": true,
            "ccpaOptOutLastModified": "",
            "someFieldAddedLater": {"x": 1}
        }))
        .unwrap();
        assert_eq!(profile.ccpa_opt_out, Some(true));
    }
}

/// The crate's example, compiled here as it is, so that the suite runs it: it ends without an
/// error only if every call it makes succeeds.
#[path = "../examples/opt_out.rs"]
mod opt_out_example;

#[test]
fn the_opt_out_example_runs() {
    if let Err(error) = opt_out_example::main() {
        panic!("the example failed: {error}");
    }
}
