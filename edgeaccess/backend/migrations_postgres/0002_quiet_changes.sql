-- edgeaccess storage schema for PostgreSQL, version 2: a quieter change feed.
--
-- A notifying transaction takes a cluster-wide lock at commit (PostgreSQL's
-- notification queue), and every listener of every proxy wakes up: so only
-- changes someone watches, and that change something, notify. Every change
-- is still in the log: listeners also read it on their periodic tick, so a
-- quiet change (a heartbeat that only moves an expiry) reaches watchers
-- within one tick, and none is ever lost.

-- The prefixes some proxy watches (edgeaccess.backend.postgres.watch adds
-- them; they are never removed: a prefix watched once keeps notifying).
CREATE TABLE watched_prefixes (
    prefix   text COLLATE "C" PRIMARY KEY,
    added_at double precision NOT NULL
);

-- true: a put that stored the value the key already held (only its expiry
-- moved): no notification.
ALTER TABLE changes ADD COLUMN quiet boolean NOT NULL DEFAULT false;

CREATE OR REPLACE FUNCTION edgeaccess_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.quiet THEN
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM watched_prefixes WHERE starts_with(NEW.key, prefix)) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('edgeaccess_changes', json_build_object(
        'op', NEW.op, 'revision', NEW.revision, 'key', left(NEW.key, 1000))::text);
    RETURN NULL;
END
$$;
