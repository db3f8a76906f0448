-- A pending request whose back-off came from ACS being unavailable (5xx, 429, timeouts, refused
-- connections, a bare 404): it becomes due at once when ACS answers again, rather than waiting
-- out a back-off of minutes. 0 for every other request, and for rows written by earlier
-- versions (they wait out their back-off, as before).
ALTER TABLE opt_out_records ADD COLUMN retry_when_acs_answers BIGINT NOT NULL DEFAULT 0;
