-- The exclusion list. One row per (address, scope, reason); scope is '' for an
-- entry that applies to every account, else the account name. The primary key
-- leads with the address, so the lookup at RCPT ("address = ? AND scope IN
-- ('', ?)") is one index search however long the list grows. Addresses match
-- without regard to case (NOCASE, ASCII): Jane@example.org who unsubscribed is
-- not mailed as jane@example.org.
CREATE TABLE suppressions (
    address    TEXT NOT NULL COLLATE NOCASE,
    scope      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at REAL NOT NULL,
    note       TEXT NOT NULL DEFAULT '',
    expires_at REAL,
    PRIMARY KEY (address, scope, reason)
) WITHOUT ROWID;
-- Listing one account's entries in key order (the index holds the key too).
CREATE INDEX suppressions_scope ON suppressions (scope);

-- Every removal from the list: who, when and why. Never updated or deleted.
CREATE TABLE suppression_removals (
    id         INTEGER PRIMARY KEY,
    address    TEXT NOT NULL COLLATE NOCASE,
    scope      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    removed_by TEXT NOT NULL,
    removed_at REAL NOT NULL,
    why        TEXT NOT NULL
);
CREATE INDEX suppression_removals_address ON suppression_removals (address);

-- The consent ledger: one record per account and address. The key leads with
-- the address, so "every account's record for this address" is indexed too.
CREATE TABLE consents (
    account        TEXT NOT NULL,
    address        TEXT NOT NULL COLLATE NOCASE,
    collected_at   REAL NOT NULL,
    source         TEXT NOT NULL,
    opt_in         TEXT NOT NULL,
    collection_url TEXT NOT NULL DEFAULT '',
    ip             TEXT NOT NULL DEFAULT '',
    confirmed_at   REAL,
    statement      TEXT NOT NULL DEFAULT '',
    relationship   TEXT NOT NULL DEFAULT '',
    recorded_at    REAL NOT NULL,
    PRIMARY KEY (address, account)
) WITHOUT ROWID;
