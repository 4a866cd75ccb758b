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
    for n in range(count):
        (logdir / f"f{n:05d}.log").write_bytes(b"file %05d\n" % n)
    daemon = tailer("--max-open-files", "64")
    wait_for(lambda: len(raws(db)) == count, 60, "a line from every file",
             lambda: len(raws(db)))
    assert fd_count(daemon.proc.pid) <= 64 + 16
    picked = random.Random(7).sample(range(count), 200)
    for n in picked:
        append(logdir / f"f{n:05d}.log", b"again %05d\n" % n)
    wait_for(lambda: len(raws(db)) == count + 200, 30, "the appended lines",
             lambda: len(raws(db)))
    assert fd_count(daemon.proc.pid) <= 64 + 16
    assert sorted(r for r in raws(db) if r.startswith(b"again")) == sorted(
        b"again %05d" % n for n in picked)


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


def test_locked_database_is_retried(tailer, logdir, db):
    daemon = tailer()
    append(logdir / "app.log", b"one\n")
    wait_for(lambda: raws(db) == [b"one"], 10, "the first line", lambda: raws(db))
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")        # another writer holds the lock
    try:
        append(logdir / "app.log", b"two\n")
        wait_for(lambda: "database is locked" in daemon.stderr, 20, "the error logged",
                 lambda: daemon.stderr)
        assert raws(db) == [b"one"]
    finally:
        other.execute("ROLLBACK")
        other.close()
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
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.execute("CREATE TABLE future (x)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    result = run_once(logdir, db)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"logtail2db: error: {str(db)!r} has schema version 99, newer than this logtail2db "
        f"{lt.__version__} knows ({lt.SCHEMA_VERSION}); use a newer logtail2db"]
    assert db.read_bytes() == before


def test_sqlite_database_of_another_program_is_left_untouched(logdir, db):
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE customers (name)")
    conn.commit()
    conn.close()
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
