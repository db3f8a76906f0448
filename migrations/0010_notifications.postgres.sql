-- Notifications to third parties (`--recipients`): one row per consumer request and recipient,
-- written by a trigger in the statement (so the unit of work) that records the request, so that
-- no recorded request can lack its notifications, whichever path records it; then delivered,
-- at least once, by whichever gateway holds the row's lease. The SQLite text of this migration
-- says what each column means, and why the key starts with `created_at`; the tables are the
-- same.
CREATE TABLE notification_recipients (
    id         TEXT PRIMARY KEY,
    opt_out    BIGINT NOT NULL,
    opt_in     BIGINT NOT NULL,
    active     BIGINT NOT NULL,
    added_at   BIGINT NOT NULL,
    changed_at BIGINT NOT NULL
);

CREATE TABLE opt_out_notifications (
    request_id         TEXT NOT NULL,
    recipient          TEXT NOT NULL,
    state              TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    attempts           BIGINT NOT NULL,
    next_attempt_at    BIGINT NOT NULL,
    lease_holder       TEXT,
    lease_until        BIGINT,
    delivered_at       BIGINT,
    failed_at          BIGINT,
    last_failure_class TEXT,
    failure_reason     TEXT,
    email_sha256       TEXT,
    PRIMARY KEY (created_at, request_id, recipient)
);
CREATE INDEX opt_out_notifications_due ON opt_out_notifications (recipient, next_attempt_at)
    WHERE state = 'PENDING';
CREATE INDEX opt_out_notifications_pending_by_age ON opt_out_notifications (created_at)
    WHERE state = 'PENDING';

CREATE FUNCTION ccpa_note_notifications() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO opt_out_notifications (request_id, recipient, state, created_at, attempts,
        next_attempt_at)
    SELECT NEW.request_id, r.id, 'PENDING', NEW.recorded_at, 0, NEW.recorded_at
    FROM notification_recipients r
    WHERE r.active = 1 AND (CASE WHEN NEW.opt_out = 1 THEN r.opt_out ELSE r.opt_in END) = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER opt_out_notifications_on_record AFTER INSERT ON opt_out_records
FOR EACH ROW WHEN (NEW.kind IN ('SET_OPT_OUT', 'SET_BY_EMAIL') AND NEW.parent_request_id IS NULL
    AND NEW.restores_request_id IS NULL AND NEW.state <> 'SUPERSEDED')
EXECUTE FUNCTION ccpa_note_notifications();
