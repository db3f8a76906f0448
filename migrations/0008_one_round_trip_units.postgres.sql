-- One round trip per unit of work (PostgreSQL only; SQLite's migration 8 creates nothing, see
-- 0008_one_round_trip_units.sqlite.sql). The gateway's hot units (recording a request, settling
-- an attempt, taking and giving back a profile's lease) were each a transaction of several
-- statements: a BEGIN, every statement and a COMMIT, each a round trip to the server, and each
-- a statement the server parses, plans and answers (about a dozen per SetOptOut). As functions,
-- each unit is one statement the gateway sends outside any transaction: the statement is its own
-- transaction, so the function's work commits (durably: synchronous_commit stays on) or is
-- undone as a whole, as the unit's transaction was. The statements inside are those the gateway
-- ran, in the same order, with the same meaning (src/store/intake.rs and leases.rs keep them for
-- a request id recorded before, the one path that stays multi-statement).
--
-- Every function reads and writes the ledger's tables by the caller's search_path, as the
-- gateway's own statements do; created here, they live in the schema those tables live in.

-- Takes the lease on a profile for `p_holder` unless someone holds it at `p_now` (ms; NULL: the
-- database's clock now), until then plus `p_lease_ms` (saturating, as the gateway's i64 add
-- did). Returns the lease's new generation, the fencing token that settling the attempt checks;
-- NULL when the lease is held by someone else.
CREATE FUNCTION ccpa_claim_lease(p_pkey TEXT, p_holder TEXT, p_lease_ms BIGINT, p_now BIGINT)
RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    v_now BIGINT := COALESCE(p_now, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT);
    v_generation BIGINT;
BEGIN
    INSERT INTO profile_leases (pkey, holder, expires_at, generation)
    VALUES (
        p_pkey,
        p_holder,
        LEAST(GREATEST(v_now::NUMERIC + p_lease_ms, -9223372036854775808),
              9223372036854775807)::BIGINT,
        1
    )
    ON CONFLICT (pkey) DO UPDATE SET holder = excluded.holder,
        expires_at = excluded.expires_at, generation = profile_leases.generation + 1
    WHERE profile_leases.expires_at < v_now
    RETURNING generation INTO v_generation;
    RETURN v_generation;
END
$$;

-- Gives a profile's lease back if `p_holder` still holds it at `p_generation`: it lapses at
-- once. The row stays, so that the next generation is higher than every earlier one.
-- PL/pgSQL, like the others, rather than SQL: before PostgreSQL 18 the body of a SQL function
-- that cannot be inlined (an UPDATE) is parsed and planned again at every call, where PL/pgSQL
-- keeps its plan for the session (measured: about an eighth of the server's CPU per SetOptOut).
CREATE FUNCTION ccpa_release_lease(p_pkey TEXT, p_holder TEXT, p_generation BIGINT)
RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE profile_leases SET expires_at = 0
    WHERE pkey = p_pkey AND holder = p_holder AND generation = p_generation;
END
$$;

-- Records a request unless its id is taken (src/store/intake.rs, `record_unit`): under the
-- profile's advisory lock (requests for one profile are recorded one at a time, so that each
-- sees the others), at `p_now` (ms; NULL: the database's clock, read once the profile is locked,
-- so that replicas with skewed clocks agree on the order of a profile's requests). A new request
-- overtaken by a newer one (pending or applied) already recorded for its profile is SUPERSEDED
-- at once (and counts as answered); otherwise it SUPERSEDES the profile's older pending ones.
-- With `p_claim_holder`, a new pending request also takes its profile's lease when it is free.
--
-- `outcome` is 'NEW' (the record as written), or 'EXISTS' when the id was recorded before:
-- nothing was written, the record is the one recorded under the id, and the gateway decides
-- (a replay, a conflicting reuse of the id, or a failed request by email to reopen, which it
-- does in a transaction of several statements: a rare path). `superseded` counts the requests
-- this one SUPERSEDED, or 1 when it was itself overtaken; `generation` is the lease's new
-- generation when it was taken here. The record's columns are those `Record::from_row` reads.
CREATE FUNCTION ccpa_record_request(
    p_request_id TEXT,
    p_kind TEXT,
    p_pkey TEXT,
    p_opt_out BIGINT,
    p_source TEXT,
    p_received_at BIGINT,
    p_caller TEXT,
    p_first_attempt_window_ms BIGINT,
    p_parent_request_id TEXT,
    p_fingerprint TEXT,
    p_answered BIGINT,
    p_restores_request_id TEXT,
    p_now BIGINT,
    p_claim_holder TEXT,
    p_claim_lease_ms BIGINT,
    OUT outcome TEXT,
    OUT superseded BIGINT,
    OUT generation BIGINT,
    OUT request_id TEXT,
    OUT kind TEXT,
    OUT pkey TEXT,
    OUT opt_out BIGINT,
    OUT source TEXT,
    OUT received_at BIGINT,
    OUT received_at_given BIGINT,
    OUT recorded_at BIGINT,
    OUT caller TEXT,
    OUT state TEXT,
    OUT answered_at BIGINT,
    OUT resolved_at BIGINT,
    OUT attempts BIGINT,
    OUT next_attempt_at BIGINT,
    OUT last_error TEXT,
    OUT failure_reason TEXT,
    OUT failure_code TEXT,
    OUT superseded_by TEXT,
    OUT parent_request_id TEXT,
    OUT fingerprint TEXT,
    OUT restores_request_id TEXT
)
LANGUAGE plpgsql AS $$
-- The output columns are named after the table's, which is what the gateway reads: inside the
-- statements, a name means the table's column.
#variable_conflict use_column
DECLARE
    v_now BIGINT;
    v_row opt_out_records;
    v_ordered_at BIGINT;
    v_newer TEXT;
BEGIN
    outcome := 'NEW';
    superseded := 0;
    IF p_pkey IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext(p_pkey));
    END IF;
    v_now := COALESCE(p_now, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT);

    INSERT INTO opt_out_records (request_id, kind, pkey, opt_out, source, received_at,
        received_at_given, recorded_at, caller, state, attempts, next_attempt_at,
        parent_request_id, fingerprint, answered_at, restores_request_id)
    VALUES (p_request_id, p_kind, p_pkey, p_opt_out, p_source, COALESCE(p_received_at, v_now),
        CASE WHEN p_received_at IS NULL THEN 0 ELSE 1 END, v_now, p_caller, 'PENDING', 0,
        v_now + p_first_attempt_window_ms, p_parent_request_id, p_fingerprint,
        CASE WHEN p_answered = 1 THEN v_now END, p_restores_request_id)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING * INTO v_row;

    IF NOT FOUND THEN
        outcome := 'EXISTS';
        SELECT * INTO v_row FROM opt_out_records WHERE request_id = p_request_id;
    ELSIF p_pkey IS NOT NULL THEN
        -- Ordered no later than it was recorded, whatever the caller stated (`ordered_at!`).
        v_ordered_at := CASE WHEN v_row.received_at > v_row.recorded_at
                AND v_row.restores_request_id IS NULL
            THEN v_row.recorded_at ELSE v_row.received_at END;
        SELECT r.request_id INTO v_newer FROM opt_out_records r
        WHERE r.pkey = p_pkey AND r.request_id <> p_request_id
          AND r.state IN ('PENDING', 'APPLIED')
          AND ((CASE WHEN r.received_at > r.recorded_at AND r.restores_request_id IS NULL
                  THEN r.recorded_at ELSE r.received_at END) > v_ordered_at
            OR ((CASE WHEN r.received_at > r.recorded_at AND r.restores_request_id IS NULL
                  THEN r.recorded_at ELSE r.received_at END) = v_ordered_at
                AND r.recorded_at > v_now))
        ORDER BY (CASE WHEN r.received_at > r.recorded_at AND r.restores_request_id IS NULL
                  THEN r.recorded_at ELSE r.received_at END) DESC, r.recorded_at DESC
        LIMIT 1;
        IF FOUND THEN
            UPDATE opt_out_records SET state = 'SUPERSEDED', superseded_by = v_newer,
                resolved_at = v_now, answered_at = v_now
            WHERE request_id = p_request_id
            RETURNING * INTO v_row;
            superseded := 1;
        ELSE
            UPDATE opt_out_records SET state = 'SUPERSEDED', superseded_by = p_request_id,
                resolved_at = v_now
            WHERE pkey = p_pkey AND state = 'PENDING' AND request_id <> p_request_id;
            GET DIAGNOSTICS superseded = ROW_COUNT;
        END IF;
    END IF;

    IF outcome = 'NEW' AND p_claim_holder IS NOT NULL AND v_row.pkey IS NOT NULL
        AND v_row.state = 'PENDING' THEN
        generation := ccpa_claim_lease(v_row.pkey, p_claim_holder, p_claim_lease_ms, v_now);
    END IF;

    request_id := v_row.request_id;
    kind := v_row.kind;
    pkey := v_row.pkey;
    opt_out := v_row.opt_out;
    source := v_row.source;
    received_at := v_row.received_at;
    received_at_given := v_row.received_at_given;
    recorded_at := v_row.recorded_at;
    caller := v_row.caller;
    state := v_row.state;
    answered_at := v_row.answered_at;
    resolved_at := v_row.resolved_at;
    attempts := v_row.attempts;
    next_attempt_at := v_row.next_attempt_at;
    last_error := v_row.last_error;
    failure_reason := v_row.failure_reason;
    failure_code := v_row.failure_code;
    superseded_by := v_row.superseded_by;
    parent_request_id := v_row.parent_request_id;
    fingerprint := v_row.fingerprint;
    restores_request_id := v_row.restores_request_id;
END
$$;

-- Records the outcome of an attempt to apply a request (src/store/leases.rs, `Ledger::settle`;
-- SQLite's `sqlite::units::settle_unit` runs the same statements), and
-- with a lease to give back (`p_fence_pkey` not empty: a lease is keyed by a profile's key,
-- never empty), gives it back. `p_outcome` is 'APPLIED' (`p_pkey`: a creation's new key),
-- 'FAILED' (`p_reason`, `p_code`) or 'RETRY' (`p_error`, `p_next_attempt_at`, `p_attempted`,
-- `p_acs_unavailable`); `p_answered` (1) also records that the caller is being answered now.
--
-- The fence: with a lease to give back, the outcome is recorded only while that lease is still
-- the profile's current one (its holder and generation), in the same statement. Returns
-- 'RECORDED'; 'LEASE_LOST' when another claim has taken the lease since (nothing changed);
-- 'NOT_PENDING' when the record was no longer pending (nothing changed but the lease, given
-- back).
CREATE FUNCTION ccpa_settle(
    p_request_id TEXT,
    p_outcome TEXT,
    p_now BIGINT,
    p_answered BIGINT,
    p_pkey TEXT,
    p_reason TEXT,
    p_code TEXT,
    p_error TEXT,
    p_next_attempt_at BIGINT,
    p_attempted BIGINT,
    p_acs_unavailable BIGINT,
    p_fence_pkey TEXT,
    p_fence_holder TEXT,
    p_fence_generation BIGINT
)
RETURNS TEXT
LANGUAGE plpgsql AS $$
DECLARE
    v_updated BIGINT;
BEGIN
    IF p_outcome = 'APPLIED' THEN
        -- A creation ACS answered is APPLIED with its key even if the ledger gave it up as
        -- abandoned meanwhile (`fail_abandoned`, on a clock that ran past its lease): ACS holds
        -- the profile and its opt-out, and a record without the key would leave that profile
        -- outside every read and reconciliation. The abandonment's basis stays in `last_error`.
        UPDATE opt_out_records SET state = 'APPLIED', resolved_at = p_now,
            attempts = attempts + 1, pkey = COALESCE(pkey, p_pkey),
            answered_at = CASE WHEN p_answered = 1 THEN COALESCE(answered_at, p_now)
                ELSE answered_at END,
            last_error = CASE WHEN state = 'FAILED' THEN failure_reason ELSE last_error END,
            failure_reason = NULL, failure_code = NULL
        WHERE request_id = p_request_id AND (state = 'PENDING' OR (state = 'FAILED'
            AND kind = 'CREATE_PROFILE' AND pkey IS NULL AND COALESCE(p_pkey, '') <> ''))
          AND (p_fence_pkey = '' OR EXISTS (SELECT 1 FROM profile_leases
            WHERE pkey = p_fence_pkey AND holder = p_fence_holder
              AND generation = p_fence_generation));
    ELSIF p_outcome = 'FAILED' THEN
        UPDATE opt_out_records SET state = 'FAILED', resolved_at = p_now,
            attempts = attempts + 1, failure_reason = p_reason, failure_code = p_code,
            answered_at = CASE WHEN p_answered = 1 THEN COALESCE(answered_at, p_now)
                ELSE answered_at END
        WHERE request_id = p_request_id AND state = 'PENDING'
          AND (p_fence_pkey = '' OR EXISTS (SELECT 1 FROM profile_leases
            WHERE pkey = p_fence_pkey AND holder = p_fence_holder
              AND generation = p_fence_generation));
    ELSIF p_outcome = 'RETRY' THEN
        UPDATE opt_out_records SET attempts = attempts + p_attempted, last_error = p_error,
            next_attempt_at = p_next_attempt_at, retry_when_acs_answers = p_acs_unavailable,
            answered_at = CASE WHEN p_answered = 1 THEN COALESCE(answered_at, p_now)
                ELSE answered_at END
        WHERE request_id = p_request_id AND state = 'PENDING'
          AND (p_fence_pkey = '' OR EXISTS (SELECT 1 FROM profile_leases
            WHERE pkey = p_fence_pkey AND holder = p_fence_holder
              AND generation = p_fence_generation));
    ELSE
        RAISE EXCEPTION 'ccpa_settle: unknown outcome %', p_outcome;
    END IF;
    GET DIAGNOSTICS v_updated = ROW_COUNT;

    IF v_updated = 1 THEN
        IF p_outcome = 'APPLIED' THEN
            -- ACS holds the profile's newest request now: the reconciler re-reads it an
            -- interval from here.
            INSERT INTO reconcile_schedule (pkey, checked_at)
            SELECT pkey, p_now FROM opt_out_records
            WHERE request_id = p_request_id AND pkey IS NOT NULL
            ON CONFLICT (pkey) DO UPDATE SET checked_at = excluded.checked_at;
        END IF;
        IF p_fence_pkey <> '' THEN
            PERFORM ccpa_release_lease(p_fence_pkey, p_fence_holder, p_fence_generation);
        END IF;
        RETURN 'RECORDED';
    END IF;
    -- Nothing recorded: tell a lost lease (whose holder now applies the profile) from a record
    -- no longer pending.
    IF p_fence_pkey = '' THEN
        RETURN 'NOT_PENDING';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM profile_leases WHERE pkey = p_fence_pkey
            AND holder = p_fence_holder AND generation = p_fence_generation) THEN
        RETURN 'LEASE_LOST';
    END IF;
    PERFORM ccpa_release_lease(p_fence_pkey, p_fence_holder, p_fence_generation);
    RETURN 'NOT_PENDING';
END
$$;
