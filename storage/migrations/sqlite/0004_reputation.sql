-- The reputation counters: per account, per hour (unix time // 3600), per kind of
-- event, how many. Event rows count themselves (the trigger below), in the same
-- transaction that records them, and a repeated dedup_key inserts nothing, so
-- counts nothing. "sent" has no event rows (one per delivered recipient would be
-- far too many): the delivery attempt adds to its bucket directly.
CREATE TABLE counter_buckets (
    account TEXT NOT NULL,
    hour    INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (account, hour, kind)
) WITHOUT ROWID;
CREATE INDEX counter_buckets_hour ON counter_buckets (hour);

-- Events recorded before this migration count too.
INSERT INTO counter_buckets (account, hour, kind, count)
SELECT account, CAST(occurred_at / 3600 AS INTEGER), kind, COUNT(*)
FROM events WHERE account IS NOT NULL GROUP BY 1, 2, 3;

CREATE TRIGGER events_count AFTER INSERT ON events
WHEN NEW.account IS NOT NULL
BEGIN
    INSERT INTO counter_buckets (account, hour, kind, count)
    VALUES (NEW.account, CAST(NEW.occurred_at / 3600 AS INTEGER), NEW.kind, 1)
    ON CONFLICT (account, hour, kind) DO UPDATE SET count = count + 1;
END;

-- Each account's standing: ok, warning, throttled or suspended, why, and since
-- when. An account without a row is ok. judged_from: rates count only the hours
-- after it (a reinstatement starts the account afresh).
CREATE TABLE account_states (
    account     TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    statistic   TEXT,
    changed_at  REAL NOT NULL,
    changed_by  TEXT NOT NULL,
    judged_from REAL
) WITHOUT ROWID;

-- Every change of state: automatic ones and an operator's. Never updated.
CREATE TABLE account_state_changes (
    id         INTEGER PRIMARY KEY,
    account    TEXT NOT NULL,
    old_state  TEXT NOT NULL,
    new_state  TEXT NOT NULL,
    reason     TEXT NOT NULL,
    statistic  TEXT,
    changed_at REAL NOT NULL,
    changed_by TEXT NOT NULL
);
CREATE INDEX account_state_changes_account ON account_state_changes (account, id);

-- Spamtrap addresses: mail to one is a spamtrap hit for the account.
CREATE TABLE spamtraps (
    address  TEXT PRIMARY KEY COLLATE NOCASE,
    source   TEXT NOT NULL,
    added_at REAL NOT NULL
) WITHOUT ROWID;

-- Feedback mail the relay could not attribute (or read), kept for inspection.
CREATE TABLE unattributed_feedback (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    mail_from   TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    content     BLOB NOT NULL
);
