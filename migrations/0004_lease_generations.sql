-- A fencing token for each profile's lease: the generation goes up every time the lease is
-- taken, and is never reset (a released lease keeps its row, expired), so that whoever settles
-- an attempt can tell whether the lease it was made under is still the current one.
ALTER TABLE profile_leases ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
