-- A request made by email fans out: one record for the request itself (kind 'SET_BY_EMAIL',
-- no profile key, no email) and one per profile found, linked to it here.
ALTER TABLE opt_out_records ADD COLUMN parent_request_id TEXT;
CREATE INDEX opt_out_records_by_parent ON opt_out_records (parent_request_id);
