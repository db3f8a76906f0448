-- Indexes that cost what they serve (issue #25).
--
-- Each profile's requests in the order the ledger applies them (`ordered_at!()` in the code,
-- then `recorded_at`): the newest pending or applied request, which intake, the deliverer and
-- every read of a profile ask for, is the first entry of an index scan, whatever the profile's
-- history holds. Before, each of those queries read every pending and applied record of the
-- profile to sort them, a cost that grew with the history. The expression must stay exactly the
-- code's, or the planner does not match it (a test checks the plans).
CREATE INDEX opt_out_records_in_order ON opt_out_records (
    pkey,
    (CASE WHEN received_at > recorded_at AND restores_request_id IS NULL
     THEN recorded_at ELSE received_at END),
    recorded_at
);
-- The queries that filter on state look for pending requests, a handful at any time, while
-- nearly every record is resolved: indexes of the pending ones alone stay a few pages, which a
-- batch of writes dirties once, where indexes of every record by state were written on a random
-- page at each insert and again when the request resolved. A profile's other queries use the
-- index above.
DROP INDEX opt_out_records_by_profile;
CREATE INDEX opt_out_records_pending ON opt_out_records (pkey) WHERE state = 'PENDING';
DROP INDEX opt_out_records_due;
CREATE INDEX opt_out_records_due ON opt_out_records (next_attempt_at) WHERE state = 'PENDING';
-- The pending requests by age (the overdue clock every minute, `records --overdue`): without
-- it, those queries walked the index by time through every record received before the cutoff.
CREATE INDEX opt_out_records_pending_by_age ON opt_out_records (received_at)
    WHERE state = 'PENDING';
-- Only parts of a request by email have a parent, and only restores restore: the other records
-- need no entry.
DROP INDEX opt_out_records_by_parent;
CREATE INDEX opt_out_records_by_parent ON opt_out_records (parent_request_id)
    WHERE parent_request_id IS NOT NULL;
DROP INDEX opt_out_records_by_restored;
CREATE INDEX opt_out_records_by_restored ON opt_out_records (restores_request_id)
    WHERE restores_request_id IS NOT NULL;
