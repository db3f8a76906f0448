//! BulkSetOptOut: SetOptOut over a stream, with bounded memory.
//!
//! At most [`BULK_CONCURRENCY`] items are in progress at once; the next item is read from the
//! stream only when one finishes, so HTTP/2 flow control holds the rest back at the caller
//! (back-pressure), however long the stream. Each item is answered once it is recorded in the
//! ledger (and, unless it is `record_only`, once applied or its attempt ran out): an answered
//! item is never lost, and an unanswered one can be resent with its request id. Items already taken when the stream breaks are still carried to their end (see
//! `service::to_completion`). One item's failure is that item's answer; the stream goes on.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use futures::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;

use super::opt_out::SetRequest;
use super::service::{CcpaApi, authorize_set, to_completion};
use super::validation::Violations;
use crate::access::Caller;
use crate::proto::ccpa_v1::{BulkSetOptOutRequest, BulkSetOptOutResponse, ItemError};
use crate::proto::error_reasons::{code_from_name, code_name};

/// Items in progress at once in one stream: enough to keep the throttle toward ACS busy and to
/// fill the ledger's group commits (items waiting for one commit share it: with 32, a stream of
/// `record_only` items was bounded by 32 items per fsync), few enough that a stream holds little
/// memory (an item in progress holds under 10 KB: 2.5 MB a stream).
pub const BULK_CONCURRENCY: usize = 256;

/// The answers of a BulkSetOptOut stream.
pub type BulkStream = Pin<Box<dyn Stream<Item = Result<BulkSetOptOutResponse, Status>> + Send>>;

/// Counts a stream's items, and writes its log line when the stream ends (or is dropped).
struct StreamLog {
    started: Instant,
    items: AtomicU64,
    failed: AtomicU64,
    /// The caller's stream broke (its items ended with an error).
    broken: AtomicBool,
    /// Every item was answered and the caller's stream ended cleanly.
    finished: AtomicBool,
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        // Dropped before its end: the caller went away or its stream broke.
        let code = if self.finished.load(Ordering::Relaxed) {
            Code::Ok
        } else {
            Code::Cancelled
        };
        tracing::info!(
            rpc = "BulkSetOptOut",
            code = ?code,
            items = self.items.load(Ordering::Relaxed),
            failed_items = self.failed.load(Ordering::Relaxed),
            latency_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "rpc"
        );
    }
}

/// An item's outcome as labelled: `OK`, or its error's code as go-grpc-prometheus spells codes.
fn item_outcome(answer: &BulkSetOptOutResponse) -> &'static str {
    let Some(error) = &answer.error else {
        return "OK";
    };
    crate::telemetry::rpc::code_label(code_from_name(&error.code))
}

/// An item's failure, as the stream answers it: code, message, reason, fields at fault.
fn item_error(status: &Status) -> ItemError {
    ItemError {
        code: code_name(status.code()),
        message: status.message().to_owned(),
        reason: status
            .get_details_error_info()
            .map(|info| info.reason)
            .unwrap_or_default(),
        fields: status
            .get_details_bad_request()
            .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default(),
    }
}

impl CcpaApi {
    /// The answers to a stream of items.
    pub(super) fn bulk(
        &self,
        caller: Caller,
        metadata: MetadataMap,
        items: Streaming<BulkSetOptOutRequest>,
    ) -> BulkStream {
        let log = Arc::new(StreamLog {
            started: Instant::now(),
            items: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        });
        let seen_broken = log.clone();
        let end = log.clone();
        let api = self.clone();
        let metadata = Arc::new(metadata);
        let caller = Arc::new(caller);
        let answers = items
            // A broken inbound stream ends the work: nothing after it is read.
            .take_while(move |item| {
                if item.is_err() {
                    seen_broken.broken.store(true, Ordering::Relaxed);
                }
                futures::future::ready(item.is_ok())
            })
            .filter_map(|item| futures::future::ready(item.ok()))
            .enumerate()
            .map(move |(index, item)| {
                let api = api.clone();
                let metadata = metadata.clone();
                let caller = caller.clone();
                let log = log.clone();
                async move {
                    let delivery = api.delivery.clone();
                    let work = async move {
                        Ok::<_, Status>(api.bulk_item(index as u64, item, &caller, &metadata).await)
                    };
                    let answer = match to_completion(&delivery, work).await {
                        Ok(answer) => answer,
                        Err(status) => BulkSetOptOutResponse {
                            index: index as u64,
                            error: Some(item_error(&status)),
                            ..Default::default()
                        },
                    };
                    metrics::counter!(
                        crate::telemetry::metrics::BULK_ITEMS_TOTAL,
                        "outcome" => item_outcome(&answer),
                    )
                    .increment(1);
                    log.items.fetch_add(1, Ordering::Relaxed);
                    if answer.error.is_some() {
                        log.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(answer)
                }
            })
            .buffer_unordered(BULK_CONCURRENCY);
        let answers = answers.chain(futures::stream::poll_fn(move |_| {
            // Reached once every answer is out.
            if !end.broken.load(Ordering::Relaxed) {
                end.finished.store(true, Ordering::Relaxed);
            }
            std::task::Poll::Ready(None)
        }));
        Box::pin(answers)
    }

    async fn bulk_item(
        &self,
        index: u64,
        item: BulkSetOptOutRequest,
        caller: &Caller,
        metadata: &MetadataMap,
    ) -> BulkSetOptOutResponse {
        let failed = |request_id: String, status: &Status| BulkSetOptOutResponse {
            index,
            request_id,
            state: 0,
            error: Some(item_error(status)),
            profiles: Vec::new(),
        };
        let Some(request) = item.item else {
            let mut violations = Violations::default();
            violations.missing("item", "item is required".to_owned());
            let status = violations
                .into_result()
                .err()
                .unwrap_or_else(|| Status::invalid_argument("item is required"));
            return failed(String::new(), &status);
        };
        let given_id = request.request_id.clone();
        // A denied item is that item's answer; the stream goes on.
        if let Err(status) = authorize_set(caller, &request) {
            return failed(given_id, &status);
        }
        let now_ms = self.delivery.ledger().now_ms();
        let parsed = SetRequest::parse(request, caller, metadata, now_ms).and_then(|parsed| {
            if item.record_only {
                parsed.record_only()
            } else {
                Ok(parsed)
            }
        });
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(status) => return failed(given_id, &status),
        };
        // No deadline of its own: the stream's own, if any, bounds everything; each item gets
        // one attempt's budget, then answers PENDING (or, `record_only`, answers PENDING once
        // recorded).
        match self.set_parsed(&parsed, None).await {
            Ok(answer) => BulkSetOptOutResponse {
                index,
                request_id: answer.request_id,
                state: answer.state,
                error: None,
                profiles: answer.profiles,
            },
            Err(status) => failed(parsed.request_id().to_owned(), &status),
        }
    }
}
