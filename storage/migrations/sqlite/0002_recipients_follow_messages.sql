-- A message's recipient rows go when the message row goes (delivered, bounced,
-- expired or deleted by an operator), in the same statement.
CREATE TRIGGER messages_delete_recipients AFTER DELETE ON messages
BEGIN
    DELETE FROM recipients WHERE queue_id = OLD.queue_id;
END;
