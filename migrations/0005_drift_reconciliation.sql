-- Drift reconciliation. A request that puts back what another system changed in ACS after the
-- gateway applied a consumer's request (source 'INTERNAL', caller 'reconciler') names the
-- request it restores.
ALTER TABLE opt_out_records ADD COLUMN restores_request_id TEXT;
CREATE INDEX opt_out_records_by_restored ON opt_out_records (restores_request_id);
-- Each profile whose latest resolved request was applied, and when ACS was last known to hold
-- it (when it was applied, or when the reconciler last re-read it): the reconciler re-reads the
-- longest unseen first. No personal data but the key, as in every other table.
CREATE TABLE reconcile_schedule (
    pkey       TEXT PRIMARY KEY,
    checked_at BIGINT NOT NULL
);
CREATE INDEX reconcile_schedule_by_time ON reconcile_schedule (checked_at);
INSERT INTO reconcile_schedule (pkey, checked_at)
    SELECT pkey, COALESCE(MAX(resolved_at), 0) FROM opt_out_records
    WHERE state = 'APPLIED' AND pkey IS NOT NULL GROUP BY pkey;
