-- edgeaccess storage schema for PostgreSQL, version 1.
--
-- Applied by edgeaccess.backend.postgres in one transaction (under an
-- advisory lock, so that proxies starting together do not race) with its
-- row in schema_version. Never edit a released migration: add 0002_*.sql.

-- One row per key. COLLATE "C" orders keys by UTF-8 bytes, which is
-- code-point order, the order of Python strings. Expiry is UTC epoch
-- seconds, decided by the caller's clock (NULL means never).
CREATE TABLE items (
    key      text COLLATE "C" PRIMARY KEY,
    value    bytea            NOT NULL,
    expires  double precision,
    revision bigint           NOT NULL
);
CREATE INDEX items_by_expiry ON items (expires) WHERE expires IS NOT NULL;

-- One backend-wide counter. Every write transaction locks this row first,
-- so writers are serialized and revision order is commit order.
CREATE TABLE revision_counter (
    id    integer PRIMARY KEY CHECK (id = 1),
    value bigint  NOT NULL
);
INSERT INTO revision_counter (id, value) VALUES (1, 0);

-- The change log behind watch(): one row per revision (revisions are
-- contiguous: a rolled-back write rolls its counter back too), purged after
-- a while. A watcher that finds a hole here closes (the consumer re-reads).
CREATE TABLE changes (
    revision   bigint           PRIMARY KEY,
    op         text             NOT NULL CHECK (op IN ('put', 'delete')),
    key        text COLLATE "C" NOT NULL,
    value      bytea,
    expires    double precision,
    written_at double precision NOT NULL
);

-- Wakes the listeners of every proxy at commit, in commit order. The
-- payload names the change (op, revision, key cut short), never the value.
CREATE FUNCTION edgeaccess_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('edgeaccess_changes', json_build_object(
        'op', NEW.op, 'revision', NEW.revision, 'key', left(NEW.key, 1000))::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_notify AFTER INSERT ON changes
    FOR EACH ROW EXECUTE FUNCTION edgeaccess_notify_change();
