-- Notifications to third parties (`--recipients`): one row per consumer request and recipient,
-- written by a trigger in the statement (so the unit of work) that records the request, so that
-- no recorded request can lack its notifications, whichever path records it; then delivered,
-- at least once, by whichever gateway holds the row's lease.
--
-- The recipients as the ledger knows them: their ids and the kinds of request each asked for,
-- written by each gateway when it loads the recipients file. Their URLs and secrets stay in the
-- file: the ledger holds no secret. A recipient taken out of the file stays here, inactive, so
-- that its notifications still pending keep their name.
CREATE TABLE notification_recipients (
    id         TEXT PRIMARY KEY,
    -- 1 when it asked for opt-outs, for opt-ins.
    opt_out    BIGINT NOT NULL,
    opt_in     BIGINT NOT NULL,
    -- 1 while the recipients file names it: requests recorded meanwhile are notified to it.
    active     BIGINT NOT NULL,
    added_at   BIGINT NOT NULL,
    changed_at BIGINT NOT NULL
);

-- A consumer's own request (SetOptOut, or SetOptOut by email for the request itself, not the
-- records of the profiles it found), neither a restore by the reconciler (a request of the
-- business's, putting back one already notified) nor one overtaken as it was recorded (an older
-- request that changes nothing). `email_sha256` (for a request by email: hex SHA-256 of the
-- normalised address, what third parties match consumers by) is kept only until the
-- notification is delivered or fails for good.
--
-- Keyed by when the request was recorded first: rows are written at the end of the key's order,
-- so a commit of many requests writes a few pages of this table, not one page per request (as a
-- key led by the random request id would). Who knows the request knows when it was recorded.
CREATE TABLE opt_out_notifications (
    request_id         TEXT NOT NULL,
    recipient          TEXT NOT NULL,
    -- 'PENDING', 'DELIVERED' or 'FAILED'.
    state              TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    attempts           BIGINT NOT NULL,
    next_attempt_at    BIGINT NOT NULL,
    -- Who is delivering it, until when (a lapsed lease may be taken by another gateway).
    lease_holder       TEXT,
    lease_until        BIGINT,
    delivered_at       BIGINT,
    failed_at          BIGINT,
    -- The last failed attempt's class ('timeout', 'connection', 'http_503', ...), and for FAILED,
    -- why no further attempt is made.
    last_failure_class TEXT,
    failure_reason     TEXT,
    email_sha256       TEXT,
    PRIMARY KEY (created_at, request_id, recipient)
) WITHOUT ROWID;
CREATE INDEX opt_out_notifications_due ON opt_out_notifications (recipient, next_attempt_at)
    WHERE state = 'PENDING';
CREATE INDEX opt_out_notifications_pending_by_age ON opt_out_notifications (created_at)
    WHERE state = 'PENDING';

CREATE TRIGGER opt_out_notifications_on_record AFTER INSERT ON opt_out_records
WHEN NEW.kind IN ('SET_OPT_OUT', 'SET_BY_EMAIL') AND NEW.parent_request_id IS NULL
    AND NEW.restores_request_id IS NULL AND NEW.state <> 'SUPERSEDED'
BEGIN
    INSERT INTO opt_out_notifications (request_id, recipient, state, created_at, attempts,
        next_attempt_at)
    SELECT NEW.request_id, r.id, 'PENDING', NEW.recorded_at, 0, NEW.recorded_at
    FROM notification_recipients r
    WHERE r.active = 1 AND (CASE WHEN NEW.opt_out = 1 THEN r.opt_out ELSE r.opt_in END) = 1;
END;
