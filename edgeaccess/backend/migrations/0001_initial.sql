-- edgeaccess storage schema, version 1.
--
-- Applied by edgeaccess.backend.sqlite inside one transaction together with
-- its row in schema_version (which the runner itself creates). Never edit a
-- released migration: add 0002_*.sql instead.

-- One row per key. TEXT keys use the BINARY collation: UTF-8 byte order,
-- which equals code-point order, the order of Python strings. WITHOUT ROWID
-- keeps rows clustered by key, so prefix scans read contiguous pages.
CREATE TABLE items (
    key      TEXT    NOT NULL PRIMARY KEY,
    value    BLOB    NOT NULL,
    expires  REAL,              -- UTC epoch seconds; NULL means never
    revision INTEGER NOT NULL
) WITHOUT ROWID;

-- Finds expired rows for the opportunistic purge.
CREATE INDEX items_by_expiry ON items (expires) WHERE expires IS NOT NULL;

-- One backend-wide counter, so that a revision is never reused, not even by
-- a key deleted and created again.
CREATE TABLE revision_counter (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO revision_counter (id, value) VALUES (1, 0);
