-- What the relay keeps of each account's message to trace feedback back to it:
-- a bounce's VERP token names the queue id (and hints at the recipient), an abuse
-- report quotes X-Relay-Id or the Message-ID. One row per queued copy, written in
-- the transaction that queues it, pruned after the reputation window (at least
-- 60 days). recipients: canonical addresses, one per line.
CREATE TABLE sent_messages (
    queue_id    TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    message_id  TEXT,
    kind        TEXT,  -- marketing or transactional, as classified at DATA
    recipients  TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX sent_messages_message_id ON sent_messages (message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX sent_messages_received ON sent_messages (received_at);
