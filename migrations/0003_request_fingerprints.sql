-- A request by email, or a creation, holds content the ledger does not keep (an address, a
-- name). A salted digest of it tells a replay of the request id from its reuse for other content.
-- NULL for records written before this column, and for requests whose content is all kept.
ALTER TABLE opt_out_records ADD COLUMN fingerprint TEXT;
