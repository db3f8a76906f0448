//! The HTTP face of the emulator: ACS's paths, its gateway's checks, and its error bodies.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use serde_json::{Value, json};

use crate::store::{Changes, WriteError};
use crate::{Fault, MAX_RECORDED_REQUESTS, RecordedRequest, Shared, lock};

/// Larger bodies are refused before they are read: no profile write comes near this.
const MAX_BODY_BYTES: usize = 1024 * 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/{tenant}/campaign/profileAndServices/profile",
            post(create_profile),
        )
        .route(
            "/{tenant}/campaign/profileAndServices/profile/byEmail",
            get(profiles_by_email),
        )
        .route(
            "/{tenant}/campaign/profileAndServices/profile/{pkey}",
            get(read_profile).patch(update_profile),
        )
        .fallback(unknown_uri)
        .layer(middleware::from_fn_with_state(shared.clone(), front_door))
        // IMS is another service: none of the ACS gateway's checks or faults apply to it.
        .route("/ims/token/v3", post(crate::ims::issue_token))
        .with_state(shared)
}

/// ACS's own errors and its gateway's, with the bodies the reference records.
pub(crate) mod answers {
    use super::*;

    pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
        (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json;charset=utf-8"),
            )],
            body.to_string(),
        )
            .into_response()
    }

    pub(super) fn token_invalid() -> Response {
        json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"error_code": "401013", "message": "Oauth token is not valid"}),
        )
    }

    pub(super) fn api_key_invalid() -> Response {
        json_response(
            StatusCode::FORBIDDEN,
            &json!({"error_code": "403003", "message": "Api Key is invalid"}),
        )
    }

    pub(super) fn check_your_uri() -> Response {
        json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"code": 500, "message": "Oops. Something went wrong. Check your URI and try again."}),
        )
    }

    pub(super) fn unparsable_key() -> Response {
        json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({
                "code": 500,
                "message": "XTK-170036 Unable to parse expression 'PKey'. Check the primary key and try again."
            }),
        )
    }

    pub(super) fn unknown_key() -> Response {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({
                "code": 404,
                "message": "RST-360011 An error has occurred - please contact your administrator. Unable to find document."
            }),
        )
    }

    pub(super) fn refused_write(error: WriteError) -> Response {
        match error {
            WriteError::Malformed(reason) => json_response(
                StatusCode::BAD_REQUEST,
                &json!({"code": 400, "message": format!("Invalid request body: {reason}")}),
            ),
            WriteError::NotInEnumeration { field } => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({
                    "code": 500,
                    "message": format!(
                        "RST-360011 An error has occurred - please contact your administrator. The value is not valid for the '{field}' enumeration."
                    )
                }),
            ),
        }
    }
}

/// Everything ACS's API gateway does before a request reaches Campaign: it is recorded, latency
/// and faults (queued, else drawn at the configured rates) take effect, then the token and the
/// API key are checked. Faults that spoil an answer are applied to what Campaign answered.
async fn front_door(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let _active = ActiveRequest::enter(&shared);
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    record(&shared, &parts, &body);

    let settings = lock(&shared.fault_settings).clone();
    let fault = lock(&shared.faults).pop_front().or_else(|| settings.draw());
    let delay = settings.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(early) = apply_before_handling(fault.clone()).await {
        return early;
    }

    let now = std::time::Instant::now();
    let token_ok = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| lock(&shared.access_tokens).is_valid(token, now));
    if !token_ok {
        return answers::token_invalid();
    }
    let api_key_ok = parts
        .headers
        .get("x-api-key")
        .is_some_and(|v| v.as_bytes() == lock(&shared.api_key).as_bytes());
    if !api_key_ok {
        return answers::api_key_invalid();
    }

    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    apply_after_handling(fault, response).await
}

/// Counts requests being handled; dropped when the handler finishes or is abandoned (the client
/// went away).
struct ActiveRequest<'a>(&'a Shared);

impl<'a> ActiveRequest<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now_active = shared.active_requests.fetch_add(1, Ordering::SeqCst) + 1;
        shared
            .peak_active_requests
            .fetch_max(now_active, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Applies a fault that replaces or delays the handling; `Some` is the answer to send instead.
pub(crate) async fn apply_before_handling(fault: Option<Fault>) -> Option<Response> {
    match fault? {
        Fault::Respond {
            status,
            content_type,
            body,
            headers,
        } => Some(injected_response(status, content_type, body, headers)),
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            None
        }
        Fault::BreakAfterHeaders => Some(broken_response()),
        Fault::StallBody(_) | Fault::TruncateBody | Fault::MalformedBody => None,
    }
}

/// Applies a fault that spoils an answer already produced.
async fn apply_after_handling(fault: Option<Fault>, response: Response) -> Response {
    let Some(fault @ (Fault::StallBody(_) | Fault::TruncateBody | Fault::MalformedBody)) = fault
    else {
        return response;
    };
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let body = match fault {
        Fault::StallBody(stall) => Body::from_stream(futures::stream::once(async move {
            tokio::time::sleep(stall).await;
            Ok::<Bytes, std::io::Error>(bytes)
        })),
        Fault::TruncateBody => Body::from(bytes.slice(..bytes.len() / 2)),
        _ => Body::from("<<not json>>"),
    };
    Response::from_parts(parts, body)
}

fn record(shared: &Shared, parts: &axum::http::request::Parts, body: &Bytes) {
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    if !shared.config.record_requests {
        return;
    }
    let recorded = RecordedRequest {
        received_at: std::time::Instant::now(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    };
    let mut requests = lock(&shared.requests);
    if requests.len() == MAX_RECORDED_REQUESTS {
        requests.pop_front();
    }
    requests.push_back(recorded);
}

fn injected_response(
    status: u16,
    content_type: Option<String>,
    body: String,
    headers: Vec<(String, String)>,
) -> Response {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    if let Some(content_type) = content_type {
        response = response.header(header::CONTENT_TYPE, content_type);
    }
    for (name, value) in headers {
        response = response.header(name, value);
    }
    response
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A 200 whose body fails before its first byte: hyper then cuts the connection.
fn broken_response() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("injected connection break"))
    });
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=utf-8"),
        )],
        Body::from_stream(failing),
    )
        .into_response()
}

async fn unknown_uri() -> Response {
    answers::check_your_uri()
}

fn parse_changes(body: &Bytes) -> Result<Changes, WriteError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| WriteError::Malformed("the body is not valid JSON".into()))?;
    Changes::parse(&value)
}

async fn create_profile(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    if tenant != shared.config.tenant {
        return answers::check_your_uri();
    }
    let changes = match parse_changes(&body) {
        Ok(changes) => changes,
        Err(refusal) => return answers::refused_write(refusal),
    };
    let (_, rendered) = shared.insert(changes);
    answers::json_response(StatusCode::CREATED, &rendered)
}

async fn read_profile(
    State(shared): State<Arc<Shared>>,
    Path((tenant, pkey)): Path<(String, String)>,
) -> Response {
    if tenant != shared.config.tenant {
        return answers::check_your_uri();
    }
    let Some(id) = shared.codec.decode(&pkey) else {
        return answers::unparsable_key();
    };
    let rendered = {
        let profiles = lock(&shared.profiles);
        match profiles.get(&id) {
            Some(profile) => profile.render(&pkey, &shared.href(&pkey)),
            None => return answers::unknown_key(),
        }
    };
    let body = if shared.config.wrap_reads_in_collection {
        json!({
            "content": [rendered],
            "count": {"href": format!("{}/_count", shared.href(&pkey))},
            "serverSidePagination": true
        })
    } else {
        rendered
    };
    answers::json_response(StatusCode::OK, &body)
}

/// The query of `byEmail`.
#[derive(serde::Deserialize)]
struct ByEmail {
    email: String,
    #[serde(rename = "_lineCount")]
    line_count: Option<usize>,
    #[serde(rename = "_lineStart")]
    line_start: Option<String>,
    /// Where the next page starts when links carry no `_lineStart`
    /// (`Emulator::set_next_links_without_line_start`).
    #[serde(rename = "_cursor")]
    cursor: Option<String>,
    /// An opaque parameter of every next page's link, checked on the pages after the first: a
    /// client that rebuilds the link instead of following it loses it and is refused.
    #[serde(rename = "_listing")]
    listing: Option<String>,
    /// `true` asks for a `next` link even on a large table (`EmulatorConfig::big_table_threshold`).
    /// Kept as text: ACS documents only `true`, so any other value forces nothing here.
    #[serde(rename = "_forcePagination")]
    force_pagination: Option<String>,
}

/// ACS's page size when none is asked for.
const DEFAULT_LINE_COUNT: usize = 25;

/// `byEmail`: a page of profiles whose email starts with the given text, case included. ACS does
/// not document how it matches; the pessimistic model is that of the documented `byText` (a
/// case-sensitive prefix match), so that a client which does not check the whole address
/// itself, or which counts on ACS to ignore case, fails its tests.
///
/// On a large table (more profiles than `big_table_threshold`) the `next` link is left out unless
/// the request says `_forcePagination=true`: the answer then looks complete while it is only the
/// first page, which is how ACS truncates a lookup on a production tenant.
async fn profiles_by_email(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    axum::extract::Query(query): axum::extract::Query<ByEmail>,
) -> Response {
    if tenant != shared.config.tenant {
        return answers::check_your_uri();
    }
    let line_count = query
        .line_count
        .unwrap_or(DEFAULT_LINE_COUNT)
        .clamp(1, 1_000);
    let position = query.line_start.as_deref().or(query.cursor.as_deref());
    let offset = match position {
        None => 0,
        // A later page is served only to a request that kept every parameter of its link.
        Some(token) if query.listing.as_deref() == Some(shared.listing_token.as_str()) => {
            match decode_line_start(token) {
                Some(offset) => offset,
                None => return invalid_line_start(),
            }
        }
        Some(_) => return invalid_line_start(),
    };
    let (page, next_link) = {
        let profiles = lock(&shared.profiles);
        let large_table = profiles.len() > shared.config.big_table_threshold;
        let forced = query.force_pagination.as_deref() == Some("true");
        let mut ids: Vec<u64> = profiles
            .iter()
            .filter(|(_, p)| p.email().starts_with(&query.email))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let more = ids.len() > offset + line_count;
        let next_link = more && (forced || !large_table);
        let page: Vec<Value> = ids
            .iter()
            .skip(offset)
            .take(line_count)
            .filter_map(|id| {
                let pkey = shared.codec.encode(*id);
                profiles
                    .get(id)
                    .map(|p| p.render(&pkey, &shared.href(&pkey)))
            })
            .collect();
        (page, next_link)
    };
    let query_string = |extra: &[(&str, String)]| {
        let mut encoder = form_urlencoded::Serializer::new(String::new());
        encoder.append_pair("email", &query.email);
        for (name, value) in extra {
            encoder.append_pair(name, value);
        }
        encoder.finish()
    };
    let path = format!(
        "/{}/campaign/profileAndServices/profile/byEmail",
        shared.config.tenant
    );
    let mut body = json!({
        "content": page,
        "count": {"href": format!("{}{path}/_count?{}", shared.base_url, query_string(&[]))},
        "serverSidePagination": true,
    });
    if next_link {
        let position_name = if shared.next_links_without_line_start.load(Ordering::SeqCst) {
            "_cursor"
        } else {
            "_lineStart"
        };
        let next = format!(
            "{path}?{}",
            query_string(&[
                ("_lineCount", line_count.to_string()),
                (position_name, encode_line_start(offset + line_count)),
                ("_listing", shared.listing_token.clone()),
            ])
        );
        let href = if shared.config.relative_next_links {
            next
        } else {
            format!("{}{next}", shared.base_url)
        };
        body["next"] = json!({ "href": href });
    }
    answers::json_response(StatusCode::OK, &body)
}

fn invalid_line_start() -> Response {
    answers::json_response(
        StatusCode::BAD_REQUEST,
        &json!({"code": 400, "message": "Invalid _lineStart"}),
    )
}

/// `_lineStart` is opaque in ACS; here it hides an offset in standard base64, whose `+`, `/`
/// and `=` must be percent-encoded in a URL: a client that parses or rebuilds the token rather
/// than following the link as given is the more likely to spoil it.
fn encode_line_start(offset: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("offset:{offset}"))
}

fn decode_line_start(token: &str) -> Option<usize> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix("offset:")?
        .parse()
        .ok()
}

async fn update_profile(
    State(shared): State<Arc<Shared>>,
    Path((tenant, pkey)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if tenant != shared.config.tenant {
        return answers::check_your_uri();
    }
    let Some(id) = shared.codec.decode(&pkey) else {
        return answers::unparsable_key();
    };
    let changes = match parse_changes(&body) {
        Ok(changes) => changes,
        Err(refusal) => return answers::refused_write(refusal),
    };
    {
        let mut profiles = lock(&shared.profiles);
        let Some(profile) = profiles.get_mut(&id) else {
            return answers::unknown_key();
        };
        profile.apply(changes, Utc::now());
    }
    answers::json_response(
        StatusCode::OK,
        &json!({"PKey": pkey, "href": shared.href(&pkey)}),
    )
}
