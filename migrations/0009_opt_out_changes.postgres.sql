-- The opt-out change feed (WatchOptOutChanges): one row each time a consumer request of a
-- profile is recorded, and each time its state changes. Written by a trigger, in the statement
-- (so the unit of work) that changes the record: no path that writes a record can forget it,
-- and a change is never seen without its record's write, or the other way round.
--
-- Order without gaps. Several gateways write at once, and transactions commit out of the order
-- of their sequence values: a reader that followed `position` alone could pass a change still
-- uncommitted and never see it. So each change carries its transaction's id (`tx`, assigned in
-- the order transactions first write), and the feed is read in (tx, position) order, only below
-- the oldest transaction still running (`pg_snapshot_xmin`): everything there has committed or
-- never will, and no new change can appear before it. A transaction held open holds the feed
-- back until it ends, and then its changes come first.
--
-- What a watcher needs is copied in, not joined: the change says what the request was when it
-- changed, and outlives no record (retention prunes changes older than the records it prunes).
-- A record with no profile key (a request by email itself, whose profiles have records of their
-- own; a creation ACS has not made yet) has no change until it has a key.
CREATE TABLE opt_out_changes (
    position    BIGSERIAL PRIMARY KEY,
    tx          BIGINT NOT NULL DEFAULT (pg_current_xact_id()::TEXT::BIGINT),
    request_id  TEXT NOT NULL,
    pkey        TEXT NOT NULL,
    opt_out     BIGINT NOT NULL,
    source      TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    state       TEXT NOT NULL,
    changed_at  BIGINT NOT NULL,
    honored_at  BIGINT
);
CREATE INDEX opt_out_changes_in_order ON opt_out_changes (tx, position);
CREATE INDEX opt_out_changes_by_age ON opt_out_changes (changed_at);

-- Where retention has pruned the feed up to (a cursor at or before it has lost changes): one row.
CREATE TABLE opt_out_changes_pruned (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    tx       BIGINT NOT NULL,
    position BIGINT NOT NULL
);
INSERT INTO opt_out_changes_pruned (only_row, tx, position) VALUES (1, 0, 0);

CREATE FUNCTION ccpa_note_change() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO opt_out_changes (request_id, pkey, opt_out, source, received_at, state,
        changed_at, honored_at)
    VALUES (NEW.request_id, NEW.pkey, NEW.opt_out, NEW.source, NEW.received_at, NEW.state,
        CASE WHEN TG_OP = 'INSERT' THEN NEW.recorded_at
            ELSE COALESCE(NEW.resolved_at, NEW.recorded_at) END,
        CASE WHEN NEW.state = 'APPLIED' THEN NEW.resolved_at END);
    RETURN NULL;
END
$$;

CREATE TRIGGER opt_out_changes_on_record AFTER INSERT ON opt_out_records
FOR EACH ROW WHEN (NEW.pkey IS NOT NULL)
EXECUTE FUNCTION ccpa_note_change();

CREATE TRIGGER opt_out_changes_on_state AFTER UPDATE OF state, pkey ON opt_out_records
FOR EACH ROW WHEN (NEW.pkey IS NOT NULL
    AND (OLD.state IS DISTINCT FROM NEW.state OR OLD.pkey IS NULL))
EXECUTE FUNCTION ccpa_note_change();

-- The ledger's history so far: each retained record's current state, in the order recorded.
INSERT INTO opt_out_changes (request_id, pkey, opt_out, source, received_at, state, changed_at,
    honored_at)
SELECT request_id, pkey, opt_out, source, received_at, state,
    COALESCE(resolved_at, recorded_at), CASE WHEN state = 'APPLIED' THEN resolved_at END
FROM opt_out_records WHERE pkey IS NOT NULL ORDER BY recorded_at, request_id;
