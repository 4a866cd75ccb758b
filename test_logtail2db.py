"""Tests for logtail2db: the tailer runs as a real subprocess on temporary directories.

Files are really written, renamed and truncated, the process is really killed;
every wait polls with a deadline (wait_for), none sleeps and hopes.
"""

import errno
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import logtail2db as lt

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


@pytest.mark.parametrize("offset,fingerprint,size,head,verdict", [
    (10, b"abc", 10, b"abc", lt.UNCHANGED),
    (10, b"abc", 25, b"abc", lt.GROWN),
    (10, b"abc", 4, b"abc", lt.TRUNCATED),       # copytruncate, then a short write
    (10, b"abc", 0, b"", lt.REPLACED),            # copytruncate: empty now
    (10, b"abc", 30, b"xyz", lt.REPLACED),        # inode reused, or rewritten past the offset
    (0, b"", 5, b"", lt.GROWN),                   # an empty file is tracked at once
])
def test_classify(offset, fingerprint, size, head, verdict):
    assert lt.classify(offset, fingerprint, size, head) == verdict


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
    assert query(db, "SELECT count(*) FROM files") == [(1,)]


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
