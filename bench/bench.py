#!/usr/bin/env python3
"""bench.py: how fast and how lean logtail2db is, measured in one run, shown in one table.

Usage: python3 bench/bench.py [--quick] [--lines N] [--only NAME[,NAME]] [--tool PATH] [--keep]

Writes a seeded, deterministic corpus to a temporary directory (removed at the end unless
--keep), runs logtail2db.py (the repository's, or --tool PATH) as a subprocess for every
measurement, and prints one table, one row per figure with the issue's target next to it,
then a summary: each target, its figure, met or NOT met. Nothing is asserted: the exit
status is 0. MB are 10^6 bytes. The measurements (NAME for --only):

  catchup    wall time of `--once` over N syslog lines (4 files, --format syslog), over the
             same bytes with --format plain (the difference is the parsing cost) and over the
             same entries as JSON lines (--format json). Floors, each into a one-column table:
             the sqlite3 CLI's .import of the syslog bytes and of the JSON lines, and a Python
             loader (executemany, 10k rows per transaction, WAL) of the syslog bytes. Each
             ratio row divides a catch-up's lines/s by a floor's, the floor beside it. Also
             peak RSS (ru_maxrss from wait4: the larger of the tool and the parse worker it
             reaped, not their sum), CPU seconds, minor page faults (ru_minflt: memory
             the kernel had to provide, each page zeroed; a VM that returns freed memory
             to its host provides it again too), and DB size (.db plus -wal) per log byte.
             Each catch-up and floor is the fastest of 5 tries on a fresh DB (every try's
             time in its note; peak RSS the largest of them), run in 5 rounds of one try
             of each, so that a slow stretch of the machine slows one try of each.
  stop       the daemon (not --once) on one file of 1,000,000 numbered syslog lines: SIGTERM
             at a seeded random moment 0.3-3 s after its first rows, then the time from the
             signal to its exit; 20 trials, each on a fresh DB. After each: the rows stored
             against files.offset (count = lines before it) and the exit status.
  latency    the daemon (--format auto) on an empty directory; a thread appends a numbered
             syslog line every 2 ms, first opening and closing the file per line, then
             through one unbuffered file kept open, while the main thread polls the DB every
             1 ms: per line, the time from write() returning to the row being visible.
  lone       lone-line latency per format (syslog, app, json, clf, plain): a daemon
             (--format auto) on its own directory per format, one file each, kept open by
             its writer, which writes ONE line, waits until its row is visible (polled every
             1 ms), waits 1.5 s more, then writes the next; 20 lines per format.
  idle       CPU seconds (utime+stime from /proc/PID/stat) the caught-up daemon spends with
             100 quiet files, per 10 s.
  longline   peak RSS and wall time of `--once` over a single line of 200 MB.
  manyfiles  `--once` over many small files, then the daemon over the same files: files/s,
             and the most fds the daemon holds open (sampled every 50 ms).
  pg         `--once` of the syslog catch-up corpus into a PostgreSQL server the bench starts
             itself (initdb into the work directory, unix socket, fsync off; as an unprivileged
             user when run as root), beside the SQLite catch-up of the same corpus; the floor
             is psql's \copy of the same lines into a one-column table; each the fastest of
             3 tries, each into a fresh database after a CHECKPOINT. Then the fleet soak:
             20 daemons (host names fleet-00..19, a directory each) into one database, each
             file fed 200 lines/s for 60 s (10 s with --quick) through a file kept open: rows
             expected, stored, doubled and missing, and each line's lag from its write to the
             commit of its file's offset (offsets polled every 50 ms). The tool runs with this
             interpreter if it has a driver (psycopg, psycopg2, pg8000), else with the
             repository's .venv/bin/python (README's test command makes it); with neither the
             rows say so.

--quick is a smaller run (100k lines, one try of each catch-up, 5 stop trials, 2 s latency
runs, 5 lone lines per format, 3 s idle, 20 MB line, 1,000 files).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import math
import operator
import os
import pathlib
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

TOOL = pathlib.Path(__file__).resolve().parent.parent / "logtail2db.py"   # --tool's default
REPO_VENV_PYTHON = TOOL.parent / ".venv" / "bin" / "python"  # pg's interpreter, if this lacks a driver
MEASUREMENTS = ("catchup", "stop", "latency", "lone", "idle", "longline", "manyfiles", "pg")
FULL = {"lines": 1_000_000, "latency_s": 10.0, "idle_s": 10.0, "line_mb": 200, "files": 10_000,
        "stop_trials": 20, "lone_lines": 20, "tries": 3, "rounds": 5}
QUICK = {"lines": 100_000, "latency_s": 2.0, "idle_s": 3.0, "line_mb": 20, "files": 1_000,
         "stop_trials": 5, "lone_lines": 5, "tries": 1, "rounds": 1}
SEED = 20261124
START_EPOCH = 1795392000        # 2026-11-23 00:00:00 UTC: the corpus's first timestamp
CATCHUP_FILES = 4
WRITE_EVERY_S = 0.002           # the latency writer's pace
POLL_EVERY_S = 0.001            # the latency reader's pace
SAMPLE_EVERY_S = 0.05           # how often the daemon's open fds are counted
SETTLE_S = 5.0                  # after the writer stops: the syslog hold (0.25 s) plus slack
LONE_FORMATS = ("syslog", "app", "json", "clf", "plain")
QUIET_S = 1.5                   # from a lone line being visible to writing the next: longer than
                                # any hold the tool might use (syslog and app hold a last entry
                                # 0.25 s, 1 s in older versions), so every line meets a tailer
                                # with nothing held or pending
LONE_LIMIT_S = 10.0             # a lone line not visible after this is counted as lost
READY_S = 60.0                  # for the daemon to say "watching", or rows to show up
RUN_LIMIT_S = 900.0             # a --once run still going after this is killed and reported
IDLE_FILES, IDLE_LINES = 100, 5
MANY_LINES = 3                  # lines per file in the many-files corpus
MAX_OPEN_FILES = 256            # the tool's --max-open-files default: log files it keeps open
OWN_FDS = 16                    # the rest it may hold: stdio, database, -wal, -shm, inotify,
                                # wake-up pipe, parse worker's socket, with room to spare
# The stop corpus is a full-size backlog even with --quick: the daemon must still be catching
# up STOP_AFTER_MAX_S after its first rows, or the signal would find it idle.
STOP_LINES = 1_000_000
STOP_AFTER_MIN_S, STOP_AFTER_MAX_S = 0.3, 3.0  # SIGTERM this long (uniform) after the first rows
STOP_LIMIT_S = 30.0             # a daemon not gone this long after SIGTERM is killed, and reported
MB = 1e6
PG_DRIVER_MODULES = ("psycopg", "psycopg2", "pg8000")
FLEET_TAILERS, FLEET_LINES_PER_S = 20, 200     # the fleet soak: so many hosts, each fed so fast
FLEET_S, FLEET_QUICK_S = 60.0, 10.0     # for so long
FLEET_WRITE_EVERY_S = 0.05      # each file gets a write this often...
FLEET_PER_WRITE = round(FLEET_LINES_PER_S * FLEET_WRITE_EVERY_S)    # ...of so many lines
FLEET_POLL_S = 0.05             # how often the files' offsets are read, for the lag
FLEET_SETTLE_S = 30.0           # after the writer stops, the last rows get this long to come
PSQL_END = "--end of result--"  # what Psql echoes after each query's rows

MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
HOSTS = ("web-01", "web-02", "web-03", "db-01", "cache-01", "mail-01", "lb-01", "worker-07")
USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
PATHS = ("/index.html", "/api/v1/orders", "/api/v1/users/me", "/static/app.3f9c2b.js",
         "/login", "/search?q=log+tail&page=2", "/healthz", "/api/v1/orders/48213/items")
STATUSES = (200, 200, 200, 200, 200, 301, 304, 404, 500)
SEQ_RE = re.compile(r"seq=([0-9]+)")
# Long-line bytes: random bytes mapped onto letters, digits and spaces (never a newline).
LETTERS = bytes(b"abcdefghijklmnopqrstuvwxyz0123456789 "[i % 37] for i in range(256))

# One timed run; tries: the seconds of every try when it is the best of several (best_of()).
Run = collections.namedtuple("Run", "seconds rss_mb cpu_s faults tries", defaults=((),))
Stop = collections.namedtuple("Stop", "seconds status rows mismatch first_rows_s")  # a trial
# A line of the table: one figure, and the target for it if it has one.
Row = collections.namedtuple("Row", "name value unit note target", defaults=(None,))
Target = collections.namedtuple("Target", "op bound")   # met when `value op bound` holds
TARGET_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


def at_most(bound) -> Target:
    return Target("<=", bound)


def at_least(bound) -> Target:
    return Target(">=", bound)


def below(bound) -> Target:
    return Target("<", bound)


class BenchError(Exception):
    """A measurement could not be made (the tool failed, hung or lost lines): its row says why."""


def progress(text: str) -> None:
    sys.stderr.write(f"bench: {text}\n")
    sys.stderr.flush()


def tail(data: bytes, lines: int = 3) -> str:
    """The last lines of a process's stderr, for a failure message."""
    return " | ".join(data.decode("utf-8", "backslashreplace").strip().splitlines()[-lines:])


# Corpus #######################################################################

def random_event(rng: random.Random) -> tuple:
    """(host, program, pid, level, message) of a made-up but typical server log line."""
    host, user, roll = rng.choice(HOSTS), rng.choice(USERS), rng.random()
    ip = f"10.0.{rng.randrange(8)}.{rng.randrange(2, 250)}"
    if roll < 0.45:
        status = rng.choice(STATUSES)
        return (host, "nginx", 1000 + rng.randrange(64), "error" if status >= 500 else "info",
                f"GET {rng.choice(PATHS)} {status} user={user} took {rng.randrange(1, 900)}ms "
                f"upstream={ip}:8080")
    if roll < 0.60:
        return (host, "sshd", rng.randrange(2000, 30000), "info",
                f"Accepted publickey for {user} from {ip} port {rng.randrange(32768, 61000)} "
                f"ssh2: ED25519 SHA256:{rng.getrandbits(48):012x}")
    if roll < 0.70:
        return (host, "kernel", None, "warning",
                f"[{rng.random() * 1e6:.6f}] TCP: request_sock_TCP: Possible SYN flooding "
                "on port 443. Sending cookies.")
    if roll < 0.80:
        return (host, "CRON", rng.randrange(2000, 30000), "info",
                f"({user}) CMD (/usr/local/bin/backup.sh --incremental "
                f"--target s3://backups/{host}/{rng.randrange(10000)})")
    if roll < 0.95:
        level = rng.choice(("info", "info", "info", "warning", "error"))
        return (host, "app", rng.randrange(3000, 3100), level,
                f'level={level} msg="order updated" order_id={rng.randrange(10**6)} '
                f"user={user} duration_ms={rng.randrange(1, 500)}")
    return (host, "systemd", 1, "info",
            f"Started Session {rng.randrange(1, 99999)} of user {user}.")


def events(rng: random.Random):
    """Endless (BSD time, ISO time, host, program, pid, level, message), time advancing."""
    epoch, second = float(START_EPOCH), None
    while True:
        epoch += rng.random() * 0.6
        if int(epoch) != second:    # formatting a time costs more than the rest of a line
            second = int(epoch)
            tm = time.gmtime(second)
            bsd = (f"{MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} "
                   f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}")
            iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", tm)
        yield (bsd, iso, *random_event(rng))


def syslog_line(bsd, iso, host, program, pid, level, message) -> str:
    tag = program if pid is None else f"{program}[{pid}]"
    return f"{bsd} {host} {tag}: {message}\n"


def json_line(bsd, iso, host, program, pid, level, message) -> str:
    return json.dumps({"time": iso, "level": level, "host": host, "msg": message,
                       "program": program, "pid": pid}) + "\n"


def make_catchup_corpus(syslog_dir: pathlib.Path, json_dir: pathlib.Path, lines: int) -> None:
    """LINES entries over CATCHUP_FILES files, as syslog in one directory, as JSON in the other."""
    syslog_dir.mkdir()
    json_dir.mkdir()
    source = events(random.Random(SEED))
    for k in range(CATCHUP_FILES):
        count = lines * (k + 1) // CATCHUP_FILES - lines * k // CATCHUP_FILES
        with open(syslog_dir / f"syslog-{k}.log", "w") as syslog_file, \
                open(json_dir / f"app-{k}.json", "w") as json_file:
            for start in range(0, count, 10_000):
                batch = [next(source) for _ in range(min(10_000, count - start))]
                syslog_file.write("".join(syslog_line(*event) for event in batch))
                json_file.write("".join(json_line(*event) for event in batch))


def make_numbered_syslog(path: pathlib.Path, lines: int) -> None:
    """LINES syslog lines, line i (from 0) carrying "seq=i", so a row says which line it is."""
    source = events(random.Random(SEED + lines))
    with open(path, "w") as file:
        for start in range(0, lines, 10_000):
            file.write("".join(syslog_line(*event[:-1], f"seq={seq} {event[-1]}")
                               for seq, event in zip(range(start, min(start + 10_000, lines)),
                                                     source)))


def make_small_files(directory: pathlib.Path, files: int, lines: int) -> None:
    """FILES syslog files of LINES lines each."""
    directory.mkdir()
    source = events(random.Random(SEED + files))
    for i in range(files):
        with open(directory / f"app-{i:05d}.log", "w") as file:
            file.write("".join(syslog_line(*next(source)) for _ in range(lines)))


def make_long_line(path: pathlib.Path, size: int) -> None:
    """One line of SIZE bytes, its only newline at the end."""
    block = random.Random(SEED).randbytes(1 << 20).translate(LETTERS)
    with open(path, "wb") as file:
        left = size - 1
        while left > 0:
            file.write(block[:left])
            left -= len(block)
        file.write(b"\n")


def dir_bytes(directory: pathlib.Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())


# Running things ###############################################################

def run_measured(cmd: list, stdin=subprocess.DEVNULL) -> Run:
    """Run CMD to its end: wall time of the whole process, its peak RSS and CPU (via wait4).
    Every run starts with nothing left to write back of the runs before it: their writeback
    slowed the next run's fsyncs by up to 40% (measured), whichever program ran next."""
    os.sync()
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err)
        killer = threading.Timer(RUN_LIMIT_S, proc.kill)   # a hang becomes a row, not a stuck run
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)    # reaped here, not by Popen
        if proc.returncode != 0:
            err.seek(0)
            raise BenchError(f"`{shlex.join(map(str, cmd))}` exited {proc.returncode} after "
                             f"{seconds:.1f} s: {tail(err.read())}")
    return Run(seconds, usage.ru_maxrss * 1024 / MB, usage.ru_utime + usage.ru_stime,
               usage.ru_minflt)


def best_of(tries: int, once) -> Run:
    """The fastest of TRIES calls of ONCE() (each starting from fresh state), with the peak RSS
    of them all and every try's seconds. Others sharing the machine only ever slow a run: one
    catch-up alone took 1.5 to 2.2 s (measured), so a single try makes a ratio of two runs
    swing by a third, while the least of three repeats within a few percent."""
    return fastest([once() for _ in range(tries)])


def fastest(runs: list) -> Run:
    """The fastest of runs, with the peak RSS of them all and every run's seconds."""
    best = min(runs, key=operator.attrgetter("seconds"))
    return best._replace(rss_mb=max(run.rss_mb for run in runs),
                         tries=tuple(run.seconds for run in runs))


def best_of_rounds(tries: int, subjects: dict) -> dict:
    """best_of() for each of SUBJECTS (name: ONCE), run in TRIES rounds of one try of each,
    so that a stretch of the machine running slow falls on one try of every subject rather
    than on every try of one: CPU time itself of one catch-up swung from 4.6 to 7.5 s on
    the developer VM (measured), and a ratio compares two subjects. A subject that fails is
    its BenchError, and is not tried again."""
    runs = {name: [] for name in subjects}
    failed = {}
    for _ in range(tries):
        for name, once in subjects.items():
            if name not in failed:
                try:
                    runs[name].append(once())
                except BenchError as exc:
                    failed[name] = exc
    return {name: failed[name] if name in failed else fastest(made)
            for name, made in runs.items()}


def fresh(db: pathlib.Path) -> pathlib.Path:
    """DB with no file left of a try before (nor its WAL and shared memory)."""
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    return db


def command(tool: pathlib.Path, *args) -> list:
    """The command line that runs TOOL (a copy of logtail2db.py) with ARGS."""
    return [sys.executable, str(tool), *map(str, args)]


def ro_uri(db: pathlib.Path) -> str:
    return f"file:{urllib.parse.quote(str(db))}?mode=ro"


def count_rows(db: pathlib.Path, table: str = "entries") -> int:
    """Rows visible to a reader now; 0 while the database or its schema is not there yet."""
    try:
        conn = sqlite3.connect(ro_uri(db), uri=True, timeout=1.0)
        try:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return 0


def db_bytes(db: pathlib.Path) -> int:
    """The database's size on disk as the tool left it: the file plus its WAL, if any."""
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def time_once(tool: pathlib.Path, directory: pathlib.Path, db: pathlib.Path, *args) -> Run:
    """`--once` over DIRECTORY into a fresh DB."""
    return run_measured(command(tool, "--once", *args, directory, db))


def wait_for(predicate, timeout_s: float, what: str, max_delay_s: float = 0.05):
    """Poll PREDICATE with a short backoff (up to MAX_DELAY_S between calls) until it returns
    something true, and return that; BenchError after TIMEOUT_S."""
    deadline = time.monotonic() + timeout_s
    delay = min(0.001, max_delay_s)
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_delay_s)


@contextlib.contextmanager
def daemon(tool: pathlib.Path, directory: pathlib.Path, db: pathlib.Path, *args):
    """The tool following DIRECTORY (not yet ready), and its stderr's path; stopped after."""
    err_path = db.with_name(db.name + ".stderr")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(command(tool, *args, directory, db), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield proc, err_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            progress(f"the daemon (pid {proc.pid}) ignored SIGTERM for 5 s: killed")
            proc.kill()
            proc.wait()


def stop_timed(proc: subprocess.Popen) -> tuple:
    """SIGTERM PROC and reap it: (seconds from the signal to its exit, its exit status). One
    still running STOP_LIMIT_S after the signal is killed (status -9)."""
    # os.kill, not proc.kill: Popen would poll (and might reap) the pid this thread waits for.
    killer = threading.Timer(STOP_LIMIT_S, os.kill, (proc.pid, signal.SIGKILL))
    killer.start()
    try:
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, status = os.waitpid(proc.pid, 0)     # blocks: returns the moment it exits
        seconds = time.monotonic() - sent
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)    # reaped here, not by Popen
    return seconds, proc.returncode


def is_watching(proc: subprocess.Popen, err_path: pathlib.Path) -> bool:
    """Whether the daemon has said "watching DIR: N files": its first scan is done (today's
    tool says it before catching up on what the scan found, so this is no sign of idleness)."""
    text = err_path.read_bytes()
    if proc.poll() is not None:
        raise BenchError(f"the daemon exited {proc.returncode}: {tail(text)}")
    return b"watching" in text


def wait_watching(proc: subprocess.Popen, err_path: pathlib.Path) -> None:
    wait_for(lambda: is_watching(proc, err_path), READY_S, 'the daemon to say "watching"')


def percentile(ordered: list, p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# Measurements #################################################################

def import_floor(cli: str, directory: pathlib.Path, db: pathlib.Path) -> Run:
    """The sqlite3 CLI's .import of each file, one line per row."""
    # Fields split at \037 (unit separator), which the corpus never holds: a row per line.
    script = ["CREATE TABLE lines(raw TEXT);", ".mode ascii", r'.separator "\037" "\n"']
    script += [f'.import "{path}" lines' for path in sorted(directory.iterdir())]
    with tempfile.TemporaryFile() as stdin:
        stdin.write("\n".join(script).encode() + b"\n")
        stdin.seek(0)
        return run_measured([cli, str(db)], stdin=stdin)


def load_lines(directory: str, db: str) -> None:
    """The Python floor: raw lines into a one-column table, 10k rows per transaction, WAL."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = wal")
    conn.execute("PRAGMA synchronous = normal")     # as the tool does in WAL mode
    conn.execute("CREATE TABLE lines(raw TEXT)")
    batch = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as file:
            for line in file:
                batch.append((line.rstrip(b"\n").decode("utf-8", "replace"),))
                if len(batch) == 10_000:
                    conn.execute("BEGIN")
                    conn.executemany("INSERT INTO lines VALUES (?)", batch)
                    conn.execute("COMMIT")
                    batch = []
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO lines VALUES (?)", batch)
    conn.execute("COMMIT")
    conn.close()


def rows_note(found: int, expected: int) -> str:
    """Nothing when every line became a row; else the shortfall, loudly."""
    return "" if found == expected else f", ROWS {found:,} != {expected:,} lines"


def rate_note(run: Run, lines: int, size: int) -> str:
    tries = ""
    if len(run.tries) > 1:
        tries = (f", best of {len(run.tries)} "
                 f"({', '.join(f'{seconds:.2f}' for seconds in sorted(run.tries))} s)")
    return (f"{run.seconds:.2f} s, {size / MB / run.seconds:.1f} MB/s, CPU {run.cpu_s:.1f} s, "
            f"{run.faults / lines * 1000:.0f} page faults per 1,000 lines" + tries)


def import_row(label: str, floor: Run | None, db: pathlib.Path, lines: int, size: int) -> Row:
    name = f"floor: sqlite3 .import, {label}"
    if floor is None:
        return Row(name, "-", "", "skipped: no sqlite3 CLI on PATH")
    return Row(name, lines / floor.seconds, "lines/s",
               rate_note(floor, lines, size) + rows_note(count_rows(db, "lines"), lines))


def ratio_row(name: str, run: Run | None, base: Run | None, lines: int, base_name: str,
              target: Target = None, extra: str = "") -> list:
    """RUN's speed over BASE's (a floor, mostly) on the same LINES, BASE's beside it; "-" when
    either is missing (its own row says why), so that the target still shows as not measured."""
    if run is None or base is None:
        return [Row(name, "-", "x", "not measured: see the catch-up and floor rows", target)]
    return [Row(name, base.seconds / run.seconds, "x",
                f"{base_name}: {lines / base.seconds:,.0f} lines/s{extra}", target)]


def measure_catchup(work: pathlib.Path, tool: pathlib.Path, lines: int, rounds: int) -> list:
    syslog_dir, json_dir = work / "catchup-syslog", work / "catchup-json"
    progress(f"catch-up: writing {lines:,} lines as syslog and as JSON lines")
    make_catchup_corpus(syslog_dir, json_dir, lines)
    syslog_size, json_size = dir_bytes(syslog_dir), dir_bytes(json_dir)
    rows = [Row("corpus: syslog", syslog_size / MB, "MB",
                f"{lines:,} lines in {CATCHUP_FILES} files, {syslog_size / lines:.0f} B/line"),
            Row("corpus: JSON lines", json_size / MB, "MB",
                f"the same entries, {json_size / lines:.0f} B/line")]

    # Each corpus has its own floor: JSON lines are longer, so the same count costs more to
    # store even without parsing; the JSON ratio to its own floor says what parsing costs.
    cli = shutil.which("sqlite3")
    corpora = {"syslog": ("syslog", syslog_dir, syslog_size),
               "json": ("JSON lines", json_dir, json_size)}
    catchups = (("syslog (parsed)", syslog_dir, syslog_size, "syslog"),
                ("plain", syslog_dir, syslog_size, "plain"),
                ("JSON lines", json_dir, json_size, "json"))

    def on_fresh(db: pathlib.Path, start):
        return lambda: start(fresh(db))

    subjects = {}
    if cli is not None:
        for fmt, (_, directory, _) in corpora.items():
            subjects["import", fmt] = on_fresh(work / f"floor-import-{fmt}.db",
                                               functools.partial(import_floor, cli, directory))
    subjects["python", None] = on_fresh(work / "floor-python.db", lambda db: run_measured(
        [sys.executable, __file__, "--python-floor", str(syslog_dir), str(db)]))
    for _, directory, _, fmt in catchups:
        subjects["catchup", fmt] = on_fresh(
            work / f"catchup-{fmt}.db",
            lambda db, directory=directory, fmt=fmt: time_once(tool, directory, db,
                                                                "--format", fmt))
    progress(f"catch-up: {rounds} round(s) of: sqlite3 .import of each corpus, the Python "
             "floor, --once --format syslog, plain and json")
    best = best_of_rounds(rounds, subjects)
    for (what, _), run in best.items():
        if isinstance(run, BenchError) and what != "catchup":
            raise run       # a floor that fails is the bench's own fault

    floors = {}
    for fmt, (label, directory, size) in corpora.items():
        floors[fmt] = best.get(("import", fmt))     # None without the CLI: its rows say why
        rows.append(import_row(label, floors[fmt], work / f"floor-import-{fmt}.db", lines,
                               size))
    floor_python = best["python", None]
    rows.append(Row("floor: Python executemany, syslog", lines / floor_python.seconds, "lines/s",
                    rate_note(floor_python, lines, syslog_size)
                    + f", peak RSS {floor_python.rss_mb:.0f} MB"
                    + rows_note(count_rows(work / "floor-python.db", "lines"), lines)))

    runs, sizes = {}, {}
    for label, directory, size, fmt in catchups:
        run, db = best["catchup", fmt], work / f"catchup-{fmt}.db"
        if isinstance(run, BenchError):
            rows.append(Row(f"catch-up {label}", "FAILED", "", str(run)))
            continue
        runs[fmt] = run
        sizes[fmt] = db_bytes(db)
        rows.append(Row(f"catch-up {label}", lines / run.seconds, "lines/s",
                        f"{rate_note(run, lines, size)}, peak RSS {run.rss_mb:.0f} MB"
                        + rows_note(count_rows(db), lines)))

    def python_note(fmt: str) -> str:
        run = runs.get(fmt)
        return "" if run is None else (f"; {floor_python.seconds / run.seconds:.2f}x the Python "
                                       f"floor ({lines / floor_python.seconds:,.0f} lines/s)")

    rows += ratio_row("syslog (parsed) / .import", runs.get("syslog"), floors["syslog"], lines,
                      "floor, .import of the same lines", at_least(0.5), python_note("syslog"))
    rows += ratio_row("plain / .import", runs.get("plain"), floors["syslog"], lines,
                      "floor, .import of the same lines", at_least(0.7), python_note("plain"))
    rows += ratio_row("JSON lines / syslog (parsed)", runs.get("json"), runs.get("syslog"), lines,
                      "against the syslog (parsed) catch-up of the same entries",
                      at_least(0.7))
    rows += ratio_row("JSON lines / its .import", runs.get("json"), floors["json"], lines,
                      "floor, .import of the same JSON lines")
    if "syslog" in runs and "plain" in runs:
        parsed, plain = runs["syslog"].seconds, runs["plain"].seconds
        rows.append(Row("parsing cost: syslog vs plain", parsed / plain, "x time",
                        f"{parsed:.2f} s parsed vs {plain:.2f} s plain"))
    size_targets = {"json": at_most(1.4), "syslog": at_most(1.6), "plain": None}
    for label, _, size, fmt in catchups:
        if fmt in sizes:
            rows.append(Row(f"DB size, {label}", sizes[fmt] / size, "x log bytes",
                            f"{sizes[fmt] / MB:.1f} MB (.db + -wal) for {size / MB:.1f} MB of "
                            "log", size_targets[fmt]))
        else:
            rows.append(Row(f"DB size, {label}", "-", "x log bytes",
                            "not measured: its catch-up failed", size_targets[fmt]))
    rows.append(Row("peak RSS, catch-up", max(run.rss_mb for run in runs.values()), "MB",
                    "the largest of " + ", ".join(f"{fmt} {run.rss_mb:.0f} MB"
                                                  for fmt, run in runs.items()), at_most(64))
                if runs else
                Row("peak RSS, catch-up", "-", "MB", "not measured: every catch-up failed",
                    at_most(64)))
    return rows


def pg_bin() -> pathlib.Path | None:
    """The directory of initdb, pg_ctl and psql: on PATH, or Debian's."""
    found = shutil.which("initdb")
    if found:
        return pathlib.Path(found).resolve().parent
    found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda path: path.parent.parent.name.zfill(4))
    return found[-1].parent if found else None


@contextlib.contextmanager
def pg_server(work: pathlib.Path):
    """A PostgreSQL server of the bench's own; yields (its bin directory, a URL maker)."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise BenchError("no initdb on PATH or in /usr/lib/postgresql/*/bin (apt-get install "
                         "postgresql)")
    base = pathlib.Path(tempfile.mkdtemp(prefix="pg-", dir=work))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_user = []
    if os.getuid() == 0:    # initdb refuses root
        import pwd
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        os.chmod(work, 0o755)   # mkdtemp's 0700: the server's user must reach base
        for path in (base, sock):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        as_user = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                   "--clear-groups"]

    def run(*args):
        done = subprocess.run([*as_user, *map(str, args)], capture_output=True, cwd=base,
                              timeout=300)
        if done.returncode != 0:
            raise BenchError(f"{args[0]}: {tail(done.stderr)}")

    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
        "--no-locale", "--no-sync")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"fsync = off\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\n"
                   "synchronous_commit = off\nshared_buffers = 128MB\nmax_wal_size = 4GB\n")
    run(bin_dir / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "start")
    try:
        yield bin_dir, lambda db: f"postgresql:///{db}?host={sock}&user=postgres"
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")


def pg_python() -> str:
    """An interpreter with a PostgreSQL driver for the tool: this one, else the repository's
    .venv (made by README's test command); BenchError saying how to have one."""
    probe = ("import importlib.util, sys; sys.exit(not any(importlib.util.find_spec(name) "
             f"for name in {PG_DRIVER_MODULES!r}))")
    for python in (sys.executable, str(REPO_VENV_PYTHON)):
        if os.path.exists(python) and subprocess.run([python, "-c", probe]).returncode == 0:
            return python
    raise BenchError(f"neither {sys.executable} nor {REPO_VENV_PYTHON} has a PostgreSQL driver "
                     "(psycopg, psycopg2 or pg8000): make the .venv with README's test command, "
                     'or pip install "psycopg[binary]"')


def pg_once(python: str, tool: pathlib.Path, directory: pathlib.Path, target, *args) -> Run:
    return run_measured([python, str(tool), "--once", *map(str, args), str(directory),
                         str(target)])


def measure_pg(work: pathlib.Path, tool: pathlib.Path, lines: int, fleet_s: float,
               tries: int) -> list:
    python = pg_python()
    syslog_dir = work / "pg-syslog"
    progress(f"pg: writing {lines:,} syslog lines")
    make_catchup_corpus(syslog_dir, work / "pg-json", lines)
    size = dir_bytes(syslog_dir)
    rows = []
    progress(f"pg: SQLite catch-up of the same corpus ({python})")
    db = work / "pg-sqlite.db"
    sqlite_run = best_of(tries, lambda: pg_once(python, tool, syslog_dir, fresh(db),
                                                "--format", "syslog"))
    rows.append(Row("SQLite catch-up, syslog (parsed)", lines / sqlite_run.seconds, "lines/s",
                    rate_note(sqlite_run, lines, size) + rows_note(count_rows(db), lines)))
    with pg_server(work) as (bin_dir, url):
        psql = [str(bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]

        def fresh_database(name: str) -> str:
            """The URL of database NAME, made anew; the server's dirty pages of a try before
            are written first, so that no try pays for another's."""
            for sql in (f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}",
                        "CHECKPOINT"):
                subprocess.run([*psql, url("postgres"), "-c", sql], check=True,
                               capture_output=True)
            return url(name)

        progress("pg: floor, psql \\copy of the same lines")
        # Fields split at \037 and quoted by \036, which the corpus never holds: a row a line.
        script = ["CREATE TABLE lines (raw text);"] + [
            f"\\copy lines FROM '{path}' WITH (FORMAT csv, DELIMITER E'\\x1f', QUOTE E'\\x1e')"
            for path in sorted(syslog_dir.iterdir())]

        def floor_once() -> Run:
            with tempfile.TemporaryFile() as stdin:
                stdin.write("\n".join(script).encode() + b"\n")
                stdin.seek(0)
                return run_measured([*psql, fresh_database("floor")], stdin=stdin)

        floor = best_of(tries, floor_once)
        rows.append(Row("floor: psql \\copy, syslog", lines / floor.seconds, "lines/s",
                        rate_note(floor, lines, size)))
        progress("pg: catch-up into PostgreSQL")
        founds = []

        def catchup_once() -> Run:
            run = pg_once(python, tool, syslog_dir, fresh_database("catchup"), "--format",
                          "syslog", "--host-name", "bench")
            stored = subprocess.run([*psql, "-At", url("catchup"), "-c",
                                     "SELECT count(*) FROM entries"], capture_output=True)
            founds.append(int(stored.stdout or 0))
            return run

        try:
            pg_run = best_of(tries, catchup_once)
        except BenchError as exc:
            pg_run = None
            rows.append(Row("PostgreSQL catch-up, syslog (parsed)", "FAILED", "", str(exc)))
        else:
            found = next((found for found in founds if found != lines), lines)
            rows.append(Row("PostgreSQL catch-up, syslog (parsed)", lines / pg_run.seconds,
                            "lines/s", f"{rate_note(pg_run, lines, size)}, peak RSS "
                            f"{pg_run.rss_mb:.0f} MB" + rows_note(found, lines)))
        rows += ratio_row("PostgreSQL / SQLite catch-up", pg_run, sqlite_run, lines,
                          "the SQLite catch-up of the same corpus", at_least(0.5))
        rows += ratio_row("PostgreSQL / \\copy", pg_run, floor, lines,
                          "floor, psql \\copy of the same lines")
        try:
            rows += measure_fleet(work, python, tool, fresh_database("fleet"),
                                  [*psql, url("fleet")], fleet_s)
        except BenchError as exc:
            rows.append(Row("PostgreSQL fleet", "FAILED", "", str(exc)))
    return rows


def fleet_line(host: int, seq: int) -> bytes:
    """Line SEQ of host HOST's file; all are as long: an offset says how many lines."""
    return (f"Nov 24 13:59:19 fleet-{host:02d} app[4242]: seq={seq:08d} GET /api/v1/orders 200 "
            "user=alice took 12ms\n").encode()


def write_fleet(paths: list, duration_s: float, written: list) -> None:
    """Append FLEET_LINES_PER_S lines a second to each of PATHS for DURATION_S, a write every
    FLEET_WRITE_EVERY_S to each, through files kept open as a logger keeps them;
    written[i][k] = when write k to file i began (its lines: k * FLEET_PER_WRITE on)."""
    files = [open(path, "ab", buffering=0) for path in paths]
    try:
        start = time.monotonic()
        for k in range(round(duration_s / FLEET_WRITE_EVERY_S)):
            delay = start + k * FLEET_WRITE_EVERY_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for host, file in enumerate(files):
                written[host].append(time.monotonic())     # before: the tailer may be quick
                file.write(b"".join(fleet_line(host, seq) for seq in
                                    range(k * FLEET_PER_WRITE, (k + 1) * FLEET_PER_WRITE)))
    finally:
        for file in files:
            file.close()


class Psql:
    """One psql session kept open, queried again and again: rows of '|'-separated fields."""

    def __init__(self, psql: list):
        self.proc = subprocess.Popen([*psql, "-At"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def query(self, sql: str) -> list:
        self.proc.stdin.write(f"{sql};\n\\echo {PSQL_END}\n")
        rows = []
        for line in self.proc.stdout:
            if line.rstrip("\n") == PSQL_END:
                return rows
            rows.append(line.rstrip("\n").split("|"))
        raise BenchError(f"psql ended: exit {self.proc.wait()}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def measure_fleet(work: pathlib.Path, python: str, tool: pathlib.Path, url: str, psql: list,
                  duration_s: float) -> list:
    """FLEET_TAILERS tailers, one per host name and directory, into one server, each file fed
    FLEET_LINES_PER_S lines a second: every row once, and each line's lag from its write to
    the commit of its file's offset (the files' offsets polled every FLEET_POLL_S)."""
    dirs = [work / f"fleet-{host:02d}" for host in range(FLEET_TAILERS)]
    line_bytes = len(fleet_line(0, 0))
    procs = []
    for host, directory in enumerate(dirs):
        directory.mkdir()
        (directory / "app.log").touch()
        with open(work / f"fleet-{host:02d}.stderr", "wb") as err:
            procs.append(subprocess.Popen(
                [python, str(tool), "--host-name", f"fleet-{host:02d}", str(directory), url],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err))
    session = Psql(psql)
    written = [[] for _ in dirs]
    writer = threading.Thread(target=write_fleet, args=([d / "app.log" for d in dirs],
                                                        duration_s, written))
    try:
        for host, proc in enumerate(procs):
            wait_watching(proc, work / f"fleet-{host:02d}.stderr")
        cpu_before = sum(cpu_seconds(proc.pid) for proc in procs)
        progress(f"pg: fleet, {FLEET_TAILERS} tailers x {FLEET_LINES_PER_S} lines/s for "
                 f"{duration_s:g} s")
        writer.start()
        lines_each = round(duration_s / FLEET_WRITE_EVERY_S) * FLEET_PER_WRITE
        seen, lags, give_up_at = [0] * len(dirs), [], None
        while sum(seen) < lines_each * len(dirs):
            now = time.monotonic()
            for name, offset in session.query('SELECT h.name, f."offset" FROM files AS f'
                                              " JOIN hosts AS h ON h.id = f.host_id"):
                host = int(name.rpartition("-")[2])
                stored = int(offset) // line_bytes
                lags += [now - written[host][n // FLEET_PER_WRITE]
                         for n in range(seen[host], stored)]
                seen[host] = max(seen[host], stored)
            if give_up_at is None and not writer.is_alive():
                give_up_at = now + FLEET_SETTLE_S
            elif give_up_at is not None and now > give_up_at:
                break
            time.sleep(FLEET_POLL_S)
        cpu = sum(cpu_seconds(proc.pid) for proc in procs) - cpu_before
    finally:
        writer.join()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    exits = sorted({proc.returncode for proc in procs})
    (stored, distinct), = session.query("SELECT count(*), count(DISTINCT (host_id, raw))"
                                        " FROM entries")
    session.close()
    stored, distinct = int(stored), int(distinct)
    expected = lines_each * len(dirs)
    doubled, missing = stored - distinct, expected - distinct
    lags.sort()
    if not lags:
        raise BenchError("fleet: no line was stored")
    title = f"PostgreSQL fleet, {FLEET_TAILERS} tailers x {FLEET_LINES_PER_S} lines/s"
    return [Row(f"{title}: rows not stored once", doubled + missing, "rows",
                f"{duration_s:g} s: expected {expected:,}, stored {stored:,}, doubled "
                f"{doubled:,}, missing {missing:,}; exit status {exits}", at_most(0)),
            Row(f"{title}: lag p50", percentile(lags, 50) * 1000, "ms",
                f"write to its file's offset committed, polled every {FLEET_POLL_S * 1000:g} "
                "ms; files kept open: a write's last entry waits for the next write"),
            Row(f"{title}: lag p99", percentile(lags, 99) * 1000, "ms",
                f"{len(lags):,} lines seen of {expected:,}"),
            Row(f"{title}: lag max", lags[-1] * 1000, "ms",
                f"the tailers' CPU: {cpu:.1f} s in all ({cpu / duration_s / FLEET_TAILERS:.1%} "
                "of a core each)", below(2000))]


def has_rows(proc: subprocess.Popen, db: pathlib.Path) -> bool:
    """Whether a reader sees any entry yet; BenchError if the daemon has exited."""
    if proc.poll() is not None:
        raise BenchError(f"the daemon exited {proc.returncode} before storing anything")
    try:
        conn = sqlite3.connect(ro_uri(db), uri=True, timeout=1.0)
        try:
            return conn.execute("SELECT 1 FROM entries LIMIT 1").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return False    # no database or no schema yet


def lines_before(path: pathlib.Path, offset: int) -> tuple:
    """(newlines in PATH before OFFSET, whether OFFSET is just past one or at 0)."""
    count, last, left = 0, b"\n", offset
    with open(path, "rb") as file:
        while left > 0:
            chunk = file.read(min(left, 1 << 20))
            if not chunk:
                break   # the offset is past the end: reported as off a line boundary
            count += chunk.count(b"\n")
            last, left = chunk[-1:], left - len(chunk)
    return count, left == 0 and last == b"\n"


def stored_mismatch(db: pathlib.Path, path: pathlib.Path) -> tuple:
    """(rows stored, why they disagree with the offset stored for PATH, or None)."""
    conn = sqlite3.connect(ro_uri(db), uri=True)
    try:
        offsets = [offset for offset, in conn.execute("SELECT offset FROM files")]
        rows = conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        last = conn.execute("SELECT raw FROM entries ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    if len(offsets) != 1:
        return rows, f"{len(offsets)} files rows for one file"
    lines, on_boundary = lines_before(path, offsets[0])
    if not on_boundary:
        return rows, f"offset {offsets[0]:,} is not at the start of a line"
    if rows != lines:
        return rows, f"{rows:,} rows, but {lines:,} lines before offset {offsets[0]:,}"
    match = last and SEQ_RE.search(str(last[0]))
    if rows and not (match and int(match[1]) == lines - 1):
        return rows, f"the last row is not line {lines - 1:,}, the one before the offset: {last}"
    return rows, None


def stop_trial(tool: pathlib.Path, directory: pathlib.Path, db: pathlib.Path,
               delay_s: float) -> Stop:
    """Start the daemon on a fresh DB, SIGTERM it DELAY_S after its first rows, time its exit."""
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)
    with daemon(tool, directory, db) as (proc, err_path):
        wait_watching(proc, err_path)
        watching = time.monotonic()
        # "watching" may come before or after the catch-up, depending on the tool: rows in the
        # database are what says the catch-up is under way.
        wait_for(lambda: has_rows(proc, db), READY_S, "the catch-up's first rows")
        first_rows_s = time.monotonic() - watching
        time.sleep(delay_s)     # the random moment itself, not a wait for anything
        seconds, status = stop_timed(proc)
    rows, mismatch = stored_mismatch(db, directory / "syslog.log")
    if status != 0:
        mismatch = (mismatch + "; " if mismatch else "") + tail(err_path.read_bytes())
    return Stop(seconds, status, rows, mismatch, first_rows_s)


def measure_stop(work: pathlib.Path, tool: pathlib.Path, trials: int) -> list:
    directory = work / "stop"
    directory.mkdir()
    path = directory / "syslog.log"
    progress(f"stop: writing {STOP_LINES:,} numbered syslog lines")
    make_numbered_syslog(path, STOP_LINES)
    size = path.stat().st_size
    # A fresh DB each trial: every signal then meets the same state, the start of a big backlog
    # with the parse worker busy, which is the case issue 16 is about (a restart while catching
    # up). Continuing the same DB would shrink the backlog trial by trial until the later
    # signals found an idle daemon, and would time a resume as well as a stop.
    rng = random.Random(SEED + trials)
    results = []
    for trial in range(trials):
        delay_s = rng.uniform(STOP_AFTER_MIN_S, STOP_AFTER_MAX_S)
        progress(f"stop: trial {trial + 1} of {trials}, SIGTERM {delay_s:.2f} s after the first rows")
        result = stop_trial(tool, directory, work / "stop.db", delay_s)
        progress(f"stop: gone {result.seconds:.2f} s after SIGTERM, exit status {result.status}, "
                 f"{result.rows:,} rows")
        if result.mismatch:
            progress(f"stop: trial {trial + 1}: MISMATCH: {result.mismatch}")
        results.append(result)
    seconds = sorted(result.seconds for result in results)
    statuses = collections.Counter(result.status for result in results)
    unfinished = sum(result.rows < STOP_LINES for result in results)
    first_rows_s = sorted(result.first_rows_s for result in results)
    mismatches = [(trial + 1, result.mismatch) for trial, result in enumerate(results)
                  if result.mismatch]
    status_note = (f"exit status 0 in all {trials}" if statuses == {0: trials} else
                   "EXIT STATUS " + ", ".join(f"{status} in {count}"
                                              for status, count in sorted(statuses.items()))
                   + f" of {trials}")
    return [Row("stop time max, SIGTERM mid catch-up", seconds[-1], "s",
                f"{trials} trials, each on a fresh DB, SIGTERM {STOP_AFTER_MIN_S:g}-"
                f"{STOP_AFTER_MAX_S:g} s (seeded) after the first rows; {status_note}; "
                f"{unfinished} of {trials} stopped with the catch-up unfinished; "
                f"{STOP_LINES:,} lines, {size / MB:.0f} MB in one file", at_most(2)),
            Row("stop time p50, SIGTERM mid catch-up", percentile(seconds, 50), "s",
                f"min {seconds[0]:.2f} s, p90 {percentile(seconds, 90):.2f} s; first rows "
                f"seen {percentile(first_rows_s, 50):.2f} s (p50) after \"watching\""),
            Row("stop: trials with rows != offset", len(mismatches), "trials",
                f"of {trials}: count(entries) against the lines before files.offset, and the "
                "last row is the line just before it"
                + "".join(f"; MISMATCH in trial {trial}: {why}" for trial, why in mismatches),
                at_most(0))]


def probe_line(seq: int) -> bytes:
    """A syslog line of about the corpus's size carrying its sequence number."""
    tm = time.gmtime()
    return (f"{MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {tm.tm_hour:02d}:{tm.tm_min:02d}:"
            f"{tm.tm_sec:02d} bench-01 probe[{os.getpid()}]: seq={seq:06d} latency probe "
            "GET /api/v1/orders 200 user=alice took 12ms\n").encode()


def write_paced(path: pathlib.Path, kept_open: bool, written: list) -> None:
    """Append line i at start + i * WRITE_EVERY_S; written[i] = when its write() returned."""
    # buffering=0: each line is one write(2), so the time noted is when the file holds it.
    kept = open(path, "ab", buffering=0) if kept_open else None
    try:
        start = time.monotonic()
        for seq in range(len(written)):
            delay = start + seq * WRITE_EVERY_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if kept is not None:
                kept.write(probe_line(seq))
                written[seq] = time.monotonic()
            else:
                with open(path, "ab", buffering=0) as file:
                    file.write(probe_line(seq))
                    written[seq] = time.monotonic()
    finally:
        if kept is not None:
            kept.close()


def poll_visible(conn: sqlite3.Connection, writer: threading.Thread, count: int) -> dict:
    """{seq: when its row was first seen}, polling until COUNT are seen or SETTLE_S after the
    writer stops."""
    seen, last_id, give_up_at = {}, 0, None
    while len(seen) < count:
        found = conn.execute("SELECT id, raw FROM entries WHERE id > ? ORDER BY id",
                             (last_id,)).fetchall()
        now = time.monotonic()
        for last_id, raw in found:
            match = SEQ_RE.search(str(raw))
            if match:
                seen.setdefault(int(match[1]), now)
        if give_up_at is None and not writer.is_alive():
            give_up_at = now + SETTLE_S
        elif give_up_at is not None and now > give_up_at:
            break
        time.sleep(POLL_EVERY_S)    # the reader's pace; it leaves the other core to the writer
    return seen


def measure_latency(work: pathlib.Path, tool: pathlib.Path, kept_open: bool,
                    duration_s: float) -> list:
    style = "file kept open" if kept_open else "open/write/close"
    name = "latency-kept" if kept_open else "latency-reopen"
    directory, db = work / name, work / f"{name}.db"
    directory.mkdir()
    count = round(duration_s / WRITE_EVERY_S)
    written = [None] * count
    progress(f"latency, {style}: {count:,} lines, one per {WRITE_EVERY_S * 1000:g} ms")
    with daemon(tool, directory, db) as (proc, err_path):
        wait_watching(proc, err_path)
        conn = sqlite3.connect(ro_uri(db), uri=True, isolation_level=None)
        writer = threading.Thread(target=write_paced, args=(directory / "app.log", kept_open,
                                                            written))
        writer.start()
        try:
            seen = poll_visible(conn, writer, count)
        finally:
            writer.join()
            conn.close()
    ms = sorted((at - written[seq]) * 1000 for seq, at in seen.items()
                if seq < count and written[seq] is not None)
    if not ms:
        raise BenchError(f"latency, {style}: none of {count:,} lines became visible")
    missing = "" if len(seen) == count else f"; {count - len(seen):,} LINES MISSING"
    return [Row(f"latency p50, {style}", percentile(ms, 50), "ms",
                f"p95 {percentile(ms, 95):.1f} ms", at_most(10)),
            Row(f"latency p99, {style}", percentile(ms, 99), "ms",
                f"max {ms[-1]:.0f} ms (a file's last syslog entry may wait 0.25 s for more); "
                f"{len(seen):,} lines seen of {count:,} written{missing}", at_most(50))]


def lone_line(fmt: str, seq: int) -> bytes:
    """A line of format FMT (one of LONE_FORMATS), stamped now, carrying seq=SEQ."""
    now = time.time()
    tm, ms = time.gmtime(now), int(now % 1 * 1000)
    text = f"seq={seq:06d} lone line"
    if fmt == "syslog":
        line = (f"{MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {time.strftime('%H:%M:%S', tm)} "
                f"bench-01 lone[{os.getpid()}]: {text}")
    elif fmt == "app":
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S', tm)},{ms:03d} INFO app.web: {text}"
    elif fmt == "json":
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S", tm) + f".{ms:03d}Z",
                           "level": "info", "msg": text})
    elif fmt == "clf":
        line = (f'10.0.3.7 - alice [{time.strftime("%d/%b/%Y:%H:%M:%S +0000", tm)}] '
                f'"GET /api/v1/orders?seq={seq:06d} HTTP/1.1" 200 512 "-" "bench/1.0"')
    else:
        line = text
    return line.encode() + b"\n"


def seen_at(conn: sqlite3.Connection, seq: int) -> float | None:
    """Now, if the newest row is line SEQ; else None."""
    row = conn.execute("SELECT raw FROM entries ORDER BY id DESC LIMIT 1").fetchone()
    match = row and SEQ_RE.search(str(row[0]))
    return time.monotonic() if match and int(match[1]) == seq else None


def time_lone_line(fmt: str, seq: int, writer, conn: sqlite3.Connection,
                   proc: subprocess.Popen, err_path: pathlib.Path) -> float:
    """Seconds from writing line SEQ to its row being visible (polled every POLL_EVERY_S);
    infinite if it is not within LONE_LIMIT_S."""
    writer.write(lone_line(fmt, seq))
    written = time.monotonic()
    try:
        return wait_for(lambda: seen_at(conn, seq), LONE_LIMIT_S, f"{fmt} line {seq}",
                        max_delay_s=POLL_EVERY_S) - written
    except BenchError as exc:
        if proc.poll() is not None:
            raise BenchError(f"the {fmt} daemon exited {proc.returncode}: "
                             f"{tail(err_path.read_bytes())}") from exc
        progress(f"lone lines: {exc}")
        return math.inf


def measure_lone(work: pathlib.Path, tool: pathlib.Path, count: int) -> list:
    progress(f"lone lines: {count} per format ({', '.join(LONE_FORMATS)}), each "
             f"{QUIET_S:g} s after the last was stored")
    ms = {fmt: [] for fmt in LONE_FORMATS}
    with contextlib.ExitStack() as stack:
        followed = {}
        for fmt in LONE_FORMATS:
            directory, db = work / f"lone-{fmt}", work / f"lone-{fmt}.db"
            directory.mkdir()
            # Created before its daemon starts and kept open, like a service's log: the daemon
            # finds it empty in its first scan and follows it.
            writer = stack.enter_context(open(directory / f"{fmt}.log", "ab", buffering=0))
            proc, err_path = stack.enter_context(daemon(tool, directory, db, "--format", "auto"))
            followed[fmt] = (writer, db, proc, err_path)
        conns = {}
        for fmt, (writer, db, proc, err_path) in followed.items():
            wait_watching(proc, err_path)
            conns[fmt] = stack.enter_context(contextlib.closing(
                sqlite3.connect(ro_uri(db), uri=True, isolation_level=None)))
        # The five daemons run at once and take turns: one line is in flight at a time, so
        # only one daemon has work, and a round costs QUIET_S rather than five of them.
        # Line 0 of each file is timed apart: its format is detected then.
        quiet_until = dict.fromkeys(LONE_FORMATS, 0.0)
        for seq in range(count + 1):
            for fmt, (writer, db, proc, err_path) in followed.items():
                time.sleep(max(0.0, quiet_until[fmt] - time.monotonic()))   # the quiet itself
                ms[fmt].append(time_lone_line(fmt, seq, writer, conns[fmt], proc, err_path) * 1000)
                quiet_until[fmt] = time.monotonic() + QUIET_S
        detected = {fmt: [row[0] for row in conns[fmt].execute("SELECT format FROM files")]
                    for fmt in LONE_FORMATS}
    rows = []
    for fmt in LONE_FORMATS:
        first, timed = ms[fmt][0], sorted(ms[fmt][1:])
        lost = sum(math.isinf(value) for value in ms[fmt])
        shape = (f"detected as {detected[fmt][0]}" if detected[fmt] == [fmt]
                 else f"DETECTED AS {detected[fmt] or 'nothing'}")
        rows.append(Row(f"lone line p50, {fmt}", percentile(timed, 50), "ms",
                        f"{len(timed)} lines, each written {QUIET_S:g} s after the one before "
                        f"was visible; {shape}"))
        rows.append(Row(f"lone line p99, {fmt}", percentile(timed, 99), "ms",
                        f"max {timed[-1]:.0f} ms; the file's first line (not counted: its "
                        f"format is detected then) {first:.0f} ms"
                        + (f"; {lost} LINES NOT SEEN within {LONE_LIMIT_S:g} s" if lost else ""),
                        at_most(300)))
    return rows


def cpu_seconds(pid: int) -> float:
    """utime + stime of PID so far."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rpartition(")")[2].split()    # comm, in parentheses, may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_idle(work: pathlib.Path, tool: pathlib.Path, idle_s: float) -> list:
    directory, db = work / "idle", work / "idle.db"
    make_small_files(directory, IDLE_FILES, IDLE_LINES)
    total = IDLE_FILES * IDLE_LINES
    progress(f"idle CPU: {IDLE_FILES} files, {idle_s:g} s")
    with daemon(tool, directory, db) as (proc, err_path):
        wait_watching(proc, err_path)
        wait_for(lambda: count_rows(db) >= total, READY_S, f"all {total} lines to be stored")
        before = cpu_seconds(proc.pid)
        time.sleep(idle_s)      # the interval measured, not a wait for anything
        used = cpu_seconds(proc.pid) - before
    tick = 1 / os.sysconf("SC_CLK_TCK")
    return [Row(f"idle CPU, {IDLE_FILES} files", used / idle_s * 10, "CPU s per 10 s",
                f"{used:.2f} s over {idle_s:g} s, counted in ticks of {tick:g} s", below(0.02))]


def measure_long_line(work: pathlib.Path, tool: pathlib.Path, line_mb: int) -> list:
    directory, db = work / "longline", work / "longline.db"
    directory.mkdir()
    progress(f"peak RSS: one line of {line_mb} MB")
    make_long_line(directory / "huge.log", line_mb * 1_000_000)
    run = time_once(tool, directory, db)
    return [Row(f"peak RSS, one {line_mb} MB line", run.rss_mb, "MB",
                f"--once {run.seconds:.2f} s, stored as {count_rows(db):,} pieces",
                at_most(64))]


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0    # it has just exited; is_watching() reports that


def measure_many_files(work: pathlib.Path, tool: pathlib.Path, files: int) -> list:
    directory = work / "many"
    make_small_files(directory, files, MANY_LINES)
    total = files * MANY_LINES
    progress(f"many files: --once over {files:,} files")
    once_db = work / "many-once.db"
    run = time_once(tool, directory, once_db)
    found = count_rows(once_db)
    rows = [Row(f"--once, {files:,} files", files / run.seconds, "files/s",
                f"{run.seconds:.2f} s, {total / run.seconds:,.0f} lines/s, peak RSS "
                f"{run.rss_mb:.0f} MB" + rows_note(found, total), at_least(2000))]

    progress(f"many files: the daemon over {files:,} files")
    db = work / "many-daemon.db"
    most_fds, read_s = 0, None
    started = time.monotonic()
    with daemon(tool, directory, db) as (proc, err_path):
        while True:
            most_fds = max(most_fds, open_fds(proc.pid))
            # Read the DB only once it has said "watching": it is in WAL mode by then, so a
            # reader cannot get in the way of its setting up.
            stored = count_rows(db) if is_watching(proc, err_path) else 0
            elapsed = time.monotonic() - started
            # The last entry of each syslog file waits for 0.25 s of quiet (multi-line
            # grouping): every file is read once all the others are there.
            if read_s is None and stored >= total - files:
                read_s = elapsed
            if stored >= total:
                settled_fds = open_fds(proc.pid)
                break
            if elapsed > READY_S:
                raise BenchError(f"daemon, {files:,} files: {stored:,} of {total:,} lines "
                                 f"stored after {READY_S:g} s")
            time.sleep(SAMPLE_EVERY_S)     # the sampling period
    rows.append(Row(f"daemon, {files:,} files", files / read_s, "files/s",
                    f"every file read after {read_s:.2f} s, all {total:,} rows after "
                    f"{elapsed:.2f} s (the last entry of each file is held 0.25 s)",
                    at_least(2000)))
    rows.append(Row(f"daemon open fds, {files:,} files", most_fds, "fds",
                    f"most seen, sampled every {SAMPLE_EVERY_S * 1000:g} ms; {settled_fds:,} once "
                    f"all rows were stored; bounded: --max-open-files ({MAX_OPEN_FILES} by default) "
                    f"plus {OWN_FDS} of the tool's own", at_most(MAX_OPEN_FILES + OWN_FDS)))
    return rows


# Report and main ##############################################################

def shown(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def cpu_use() -> tuple:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and of the
    children it has reaped, which include the tool's parse workers), so far."""
    with open("/proc/stat") as file:
        ticks = [int(field) for field in file.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]      # idle, iowait; steal counts as busy: not ours to use
    own = sum(usage.ru_utime + usage.ru_stime for usage in
              (resource.getrusage(resource.RUSAGE_SELF),
               resource.getrusage(resource.RUSAGE_CHILDREN)))
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), own


def others_note(before: tuple, elapsed_s: float) -> str:
    """How much of the machine other processes used during the run: the figures of a busy
    machine are not those of a quiet one."""
    busy, own = (now - then for now, then in zip(cpu_use(), before))
    others = max(0.0, busy - own)
    return (f"other processes used {others:.0f} CPU s during the run, "
            f"{others / (elapsed_s * os.cpu_count()):.0%} of the machine")


def header(tool: pathlib.Path, elapsed_s: float, others: str) -> list:
    version = subprocess.run(command(tool, "--version"), capture_output=True, text=True)
    cli = shutil.which("sqlite3")
    cli_version = (subprocess.run([cli, "--version"], capture_output=True, text=True)
                   .stdout.split(" ")[0] if cli else "missing")
    return [f"tool:    {(version.stdout or version.stderr).strip()}, {tool}",
            f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()} "
            f"{platform.machine()}, load {os.getloadavg()[0]:.2f}; {others}",
            f"python:  {platform.python_version()} ({interpreter()}), SQLite "
            f"{sqlite3.sqlite_version} (module), sqlite3 CLI {cli_version}",
            f"sockets: {socket_buffers()}",
            f"run:     {elapsed_s:.0f} s, seed {SEED}"]


def interpreter() -> str:
    """sys.executable, which runs the tool too, and how it has libpython: Debian's
    /usr/bin/python3 (libpython linked in) ran the catch-ups 10 to 18% faster than a
    build with --enable-shared and without --enable-optimizations (pyenv's default) on
    the same machine (measured), so the figures depend on which one runs the bench."""
    try:
        with open("/proc/self/maps") as maps:
            shared = any("/libpython" in line for line in maps)
    except OSError:
        return sys.executable
    return f"{sys.executable}, libpython {'shared' if shared else 'linked in'}"


def socket_buffers() -> str:
    """The kernel's caps on a socket's buffers, which bound how far the parse worker's rows
    run ahead of the tailer in the kernel (208 KiB on most boxes)."""
    caps = []
    for name in ("wmem_max", "rmem_max"):
        try:
            size = int(pathlib.Path("/proc/sys/net/core", name).read_text())
            caps.append(f"net.core.{name} {size / 1024:,.0f} KiB")
        except (OSError, ValueError):
            caps.append(f"net.core.{name} unknown")
    return ", ".join(caps)


def shown_target(target: Target | None) -> str:
    return "" if target is None else f"{target.op} {shown(target.bound)}"


def verdict(row: Row) -> str:
    """Whether ROW's figure meets its target: "met", "NOT met", or why it cannot be told."""
    if row.value == "FAILED":
        return "FAILED"
    if isinstance(row.value, str):
        return "not measured"
    return "met" if TARGET_OPS[row.target.op](row.value, row.target.bound) else "NOT met"


def aligned(cells: list, right: tuple = ()) -> list:
    """CELLS (tuples of text) as lines of columns joined by " | ", the last one unpadded."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]) - 1)]
    return [" | ".join([cell.rjust(width) if i in right else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))] + [row[-1]])
            for row in cells]


def table(rows: list) -> list:
    cells = [("measurement", "value", "unit", "target", "note")] + [
        (row.name, shown(row.value), row.unit, shown_target(row.target), row.note)
        for row in rows]
    lines = aligned(cells, right=(1,))
    widths = [len(cell) for cell in lines[0].split(" | ")[:-1]]
    return lines[:1] + ["-+-".join("-" * width for width in widths) + "-+-" + "-" * 40] + lines[1:]


def summary(rows: list) -> list:
    """Each target with its figure and verdict, and failed measurements, under a count."""
    judged = [(verdict(row), row) for row in rows if row.target is not None]
    failed = [row for row in rows if row.target is None and row.value == "FAILED"]
    marks = collections.Counter(mark for mark, _ in judged)
    head = ("targets: none measured" if not judged else
            f"targets: all {len(judged)} met" if marks["met"] == len(judged) else
            f"targets: {marks['met']} of {len(judged)} met, "
            + ", ".join(f"{marks[mark]} {mark}" for mark in ("NOT met", "not measured", "FAILED")
                        if marks[mark]))
    if failed:
        head += f"; {len(failed)} measurement(s) FAILED: {', '.join(row.name for row in failed)}"
    cells = [(mark, row.name, f"{shown(row.value)} {row.unit}".strip(), shown_target(row.target))
             for mark, row in judged]
    return [head] + (aligned(cells) if cells else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark logtail2db.py: catch-up, stop time, latency, lone-line "
                    "latency, idle CPU, memory, "
                    "DB size, many files. Prints one table; asserts nothing.")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run: 100k lines, one try of each catch-up, 5 stop "
                             "trials, 2 s latency runs, "
                             "5 lone lines per format, 1,000 files, 20 MB line")
    parser.add_argument("--lines", type=int, metavar="N",
                        help="lines in the catch-up corpus (default: 1,000,000; --quick 100,000)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these measurements: {', '.join(MEASUREMENTS)}")
    parser.add_argument("--tool", type=pathlib.Path, default=TOOL, metavar="PATH",
                        help="the logtail2db.py to measure (default: this repository's, "
                             f"{TOOL})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (corpus, databases, stderr files)")
    # Runs the Python floor in a process of its own, so its time and RSS are measured alike.
    parser.add_argument("--python-floor", nargs=2, metavar=("DIR", "DB"),
                        help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.python_floor:
        load_lines(*args.python_floor)
        return 0
    scale = QUICK if args.quick else FULL
    lines = args.lines or scale["lines"]
    only = args.only.split(",") if args.only else list(MEASUREMENTS)
    unknown = set(only) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} "
                     f"(choose from {', '.join(MEASUREMENTS)})")
    tool = args.tool.resolve()
    if not tool.is_file():
        parser.error(f"--tool: no such file: {args.tool}")
    started, cpu_before = time.monotonic(), cpu_use()
    work = pathlib.Path(tempfile.mkdtemp(prefix="logtail2db-bench-"))
    steps = {
        "catchup": lambda: measure_catchup(work, tool, lines, scale["rounds"]),
        "stop": lambda: measure_stop(work, tool, scale["stop_trials"]),
        "latency": lambda: (measure_latency(work, tool, False, scale["latency_s"])
                            + measure_latency(work, tool, True, scale["latency_s"])),
        "lone": lambda: measure_lone(work, tool, scale["lone_lines"]),
        "idle": lambda: measure_idle(work, tool, scale["idle_s"]),
        "longline": lambda: measure_long_line(work, tool, scale["line_mb"]),
        "manyfiles": lambda: measure_many_files(work, tool, scale["files"]),
        "pg": lambda: measure_pg(work, tool, lines, FLEET_QUICK_S if args.quick else FLEET_S,
                                 scale["tries"]),
    }
    rows = []
    try:
        for name in MEASUREMENTS:
            if name in only:
                try:
                    rows += steps[name]()
                except BenchError as exc:
                    progress(f"{name} failed: {exc}")
                    rows.append(Row(name, "FAILED", "", str(exc)))
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed_s = time.monotonic() - started
    print("\n".join(header(tool, elapsed_s, others_note(cpu_before, elapsed_s)) + [""]
                    + table(rows) + [""]
                    + summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
