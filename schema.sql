-- logtail2db schema, version 7 (kept in PRAGMA user_version).
-- Applied when the database is new; logtail2db.py carries the same text.

-- One row per file identity: (dev, ino) guarded by the file's first bytes.
CREATE TABLE files (
    id          INTEGER PRIMARY KEY,
    path        TEXT NOT NULL,      -- absolute path it was last seen under; bytes that are
                                    -- not UTF-8 appear as \xNN (see path_bytes)
    path_bytes  BLOB,               -- the exact path when it is not valid UTF-8, else NULL
    dev         INTEGER,
    ino         INTEGER,
    offset      INTEGER NOT NULL,   -- every byte before it is stored in entries
    fingerprint BLOB NOT NULL,      -- the file's first bytes (up to 1024) as stored
    resume_hash BLOB,               -- hash of the bytes just before offset, checked on resume
    part        INTEGER,            -- offset is inside an over-long line: its next piece
    format      TEXT,               -- how its lines are parsed (plain, syslog, json, ...)
    first_seen  TEXT NOT NULL,      -- UTC, 'YYYY-MM-DD HH:MM:SS'
    updated     TEXT NOT NULL,      -- when offset last moved
    gone        TEXT                -- when it was found deleted or moved away; never resumed
);
CREATE INDEX files_identity ON files(ino, dev);

-- One row per log entry: a line, or a multi-line entry such as a stack trace.
CREATE TABLE entry_rows (
    id       INTEGER PRIMARY KEY,
    file_id  INTEGER NOT NULL REFERENCES files(id),
    offset   INTEGER NOT NULL,      -- byte offset of the entry's first byte in its file
    ts       TEXT,                  -- UTC 'YYYY-MM-DD HH:MM:SS[.ffffff]', NULL when unknown
    host     TEXT,
    program  TEXT,
    pid      INTEGER,
    level    TEXT,                  -- trace debug info notice warning error critical alert emergency
    fields   TEXT,                  -- other parsed fields, a JSON object
    raw      NOT NULL,              -- the entry without its final '\n' or '\r\n': TEXT, or a BLOB
                                    -- when it is not valid UTF-8; CAST(raw AS BLOB) = its bytes
    msg      TEXT,                  -- the message when it is not found in raw (else NULL)
    msg_at   INTEGER NOT NULL DEFAULT 1,   -- where the message starts in raw (1-based); 0: it
                                    -- is the value of the JSON line's first key of msg,
                                    -- message and event that is not null, else raw; in rows
                                    -- of older versions, when negative, from -msg_at up to
                                    -- the next '"'
    part     INTEGER,               -- 1, 2, ... for pieces of an entry over --max-entry-bytes
    msg_len  INTEGER                -- the message's length in raw from msg_at, NULL: to the end;
                                    -- when negative, a quoted value whose \" are read as "
);

-- The entries as they are queried: every column of entry_rows and the message.
CREATE VIEW entries AS
SELECT id, file_id, offset, ts, host, program, pid, level, fields, raw, msg, msg_at, part,
       msg_len, CASE WHEN msg IS NOT NULL THEN msg
        WHEN msg_len >= 0 THEN substr(raw, msg_at, msg_len)
        WHEN msg_len < 0 THEN replace(substr(raw, msg_at, -msg_len), '\"', '"')
        WHEN msg_at = 1 THEN raw WHEN msg_at > 0 THEN substr(raw, msg_at)
        WHEN msg_at = 0 AND json_valid(raw) THEN coalesce(json_extract(raw, '$.msg'),
            json_extract(raw, '$.message'), json_extract(raw, '$.event'), raw)
        WHEN msg_at = 0 THEN raw
        ELSE substr(raw, -msg_at, instr(substr(raw, -msg_at), '"') - 1) END AS message
FROM entry_rows;
CREATE TRIGGER entries_delete INSTEAD OF DELETE ON entries BEGIN
    DELETE FROM entry_rows WHERE id = old.id;
END;

-- Who is writing: the pid of the running tailer, for the refusal message.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value
);

-- When entries were stored, a row a minute at most: entries with id >= first_id were
-- stored at `at` or later. --keep ages entries that have no time of their own by it.
CREATE TABLE ingested (
    at       TEXT PRIMARY KEY,      -- UTC, 'YYYY-MM-DD HH:MM:SS'
    first_id INTEGER NOT NULL
);

-- Entries with their file's path, so that the first query is one line:
--   SELECT ts, level, path, message FROM logs WHERE level = 'error' ORDER BY ts DESC LIMIT 20
CREATE VIEW logs AS
SELECT e.id, e.ts, e.level, f.path, e.host, e.program, e.pid, e.message, e.fields, e.raw,
       e.file_id, e.offset, e.part
FROM entries AS e JOIN files AS f ON f.id = e.file_id;

PRAGMA user_version = 7;
