-- The opt-out ledger: one row per consumer request, kept as the CCPA record (11 CCR 7101).
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL. Instants are milliseconds since the
-- Unix epoch (UTC); flags are 0 or 1. No email, name or request body is ever stored.
CREATE TABLE opt_out_records (
    request_id        TEXT PRIMARY KEY,
    -- 'SET_OPT_OUT' or 'CREATE_PROFILE'.
    kind              TEXT NOT NULL,
    -- The ACS profile key; NULL until ACS has created the profile of a CREATE_PROFILE request.
    pkey              TEXT,
    -- The requested value: 1 to opt out of sale, 0 to opt back in.
    opt_out           BIGINT NOT NULL,
    -- The manner of the request ('GLOBAL_PRIVACY_CONTROL', 'WEB_FORM', ...).
    source            TEXT NOT NULL,
    -- When the consumer made the request, and whether the caller said so (1) or it is the time
    -- the gateway received it (0).
    received_at       BIGINT NOT NULL,
    received_at_given BIGINT NOT NULL,
    recorded_at       BIGINT NOT NULL,
    -- The calling service.
    caller            TEXT NOT NULL,
    -- 'PENDING', 'APPLIED', 'FAILED' or 'SUPERSEDED'.
    state             TEXT NOT NULL,
    answered_at       BIGINT,
    resolved_at       BIGINT,
    attempts          BIGINT NOT NULL,
    next_attempt_at   BIGINT NOT NULL,
    last_error        TEXT,
    -- For FAILED: the basis of the response, and the gRPC code the caller was given.
    failure_reason    TEXT,
    failure_code      TEXT,
    superseded_by     TEXT
);

-- Per-profile order, the protective read, and the history of a profile.
CREATE INDEX opt_out_records_by_profile ON opt_out_records (pkey, state, received_at);
-- The deliverer's queue.
CREATE INDEX opt_out_records_due ON opt_out_records (state, next_attempt_at);
-- Audits, exports and listing by time.
CREATE INDEX opt_out_records_by_time ON opt_out_records (received_at, request_id);

-- One deliverer at a time per profile, across replicas: a lease that expires when its holder
-- dies, so that changes to a profile reach ACS in the order consumers made them.
CREATE TABLE profile_leases (
    pkey       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
