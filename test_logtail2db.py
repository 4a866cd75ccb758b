"""Tests for logtail2db: the tailer runs as a real subprocess on temporary directories.

Files are really written, renamed and truncated, the process is really killed;
every wait polls with a deadline (wait_for), none sleeps and hopes.
"""

import calendar
import collections
import contextlib
import errno
import json
import os
import random
import re
import select
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import logtail2db as lt
from logtail2db import (
    CACHE_MINUTES, MULTILINE_FORMATS, PARSERS, Parsed, Stamps, detect_format,
    make_pattern_parser, normalize_level, parse_app, parse_clf, parse_cri, parse_docker,
    parse_java, parse_journald, parse_json, parse_logfmt, parse_rfc5424, parse_syslog,
    stated_level,
)

HERE = Path(__file__).resolve().parent
TOOL = str(HERE / "logtail2db.py")


# Fixtures #####################################################################

@pytest.fixture(params=["inotifyx", "ctypes"])
def binding(request):
    """The interpreter command for each binding: -S hides site-packages, and inotifyx."""
    if request.param == "inotifyx":
        try:
            import inotifyx  # noqa: F401
        except ImportError:
            pytest.fail("inotifyx is not importable: install inotifyx-py3 (see README)")
        return [sys.executable, TOOL]
    return [sys.executable, "-S", TOOL]


@pytest.fixture
def logdir(tmp_path):
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def db(tmp_path):
    return tmp_path / "app.db"


@pytest.fixture
def tailer(binding, logdir, db, tmp_path):
    """Start the daemon (tailer(*extra_args)); every one started is stopped at the end."""
    started = []

    def start(*args, directory=logdir, database=db, ready=True):
        daemon = Daemon(binding, directory, database, tmp_path / f"stderr-{len(started)}", args)
        started.append(daemon)
        if ready:
            daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


NOV_2026 = calendar.timegm((2026, 11, 24, 12, 0, 0))  # file mtimes used as the BSD reference
JAN_2027 = calendar.timegm((2027, 1, 5, 12, 0, 0))
EPOCH_S = calendar.timegm((2026, 11, 24, 13, 59, 19))  # 1795528759
TS = "2026-11-24 13:59:19"


@pytest.fixture
def set_zone():
    """Switch TZ for one test; tzset again afterwards, since the C library reads TZ only then."""
    with pytest.MonkeyPatch.context() as mp:
        def switch(name):
            mp.setenv("TZ", name)
            time.tzset()
        yield switch
    time.tzset()


@pytest.fixture
def stamps(set_zone):
    """A Stamps in UTC, files dated 24 Nov 2026."""
    set_zone("UTC")
    return stamps_for(NOV_2026)


def stamps_for(reference_s):
    stamps = Stamps()
    stamps.set_reference(reference_s)
    return stamps


def entry(ts=TS, host=None, program=None, pid=None, level=None, fields=None, message=""):
    return Parsed(ts, host, program, pid, level, fields, message)


class Daemon:
    def __init__(self, command, directory, database, stderr_path, args):
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen([*command, *args, str(directory), str(database)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self):
        wait_for(lambda: "watching" in self.stderr or self.proc.poll() is not None, 20,
                 "the tailer to start watching", lambda: self.stderr)
        assert self.proc.poll() is None, f"the tailer exited: {self.stderr}"

    def terminate(self, timeout=5):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def run_once(*args, command=None, timeout=120):
    command = command or [sys.executable, TOOL]
    return subprocess.run([*command, "--once", *map(str, args)], capture_output=True,
                          timeout=timeout)


# Helpers ######################################################################

def wait_for(predicate, timeout_s, what, seen=None):
    """Poll predicate until true, with a deadline and a short back-off; fail saying what was seen."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            last = seen() if seen is not None else None
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}; last seen: {last!r}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def query(db, sql, params=()):
    if not Path(db).exists():
        return []       # the tailer has not created it yet
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []   # the tailer has not created the schema yet
        raise
    finally:
        conn.close()


def raws(db):
    """Every entry's exact bytes, in the order stored."""
    if not Path(db).exists():
        return []
    return [row[0] for row in query(db, "SELECT CAST(raw AS BLOB) FROM entries ORDER BY id")]


def delete_in_step(db, where: str):
    """DELETE FROM entries WHERE where, as a user would; the full-text index is then
    checked against the entries (an error if the delete left it out of step)."""
    conn = sqlite3.connect(db)
    conn.execute(f"DELETE FROM entries WHERE {where}")
    conn.commit()
    conn.execute("INSERT INTO entries_fts (entries_fts) VALUES ('integrity-check')")
    conn.close()


def by_hand(db, script: str):
    """Change a database as another hand than the tailer's would."""
    conn = sqlite3.connect(db)
    conn.executescript(script)
    conn.close()


def append(path, data: bytes):
    with open(path, "ab") as file:
        file.write(data)


def numbered(start, stop, prefix=b"line"):
    return b"".join(b"%s %08d\n" % (prefix, n) for n in range(start, stop))


def numbers_of(rows, prefix=b"line"):
    return sorted(int(row.split(b" ")[-1]) for row in rows if row.startswith(prefix))


# Pure pieces: inotify records, the rotation table, reading ####################

def test_parse_events_keeps_names_as_bytes():
    data = (lt._EVENT_HEADER.pack(1, lt.IN_MODIFY, 0, 16) + b"app.log".ljust(16, b"\0")
            + lt._EVENT_HEADER.pack(1, lt.IN_CREATE, 7, 8) + b"\xff\xfe.log\0\0"
            + lt._EVENT_HEADER.pack(1, lt.IN_Q_OVERFLOW, 0, 0))
    assert lt._parse_events(data) == [
        lt.Event(1, lt.IN_MODIFY, 0, b"app.log"),
        lt.Event(1, lt.IN_CREATE, 7, b"\xff\xfe.log"),
        lt.Event(1, lt.IN_Q_OVERFLOW, 0, b""),
    ]


def test_libc_call_raises_oserror_with_errno(tmp_path):
    fd = lt.init()
    try:
        with pytest.raises(OSError) as exc_info:
            lt.add_watch(fd, os.fsencode(tmp_path / "missing"), lt.DIR_MASK)
        assert exc_info.value.errno == errno.ENOENT
    finally:
        os.close(fd)


def stored(offset=10, fingerprint=b"abc", resume_hash=b"h@10", dev=1, ino=5,
           path="/logs/app.log"):
    """A file's stored state, for identify(): hashes are stand-ins named for their offset."""
    return lt.FileState(7, path, None, dev, ino, offset, fingerprint, resume_hash, None, "plain",
                        "2026-12-02 11:00:00", "2026-12-02 11:00:00", None)


def seen(size, head=b"abc", hashes=None, complete=True, quiet=False, dev=1, ino=5,
         path="/logs/app.log"):
    return lt.Look(dev, ino, path, size, head, hashes or {}, complete, quiet)


def original(*checkpoints, fingerprint=b"abc", live=False):
    """An original stored up to its last checkpoint (by default 10 bytes)."""
    checkpoints = checkpoints or (10,)
    return lt.Original(3, "/logs/app.log", "syslog", fingerprint,
                       tuple((offset, b"h@%d" % offset) for offset in checkpoints), live)


KIB = lt.FINGERPRINT_BYTES
LONG_HEAD = b"x" * KIB
IDENTIFY_CASES = {
    # A file something is stored of: restarts, rotations while stopped, reused inodes.
    "restart, nothing new": (stored(), seen(10), (), lt.UNCHANGED, 10),
    "restart, grown": (stored(), seen(25, hashes={10: b"h@10"}), (), lt.GROWN, 10),
    "renamed while stopped (same inode)": (
        stored(), seen(25, hashes={10: b"h@10"}, path="/logs/app.log.1"), (), lt.GROWN, 10),
    "device number changed by a reboot": (
        stored(dev=1), seen(25, hashes={10: b"h@10"}, dev=2), (), lt.GROWN, 10),
    "another inode with that path": (stored(), seen(25, ino=6), (), lt.NEW, 0),
    "inode reused by another file": (stored(), seen(30, head=b"xyz"), (), lt.REPLACED, 10),
    "truncated, then a short write": (stored(), seen(4), (), lt.TRUNCATED, 10),
    "truncated to empty (copytruncate)": (stored(), seen(0, head=b""), (), lt.TRUNCATED, 10),
    "same first 4 KiB, rewritten past the offset": (
        stored(), seen(30, hashes={10: b"other"}), (), lt.REPLACED, 10),
    "followed, the bytes before the offset unknown": (
        stored(resume_hash=None), seen(25), (), lt.GROWN, 10),
    # A file nothing is stored of: new, or a copy (copytruncate, logrotate's copy, cp).
    "new file, no originals": (None, seen(25), (), lt.NEW, 0),
    "copy reaching the stored offset": (
        None, seen(10, hashes={10: b"h@10"}), (original(),), lt.COPY, 10),
    "copy holding more than was read of the original": (
        None, seen(50, hashes={10: b"h@10"}), (original(),), lt.COPY, 10),
    "copy, empty so far": (None, seen(0, head=b"", complete=False), (original(),),
                           lt.UNDECIDED, 0),
    "copy under 1 KiB still being written": (
        None, seen(5, head=b"abc", complete=False), (original(),), lt.UNDECIDED, 0),
    "copy still being written, past a checkpoint": (
        None, seen(3000, head=LONG_HEAD, hashes={2000: b"h@2000"}, complete=False),
        (original(2000, 4000, fingerprint=LONG_HEAD),), lt.UNDECIDED, 0),
    "complete copy shorter than what was read (lines read before the truncation)": (
        None, seen(3000, head=LONG_HEAD, hashes={2000: b"h@2000"}),
        (original(2000, 4000, fingerprint=LONG_HEAD),), lt.COPY, 3000),
    "complete copy ending at a checkpoint": (
        None, seen(500, hashes={500: b"h@500"}), (original(500, 900),), lt.COPY, 500),
    "starts like the original, differs at its stored offset": (
        None, seen(50, hashes={10: b"other"}), (original(),), lt.NEW, 0),
    "same banner, then other lines": (
        None, seen(3000, head=LONG_HEAD, hashes={2000: b"other"}),
        (original(2000, 4000, fingerprint=LONG_HEAD),), lt.NEW, 0),
    "only the banner, complete, shorter than the original": (
        None, seen(5, head=b"abc"), (original(),), lt.NEW, 0),
    "only the first KiB agrees, complete": (
        None, seen(1500, head=LONG_HEAD, hashes={900: b"h@900"}),
        (original(900, 4000, fingerprint=LONG_HEAD),), lt.NEW, 0),
    "copy of a file still followed (logrotate's copy)": (
        None, seen(50, hashes={10: b"h@10"}), (original(live=True),), lt.UNDECIDED, 0),
    "copy of a file still followed, not truncated after a quiet COPY_QUIET_S (cp)": (
        None, seen(50, hashes={10: b"h@10"}, quiet=True), (original(live=True),), lt.NEW, 0),
    "the same lines as a file still followed, quiet": (
        None, seen(10, hashes={10: b"h@10"}, quiet=True), (original(live=True),), lt.NEW, 0),
    "the agreeing original wins": (
        None, seen(50, hashes={10: b"h@10", 20: b"other"}),
        (original(20), original(10)), lt.COPY, 10),
    "first bytes differ from every original": (
        None, seen(50, head=b"xyz", hashes={10: b"h@10"}), (original(),), lt.NEW, 0),
}


@pytest.mark.parametrize("known,look,originals,kind,offset", IDENTIFY_CASES.values(),
                         ids=IDENTIFY_CASES.keys())
def test_identify(known, look, originals, kind, offset):
    verdict = lt.identify(known, look, originals)
    assert (verdict.kind, verdict.offset) == (kind, offset)


def test_hash_offsets_are_the_ones_identify_reads():
    originals = (original(500, 900, 2000), original(10))
    assert lt.hash_offsets(stored(), originals, 1000) == {10, 900}
    assert lt.hash_offsets(stored(), originals, 10) == {10}      # at the offset: no check
    assert lt.hash_offsets(None, originals, 5) == set()


@pytest.mark.parametrize("step", [46, 5000, 1 << 20])
def test_checkpoints_stay_few_and_reach_back(step):
    checkpoints, pos = [], 0
    for _ in range(100_000 if step < 1000 else 3000):
        pos += step
        checkpoints.append((pos, b""))
        if len(checkpoints) > lt.MAX_CHECKPOINTS:
            checkpoints = lt.thin_checkpoints(checkpoints, pos)
    offsets = [offset for offset, _ in checkpoints]
    assert offsets == sorted(offsets) and offsets[-1] == pos
    assert len(offsets) <= lt.MAX_CHECKPOINTS
    assert offsets[0] <= pos // 2    # reaching far back...
    for older, newer in zip(offsets, offsets[1:]):     # ...spaced by their distance from pos
        assert newer - older <= max(8192, (pos - older) // 2) + step, (older, newer)


def test_originals_are_found_by_their_first_bytes():
    found = lt.Originals()
    long_one = original(fingerprint=b"a" * 100)
    short_one = original(fingerprint=b"ab")
    found.remember(long_one)
    found.remember(short_one._replace(id=4))
    assert sorted(o.id for o in found.agreeing(b"a" * 200, 200)) == [3]
    assert sorted(o.id for o in found.agreeing(b"ab" + b"a" * 100, 102)) == [4]
    assert sorted(o.id for o in found.agreeing(b"a", 1)) == [3, 4]  # a short head: either
    assert found.agreeing(b"b" * 100, 100) == []
    for n in range(lt.MAX_REMEMBERED):
        found.remember(original(fingerprint=b"z" * 70)._replace(id=100 + n))
    assert found.agreeing(b"a" * 200, 200) == []    # the oldest were forgotten


def test_read_complete_stops_at_last_newline(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"one\ntwo\nthr")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert lt.read_complete(fd, 0) == (b"one\ntwo\n", 8, b"thr")
        assert lt.read_complete(fd, 8) == (b"", 8, b"thr")
        assert lt.read_complete(fd, 4, 3) == (b"", 4, b"two")
    finally:
        os.close(fd)


def test_schema_sql_is_the_schema_the_tool_applies():
    assert (HERE / "schema.sql").read_text() == lt.SCHEMA


# The command line #############################################################

def test_help_has_an_example():
    result = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--once" in result.stdout


@pytest.mark.parametrize("unlocked", [False, True])
def test_the_command_sets_sqlite_up_without_memory_statistics(unlocked):
    """unlock_sqlite() reaches the SQLite the sqlite3 module uses: with memory statistics
    off, SQLite counts no memory in use (set up together with the multi-thread mode, which
    shows nowhere)."""
    code = f"""if True:
        import ctypes, re, sqlite3, sys
        sys.path.insert(0, {str(HERE)!r})
        import logtail2db
        if {unlocked}:
            logtail2db.unlock_sqlite()
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (a)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 100,)] * 1000)
        path, = set(re.findall(r"/\\S*libsqlite3[^/\\s]*", open("/proc/self/maps").read()))
        library = ctypes.CDLL(path)
        library.sqlite3_memory_used.restype = ctypes.c_int64
        print(library.sqlite3_memory_used())
        """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert (int(result.stdout) == 0) == unlocked, result.stdout


def test_version():
    result = subprocess.run([sys.executable, TOOL, "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith(f"logtail2db {lt.__version__} ")


def test_usage_error_exits_2(logdir):
    result = subprocess.run([sys.executable, TOOL, str(logdir)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_missing_directory_exits_1_with_one_line(tmp_path, db):
    result = run_once(tmp_path / "nope", db)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"logtail2db: error: directory {str(tmp_path / 'nope')!r}: No such file or directory"]


def test_database_that_is_not_sqlite_is_left_untouched(logdir, tmp_path):
    not_db = tmp_path / "notes.txt"
    not_db.write_bytes(b"my precious notes\n")
    (logdir / "a.log").write_bytes(b"x\n")
    result = run_once(logdir, not_db)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"logtail2db: error: {str(not_db)!r} is not an SQLite database (left untouched)"]
    assert not_db.read_bytes() == b"my precious notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "notes.txt"]


def test_empty_file_is_a_valid_new_database(logdir, db):
    db.write_bytes(b"")
    (logdir / "a.log").write_bytes(b"x\n")
    result = run_once(logdir, db)
    assert result.returncode == 0, result.stderr
    assert raws(db) == [b"x"]


def test_unwritable_database_exits_1(logdir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    result = run_once(logdir, blocker / "app.db")     # a path below a regular file
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("logtail2db: error: cannot open database")
    assert "Not a directory" in lines[0] and "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("args,said", [
    (["logs", "x.db", "extra"], "unexpected argument 'extra'"),
    (["--max-lag", "abc", "--stats", "x.db"], "--max-lag: not a whole number: 'abc'"),
    (["--max-lag", "0", "--stats", "x.db"], "--max-lag: must be positive: 0"),
    (["--once", "--stats", "x.db"], "--stats only reads DATABASE: it goes without --once"),
    (["--db-mode", "0644", "logs", "x.db"], "--db-mode: 0644: the owner reads and writes"),
])
def test_usage_errors_say_what_is_wrong_in_words(tmp_path, args, said):
    result = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert said in result.stderr
    assert "positive_int" not in result.stderr and "required" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["/dev/null", "directory", "fifo"])
def test_database_that_is_not_a_regular_file_is_refused_and_nothing_made_beside_it(
        logdir, tmp_path, kind):
    if kind == "/dev/null":
        database, said = Path("/dev/null"), "is a character device, not a file"
    elif kind == "directory":
        database, said = tmp_path / "db", "is a directory, not a file"
        database.mkdir()
    else:
        database, said = tmp_path / "db", "is a FIFO, not a file"
        os.mkfifo(database)
    (logdir / "a.log").write_bytes(b"x\n")
    beside = sorted(database.parent.iterdir())
    result = run_once(logdir, database, timeout=20)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"logtail2db: error: database {str(database)!r} {said} (left untouched)"]
    assert sorted(database.parent.iterdir()) == beside


def test_database_in_a_directory_it_cannot_write_says_what_sqlite_needs(logdir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    (logdir / "a.log").write_bytes(b"x\n")
    result = subprocess.run([sys.executable, TOOL, "--once", str(logdir), str(locked / "app.db")],
                            capture_output=True, text=True,
                            preexec_fn=drop_file_capabilities if os.geteuid() == 0 else None)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"logtail2db: error: cannot create files in {str(locked)!r}: SQLite needs to create "
        "app.db-wal and app.db-shm beside the database"]
    assert list(locked.iterdir()) == []


def test_once_reads_every_complete_line_and_exits(logdir, db):
    (logdir / "a.log").write_bytes(b"one\ntwo\r\nthree")
    result = run_once(logdir, db)
    assert result.returncode == 0, result.stderr
    assert raws(db) == [b"one", b"two"]
    assert query(db, "SELECT offset, message FROM entries ORDER BY id") == [
        (0, "one"), (4, "two")]
    assert query(db, "SELECT path, offset FROM files") == [(str(logdir / "a.log"), 9)]
    (logdir / "a.log").write_bytes(b"one\ntwo\r\nthree\n")     # same file, line completed
    assert run_once(logdir, db).returncode == 0
    assert raws(db) == [b"one", b"two", b"three"]


def test_include_and_exclude_globs_and_compressed_rotations(logdir, db):
    for name in ("app.log", "app.log.1", "app.log.2.gz", "other.txt", "skip.log"):
        (logdir / name).write_bytes(name.encode() + b"\n")
    result = run_once("--include", "*.log*", "--exclude", "skip*", logdir, db)
    assert result.returncode == 0, result.stderr
    assert sorted(raws(db)) == [b"app.log", b"app.log.1"]


def test_from_end_skips_what_existed_but_not_new_files(tailer, logdir, db):
    (logdir / "old.log").write_bytes(b"old 1\nold 2\n")
    tailer("--from-end")
    append(logdir / "old.log", b"old 3\n")
    (logdir / "new.log").write_bytes(b"new 1\n")
    wait_for(lambda: sorted(raws(db)) == [b"new 1", b"old 3"], 10, "only new lines",
             lambda: raws(db))


# Following files ##############################################################

def test_closing_writer(tailer, logdir, db):
    tailer()
    for n in range(3):
        append(logdir / "app.log", b"closed %d\n" % n)
    wait_for(lambda: raws(db) == [b"closed 0", b"closed 1", b"closed 2"], 10, "three lines",
             lambda: raws(db))


def test_writer_that_keeps_the_file_open(tailer, logdir, db):
    tailer()
    with open(logdir / "app.log", "wb", buffering=0) as file:
        file.write(b"open 1\n")
        wait_for(lambda: raws(db) == [b"open 1"], 10, "a line from an open writer",
                 lambda: raws(db))
        file.write(b"open 2\n")
        wait_for(lambda: raws(db) == [b"open 1", b"open 2"], 10, "the next line",
                 lambda: raws(db))


def test_partial_line_waits_for_newline(tailer, logdir, db):
    tailer()
    log = logdir / "app.log"
    append(log, b"first\nsec")
    wait_for(lambda: raws(db) == [b"first"], 10, "the complete line", lambda: raws(db))
    append(log, b"ond")
    append(log, b"\nthird\n")
    wait_for(lambda: raws(db) == [b"first", b"second", b"third"], 10, "the joined line",
             lambda: raws(db))


def test_empty_file_is_tracked_at_once(tailer, logdir, db):
    tailer()
    (logdir / "empty.log").write_bytes(b"")
    wait_for(lambda: query(db, "SELECT path, offset FROM files") == [
        (str(logdir / "empty.log"), 0)], 10, "the empty file tracked",
        lambda: query(db, "SELECT * FROM files"))


def test_new_file_is_read_from_its_start(tailer, logdir, db):
    (logdir / "a.log").write_bytes(b"a\n")
    tailer()
    wait_for(lambda: raws(db) == [b"a"], 10, "the existing file", lambda: raws(db))
    (logdir / "b.log").write_bytes(b"b1\nb2\n")
    wait_for(lambda: raws(db) == [b"a", b"b1", b"b2"], 10, "the new file", lambda: raws(db))


def test_rename_rotation_drains_old_tail(tailer, logdir, db):
    tailer()
    log = logdir / "app.log"
    append(log, b"a\n")
    wait_for(lambda: raws(db) == [b"a"], 10, "first line", lambda: raws(db))
    append(log, b"b\n")
    log.rename(logdir / "app.log.1")
    append(log, b"c\n")
    wait_for(lambda: sorted(raws(db)) == [b"a", b"b", b"c"], 10, "lines around rotation",
             lambda: raws(db))
    assert query(db, "SELECT path FROM files ORDER BY id") == [
        (str(logdir / "app.log.1"),), (str(logdir / "app.log"),)]


def test_rename_rotation_while_a_writer_appends(tailer, logdir, db):
    """A writer keeps appending numbered lines (and reopens after each rotation);
    the file is rotated by rename five times: every number lands exactly once."""
    tailer()
    log = logdir / "app.log"
    rotated, stop = threading.Event(), threading.Event()
    written = []

    def write():
        file = open(log, "ab", buffering=0)
        n = 0
        while not stop.is_set():
            file.write(b"line %08d\n" % n)
            n += 1
            if rotated.is_set():        # like a logger told to reopen (SIGHUP, USR1)
                file.close()
                file = open(log, "ab", buffering=0)
                rotated.clear()
            if n % 200 == 0:
                time.sleep(0.001)       # a steady writer, not a single burst
        file.close()
        written.append(n)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for k in range(1, 6):
            seen = len(raws(db))
            wait_for(lambda: len(raws(db)) >= seen + 2000, 30, f"progress before rotation {k}",
                     lambda: len(raws(db)))
            for j in range(k - 1, 0, -1):
                os.rename(logdir / f"app.log.{j}", logdir / f"app.log.{j + 1}")
            os.rename(log, logdir / "app.log.1")
            rotated.set()
            wait_for(lambda: not rotated.is_set(), 10, "the writer to reopen")
    finally:
        stop.set()
        writer.join(30)
    [total] = written
    wait_for(lambda: len(raws(db)) >= total, 30, f"all {total} lines", lambda: len(raws(db)))
    assert numbers_of(raws(db)) == list(range(total))
    assert len(query(db, "SELECT id FROM files")) == 6


def test_copytruncate_rereads_from_start(tailer, logdir, db):
    tailer()
    log = logdir / "app.log"
    append(log, b"before 1\nbefore 2\n")
    wait_for(lambda: len(raws(db)) == 2, 10, "two lines", lambda: raws(db))
    with open(log, "r+b") as file:      # what logrotate's copytruncate does after the copy
        file.truncate(0)
    append(log, b"after\n")
    wait_for(lambda: raws(db) == [b"before 1", b"before 2", b"after"], 10,
             "the line after truncation", lambda: raws(db))
    # What the file held before is gone from it; what it holds now is a file of its own.
    assert query(db, "SELECT path, gone IS NULL FROM files ORDER BY id") == [
        (str(log), 0), (str(log), 1)]


def copytruncate(log, copy):
    """What logrotate's copytruncate does: copy the file, then truncate it in place."""
    copy.write_bytes(log.read_bytes())
    with open(log, "r+b") as file:
        file.truncate(0)


def test_copytruncate_copy_left_in_directory_is_not_read_twice(tailer, logdir, db):
    daemon = tailer()
    log = logdir / "app.log"
    append(log, numbered(0, 2000))
    wait_for(lambda: len(raws(db)) == 2000, 10, "the first lines", lambda: len(raws(db)))
    os.kill(daemon.proc.pid, signal.SIGSTOP)    # the tailer falls behind...
    try:
        append(log, numbered(2000, 2500))
        copytruncate(log, logdir / "app.log.1")     # ...and the rotation comes meanwhile
        append(log, numbered(2500, 2600))
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    wait_for(lambda: len(raws(db)) >= 2600, 10, "every line", lambda: len(raws(db)))
    assert numbers_of(raws(db)) == list(range(2600))
    assert "a copy of" in daemon.stderr


def test_copytruncate_while_stopped_is_not_read_twice(logdir, db):
    log = logdir / "app.log"
    log.write_bytes(numbered(0, 2000))
    assert run_once(logdir, db).returncode == 0
    append(log, numbered(2000, 2500))
    copytruncate(log, logdir / "app.log.1")
    append(log, numbered(2500, 2600))
    result = run_once(logdir, db)
    assert result.returncode == 0, result.stderr
    assert numbers_of(raws(db)) == list(range(2600))


def test_copy_still_being_written_is_not_read_from_its_start(tailer, logdir, db):
    daemon = tailer("-v")
    log = logdir / "app.log"
    append(log, numbered(0, 3000))
    wait_for(lambda: len(raws(db)) == 3000, 10, "the first lines", lambda: len(raws(db)))
    data = log.read_bytes()
    with open(logdir / "app.log.1", "wb", buffering=0) as copy:   # a copy on a slow disk
        for start in range(0, len(data), 8192):
            copy.write(data[start:start + 8192])
            wait_for(lambda: "may be a copy" in daemon.stderr, 10, "the copy seen",
                     lambda: daemon.stderr)
        with open(log, "r+b") as file:
            file.truncate(0)
        append(log, numbered(3000, 3010))
        wait_for(lambda: len(raws(db)) >= 3010, 10, "the lines after the truncation",
                 lambda: len(raws(db)))
    wait_for(lambda: "app.log.1: a copy of" in daemon.stderr, 10, "the copy recognised",
             lambda: daemon.stderr)
    append(logdir / "app.log.1", b"appended to the copy\n")
    wait_for(lambda: raws(db)[-1:] == [b"appended to the copy"], 10, "a line added to the copy",
             lambda: raws(db)[-3:])
    assert numbers_of(raws(db)) == list(range(3010))


def test_copy_that_shows_up_after_a_restart_is_recognised(binding, tailer, logdir, db):
    daemon = tailer()
    log = logdir / "app.log"
    append(log, numbered(0, 500))
    wait_for(lambda: len(raws(db)) == 500, 10, "the first lines", lambda: len(raws(db)))
    data = log.read_bytes()
    with open(log, "r+b") as file:      # truncated first, as if the copy were slow...
        file.truncate(0)
    wait_for(lambda: query(db, "SELECT count(*) FROM files WHERE gone IS NOT NULL") == [(1,)],
             10, "the truncation stored", lambda: query(db, "SELECT * FROM files"))
    daemon.kill()
    (logdir / "app.log.1").write_bytes(data + numbered(500, 510))  # ...which shows up later
    result = run_once(logdir, db, command=binding)
    assert result.returncode == 0, result.stderr
    assert b"app.log.1: a copy of" in result.stderr
    assert numbers_of(raws(db)) == list(range(510))


def test_file_that_starts_like_another_is_read_in_full(tailer, logdir, db):
    daemon = tailer("-v")
    banner = b"".join(b"# report generator v1.2, section %02d of the banner\n" % n
                      for n in range(30))      # longer than the first KiB compared
    append(logdir / "a.log", banner + numbered(0, 100))
    wait_for(lambda: len(raws(db)) == 130, 10, "the first file", lambda: len(raws(db)))
    with open(logdir / "b.log", "wb", buffering=0) as other:   # the same banner, then its own
        other.write(banner)
        wait_for(lambda: "b.log: may be a copy" in daemon.stderr, 10, "b.log seen",
                 lambda: daemon.stderr)
        other.write(numbered(0, 5, prefix=b"other"))
    wait_for(lambda: len(raws(db)) == 165, 10, "all of b.log", lambda: len(raws(db)))
    assert query(db, "SELECT count(*) FROM logs WHERE path LIKE '%b.log'") == [(35,)]


def test_files_holding_the_same_lines_are_each_stored(tailer, logdir, db):
    for n in range(300):            # the first ones are followed before the others are seen
        (logdir / f"job-{n:03}.log").write_bytes(b"job started\n")
    started = time.monotonic()
    result = run_once(logdir, db)
    assert result.returncode == 0, result.stderr
    assert raws(db) == [b"job started"] * 300
    assert time.monotonic() - started < lt.COPY_QUIET_S + 5
    tailer()
    (logdir / "late.log").write_bytes(b"job started\n")       # not a copy: nothing truncated
    wait_for(lambda: len(raws(db)) == 301, lt.COPY_QUIET_S + 10, "the late file's line",
             lambda: len(raws(db)))


def logrotate(tmp_path, log, *directives):
    """Rotate log now with the real logrotate binary and these directives."""
    binary = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.fail("logrotate is not installed: apt-get install logrotate (.ci/run does)")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n" + "".join(f"    {d}\n" for d in directives) + "}\n")
    result = subprocess.run([binary, "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


class Writer(threading.Thread):
    """Appends numbered syslog lines, some of them followed by continuation lines, at a
    steady pace: reopening the file per line, or keeping it open (O_APPEND, so that it
    writes at the end again after a truncation) and reopening after a rename rotation."""

    def __init__(self, log, keep_open: bool, per_s: float):
        super().__init__(daemon=True)
        self.log, self.keep_open, self.per_s = log, keep_open, per_s
        self.stop, self.reopen = threading.Event(), threading.Event()
        self.written = 0

    def line(self, n: int) -> bytes:
        entry = b"Dec  2 11:32:56 web-01 app[42]: line %08d\n" % n
        if n % 7 == 3:      # a multi-line entry, held until the next one begins
            entry += b"    at frame %08d.1\n    at frame %08d.2\n" % (n, n)
        return entry

    def run(self):
        file = open(self.log, "ab", buffering=0) if self.keep_open else None
        started = time.monotonic()
        while not self.stop.is_set():
            if self.keep_open:
                if self.reopen.is_set():    # like a logger told to reopen its file
                    file.close()
                    file = open(self.log, "ab", buffering=0)
                    self.reopen.clear()
                file.write(self.line(self.written))
            else:
                append(self.log, self.line(self.written))
            self.written += 1
            ahead = started + self.written / self.per_s - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)       # the writer's pace, not a wait for anything
        if file is not None:
            file.close()


def lines_on_disk(*directories):
    """Every line of the uncompressed files in these directories (and their subdirectories)."""
    lines = []
    for directory in directories:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file() and not path.name.endswith(".gz"):
                lines += path.read_bytes().splitlines()
    return lines


def stored_lines(db):
    return [line for raw in raws(db) for line in raw.split(b"\n")]


def assert_stored_once(db, *directories):
    """Every line found in an uncompressed file on disk is stored, and nothing twice."""
    on_disk = set(lines_on_disk(*directories))
    wait_for(lambda: on_disk <= set(stored_lines(db)), 20, "every line on disk stored",
             lambda: sorted(on_disk - set(stored_lines(db)))[:5])
    stored = stored_lines(db)
    twice = sorted(line for line, n in collections.Counter(stored).items() if n > 1)
    assert not twice, f"{len(twice)} lines stored twice, e.g. {twice[:3]}"
    return len(on_disk), len(stored)


ROTATIONS = {
    "copytruncate": ["copytruncate", "rotate 10"],
    "copytruncate, compress, delaycompress": ["copytruncate", "rotate 10", "compress",
                                              "delaycompress"],
    "create, dateext": ["create", "rotate 10", "dateext", "dateformat -%s"],
    "create, olddir inside": ["create", "rotate 10", "olddir old", "createolddir"],
    "copytruncate, olddir inside": ["copytruncate", "rotate 10", "olddir old", "createolddir"],
    "create, olddir outside": ["create", "rotate 10", "olddir {outside}", "createolddir"],
}


@pytest.mark.parametrize("keep_open", [False, True], ids=["reopens", "keeps open"])
@pytest.mark.parametrize("name", ROTATIONS)
def test_real_logrotate_of_a_quiet_log(tailer, logdir, db, tmp_path, name, keep_open):
    tailer()
    log = logdir / "app.log"
    outside = tmp_path / "outside"
    directives = [d.format(outside=outside) for d in ROTATIONS[name]]
    writer = Writer(log, keep_open, per_s=1000)
    for rotation in range(3):
        start = writer.written
        for n in range(10):
            writer.written = start + n
            if keep_open and n == 0:
                file = open(log, "ab", buffering=0)
            if keep_open:
                file.write(writer.line(start + n))
            else:
                append(log, writer.line(start + n))
        writer.written = start + 10
        before_last = set(writer.line(start + 8).splitlines())     # the last may be held
        wait_for(lambda: before_last <= set(stored_lines(db)), 10,
                 f"the lines before rotation {rotation}", lambda: raws(db)[-2:])
        time.sleep(1.1 if "dateext" in name else 0)     # dateext names rotations by the second
        logrotate(tmp_path, log, *directives)
        if keep_open:
            file.close()
    assert_stored_once(db, logdir, outside)


@pytest.mark.soak
@pytest.mark.parametrize("keep_open", [False, True], ids=["reopens", "keeps open"])
@pytest.mark.parametrize("name", ["copytruncate", "create, dateext"])
def test_real_logrotate_at_2000_lines_per_second(tailer, logdir, db, tmp_path, name,
                                                  keep_open):
    tailer()
    log = logdir / "app.log"
    writer = Writer(log, keep_open, per_s=2000)
    writer.start()
    try:
        for rotation in range(6):
            seen = writer.written
            wait_for(lambda: writer.written >= seen + 1000, 10, "the writer to go on")
            if "dateext" in name:
                time.sleep(1.0)     # dateext names rotations by the second
            # A writer that reopens per line creates the file itself, racing logrotate's
            # create (which then fails with "File exists"): rename only, as with nocreate.
            create = ["nocreate"] if "create" in name and not keep_open else []
            logrotate(tmp_path, log, *ROTATIONS[name], *create)
            writer.reopen.set()
    finally:
        writer.stop.set()
        writer.join(10)
    on_disk, stored = assert_stored_once(db, logdir)
    assert on_disk > 6000       # the test saw a real stream of lines
    print(f"{name}, {'kept open' if keep_open else 'reopened'}: {writer.written} entries "
          f"written, {on_disk} lines on disk, {stored} stored, none twice")


def test_restart_after_rotation_done_while_stopped(binding, logdir, db):
    log = logdir / "app.log"
    log.write_bytes(b"one\ntwo\n")
    assert run_once(logdir, db, command=binding).returncode == 0
    append(log, b"three\n")              # written after the last run...
    log.rename(logdir / "app.log.1")     # ...then rotated while stopped
    log.write_bytes(b"fresh\n")
    result = run_once(logdir, db, command=binding)
    assert result.returncode == 0, result.stderr
    assert sorted(raws(db)) == [b"fresh", b"one", b"three", b"two"]
    assert sorted(query(db, "SELECT path FROM files")) == [
        (str(log),), (str(logdir / "app.log.1"),)]


def test_changed_device_number_resumes_by_inode_and_path(logdir, db):
    log = logdir / "app.log"
    log.write_bytes(b"one\ntwo\n")
    assert run_once(logdir, db).returncode == 0
    by_hand(db, "UPDATE files SET dev = dev + 1")      # as after a reboot that renumbered it
    append(log, b"three\n")
    result = run_once(logdir, db)
    assert result.returncode == 0, result.stderr
    assert b"device number changed" in result.stderr
    assert raws(db) == [b"one", b"two", b"three"]
    assert query(db, "SELECT count(*), max(dev) FROM files") == [(1, log.stat().st_dev)]


def test_kill_9_at_random_moments_loses_and_doubles_nothing(binding, logdir, db, tmp_path):
    """A large write, the tailer killed with SIGKILL at random moments and restarted."""
    rng = random.Random(4242)
    log = logdir / "app.log"
    total = 300000
    log.write_bytes(numbered(0, total // 2))
    writer = threading.Thread(target=lambda: append(log, numbered(total // 2, total)))
    writer.start()
    for round_ in range(8):
        daemon = Daemon(binding, logdir, db, tmp_path / f"kill-{round_}", ())
        time.sleep(rng.uniform(0.05, 0.6))      # the random moment is the point of this test
        daemon.kill()
    writer.join(60)
    result = run_once(logdir, db, command=binding)
    assert result.returncode == 0, result.stderr
    rows = raws(db)
    assert len(rows) == total
    assert numbers_of(rows) == list(range(total))


def test_file_name_that_is_not_utf8(tailer, logdir, db):
    tailer()
    name = os.path.join(os.fsencode(logdir), b"caf\xe9-\xff.log")
    with open(name, "wb") as file:
        file.write(b"latin-1 named\n")
    wait_for(lambda: raws(db) == [b"latin-1 named"], 10, "the line", lambda: raws(db))
    [(path, path_bytes)] = query(db, "SELECT path, path_bytes FROM files")
    assert path_bytes == name
    assert path == str(logdir) + "/caf\\xe9-\\xff.log"


def test_sigterm_commits_every_line_and_exits_0_quickly(tailer, logdir, db):
    daemon = tailer()
    append(logdir / "app.log", numbered(0, 5000))
    started = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - started < 2
    assert numbers_of(raws(db)) == list(range(5000))


def test_second_instance_is_refused_and_the_first_keeps_working(tailer, binding, logdir, db):
    first = tailer()
    result = run_once(logdir, db, command=binding)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"logtail2db: error: database {str(db)!r} is in use by another logtail2db "
        f"(pid {first.proc.pid})"]
    append(logdir / "app.log", b"still here\n")
    wait_for(lambda: raws(db) == [b"still here"], 10, "the first one working",
             lambda: raws(db))


def test_a_reader_in_a_transaction_does_not_stop_ingestion(tailer, logdir, db):
    tailer()
    append(logdir / "app.log", b"one\n")
    wait_for(lambda: raws(db) == [b"one"], 10, "the first line", lambda: raws(db))
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM entries").fetchone() == (1,)
    append(logdir / "app.log", b"two\n")
    wait_for(lambda: raws(db) == [b"one", b"two"], 10, "a line while a reader holds a snapshot",
             lambda: raws(db))
    assert reader.execute("SELECT count(*) FROM entries").fetchone() == (1,)    # its snapshot
    reader.execute("COMMIT")
    reader.close()


@pytest.mark.parametrize("database", ["a file", "a symlink"])
def test_a_long_catch_up_keeps_the_wal_small(tailer, logdir, db, database):
    """A writer that never pauses never finds every frame checkpointed as it begins a
    transaction, the moment the WAL restarts: without a wait now and then its WAL grows
    as big as the database. SQLite keeps the WAL of a symlink beside the file it names."""
    lines = 800_000
    (logdir / "app.log").write_bytes(b"".join(b"%08d plain text that fills the pages of a "
                                              b"database quickly, line after line\n" % n
                                              for n in range(lines)))
    real = db
    if database == "a symlink":
        real = db.parent / "elsewhere" / "app.db"
        real.parent.mkdir()
        db.symlink_to(real)
    wal = Path(f"{real}-wal")
    sizes = [0]
    done = threading.Event()

    def watch() -> None:    # the catch-up takes a second or so: look often
        while not done.wait(0.001):
            with contextlib.suppress(FileNotFoundError):
                sizes.append(wal.stat().st_size)

    def caught_up() -> bool:
        # A reader's snapshot keeps the WAL from restarting while it lasts: max(id) reads
        # one page, where count(*) would read them all and let the WAL grow meanwhile.
        return query(db, "SELECT max(id) FROM entry_rows") == [(lines,)]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        tailer(ready=False)
        wait_for(caught_up, 120, "the catch-up", lambda: max(sizes))
    finally:
        done.set()
        watcher.join()
    assert query(db, "SELECT count(*) FROM entry_rows") == [(lines,)]
    assert db.stat().st_size > 3 * lt.WAL_LIMIT_BYTES
    # A restart truncates it to WAL_LIMIT_BYTES; the transaction that went over comes on top.
    assert max(sizes) <= lt.WAL_LIMIT_BYTES + lt.ROUND_BYTES, max(sizes)


# Bad input and faults #########################################################

def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def peak_rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_fifo_socket_device_and_subdirectory_never_block(tailer, logdir, db):
    import socket
    os.mkfifo(logdir / "a.fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(logdir / "a.sock"))
    (logdir / "sub").mkdir()
    (logdir / "sub" / "inner.log").write_bytes(b"not read\n")
    if os.geteuid() == 0:
        os.mknod(logdir / "null", 0o600 | 0o020000, os.makedev(1, 3))   # like /dev/null
    (logdir / "app.log").write_bytes(b"regular\n")
    try:
        result = run_once(logdir, db, timeout=20)
        assert result.returncode == 0, result.stderr
        assert raws(db) == [b"regular"]
        assert b"a.fifo: not a regular file, skipped" in result.stderr
        daemon = tailer()
        fifo = os.open(logdir / "a.fifo", os.O_RDWR)     # data waits in it: events on it
        try:
            os.write(fifo, b"into the fifo\n")
            append(logdir / "app.log", b"more\n")
            wait_for(lambda: raws(db) == [b"regular", b"more"], 10, "the regular file only",
                     lambda: raws(db))
        finally:
            os.close(fifo)
        assert daemon.proc.poll() is None
    finally:
        sock.close()


def test_symlinks_are_not_followed_by_default(logdir, db, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0\n")
    os.symlink(secret, logdir / "link.log")
    (logdir / "app.log").write_bytes(b"mine\n")
    result = run_once(logdir, db)
    assert result.returncode == 0, result.stderr
    assert raws(db) == [b"mine"]
    assert b"link.log: a symlink, not followed" in result.stderr


def test_follow_symlinks_reads_the_target_and_its_changes(tailer, logdir, db, tmp_path):
    target = tmp_path / "elsewhere.log"
    target.write_bytes(b"one\n")
    os.symlink(target, logdir / "link.log")
    tailer("--follow-symlinks")
    wait_for(lambda: raws(db) == [b"one"], 10, "the target's line", lambda: raws(db))
    append(target, b"two\n")        # no event in DIRECTORY: the target's own watch sees it
    wait_for(lambda: raws(db) == [b"one", b"two"], 10, "the target's new line",
             lambda: raws(db))


def test_database_inside_the_directory_is_never_read(tailer, logdir):
    db = logdir / "inside.db"
    tailer(database=db)
    for n in range(5):
        append(logdir / "app.log", b"line %d\n" % n)
        wait_for(lambda: len(raws(db)) == n + 1, 10, f"line {n}", lambda: raws(db))
    assert query(db, "SELECT path FROM files") == [(str(logdir / "app.log"),)]


def test_its_own_stderr_in_the_directory_is_never_read(binding, logdir, db):
    errors = logdir / "logtail2db.err"      # cron: 2>>/var/log/app/logtail2db.err
    with open(errors, "ab") as stderr:
        proc = subprocess.Popen([*binding, "-v", str(logdir), str(db)], stderr=stderr)
    try:
        wait_for(lambda: b"watching" in errors.read_bytes(), 20, "the tailer to start")
        for n in range(5):      # each commit logs a line at -v: read, it would feed itself
            append(logdir / "app.log", b"line %d\n" % n)
            wait_for(lambda: len(raws(db)) == n + 1, 10, f"line {n}", lambda: raws(db))
        assert query(db, "SELECT path FROM files") == [(str(logdir / "app.log"),)]
    finally:
        proc.terminate()
        proc.wait(5)


def test_over_long_line_is_stored_in_pieces(tailer, logdir, db):
    daemon = tailer("--max-entry-bytes", "1000")
    line = bytes(random.Random(1).choices(b"abcdefgh\xc3\xa9", k=3500)).replace(b"\xc3\xc3", b"xx")
    append(logdir / "app.log", b"short\n" + line[:1500])       # no newline yet: two pieces wait
    wait_for(lambda: len(raws(db)) >= 2, 10, "the first piece", lambda: raws(db))
    append(logdir / "app.log", line[1500:] + b"\nafter\n")
    wait_for(lambda: raws(db)[-1:] == [b"after"], 10, "the line after", lambda: raws(db))
    rows = query(db, "SELECT CAST(raw AS BLOB), part, offset FROM entries ORDER BY id")
    pieces = rows[1:-1]
    assert b"".join(r[0] for r in pieces) == line
    assert [r[1] for r in pieces] == list(range(1, len(pieces) + 1))
    assert all(len(r[0]) <= 1000 for r in pieces) and len(pieces) == 4
    assert [r[2] for r in pieces][0] == 6
    assert rows[0][1] is None and rows[-1][1] is None
    assert daemon.stderr.count("stored in pieces") == 1


@pytest.mark.soak
def test_100_mb_line_without_newline_keeps_memory_bounded(tailer, logdir, db):
    daemon = tailer()
    chunk = b"0123456789abcdef" * 65536         # 1 MiB
    with open(logdir / "huge.log", "wb") as file:
        for _ in range(100):
            file.write(chunk)
    wait_for(lambda: query(db, "SELECT offset FROM files") == [(100 << 20,)], 120,
             "100 MiB stored in pieces", lambda: query(db, "SELECT offset FROM files"))
    append(logdir / "huge.log", b"\nnext\n")
    wait_for(lambda: query(db, "SELECT raw FROM entries ORDER BY id DESC LIMIT 1") ==
             [("next",)], 30, "the line after it")
    assert query(db, "SELECT count(*), sum(length(raw)) FROM entries WHERE part IS NOT NULL") \
        == [(100, 100 << 20)]
    assert peak_rss_kib(daemon.proc.pid) < 64 * 1024


def test_thousands_of_files_with_a_bounded_number_open(tailer, logdir, db):
    count = 3000
    for n in range(count):      # syslog: each file's last entry is held a while, fd or not
        (logdir / f"f{n:05d}.log").write_bytes(b"Nov 24 13:59:19 web-01 app[%d]: file %05d\n"
                                              % (n, n))
    daemon = tailer("--max-open-files", "64")
    most = []

    def stored(expected):
        most.append(fd_count(daemon.proc.pid))
        return len(raws(db)) == expected

    wait_for(lambda: stored(count), 60, "a line from every file", lambda: len(raws(db)))
    picked = random.Random(7).sample(range(count), 200)
    for n in picked:
        append(logdir / f"f{n:05d}.log", b"Nov 24 14:00:00 web-01 app[1]: again %05d\n" % n)
    wait_for(lambda: stored(count + 200), 30, "the appended lines", lambda: len(raws(db)))
    assert max(most) <= 64 + 16
    assert sorted(r[-11:] for r in raws(db) if b"again" in r) == sorted(
        b"again %05d" % n for n in picked)


def test_a_small_fd_limit_is_lived_with(binding, logdir, db, tmp_path):
    import resource
    for n in range(600):
        (logdir / f"f{n:04d}.log").write_bytes(b"Nov 24 13:59:19 web-01 app[1]: %04d\n" % n)

    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([*binding, str(logdir), str(db)], stderr=stderr,
                                preexec_fn=limit_fds)
    try:
        wait_for(lambda: len(raws(db)) == 600, 60, "a line from every file",
                 lambda: (len(raws(db)), stderr_path.read_text()[-500:]))
        assert "Too many open files" not in stderr_path.read_text()
    finally:
        proc.terminate()
        proc.wait(5)


def test_queue_overflow_while_stopped_rescans_and_stores_everything(tailer, logdir, db):
    daemon = tailer()
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        files, per_file = 100, limit // 100 + 50     # more events than the queue holds
        for k in range(per_file):
            for n in range(files):
                append(logdir / f"f{n:03d}.log", b"%03d %06d\n" % (n, k))
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    wait_for(lambda: len(raws(db)) == files * per_file, 60, "every line after the overflow",
             lambda: len(raws(db)))
    assert "inotify queue overflowed" in daemon.stderr
    assert len(set(raws(db))) == files * per_file


def test_poll_mode_follows_without_inotify(tailer, logdir, db):
    daemon = tailer("--poll", "0.2")
    assert "polling every 0.2 s" in daemon.stderr
    append(logdir / "app.log", b"polled\n")
    wait_for(lambda: raws(db) == [b"polled"], 10, "a polled line", lambda: raws(db))
    os.rename(logdir / "app.log", logdir / "app.log.1")
    append(logdir / "app.log.1", b"tail\n")
    append(logdir / "app.log", b"new\n")
    wait_for(lambda: sorted(raws(db)) == [b"new", b"polled", b"tail"], 10, "after a rotation",
             lambda: raws(db))


def test_falls_back_to_polling_when_inotify_cannot_be_had(tailer, logdir, db):
    knob = Path("/proc/sys/fs/inotify/max_user_instances")
    if os.geteuid() != 0 or not os.access(knob, os.W_OK):
        pytest.skip("needs root to lower fs.inotify.max_user_instances")
    saved = knob.read_text()
    knob.write_text("0")
    try:
        daemon = tailer()
    finally:
        knob.write_text(saved)
    assert "inotify unavailable" in daemon.stderr and "polling" in daemon.stderr
    append(logdir / "app.log", b"still read\n")
    wait_for(lambda: raws(db) == [b"still read"], 10, "a line by polling", lambda: raws(db))


def test_directory_removed_and_created_again(tailer, logdir, db):
    daemon = tailer()
    append(logdir / "a.log", b"before\n")
    wait_for(lambda: raws(db) == [b"before"], 10, "the first line", lambda: raws(db))
    (logdir / "a.log").unlink()
    logdir.rmdir()
    wait_for(lambda: "vanished" in daemon.stderr, 10, "a warning", lambda: daemon.stderr)
    logdir.mkdir()
    wait_for(lambda: "is back" in daemon.stderr, 10, "the directory found again",
             lambda: daemon.stderr)
    append(logdir / "b.log", b"after\n")
    wait_for(lambda: raws(db) == [b"before", b"after"], 10, "a line in the new directory",
             lambda: raws(db))


def test_directory_back_soon_is_followed_soon(tailer, logdir, db):
    daemon = tailer()
    wait_for(lambda: "watching" in daemon.stderr, 10, "the start", lambda: daemon.stderr)
    logdir.rmdir()      # no file of it open: the watch goes at once
    wait_for(lambda: "vanished" in daemon.stderr, 10, "a warning", lambda: daemon.stderr)
    logdir.mkdir()
    back = time.monotonic()
    wait_for(lambda: "is back" in daemon.stderr, 10, "the directory found again",
             lambda: daemon.stderr)
    # Looked for at once, then ever less often: not a whole DIR_RETRY_S after it vanished.
    assert time.monotonic() - back < lt.DIR_RETRY_S / 2
    append(logdir / "b.log", b"after\n")
    wait_for(lambda: raws(db) == [b"after"], 10, "a line in the new directory",
             lambda: raws(db))


def test_directory_replaced_at_once_is_followed_within_a_second(tailer, logdir, db):
    daemon = tailer()
    append(logdir / "a.log", b"before\n")
    wait_for(lambda: raws(db) == [b"before"], 10, "the first line", lambda: raws(db))
    (logdir / "a.log").unlink()     # still open in the tailer: the old watch stays alive
    logdir.rmdir()
    logdir.mkdir()
    replaced = time.monotonic()
    wait_for(lambda: "is back" in daemon.stderr, 1, "the new directory followed",
             lambda: daemon.stderr)
    assert time.monotonic() - replaced < 1
    append(logdir / "b.log", b"after\n")
    wait_for(lambda: raws(db) == [b"before", b"after"], 10, "a line in the new directory",
             lambda: raws(db))


def test_directory_moved_away_and_back(tailer, logdir, db, tmp_path):
    daemon = tailer()
    append(logdir / "a.log", b"one\n")
    wait_for(lambda: raws(db) == [b"one"], 10, "the first line", lambda: raws(db))
    logdir.rename(tmp_path / "moved")
    wait_for(lambda: "vanished" in daemon.stderr, 10, "a warning", lambda: daemon.stderr)
    append(tmp_path / "moved" / "a.log", b"two\n")  # written while away: read when it is back
    (tmp_path / "moved").rename(logdir)
    wait_for(lambda: raws(db) == [b"one", b"two"], 15, "the line written while away",
             lambda: raws(db))


@pytest.fixture
def small_fs(tmp_path):
    """A real filesystem that fills up: a 3 MiB tmpfs (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_is_retried_and_nothing_is_lost_or_doubled(tailer, logdir, small_fs):
    db = small_fs / "app.db"
    daemon = tailer(database=db)
    append(logdir / "app.log", numbered(0, 100))
    wait_for(lambda: len(raws(db)) == 100, 10, "the first lines", lambda: len(raws(db)))
    filler = fill(small_fs)
    append(logdir / "app.log", numbered(100, 60000))    # about 1 MiB: cannot be stored now
    wait_for(lambda: "cannot store entries" in daemon.stderr, 20, "the error logged",
             lambda: daemon.stderr)
    assert len(raws(db)) == 100
    filler.unlink()
    wait_for(lambda: len(raws(db)) >= 60000, 60, "every line once space is back",
             lambda: len(raws(db)))
    assert numbers_of(raws(db)) == list(range(60000))
    assert daemon.stderr.count("cannot store entries") == 1
    assert "writable again" in daemon.stderr


@contextlib.contextmanager
def locked_after_one_line(daemon, logdir, db):
    """'one' stored, then another writer holds the lock while 'two' is written and the
    tailer has said it cannot store it; the lock is let go at the end."""
    append(logdir / "app.log", b"one\n")
    wait_for(lambda: raws(db) == [b"one"], 10, "the first line", lambda: raws(db))
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")        # another writer holds the lock
    try:
        append(logdir / "app.log", b"two\n")
        wait_for(lambda: "database is locked" in daemon.stderr, 20, "the error logged",
                 lambda: daemon.stderr)
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_locked_database_is_retried(tailer, logdir, db):
    daemon = tailer()
    with locked_after_one_line(daemon, logdir, db):
        assert raws(db) == [b"one"]
    wait_for(lambda: raws(db) == [b"one", b"two"], 60, "the line once the lock is gone",
             lambda: raws(db))


def drop_file_capabilities():
    """In the child, before exec: root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    is refused a mode-000 file like any user."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):                    # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:     # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_file_is_warned_about_and_retried(binding, logdir, db, tmp_path):
    (logdir / "ok.log").write_bytes(b"readable\n")
    (logdir / "closed.log").write_bytes(b"secret\n")
    os.chmod(logdir / "closed.log", 0)
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([*binding, str(logdir), str(db)], stderr=stderr,
                                preexec_fn=drop_file_capabilities if os.geteuid() == 0 else None)
    try:
        wait_for(lambda: raws(db) == [b"readable"], 10, "the readable file",
                 lambda: stderr_path.read_text())
        wait_for(lambda: "closed.log: cannot read: Permission denied" in stderr_path.read_text(),
                 10, "a warning", lambda: stderr_path.read_text())
        os.chmod(logdir / "closed.log", 0o644)
        append(logdir / "closed.log", b"now open\n")    # its next event: read again
        wait_for(lambda: sorted(raws(db)) == [b"now open", b"readable", b"secret"], 10,
                 "the file once readable", lambda: raws(db))
    finally:
        proc.terminate()
        proc.wait(5)


def test_newer_schema_is_refused_and_left_untouched(logdir, db):
    by_hand(db, "PRAGMA user_version = 99; CREATE TABLE future (x)")
    before = db.read_bytes()
    result = run_once(logdir, db)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"logtail2db: error: {str(db)!r} has schema version 99, newer than this logtail2db "
        f"{lt.__version__} knows ({lt.SCHEMA_VERSION}); use a newer logtail2db"]
    assert db.read_bytes() == before


def test_sqlite_database_of_another_program_is_left_untouched(logdir, db):
    by_hand(db, "CREATE TABLE customers (name)")
    before = db.read_bytes()
    result = run_once(logdir, db)
    assert result.returncode == 1
    assert b"an SQLite database of another program" in result.stderr
    assert db.read_bytes() == before


def test_file_rewritten_past_its_offset_while_stopped_is_read_from_start(logdir, db):
    log = logdir / "app.log"
    header = b"".join(b"# header line %03d of a generated report\n" % n for n in range(40))
    log.write_bytes(header + b"old 1\nold 2\n")
    assert run_once(logdir, db).returncode == 0
    with open(log, "r+b") as file:      # same inode, same first 1600 bytes, longer text
        file.write(header + b"new 1\nnew 2\nnew 3\n")
    assert run_once(logdir, db).returncode == 0
    messages = [r for r in raws(db) if not r.startswith(b"#")]
    assert messages == [b"old 1", b"old 2", b"new 1", b"new 2", b"new 3"]


def test_rescan_finds_changes_that_give_no_event(tailer, logdir, db, tmp_path):
    (logdir / "app.log").write_bytes(b"one\n")
    os.link(logdir / "app.log", tmp_path / "outside-link")
    tailer("--rescan", "0.3")
    wait_for(lambda: raws(db) == [b"one"], 10, "the first line", lambda: raws(db))
    append(tmp_path / "outside-link", b"two\n")    # inotify reports it to the other directory
    wait_for(lambda: raws(db) == [b"one", b"two"], 10, "the line found by the rescan",
             lambda: raws(db))


@pytest.mark.parametrize("data,cut,expected", [
    (b"abcdef", 4, 4),
    (b"abcdef", 10, 6),
    (b"ab\xc3\xa9cd", 3, 2),            # inside a 2-byte character: before it
    (b"ab\xc3\xa9cd", 4, 4),            # just after it
    (b"ab\xe2\x82\xac", 5, 5),          # a whole 3-byte character at the end
    (b"ab\xe2\x82\xac", 4, 2),
    (b"ab\xf0\x9f\x98\x80", 5, 2),      # a 4-byte character
    (b"\x80\x80\x80\x80\x80", 3, 3),    # not UTF-8: anywhere
])
def test_utf8_boundary(data, cut, expected):
    assert lt.utf8_boundary(data, cut) == expected



def test_stopped_while_the_database_is_locked_exits_4_and_loses_nothing(tailer, logdir, db):
    daemon = tailer()
    with locked_after_one_line(daemon, logdir, db):
        assert daemon.terminate(timeout=10) == lt.EXIT_UNSTORED
    assert "will be read again on the next start" in daemon.stderr
    assert run_once(logdir, db).returncode == 0
    assert raws(db) == [b"one", b"two"]


HOSTILE = b"evil\nlogtail2db: error: forged\x1b[31m.log"


def test_control_characters_in_names_are_shown_escaped(logdir, db):
    (logdir / os.fsdecode(HOSTILE)).write_bytes(b"\xff\xfe" + "wide\n".encode("utf-16-le"))
    result = run_once("-v", logdir, db)
    assert result.returncode == 0, result.stderr
    said = result.stderr.decode()
    assert "\x1b" not in said and "forged" in said
    assert all(re.match(r"([0-9-]+ [0-9:]+ )?logtail2db: ", line)
               for line in said.splitlines()), said
    assert "evil\\nlogtail2db: error: forged\\x1b[31m.log" in said
    [(path,)] = query(db, "SELECT CAST(path AS BLOB) FROM files")
    assert path == bytes(logdir) + b"/" + HOSTILE             # stored as it is
    stats = subprocess.run([sys.executable, TOOL, "--stats", str(db)], capture_output=True,
                           text=True)
    assert stats.returncode == 0, stats.stderr
    assert "\x1b" not in stats.stdout and "forged\\x1b[31m.log" in stats.stdout


def test_wide_text_is_warned_about_once_and_stored_as_its_bytes(tailer, logdir, db):
    data = "\ufeffone\ntwo\n".encode("utf-16-le")
    (logdir / "wide.log").write_bytes(data)
    daemon = tailer()
    wait_for(lambda: b"\n".join(raws(db)) == data[:data.rindex(b"\n")], 10, "the lines",
             lambda: raws(db))
    append(logdir / "wide.log", "three\n".encode("utf-16-le"))
    wait_for(lambda: len(raws(db)) == 3, 10, "the next line", lambda: raws(db))
    assert daemon.stderr.count("UTF-16 text") == 1


@pytest.mark.parametrize("kept,said", [
    (0, b"app.log: truncated while stopped"),
    (100, b"app.log: truncated and written again past its stored offset while stopped"),
])
def test_truncated_while_stopped_is_said_so(logdir, db, kept, said):
    (logdir / "app.log").write_bytes(numbered(0, 200))          # past the first 1 KiB
    assert run_once(logdir, db).returncode == 0
    # truncated, then written again: short of the offset, or past it after the same first lines
    (logdir / "app.log").write_bytes(numbered(0, kept) + numbered(200, 201 + 2 * kept))
    result = run_once(logdir, db)
    assert result.returncode == 0
    assert said in result.stderr
    assert b"reused inode" not in result.stderr
    assert len(raws(db)) == 200 + kept + 1 + 2 * kept


def test_sighup_says_it_rescans(tailer, logdir, db):
    daemon = tailer()
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: f"SIGHUP: rescanning {logdir}" in daemon.stderr, 10, "the rescan said",
             lambda: daemon.stderr)
    append(logdir / "app.log", b"after\n")
    wait_for(lambda: raws(db) == [b"after"], 10, "a line after it", lambda: raws(db))


def test_database_by_another_name_names_its_tailer_and_is_left_alone(tailer, logdir, db,
                                                                      tmp_path):
    daemon = tailer()
    other_name = tmp_path / "hard-link.db"
    os.link(db, other_name)
    beside = sorted(tmp_path.iterdir())
    result = run_once(logdir, other_name)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"logtail2db: error: database {str(other_name)!r} is in use by another logtail2db "
        f"(pid {daemon.proc.pid})"]
    assert sorted(tmp_path.iterdir()) == beside        # no hard-link.db-wal, -shm


def modes(db):
    return {path.name[len(db.name):] or "db": stat.S_IMODE(path.stat().st_mode)
            for path in db.parent.iterdir() if path.name.startswith(db.name)}


@pytest.mark.parametrize("args,mode", [((), 0o600), (("--db-mode", "0640"), 0o640)])
def test_database_and_its_wal_are_made_no_more_readable_than_asked(tailer, logdir, db,
                                                                  args, mode):
    os.umask(old := os.umask(0o022))
    assert old == 0o022, "the test runs under the usual umask"
    tailer(*args)
    append(logdir / "app.log", b"one\n")
    wait_for(lambda: raws(db) == [b"one"], 10, "the line", lambda: raws(db))
    assert modes(db) == {"db": mode, "-wal": mode, "-shm": mode}


def test_database_readable_by_more_users_than_a_log_is_warned_about(tailer, logdir, db):
    (logdir / "auth.log").write_bytes(b"secret\n")
    os.chmod(logdir / "auth.log", 0o640)
    assert run_once(logdir, db).returncode == 0
    os.chmod(db, 0o644)
    (logdir / "auth.log.1").write_bytes(b"more secrets\n")
    os.chmod(logdir / "auth.log.1", 0o600)
    daemon = tailer()
    append(logdir / "auth.log", b"secret 2\n")
    wait_for(lambda: len(raws(db)) == 3, 10, "the lines", lambda: raws(db))
    assert daemon.stderr.count("may be read by every user") == 1, daemon.stderr


def test_wal_shrinks_once_a_long_reader_lets_go(tailer, logdir, db):
    daemon = tailer()
    append(logdir / "app.log", b"first\n")
    wait_for(lambda: len(raws(db)) == 1, 10, "the first line", lambda: raws(db))
    wal = Path(f"{db}-wal")
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM entries").fetchall()     # holds its snapshot
    try:
        line = b"x" * 1000 + b"\n"
        for n in range(25):     # many commits: none of them may reuse the WAL's start
            append(logdir / "app.log", line * 1500)
            wait_for(lambda: query(db, "SELECT count(*) FROM entries") == [(n * 1500 + 1501,)],
                     20, "the lines", lambda: query(db, "SELECT count(*) FROM entries"))
        grown = wal.stat().st_size
        assert grown > 2 * lt.WAL_LIMIT_BYTES
    finally:
        reader.close()
    deadline = time.monotonic() + 30
    while wal.stat().st_size > lt.WAL_LIMIT_BYTES:     # more lines: checkpoints, restarts
        assert time.monotonic() < deadline, f"the WAL stayed at {wal.stat().st_size} bytes"
        append(logdir / "app.log", b"more\n")
        time.sleep(0.1)     # the pace of the lines that make commits; the loop polls the WAL
    assert daemon.proc.poll() is None


def test_a_checkpoint_thread_that_ends_hands_checkpoints_to_the_connection(tmp_path):
    """Were the thread gone, a wait for it would never end and the WAL would only grow."""
    store = lt.SqliteStore.open(str(tmp_path / "app.db"))
    try:
        store.checkpointer.close()
        dead = lt.Checkpointer(str(tmp_path / "no such directory" / "app.db"))
        dead.thread.join(10)
        assert not dead.alive
        assert dead.wait(dead.ask(), 10)    # at once: nothing is left to wait for
        store.checkpointer, store.restart_asked = dead, dead.ask()
        with store.atomic(0.0):
            store.save([])
        assert store.checkpointer is None
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
        with store.atomic(1.0):     # and it goes on committing
            store.begin()
            store.conn.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
        assert query(tmp_path / "app.db", "SELECT value FROM meta WHERE key = 'k'") == [("v",)]
    finally:
        store.close()


# Entries from lines: the builder (pure) and the tailer ########################

class FullRows:
    """An encoder for EntryBuilder that keeps each entry's thirteen values, None for NULL,
    fields as JSON text: what a row stores, whatever the store's shapes (msg_len last)."""

    @staticmethod
    def lines(file_id, offsets, lines):
        return [(file_id, offset, None, None, None, None, None, None, line, None, 1, None, None)
                for offset, line in zip(offsets, lines)]

    @staticmethod
    def entry(file_id, offset, parsed, raw, message, msg_at, msg_len, part):
        ts, host, program, pid, level, fields, _ = parsed or (None,) * 7
        return (file_id, offset, ts, host, program, pid, level,
                json.dumps(fields, ensure_ascii=False, separators=(",", ":")) if fields else None,
                raw, message, msg_at, part, msg_len)

    @classmethod
    def json_lines(cls, file_id, offsets, lines, *columns):
        return lt.entries(cls, file_id, offsets, lines, *columns,
                          [lt.message_span(line, message)
                           for line, message in zip(lines, columns[6])])

    @classmethod
    def syslog_lines(cls, file_id, offsets, lines, found, minutes):
        return [cls.entry(file_id, offset,
                          (minutes[minute] + seconds, host, program, int(pid) if pid else None,
                           first and (lt.STATED_LEVELS.get(first) or lt.STATED_LEVELS.get(then))
                           or None,
                           None, line[len(head):]), line, None, len(head) + 1, None, None)
                for offset, line, (head, minute, seconds, host, program, pid, first, then)
                in zip(offsets, lines, found)]


def build(data: bytes, *, format="plain", offset=0, multiline_start=None, max_entry_bytes=1 << 20,
          max_entry_lines=500, stamps=None):
    options = lt.ParseOptions(format, None, multiline_start and re.compile(multiline_start),
                              max_entry_bytes, max_entry_lines)
    builder = lt.EntryBuilder(1, options, stamps or Stamps(), FullRows)
    return builder, builder.feed(data, offset)


TRACE = (b"2026-11-24 13:59:20,456 ERROR app.web: request failed\n"
         b"Traceback (most recent call last):\n"
         b'  File "/srv/app/web.py", line 42, in handle\n'
         b"    return view(request)\n"
         b"ZeroDivisionError: division by zero\n")
JAVA = (b"2026-11-24 13:59:21.000 [main] ERROR com.example.App - boom\n"
        b"java.lang.IllegalStateException: boom\n"
        b"\tat com.example.App.run(App.java:10)\n"
        b"\tat com.example.App.main(App.java:5)\n"
        b"Caused by: java.io.IOException: disk\n"
        b"\tat com.example.Disk.write(Disk.java:7)\n"
        b"\t... 2 more\n")


def test_builder_plain_lines_offsets_and_message_stored_once():
    _, rows = build("one\nd\u00e9j\u00e0\ntwo\n".encode(), offset=100)
    assert [(r[1], r[8], r[9], r[10]) for r in rows] == [
        (100, "one", None, 1), (104, "d\u00e9j\u00e0", None, 1), (111, "two", None, 1)]


def test_builder_crlf_invalid_utf8_and_nul_keep_exact_bytes():
    _, rows = build(b"crlf\r\nbad \xff\xfe\nnul\x00byte\n")
    assert [(r[1], r[8], r[9]) for r in rows] == [
        (0, "crlf", None),
        (6, b"bad \xff\xfe", "bad \ufffd\ufffd"),
        (13, b"nul\x00byte", "nul\x00byte")]


def test_builder_groups_a_python_traceback_and_holds_the_last_entry(stamps):
    builder, rows = build(TRACE + b"2026-11-24 13:59:21,000 INFO app.web: next\n",
                          format="app", stamps=stamps)
    [row] = rows
    assert row[1:8] == (0, "2026-11-24 13:59:20.456000", None, "app.web", None, "error", None)
    assert row[8] == TRACE[:-1].decode()
    assert row[8][row[10] - 1:] == "request failed\n" + TRACE.split(b"\n", 1)[1][:-1].decode()
    assert builder.held_offset(len(TRACE) + 44) == len(TRACE)
    [held] = builder.flush()
    assert held[8] == "2026-11-24 13:59:21,000 INFO app.web: next"
    assert builder.flush() == []


def test_builder_joins_continuation_lines_across_chunks(stamps):
    builder, rows = build(JAVA[:100], format="app", stamps=stamps)
    cut = JAVA.index(b"\n", 100) + 1
    builder, rows = build(JAVA[:cut], format="app", stamps=stamps)
    assert rows == []
    assert builder.feed(JAVA[cut:], cut) == []
    [row] = builder.flush()
    assert row[8] == JAVA[:-1].decode() and row[6] == "error" and row[3] is None


def test_builder_caps_an_entry_and_goes_on_as_a_new_one(stamps):
    builder, rows = build(JAVA, format="app", max_entry_lines=3, stamps=stamps)
    rows += builder.flush()
    assert [r[8].count("\n") + 1 for r in rows] == [3, 3, 1]
    assert "\n".join(r[8] for r in rows) == JAVA[:-1].decode()
    assert [r[6] for r in rows] == ["error", None, None]


def test_builder_multiline_start_overrides_the_rule():
    data = b"BEGIN one\n more\nBEGIN two\n more\n"
    builder, rows = build(data, format="plain", multiline_start=r"BEGIN ")
    rows += builder.flush()
    assert [r[8] for r in rows] == ["BEGIN one\n more", "BEGIN two\n more"]
    assert [r[1] for r in rows] == [0, 16]


def test_builder_detects_the_format_from_the_first_lines(stamps):
    builder, rows = build(b'{"level": "info", "msg": "hi"}\nnot json\n', format="auto",
                          stamps=stamps)
    assert builder.format == "json"
    assert [(r[6], r[8], message_of(r)) for r in rows] == [
        ("info", '{"level": "info", "msg": "hi"}', "hi"), (None, "not json", "not json")]


def message_of(row):
    """The message column of a FullRows row, computed as the schema's message column does."""
    raw, message, msg_at = row[8:11]
    msg_len = row[12] if len(row) > 12 else None
    if message is not None:
        return message
    if msg_len is None:
        return raw[msg_at - 1:]
    text = raw[msg_at - 1:msg_at - 1 + abs(msg_len)]
    return text.replace('\\"', '"') if msg_len < 0 else text


@pytest.mark.parametrize("raw,message,span", [
    ('{"level": "info", "msg": "hi there"}', "hi there", (27, 8)),
    ('{"msg":"hi","x":"hi"}', "hi", (18, 2)),       # the last one: either reads the same
    ('time=2026-11-24T13:59:19Z level=info msg="order updated" id=7', "order updated", (43, 13)),
    ('Nov 24 13:59:19 web-01 cron: tail', "tail", (30, None)),
    ('{"msg": ""}', "", (12, None)),
    ('{"msg": "say \\"hi\\""}', 'say "hi"', (10, -10)),  # its quotes quoted
    ('{"msg": "caf\\u00e9"}', "café", None),              # escaped otherwise: not there
    ('{"msg": "a\\\\b \\"c\\""}', 'a\\b "c"', None),        # a backslash too
    ('caf\u00e9 \U0001f600 "x" y', '\U0001f600 "x', (6, 4)),  # characters, not bytes
    ('no quotes here', "not here", None),
])
def test_message_span_says_where_the_message_column_finds_the_message(raw, message, span):
    assert lt.message_span(raw, message) == span


def test_message_spans_are_message_span_column_by_column():
    rng = random.Random(13)
    alphabet = ['a', 'b', ' ', '"', '\\', '\u00e9', '{']
    for _ in range(300):
        lines, messages = [], []
        for _ in range(rng.randrange(1, 20)):
            raw = "".join(rng.choices(alphabet, k=rng.randrange(0, 12)))
            start = rng.randrange(len(raw) + 1)
            messages.append(raw[start:rng.randrange(start, len(raw) + 1)]
                            if rng.random() < 0.95 else "zz")    # now and then not there
            lines.append(raw)
        spans = [lt.message_span(raw, message) for raw, message in zip(lines, messages)]
        expected = None if None in spans else tuple(map(list, zip(*spans)))
        assert lt.message_spans(lines, messages) == expected, (lines, messages)


def test_message_column_reads_every_span_as_python_finds_it(tmp_path):
    rng = random.Random(12)
    alphabet = ['a', 'b', ' ', '"', '\\', '\u00e9', '\U0001f600', '\t', '=', '{']
    conn = sqlite3.connect(tmp_path / "spans.db")
    conn.executescript(lt.SCHEMA)
    expected = []
    for offset in range(3000):
        raw = "".join(rng.choices(alphabet, k=rng.randrange(0, 30)))
        start = rng.randrange(len(raw) + 1)
        message = raw[start:rng.randrange(start, len(raw) + 1)]
        if rng.random() < 0.3:      # a quoted value's text, its quotes quoted in raw
            message = message.replace("\\", "")
            raw = raw[:start] + message.replace('"', '\\"') + raw[start:]
        span = lt.message_span(raw, message)
        if span is None:
            continue
        conn.execute("INSERT INTO entry_rows (file_id, offset, raw, msg_at, msg_len)"
                     " VALUES (1, ?, ?, ?, ?)", (offset, raw, *span))
        expected.append((offset, message))
    assert len(expected) > 2800
    assert conn.execute("SELECT offset, message FROM entries ORDER BY id").fetchall() == expected


def test_builder_joins_docker_pieces_into_one_entry(stamps):
    lines = [docker("a" * 16384), docker("b" * 16384), docker("c\n"), docker("next\n")]
    data = "".join(line + "\n" for line in lines).encode()
    cut = len(lines[0]) + len(lines[1]) + 2
    builder, rows = build(data[:cut], format="docker", stamps=stamps)
    assert rows == [] and builder.held_offset(cut) == 0     # the offset waits for the rest
    rows = builder.feed(data[cut:], cut)
    assert [(r[1], r[2], r[7], r[8], message_of(r)) for r in rows] == [
        (0, TS + ".123456", '{"stream":"stdout"}', "\n".join(lines[:3]),
         "a" * 16384 + "b" * 16384 + "c"),
        (len(data) - len(lines[3]) - 1, TS + ".123456", '{"stream":"stdout"}', lines[3], "next")]
    assert builder.flush() == []


def test_builder_reads_a_cri_line_once_its_pieces_are_joined(stamps):
    text = '{"level":"error","msg":"' + "x" * 100 + '","user":7}'
    lines = [f"2026-11-24T13:59:19.{n}Z stdout {tag} {text[start:start + 60]}"
             for n, (tag, start) in enumerate([("P", 0), ("P", 60), ("F", 120)], 1)]
    lines.append("2026-11-24T13:59:20Z stdout F after")
    builder, rows = build("".join(line + "\n" for line in lines).encode(), format="cri",
                          stamps=stamps)
    assert [(r[1], r[2], r[6], r[7], r[8], r[9]) for r in rows] == [
        (0, TS + ".100000", "error", '{"user":7,"stream":"stdout"}', "\n".join(lines[:3]),
         "x" * 100),
        (sum(len(line) + 1 for line in lines[:3]), "2026-11-24 13:59:20", None,
         '{"stream":"stdout"}', lines[3], None)]


def test_builder_stores_a_piece_whose_rest_never_came(stamps):
    lines = ["2026-11-24T13:59:19Z stdout P cut", "2026-11-24T13:59:19Z stderr F other stream",
             "2026-11-24T13:59:19Z stdout F its own", "2026-11-24T13:59:19Z stdout P last"]
    builder, rows = build("".join(line + "\n" for line in lines).encode(), format="cri",
                          stamps=stamps)
    rows += builder.flush()
    assert [(r[7], r[8], r[9]) for r in rows] == [
        ('{"stream":"stdout","partial":true}', lines[0], None),
        ('{"stream":"stderr"}', lines[1], None),
        ('{"stream":"stdout"}', lines[2], None),
        ('{"stream":"stdout","partial":true}', lines[3], None)]


def test_builder_caps_joined_pieces_and_goes_on_as_a_new_entry(stamps):
    lines = [f"2026-11-24T13:59:19Z stdout P {n}" for n in range(5)]
    lines.append("2026-11-24T13:59:19Z stdout F end")
    builder, rows = build("".join(line + "\n" for line in lines).encode(), format="cri",
                          max_entry_lines=4, stamps=stamps)
    assert [(r[8].count("\n") + 1, r[9] or r[8][r[10] - 1:]) for r in rows] == [
        (4, "0123"), (2, "4end")]


def test_builder_app_file_logfmt_lines_begin_entries(stamps):
    # An app file where go-kit lines follow slog's: each is an entry, none a continuation.
    data = (b'time=2026-11-24T13:59:19Z level=INFO msg="slog one"\n'
            b'time=2026-11-24T13:59:20Z level=INFO msg="slog two"\n'
            + b"".join(b'level=info ts=2026-11-24T13:59:%02dZ caller=main.go:12 msg="kit %d"\n'
                       % (21 + n, n) for n in range(10)))
    builder, rows = build(data, format="app", stamps=stamps)
    rows += builder.flush()
    assert [(r[6], message_of(r)) for r in rows] == [("info", "slog one"), ("info", "slog two")] + [
        ("info", f"kit {n}") for n in range(10)]


def test_builder_groups_a_logback_stack_trace(stamps):
    data = (b"11:32:56.655 [main] ERROR com.example.App - boom\n" + JAVA.split(b"\n", 1)[1]
            + b"11:32:57.001 [main] INFO  com.example.App - retrying\n")
    builder, rows = build(data, format="auto", stamps=stamps)
    rows += builder.flush()
    assert builder.format == "java"
    assert [r[8].count("\n") + 1 for r in rows] == [7, 1]
    fields = '{"thread":"main","logger":"com.example.App"}'
    assert [(r[2], r[4], r[6], r[7]) for r in rows] == [
        ("2026-11-24 11:32:56.655000", None, "error", fields),
        ("2026-11-24 11:32:57.001000", None, "info", fields)]
    assert rows[0][8][rows[0][10] - 1:] == "boom\n" + JAVA.split(b"\n", 1)[1][:-1].decode()


class GeneralLoopOnly(lt.EntryBuilder):
    """The builder with its fast paths replaced by its general loop."""

    def _feed_plain(self, lines, sizes, offset):
        return self._feed_lines(lines, lines, sizes, [None] * len(lines), offset)

    def _feed_headers(self, lines, sizes, heads, offset):
        return self._feed_lines(lines, lines, sizes, heads, offset)

    def _feed_entries(self, lines, sizes, heads, offset):
        return self._feed_lines(lines, lines, sizes, heads, offset)

    def _feed_syslog(self, lines, sizes, found, offset):
        heads = [self.parse(line, self.stamps) for line in lines]
        return self._feed_lines(lines, lines, sizes, heads, offset)


def feed_in_chunks(builder, data: bytes, rng) -> list:
    """Rows for data fed in chunks cut at random line ends, then flushed."""
    ends = [i + 1 for i, byte in enumerate(data) if byte == 10]
    cuts = sorted(rng.sample(ends[:-1], min(len(ends) - 1, rng.randint(0, 40)))) + [len(data)]
    rows, start = [], 0
    for cut in cuts:
        rows += builder.feed(data[start:cut], start)
        start = cut
    return rows + builder.flush()


@pytest.mark.parametrize("format,data", [
    ("syslog", None),       # syslog_backlog(): tracebacks, lines without pid, odd lines
    ("app", (TRACE + JAVA + b"2026-11-24 13:59:22,000 INFO app.web: after\n" + "d\u00e9j\u00e0 "
             "vu\n".encode() + b"bad \xff byte\n") * 40),
    ("plain", b"".join(b"line %d\n" % n + (b"caf\xc3\xa9\n" if n % 9 == 0 else b"")
                       for n in range(2000))),
    ("java", (b"11:32:56.655 [main] ERROR com.example.App - boom\n" + JAVA.split(b"\n", 1)[1]
              + b"2026-11-24 13:59:22,000 INFO [main] c.e.App - after\n") * 60),
    ("docker", None),       # container_backlog(): pieces across chunks, both streams, odd lines
    ("cri", None),
])
def test_builder_fast_paths_store_what_the_general_loop_does(stamps, format, data):
    if data is None:
        data = syslog_backlog(3000, seed=3) if format == "syslog" else container_backlog(format)
    for max_bytes, max_lines in [(1 << 20, 500), (200, 3)]:    # and with entries capped
        options = lt.ParseOptions(format, None, None, max_bytes, max_lines)
        reference = GeneralLoopOnly(1, options, stamps, FullRows)
        expected = reference.feed(data, 0) + reference.flush()
        assert len(expected) > 100
        for seed in range(8):
            builder = lt.EntryBuilder(1, options, stamps, FullRows)
            assert feed_in_chunks(builder, data, random.Random(seed)) == expected, seed


def container_backlog(format: str, lines: int = 1500, seed: int = 4) -> bytes:
    """A Docker or CRI log: lines of both streams, a few long ones in pieces (the pieces of
    one sometimes cut by the other stream's), lines that are not the format's."""
    rng = random.Random(seed)
    out = []
    for n in range(lines):
        stream = "stderr" if rng.random() < 0.2 else "stdout"
        kind = rng.random()
        text = (f'{{"level":"warn","msg":"request {n}","took_ms":{n % 97}}}' if kind < 0.3
                else f"2026-11-24 13:59:19,{n % 1000:03d} ERROR app.web: failed {n}" if kind < 0.4
                else f"plain line {n} caf\u00e9")
        pieces = [text[i:i + 7] for i in range(0, len(text), 7)] if rng.random() < 0.1 else [text]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if format == "docker":
                out.append(docker(piece + "\n" if last else piece, stream))
            else:
                out.append(f"2026-11-24T13:59:19.{n:09d}Z {stream} {'F' if last else 'P'} {piece}")
            if rng.random() < 0.02:
                out.append("not a container line")
    return "".join(line + "\n" for line in out).encode()


def test_stack_trace_is_one_entry_held_until_quiet(tailer, logdir, db):
    tailer()
    with open(logdir / "app.log", "ab", buffering=0) as file:
        file.write(TRACE)
        wait_for(lambda: len(raws(db)) == 1, 10, "the held entry after a quiet moment",
                 lambda: raws(db))
        file.write(JAVA + b"2026-11-24 13:59:22,000 INFO app.web: after\n")
        wait_for(lambda: len(raws(db)) == 2, 10, "the Java trace when the next entry begins",
                 lambda: raws(db))
        # Checked with the file still open: closing it completes the last entry too.
        assert raws(db) == [TRACE[:-1], JAVA[:-1]]
    assert query(db, "SELECT level, program, message FROM entries WHERE id = 2") == [
        ("error", "com.example.App", JAVA[JAVA.index(b"boom"):-1].decode())]


class Clock:
    """A clock that stands still until the test moves it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def in_process(logdir, db):
    """A Tailer in this process, on a clock the test moves: its timing rules without waits.
    Rounds are run by hand; names changed are told to it as inotify would (see event())."""
    clock = Clock()
    store = lt.open_store(str(db))
    tailer = lt.Tailer(os.fsencode(logdir), store, lt.parse_args([str(logdir), str(db)]),
                       clock=clock)
    tailer.load()
    tailer.round(clock.now)     # the first scan
    yield tailer, clock
    store.close()


def event(tailer, name: str, mask=lt.IN_MODIFY):
    tailer.directory.dirty[name.encode()] = tailer.directory.dirty.get(name.encode(), 0) | mask


def test_held_entry_is_stored_after_hold_s_of_quiet(in_process, logdir, db):
    tailer, clock = in_process
    (logdir / "app.log").write_bytes(TRACE)
    event(tailer, "app.log", lt.IN_CREATE)
    tailer.round(clock.now)
    assert raws(db) == []       # held: its writer may go on with it
    clock.now += lt.HOLD_S - 0.01
    tailer.round(clock.now)
    assert raws(db) == []
    clock.now += 0.01
    assert tailer.timeout(clock.now) == 0
    tailer.round(clock.now)
    assert raws(db) == [TRACE[:-1]]


def test_deleted_file_is_read_until_rotate_wait_s_of_quiet(in_process, logdir, db):
    tailer, clock = in_process
    (logdir / "app.log").write_bytes(b"one\n")
    event(tailer, "app.log", lt.IN_CREATE)
    tailer.round(clock.now)
    keep = os.open(logdir / "app.log", os.O_WRONLY | os.O_APPEND)     # a writer keeps it
    try:
        os.unlink(logdir / "app.log")
        event(tailer, "app.log", lt.IN_DELETE)
        tailer.round(clock.now)
        clock.now += lt.ROTATE_WAIT_S - 0.01
        os.write(keep, b"two\n")          # written after the deletion: still read
        tailer.round(clock.now)
        assert raws(db) == [b"one", b"two"]
        clock.now += lt.ROTATE_WAIT_S - 0.01
        tailer.round(clock.now)
        assert query(db, "SELECT gone IS NULL FROM files") == [(1,)]
        clock.now += 0.01
        tailer.round(clock.now)
        assert query(db, "SELECT gone IS NULL FROM files") == [(0,)]    # let go
        assert tailer.tracked == {}
    finally:
        os.close(keep)


def test_copy_nobody_closed_is_decided_after_copy_quiet_s(in_process, logdir, db):
    tailer, clock = in_process
    first, second = numbered(0, 1000), numbered(1000, 2000)
    (logdir / "app.log").write_bytes(first)
    event(tailer, "app.log", lt.IN_CREATE)
    tailer.round(clock.now)
    append(logdir / "app.log", second)
    event(tailer, "app.log")
    tailer.round(clock.now)     # read in two goes: a checkpoint past the first KiB
    with open(logdir / "app.log", "r+b") as file:
        file.truncate(0)
    event(tailer, "app.log")
    tailer.round(clock.now)
    # A copy that ended before the lines read last (logrotate copies, then syncs).
    (logdir / "app.log.1").write_bytes(first + second[:len(second) // 2])
    event(tailer, "app.log.1", lt.IN_CREATE)
    tailer.round(clock.now)
    assert query(db, "SELECT count(*) FROM files WHERE path LIKE '%.1'") == [(0,)]  # undecided
    clock.now += lt.COPY_QUIET_S - 0.01
    tailer.round(clock.now)
    assert query(db, "SELECT count(*) FROM files WHERE path LIKE '%.1'") == [(0,)]
    clock.now += 0.01
    tailer.round(clock.now)
    size = (logdir / "app.log.1").stat().st_size
    assert query(db, "SELECT offset FROM files WHERE path LIKE '%.1'") == [(size,)]
    assert numbers_of(raws(db)) == list(range(2000))


@pytest.mark.parametrize("name,line", [
    ("syslog", b"Dec  2 11:32:56 web-01 app[42]: a lone line\n"),
    ("app.log", b"2026-12-02 11:32:56,655 INFO app.web: a lone line\n"),
    ("app.json", b'{"time": "2026-12-02T11:32:56Z", "level": "info", "msg": "a lone line"}\n'),
    ("plain.txt", b"a lone line\n"),
])
def test_lone_line_of_a_writer_that_keeps_its_file_open_shows_soon(tailer, logdir, db, name,
                                                                  line):
    tailer()
    with open(logdir / name, "ab", buffering=0) as file:
        file.write(line)
        written = time.monotonic()
        wait_for(lambda: raws(db) == [line[:-1]], 10, "the lone line", lambda: raws(db))
        # HOLD_S (an entry might go on) plus what the round takes: well under a second
        assert time.monotonic() - written < 0.7


def test_entry_whose_lines_come_100_ms_apart_stays_one_entry(tailer, logdir, db):
    tailer()
    with open(logdir / "app.log", "ab", buffering=0) as file:
        for line in TRACE.splitlines(keepends=True):
            file.write(line)
            time.sleep(0.1)     # the writer's pace, the point of this test
        file.write(b"2026-11-24 13:59:21,000 INFO app.web: next\n")
        wait_for(lambda: len(raws(db)) >= 1, 10, "the trace", lambda: raws(db))
        assert raws(db)[0] == TRACE[:-1]


def test_sigterm_during_a_big_catch_up_exits_within_2_s(binding, logdir, db, tmp_path):
    (logdir / "syslog").write_bytes(syslog_backlog(400000))
    daemon = Daemon(binding, logdir, db, tmp_path / "stderr", ())
    try:
        wait_for(lambda: query(db, "SELECT count(*) FROM entries")[:1] not in ([], [(0,)]), 30,
                 "the catch-up under way")
        asked = time.monotonic()
        assert daemon.terminate(timeout=10) == 0
        assert time.monotonic() - asked < 2
    finally:
        daemon.stop()
    [(offset,)] = query(db, "SELECT offset FROM files")
    stored = (logdir / "syslog").read_bytes()[:offset]
    assert 0 < offset < (logdir / "syslog").stat().st_size      # cut short, and consistent:
    assert len(raws(db)) == len(re.findall(rb"(?m)^Nov ", stored))    # each entry before it
    assert b"\n".join(raws(db)) + b"\n" == stored


def test_closing_writer_completes_the_held_entry(tailer, logdir, db):
    tailer()
    started = time.monotonic()
    append(logdir / "app.log", TRACE)       # open, write, close: IN_CLOSE_WRITE
    wait_for(lambda: raws(db) == [TRACE[:-1]], 10, "the entry", lambda: raws(db))
    assert time.monotonic() - started < 0.9     # not the quiet second


def test_kill_9_while_an_entry_is_held_loses_and_doubles_nothing(binding, tailer, logdir, db):
    daemon = tailer()
    with open(logdir / "app.log", "ab", buffering=0) as file:
        file.write(TRACE + JAVA[:JAVA.index(b"Caused")])
        wait_for(lambda: len(raws(db)) == 1, 10, "the first entry", lambda: raws(db))
        daemon.kill()
        file.write(JAVA[JAVA.index(b"Caused"):])
    result = run_once(logdir, db, command=binding)
    assert result.returncode == 0, result.stderr
    assert raws(db) == [TRACE[:-1], JAVA[:-1]]


def test_line_that_does_not_fit_is_stored_plain(logdir, db):
    (logdir / "app.json").write_bytes(b'{"level": "error", "msg": "one"}\noops, not json\n'
                                      b'{"level": "info", "msg": "two", "user": 7}\n')
    assert run_once(logdir, db).returncode == 0
    assert query(db, "SELECT level, message, fields FROM entries ORDER BY id") == [
        ("error", "one", None), (None, "oops, not json", None), ("info", "two", '{"user":7}')]
    assert query(db, "SELECT format FROM files") == [("json",)]


def test_format_is_decided_again_when_a_new_file_takes_the_name(tailer, logdir, db):
    tailer()
    append(logdir / "app.log", b"Nov 24 13:59:19 web-01 app[1]: started\n")
    wait_for(lambda: len(raws(db)) == 1, 10, "the syslog line", lambda: raws(db))
    os.rename(logdir / "app.log", logdir / "app.log.1")
    append(logdir / "app.log", b'{"level": "warn", "msg": "json now"}\n')
    wait_for(lambda: len(raws(db)) == 2, 10, "the JSON line", lambda: raws(db))
    assert query(db, "SELECT f.format, e.level, e.message FROM entries e "
                     "JOIN files f ON f.id = e.file_id ORDER BY e.id") == [
        ("syslog", None, "started"), ("json", "warning", "json now")]


def test_non_utf8_and_nul_lines_keep_their_bytes_and_get_a_readable_message(logdir, db):
    (logdir / "bin.log").write_bytes(b"caf\xe9 au lait\nnul\x00inside\nplain\n")
    assert run_once("--format", "plain", logdir, db).returncode == 0
    assert raws(db) == [b"caf\xe9 au lait", b"nul\x00inside", b"plain"]
    assert query(db, "SELECT message, typeof(raw) FROM entries ORDER BY id") == [
        ("caf\ufffd au lait", "blob"), ("nul\x00inside", "blob"), ("plain", "text")]


def test_syslog_year_from_mtime_and_local_time_zone(logdir, db):
    log = logdir / "syslog"
    log.write_bytes(b"Dec 31 23:59:59 web-01 cron[9]: last of the year\n"
                    b"Jan  1 00:00:01 web-01 cron[9]: first of the next\n")
    mtime = calendar.timegm((2027, 1, 1, 12, 0, 0))
    os.utime(log, (mtime, mtime))
    result = subprocess.run([sys.executable, TOOL, "--once", str(logdir), str(db)],
                            capture_output=True, env={**os.environ, "TZ": "Europe/Berlin"})
    assert result.returncode == 0, result.stderr
    assert query(db, "SELECT ts FROM entries ORDER BY id") == [
        ("2026-12-31 22:59:59",), ("2026-12-31 23:00:01",)]
    assert query(db, "SELECT count(*) FROM entries WHERE ts >= datetime('2026-12-31 23:00')") \
        == [(1,)]


def test_pattern_fills_columns_and_fields(logdir, db):
    (logdir / "custom.log").write_bytes(b"2026-11-24T13:59:19Z|web-01|WARN|disk|92% full\n")
    result = run_once("--pattern", r"(?P<ts>[^|]+)\|(?P<host>[^|]+)\|(?P<level>[^|]+)\|"
                      r"(?P<subsystem>[^|]+)\|(?P<message>.*)", logdir, db)
    assert result.returncode == 0, result.stderr
    assert query(db, "SELECT ts, host, level, fields, message FROM entries") == [
        ("2026-11-24 13:59:19", "web-01", "warning", '{"subsystem":"disk"}', "92% full")]
    assert query(db, "SELECT format FROM files") == [("pattern",)]


def test_bad_pattern_is_a_usage_error(logdir, db):
    result = run_once("--pattern", "(unclosed", logdir, db)
    assert result.returncode == 2
    assert b"not a valid regular expression" in result.stderr


def once_in_utc(logdir, db, *args):
    """run_once with TZ=UTC, for files whose times have no zone."""
    result = subprocess.run([sys.executable, TOOL, "--once", *args, str(logdir), str(db)],
                            capture_output=True, env={**os.environ, "TZ": "UTC"}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


COLUMNS = "SELECT ts, host, program, pid, level, message, fields FROM entries ORDER BY id"


def test_journald_export_fills_columns(logdir, db):
    lines = [journal(SYSLOG_IDENTIFIER="sshd", _PID="4242", MESSAGE="Accepted publickey"),
             journal(_COMM="kworker", PRIORITY="3", MESSAGE=[98, 97, 100, 32, 255]),
             journal(SYSLOG_IDENTIFIER="logtail2db", _TRANSPORT="stdout",
                     MESSAGE="logtail2db: warning: skipping x")]
    (logdir / "journal.json").write_text("".join(line + "\n" for line in lines))
    assert run_once(logdir, db).returncode == 0
    rows = query(db, COLUMNS)
    assert [row[:6] for row in rows] == [
        (TS + ".123456", "web-01", "sshd", 4242, "info", "Accepted publickey"),
        (TS + ".123456", "web-01", "kworker", None, "error", "bad \ufffd"),
        (TS + ".123456", "web-01", "logtail2db", None, "warning",
         "logtail2db: warning: skipping x")]
    assert json.loads(rows[0][6]) == JOURNAL_FIELDS
    assert raws(db) == [line.encode() for line in lines]
    assert query(db, "SELECT format FROM files") == [("journald",)]


def test_journalctl_short_precise_and_iso_keep_fractions(logdir, db):
    (logdir / "precise.log").write_bytes(
        b"Dec 02 11:32:56.655353 web-01 sshd[123]: Accepted publickey\n"
        b"Dec 02 11:32:57.000001 web-01 postfix/smtpd[9]: warning: hostname x unknown\n")
    (logdir / "iso.log").write_bytes(
        b"2026-12-02T12:32:58.655353+01:00 web-01 sshd[123]: precise\n"
        b"2026-12-02T12:32:59+0100 web-01 sshd[123]: error: short-iso\n")
    for name in ("precise.log", "iso.log"):
        os.utime(logdir / name, (DEC_2_2026, DEC_2_2026))
    once_in_utc(logdir, db)
    assert sorted(query(db, "SELECT ts, host, program, pid, level, message FROM entries")) == [
        ("2026-12-02 11:32:56.655353", "web-01", "sshd", 123, None, "Accepted publickey"),
        ("2026-12-02 11:32:57.000001", "web-01", "postfix/smtpd", 9, "warning",
         "warning: hostname x unknown"),
        ("2026-12-02 11:32:58.655353", "web-01", "sshd", 123, None, "precise"),
        ("2026-12-02 11:32:59", "web-01", "sshd", 123, "error", "error: short-iso")]
    assert query(db, "SELECT DISTINCT format FROM files") == [("syslog",)]


def test_docker_json_file_joins_split_lines(logdir, db):
    lines = [docker("starting\n"), docker("x" * 16384), docker("y" * 100 + "\n"),
             docker('{"level":"error","msg":"boom","user":7}\n', "stderr")]
    data = "".join(line + "\n" for line in lines).encode()
    (logdir / "abc-json.log").write_bytes(data)
    assert run_once(logdir, db).returncode == 0
    assert query(db, "SELECT ts, level, message, fields FROM entries ORDER BY id") == [
        (TS + ".123456", None, "starting", '{"stream":"stdout"}'),
        (TS + ".123456", None, "x" * 16384 + "y" * 100, '{"stream":"stdout"}'),
        (TS + ".123456", "error", "boom", '{"user":7,"stream":"stderr"}')]
    assert raws(db) == [lines[0].encode(), (lines[1] + "\n" + lines[2]).encode(),
                        lines[3].encode()]
    assert query(db, "SELECT format, offset FROM files") == [("docker", len(data))]


def test_cri_log_joins_partial_pieces_and_reads_what_the_container_wrote(logdir, db):
    lines = ["2026-11-24T13:59:19.000000001Z stdout F plain start",
             '2026-11-24T13:59:19.123456789Z stdout P {"level":"warn","msg":"ha',
             '2026-11-24T13:59:19.123456790Z stdout P lf and',
             '2026-11-24T13:59:19.123456791Z stdout F  half","k":1}',
             '2026-11-24T13:59:20Z stderr F level=error ts=2026-11-24T13:59:20Z msg="x y"']
    (logdir / "web_default_app-0123.log").write_text("".join(line + "\n" for line in lines))
    assert run_once(logdir, db).returncode == 0
    assert query(db, "SELECT ts, level, message, fields FROM entries ORDER BY id") == [
        (TS + ".000000", None, "plain start", '{"stream":"stdout"}'),
        (TS + ".123456", "warning", "half and half", '{"k":1,"stream":"stdout"}'),
        ("2026-11-24 13:59:20", "error", "x y", '{"stream":"stderr"}')]
    assert raws(db) == [lines[0].encode(), "\n".join(lines[1:4]).encode(), lines[4].encode()]
    assert query(db, "SELECT format FROM files") == [("cri",)]


def test_logfmt_file_fills_columns(logdir, db):
    (logdir / "loki.log").write_bytes(
        b'level=info ts=2026-11-24T13:59:19.123Z caller=main.go:12 msg="Starting Loki" v=3\n'
        b'level=warn ts=2026-11-24T13:59:20Z caller=ring.go:40 msg="ring not ready"\n'
        b'time="2026-11-24T13:59:21Z" level=error msg="text here" key=value\n')
    assert run_once(logdir, db).returncode == 0
    assert query(db, "SELECT ts, level, message, fields FROM entries ORDER BY id") == [
        (TS + ".123000", "info", "Starting Loki", '{"caller":"main.go:12","v":"3"}'),
        ("2026-11-24 13:59:20", "warning", "ring not ready", '{"caller":"ring.go:40"}'),
        ("2026-11-24 13:59:21", "error", "text here", '{"key":"value"}')]
    assert query(db, "SELECT format FROM files") == [("logfmt",)]


def test_logback_default_is_dated_by_the_file_and_keeps_its_stack_traces(logdir, db):
    trace = JAVA.split(b"\n", 1)[1]
    log = logdir / "app.log"
    log.write_bytes(b"23:59:58.100 [main] INFO  com.example.App - before midnight\n"
                    b"11:32:56.655 [main] ERROR com.example.App - boom\n" + trace
                    + b"11:33:00.001 [worker-1] WARN  c.e.Job - slow\n")
    os.utime(log, (DEC_2_2026, DEC_2_2026))
    once_in_utc(logdir, db)
    assert query(db, "SELECT ts, program, level, fields FROM entries ORDER BY id") == [
        ("2026-12-01 23:59:58.100000", None, "info",
         '{"thread":"main","logger":"com.example.App"}'),
        ("2026-12-02 11:32:56.655000", None, "error",
         '{"thread":"main","logger":"com.example.App"}'),
        ("2026-12-02 11:33:00.001000", None, "warning", '{"thread":"worker-1","logger":"c.e.Job"}')]
    assert raws(db)[1] == b"11:32:56.655 [main] ERROR com.example.App - boom\n" + trace[:-1]
    assert query(db, "SELECT format FROM files") == [("java",)]


def test_messages_that_state_their_level_fill_it(logdir, db):
    (logdir / "logtail2db.err").write_bytes(
        b"2026-11-24 13:59:19 logtail2db: info: watching /var/log/app\n"
        b"2026-11-24 13:59:20 logtail2db: warning: skipping x: Permission denied\n"
        b"2026-11-24 13:59:21 logtail2db: error: database is locked; retrying\n")
    (logdir / "syslog").write_bytes(
        b"Nov 24 13:59:19 mx postfix/smtpd[99]: warning: hostname x does not resolve\n"
        b"Nov 24 13:59:19 web-01 sshd[7]: error: kex_exchange_identification: closed\n"
        b"Nov 24 13:59:19 web-01 python3[8]: logtail2db: warning: skipping y\n"
        b"Nov 24 13:59:19 web-01 kernel: eth0: link up\n")
    os.utime(logdir / "syslog", (NOV_2026, NOV_2026))
    once_in_utc(logdir, db)
    assert query(db, "SELECT f.format, e.level FROM entries e JOIN files f ON f.id = e.file_id "
                     "ORDER BY f.path, e.id") == [
        ("app", "info"), ("app", "warning"), ("app", "error"),
        ("syslog", "warning"), ("syslog", "error"), ("syslog", "warning"), ("syslog", None)]




# A catch-up on two cores: the parse worker ##################################

def syslog_backlog(lines: int, seed: int = 1) -> bytes:
    """A syslog file with Python tracebacks among its lines: multi-line entries that
    cross chunk boundaries, lines without pid, a few that are not syslog at all."""
    rng = random.Random(seed)
    out = []
    for n in range(lines):
        second = n // 50
        stamp = b"Nov %2d %02d:%02d:%02d" % (1 + second // 86400 % 28, second // 3600 % 24,
                                            second // 60 % 60, second % 60)
        kind = rng.random()
        if kind < 0.02:
            out.append(b"%s web-01 app[77]: request failed\nTraceback (most recent call last):"
                       b"\n  File \"app.py\", line %d, in handle\nValueError: bad %d\n"
                       % (stamp, n % 900, n))
        elif kind < 0.2:
            out.append(b"%s web-02 kernel: [%d.%06d] eth0: link up %d\n" % (stamp, n, n, n))
        else:
            out.append(b"%s web-0%d nginx[%d]: GET /item/%d HTTP/1.1 200 took %dms line %d\n"
                       % (stamp, n % 4, 1000 + n % 50, n, n % 97, n))
    return b"".join(out)


ENTRY_COLUMNS = ("SELECT file_id, offset, ts, host, program, pid, level, fields, "
                 "CAST(raw AS BLOB), message, part FROM entries ORDER BY file_id, offset")


@pytest.fixture(scope="module")
def backlog_and_reference(tmp_path_factory):
    """A 16 MB syslog backlog and what a one-core catch-up stores of it."""
    base = tmp_path_factory.mktemp("backlog")
    logdir = base / "logs"
    logdir.mkdir()
    (logdir / "syslog").write_bytes(syslog_backlog(160000))
    os.utime(logdir / "syslog", (1795528759, 1795528759))
    result = run_once("--cores", "1", logdir, base / "ref.db")
    assert result.returncode == 0, result.stderr
    return logdir, query(base / "ref.db", ENTRY_COLUMNS)


def test_two_core_catch_up_stores_what_one_core_does(backlog_and_reference, tmp_path):
    logdir, reference = backlog_and_reference
    assert (logdir / "syslog").stat().st_size > 3 * lt.BULK_BYTES
    result = run_once("--cores", "2", "-v", logdir, tmp_path / "two.db")
    assert result.returncode == 0, result.stderr
    assert b"parse worker takes syslog from offset 0" in result.stderr
    assert query(tmp_path / "two.db", ENTRY_COLUMNS) == reference
    assert sum(1 for row in reference if b"\nTraceback" in row[8]) > 1000


def test_two_core_catch_up_of_several_big_files(logdir, tmp_path):
    for n in range(3):      # each waits its turn with the worker, none is read twice
        (logdir / f"syslog.{n}").write_bytes(syslog_backlog(60000, seed=n))
        os.utime(logdir / f"syslog.{n}", (1795528759, 1795528759))
    assert min(p.stat().st_size for p in logdir.iterdir()) > lt.BULK_BYTES
    for cores in ("1", "2"):
        result = run_once("--cores", cores, "-v", logdir, tmp_path / f"{cores}.db", timeout=60)
        assert result.returncode == 0, result.stderr
        taken = re.findall(rb"parse worker takes (syslog\.[0-9])", result.stderr)
        assert len(taken) == (0 if cores == "1" else len(set(taken))) and (cores == "1" or taken)
    assert query(tmp_path / "2.db", ENTRY_COLUMNS) == query(tmp_path / "1.db", ENTRY_COLUMNS)


def test_lines_longer_than_a_chunk_are_read_whole_on_either_core(logdir, tmp_path):
    sizes = [lt.READ_CHUNK + 1, 300_000, 900_000, (1 << 20) - 100]    # --max-entry-bytes: 1 MiB
    assert min(sizes) > lt.READ_CHUNK
    parts = [syslog_backlog(30000, seed=n) for n in range(len(sizes) + 1)]
    for n, size in enumerate(sizes):
        head = b"Nov  2 00:00:%02d web-01 app[%d]: " % (n, n)
        parts.insert(2 * n + 1, head + b"x" * (size - len(head) - 1) + b"\n")
    (logdir / "syslog").write_bytes(b"".join(parts))
    os.utime(logdir / "syslog", (1795528759, 1795528759))
    assert (logdir / "syslog").stat().st_size > 3 * lt.BULK_BYTES
    for cores in ("1", "2"):
        result = run_once("--cores", cores, "-v", logdir, tmp_path / f"{cores}.db", timeout=60)
        assert result.returncode == 0, result.stderr
        # The worker reads each long line whole: its one run is not cut short by them.
        assert result.stderr.count(b"parse worker takes") == (cores == "2"), result.stderr
    rows = query(tmp_path / "2.db", ENTRY_COLUMNS)
    assert rows == query(tmp_path / "1.db", ENTRY_COLUMNS)
    long_rows = [row for row in rows if len(row[8]) + 1 > lt.READ_CHUNK]
    assert [len(row[8]) + 1 for row in long_rows] == sizes
    assert [(row[4], row[10]) for row in long_rows] == [("app", None)] * len(sizes)


@pytest.mark.parametrize("frame_bytes", [lt.WORKER_FRAME, 16])    # and its buffer grown
# The kernel's least socket buffer too: each frame of rows comes in hundreds of pieces.
@pytest.mark.parametrize("socket_bytes", [lt.WORKER_BUFFER, 4096])
def test_parse_worker_is_free_again_once_its_run_is_taken(tmp_path, stamps, frame_bytes,
                                                          socket_bytes, monkeypatch):
    monkeypatch.setattr(lt, "WORKER_FRAME", frame_bytes)
    monkeypatch.setattr(lt, "WORKER_BUFFER", socket_bytes)
    path = tmp_path / "syslog"
    path.write_bytes(syslog_backlog(20000))
    options = lt.ParseOptions("syslog", None, None, 1 << 20, 500)
    state = lt.FileState(1, str(path), None, 0, 0, 0, b"", None, None, "syslog", "", "", None)
    t = lt.Tracked(state, 0.0)
    t.fd = os.open(path, os.O_RDONLY)
    t.builder = lt.EntryBuilder(1, options, stamps, lt.SqliteRows, "syslog")
    worker = lt.ParseWorker(options, lt.SqliteRows)
    counts = []     # of the rows in each batch taken
    try:
        worker.take(t, 1 << 20, lambda file, batch: counts.append(batch[0]))   # its run begins
        deadline = time.monotonic() + 30
        while not worker.free():
            assert time.monotonic() < deadline, (t.pos, worker.file, len(worker.chunks))
            if worker.wants_input() and select.select([worker], [], [], 1)[0]:
                worker.receive()
            worker.take(t, 1 << 20, lambda file, batch: counts.append(batch[0]))
        assert t.pos == path.stat().st_size
        assert len(counts) > 1
        assert sum(counts) + len(t.builder.flush()) == len(
            lt.EntryBuilder(1, options, stamps, lt.SqliteRows, "syslog")
            .feed(path.read_bytes(), 0)) + 1
    finally:
        worker.close()
        os.close(t.fd)


def test_once_over_big_backlogs_ends_when_they_are_stored(logdir, db):
    for n in range(3):
        (logdir / f"app-{n}.json").write_bytes(b"".join(
            b'{"time": "2026-11-24T13:%02d:%02dZ", "level": "info", "msg": "file %d line %d"}\n'
            % (k // 60 % 60, k % 60, n, k) for k in range(60000)))
    os.utime(logdir, None)
    for path in logdir.iterdir():
        os.utime(path, (1795528759, 1795528759))     # not possibly copies being written
    result = run_once("-v", logdir, db, timeout=40)     # 60 s is when it would rescan
    assert result.returncode == 0, result.stderr
    assert b"parse worker takes app-0.json from offset 0" in result.stderr   # found first
    helped = re.findall(rb"(\S+): parsing here too, while the parse worker parses (\S+)",
                        result.stderr)
    # Both cores parse: this one the backlog the worker would take last, so that the
    # worker's last one is small (then this core only inserts).
    assert helped[:1] == [(b"app-2.json", b"app-0.json")], result.stderr
    assert query(db, "SELECT count(*), count(DISTINCT file_id || ' ' || offset) FROM entries") == [
        (180000, 180000)]


def children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue    # gone meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.mark.soak
def test_kill_9_during_a_two_core_catch_up(binding, backlog_and_reference, tmp_path):
    logdir, reference = backlog_and_reference
    db = tmp_path / "app.db"
    rng = random.Random(99)
    for round_ in range(6):
        daemon = Daemon(binding, logdir, db, tmp_path / f"kill-{round_}", ())
        time.sleep(rng.uniform(0.3, 1.5))     # the random moment is the point of this test
        workers = children_of(daemon.proc.pid)
        daemon.kill()
        for worker in workers:      # a worker left alone exits: it holds nothing
            wait_for(lambda: not Path(f"/proc/{worker}").exists() or
                     "Z" in Path(f"/proc/{worker}/stat").read_text().split(")")[1][:3],
                     10, "the orphaned worker to exit")
    result = run_once(logdir, db, command=binding)
    assert result.returncode == 0, result.stderr
    assert query(db, ENTRY_COLUMNS) == reference


def test_a_dead_parse_worker_falls_back_to_one_core(tailer, backlog_and_reference, logdir, db):
    source, reference = backlog_and_reference
    daemon = tailer()
    os.link(source / "syslog", logdir / "syslog")   # the whole backlog at once
    wait_for(lambda: children_of(daemon.proc.pid), 20, "the parse worker to start")
    for worker in children_of(daemon.proc.pid):
        os.kill(worker, signal.SIGKILL)
    wait_for(lambda: len(query(db, "SELECT id FROM entries")) >= len(reference), 60,
             "every entry", lambda: len(query(db, "SELECT id FROM entries")))
    wait_for(lambda: query(db, "SELECT offset FROM files") == [(os.path.getsize(logdir /
             "syslog"),)], 10, "the whole file stored")
    assert query(db, ENTRY_COLUMNS) == reference
    assert "parsing in-process from now on" in daemon.stderr


# Everyday use: the logs view, full-text search, retention, stats, progress ####

APP_LOG = (b"2026-11-24 13:59:19,123 INFO app.db: connected to the database\n"
           b"2026-11-24 13:59:20,456 ERROR app.web: request timeout after 30 s\n"
           b"2026-11-24 13:59:21,000 WARNING app.web: slow request\n")


def test_logs_view_answers_the_first_query(logdir, db):
    (logdir / "app.log").write_bytes(APP_LOG)
    assert run_once(logdir, db).returncode == 0
    assert query(db, "SELECT ts, level, path, message FROM logs WHERE level = 'error' "
                     "ORDER BY ts DESC LIMIT 20") == [
        ("2026-11-24 13:59:20.456000", "error", str(logdir / "app.log"),
         "request timeout after 30 s")]


def test_full_text_search_stays_in_step_with_entries(logdir, db):
    (logdir / "app.log").write_bytes(APP_LOG)
    assert run_once(logdir, db).returncode == 0
    assert query(db, "SELECT count(*) FROM sqlite_master WHERE name LIKE 'entries_fts%'") \
        == [(0,)]       # no --fts: no index, no cost
    assert run_once("--fts", logdir, db).returncode == 0     # built from what is stored
    append(logdir / "app.log", b"2026-11-24 14:00:00,000 ERROR app.db: connection timeout\n")
    assert run_once("--fts", logdir, db).returncode == 0     # kept in step by triggers
    match = ("SELECT path, message FROM logs WHERE id IN "
             "(SELECT rowid FROM entries_fts WHERE entries_fts MATCH ?) ORDER BY id")
    assert query(db, match, ("timeout",)) == [
        (str(logdir / "app.log"), "request timeout after 30 s"),
        (str(logdir / "app.log"), "connection timeout")]
    delete_in_step(db, "message LIKE 'request%'")
    assert query(db, match, ("timeout",)) == [(str(logdir / "app.log"), "connection timeout")]


def test_fts5_missing_is_a_clear_error():
    class NoFts5:
        def execute(self, sql, *args):
            if "fts5" in sql:
                raise sqlite3.OperationalError("no such module: fts5")
            return sqlite3.connect(":memory:").execute("SELECT 1 WHERE 0")   # no rows

    store = lt.SqliteStore("x.db", NoFts5(), -1)
    with pytest.raises(lt.Fatal, match="--fts needs SQLite's FTS5 module"):
        store.enable_fts()


def test_keep_deletes_old_entries_and_keeps_offsets(tailer, logdir, db):
    log = logdir / "app.log"
    log.write_bytes(b"2020-01-01T00:00:00Z INFO old one\n"
                    b"2099-01-01T00:00:00Z INFO from the future\n"
                    b"2020-01-02T00:00:00Z INFO old two\n")
    (logdir / "plain.txt").write_bytes(b"no time here\n")
    assert run_once(logdir, db).returncode == 0
    assert len(raws(db)) == 4
    tailer("--keep", "30d")
    wait_for(lambda: len(raws(db)) == 2, 10, "the old entries deleted", lambda: raws(db))
    assert sorted(raws(db)) == [b"2099-01-01T00:00:00Z INFO from the future", b"no time here"]
    assert sorted(query(db, "SELECT offset FROM files")) == [(13,), (log.stat().st_size,)]
    append(log, b"2099-01-02T00:00:00Z INFO newer\n")
    wait_for(lambda: len(raws(db)) == 3, 10, "only the new line", lambda: raws(db))


def test_keep_ages_entries_without_time_by_when_they_were_stored(logdir, db):
    (logdir / "plain.txt").write_bytes(b"stored long ago\n")
    assert run_once(logdir, db).returncode == 0
    by_hand(db, "UPDATE ingested SET at = '2001-01-01 00:00:00'")    # as if stored then
    append(logdir / "plain.txt", b"stored now\n")
    assert run_once("--keep", "1d", logdir, db).returncode == 0
    assert raws(db) == [b"stored now"]


def test_stats_shows_files_levels_and_lag_and_never_writes(logdir, db):
    (logdir / "app.log").write_bytes(APP_LOG)
    assert run_once(logdir, db).returncode == 0
    before = sorted(p.name for p in db.parent.iterdir()), db.read_bytes()
    append(logdir / "app.log", b"x" * 500)          # unread: a lag of 500 bytes
    result = subprocess.run([sys.executable, TOOL, "--stats", str(db)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert str(logdir / "app.log") in result.stdout
    assert "500 B" in result.stdout
    assert "by level: error 1, info 1, warning 1" in result.stdout
    assert "newest: 2026-11-24 13:59:21.000000 UTC" in result.stdout
    result = subprocess.run([sys.executable, TOOL, "--stats", "--max-lag", "100", str(db)],
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert (f"1 file lags by more than --max-lag 100 bytes: {logdir / 'app.log'} (500 bytes)"
            in result.stderr)
    assert (sorted(p.name for p in db.parent.iterdir()), db.read_bytes()) == before


def test_stats_into_a_pipe_closed_early_keeps_its_exit_status(logdir, db):
    for n in range(2000):           # more than a pipe holds: the writer meets the closed end
        (logdir / f"app-{n:04}.log").write_bytes(b"plain\n")
    assert run_once(logdir, db).returncode == 0
    append(logdir / "app-0007.log", b"unread\n")
    result = subprocess.run(
        ["bash", "-c", '"$0" "$1" --stats --max-lag 1 "$2" | head -1; '
         'exit "${PIPESTATUS[0]}"', sys.executable, TOOL, str(db)],
        capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("file ")
    [said] = result.stderr.splitlines()         # nothing of a broken pipe
    assert said.endswith(f"logtail2db: warning: 1 file lags by more than --max-lag 1 bytes: "
                         f"{logdir / 'app-0007.log'} (7 bytes)")
    whole = subprocess.run([sys.executable, TOOL, "--stats", str(db)], capture_output=True,
                           text=True)
    assert "newest: no entry has a time" in whole.stdout
    assert "by level: no level 2,000" in whole.stdout


@pytest.mark.parametrize("args", [["--stats"], ["--max-lag", "5", "logs", "x.db"],
                                  ["--stats", "logs", "x.db"]])
def test_stats_usage_errors(args):
    result = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_once_ends_with_a_summary_line(logdir, db):
    (logdir / "app.log").write_bytes(APP_LOG)
    result = run_once(logdir, db)
    assert result.returncode == 0
    assert re.search(rb"info: done: 1 files, 3 entries, %d B in [0-9.]+ s\n$" % len(APP_LOG),
                     result.stderr)


def test_progress_line_after_a_catch_up_of_two_seconds():
    import io
    out = io.StringIO()
    progress = lt.Progress(out, started=100.0)
    progress.show(100.0 + lt.PROGRESS_AFTER_S - 0.01, 10_000_000, 30_000_000, 50_000)
    assert out.getvalue() == ""     # a short catch-up shows nothing
    progress.show(100.0 + lt.PROGRESS_AFTER_S, 10_000_000, 30_000_000, 50_000)
    assert out.getvalue() == "\rcatching up: 10.0 MB of 40.0 MB, 25,000 entries/s, ETA 0:06\x1b[K"
    progress.show(100.0 + lt.PROGRESS_AFTER_S + 0.01, 10_000_000, 30_000_000, 50_000)
    assert out.getvalue().count("catching up") == 1     # redrawn every PROGRESS_EVERY_S
    progress.show(110.0, 40_000_000, 0, 200_000)
    assert out.getvalue().endswith("\r\x1b[K")      # caught up: the line is wiped


def test_progress_on_a_terminal_only(logdir, db, tmp_path):
    import pty
    (logdir / "big.log").write_bytes(numbered(0, 200000))
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, TOOL, "--once", str(logdir), str(db)],
                            stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:     # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert proc.wait(60) == 0
    # On a terminal, no time in front, and a progress line, if any, wiped before the summary.
    assert re.fullmatch(rb"(\rcatching up: [^\r]*)*(\r\x1b\[K)?logtail2db: info: done: 1 files, "
                        rb"200,000 entries, [^\r]*\r\n", seen), seen
    result = run_once(logdir, tmp_path / "pipe.db")     # stderr is a pipe
    assert result.returncode == 0 and b"catching up" not in result.stderr
    assert re.match(rb"[0-9]{4}-[0-9]{2}-[0-9]{2} ", result.stderr)    # stamped


V1_SCHEMA = r"""-- logtail2db schema, version 1 (kept in PRAGMA user_version).
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
CREATE TABLE entries (
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
    msg      TEXT,                  -- the message when it is not the tail of raw (else NULL)
    msg_at   INTEGER NOT NULL DEFAULT 1,   -- where the message starts in raw (1-based)
    part     INTEGER,               -- 1, 2, ... for pieces of an entry over --max-entry-bytes
    message  TEXT NOT NULL GENERATED ALWAYS AS (coalesce(msg, substr(raw, msg_at))) VIRTUAL
);

-- Who is writing: the pid of the running tailer, for the refusal message.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value
);

PRAGMA user_version = 1;
"""


def test_json_messages_are_read_from_raw_and_not_stored_twice(logdir, db):
    messages = ["GET /index.html 200", "", "tab\there", 'say "hi"', "café", "line\nbreak",
                "back\\slash", "x", "{not json}", "🙂 emoji"]
    lines = [json.dumps({"time": "2026-11-24T13:59:19Z", "level": "info", "msg": message,
                         "other": "x"}, ensure_ascii=n % 2 == 0)
             for n, message in enumerate(messages)]
    lines.append('{"msg": "same", "host": "same"}')         # the value twice in the line
    messages.append("same")
    (logdir / "app.json").write_text("\n".join(lines) + "\n")
    assert run_once(logdir, db).returncode == 0
    assert [row[0] for row in query(db, "SELECT message FROM logs ORDER BY id")] == messages
    stored_twice = query(db, "SELECT count(*) FROM entries WHERE msg IS NOT NULL")[0][0]
    assert stored_twice == 4        # the escaped ones: \t, \u00e9, \n, \\ (not \" alone)


def test_older_schema_is_migrated_in_one_transaction(logdir, db, tmp_path):
    by_hand(db, V1_SCHEMA + "INSERT INTO files (id, path, offset, fingerprint, first_seen, "
            "updated) VALUES (1, '/old/app.log', 4, x'', '2026-01-01', '2026-01-01');"
            "INSERT INTO entries (file_id, offset, raw) VALUES (1, 0, 'old');")
    (logdir / "app.log").write_bytes(b'{"msg": "new"}\n')    # its message is read from raw
    result = run_once(logdir, db)
    assert result.returncode == 0, result.stderr
    assert query(db, "PRAGMA user_version") == [(lt.SCHEMA_VERSION,)]
    assert query(db, "SELECT path, message FROM logs ORDER BY id") == [
        ("/old/app.log", "old"), (str(logdir / "app.log"), "new")]
    fresh = tmp_path / "fresh.db"
    assert run_once(logdir, fresh).returncode == 0
    schema = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
    assert query(db, schema) == query(fresh, schema)
    # A new database has bigger pages; an old one keeps its own (WAL mode cannot change it).
    assert query(fresh, "PRAGMA page_size") == [(lt.PAGE_SIZE,)] != query(db, "PRAGMA page_size")


@pytest.mark.parametrize("version", [3, 4, 5, 6])
def test_schema_is_migrated_in_place_with_every_message_as_it_was(logdir, db, tmp_path,
                                                                   version):
    entries = {3: lt.ENTRIES_V3, 4: lt.ENTRIES_V4, 5: lt.ENTRIES_V5, 6: lt.ENTRIES_V6}[version]
    old = lt.SCHEMA.replace(lt.ENTRIES_V7, entries).replace(
        f"PRAGMA user_version = {lt.SCHEMA_VERSION};", f"PRAGMA user_version = {version};")
    assert old != lt.SCHEMA
    table = "entry_rows" if version >= 6 else "entries"
    by_hand(db, old + "INSERT INTO files (id, path, offset, fingerprint, first_seen, updated) "
            "VALUES (1, '/old/app.log', 4, x'', '2026-01-01', '2026-01-01');"
            f"INSERT INTO {table} (file_id, offset, raw, msg, msg_at) VALUES "
            "(1, 0, 'whole line', NULL, 1), (1, 1, 'Nov 24 h p: tail', NULL, 13),"
            """(1, 2, '{"msg": "quoted"}', NULL, -10), (1, 3, 'raw', 'its own', 1),"""
            "(1, 4, x'ff00fe', NULL, 1), (1, 5, x'41ff42', NULL, 2);")
    messages = "SELECT id, message, typeof(message) FROM entries ORDER BY id"
    before = query(db, messages)
    assert [row[1] for row in before] == ["whole line", "tail", "quoted", "its own", b"\xff\x00\xfe",
                                          b"\xff\x42"]
    (logdir / "app.log").write_bytes(b'{"msg": "say \\"new\\""}\n')  # read by key since 7
    assert run_once(logdir, db).returncode == 0
    assert query(db, "PRAGMA user_version") == [(lt.SCHEMA_VERSION,)]
    assert query(db, messages) == before + [(7, 'say "new"', "text")]
    assert query(db, "SELECT msg, msg_at, msg_len FROM entries WHERE id = 7") == [(None, 0, None)]
    fresh = tmp_path / "fresh.db"
    assert run_once(logdir, fresh).returncode == 0
    schema = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
    assert query(db, schema) == query(fresh, schema)


def test_full_text_index_of_version_5_is_kept_in_step_after_migrating(logdir, db):
    v5 = lt.SCHEMA.replace(lt.ENTRIES_V7, lt.ENTRIES_V5).replace(
        f"PRAGMA user_version = {lt.SCHEMA_VERSION};", "PRAGMA user_version = 5;")
    by_hand(db, v5 + """
CREATE VIRTUAL TABLE entries_fts USING fts5 (message, content = 'entries', content_rowid = 'id');
CREATE TRIGGER entries_fts_insert AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts (rowid, message) VALUES (new.id, new.message);
END;
CREATE TRIGGER entries_fts_delete AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, message) VALUES ('delete', old.id, old.message);
END;
INSERT INTO files (id, path, offset, fingerprint, first_seen, updated)
VALUES (1, '/old/app.log', 4, x'', '2026-01-01', '2026-01-01');
INSERT INTO entries (file_id, offset, raw, msg_at) VALUES (1, 0, 'Nov 24 h p: old timeout', 13);
CREATE VIEW mine AS SELECT message FROM entries;
""")
    (logdir / "app.log").write_bytes(b'{"msg": "new timeout"}\n')
    assert run_once(logdir, db).returncode == 0     # no --fts: the triggers keep it in step
    assert query(db, "PRAGMA user_version") == [(lt.SCHEMA_VERSION,)]
    match = "SELECT message FROM entries WHERE id IN (SELECT rowid FROM entries_fts(?)) ORDER BY id"
    assert query(db, match, ("timeout",)) == [("old timeout",), ("new timeout",)]
    assert query(db, "SELECT * FROM mine") == [("old timeout",), ("new timeout",)]  # the user's
    delete_in_step(db, "message = 'old timeout'")
    assert query(db, match, ("timeout",)) == [("new timeout",)]


def test_full_text_index_of_version_6_indexes_messages_read_by_key(logdir, db, tmp_path):
    v6 = lt.SCHEMA.replace(lt.ENTRIES_V7, lt.ENTRIES_V6).replace(
        f"PRAGMA user_version = {lt.SCHEMA_VERSION};", "PRAGMA user_version = 6;")
    fts_v6 = lt.FTS_SCHEMA
    for prefix in ("new.", "old."):
        fts_v6 = fts_v6.replace(lt.MESSAGE_SQL.format(prefix), lt.MESSAGE_SQL_V6.format(prefix))
    assert fts_v6 != lt.FTS_SCHEMA
    by_hand(db, v6 + fts_v6 + """
INSERT INTO files (id, path, offset, fingerprint, first_seen, updated)
VALUES (1, '/old/app.log', 4, x'', '2026-01-01', '2026-01-01');
INSERT INTO entry_rows (file_id, offset, raw, msg_at, msg_len)
VALUES (1, 0, '{"msg": "old timeout"}', 10, 11);
CREATE VIEW mine AS SELECT message FROM entries;
""")
    (logdir / "app.log").write_bytes(b'{"msg": "new timeout"}\n')
    assert run_once(logdir, db).returncode == 0     # no --fts: the triggers keep it in step
    assert query(db, "PRAGMA user_version") == [(lt.SCHEMA_VERSION,)]
    assert query(db, "SELECT msg_at FROM entries ORDER BY id") == [(10,), (0,)]
    match = "SELECT message FROM entries WHERE id IN (SELECT rowid FROM entries_fts(?)) ORDER BY id"
    assert query(db, match, ("timeout",)) == [("old timeout",), ("new timeout",)]
    assert query(db, "SELECT * FROM mine") == [("old timeout",), ("new timeout",)]  # the user's
    fresh = tmp_path / "fresh.db"
    assert run_once("--fts", logdir, fresh).returncode == 0
    schema = ("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name != 'mine'"
              " ORDER BY name")
    assert query(db, schema) == query(fresh, schema)
    delete_in_step(db, "message = 'new timeout'")
    assert query(db, match, ("timeout",)) == [("old timeout",)]


def test_failed_migration_leaves_the_database_as_it_was(logdir, db):
    by_hand(db, V1_SCHEMA + "CREATE TABLE logs (x);")  # in the way of version 2's view
    before = query(db, "SELECT name FROM sqlite_master ORDER BY name")
    result = run_once(logdir, db)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1] == (
        f"logtail2db: error: {str(db)!r}: migrating schema 1 -> {lt.SCHEMA_VERSION} failed, "
        "the database is left "
        f"as it was: table logs already exists")
    assert query(db, "PRAGMA user_version") == [(1,)]
    assert query(db, "SELECT name FROM sqlite_master ORDER BY name") == before


# Entry parsing: pure functions ###############################################

# normalize_level ################################################################

@pytest.mark.parametrize("word,expected", [
    ("WARN", "warning"), ("warning", "warning"), ("Err", "error"), ("ERROR", "error"),
    ("FATAL", "critical"), ("crit", "critical"), ("CRITICAL", "critical"),
    ("EMERG", "emergency"), ("emergency", "emergency"), ("PANIC", "emergency"),
    ("info", "info"), ("INFORMATION", "info"), ("DEBUG", "debug"), ("dbg", "debug"),
    ("TRACE", "trace"), ("Notice", "notice"), ("ALERT", "alert"),
    ("0", "emergency"), ("1", "alert"), ("2", "critical"), ("3", "error"), ("4", "warning"),
    ("5", "notice"), ("6", "info"), ("7", "debug"),
    ("8", None), ("verbose", None), ("", None), ("INFO:", None), (" INFO", None),
])
def test_normalize_level(word, expected):
    assert normalize_level(word) == expected


# Stamps ##########################################################################

@pytest.mark.parametrize("zone,text,expected", [
    ("UTC", "Nov 24 13:59:19", "2026-11-24 13:59:19"),
    ("UTC", "Nov  4 03:05:09", "2026-11-04 03:05:09"),
    ("UTC", "Nov 04 03:05:09", "2026-11-04 03:05:09"),
    ("UTC", "Jan  1 00:00:00", "2026-01-01 00:00:00"),
    ("Europe/Berlin", "Nov 24 13:59:19", "2026-11-24 12:59:19"),  # winter, +01:00
    ("Europe/Berlin", "Jul 14 13:59:19", "2026-07-14 11:59:19"),  # summer, +02:00
    ("Europe/Berlin", "Oct 25 02:30:00", "2026-10-25 00:30:00"),  # twice: the summer one
    ("Europe/Berlin", "Oct 25 03:00:00", "2026-10-25 02:00:00"),  # after the fall-back
    ("Europe/Berlin", "Mar 29 02:30:00", "2026-03-29 00:30:00"),  # skipped: summer offset
    ("America/New_York", "Nov 24 13:59:19", "2026-11-24 18:59:19"),  # EST, -05:00
    ("America/New_York", "Jun  1 00:00:00", "2026-06-01 04:00:00"),  # EDT, -04:00
    ("America/New_York", "Nov  1 01:30:00", "2026-11-01 05:30:00"),  # twice: the EDT one
])
def test_bsd_is_local_time(set_zone, zone, text, expected):
    set_zone(zone)
    assert stamps_for(NOV_2026).bsd(text) == expected


@pytest.mark.parametrize("text", [
    "", "Nov 24 13:59", "Nov 24 13:59:1", "Nov 24 13:59:19 ", "Nov 24 13:59:19.123",
    "Nov 24 13:59:60", "Nov 24 13:59:1x", "Nov 24 13:5x:19", "nov 24 13:59:19",
    "Foo 24 13:59:19", "Nov 31 13:59:19", "Feb 29 10:00:00", "Nov 24 24:00:00",
    "Nov 2413:59:19 ", "Nov 24 13:59:1\u00b2",
])
def test_bsd_rejects(stamps, text):
    assert stamps.bsd(text) is None


@pytest.mark.parametrize("zone,mtime_s,text,expected", [
    ("UTC", JAN_2027, "Dec 31 23:59:59", "2026-12-31 23:59:59"),  # month after January: last year
    ("UTC", JAN_2027, "Jan  1 00:00:01", "2027-01-01 00:00:01"),
    ("UTC", NOV_2026, "Nov 30 10:00:00", "2026-11-30 10:00:00"),  # later day, same month
    ("UTC", NOV_2026, "Dec  1 10:00:00", "2025-12-01 10:00:00"),
    # 23:30 UTC on 31 Dec is already January in Berlin: the reference is local time.
    ("Europe/Berlin", calendar.timegm((2026, 12, 31, 23, 30, 0)), "Jan  1 00:10:00",
     "2026-12-31 23:10:00"),
    ("UTC", calendar.timegm((2026, 12, 31, 23, 30, 0)), "Jan  1 00:10:00", "2026-01-01 00:10:00"),
])
def test_bsd_year_from_reference(set_zone, zone, mtime_s, text, expected):
    set_zone(zone)
    assert stamps_for(mtime_s).bsd(text) == expected


def test_set_reference_redates_cached_minutes(stamps):
    assert stamps.bsd("Dec 31 23:59:59") == "2025-12-31 23:59:59"
    stamps.set_reference(JAN_2027)
    assert stamps.bsd("Dec 31 23:59:59") == "2026-12-31 23:59:59"


@pytest.mark.parametrize("zone,text,expected", [
    ("UTC", "2026-11-24T13:59:19Z", "2026-11-24 13:59:19"),
    ("UTC", "2026-11-24T13:59:19.123Z", "2026-11-24 13:59:19.123000"),
    ("UTC", "2026-11-24T13:59:19.1Z", "2026-11-24 13:59:19.100000"),
    ("UTC", "2026-11-24T13:59:19.123456789-07:00", "2026-11-24 20:59:19.123456"),  # cut to µs
    ("UTC", "2026-11-24T13:59:19,5+01:00", "2026-11-24 12:59:19.500000"),
    ("UTC", "2026-11-24 13:59:19+0100", "2026-11-24 12:59:19"),
    ("UTC", "2026-11-24T13:59:19+01", "2026-11-24 12:59:19"),
    ("UTC", "2026-11-24T13:59:19+05:30", "2026-11-24 08:29:19"),
    ("UTC", "2026-11-24t13:59:19z", "2026-11-24 13:59:19"),
    ("UTC", "2026-11-24 13:59:19 UTC", "2026-11-24 13:59:19"),
    ("UTC", "2026/11/24 13:59:19", "2026-11-24 13:59:19"),  # Go's log package
    ("UTC", "2026-11-24T23:30:00-05:00", "2026-11-25 04:30:00"),
    ("UTC", "2026-12-31T23:59:59.999999-01:00", "2027-01-01 00:59:59.999999"),
    ("Europe/Berlin", "2026-11-24 13:59:19,123", "2026-11-24 12:59:19.123000"),
    ("Europe/Berlin", "2026-07-14T13:59:19", "2026-07-14 11:59:19"),
    ("Europe/Berlin", "2026-07-14T13:59:19Z", "2026-07-14 13:59:19"),
    ("Europe/Berlin", "2026-10-25T02:30:00", "2026-10-25 00:30:00"),
    ("America/New_York", "2026-11-24 13:59:19", "2026-11-24 18:59:19"),
    ("America/New_York", "2026-07-14 13:59:19.000001", "2026-07-14 17:59:19.000001"),
])
def test_iso(set_zone, zone, text, expected):
    set_zone(zone)
    assert stamps_for(NOV_2026).iso(text) == expected


@pytest.mark.parametrize("text", [
    "", "2026-11-24", "2026-11-24T13:59", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z",
    "2026-11-24T24:00:00Z", "2026-11-24T13:59:60Z", "2026-11-24T13:59:19.Z",
    "2026-11-24T13:59:19.1234567890Z", "2026-11-24T13:59:19+1", "2026-11-24T13:59:19 garbage",
    "24-11-2026 13:59:19", "\uff12\uff10\uff12\uff16-11-24T13:59:19Z", "0000-01-01T00:00:00Z",
    "9999-12-31T23:59:59-01:00",
])
def test_iso_rejects(stamps, text):
    assert stamps.iso(text) is None


@pytest.mark.parametrize("text", [
    "2026-11-24T13:59", "2026-11-24T13:59:", "2026-11-24T13:59:1", "2026-11-24T13:59:1Z",
    "2026-11-24T13:59:60Z", "2026-11-24T13:59:1xZ", "2026-11-24T13:59x19Z",
    "2026-11-24T13:59:19.Z", "2026-11-24T13:59:19,Z", "2026-11-24T13:59:19.1234567890Z",
    "2026-11-24T13:59:19.12a", "2026-11-24T13:59:19+01:00x", "2026-11-24T13:59:19 UTC ",
])
def test_iso_rejects_once_its_minute_is_cached(stamps, text):
    for seen in ("2026-11-24T13:59:00Z", "2026-11-24T13:59:00", "2026-11-24T13:59:00+01:00",
                 "2026-11-24T13:59:00.5Z", "2026-11-24T13:59:00 UTC"):
        assert stamps.iso(seen) is not None
    assert stamps.iso(text) is None


@pytest.mark.parametrize("number,expected", [
    (EPOCH_S, TS),
    (EPOCH_S + 0.123, TS + ".123000"),
    (EPOCH_S * 1000 + 123, TS + ".123000"),  # milliseconds
    (EPOCH_S * 1000 + 123.5, TS + ".123500"),
    (EPOCH_S * 1_000_000 + 123456, TS + ".123456"),  # microseconds
    (EPOCH_S * 1_000_000_000 + 123456789, TS + ".123456"),  # nanoseconds
    (0, "1970-01-01 00:00:00"),
    (-1, "1969-12-31 23:59:59"),
    (True, None), ("1795528759", None), (None, None), (float("nan"), None),
    (float("inf"), None), (10**30, None), (-10**16, None),
])
def test_epoch(stamps, number, expected):
    assert stamps.epoch(number) == expected


@pytest.mark.parametrize("text,expected", [
    ("10/Oct/2000:13:55:36 -0700", "2000-10-10 20:55:36"),
    ("24/Nov/2026:13:59:19 +0100", "2026-11-24 12:59:19"),
    ("24/Nov/2026:13:59:19 +0530", "2026-11-24 08:29:19"),
    ("01/Jan/2027:00:30:00 +0100", "2026-12-31 23:30:00"),
    ("10/Foo/2000:13:55:36 -0700", None), ("10/Oct/2000:13:55:36", None),
    ("31/Nov/2026:13:59:19 +0100", None), ("10/Oct/2000:13:55:66 -0700", None),
    ("10/Oct/2000 13:55:36 -0700", None), ("", None),
])
def test_clf_time(stamps, text, expected):
    assert stamps.clf(text) == expected


def test_new_stamps_follow_tzset(set_zone):
    set_zone("UTC")
    assert Stamps().iso("2026-11-24 13:59:19") == TS
    set_zone("Europe/Berlin")
    assert Stamps().iso("2026-11-24 13:59:19") == "2026-11-24 12:59:19"
    set_zone("America/New_York")
    assert Stamps().iso("2026-11-24 13:59:19") == "2026-11-24 18:59:19"


def test_minute_caches_stay_bounded(stamps):
    for minute in range(CACHE_MINUTES + 10):
        stamps.epoch(EPOCH_S + 60 * minute)
        stamps.iso(time.strftime("%Y-%m-%dT%H:%M:19Z", time.gmtime(EPOCH_S + 60 * minute)))
    assert 0 < len(stamps.epoch_minutes) <= CACHE_MINUTES
    assert 0 < len(stamps.iso_minutes) <= CACHE_MINUTES
    assert stamps.epoch(EPOCH_S) == TS


DEC_2_2026 = calendar.timegm((2026, 12, 2, 11, 40, 0))  # a logback file last written then


@pytest.mark.parametrize("zone,mtime_s,text,expected", [
    ("UTC", DEC_2_2026, "11:32:56.655", "2026-12-02 11:32:56.655000"),
    ("UTC", DEC_2_2026, "11:32:56,655", "2026-12-02 11:32:56.655000"),
    ("UTC", DEC_2_2026, "11:32:56", "2026-12-02 11:32:56"),
    ("UTC", DEC_2_2026, "11:32:56.655353123", "2026-12-02 11:32:56.655353"),
    ("UTC", DEC_2_2026, "11:40:00.999", "2026-12-02 11:40:00.999000"),  # the mtime's second
    ("UTC", DEC_2_2026, "11:40:01.000", "2026-12-01 11:40:01.000000"),  # later: the day before
    ("UTC", DEC_2_2026, "23:59:59.999", "2026-12-01 23:59:59.999000"),
    ("UTC", DEC_2_2026, "00:00:00.000", "2026-12-02 00:00:00.000000"),
    ("UTC", calendar.timegm((2027, 1, 1, 0, 5, 0)), "23:59:00", "2026-12-31 23:59:00"),
    ("UTC", calendar.timegm((2026, 3, 1, 0, 5, 0)), "23:59:00", "2026-02-28 23:59:00"),
    # 00:30 in Berlin is 23:30 UTC the day before: the reference is local time.
    ("Europe/Berlin", calendar.timegm((2026, 12, 1, 23, 30, 0)), "00:10:00.000",
     "2026-12-01 23:10:00.000000"),
    ("Europe/Berlin", calendar.timegm((2026, 12, 1, 23, 30, 0)), "23:50:00.000",
     "2026-12-01 22:50:00.000000"),
    ("Europe/Berlin", calendar.timegm((2026, 7, 14, 12, 0, 0)), "13:59:19", "2026-07-14 11:59:19"),
])
def test_clock_is_local_time_on_the_reference_day(set_zone, zone, mtime_s, text, expected):
    set_zone(zone)
    assert stamps_for(mtime_s).clock(text) == expected


@pytest.mark.parametrize("text", [
    "", "11:32", "11:32:5", "11:32:56.", "11:32:56,", "11:32:56.1234567890", "11:32:56x",
    "11:32:56 ", "24:00:00", "11:60:00", "11:32:60", "1:32:56.1", "11-32-56", "11:3x:56",
    "\u0661\u0661:32:56", "11:32:5\u00b2",
])
def test_clock_rejects(stamps, text):
    stamps.clock("11:32:00")     # a cached minute checks the rest just as well
    assert stamps.clock(text) is None


def test_clock_follows_the_reference_day(set_zone):
    set_zone("UTC")
    stamps = stamps_for(DEC_2_2026)
    assert stamps.clock("11:32:56") == "2026-12-02 11:32:56"
    stamps.set_reference(DEC_2_2026 + 86400)
    assert stamps.clock("11:32:56") == "2026-12-03 11:32:56"
    stamps.set_reference(DEC_2_2026 - 3600)     # 10:40: 11:32 was the day before
    assert stamps.clock("11:32:56") == "2026-12-01 11:32:56"


@pytest.mark.parametrize("micros,expected", [
    (EPOCH_S * 1_000_000 + 123456, TS + ".123456"),
    (EPOCH_S * 1_000_000, TS + ".000000"),
    (0, "1970-01-01 00:00:00.000000"),
    (123, "1970-01-01 00:00:00.000123"),      # epoch() would read this small number as seconds
    (10**20, None),
])
def test_micros(stamps, micros, expected):
    assert stamps.micros(micros) == expected


# stated_level ####################################################################

@pytest.mark.parametrize("message,expected", [
    ("error: disk full", "error"), ("Error: disk full", "error"), ("ERROR: disk full", "error"),
    ("warning: hostname x does not resolve", "warning"), ("warn: x", "warning"),
    ("fatal: no such table", "critical"), ("panic: x", "emergency"), ("info: x", "info"),
    ("Notice: x", "notice"), ("debug: x", "debug"), ("error: ", "error"),
    ("logtail2db: warning: skipping x: Permission denied", "warning"),
    ("rsync: error: some files could not be transferred", "error"),
    ("postfix/smtpd: fatal: x", "critical"),
    ("disk: 91% full", None), ("errors: 3", None), ("eRRor: x", None), ("error:x", None),
    ("error", None), ("error opening config", None), ("3: x", None), (": error: x", None),
    ("a b: error: x", None), ("prog: errors: x", None), ("prog: x: error: y", None),
    ("pam_unix(sshd:session): session opened for user alice", None),
    ("x" * 63 + ": error: y", None), ("/usr/sbin/cron: error: x", None), ("", None),
])
def test_stated_level(message, expected):
    assert stated_level(message) == expected


# parse_syslog ####################################################################

@pytest.mark.parametrize("line,expected", [
    ("Nov 24 13:59:19 web-01 nginx[1234]: msg",
     entry(host="web-01", program="nginx", pid=1234, message="msg")),
    ("Nov  4 03:05:09 web-01 nginx[1234]: padded day",
     entry(ts="2026-11-04 03:05:09", host="web-01", program="nginx", pid=1234,
           message="padded day")),
    ("Nov 24 13:59:19 web-01 kernel: [12345.678] usb 1-1: new high-speed USB device",
     entry(host="web-01", program="kernel",
           message="[12345.678] usb 1-1: new high-speed USB device")),
    ("Nov 24 13:59:19 web-01 systemd-logind[77]: New session 3 of user alice.",
     entry(host="web-01", program="systemd-logind", pid=77,
           message="New session 3 of user alice.")),
    ("Nov 24 13:59:19 mx postfix/smtpd[99]: connect from unknown[192.0.2.1]",
     entry(host="mx", program="postfix/smtpd", pid=99, message="connect from unknown[192.0.2.1]")),
    ("Nov 24 13:59:19 web-01 CRON[12]: (root) CMD (run-parts /etc/cron.hourly)",
     entry(host="web-01", program="CRON", pid=12,
           message="(root) CMD (run-parts /etc/cron.hourly)")),
    ("Nov 24 13:59:19 web-01 (sd-pam)[1234]: pam_unix(systemd-user:session): session closed",
     entry(host="web-01", program="(sd-pam)", pid=1234,
           message="pam_unix(systemd-user:session): session closed")),
    ("Nov 24 13:59:19 web-01 sudo:    alice : TTY=pts/0 ; COMMAND=/bin/ls",
     entry(host="web-01", program="sudo", message="   alice : TTY=pts/0 ; COMMAND=/bin/ls")),
    ("Nov 24 13:59:19 web-01 app[5]: error: disk full",  # the level the message states
     entry(host="web-01", program="app", pid=5, level="error", message="error: disk full")),
    ("Nov 24 13:59:19 mx postfix/smtpd[99]: warning: hostname x does not resolve",
     entry(host="mx", program="postfix/smtpd", pid=99, level="warning",
           message="warning: hostname x does not resolve")),
    ("Nov 24 13:59:19 web-01 python3[7]: logtail2db: warning: skipping x",  # ours, via journald
     entry(host="web-01", program="python3", pid=7, level="warning",
           message="logtail2db: warning: skipping x")),
    ("Nov 24 13:59:19 web-01 app: errors: 3", entry(host="web-01", program="app",
                                                    message="errors: 3")),
    ("<14>Nov 24 13:59:19 web-01 app: error: x",  # the PRI's level comes first
     entry(host="web-01", program="app", level="info", fields={"facility": "user"},
           message="error: x")),
    # journalctl -o short-precise, -o short-iso, -o short-iso-precise
    ("Nov 24 13:59:19.655353 web-01 sshd[123]: msg",
     entry(ts=TS + ".655353", host="web-01", program="sshd", pid=123, message="msg")),
    ("Nov 24 13:59:19.5 web-01 sshd[123]: fatal: x",
     entry(ts=TS + ".500000", host="web-01", program="sshd", pid=123, level="critical",
           message="fatal: x")),
    ("Nov 24 13:59:19.123456789 web-01 sshd[123]: msg",
     entry(ts=TS + ".123456", host="web-01", program="sshd", pid=123, message="msg")),
    ("2026-11-24T14:59:19+0100 web-01 sshd[123]: msg",
     entry(host="web-01", program="sshd", pid=123, message="msg")),
    ("2026-11-24T14:59:19.655353+01:00 web-01 sshd[123]: msg",
     entry(ts=TS + ".655353", host="web-01", program="sshd", pid=123, message="msg")),
    ("Nov 24 13:59:19 web-01 foo[abc]: odd pid",
     entry(host="web-01", program="foo[abc]", message="odd pid")),
    ("Nov 24 13:59:19 web-01 prog:", entry(host="web-01", program="prog")),
    ("Nov 24 13:59:19 web-01 prog[3]:", entry(host="web-01", program="prog", pid=3)),
    ("Nov 24 13:59:19 web-01 last message repeated 3 times",
     entry(host="web-01", message="last message repeated 3 times")),
    ("Nov 24 13:59:19 web-01", entry(host="web-01")),
    ("Nov 24 13:59:19 web-01 app: caf\ufffd \ufffd", entry(host="web-01", program="app",
                                                       message="caf\ufffd \ufffd")),
    ("2026-11-24T13:59:19.123456+01:00 web-01 sshd[2]: msg",  # RSYSLOG_FileFormat
     entry(ts="2026-11-24 12:59:19.123456", host="web-01", program="sshd", pid=2, message="msg")),
    ("2026-11-24T13:59:19Z web-01 sshd[2]: msg",
     entry(host="web-01", program="sshd", pid=2, message="msg")),
    ("<34>Nov 24 13:59:19 web-01 su: 'su root' failed",
     entry(host="web-01", program="su", level="critical", fields={"facility": "auth"},
           message="'su root' failed")),
    ("<0>Nov 24 13:59:19 web-01 kernel: panic",
     entry(host="web-01", program="kernel", level="emergency", fields={"facility": "kern"},
           message="panic")),
    ("<191>Nov 24 13:59:19 web-01 app[1]: x",
     entry(host="web-01", program="app", pid=1, level="debug", fields={"facility": "local7"},
           message="x")),
    ("<13>2026-11-24T13:59:19Z web-01 app: x",
     entry(host="web-01", program="app", level="notice", fields={"facility": "user"}, message="x")),
    ("<78>Nov 24 13:59:19 web-01 CRON[12]: x",
     entry(host="web-01", program="CRON", pid=12, level="info", fields={"facility": "cron"},
           message="x")),
    ("<165>1 2026-11-24T13:59:19.123Z web-01 app 77 ID47 - hi",  # RFC 5424 goes through too
     entry(ts=TS + ".123000", host="web-01", program="app", pid=77, level="notice",
           fields={"facility": "local4", "msgid": "ID47"}, message="hi")),
])
def test_parse_syslog(stamps, line, expected):
    assert parse_syslog(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "   ", "\tat com.foo.Bar(Bar.java:10)", "Traceback (most recent call last):",
    "Caused by: java.io.IOException: broken pipe", "  File \"app.py\", line 3, in <module>",
    "Nov 24 13:5", "Nov 24 13:59:19", "Nov 24 13:59:19 ", "Nov 24 13:59:19  web-01 x: y",
    "Nov 32 13:59:19 web-01 x: y", "Nov 24 13:59:19web-01 x: y", "<34>", "<34",
    "<192>Nov 24 13:59:19 web-01 p: m", "<x>Nov 24 13:59:19 web-01 p: m",
    "<034>Nov 24 13:59:19 web-01 p: m", "<34>garbage", "<165>1 garbage",
    "2026-11-24 13:59:19 web-01 p: m", "12345 something", "Mon Nov 24 13:59:19 2026 foo",
    "2026-11-24T13:59:19Z", "\ufffd\ufffd\ufffd",
    "Nov 24 13:59:19. web-01 p: m", "Nov 24 13:59:19.1234567890 web-01 p: m",
    "Nov 24 13:59:19.12a web-01 p: m", "Nov 24 13:59:19.5", "Nov 24 13:59:19.5 ",
    "Nov 24 13:59:19,5 web-01 p: m", "Nov 24 13:59:60.5 web-01 p: m",
])
def test_parse_syslog_rejects(stamps, line):
    assert parse_syslog(line, stamps) is None


# parse_rfc5424 ###################################################################

@pytest.mark.parametrize("line,expected", [
    ('<165>1 2026-11-24T13:59:19.123Z web-01 app 77 ID47 [sd@1 a="b" c="d\\"q"][other@2 x="y"] hi',
     entry(ts=TS + ".123000", host="web-01", program="app", pid=77, level="notice",
           fields={"facility": "local4", "msgid": "ID47",
                   "sd": {"sd@1": {"a": "b", "c": 'd"q'}, "other@2": {"x": "y"}}},
           message="hi")),
    ("<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \ufeff'su root' failed",
     entry(ts="2003-10-11 22:14:15.003000", host="mymachine.example.com", program="su",
           level="critical", fields={"facility": "auth", "msgid": "ID47"},
           message="'su root' failed")),
    ("<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time",
     entry(ts="2003-08-24 12:14:15.000003", host="192.0.2.1", program="myproc", pid=8710,
           level="notice", fields={"facility": "local4"}, message="%% It's time")),
    ('<165>1 2003-10-11T22:14:15.003Z mymachine evntslog - ID47 [exampleSDID@32473 iut="3" '
     'eventSource="Application"][examplePriority@32473 class="high"]',
     entry(ts="2003-10-11 22:14:15.003000", host="mymachine", program="evntslog",
           level="notice", fields={"facility": "local4", "msgid": "ID47", "sd": {
               "exampleSDID@32473": {"iut": "3", "eventSource": "Application"},
               "examplePriority@32473": {"class": "high"}}})),
    ("<14>1 - - - - - -", entry(ts=None, level="info", fields={"facility": "user"})),
    ("<14>1 - - - - - - ", entry(ts=None, level="info", fields={"facility": "user"})),
    ("<14>1 2026-11-24T13:59:19Z web-01 app worker-3 - - hi",
     entry(host="web-01", program="app", level="info",
           fields={"facility": "user", "procid": "worker-3"}, message="hi")),
    ('<14>1 2026-11-24T13:59:19Z h a 1 - [x@1 p="a\\\\b\\]c\\n"] m',
     entry(host="h", program="a", pid=1, level="info",
           fields={"facility": "user", "sd": {"x@1": {"p": "a\\b]c\\n"}}}, message="m")),
    ("<14>1 2026-11-24T13:59:19Z h a 1 - [x@1] m  two  spaces ",
     entry(host="h", program="a", pid=1, level="info",
           fields={"facility": "user", "sd": {"x@1": {}}}, message="m  two  spaces ")),
])
def test_parse_rfc5424(stamps, line, expected):
    assert parse_rfc5424(line, stamps) == expected
    assert parse_syslog(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "<165>", "<165>1", "<165>1 ", "<165>2 2026-11-24T13:59:19Z h a - - - m",
    "<165>1 2026-11-24T13:59:19Z h a", "<165>1 2026-11-24T13:59:19Z h a - -",
    "<165>1 yesterday h a - - - m", "<165>1 2026-11-24T13:59:19Z  a - - - m",
    '<165>1 2026-11-24T13:59:19Z h a - - [x@1 p="v" m',
    '<165>1 2026-11-24T13:59:19Z h a - - [x@1 p=v] m',
    '<165>1 2026-11-24T13:59:19Z h a - - [x@1 p="v"]m', "<165>1 2026-11-24T13:59:19Z h a - - -m",
    "<165>1 2026-11-24T13:59:19Z h a - - m", "Nov 24 13:59:19 web-01 nginx[1234]: msg",
    "<999>1 2026-11-24T13:59:19Z h a - - - m",
])
def test_parse_rfc5424_rejects(stamps, line):
    assert parse_rfc5424(line, stamps) is None


# parse_journald ##################################################################

MICROS = str(EPOCH_S * 1_000_000 + 123456)


def journal(**keys):
    """A line of journalctl -o json: its usual keys, then these."""
    obj = {"__CURSOR": "s=0c3e;i=1f2", "__REALTIME_TIMESTAMP": MICROS,
           "__MONOTONIC_TIMESTAMP": "8123456", "_BOOT_ID": "9a8b", "PRIORITY": "6",
           "_TRANSPORT": "syslog", "_HOSTNAME": "web-01", **keys}
    return json.dumps({key: value for key, value in obj.items() if value is not None},
                      separators=(",", ":"))


JOURNAL_FIELDS = {"__CURSOR": "s=0c3e;i=1f2", "__MONOTONIC_TIMESTAMP": "8123456",
                  "_BOOT_ID": "9a8b", "_TRANSPORT": "syslog"}


@pytest.mark.parametrize("line,expected", [
    (journal(SYSLOG_IDENTIFIER="sshd", _PID="4242", _COMM="sshd", MESSAGE="Accepted publickey"),
     entry(ts=TS + ".123456", host="web-01", program="sshd", pid=4242, level="info",
           fields={**JOURNAL_FIELDS, "_COMM": "sshd"}, message="Accepted publickey")),
    (journal(_COMM="cron", _PID="7", PRIORITY="3", MESSAGE="x"),  # no SYSLOG_IDENTIFIER
     entry(ts=TS + ".123456", host="web-01", program="cron", pid=7, level="error",
           fields=JOURNAL_FIELDS, message="x")),
    (journal(SYSLOG_IDENTIFIER="kernel", _TRANSPORT="kernel", PRIORITY="4", _HOSTNAME=None,
             MESSAGE="usb 1-1: new high-speed USB device"),
     entry(ts=TS + ".123456", program="kernel", level="warning",
           fields={**JOURNAL_FIELDS, "_TRANSPORT": "kernel"},
           message="usb 1-1: new high-speed USB device")),
    (journal(PRIORITY="0", MESSAGE=[99, 97, 102, 233, 0, 10]),   # not UTF-8: its bytes
     entry(ts=TS + ".123456", host="web-01", level="emergency", fields=JOURNAL_FIELDS,
           message="caf\ufffd\x00\n")),
    (journal(PRIORITY="7", MESSAGE=["first", "second"]),     # a field given twice
     entry(ts=TS + ".123456", host="web-01", level="debug", fields=JOURNAL_FIELDS,
           message="first")),
    # A service's stdout says its own level; the priority is the unit's for every line.
    (journal(_TRANSPORT="stdout", SYSLOG_IDENTIFIER="logtail2db",
             MESSAGE="logtail2db: warning: skipping x"),
     entry(ts=TS + ".123456", host="web-01", program="logtail2db", level="warning",
           fields={**JOURNAL_FIELDS, "_TRANSPORT": "stdout"},
           message="logtail2db: warning: skipping x")),
    (journal(_TRANSPORT="stdout", PRIORITY="6", MESSAGE="all fine: 3 files"),
     entry(ts=TS + ".123456", host="web-01", level="info",
           fields={**JOURNAL_FIELDS, "_TRANSPORT": "stdout"}, message="all fine: 3 files")),
    (journal(SYSLOG_IDENTIFIER="app", MESSAGE="error: x"),   # syslog() gave its priority
     entry(ts=TS + ".123456", host="web-01", program="app", level="info",
           fields=JOURNAL_FIELDS, message="error: x")),
    (journal(_PID="x", SYSLOG_PID="12", MESSAGE="m"),
     entry(ts=TS + ".123456", host="web-01", pid=12, level="info",
           fields={**JOURNAL_FIELDS, "_PID": "x"}, message="m")),
    (journal(__REALTIME_TIMESTAMP="soon", PRIORITY="9"),    # unusable values stay in fields
     entry(ts=None, host="web-01", fields={**JOURNAL_FIELDS, "__REALTIME_TIMESTAMP": "soon",
                                           "PRIORITY": "9"},
           message=journal(__REALTIME_TIMESTAMP="soon", PRIORITY="9"))),
    ('{"__REALTIME_TIMESTAMP":"0","MESSAGE":null}',  # journalctl's null: a value too big
     entry(ts="1970-01-01 00:00:00.000000", fields={"MESSAGE": None},
           message='{"__REALTIME_TIMESTAMP":"0","MESSAGE":null}')),
])
def test_parse_journald(stamps, line, expected):
    assert parse_journald(line, stamps) == expected
    assert parse_json(line, stamps) == expected     # a journal file taken for JSON reads the same


@pytest.mark.parametrize("line", [
    "", "not json", "{}", '{"MESSAGE":"x"}', '{"__REALTIME_TIMESTAMP":',
    '["__REALTIME_TIMESTAMP":1]',
    '[{"__REALTIME_TIMESTAMP":"1"}]', ' {"__REALTIME_TIMESTAMP":"1"}',
    '{"x":"\\"__REALTIME_TIMESTAMP\\":"}', '{"a": {"__REALTIME_TIMESTAMP":"1"}}',
    "Nov 24 13:59:19 web-01 nginx[1234]: msg",
])
def test_parse_journald_rejects(stamps, line):
    assert parse_journald(line, stamps) is None


# parse_json ######################################################################

@pytest.mark.parametrize("line,expected", [
    ('{"name":"myapp","hostname":"banana.local","pid":40161,"level":30,"msg":"hi",'  # bunyan
     '"time":"2026-11-24T13:59:19.851Z","v":0}',
     entry(ts=TS + ".851000", host="banana.local", pid=40161, level="info",
           fields={"name": "myapp", "v": 0}, message="hi")),
    ('{"level":50,"time":1795528759123,"pid":7,"hostname":"h","msg":"boom"}',  # pino
     entry(ts=TS + ".123000", host="h", pid=7, level="error", message="boom")),
    ('{"@timestamp":"2026-11-24T13:59:19.000Z","message":"x","host":"h","severity":"WARN"}',
     entry(ts=TS + ".000000", host="h", level="warning", message="x")),
    ('{"event":"user logged in","level":"info","timestamp":"2026-11-24T13:59:19.123456Z",'
     '"user":42}',  # structlog
     entry(ts=TS + ".123456", level="info", fields={"user": 42}, message="user logged in")),
    ('{"asctime":"2026-11-24 13:59:19,123","levelname":"ERROR","name":"app","message":"x"}',
     entry(ts=None, level="error", fields={"asctime": "2026-11-24 13:59:19,123", "name": "app"},
           message="x")),
    ('{"ts":1795528759.5,"lvl":"dbg","msg":"x"}',
     entry(ts=TS + ".500000", level="debug", message="x")),
    ('{"ts":1795528759,"severity":3,"msg":"x"}', entry(level="error", message="x")),
    ('{"ts":1795528759,"level":60,"msg":"x"}', entry(level="critical", message="x")),
    ('{"ts":1795528759,"level":"fatal","msg":"x"}', entry(level="critical", message="x")),
    ('{"time":"yesterday","msg":"x"}', entry(ts=None, fields={"time": "yesterday"}, message="x")),
    ('{"time":"yesterday","ts":1795528759,"msg":"x"}', entry(fields={"time": "yesterday"},
                                                            message="x")),
    ('{"ts":true,"level":"verbose","pid":true,"host":7,"msg":"x"}',
     entry(ts=None, fields={"ts": True, "level": "verbose", "pid": True, "host": 7}, message="x")),
    ('{"ts":1795528759,"pid":"123","msg":"x"}', entry(pid=123, message="x")),
    ('{"ts":1795528759,"pid":-1,"msg":"x"}', entry(fields={"pid": -1}, message="x")),
    ('{"ts":1795528759,"pid":null,"host":null,"msg":"x","other":null}',   # null: no value
     entry(fields={"other": None}, message="x")),
    ('{"time":null,"ts":1795528759,"hostname":"h","host":null,"msg":"x"}',
     entry(host="h", message="x")),
    ('{"msg":42,"message":"second"}', entry(ts=None, fields={"msg": 42}, message="second")),
    ('{"msg":42}', entry(ts=None, fields={"msg": 42}, message='{"msg":42}')),
    ('{"ts":1795528759,"req":{"id":1,"headers":["a","b"]},"msg":"x"}',
     entry(fields={"req": {"id": 1, "headers": ["a", "b"]}}, message="x")),
    ('  {"ts":1795528759,"msg":"indented"}', entry(message="indented")),
    ("{}", entry(ts=None, message="{}")),
    ('{"msg":"bad \\ud800 surrogate","k\\udfff":"\\ud83d\\ude00"}',
     entry(ts=None, fields={"k\ufffd": "\U0001f600"}, message="bad \ufffd surrogate")),
])
def test_parse_json(stamps, line, expected):
    assert parse_json(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "{", '{"a":', "[1, 2]", '"text"', "42", "null", "not json", '{"a":1} trailing',
    "{'a': 1}", '{"a": ' + "[" * 100_000, "\ufffd{}",
])
def test_parse_json_rejects(stamps, line):
    assert parse_json(line, stamps) is None


def test_json_lone_surrogate_is_storable(stamps):
    parsed = parse_json('{"msg":"\\udcff","\\ud800":["\\ud801"]}', stamps)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (message TEXT, fields TEXT)")
    db.execute("INSERT INTO t VALUES (?, ?)",
               (parsed[6], json.dumps(parsed[5], ensure_ascii=False)))
    assert db.execute("SELECT message, fields FROM t").fetchone() == (
        "\ufffd", '{"\ufffd": ["\ufffd"]}')


# parse_clf #######################################################################

def clf_fields(**changes):
    fields = {"remote_addr": "127.0.0.1", "user": None, "method": "GET", "path": "/",
              "protocol": "HTTP/1.1", "status": 200, "bytes": 512, "referer": None,
              "user_agent": "curl/8.5.0"}
    fields.update(changes)
    return fields


def nginx(rest, level="info", addr="127.0.0.1", **changes):
    """(line, expected) for an nginx combined line from that address, ending in rest."""
    line = f"{addr} - - [24/Nov/2026:13:59:19 +0100] {rest}"
    fields = clf_fields(remote_addr=addr, **changes)
    return line, entry(ts="2026-11-24 12:59:19", level=level, fields=fields, message=line)


COMMON = '127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326'
COMBINED = COMMON + ' "http://www.example.com/start.html" "Mozilla/4.08 [en] (Win98; I ;Nav)"'
NGINX = '127.0.0.1 - - [24/Nov/2026:13:59:19 +0100] '


@pytest.mark.parametrize("line,expected", [
    (COMMON, entry(ts="2000-10-10 20:55:36", level="info", message=COMMON, fields={
        "remote_addr": "127.0.0.1", "user": "frank", "method": "GET", "path": "/apache_pb.gif",
        "protocol": "HTTP/1.0", "status": 200, "bytes": 2326})),
    (COMBINED, entry(ts="2000-10-10 20:55:36", level="info", message=COMBINED, fields={
        "remote_addr": "127.0.0.1", "user": "frank", "method": "GET", "path": "/apache_pb.gif",
        "protocol": "HTTP/1.0", "status": 200, "bytes": 2326,
        "referer": "http://www.example.com/start.html",
        "user_agent": "Mozilla/4.08 [en] (Win98; I ;Nav)"})),
    nginx('"GET / HTTP/1.1" 200 512 "-" "curl/8.5.0"'),
    nginx('"GET / HTTP/1.1" 304 0 "-" "curl/8.5.0"', addr="2001:db8::1", status=304, bytes=0),
    nginx('"GET / HTTP/1.1" 200 - "-" "curl/8.5.0"', bytes=None),
    nginx('"GET /q?a=\\"x\\" HTTP/1.1" 200 512 "-" "Mozilla \\"quoted\\" \\\\ agent"',
          path='/q?a="x"', user_agent='Mozilla "quoted" \\ agent'),
    nginx('"-" 400 0 "-" "-"', level="warning", method=None, path=None, protocol=None,
          status=400, bytes=0, user_agent=None),
    nginx('"\\x16\\x03\\x01\\x00\\xca\\x01" 400 157 "-" "-"', level="warning", method=None,
          path=None, protocol=None, status=400, bytes=157, user_agent=None),
    nginx('"\\x03\\x00\\x00/*\\xE0\\x00Cookie: mstshash=Administr" 400 157 "-" "-"',  # RDP probe
          level="warning", method=None, path=None, protocol=None, status=400, bytes=157,
          user_agent=None),
    nginx('"GET /" 200 512 "-" "curl/8.5.0"', protocol=None),
    nginx('"PRI * HTTP/2.0" 400 0 "-" "-"', level="warning", method="PRI", path="*",
          protocol="HTTP/2.0", status=400, bytes=0, user_agent=None),
    nginx('"GET /a b HTTP/1.1" 200 512 "-" "curl/8.5.0"', path="/a b"),
    nginx('"POST /api HTTP/1.1" 502 166 "https://x.example/" "curl/8.5.0"', level="error",
          method="POST", path="/api", status=502, bytes=166, referer="https://x.example/"),
    nginx('"GET /x HTTP/1.1" 404 0 "-" "curl/8.5.0" "203.0.113.9"',  # nginx's "main" format
          level="warning", path="/x", status=404, bytes=0),
    nginx('"GET / HTTP/1.1" 200 512 "-" "curl/8.5.0"\r'),
])
def test_parse_clf(stamps, line, expected):
    assert parse_clf(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "garbage", NGINX + '"GET / HTTP/1.1" 200', NGINX + '"GET / HTTP/1.1" 2000 1',
    NGINX + '"GET / HTTP/1.1 200 512', NGINX + "GET / HTTP/1.1 200 512",
    '127.0.0.1 - - [10/Oct/2000:13:55:36] "GET / HTTP/1.0" 200 1',
    '127.0.0.1 - - [yesterday] "GET / HTTP/1.0" 200 1',
    NGINX + '"GET / HTTP/1.1" 200 512x', NGINX + '"GET / HTTP/1.1" 200 ' + "9" * 5000,
    "Nov 24 13:59:19 web-01 nginx[1234]: msg", '{"msg": "x"}',
])
def test_parse_clf_rejects(stamps, line):
    assert parse_clf(line, stamps) is None


# parse_logfmt ####################################################################

@pytest.mark.parametrize("line,expected", [
    ('time="2026-11-24T13:59:19Z" level=info msg="text here" key=value',  # logrus
     entry(level="info", fields={"key": "value"}, message="text here")),
    ('time=2026-11-24T14:59:19.123+01:00 level=WARN msg="disk low" free=3%',  # slog
     entry(ts=TS + ".123000", level="warning", fields={"free": "3%"}, message="disk low")),
    ('level=info ts=2026-11-24T13:59:19.123456Z caller=main.go:12 msg="Starting Loki" v=3.0',
     entry(ts=TS + ".123456", level="info", fields={"caller": "main.go:12", "v": "3.0"},
           message="Starting Loki")),  # go-kit, as Loki writes it
    ('ts=2026-11-24T13:59:19.123Z caller=main.go:580 level=info msg="No time retention set"'
     ' duration=15d', entry(ts=TS + ".123000", level="info",   # Prometheus
                            fields={"caller": "main.go:580", "duration": "15d"},
                            message="No time retention set")),
    ('logger=settings t=2026-11-24T14:59:19.123+01:00 level=info msg="Starting Grafana"'
     ' version=11.0.0', entry(ts=TS + ".123000", level="info",    # Grafana
                             fields={"logger": "settings", "version": "11.0.0"},
                             message="Starting Grafana")),
    ('ts=2026-11-24T13:59:19Z lvl=dbg message="x y"', entry(level="debug", message="x y")),
    ('level=error msg=failed err="unexpected EOF"',
     entry(ts=None, level="error", fields={"err": "unexpected EOF"}, message="failed")),
    ("msg=hello", entry(ts=None, message="hello")),
    ("time=2026-11-24T13:59:19Z a=1", entry(fields={"a": "1"},
                                             message="time=2026-11-24T13:59:19Z a=1")),
    ("time=yesterday level=verbose msg=x",
     entry(ts=None, fields={"time": "yesterday", "level": "verbose"}, message="x")),
    ('time=2026-11-24T13:59:19Z level=INFO+2 msg="say \\"hi\\"\\n" path="/a b" empty=',
     entry(fields={"level": "INFO+2", "path": "/a b", "empty": ""}, message='say "hi"\n')),
])
def test_parse_logfmt(stamps, line, expected):
    assert parse_logfmt(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "hello world", "seq=000001 lone line", "a=1 b=2", "=x", " level=info msg=x",
    "x = 1", "Nov 24 13:59:19 web-01 app: level=info msg=x", '{"level":"info"}',
    "\tat com.foo.Bar(Bar.java:10)", "2026-11-24 13:59:19 level=info msg=x",
])
def test_parse_logfmt_rejects(stamps, line):
    assert parse_logfmt(line, stamps) is None


# parse_app #######################################################################

@pytest.mark.parametrize("line,expected", [
    # Python logging, '%(asctime)s %(levelname)s %(name)s: %(message)s'
    ("2026-11-24 13:59:19,123 INFO app.db: connected",
     entry(ts=TS + ".123000", program="app.db", level="info", message="connected")),
    ("2026-11-24 13:59:19,123 WARNING root: disk: 91% full",
     entry(ts=TS + ".123000", program="root", level="warning", message="disk: 91% full")),
    # the logging cookbook's '%(asctime)s - %(name)s - %(levelname)s - %(message)s'
    ("2026-11-24 13:59:19,123 - app.db - INFO - connected",
     entry(ts=TS + ".123000", program="app.db", level="info", message="connected")),
    # '%(asctime)s %(name)s %(levelname)s %(message)s': level second
    ("2026-11-24 13:59:19,123 app.db ERROR lost connection",
     entry(ts=TS + ".123000", program="app.db", level="error", message="lost connection")),
    # log4j2/logback '%d{ISO8601} [%t] %-5level %logger{36} - %msg%n'
    ("2026-11-24 13:59:19,123 [main] INFO  com.example.App - started",
     entry(ts=TS + ".123000", program="com.example.App", level="info", fields={"thread": "main"},
           message="started")),
    ("2026-11-24 13:59:19,123 [pool-1 thread-2] WARN  c.e.Job - slow - 2s",
     entry(ts=TS + ".123000", program="c.e.Job", level="warning",
           fields={"thread": "pool-1 thread-2"}, message="slow - 2s")),
    # log4j '%d %-5p [%c] %m%n'
    ("2026-11-24 13:59:19,123 ERROR [com.example.App] failed",
     entry(ts=TS + ".123000", program="com.example.App", level="error", message="failed")),
    # Spring Boot 2 default; Spring Boot 3 default, with and without the application name
    ("2026-11-24 13:59:19.123  INFO 4242 --- [           main] "
     "o.s.b.StartupInfoLogger                  : Starting",
     entry(ts=TS + ".123000", program="o.s.b.StartupInfoLogger", pid=4242, level="info",
           fields={"thread": "main"}, message="Starting")),
    ("2026-11-24T13:59:19.123+01:00  INFO 4242 --- [main] o.s.b.StartupInfoLogger : Starting",
     entry(ts="2026-11-24 12:59:19.123000", program="o.s.b.StartupInfoLogger", pid=4242,
           level="info", fields={"thread": "main"}, message="Starting")),
    ("2026-11-24T13:59:19.123Z  WARN 4242 --- [demo] [           main] "
     "o.s.b.w.e.tomcat.TomcatWebServer         : Tomcat: port 8080",
     entry(ts=TS + ".123000", program="o.s.b.w.e.tomcat.TomcatWebServer", pid=4242,
           level="warning", fields={"thread": "main"}, message="Tomcat: port 8080")),
    # Go's log package: no level
    ("2026/11/24 13:59:19 message", entry(message="message")),
    ("2026/11/24 13:59:19.123456 main.go:12: listening", entry(ts=TS + ".123456",
                                                             message="main.go:12: listening")),
    ("2026/11/24 13:59:19 error opening config", entry(message="error opening config")),
    ("2026/11/24 13:59:19", entry(message="")),
    # zap's console encoder, production (lower case) and development (upper case)
    ("2026-11-24T13:59:19.123+0100\tinfo\tapp/main.go:12\tstarted",
     entry(ts="2026-11-24 12:59:19.123000", level="info", fields={"caller": "app/main.go:12"},
           message="started")),
    ("2026-11-24T13:59:19.123+0100\tERROR\tdb\tapp/db.go:40\tquery failed\t{\"table\": \"t\"}",
     entry(ts="2026-11-24 12:59:19.123000", program="db", level="error",
           fields={"caller": "app/db.go:40"}, message="query failed\t{\"table\": \"t\"}")),
    # Go slog TextHandler, logrus TextFormatter
    ('time=2026-11-24T13:59:19.123+01:00 level=INFO msg="hello world" user=42',
     entry(ts="2026-11-24 12:59:19.123000", level="info", fields={"user": "42"},
           message="hello world")),
    ('time=2026-11-24T13:59:19Z level=INFO+2 msg="say \\"hi\\"\\n" path="/a b" empty=',
     entry(fields={"level": "INFO+2", "path": "/a b", "empty": ""}, message='say "hi"\n')),
    ('time="2026-11-24T13:59:19+01:00" level=warning msg="disk low" free=3%',
     entry(ts="2026-11-24 12:59:19", level="warning", fields={"free": "3%"}, message="disk low")),
    ("time=2026-11-24T13:59:19Z level=DEBUG", entry(level="debug", message=(
        "time=2026-11-24T13:59:19Z level=DEBUG"))),
    # Rust env_logger and tracing-subscriber
    ("[2026-11-24T13:59:19Z INFO  myapp::db] connected",
     entry(program="myapp::db", level="info", message="connected")),
    ("2026-11-24T13:59:19.123456Z  INFO myapp: started",
     entry(ts=TS + ".123456", program="myapp", level="info", message="started")),
    ("2026-11-24T13:59:19.123456Z ERROR myapp::net: peer reset: retrying",
     entry(ts=TS + ".123456", program="myapp::net", level="error", message="peer reset: retrying")),
    # go-kit logfmt (Prometheus, Loki) begins entries too, its time anywhere in the line
    ('level=info ts=2026-11-24T13:59:19.123Z caller=main.go:12 msg="Starting Loki"',
     entry(ts=TS + ".123000", level="info", fields={"caller": "main.go:12"},
           message="Starting Loki")),
    # no level word, but a message that states one: our own stderr, Go's log package
    ("2026-11-24 13:59:19 logtail2db: warning: skipping x: Permission denied",
     entry(level="warning", message="logtail2db: warning: skipping x: Permission denied")),
    ("2026/11/24 13:59:19 error: config missing", entry(level="error",
                                                        message="error: config missing")),
    # odds and ends
    ("[2026-11-24 13:59:19] WARN something odd", entry(level="warning", message="something odd")),
    ("2026-11-24 13:59:19 INFO", entry(level="info")),
    ("2026-11-24 13:59:19,123 CRITICAL", entry(ts=TS + ".123000", level="critical")),
])
def test_parse_app(stamps, line, expected):
    assert parse_app(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "   ", "\tat com.foo.Bar(Bar.java:10)", "Traceback (most recent call last):",
    '  File "app.py", line 3, in <module>', "ValueError: boom", "\t... 12 more",
    "Caused by: java.lang.IllegalStateException: x", "INFO app: x", "2026-11-24",
    "2026-11-24 13:59", "2026-13-45 13:59:19 INFO x", "2026-11-24 13:59:19INFO x",
    "time=yesterday level=INFO msg=x", "level=INFO msg=x", "Nov 24 13:59:19 web-01 x: y",
])
def test_parse_app_rejects(stamps, line):
    assert parse_app(line, stamps) is None


# parse_java ######################################################################

JAVA_FIELDS = {"thread": "main", "logger": "com.example.App"}


@pytest.mark.parametrize("line,expected", [
    # logback's default (log4j2's default console too): the day from the file, 24 Nov 12:00
    ("11:59:19.123 [main] INFO  com.example.App - started",
     entry(ts="2026-11-24 11:59:19.123000", level="info", fields=JAVA_FIELDS, message="started")),
    ("11:59:19.123 [http-nio-8080-exec-1] WARN  c.e.web.Controller - slow: 2 s",
     entry(ts="2026-11-24 11:59:19.123000", level="warning",
           fields={"thread": "http-nio-8080-exec-1", "logger": "c.e.web.Controller"},
           message="slow: 2 s")),
    ("13:59:19.123 [main] ERROR com.example.App - later in the day than the file: yesterday",
     entry(ts="2026-11-23 13:59:19.123000", level="error", fields=JAVA_FIELDS,
           message="later in the day than the file: yesterday")),
    # log4j2 "%d [%t] %-5level %c - %m" and "%d %-5level [%t] %c - %m"
    ("2026-11-24 13:59:19,123 [main] INFO com.example.App - started",
     entry(ts=TS + ".123000", level="info", fields=JAVA_FIELDS, message="started")),
    ("2026-11-24 13:59:19.123 INFO [main] com.example.App - started",
     entry(ts=TS + ".123000", level="info", fields=JAVA_FIELDS, message="started")),
    ("2026-11-24 13:59:19,123 [pool-1 thread-2] ERROR c.e.Job - failed - retrying",
     entry(ts=TS + ".123000", level="error", fields={"thread": "pool-1 thread-2",
                                                    "logger": "c.e.Job"},
           message="failed - retrying")),
    ("2026-11-24T13:59:19.123Z [           main] DEBUG com.example.App - x",
     entry(ts=TS + ".123000", level="debug", fields=JAVA_FIELDS, message="x")),
    ("2026-11-24 13:59:19,123 [main] FATAL com.example.App -",
     entry(ts=TS + ".123000", level="critical", fields=JAVA_FIELDS)),
    ("2026-11-24 13:59:19,123 TRACE [] com.example.App - x",
     entry(ts=TS + ".123000", level="trace", fields={"thread": "", "logger": "com.example.App"},
           message="x")),
])
def test_parse_java(stamps, line, expected):
    assert parse_java(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "\tat com.example.App.run(App.java:10)", "Caused by: java.io.IOException: disk",
    "\t... 2 more", "java.lang.IllegalStateException: boom",
    "2026-11-24 13:59:19,123 INFO app.db: connected",
    "2026-11-24 13:59:19.123  INFO 4242 --- [main] o.s.b.StartupInfoLogger : Starting",
    "11:59:19.123 [main] info com.example.App - lower case", "11:59:19.123 [main] INFO c.e.App: x",
    "25:00:00.000 [main] INFO com.example.App - x", "11:59:19.123 [main INFO com.example.App - x",
    "11:59 [main] INFO com.example.App - x", "2026-13-01 00:00:00,000 [main] INFO c.e.App - x",
    "Nov 24 13:59:19 web-01 java[1]: x",
])
def test_parse_java_rejects(stamps, line):
    assert parse_java(line, stamps) is None


# parse_docker ####################################################################

def docker(log, stream="stdout", time="2026-11-24T13:59:19.123456789Z", **more):
    return json.dumps({"log": log, "stream": stream, **more, "time": time},
                      separators=(",", ":"))


@pytest.mark.parametrize("line,expected", [
    (docker("text here\n", "stderr"),
     entry(ts=TS + ".123456", fields={"stream": "stderr"}, message="text here")),
    (docker("a piece, no newline"),   # the next line continues it (see EntryBuilder)
     entry(ts=TS + ".123456", fields={"stream": "stdout", "partial": True},
           message="a piece, no newline")),
    (docker("crlf\r\n"), entry(ts=TS + ".123456", fields={"stream": "stdout"}, message="crlf")),
    (docker("\n"), entry(ts=TS + ".123456", fields={"stream": "stdout"})),
    (docker("x\n", attrs={"tag": "web"}),
     entry(ts=TS + ".123456", fields={"stream": "stdout", "attrs": {"tag": "web"}}, message="x")),
    # What the container wrote, read further; the time stays the runtime's.
    (docker('{"level":"error","msg":"boom","user":7,"time":"2026-11-24T13:00:00Z"}\n'),
     entry(ts=TS + ".123456", level="error", fields={"user": 7, "stream": "stdout"},
           message="boom")),
    (docker('{"msg":"x","stream":"mine"}\n'),
     entry(ts=TS + ".123456", fields={"stream": "stdout"}, message="x")),
    (docker('time=2026-11-24T13:59:19Z level=warn msg="disk low" free=3%\n'),
     entry(ts=TS + ".123456", level="warning", fields={"free": "3%", "stream": "stdout"},
           message="disk low")),
    (docker("2026-11-24 13:59:19,123 ERROR app.web: request failed\n"),
     entry(ts=TS + ".123456", program="app.web", level="error", fields={"stream": "stdout"},
           message="request failed")),
    (docker("logtail2db: warning: skipping x\n", "stderr"),
     entry(ts=TS + ".123456", level="warning", fields={"stream": "stderr"},
           message="logtail2db: warning: skipping x")),
    (docker("x\n", time="2026-11-24T14:59:19+01:00"),
     entry(fields={"stream": "stdout"}, message="x")),
])
def test_parse_docker(stamps, line, expected):
    assert parse_docker(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "not json", '{"log":"x\\n"}', '{"log":"x\\n","stream":"stdout"}',
    docker("x\n", time="yesterday"), docker(1), docker("x\n", stream=None),
    '{"stream":"stdout","log":"x\\n","time":"2026-11-24T13:59:19Z"}',
    docker("x\n") + " trailing", '{"log":', '{"log":"x\\n","stream":"stdout","time":1}',
])
def test_parse_docker_rejects(stamps, line):
    assert parse_docker(line, stamps) is None


# parse_cri #######################################################################

@pytest.mark.parametrize("line,expected", [
    ("2026-11-24T13:59:19.123456789Z stdout F text here",
     entry(ts=TS + ".123456", fields={"stream": "stdout"}, message="text here")),
    ("2026-11-24T13:59:19.123456789Z stderr P a piece",   # the next line continues it
     entry(ts=TS + ".123456", fields={"stream": "stderr", "partial": True}, message="a piece")),
    ("2026-11-24T14:59:19.123456789+01:00 stdout F cri-o", entry(  # CRI-O: local time
        ts=TS + ".123456", fields={"stream": "stdout"}, message="cri-o")),
    ("2026-11-24T13:59:19.1Z stdout F x",  # RFC3339Nano drops trailing zeros
     entry(ts=TS + ".100000", fields={"stream": "stdout"}, message="x")),
    ("2026-11-24T13:59:19Z stdout F x", entry(fields={"stream": "stdout"}, message="x")),
    ("2026-11-24T13:59:19Z stdout F ", entry(fields={"stream": "stdout"})),
    ("2026-11-24T13:59:19Z stdout F", entry(fields={"stream": "stdout"})),
    ("2026-11-24T13:59:19Z stdout F  two  spaces ",
     entry(fields={"stream": "stdout"}, message=" two  spaces ")),
    ('2026-11-24T13:59:19Z stdout F {"level":"warn","msg":"hi","k":1}',
     entry(level="warning", fields={"k": 1, "stream": "stdout"}, message="hi")),
    ('2026-11-24T13:59:19Z stderr F level=error ts=2026-11-24T13:00:00Z msg="x y"',
     entry(level="error", fields={"stream": "stderr"}, message="x y")),
    ("2026-11-24T13:59:19Z stdout F 11:32:56.655 [main] INFO  com.example.App - up",
     entry(level="info", fields={**JAVA_FIELDS, "stream": "stdout"}, message="up")),
    ("2026-11-24T13:59:19Z stdout F 2026-11-24 13:59:19,123 INFO app.db: connected",
     entry(program="app.db", level="info", fields={"stream": "stdout"}, message="connected")),
])
def test_parse_cri(stamps, line, expected):
    assert parse_cri(line, stamps) == expected


@pytest.mark.parametrize("line", [
    "", "2026-11-24T13:59:19Z stdout X text", "2026-11-24T13:59:19Z stdin F text",
    "yesterday stdout F text", "2026-11-24T13:59:19Z stdout", "2026-11-24T13:59:19Z  stdout F x",
    "2026-11-24T13:59:19Z stdout P:F x", "2026-11-24 13:59:19 stdout F x",
    "Nov 24 13:59:19 web-01 app: x", "2026-11-24T13:59:19Z web-01 app[1]: x",
])
def test_parse_cri_rejects(stamps, line):
    assert parse_cri(line, stamps) is None


# make_pattern_parser #############################################################

@pytest.mark.parametrize("regex,line,expected", [
    (r"(?P<ts>\S+ \S+) (?P<level>\w+) \[(?P<program>[^\]]+)\] (?P<message>.*)",
     "2026-11-24 13:59:19 WARN [db] slow query",
     entry(program="db", level="warning", message="slow query")),
    (r"(?P<ts>\w+ +\d+ \S+) (?P<host>\S+) (?P<program>\w+)\[(?P<pid>\d+)\]: (?P<message>.*)",
     "Nov 24 13:59:19 web-01 app[42]: hi",
     entry(host="web-01", program="app", pid=42, message="hi")),
    (r"(?P<ts>[\d.]+) (?P<message>.*)", "1795528759.5 hello", entry(ts=TS + ".500000",
                                                                      message="hello")),
    (r"(?P<ts>\d+) (?P<message>.*)", "1795528759123 hello", entry(ts=TS + ".123000",
                                                                message="hello")),
    (r"\[(?P<ts>[^\]]+)\] (?P<message>.*)", "[24/Nov/2026:13:59:19 +0000] x", entry(message="x")),
    (r"(?P<ts>\S+) (?P<pid>\S+) (?P<level>\S+) (?P<message>.*)", "yesterday abc verbose x",
     entry(ts=None, fields={"ts": "yesterday", "pid": "abc", "level": "verbose"}, message="x")),
    (r"(?P<user>\w+) did (?P<what>\w+)(?: in (?P<where>\w+))?", "alice did login",
     entry(ts=None, fields={"user": "alice", "what": "login"}, message="alice did login")),
    (r"(?P<level>\w+)(?:: (?P<message>.*))?", "ERROR", entry(ts=None, level="error")),
    (r"(\d+) (\w+)", "12 ab", entry(ts=None, message="12 ab")),
])
def test_pattern_parser(stamps, regex, line, expected):
    assert make_pattern_parser(regex)(line, stamps) == expected


def test_pattern_parser_rejects_non_matching_line(stamps):
    assert make_pattern_parser(r"(?P<ts>\d+) (?P<message>.*)")("abc def", stamps) is None


def test_pattern_parser_bad_regex_is_value_error():
    with pytest.raises(ValueError, match=r"^--pattern '\(\?P<ts>' is not a valid regular "):
        make_pattern_parser("(?P<ts>")


# detect_format ###################################################################

SYSLOG_LINES = [f"Nov 24 13:59:{s:02d} web-01 sshd[{100 + s}]: Accepted publickey"
                for s in range(8)]
PYTHON_TRACEBACK_LOG = [
    "2026-11-24 13:59:19,123 INFO app: starting",
    "2026-11-24 13:59:20,001 ERROR app: request failed",
    "Traceback (most recent call last):",
    '  File "/srv/app/main.py", line 12, in handle',
    "    result = compute(x)",
    '  File "/srv/app/main.py", line 30, in compute',
    "    return 1 / x",
    "ZeroDivisionError: division by zero",
    "",
    "2026-11-24 13:59:21,500 INFO app: recovered",
]
JAVA_TRACE_LOG = [
    "2026-11-24 13:59:19,123 [main] ERROR com.example.App - request failed",
    "java.lang.IllegalStateException: boom",
    *[f"\tat com.example.Layer{n}.call(Layer{n}.java:{n + 10})" for n in range(14)],
    "Caused by: java.io.IOException: broken pipe",
    "\t... 12 more",
    "2026-11-24 13:59:20,000 [main] INFO  com.example.App - retrying",
]


@pytest.mark.parametrize("lines,expected", [
    (SYSLOG_LINES, "syslog"),
    (["<165>1 2026-11-24T13:59:19.123Z web-01 app 77 ID47 - hi"] * 5, "syslog"),
    (["2026-11-24T13:59:19.123456+01:00 web-01 sshd[2]: msg"] * 5, "syslog"),  # not level-less app
    (['{"level":30,"time":1795528759123,"msg":"hi"}'] * 5, "json"),
    (["starting up..."] + ['{"level":30,"msg":"hi"}'] * 5, "json"),
    ([NGINX + '"GET / HTTP/1.1" 200 512 "-" "curl/8.5.0"'] * 5, "clf"),
    (PYTHON_TRACEBACK_LOG, "app"),
    (JAVA_TRACE_LOG, "java"),   # log4j2's layout: thread and logger to fields (issue 14)
    (["11:32:56.655 [main] INFO  com.example.App - up"] + JAVA_TRACE_LOG[1:], "java"),
    ([journal(MESSAGE=f"m{n}") for n in range(5)], "journald"),
    ([docker(f"line {n}\n") for n in range(5)], "docker"),
    ([docker('{"level":"info","msg":"x"}\n')] * 5, "docker"),
    (["2026-11-24T13:59:19.123456789Z stdout F plain text"] * 5, "cri"),
    (['2026-11-24T13:59:19Z stdout F {"level":"info","msg":"x"}'] * 5, "cri"),
    (['level=info ts=2026-11-24T13:59:19.123Z caller=main.go:12 msg="x"'] * 5, "logfmt"),
    (['time="2026-11-24T13:59:19Z" level=info msg="text here" key=value'] * 5, "logfmt"),
    (["Nov 24 13:59:19.655353 web-01 sshd[123]: msg"] * 5, "syslog"),
    (["2026-11-24T14:59:19+0100 web-01 sshd[123]: msg"] * 5, "syslog"),
    (["2026-11-24 13:59:19 logtail2db: warning: skipping x"] * 5, "app"),
    (["2026-11-24T13:59:19Z INFO app: started"] * 5, "app"),  # would parse as syslog, host INFO
    (["2026/11/24 13:59:19 listening on :8080"] * 5, "app"),
    (["\tat com.example.Old.run(Old.java:1)"] + SYSLOG_LINES, "syslog"),  # rotated mid-entry
    (["hello", "world", SYSLOG_LINES[0], '{"msg":"x"}', NGINX + '"GET / HTTP/1.1" 200 1',
      "more junk", "and more"], "plain"),
    (["hello", "world", SYSLOG_LINES[0], "more junk", "and more"], "plain"),  # one header only
    (["junk"] * 20 + ['{"msg":"x"}'] * 50, "plain"),  # only the first 20 lines count
    ([SYSLOG_LINES[0]] + ["junk"] * 5 + ['{"msg":"x"}'] * 6, "json"),
    ([], "plain"),
    (["", "   ", ""], "plain"),
])
def test_detect_format(stamps, lines, expected):
    assert detect_format(lines, stamps) == expected


def test_parser_tables():
    assert set(PARSERS) == {"syslog", "rfc5424", "journald", "json", "docker", "cri", "logfmt",
                            "clf", "app", "java"}
    assert MULTILINE_FORMATS == {"syslog", "rfc5424", "app", "java"}
    assert set(lt.DETECT_ORDER) == set(PARSERS) - {"rfc5424"}
    assert set(lt.FORMATS) == set(lt.DETECT_ORDER) | {"auto", "plain"}


# Never raise, always well-formed #################################################

LEVEL_NAMES = {None, "trace", "debug", "info", "notice", "warning", "error", "critical", "alert",
               "emergency"}
TS_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?")
SAMPLES = [
    "Nov 24 13:59:19 web-01 nginx[1234]: msg",
    "<34>Nov 24 13:59:19 web-01 su: 'su root' failed",
    '<165>1 2026-11-24T13:59:19.123Z web-01 app 77 ID47 [sd@1 a="b" c="d\\"q"] hi',
    '{"ts":1795528759,"level":30,"pid":3,"msg":"x","req":{"a":[1,2]}}',
    NGINX + '"GET /q?a=\\"x\\" HTTP/1.1" 200 512 "-" "Mozilla \\"q\\""',
    "2026-11-24T13:59:19.123+01:00  INFO 4242 --- [main] o.s.b.StartupInfoLogger : Starting",
    'time=2026-11-24T13:59:19.123+01:00 level=INFO msg="hello world" user=42',
    "[2026-11-24T13:59:19Z INFO  myapp::db] connected",
    "Nov 24 13:59:19.655353 web-01 postfix/smtpd[99]: prog: warning: x",
    journal(SYSLOG_IDENTIFIER="sshd", _PID="4242", _TRANSPORT="stdout",
            MESSAGE=[108, 116, 58, 32, 101, 114, 114, 111, 114, 58, 32, 255]),
    docker('{"level":"error","msg":"boom","pid":7,"host":"h"}\n', attrs={"tag": "web"}),
    '2026-11-24T13:59:19.123456789Z stdout F time=2026-11-24T13:59:19Z level=info msg="a b" k=v',
    "2026-11-24T13:59:19.123456789+01:00 stderr P 2026-11-24 13:59:19,123 [main] WARN c.e.A - x",
    'logger=settings t=2026-11-24T14:59:19.123+01:00 lvl=eror message="Starting" version=11',
    "11:32:56.655 [main] INFO  com.example.App - started",
    "2026-11-24 13:59:19.123 ERROR [pool-1 thread-2] com.example.App - failed",
]


def mangled_lines():
    """Every prefix of the samples, and seeded random edits of them."""
    rng = random.Random(4242)
    alphabet = ' \t<>[]{}":=,.-/+0123456789aZ\\\ufffd\ufeff\u00b2'
    for sample in SAMPLES:
        yield from (sample[:cut] for cut in range(len(sample) + 1))
        for _ in range(300):
            chars = list(sample)
            for _ in range(rng.randint(1, 4)):
                chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            yield "".join(chars)


def test_parsers_never_raise_and_return_storable_tuples(stamps):
    db = sqlite3.connect(":memory:")
    parsers = [*PARSERS.values(), make_pattern_parser(r"(?P<ts>\S+) (?P<pid>\S+) (?P<x>.*)")]
    checked = 0
    for line in mangled_lines():
        for parse in parsers:
            parsed = parse(line, stamps)
            if parsed is None:
                continue
            ts, host, program, pid, level, fields, message = parsed
            assert ts is None or (TS_RE.fullmatch(ts) and
                                  db.execute("SELECT datetime(?)", (ts,)).fetchone()[0]), parsed
            assert host is None or isinstance(host, str), parsed
            assert program is None or isinstance(program, str), parsed
            assert pid is None or (type(pid) is int and 0 <= pid < 2**63), parsed
            assert level in LEVEL_NAMES, parsed
            assert fields is None or (isinstance(fields, dict) and fields), parsed
            json.dumps(fields)
            assert isinstance(message, str), parsed
            checked += 1
    assert checked > 1000


def test_syslog_fast_path_reads_lines_as_the_general_code_does(stamps):
    rng = random.Random(5)
    times = ["Nov 24 13:59:19", "Nov  4 03:05:09", "Feb 30 00:00:00", "Dec 31 23:59:60",
             "Nov 24 13:59", "Nov 24 13:59:19.5"]
    hosts = ["web-01", "h\tost", "[::1]", "", "a b"]
    tags = ["nginx", "postfix/smtpd", "a:b", "p[12]", "p[]", "p[1234567890]", "p[\u0663]",
            "CRON[12]", "x", "", "[77]", "sd[1]x"]
    ends = [": ", ":", ": hello: there", ":  two  spaces", " no colon", "[3]: m", ": error: x",
            ": Warning: y", ": prog: fatal: z", ": prog: hello: z", ": error:", ": a b: error: x",
            ": pam(x:y): error: z"]
    lines = [f"{rng.choice(times)} {rng.choice(hosts)} {rng.choice(tags)}{rng.choice(ends)}"
             for _ in range(5000)]
    matched = 0
    for line in lines:
        if lt.SYSLOG_RE.match(line):
            matched += 1
            assert parse_syslog(line, stamps) == lt._parse_syslog(line, stamps), line
    assert 200 < matched < 4500     # both kinds of line are seen


def held(made: list) -> list:
    """What fed_rows() says was held back after each chunk."""
    return [row for row in made if row[0] == "held"]


def read_back(made: list) -> list:
    """What SqliteRows' rows (those of fed_rows(), say) read as in the entries view: each
    row's columns but for those that say where its message is, and its message."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(lt.SCHEMA)
    for row in made:
        if row[0] != "held":
            conn.execute(lt.INSERT_ROW[len(row)], row)
    return conn.execute("SELECT file_id, offset, ts, host, program, pid, level, fields, raw,"
                        " part, message, typeof(message) FROM entries ORDER BY id").fetchall()


def batch_rows(batch: tuple) -> list:
    """The rows a batch of SqliteRows stores, as 13 values each."""
    count, shape, statements, rest = batch
    size = 8 if shape == lt.KEYED else shape
    flat = [value for values in statements for value in values]
    made = [tuple(flat[at:at + size]) for at in range(0, len(flat), size)] + list(rest)
    if shape == lt.KEYED:
        made, size = [row + (0,) for row in made], 9     # msg_at, in the statement
    assert len(made) == count
    return [lt.WIDEN[size, 13](row) if size < 13 else row for row in made]


def fed_rows(builder, chunks: list) -> list:
    """The rows a builder makes of chunks of text fed one after the other, each followed by
    what it holds back, then those of its flush()."""
    made, offset = [], 0
    for text in chunks:
        data = text.encode()
        made.extend(builder.feed(data, offset))
        offset += len(data)
        made.append(("held", builder.held))
    return made + builder.flush()


@pytest.mark.parametrize("rows", [lt.SqliteRows, lt.PgRows(7)], ids=["sqlite", "pg"])
def test_syslog_chunk_makes_the_rows_line_by_line_parsing_makes(stamps, rows, monkeypatch):
    rng = random.Random(6)
    times = ["Nov 24 13:59:19", "Nov  4 03:05:09", "Jan  1 00:00:00", "Dec 31 23:59:59"]
    hosts = ["web-01", "h\tost", "[::1]", "caf\u00e9"]
    tags = ["nginx", "postfix/smtpd", "p[12]", "CRON[12]", "x"]
    ends = [": ", ": hello: there", ":  two  spaces", ": error: x", ": Warning: y",
            ": prog: fatal: z", ": prog: hello: z", ": error:", ": a b: error: x",
            ": pam(x:y): error: z", ": caf\u00e9: error: \u00e9", ": WARN: w"]
    odd = ["Feb 30 00:00:00 web-01 p: m", "Foo 24 13:59:19 web-01 p: m",
           "Nov 24 13:59:60 web-01 p: m", "  continued", "",
           "Nov 24 13:59:19.5 web-01 p: m", "Nov 24 13:59:19 web-01 a:b: m",
           "Nov 24 13:59:19 web-01 p[1234567890]: m", "Nov 24 13:59:19 web-01 p[\u0663]: m",
           "Nov 24 13:59:19 web-01 sd[1]x: m", "Nov 24 13:59:19 web-01 p[]x: m",
           "Nov 24 13:59:19 web-01 no colon", "Nov 24 13:59",
           "Nov 24 13:59:19 web-01\nNov 24 13:59:19 web-01 p: m"]

    def chunk(odd_one: bool) -> str:
        lines = [f"{rng.choice(times)} {rng.choice(hosts)} {rng.choice(tags)}{rng.choice(ends)}"
                 for _ in range(rng.randrange(1, 40))]
        if odd_one:     # a line the chunk's regex cannot take: the chunk goes line by line
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(odd))
        return "".join(line + "\n" for line in lines)

    chunks = [chunk(odd_one=rng.random() < 0.3) for _ in range(400)]
    options = lt.ParseOptions("syslog", None, None, 1 << 20, 1000)

    fast = fed_rows(lt.EntryBuilder(1, options, stamps, rows), chunks)
    taken = []
    monkeypatch.setattr(lt, "syslog_chunk", lambda text, stamps: taken.append(text))
    assert fast == fed_rows(lt.EntryBuilder(1, options, stamps, rows), chunks)
    assert len(taken) == len(chunks)
    assert sum(lt.SYSLOG_CHUNK_RE.findall(text).__len__() == text.count("\n")
               for text in chunks) > 200    # most chunks took the fast path


def test_json_plan_reads_objects_as_the_key_by_key_search_does(stamps):
    rng = random.Random(7)
    values = ["2026-11-24T13:59:19Z", 1795528759, "info", "WARN", 30, 99, "text", "", None,
              1234, "1234", -1, ["a"], {"k": 1}, True, 1.5]
    keys = ["time", "timestamp", "ts", "@timestamp", "level", "severity", "lvl", "msg",
            "message", "event", "host", "hostname", "program", "app", "service", "pid", "other"]
    for _ in range(3000):
        obj = {key: rng.choice(values) for key in rng.sample(keys, rng.randrange(1, 8))}
        line = json.dumps(obj)
        assert parse_json(line, stamps) == lt._parse_json(json.loads(line), line, stamps), line


def test_iso_each_reads_times_as_iso_does(set_zone):
    """A step for all the times at once where they are alike, and iso() for any other:
    both read each time as iso() does, cached minutes or not."""
    set_zone("Europe/Berlin")
    rng = random.Random(12)

    def stamp() -> str:     # mostly the first of each part's choices, which is usual
        return "".join(parts[0] if rng.random() < 0.85 else rng.choice(parts) for parts in (
            ["2026", "2026", "1999", "20x6"], ["-"], ["11", "12", "02", "13"], ["-"],
            ["24", "30", "29", "07"], ["T", "T", " ", "/"], ["13", "00", "23", "24"], [":"],
            ["59", "00", "07", "60"], [":"], ["19", "00", "59", "60", "5x", "\u06634"],
            ["", "", ".5", ".123", ",123456", ".1234567", ".123456789", ".1234567890", ".",
             ".12\u00b2"],
            ["Z", "Z", "", "+01:00", "-0530", "+01", "z", "5", "+25:00"]))

    # As long as the first, another layout: a fraction where it has a zone, a zone's
    # digit where its fraction ends, a digit that is not ASCII.
    alike = [["2026-11-24T13:59:19+01", "2026-11-24T13:59:19.50"],
             ["2026-11-24T13:59:19.12Z", "2026-11-24T13:59:19.129"],
             ["2026-11-24T13:59:19.123Z", "2026-11-24T13:59:19.12\u00b2Z"]]
    for texts in alike + [texts[::-1] for texts in alike]:
        alone, each = lt.Stamps(), lt.Stamps()
        for _ in range(2):
            assert each.iso_each(texts) == [alone.iso(text) for text in texts], texts
    at_once = 0
    for _ in range(3000):
        base = stamp()
        texts = list({base[:17] + rng.choice(["19", "00", "59", "07", "60", "5x"]
                                             if rng.random() < 0.1 else ["19", "00", "59", "07"])
                      + base[19:] if rng.random() < 0.9 else stamp()
                      for _ in range(rng.randrange(1, 20))})
        if rng.random() < 0.5:  # one of them as long, a character past the minute changed
            text = rng.choice(texts)
            at = min(len(text) - 1, rng.choice([16, 19, 20, len(text) - 2, len(text) - 1]))
            texts.append(text[:at] + rng.choice(":.,09Z+-\u00b2\u0663") + text[at + 1:])
        alone, each = lt.Stamps(), lt.Stamps()
        for _ in range(2):      # minutes first seen, then cached
            called = []
            iso = each.iso
            each.iso = lambda text: called.append(text) or iso(text)
            assert each.iso_each(texts) == [alone.iso(text) for text in texts], texts
            del each.iso
            at_once += not called
    assert at_once > 300


def test_json_objects_are_each_lines_own_object():
    """Read as one array or line by line, each line's object is the one it is alone; a
    chunk where a line is anything else gets None. The array's joins must not read as
    anything but the lines' ends: lines whose text runs into the next one's, or holds two
    objects, or ends the array early, are what the checks are for."""
    scan = json.JSONDecoder(parse_constant=lt.no_constant).scan_once     # NaN: no JSON to SQLite
    chunks = [['{"a": 1}', '{"b": "x", "c": [1, {"d": null}]}', '{}'],
              ['{"msg": "a},{b"}', '{"k": {"n": 1}, "m": [{}, {}]}'],   # "},{": line by line
              ['{"k": {"n": 1}, "m": 2}', '{"k": [{"n": {}},{}], "m": 3}'],
              ['{"a": [{}', '{}]}'], ['{"a": [{}', '{}]}', '{}, {}'],  # two lines one object
              ['{"a": [{}', '{}]}', '{},{}'], ['{"a": [{}', '{}]}', '{}\t ,\t{}'],
              ['{"a": "x}', '{"b": "y"}'],        # a string that runs on
              ['{"a": 1}]}'], ['{"a": 1}]', '[{"b": 2}'], ['{"a": 1}', '{"b": 2}]'],
              ['{"a": 1} ', '{"b": 2}'], [' {"a": 1}'], ['{"a": 1}', ''], ['[1]'],
              ['{"a": 1}{}'], ['{"a": NaN, "b": -0.0, "c": 1e400}'], ['{"a": 1', '}']]
    for lines in chunks:
        text = "".join(line + "\n" for line in lines)
        objs = lt.json_objects(text, lines)
        alone = []
        for line in lines:
            try:
                obj, end = scan(line, 0)
            except (StopIteration, ValueError):
                break
            if end != len(line) or type(obj) is not dict:
                break
            alone.append(obj)
        if len(alone) == len(lines):
            assert objs is not None and list(objs) == alone, lines
        else:
            assert objs is None, lines


def chunk_rows(columns) -> list:
    """json_chunk()'s columns as the Parsed of each line."""
    ts, host, program, pid, level, fields, messages, _ = columns
    return list(zip(ts, host, program, pid, level, fields or [None] * len(ts), messages))


def test_json_chunk_reads_lines_as_parse_json_does(stamps):
    rng = random.Random(8)
    usable = {"time": ["2026-11-24T13:59:19Z", 1795528759, "2026-11-24 13:59:19,5", None],
              "ts": [1795528759.25, "2026-11-24T13:59:19+01:00"],
              "level": ["info", "WARN", 30, "error"], "severity": [3, "debug"],
              "msg": ["text", "", "caf\u00e9 \u00e9", 'say "hi"', "a\\b"],
              "message": ["second"], "host": ["web-01", "", None], "hostname": ["h"],
              "program": ["nginx"], "app": ["api"], "pid": [1234, "77", None],
              "other": [1, "x", None, ["a"], {"k": 1}, True]}
    odd = [None, ["a"], {"k": 1}, True, 1.5, -1, "yesterday", 99, "1234567890"]
    shapes = [rng.sample(sorted(usable), rng.randrange(1, 7)) for _ in range(12)]
    fast = 0
    for _ in range(600):
        lines = []
        for _ in range(rng.randrange(1, 30)):
            keys = rng.choice(shapes[:rng.randrange(1, len(shapes))])
            obj = {key: rng.choice(odd if rng.random() < 0.01 else usable[key]) for key in keys}
            lines.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5))
        if rng.random() < 0.05:
            lines.insert(0, rng.choice(['{"a": 1} ', ' {"a": 1}', '[1]', 'not json',
                                        '{"a": "\\ud800"}', '{"a": 1}{}',
                                        '{"__REALTIME_TIMESTAMP": "1796211176655353"}']))
        text = "".join(line + "\n" for line in lines)
        columns = lt.json_chunk(text, lines, stamps)
        if columns is not None:
            fast += 1
            assert chunk_rows(columns) == [parse_json(line, stamps) for line in lines], text
    assert 100 < fast < 590
    for line in ['{"time": null, "ts": 1795528759, "msg": "x"}', '{"host": null, "hostname": "h"}',
                 '{"msg": null, "message": "m"}', '{"pid": null, "msg": "m"}']:
        columns = lt.json_chunk(line + "\n", [line], stamps)
        assert columns is None or chunk_rows(columns) == [parse_json(line, stamps)], line


@pytest.mark.parametrize("rows", [lt.SqliteRows, lt.PgRows(7)], ids=["sqlite", "pg"])
def test_json_chunk_makes_the_rows_line_by_line_parsing_makes(stamps, rows, monkeypatch):
    rng = random.Random(9)
    values = {"time": ["2026-11-24T13:59:19Z", 1795528759], "level": ["info", "WARN", 30],
              "msg": ["text", "", "caf\u00e9", 'say "hi"', "a\\b", "tab\there", "web-01"],
              "host": ["web-01", ""], "program": ["nginx", ""], "pid": [1234, None],
              "other": [1, "x"]}
    shapes = [["time", "level", "host", "msg", "program", "pid"], ["msg", "level"],
              ["level", "other", "msg"], ["time", "host"], ["pid", "time", "msg"]]

    def chunk() -> str:
        some = rng.sample(shapes, rng.randrange(1, 3))
        return "".join(json.dumps({key: rng.choice(values[key]) for key in rng.choice(some)},
                                  ensure_ascii=rng.random() < 0.5) + "\n"
                       for _ in range(rng.randrange(1, 30)))

    chunks = [chunk() for _ in range(400)]
    options = lt.ParseOptions("json", None, None, 1 << 20, 1000)
    fast = fed_rows(lt.EntryBuilder(1, options, stamps, rows), chunks)
    taken = []
    monkeypatch.setattr(lt, "json_chunk", lambda text, lines, stamps: taken.append(text))
    slow = fed_rows(lt.EntryBuilder(1, options, stamps, rows), chunks)
    assert len(taken) == len(chunks)
    monkeypatch.undo()
    if rows is lt.SqliteRows:   # a message read by key is stored so, else as one by one
        assert held(fast) == held(slow)
        assert read_back(fast) == read_back(slow)
        assert 0 < sum(len(row) == 9 for row in fast) < len(fast) - len(chunks)
    else:
        assert fast == slow
    by_columns = [columns for columns in (lt.json_chunk(text, text.splitlines(), stamps)
                                          for text in chunks)
                  if columns is not None and columns[5] is None]
    assert len(by_columns) > 100     # many chunks without fields: rows made column by column


def test_messages_read_by_key_are_the_messages_parsed(stamps):
    """The entries view reads a JSON line's message by its key in raw with SQLite's JSON
    functions, Python parsed it: wherever json_chunk() says they agree (keyed), they do,
    whatever the keys' spelling, their order, a null, a key twice or a value spelled as
    one; and they do for most plain lines."""
    rng = random.Random(21)
    texts = ["text", "", "caf\u00e9 \U0001f642", 'say "hi"', "a\\b", "tab\there", "cr\r lf\n",
             "\b\f", "sl/ash", "msg", "message", "}, {", "\u2028"]
    keys = ["msg", "message", "event", "time", "level", "host", "program", "pid"]
    odd = ["NaN", "Infinity", "-Infinity", "1e400"]    # Python's JSON, the first not SQLite's
    values = {"time": ['"2026-11-24T13:59:19Z"', "1795528759"], "level": ['"info"', "30"],
              "host": ['"web-01"', '"msg"', '"event"', "null"], "program": ['"x"', '"message"'],
              "pid": ["1234", "null"]}
    spellings = {"msg": ['"msg"', '"m\\u0073g"'], "message": ['"message"'], "event": ['"event"']}

    def line() -> str:
        chosen = rng.sample(keys, rng.randrange(1, 6))
        if rng.random() < 0.05:
            chosen.append(rng.choice(chosen))   # a key twice
        pairs = []
        for key in chosen:
            if key in spellings:
                name = rng.choice(spellings[key]) if rng.random() < 0.05 else spellings[key][0]
                value = (json.dumps(rng.choice(texts), ensure_ascii=rng.random() < 0.2)
                         if rng.random() < 0.9 else "null")
            else:
                name = json.dumps(key)
                value = rng.choice(odd if rng.random() < 0.03 else values[key])
            pairs.append(f"{name}{rng.choice([': ', ':'])}{value}")
        return "{" + rng.choice([", ", ","]).join(pairs) + "}"

    keyed = unkeyed = 0
    for _ in range(1500):
        shapes = [line() for _ in range(rng.randrange(1, 4))]
        lines = [line() if rng.random() < 0.3 else rng.choice(shapes)
                 for _ in range(rng.randrange(1, 12))]
        columns = lt.json_chunk("".join(line + "\n" for line in lines), lines, stamps)
        if columns is None:
            continue
        made = lt.SqliteRows.json_lines(1, list(range(len(lines))), lines, *columns)
        messages = [row[-2:] for row in read_back(made)]
        assert messages == [(parse_json(line, stamps)[6], "text") for line in lines], lines
        keyed += columns[7]
        unkeyed += not columns[7] and columns[5] is None
    assert keyed > 120 and unkeyed > 150
    for line, expected in [('{"msg": "a"}', True), ('{"level": "info", "message": "a"}', True),
                           ('{"event": null, "level": "info"}', True), ('{"level": "info"}', False),
                           ('{"msg": "a", "msg": "b"}', False), ('{"m\\u0073g": "a"}', False),
                           ('{"msg": "a", "host": "msg"}', False), ('{"msg": "\\u00e9"}', False),
                           ('{"msg": "a", "other": 1}', False)]:
        columns = lt.json_chunk(line + "\n", [line], stamps)
        assert columns[7] is expected, line


def test_the_view_reads_message_keys_in_their_order_and_never_fails_a_query():
    read = re.findall(r"json_extract\(raw, '\$\.(\w+)'\)", lt.MESSAGE_SQL.format(""))
    assert read == list(lt.MESSAGE_KEYS)
    conn = sqlite3.connect(":memory:")
    conn.executescript(lt.SCHEMA)
    read = [('{"event": "e", "message": "m", "msg": "x"}', "x"),
            ('{"event": "e", "message": "m"}', "m"), ('{"msg": null, "event": "e"}', "e"),
            ('{"level": 1}', '{"level": 1}'),
            ('{"msg": NaN}', '{"msg": NaN}'), ("not JSON", "not JSON")]   # not from the tailer
    conn.executemany("INSERT INTO entry_rows (file_id, offset, raw, msg_at) VALUES (1, 0, ?, 0)",
                     [(raw,) for raw, _ in read])
    assert conn.execute("SELECT raw, message FROM entries ORDER BY id").fetchall() == read


def test_an_sqlite_without_json_functions_is_refused_with_why(tmp_path, monkeypatch):
    monkeypatch.setattr(lt, "JSON_PROBE", "SELECT no_such_function('{}')")
    with pytest.raises(lt.Fatal, match=r"without its JSON functions \(no such function: "
                                       r"no_such_function\); logtail2db needs them"):
        lt.SqliteStore.open(str(tmp_path / "app.db"))
    assert not (tmp_path / "app.db").exists()


@pytest.mark.parametrize("rows", [lt.SqliteRows, lt.PgRows(7)], ids=["sqlite", "pg"])
def test_a_json_chunks_batch_stores_what_its_rows_store(stamps, rows, monkeypatch):
    rng = random.Random(15)
    messages = ["text", "", "caf\u00e9", 'say "hi"', "ends in web-01", "web-01"]

    def line(odd: bool, escaped: bool) -> str:
        obj = {"time": "2026-11-24T13:59:19Z", "level": rng.choice(["info", "WARN"]),
               "host": rng.choice(["web-01", "", "caf\u00e9"]), "pid": rng.choice([1234, None]),
               "msg": rng.choice(messages)}
        if odd and rng.random() < 0.05:
            obj["other"] = 1    # fields: rows made one by one
        if escaped and rng.random() < 0.9:
            obj["msg"] = "text"     # "caf\\u00e9": not in its line; "\\u": not read by key
        return json.dumps(obj, ensure_ascii=escaped) + "\n"

    options = lt.ParseOptions("json", None, None, 1 << 20, 1000)
    columnar = []
    json_batch = rows.json_batch
    monkeypatch.setattr(rows, "json_batch", lambda *args: columnar.append(json_batch(*args))
                        or columnar[-1])
    offset = 0
    for count in [1, 7, 99, 100, 101, 200, 250, 333, 1000, *rng.sample(range(1, 700), 30)]:
        odd, escaped = rng.random() < 0.2, rng.random() < 0.3
        data = "".join(line(odd, escaped) for _ in range(count)).encode()
        made = lt.EntryBuilder(1, options, stamps, rows).feed_batch(data, offset)
        one_by_one = rows.batch(lt.EntryBuilder(1, options, stamps, rows).feed(data, offset))
        if rows is lt.SqliteRows:
            assert batch_rows(made) == batch_rows(one_by_one)
        else:
            assert made == one_by_one
        assert made[0] == count
        offset += len(data)
    made = [batch for batch in columnar if batch is not None]
    if rows is lt.SqliteRows:   # most chunks went from columns to their batch, of every count
        assert len(made) > 20 and {0, 1} <= {batch[0] % 100 for batch in made}
        assert min(batch[0] for batch in made) < lt.ROWS_PER_INSERT
        assert {lt.KEYED, 10} <= {batch[1] for batch in made}     # read by key or found
    else:
        assert not made         # COPY text is made of the rows


def copy_fields(data: bytes) -> list:
    """COPY text format read back: rows of fields, None for NULL (the server's reading)."""
    unescape = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    assert data.endswith(b"\n")
    return [[None if field == "\\N" else re.sub(r"\\(.)", lambda m: unescape[m[1]], field)
             for field in line.split("\t")] for line in data.decode().split("\n")[:-1]]


@pytest.mark.parametrize("width", [4, 6, 10, 14])    # COPY_ROW's shapes, and another
@pytest.mark.parametrize("special", [[], ["c:\\N", "\\", "\\x41"], ["cr\r"],
                                     ["a\tb", "two\nlines", "c:\\N", "cr\r"]])
def test_copy_data_is_what_the_rows_hold(special, width):
    rng = random.Random(11)
    texts = ["plain", "caf\u00e9", "", "None", "N", *special]
    values = [[lt.PG_NULL, 3, "2026-11-24 13:59:19"], texts,
              [lt.PG_NULL, "\\x00ff" if special else "x"], texts]
    rows = [(7, n, *[rng.choice(values[at % 4]) for at in range(width - 2)]) for n in range(300)]
    expected = [[None if value == lt.PG_NULL else str(value) for value in row] for row in rows]
    assert copy_fields(lt.copy_data(rows)) == expected


# PostgreSQL: a fleet of hosts into one server #################################
#
# One server per test session, started here (initdb into a temporary directory, as an
# unprivileged user when run as root, a unix socket only, fsync off); one database per
# test. Without the server binaries or a driver these tests fail: they never skip.
#
# The tailer runs with one driver: psycopg 3, unless a test is parametrized over all three
# (pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)) or LOGTAIL2DB_TEST_PG_DRIVER
# names another for every test (LOGTAIL2DB_TEST_PG_DRIVER=pg8000 python -m pytest -k pg).
# The drivers before it in logtail2db's order are hidden from the tailer's interpreter by
# modules of their names, first on its PYTHONPATH, that fail to import.

PG_PASSWORD = "s3cr3t-Pa55word"
PG_DRIVERS = ("psycopg", "psycopg2", "pg8000")
PG_DRIVER = os.environ.get("LOGTAIL2DB_TEST_PG_DRIVER", "psycopg")
DRIVER_NAMES = {"psycopg": "psycopg 3", "psycopg2": "psycopg2", "pg8000": "pg8000"}


@pytest.fixture(scope="session")
def driver_commands(tmp_path_factory):
    """{driver: the tailer's command, with only that driver of the three to import}."""
    commands = {}
    for at, driver in enumerate(PG_DRIVERS):
        try:
            __import__(driver)
        except ImportError:
            commands[driver] = None     # pg fails the tests that ask for it
            continue
        hidden = tmp_path_factory.mktemp(f"without-{driver}")
        for other in PG_DRIVERS[:at]:
            (hidden / f"{other}.py").write_text(
                f"raise ImportError('{other} is hidden from this test run')\n")
        path = os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")]))
        commands[driver] = ["env", f"PYTHONPATH={path}", sys.executable, TOOL]
    return commands


def find_pg_bin():
    """The directory of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    return versions[-1].parent if versions else None


class PgServer:
    """A PostgreSQL server of our own: data and socket in a temporary directory."""

    def __init__(self):
        import tempfile
        self.bin = find_pg_bin()
        if self.bin is None:
            raise RuntimeError("no initdb on PATH or in /usr/lib/postgresql/*/bin: install "
                               "postgresql (see .ci/run)")
        self.base = Path(tempfile.mkdtemp(prefix="logtail2db-pg-"))
        self.data, self.socket_dir = self.base / "data", self.base / "sock"
        self.socket_dir.mkdir()
        self.as_user = []
        if os.getuid() == 0:    # initdb refuses root: the server runs as an unprivileged user
            import pwd
            user = next(name for name in ("postgres", "nobody") if _has_user(name))
            entry = pwd.getpwnam(user)
            for path in (self.base, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self.as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                            "--clear-groups"]
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-locale", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"fsync = off\nlisten_addresses = ''\nunix_socket_directories = "
                       f"'{self.socket_dir}'\nmax_connections = 100\nfull_page_writes = off\n"
                       "synchronous_commit = off\nshared_buffers = 64MB\n")
        hba = self.data / "pg_hba.conf"
        hba.write_text("local all pwuser scram-sha-256\nlocal all all trust\n")
        self.start()
        self.sql("postgres", f"CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'")

    def run(self, program, *args, check=True):
        return subprocess.run([*self.as_user, str(self.bin / program), *args],
                              capture_output=True, timeout=120, check=check,
                              cwd=self.base)

    def start(self):
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w",
                 "-t", "60", "start")

    def stop(self, mode="fast"):
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self):
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"),
                 "-m", "fast", "-w", "-t", "60", "restart")

    def url(self, dbname, user="postgres"):
        return f"postgresql:///{dbname}?host={self.socket_dir}&user={user}"

    def connect(self, dbname="postgres"):
        import psycopg
        return psycopg.connect(host=str(self.socket_dir), dbname=dbname, user="postgres",
                               autocommit=True)

    def sql(self, dbname, sql, params=None):
        with self.connect(dbname) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def close(self):
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def _has_user(name):
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def pg_server():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail('psycopg is not importable: pip install "psycopg[binary]" (see README)')
    try:
        server = PgServer()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.fail(f"cannot start a PostgreSQL server: {exc} {detail.decode(errors='replace')}")
    yield server
    server.close()


@pytest.fixture
def pg(pg_server, driver_commands, request):
    """A database of its own for this test; its URL is pg.url, pg.command runs the tailer
    with the driver asked for (the fixture's parameter, else PG_DRIVER)."""
    driver = getattr(request, "param", PG_DRIVER)
    if driver_commands.get(driver) is None:
        pytest.fail(f"{driver} is not importable: pip install psycopg[binary] psycopg2-binary "
                    "pg8000 (see README)")
    test = re.sub(r"[^a-z0-9]+", "_", request.node.originalname.lower())
    name = f"t_{driver}_{test}"[:63]
    pg_server.sql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg_server.sql("postgres", f'CREATE DATABASE "{name}"')
    return PgDatabase(pg_server, name, driver, driver_commands[driver])


class PgDatabase:
    def __init__(self, server, name, driver, command):
        self.server, self.name = server, name
        self.url = server.url(name)
        self.driver, self.command = driver, command
        self.through = f"through {DRIVER_NAMES[driver]}"    # as the tailer says it connected

    def query(self, sql, params=None):
        try:
            return self.server.sql(self.name, sql, params)
        except Exception as exc:    # the tailer has not created the schema yet
            if "does not exist" in str(exc):
                return []
            raise

    def raws(self, host=None):
        """Every entry's exact bytes (of one host), in the order stored."""
        where, params = ("WHERE host = %s", (host,)) if host else ("", None)
        return [bytes(row[0]) for row in self.query(
            f"SELECT raw_bytes FROM logs {where} ORDER BY id", params)]


def pg_daemon(pg, directory, tmp_path, *args, host="host-a", ready=True, url=None):
    """The tailer of one host into pg's database, as a subprocess."""
    stderr = tmp_path / f"stderr-{host}-{time.monotonic_ns()}"
    daemon = Daemon(pg.command, directory, url or pg.url, stderr, ("--host-name", host, *args))
    if ready:
        daemon.wait_ready()
        assert pg.through in daemon.stderr, daemon.stderr
    return daemon


@pytest.fixture
def pg_daemons(pg, tmp_path):
    """Start tailers (pg_daemons(directory, *args, host=...)); all are stopped at the end."""
    started = []

    def start(directory, *args, **kwargs):
        daemon = pg_daemon(pg, directory, tmp_path, *args, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def pg_once(pg, directory, *args, host="host-a", url=None):
    result = run_once("--host-name", host, *args, directory, url or pg.url, command=pg.command)
    if result.returncode == 0:
        assert pg.through.encode() in result.stderr, result.stderr
    return result


def pg_offsets_and_raws(pg, host="host-a"):
    return [(row[0], bytes(row[1])) for row in pg.query(
        'SELECT "offset", raw_bytes FROM logs WHERE host = %s ORDER BY file_id, "offset", part',
        (host,))]


def sqlite_offsets_and_raws(db):
    return query(db, "SELECT offset, CAST(raw AS BLOB) FROM entries ORDER BY file_id, offset, "
                     "part")


class SilentProxy:
    """A TCP port in front of the test server's unix socket, forwarding both ways until
    silence(): then it reads and forwards nothing more and closes nothing, as a network
    that drops packets looks to the tailer (connections it accepts then are held only).
    pending() counts the bytes either side sent since, that the other did not get: above 0,
    a call waits on the server. close() closes every socket: the server ends the sessions."""

    def __init__(self, socket_dir):
        import socket
        self.target = str(Path(socket_dir) / ".s.PGSQL.5432")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.silent, self.closed = threading.Event(), threading.Event()
        self.wake_r, self.wake_w = os.pipe()    # written on silence() and close(), never read
        self.threads = [threading.Thread(target=self.accept)]
        self.threads[0].start()

    def accept(self):
        import socket
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return      # closed
            self.sockets.append(client)
            if self.silent.is_set():
                continue
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            self.sockets.append(server)
            for source, sink in ((client, server), (server, client)):
                self.threads.append(threading.Thread(target=self.pump, args=(source, sink)))
                self.threads[-1].start()

    def pump(self, source, sink):
        while True:
            ready = select.select([source, self.wake_r], [], [])[0]
            if self.wake_r in ready:
                self.closed.wait()  # silent: nothing more goes through, until closed
                return
            try:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(2)
                    return
                sink.sendall(data)
            except OSError:
                return      # the other side went

    def silence(self):
        self.silent.set()
        os.write(self.wake_w, b"x")

    def pending(self) -> int:
        import fcntl
        import termios
        total = 0
        for sock in list(self.sockets):
            try:
                waiting = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4))
            except OSError:
                continue    # closed meanwhile
            total += int.from_bytes(waiting, sys.byteorder)
        return total

    def close(self):
        if self.closed.is_set():
            return
        self.closed.set()
        os.write(self.wake_w, b"x")
        self.listener.shutdown(2)   # accept() returns
        self.listener.close()
        for thread in self.threads:
            thread.join(5)
        for sock in self.sockets:
            sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def logtail2db_sessions(pg) -> int:
    return pg.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'logtail2db'"
                    " AND datname = %s", (pg.name,))[0][0]


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_three_hosts_into_one_server_exactly_once(pg, pg_daemons, tmp_path):
    dirs = {}
    for host in ("web-1", "web-2", "db-1"):
        dirs[host] = tmp_path / host
        dirs[host].mkdir()
        append(dirs[host] / "app.log", numbered(0, 500, host.encode()))
    for host, directory in dirs.items():
        pg_daemons(directory, host=host)
    for host, directory in dirs.items():
        append(directory / "app.log", numbered(500, 1000, host.encode()))
    for host in dirs:
        expected = numbered(0, 1000, host.encode()).splitlines()
        wait_for(lambda: pg.raws(host) == expected, 30, f"{host}'s lines",
                 lambda: len(pg.raws(host)))
    assert pg.query("SELECT name FROM hosts ORDER BY name") == [("db-1",), ("web-1",), ("web-2",)]
    assert pg.query("SELECT count(*), count(DISTINCT (host, path, \"offset\")) FROM logs") == \
        [(3000, 3000)]


def test_pg_entries_and_offsets_match_sqlite(pg, logdir, db):
    append(logdir / "sys.log", syslog_backlog(3000))
    append(logdir / "app.json", b'{"level": "info", "msg": "a quoted message", "pid": 7}\n'
           b'{"msg": "say \\"hi\\"", "x": 1}\n')
    assert pg_once(pg, logdir).returncode == 0
    assert run_once(logdir, db).returncode == 0
    assert pg_offsets_and_raws(pg) == sqlite_offsets_and_raws(db)
    messages = "SELECT message FROM logs WHERE path LIKE '%app.json' ORDER BY id"
    assert pg.query(messages) == [("a quoted message",), ('say "hi"',)]
    assert [tuple(row) for row in query(db, messages)] == pg.query(messages)
    assert pg.query("SELECT count(*) FROM logs WHERE level IS NOT NULL OR program IS NOT NULL") \
        == query(db, "SELECT count(*) FROM entries WHERE level IS NOT NULL OR program IS NOT NULL")
    assert pg.query("SELECT ts FROM logs WHERE ts IS NOT NULL LIMIT 1")[0][0].utcoffset() \
        is not None


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_kill_9_at_random_moments_of_a_catch_up_exactly_once(pg, logdir, db, tmp_path):
    append(logdir / "sys.log", syslog_backlog(200_000, seed=7))
    append(logdir / "plain.log", numbered(0, 100_000))
    assert run_once(logdir, db).returncode == 0
    rng = random.Random(13)
    for attempt in range(4):
        daemon = pg_daemon(pg, logdir, tmp_path, ready=False)
        before = pg.query("SELECT count(*) FROM entries")
        count = before[0][0] if before else 0
        wait_for(lambda: (pg.query("SELECT count(*) FROM entries") or [(0,)])[0][0] > count
                 or daemon.proc.poll() is not None, 60, "some entries stored",
                 lambda: daemon.stderr)
        time.sleep(rng.random() * 0.3)  # a random moment of the catch-up, not a wait
        daemon.kill()
        for pid in children_of(daemon.proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert pg_once(pg, logdir).returncode == 0
    expected = sqlite_offsets_and_raws(db)
    got = pg_offsets_and_raws(pg)
    assert len(got) == len(expected)
    assert got == expected


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_connections_cut_during_a_catch_up_lose_and_double_nothing(pg, logdir, db, tmp_path):
    """pg_terminate_backend() at random moments: COMMITs cut short, their outcome unknown
    to the tailer until it reads the offsets back."""
    append(logdir / "sys.log", syslog_backlog(300_000, seed=3))
    append(logdir / "plain.log", numbered(0, 300_000))
    assert run_once(logdir, db).returncode == 0
    expected = sqlite_offsets_and_raws(db)
    daemon = pg_daemon(pg, logdir, tmp_path, "-v", ready=False)
    rng = random.Random(5)
    cuts = 0

    def stored():
        return (pg.query("SELECT count(*) FROM entries") or [(0,)])[0][0]

    wait_for(lambda: stored() > 0, 60, "the first entries", lambda: daemon.stderr[-2000:])
    for _ in range(10):
        if stored() >= len(expected):
            break
        assert daemon.proc.poll() is None, daemon.stderr[-2000:]
        time.sleep(0.05 + rng.random() * 0.3)   # a random moment of the catch-up, not a wait
        cuts += len(pg.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name = 'logtail2db'"))
    wait_for(lambda: stored() >= len(expected), 60, "the catch-up to end",
             lambda: daemon.stderr[-2000:])
    wait_for(lambda: "watching" in daemon.stderr, 30, "the tailer to watch")
    assert daemon.terminate() == 0
    assert cuts >= 3
    assert "connected to" in daemon.stderr
    assert pg_offsets_and_raws(pg) == expected


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_server_restarted_while_lines_keep_coming(pg, pg_daemons, logdir):
    log = logdir / "app.log"
    daemon = pg_daemons(logdir)
    stop = threading.Event()

    def write():
        n = 0
        while not stop.is_set() and n < 3000:
            append(log, numbered(n, n + 10))
            n += 10
            stop.wait(0.005)
        written.append(n)

    written = []
    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_for(lambda: len(pg.raws()) > 200, 30, "lines stored before the restart")
        pg.server.restart()
        wait_for(lambda: not writer.is_alive(), 60, "the writer to finish")
    finally:
        stop.set()
        writer.join()
    expected = numbered(0, written[0]).splitlines()
    wait_for(lambda: pg.raws() == expected, 60, "every line once",
             lambda: (len(pg.raws()), daemon.stderr[-1500:]))
    assert "connected to" in daemon.stderr


def test_pg_sigterm_while_the_server_is_down_exits_4_within_2_s(pg, pg_daemons, logdir):
    append(logdir / "app.log", b"before\n")
    daemon = pg_daemons(logdir)
    wait_for(lambda: pg.raws() == [b"before"], 20, "the first line")
    pg.server.stop()
    try:
        append(logdir / "app.log", b"while down\n")
        wait_for(lambda: "cannot store entries" in daemon.stderr, 20, "the failure noticed",
                 lambda: daemon.stderr)
        started = time.monotonic()
        assert daemon.terminate() == lt.EXIT_UNSTORED
        assert time.monotonic() - started < 2
        assert "read again on the next start" in daemon.stderr
    finally:
        pg.server.start()
    assert pg_once(pg, logdir).returncode == 0
    assert pg.raws() == [b"before", b"while down"]


@pytest.fixture
def silent_proxy(pg):
    proxy = SilentProxy(pg.server.socket_dir)
    yield proxy
    proxy.close()


def stop_waiting_on(proxy, daemon):
    """SIGTERM once the tailer waits on the silent proxy: it exits 4 within 2 s."""
    wait_for(lambda: proxy.pending() > 0, 10, "the tailer to wait on the server",
             lambda: daemon.stderr)
    started = time.monotonic()
    status = daemon.terminate(timeout=10)
    elapsed = time.monotonic() - started
    assert status == lt.EXIT_UNSTORED, daemon.stderr
    assert elapsed < 2, (elapsed, daemon.stderr)
    proxy.close()


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_sigterm_while_a_call_waits_on_a_silent_network_exits_4_within_2_s(
        pg, pg_daemons, silent_proxy, logdir):
    """The network goes silent during a catch-up (nothing answered, nothing closed): SIGTERM
    cuts the waiting call short; the next start stores every line once."""
    lines = numbered(0, 100_000)
    append(logdir / "app.log", lines)
    url = f"postgresql://postgres@127.0.0.1:{silent_proxy.port}/{pg.name}"
    daemon = pg_daemons(logdir, ready=False, url=url)
    wait_for(lambda: (pg.query("SELECT count(*) FROM entries") or [(0,)])[0][0] > 0, 30,
             "the first entries", lambda: daemon.stderr)
    silent_proxy.silence()
    append(logdir / "app.log", b"written while silent\n")
    stop_waiting_on(silent_proxy, daemon)
    assert "connection cut" in daemon.stderr, daemon.stderr
    assert "read again on the next start" in daemon.stderr
    wait_for(lambda: logtail2db_sessions(pg) == 0, 10, "the server to end the session")
    assert pg_once(pg, logdir).returncode == 0
    assert pg.raws() == (lines + b"written while silent\n").splitlines()


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_sigterm_while_connecting_to_a_silent_server_exits_4_within_2_s(
        pg, pg_daemons, silent_proxy, logdir):
    append(logdir / "app.log", b"one\n")
    silent_proxy.silence()
    url = f"postgresql://postgres@127.0.0.1:{silent_proxy.port}/{pg.name}"
    daemon = pg_daemons(logdir, ready=False, url=url)
    stop_waiting_on(silent_proxy, daemon)
    assert "on the next start" in daemon.stderr, daemon.stderr
    assert pg_once(pg, logdir).returncode == 0
    assert pg.raws() == [b"one"]


def test_pg_server_down_at_start_is_waited_for(pg, tmp_path, logdir):
    append(logdir / "app.log", b"one\n")
    pg.server.stop()
    try:
        daemon = pg_daemon(pg, logdir, tmp_path, ready=False)
        wait_for(lambda: "cannot store entries" in daemon.stderr, 20, "the server missed",
                 lambda: daemon.stderr)
        assert daemon.proc.poll() is None
    finally:
        pg.server.start()
    try:
        wait_for(lambda: pg.raws() == [b"one"], 30, "the line stored once it is up",
                 lambda: daemon.stderr)
    finally:
        daemon.stop()


def test_pg_sigterm_while_waiting_for_the_server_at_start_exits_4(pg, tmp_path, logdir):
    append(logdir / "app.log", b"one\n")
    url = pg.server.url(pg.name).replace(str(pg.server.socket_dir), str(tmp_path / "no-server"))
    daemon = Daemon(pg.command, logdir, url, tmp_path / "stderr", ())
    wait_for(lambda: "cannot store entries" in daemon.stderr, 20, "the server missed",
             lambda: daemon.stderr)
    started = time.monotonic()
    assert daemon.terminate() == lt.EXIT_UNSTORED
    assert time.monotonic() - started < 2
    assert "next start" in daemon.stderr


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_second_tailer_for_the_same_host_exits_1(pg, pg_daemons, logdir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    pg_daemons(logdir, host="web-1")
    result = pg_once(pg, other, host="web-1")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "already tailed" in lines[0] and "web-1" in lines[0], lines
    assert pg_once(pg, other, host="web-2").returncode == 0


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_invalid_utf8_and_nul_round_trip_through_raw_bytes(pg, logdir):
    data = [b"bad \xff\xfe byte", b"nul \x00 inside", b"caf\xc3\xa9 fine", b"\x00",
            b"<13>Nov 24 13:59:19 host app[1]: nul \x00 and bad \xc3 in syslog",
            b'{"msg": "json \\u0000 nul", "level": "info", "k": "\\u0000"} \xff']
    append(logdir / "odd.log", b"\n".join(data) + b"\n")
    result = pg_once(pg, logdir, "--format", "plain")
    assert result.returncode == 0, result.stderr
    append(logdir / "sys.log", data[4] + b"\n")
    assert pg_once(pg, logdir).returncode == 0
    assert pg.raws() == data + [data[4]]
    rows = pg.query("SELECT raw, message FROM logs ORDER BY id")
    assert rows[0] == ("bad \ufffd\ufffd byte", "bad \ufffd\ufffd byte")
    assert rows[1][0] == "nul \ufffd inside"
    assert rows[2] == ("café fine", "café fine")


def test_pg_keep_drops_a_day(pg, logdir):
    append(logdir / "app.log", b"first\n")
    assert pg_once(pg, logdir).returncode == 0
    pg.query("CREATE TABLE entries_20200101 PARTITION OF entries"
             " FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00')")
    pg.query("INSERT INTO entries (host_id, file_id, \"offset\", raw, stored)"
             " SELECT host_id, file_id, \"offset\" + 1000, 'old ' || raw, t FROM entries,"
             " (VALUES ('2020-01-01 10:00+00'::timestamptz), ('2020-01-05 10:00+00')) AS v(t)")
    assert len(pg.query("SELECT * FROM entries")) == 3
    append(logdir / "app.log", b"second\n")
    result = pg_once(pg, logdir, "--keep", "2d")
    assert result.returncode == 0, result.stderr
    assert pg.raws() == [b"first", b"second"]
    assert pg.query("SELECT to_regclass('entries_20200101')") == [(None,)]
    assert b"deleted 2 entries" in result.stderr


def test_pg_fts_builds_a_trigram_index(pg, logdir):
    append(logdir / "app.log", b"connection timeout to db\nall good\n")
    assert pg_once(pg, logdir, "--fts").returncode == 0
    assert pg.query("SELECT indexname FROM pg_indexes WHERE tablename = 'entries'") == \
        [("entries_message_trgm",)]
    assert pg.query("SELECT message FROM logs WHERE message ILIKE '%timeout%'") == \
        [("connection timeout to db",)]


def test_pg_driver_missing_is_one_line(pg, logdir):
    result = run_once(logdir, pg.url, command=[sys.executable, "-S", TOOL])
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "apt-get install python3-psycopg" in lines[0]
    assert 'pip install "psycopg[binary]"' in lines[0]


def test_pg_pg8000_too_old_is_one_line(pg, logdir, tmp_path):
    hidden = tmp_path / "old-pg8000"
    hidden.mkdir()
    for name in ("psycopg", "psycopg2"):
        (hidden / f"{name}.py").write_text("raise ImportError('hidden')\n")
    (hidden / "pg8000.py").write_text("__version__ = '1.10.6'\n")     # Debian 12's
    result = run_once(logdir, pg.url, command=["env", f"PYTHONPATH={hidden}", sys.executable,
                                               TOOL])
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert "pg8000 1.10.6 is too old" in lines[0] and "1.31 or newer" in lines[0]


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_password_never_shows(pg, logdir, tmp_path):
    append(logdir / "app.log", b"one\n")
    socket_dir = pg.server.socket_dir
    right = f"postgresql://pwuser:{PG_PASSWORD}@/{pg.name}?host={socket_dir}"
    wrong = f"postgresql://pwuser:{PG_PASSWORD}x@/{pg.name}?host={socket_dir}"
    in_query = f"postgresql:///{pg.name}?host={socket_dir}&user=pwuser&password={PG_PASSWORD}y"
    for url, status in ((wrong, 1), (in_query, 1), (right, 0)):
        result = pg_once(pg, logdir, "-v", host="h", url=url)
        assert result.returncode == status, result.stderr
        assert PG_PASSWORD.encode() not in result.stderr
        stats = subprocess.run([*pg.command, "--stats", "--host-name", "h", url],
                               capture_output=True, timeout=60)
        assert PG_PASSWORD.encode() not in stats.stdout + stats.stderr
    assert b"password authentication failed" in pg_once(pg, logdir, url=wrong).stderr


@pytest.mark.parametrize("pg", PG_DRIVERS, indirect=True)
def test_pg_permanent_faults_exit_1_with_one_line(pg, pg_server, logdir):
    def fault_lines(result) -> list:
        """The lines of a permanent fault, after any of a fault that passed (a server short
        of connections while the suite loads it), which is retried."""
        lines = result.stderr.decode().splitlines()
        return [line for line in lines if not line.endswith("retrying until it works")]

    missing = pg_server.url("no_such_database")
    result = pg_once(pg, logdir, url=missing)
    assert result.returncode == 1, result.stderr
    lines = fault_lines(result)
    assert len(lines) == 1 and "does not exist" in lines[0], result.stderr
    pg.query("CREATE TABLE files (x int)")
    result = pg_once(pg, logdir)
    assert result.returncode == 1, result.stderr
    lines = fault_lines(result)
    assert len(lines) == 1 and "another program" in lines[0], result.stderr
    assert pg.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == \
        [("files",)]


def test_pg_stats_shows_this_hosts_lag_and_every_host(pg, logdir, tmp_path):
    append(logdir / "app.log", b"a\nb\n")
    assert pg_once(pg, logdir, host="web-1").returncode == 0
    assert pg_once(pg, logdir, host="web-2").returncode == 0
    append(logdir / "app.log", b"c\n")
    result = subprocess.run([*pg.command, "--stats", "--max-lag", "1", "--host-name",
                             "web-1", pg.url], capture_output=True, timeout=60)
    out = result.stdout.decode()
    assert result.returncode == 3, result.stderr
    assert re.search(r"app\.log +6 B +4 B +2 B", out), out
    assert re.search(r"^web-1 +2 ", out, re.M) and re.search(r"^web-2 +2 ", out, re.M), out


def test_pg_schema_is_versioned(pg, logdir):
    assert pg_once(pg, logdir).returncode == 0
    assert pg.query("SELECT key, value FROM meta ORDER BY key") == \
        [("program", "logtail2db"), ("schema_version", str(lt.PG_SCHEMA_VERSION))]
    pg.query("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    result = pg_once(pg, logdir)
    assert result.returncode == 1 and b"newer" in result.stderr


def test_pg_url_password_is_scrubbed():
    assert lt.pg_url_parts("postgresql://u:p%40ss@db:5432/logs?sslmode=require") == \
        ("postgresql://u@db:5432/logs?sslmode=require", "p%40ss")
    assert lt.pg_url_parts("postgres:///logs?host=/run/pg&password=x&user=u") == \
        ("postgres:///logs?host=/run/pg&user=u", "x")


@pytest.mark.parametrize("pg", ["pg8000"], indirect=True)
def test_pg_pg8000_takes_urls_password_files_and_the_environment_as_libpq_does(pg, logdir,
                                                                              tmp_path):
    import urllib.parse
    socket_dir = str(pg.server.socket_dir)
    proxy = SilentProxy(socket_dir)     # a TCP port, forwarding
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"# host:port:database:user:password\n"
                        f"127.0.0.1:{proxy.port}:{pg.name}:pwuser:{PG_PASSWORD}\n")
    passfile.chmod(0o600)
    on_socket = f"postgresql://postgres@{urllib.parse.quote(socket_dir, safe='')}/{pg.name}"
    over_tcp = f"postgresql://pwuser:{PG_PASSWORD}@127.0.0.1:{proxy.port}/{pg.name}"
    from_file = f"postgresql://pwuser@127.0.0.1:{proxy.port}/{pg.name}"
    cases = [(on_socket, {}), (over_tcp, {}), (from_file, {"PGPASSFILE": passfile}),
             ("postgresql://", {"PGHOST": socket_dir, "PGUSER": "postgres",
                                "PGDATABASE": pg.name})]
    try:
        for n, (url, env) in enumerate(cases):
            append(logdir / "app.log", b"line %d\n" % n)
            command = ["env", *(f"{key}={value}" for key, value in env.items()), *pg.command]
            result = run_once(logdir, url, command=command)
            assert result.returncode == 0, (url, result.stderr)
            assert pg.through.encode() in result.stderr
        passfile.chmod(0o644)     # libpq ignores a password file others may read; so do we
        result = run_once(logdir, from_file, command=["env", f"PGPASSFILE={passfile}",
                                                      *pg.command])
        assert result.returncode == 1
        assert b"group or world access" in result.stderr and b"password" in result.stderr
    finally:
        proxy.close()
    assert pg.raws() == [b"line %d" % n for n in range(len(cases))]
    result = run_once(logdir, pg.url + "&target_session_attrs=any", command=pg.command)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "target_session_attrs=" in lines[0]


@pytest.mark.parametrize("url,env,expected", [
    ("postgresql://u:p%40ss@db.example.com:6432/logs?sslmode=require", {},
     {"user": "u", "password": "p@ss", "host": "db.example.com", "port": "6432",
      "dbname": "logs", "sslmode": "require"}),
    ("postgres:///logs?host=/run/pg&user=u", {},
     {"host": "/run/pg", "port": "5432", "dbname": "logs", "user": "u"}),
    ("postgresql://u@%2Frun%2FPG/logs", {},
     {"host": "/run/PG", "port": "5432", "dbname": "logs", "user": "u"}),
    ("postgresql://u@[::1]:5433/logs", {}, {"host": "::1", "port": "5433", "dbname": "logs",
                                            "user": "u"}),
    ("postgresql://u@db/logs?port=7000&dbname=other", {},
     {"host": "db", "port": "7000", "dbname": "other", "user": "u"}),
    ("postgresql://", {"PGHOST": "/sock", "PGUSER": "e", "PGDATABASE": "d", "PGPASSWORD": "pw",
                       "PGCONNECT_TIMEOUT": "9"},
     {"host": "/sock", "port": "5432", "dbname": "d", "user": "e", "password": "pw",
      "connect_timeout": "9"}),
    ("postgresql://u@db/logs", {"PGUSER": "e", "PGDATABASE": "d", "PGPORT": "1"},
     {"host": "db", "port": "1", "dbname": "logs", "user": "u"}),
])
def test_pg_libpq_params(monkeypatch, url, env, expected):
    for variable in lt.PG_ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert lt.libpq_params(url) == expected


def test_pg_libpq_params_default_to_the_os_user_and_a_local_socket(monkeypatch):
    import pwd
    for variable in lt.PG_ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    user = pwd.getpwuid(os.geteuid()).pw_name
    params = lt.libpq_params("postgresql://")
    assert params["user"] == user and params["dbname"] == user and params["port"] == "5432"
    assert params["host"] in lt.PG_SOCKET_DIRS


def test_pg_pgpass_password_matches_as_libpq_does(tmp_path, caplog):
    passfile = tmp_path / "pgpass"
    passfile.write_text("# a comment\n"
                        "db.example.com:5432:logs:u:first\n"
                        "db.example.com:*:*:u:second\n"
                        "local\\:host:*:*:*:escaped\n"
                        "localhost:5432:*:v:on the default socket\n"
                        "*:*:*:w:with:colons\\:and \\\\\n")
    passfile.chmod(0o600)

    def password(host, user, port="5432", dbname="logs"):
        return lt.pgpass_password({"passfile": str(passfile), "host": host, "port": port,
                                   "dbname": dbname, "user": user})

    assert password("db.example.com", "u") == "first"
    assert password("db.example.com", "u", port="6432", dbname="x") == "second"
    assert password("local:host", "u") == "escaped"
    assert password(lt.PG_SOCKET_DIRS[0], "v") == "on the default socket"
    assert password("/elsewhere", "v") is None
    assert password("anywhere", "w") == "with:colons:and \\"
    passfile.chmod(0o640)
    assert password("db.example.com", "u") is None
    assert "group or world access" in caplog.text


def test_pg_copy_data_escapes_what_copy_reads_specially():
    null = lt.PG_NULL
    assert lt.copy_data([(1, 2, 3, "tab\there\\back\nnew\rcr")]) == (
        b"1\t2\t3\ttab\\there\\\\back\\nnew\\rcr\n")
    assert lt.copy_data([(1, 2, 4, null, "h", "p", 7, null, null, "caf\u00e9", "\\x00ff", null,
                          1, null)]) == (
        b"1\t2\t4\t\\N\th\tp\t7\t\\N\t\\N\tcaf\xc3\xa9\t\\\\x00ff\t\\N\t1\t\\N\n")
    assert lt.copy_data([(1, null, "x"), (2, "y", null)]) == b"1\t\\N\tx\n2\ty\t\\N\n"


def test_pg_pg8000_socket_errors_are_its_network_errors():
    """pg8000 lets a socket error through when a message's first read fails (the server
    ended the session): the driver adapter makes it pg8000's, a connection lost."""
    import pg8000.dbapi
    driver = lt.Pg8000(pg8000.dbapi)

    class Cursor:
        def execute(self, *args, **kwargs):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    class Connection:
        def cursor(self):
            return Cursor()

        def close(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    for call in (lambda: driver.execute(Connection(), "SELECT 1"),
                 lambda: driver.copy(Connection(), "COPY t FROM STDIN", [(1,)]),
                 lambda: driver.close(Connection())):
        with pytest.raises(pg8000.dbapi.InterfaceError) as caught:
            call()
        assert driver.connection_fault(caught.value) and driver.broken(None, caught.value)
        assert driver.message(caught.value).startswith("network error: [Errno ")


def test_pg_watch_cuts_a_call_still_waiting_a_grace_after_a_stop():
    """A stop during a call, and one between calls: the call that waits is cut
    PG_STOP_GRACE_S after it; the stop reaches the process's own handler after the call."""
    import socket
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    ours, theirs = socket.socketpair()  # theirs never writes: a server that went silent
    watch = lt.PgWatch("test")
    try:
        watch.chain_handlers()
        watch.follow(ours.fileno())
        def stop():     # from a thread that takes no SIGTERM itself, as the tailer has none
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Timer(0.2, stop).start()
        started = time.monotonic()
        with watch.call():
            assert ours.recv(1) == b""  # the call, waiting: cut
            assert seen == []           # blocked meanwhile
        elapsed = time.monotonic() - started
        assert seen == [signal.SIGTERM]
        assert 0.2 + lt.PG_STOP_GRACE_S <= elapsed < 0.2 + lt.PG_STOP_GRACE_S + 0.5
        watch.deadline = None
        ours, theirs = socket.socketpair()
        watch.follow(ours.fileno())
        os.kill(os.getpid(), signal.SIGTERM)    # between calls: the chained handler sees it
        assert seen == [signal.SIGTERM] * 2
        started = time.monotonic()
        with watch.call():
            assert ours.recv(1) == b""
        assert time.monotonic() - started < lt.PG_STOP_GRACE_S + 0.5
    finally:
        watch.close()
        signal.signal(signal.SIGTERM, previous)
