-- The durable queue: one row per accepted message, one per recipient still owed a
-- result. A message row is deleted once none of its recipients is pending.
CREATE TABLE messages (
    queue_id        TEXT PRIMARY KEY,
    account         TEXT,
    mail_from       TEXT NOT NULL,
    received_at     REAL NOT NULL,
    expires_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    size_bytes      INTEGER NOT NULL,
    smtputf8        INTEGER NOT NULL DEFAULT 0,
    generated       INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    content         BLOB NOT NULL
);
CREATE INDEX messages_due ON messages (next_attempt_at);

CREATE TABLE recipients (
    queue_id   TEXT NOT NULL,
    address    TEXT NOT NULL,
    state      TEXT NOT NULL,
    smtp_code  INTEGER,
    status     TEXT,
    detail     TEXT,
    updated_at REAL,
    PRIMARY KEY (queue_id, address)
) WITHOUT ROWID;

-- Per-recipient delivery events (bounces now; the reputation counters read them).
CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL,
    account     TEXT,
    recipient   TEXT NOT NULL,
    queue_id    TEXT,
    occurred_at REAL NOT NULL,
    source      TEXT NOT NULL,
    smtp_code   INTEGER,
    status      TEXT,
    detail      TEXT,
    bounce_type TEXT,
    dedup_key   TEXT UNIQUE
);
CREATE INDEX events_account_time ON events (account, occurred_at);
