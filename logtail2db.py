#!/usr/bin/env python3
"""logtail2db: tail a directory of log files into SQLite, exactly once.

Usage: logtail2db.py [options] DIRECTORY DATABASE
       logtail2db.py --stats [--max-lag BYTES] DATABASE
DATABASE is an SQLite file, or a PostgreSQL URL (postgresql://user@host/logs) that a
fleet's tailers share, each as its --host-name.

Guarantees:
  - every complete line of every file in DIRECTORY is stored once, never twice;
  - entries and the file's new offset are committed in one SQLite (or PostgreSQL)
    transaction, so kill -9, power loss, restarts and (PostgreSQL) a restarted
    server or a cut network neither lose nor double anything;
  - rotation by rename or copytruncate, inode reuse and files changed while the
    tailer was stopped are told apart by (st_dev, st_ino) plus the first bytes;
  - the database is in WAL mode: readers query it while the tailer writes;
  - it runs on the standard library alone (inotifyx is used when installed;
    psycopg 3, psycopg2 or pg8000 is imported only for a PostgreSQL DATABASE).

Exit status: 0 on success or on SIGTERM/SIGINT, 1 on a fatal error (one line
"logtail2db: error: ..." on stderr), 2 on a usage error, 3 when --stats finds a
file lagging by more than --max-lag, 4 when stopped while DATABASE could not be
written or reached (what is not stored is read again on the next start).

The sections, each using only what stands above it:
  Constants and errors      tunables, Fatal, how names and sizes are shown
  inotify binding           init/add_watch/rm_watch (inotifyx or ctypes), get_events()
  File identity and reader  FileState, identify(): what a file is (resumed, truncated,
                            a copy of another...), read_complete()
  Entry parsing             one parse_<format>() per format, detect_format(), EntryBuilder
                            (lines to entries, multi-line ones held until complete)
  Stores                    the Store interface the loop calls, SqliteStore, PgStore
                            (a fleet into one PostgreSQL: COPY, a lock per host)
  Event loop                ParseWorker (a second core for big backlogs), Tailer: one
                            select(), each wake-up's reading stored in one transaction
  --stats                   a read-only look at a database
  CLI and main              the options, logging, exit codes

One line's way: Tailer.run() -> wait() (select, get_events, dispatch: the name is dirty)
-> round() -> stored() (one transaction) -> read_round() -> take_events() -> refresh()
-> read_pending() -> read() (identify() at its position) -> read_chunks() ->
read_lines() -> EntryBuilder.feed_batch() -> add_batch() -> Store.add_batch(), then
Tailer.states() -> Store.save() and COMMIT.
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import errno
import fcntl
import fnmatch
import gc
import hashlib
import io
import itertools
import json
import logging
import marshal
import operator
import os
import queue
import re
import resource
import select
import signal
import socket
import sqlite3
import stat
import struct
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timedelta, timezone

try:
    import inotifyx
except ImportError:
    inotifyx = None

__version__ = "0.1.0"

log = logging.getLogger("logtail2db")


# Constants and errors #########################################################

# Bytes per pread(); a chunk's lines are parsed together. Small enough that a chunk's
# text, lines and objects stay in a core's cache while they are walked over several
# times: 1 MiB chunks parsed 20-25% slower (measured), and a longer line is read whole.
READ_CHUNK = 256 << 10
ROUND_BYTES = 8 << 20           # bytes read per loop round before committing and looking at signals
FINGERPRINT_BYTES = 1024        # first bytes kept per file to tell a reused inode from the same file
RESUME_CHECK_BYTES = 4096       # bytes before the offset whose hash is checked before resuming
ORIGINAL_KEY_BYTES = 64         # first bytes by which a new file's possible originals are found
MAX_CHECKPOINTS = 96            # (offset, hash) pairs per followed file, for its copies, before
RECENT_CHECKPOINTS = 16         # ...thinning to the last ones and older ones spaced out
MAX_REMEMBERED = 256            # files whose content left, kept to recognise their copies
COPY_QUIET_S = 5.0              # a possible copy nobody closed is complete after this much quiet
MAX_ENTRY_BYTES = 1 << 20       # default --max-entry-bytes
BUSY_TIMEOUT_S = 0.5            # short, so that a locked database never delays a SIGTERM past 2 s
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0   # back-off when a commit fails (disk full, locked)
STOP_BUDGET_S = 0.5             # time given to the last reads and commits after SIGTERM...
STOP_ROUND_BYTES = 1 << 20      # ...each of this many bytes, so that the last one ends soon
DETACHED_POLL_S = 0.25          # a renamed-away or deleted file gets no events: poll it
ROTATE_WAIT_S = 5.0             # ...until it has been quiet this long, then close it
DIR_RETRY_S = 1.0               # how often a vanished DIRECTORY is looked for, at most...
DIR_FIRST_RETRY_S = 0.05        # ...first this soon, then twice as late each time: one
                                # replaced at once (rm -r, mkdir) is followed at once
RECONCILE_S = 60                # a full rescan this often: a backstop for missed events
DEFAULT_POLL_S = 1.0            # --poll interval when inotify cannot be had
HOLD_S = 0.25                   # a last multi-line entry is complete after this much quiet:
                                # loggers write a record (a stack trace) in one write, or in
                                # writes microseconds apart; a lone line shows within 0.3 s
MAX_ENTRY_LINES = 500           # default --max-entry-lines
MAX_OPEN_FILES = 256            # default --max-open-files, lowered for a small RLIMIT_NOFILE
MARK_EVERY_S = 60.0             # how often the ingested table notes the next entry id
PRUNE_EVERY_S = 300.0           # --keep: a sweep over the entries this often...
PRUNE_SPAN = 5000               # ...deleting among this many ids per transaction...
PRUNE_PAUSE_S = 0.05            # ...with this pause between, so ingestion never waits
PROGRESS_AFTER_S = 2.0          # a catch-up longer than this shows progress on a terminal
PROGRESS_EVERY_S = 0.25
BULK_BYTES = 4 << 20            # a backlog this big is parsed by the worker, on the other core
WORKER_BUFFER = 4 << 20         # socket buffer: the worker parses ahead while rows are inserted
FRAME_WAIT_S = 0.05             # for the rest of a frame begun: the worker sends it as it can
FRAMES_AHEAD = 2                # frames of rows the worker keeps made ahead of its sending
WORKER_FRAME = 2 << 20          # bytes first kept for a frame of rows from the worker (it grows)
GC_THRESHOLDS = (100_000, 50, 100)  # of the cyclic collector: see run_tailer()
DEFAULT_EXCLUDES = ("*.gz", "*.bz2", "*.xz", "*.zst", "*.zip", "*.lz4", "*.Z")
DB_SUFFIXES = (b"", b"-wal", b"-shm", b"-journal")
SQLITE_MAGIC = b"SQLite format 3\x00"
FORMATS = ("auto", "syslog", "journald", "json", "docker", "cri", "logfmt", "clf", "app", "java",
           "plain")
SCHEMA_VERSION = 7
MIN_SQLITE = (3, 31)            # generated columns: entries.message of schemas 2 to 5
JSON_PROBE = "SELECT json_valid('{}'), json_extract('{}', '$.a')"     # the entries view's
WAL_LIMIT_BYTES = 16 << 20      # the -wal file is truncated to this once readers let it be
PAGE_SIZE = 16384               # of a new database: rows of 100-300 B fill 16 KiB pages better
                                # than 4 KiB ones (JSON lines' database 3% smaller, measured)
CACHE_KIB = 1024                # SQLite's page cache of the tailer's connection
ROWS_PER_INSERT = 100           # rows per INSERT statement: 1.1 against 3.2 us a row, one by one
CHECKPOINT_ROWS = 20_000        # the WAL is checkpointed after this many rows are committed...
CHECKPOINT_EVERY_S = 1.0        # ...or this long after a commit, whichever comes first
CHECKPOINT_SLICE_S = 0.05       # a wait for the checkpoint that restarts the WAL looks this
                                # often whether a stop is asked for (then it ends)

# SQLite errors that pass: the batch is rolled back and retried later.
TRANSIENT_SQLITE = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN"}


EXIT_UNSTORED = 4               # stopped while the database could not be written


class Fatal(Exception):
    """Stop the tool with this one line on stderr (exit status 1)."""


# Control characters in a name shown in a message: a newline would split a diagnostic line,
# an escape sequence would reach the admin's terminal.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
CONTROL_NAMES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(name) -> str:
    """Text for messages from a name (bytes or str); never fails, never hides a byte, and
    shows control characters as escapes (\\n, \\x1b)."""
    text = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else str(name)
    return CONTROL_RE.sub(lambda m: CONTROL_NAMES.get(m[0], f"\\x{ord(m[0]):02x}"), text)


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


# inotify binding ##############################################################

IN_MODIFY = 0x00000002          # file was modified
IN_CLOSE_WRITE = 0x00000008     # writable file was closed
IN_MOVED_FROM = 0x00000040      # file was moved out of the watched directory
IN_MOVED_TO = 0x00000080        # file was moved into the watched directory
IN_CREATE = 0x00000100          # file was created
IN_DELETE = 0x00000200          # file was deleted
IN_DELETE_SELF = 0x00000400     # the watched directory itself was deleted
IN_MOVE_SELF = 0x00000800       # the watched directory itself was moved
IN_UNMOUNT = 0x00002000         # the filesystem was unmounted
IN_Q_OVERFLOW = 0x00004000      # the event queue overflowed: events were lost
IN_IGNORED = 0x00008000         # the watch was removed
IN_ONLYDIR = 0x01000000         # add_watch: fail unless the path is a directory
IN_ISDIR = 0x40000000           # the subject of the event is a directory
DIR_MASK = (IN_CLOSE_WRITE | IN_MODIFY | IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE
            | IN_DELETE_SELF | IN_MOVE_SELF)
NAME_CHANGES = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE   # the name may now be another file
DIR_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED

Event = collections.namedtuple("Event", "wd mask cookie name")
_EVENT_HEADER = struct.Struct("iIII")   # struct inotify_event: wd, mask, cookie, len; then name
_READ_EVENTS = 64 * 1024                # several hundred events per read()
_libc = None


def _libc_call(function, *args):
    """Call a libc function, retrying EINTR; -1 becomes OSError with the real errno."""
    import ctypes
    while True:
        rc = function(*args)
        if rc != -1:
            return rc
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _load_libc():
    global _libc
    if _libc is None:
        import ctypes
        # The running interpreter is linked against libc: no find_library(), which forks ldconfig.
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return _libc


def binding_name() -> str:
    return "inotifyx" if inotifyx is not None else "ctypes"


def init() -> int:
    """A new inotify fd, non-blocking and close-on-exec."""
    if inotifyx is not None:
        fd = inotifyx.init()
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return fd
    return _libc_call(_load_libc().inotify_init1, os.O_NONBLOCK | os.O_CLOEXEC)


def add_watch(fd: int, path: bytes, mask: int) -> int:
    if inotifyx is not None:
        try:
            return inotifyx.add_watch(fd, os.fsdecode(path), mask)
        except UnicodeEncodeError:
            pass    # inotifyx takes str only; a path that is not UTF-8 goes through ctypes
    return _libc_call(_load_libc().inotify_add_watch, fd, path, mask)


def rm_watch(fd: int, wd: int) -> None:
    if inotifyx is not None:
        inotifyx.rm_watch(fd, wd)
    else:
        _libc_call(_load_libc().inotify_rm_watch, fd, wd)


def _parse_events(data: bytes) -> list:
    """Events from the raw bytes of read() on an inotify fd; names stay bytes."""
    events = []
    end = len(data)
    pos = 0
    while pos + _EVENT_HEADER.size <= end:
        wd, mask, cookie, size = _EVENT_HEADER.unpack_from(data, pos)
        pos += _EVENT_HEADER.size
        name = data[pos:pos + size].rstrip(b"\0")
        pos += size
        events.append(Event(wd, mask, cookie, name))
    return events


def get_events(fd: int) -> list:
    """Drain an inotify fd: every queued event, without blocking.

    inotifyx's own get_events() is not used: it decodes names as UTF-8 and crashes
    the interpreter on a name that is not, and it lets EINTR out as an exception.

    Returns:
        A list of Event(wd, mask, cookie, name), name as bytes (b"" for the
        watched directory itself); empty when nothing is queued.
    """
    events = []
    while True:
        try:
            data = os.read(fd, _READ_EVENTS)
        except BlockingIOError:
            return events
        except InterruptedError:
            continue
        if not data:
            return events
        events.extend(_parse_events(data))


# File identity and reader #####################################################

# A file's state in the files table, in its column order: loaded at the start, committed
# with the entries it covers, remembered when its content leaves.
FileState = collections.namedtuple(
    "FileState", "id path path_bytes dev ino offset fingerprint resume_hash part format "
                 "first_seen updated gone")

# A file whose content may show up again as a copy (copytruncate, logrotate's copy, cp): one
# followed now (live: it may still be read further), or one whose content left its inode or
# DIRECTORY. checkpoints are (offset, tail_hash) pairs in ascending order, the last one where
# what is stored (live: read) of it ends.
Original = collections.namedtuple("Original", "id path format fingerprint checkpoints live")

# A file as it is now, gathered for identify(): its inode and path (as in FileState), its size,
# its first FINGERPRINT_BYTES bytes, {offset: tail_hash} for the offsets hash_offsets() asks
# for, whether its writer is done with it (complete: it closed it after its last write, or it
# has been quiet), and whether it has been quiet: no new bytes for COPY_QUIET_S.
Look = collections.namedtuple("Look", "dev ino path size head hashes complete quiet")

# What a file is, for identify(). A file something is stored of (classify()):
UNCHANGED = "unchanged"     # nothing new to read
GROWN = "grown"             # more to read from its offset
TRUNCATED = "truncated"     # shrank below its offset: what was stored of it left the inode
REPLACED = "replaced"       # its first bytes, or those before its offset, are not those stored
# A file nothing is stored of (copy_of()):
NEW = "new"                 # read it from its start
COPY = "copy"               # a copy of an original stored up to offset: read it from there
UNDECIDED = "undecided"     # it agrees with an original so far: read nothing of it yet

Verdict = collections.namedtuple("Verdict", "kind offset original")


def path_columns(path: bytes) -> dict:
    """The path and path_bytes columns of a file's state, for its absolute path."""
    try:
        return {"path": path.decode("utf-8"), "path_bytes": None}
    except UnicodeDecodeError:
        return {"path": shown(path), "path_bytes": path}


def stored_original(state: FileState) -> Original:
    """A stored file as what a copy of it would be checked against."""
    known = state.offset and state.resume_hash is not None
    checkpoints = ((state.offset, state.resume_hash),) if known else ()
    return Original(state.id, state.path, state.format, state.fingerprint, checkpoints, False)


def tail_bytes(fd: int, offset: int) -> bytes | None:
    """The RESUME_CHECK_BYTES before offset (all of them when fewer), or None when the file
    no longer reaches offset."""
    start = max(0, offset - RESUME_CHECK_BYTES)
    data = os.pread(fd, offset - start, start)
    return data if len(data) == offset - start else None


def digest(tail: bytes) -> bytes:
    return hashlib.blake2b(tail, digest_size=8).digest()


def tail_hash(fd: int, offset: int) -> bytes | None:
    """A hash of the bytes before offset (see tail_bytes()), None when the file no longer
    reaches offset. With the first bytes, it tells that a file still holds what was read
    of it up to offset."""
    tail = tail_bytes(fd, offset)
    return None if tail is None else digest(tail)


def thin_checkpoints(checkpoints: list, pos: int) -> list:
    """The checkpoints worth keeping: the last RECENT_CHECKPOINTS, and older ones spaced out
    in proportion to their distance from pos, a few dozen however long the file. A copy ends
    where its original was a moment ago (logrotate copies, syncs, then truncates): it finds
    one a little below its end. Which ones stay does not depend on when this runs: the first
    checkpoint past a multiple of 4 KiB << k stays while it is within 4 such steps of pos."""
    kept, previous = [], 0
    for offset, value in checkpoints[:-RECENT_CHECKPOINTS]:
        level = ((offset >> 12) ^ (previous >> 12)).bit_length() - 1
        if level >= 0 and 4 << (12 + level) >= pos - offset:
            kept.append((offset, value))
            previous = offset
    return kept + checkpoints[-RECENT_CHECKPOINTS:]


def agrees(fingerprint: bytes, head: bytes) -> bool:
    """Whether two files' first bytes are the same as far as both go."""
    size = min(len(fingerprint), len(head))
    return fingerprint[:size] == head[:size]


def hash_offsets(known, originals, size: int) -> set:
    """The offsets whose tail_hash() identify() needs for a file of this size."""
    offsets = set()
    if known is not None and 0 < known.offset < size and known.resume_hash is not None:
        offsets.add(known.offset)
    for original in originals:
        below = [offset for offset, _ in original.checkpoints if offset <= size]
        if below:
            offsets.add(below[-1])
    return offsets


def classify(known, look: Look) -> str:
    """What became of a file something is stored of, one verdict per rotation case.

    Args:
        known: its stored state (or, while it is followed, the state at its read position):
            offset, fingerprint (its first bytes, up to FINGERPRINT_BYTES) and resume_hash
            (the tail_hash() at offset, None when unknown).
        look: the file now.
    Returns:
        TRUNCATED when it shrank below the offset (copytruncate, or emptied by hand);
        REPLACED when its first bytes, or the bytes before the offset, are not the ones
        stored (a reused inode, or truncated and written again past the offset): either
        way what was stored of it left the inode, and what is there now is new;
        GROWN when there is more to read from the offset; UNCHANGED otherwise.
    """
    if look.size < known.offset:
        return TRUNCATED
    if not look.head.startswith(known.fingerprint):
        return REPLACED
    if look.size == known.offset:
        return UNCHANGED
    if known.resume_hash is not None and look.hashes.get(known.offset) != known.resume_hash:
        return REPLACED
    return GROWN


def copy_of(original: Original, look: Look) -> Verdict:
    """Whether a file nothing is stored of is a copy of original (whose first bytes agree).

    A copy that reaches where the original is stored up to, with the same bytes before that
    offset, is a copy up to there. One still shorter stays UNDECIDED while it may be a copy
    still being written. While its original is live, it stays UNDECIDED until it has been quiet
    for COPY_QUIET_S (its bytes are read from the original, never from both): copytruncate
    truncates the original right after copying, so a copy of an original that is not truncated
    by then is a file of its own (cp, or the same lines in two files), read in full. Once
    complete, a shorter one is a copy of its whole self when it agrees at a checkpoint past the
    first bytes (logrotate's copy missed lines the tailer had already read from the original):
    a file that merely starts like another one is never skipped.
    """
    final, final_hash = original.checkpoints[-1]
    below = [checkpoint for checkpoint in original.checkpoints if checkpoint[0] <= look.size]
    if look.size >= final and look.hashes.get(final) != final_hash or \
            look.size < final and below and look.hashes.get(below[-1][0]) != below[-1][1]:
        return Verdict(NEW, 0, None)
    if original.live:
        return Verdict(NEW, 0, None) if look.quiet else Verdict(UNDECIDED, 0, None)
    if look.size >= final:
        return Verdict(COPY, final, original)
    if not look.complete:
        return Verdict(UNDECIDED, 0, None)
    if below and (below[-1][0] == look.size or below[-1][0] > FINGERPRINT_BYTES):
        return Verdict(COPY, look.size, original)
    return Verdict(NEW, 0, None)


def identify(known, look: Look, originals=()) -> Verdict:
    """Decide what a file that appears or changes is, from what is gathered about it.

    Args:
        known: what is stored of this inode: its row (it describes the file when their
            (dev, ino) are the same, or their inode and path when a reboot renumbered the
            device), or while it is followed the state at its read position (see
            classify()); None when nothing is stored of it.
        look: the file now, with the hashes hash_offsets() asks for.
        originals: the originals whose first bytes agree with the file's (for a file
            nothing is stored of).
    Returns:
        A Verdict: for a known file, classify()'s verdict at its offset; else COPY of an
        original up to an offset, UNDECIDED while it may yet turn out to be a copy, or NEW.
    """
    if known is not None and ((known.dev, known.ino) == (look.dev, look.ino)
                              or (known.ino, known.path) == (look.ino, look.path)):
        return Verdict(classify(known, look), known.offset, None)
    verdicts = [copy_of(original, look) for original in originals
                if original.checkpoints and agrees(original.fingerprint, look.head)]
    copies = [verdict for verdict in verdicts if verdict.kind == COPY]
    if copies:
        return max(copies, key=lambda verdict: verdict.offset)
    if any(verdict.kind == UNDECIDED for verdict in verdicts):
        return Verdict(UNDECIDED, 0, None)
    return Verdict(NEW, 0, None)


class Originals:
    """What a file nothing is stored of may be a copy of, found by first bytes: the files
    followed (live) and the last MAX_REMEMBERED whose content left."""

    def __init__(self):
        self.live = {}          # id -> Tracked (anything with .state and .original())
        self.remembered = collections.OrderedDict()     # id -> Original, oldest first
        self.by_key = collections.defaultdict(set)      # first ORIGINAL_KEY_BYTES -> ids
        self.keys = {}          # id -> its key in by_key, None when its fingerprint is shorter

    def _index(self, id: int, fingerprint: bytes) -> None:
        key = fingerprint[:ORIGINAL_KEY_BYTES] if len(fingerprint) >= ORIGINAL_KEY_BYTES else None
        if self.keys.get(id, False) != key:
            self._unindex(id)
            self.keys[id] = key
            self.by_key[key].add(id)

    def _unindex(self, id: int) -> None:
        if id in self.keys:
            ids = self.by_key[self.keys.pop(id)]
            ids.discard(id)

    def follow(self, t) -> None:
        """t is followed: index it by its first bytes, once something of it is stored."""
        if t.state.fingerprint:
            self.live[t.state.id] = t
            self._index(t.state.id, t.head)

    def unfollow(self, id: int) -> None:
        if self.live.pop(id, None) is not None:
            self._unindex(id)

    def remember(self, original: Original) -> None:
        self.unfollow(original.id)
        if not (original.fingerprint and original.checkpoints):
            return      # nothing a copy could be checked against
        self.remembered[original.id] = original
        self._index(original.id, original.fingerprint)
        while len(self.remembered) > MAX_REMEMBERED:
            self._unindex(self.remembered.popitem(last=False)[0])

    def agreeing(self, head: bytes, size: int) -> list:
        """The originals whose first bytes agree with head, of a file of this size."""
        if len(head) >= ORIGINAL_KEY_BYTES:
            ids = self.by_key.get(head[:ORIGINAL_KEY_BYTES], set()) | self.by_key.get(None, set())
        else:
            ids = self.keys     # a short head may agree with any
        found = []
        for id in ids:
            source = self.live.get(id)
            if source is not None:
                if agrees(source.head, head):
                    found.append(source.original(at=size))
            elif agrees(self.remembered[id].fingerprint, head):
                found.append(self.remembered[id])
        return found


def read_complete(fd: int, offset: int, size: int = READ_CHUNK):
    """Read from offset up to the last complete line.

    Args:
        fd: an open file.
        offset: where to start.
        size: how much to read at most.
    Returns:
        (data, end, rest): data holds whole lines only (it ends with b"\\n", or is
        empty when no newline came yet), end = offset + len(data), and rest is what
        was read past the last newline, so that a caller can tell a line longer than
        it may hold.
    """
    chunk = os.pread(fd, size, offset)
    cut = chunk.rfind(b"\n") + 1
    return chunk[:cut], offset + cut, chunk[cut:]


def read_lines(fd: int, offset: int, window: int, size: int = READ_CHUNK):
    """read_complete() of size bytes, or of window bytes when no line ends within size:
    a chunk is READ_CHUNK, a line may be as long as window."""
    data, end, rest = read_complete(fd, offset, size)
    if not data and len(rest) == size < window:
        data, end, rest = read_complete(fd, offset, window)
    return data, end, rest


def last_line_end(fd: int, size: int) -> int:
    """Offset just past the last newline before size (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - READ_CHUNK)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


# Byte-order marks of texts whose lines are not split at b"\n" alone: warned about once.
WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
             (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def wide_encoding(head: bytes) -> str | None:
    """"UTF-16" or "UTF-32" when a file starts with such a byte-order mark, else None."""
    for bom, name in WIDE_BOMS:
        if head.startswith(bom):
            return name
    return None


def readers_beyond(database, log_file) -> str | None:
    """Who may read the database but perhaps not a log file stored in it (from their
    stats), as words; None when nobody."""
    if database.st_mode & 0o004 and not log_file.st_mode & 0o004:
        return "every user"
    if database.st_mode & 0o040 and not (log_file.st_mode & 0o004 or (
            log_file.st_mode & 0o040 and log_file.st_gid == database.st_gid)):
        return f"group {database.st_gid}"
    return None


def open_file(path: bytes, follow_symlinks: bool):
    """Open a log file for reading without ever blocking (a FIFO, a device)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    return os.open(path, flags)


def utf8_boundary(data: bytes, cut: int) -> int:
    """The largest cut' <= cut at which data does not split a UTF-8 character, so that
    the pieces of an over-long line each decode (data that is not UTF-8 cuts anywhere)."""
    cut = min(cut, len(data))
    for back in range(1, min(4, cut) + 1):
        byte = data[cut - back]
        if byte & 0xC0 != 0x80:     # an ASCII or lead byte: how long is its character?
            size = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return cut if back >= size else cut - back
    return cut


# Entry parsing ################################################################

# Every parser is parse_<format>(line, stamps) -> Parsed | None: one decoded line in, a tuple in
# column order out, None when the line does not fit (the caller then stores it plain, or as a
# continuation of the entry before it). Parsers never raise on bad input and do no I/O.

Parsed = collections.namedtuple("Parsed", "ts host program pid level fields message")

SEVERITIES = ("emergency", "alert", "critical", "error", "warning", "notice", "info", "debug")
FACILITIES = (  # PRI // 8, named as rsyslog names them
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)
LEVELS = {  # upper-cased level word or syslog severity digit -> level
    "TRACE": "trace", "DEBUG": "debug", "DBG": "debug", "INFO": "info", "INFORMATION": "info",
    "NOTICE": "notice", "WARN": "warning", "WARNING": "warning", "ERR": "error", "ERROR": "error",
    "CRIT": "critical", "CRITICAL": "critical", "FATAL": "critical", "ALERT": "alert",
    "EMERG": "emergency", "EMERGENCY": "emergency", "PANIC": "emergency",
    **{str(severity): name for severity, name in enumerate(SEVERITIES)},
}
# A message that states its level: "error: ...", "prog: warning: ..." (GNU error(), postfix,
# sshd, our own stderr); the word as written in lower, title or upper case.
STATED_LEVELS = {form: level for word, level in LEVELS.items() if word.isalpha()
                 for form in (word, word.lower(), word.title())}
# The first word (a letter first: most messages fail there, cheaply), and the second.
STATED_PATTERN = r"([A-Za-z][^ :]{0,61}): (?:([^ :]{1,12}): )?"
STATED_RE = re.compile(STATED_PATTERN)
NUMBER_LEVELS = {  # JSON numbers: syslog severities 0..7, pino/bunyan levels 10..60
    **dict(enumerate(SEVERITIES)),
    10: "trace", 20: "debug", 30: "info", 40: "warning", 50: "error", 60: "critical",
}
PRIORITIES = {  # "<34>" -> (level, facility): one dict lookup for the whole PRI
    f"<{pri}>": (SEVERITIES[pri % 8], FACILITIES[pri // 8]) for pri in range(192)}
MONTHS = {name: number for number, name in enumerate(
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
DIGITS = frozenset("0123456789")
SECONDS = frozenset(f"{second:02d}" for second in range(60))
THE_MINUTE, THE_COLON, THE_SECONDS = (operator.itemgetter(slice(16)),
                                      operator.itemgetter(slice(16, 17)),
                                      operator.itemgetter(slice(17, 19)))
EPOCH = datetime(1970, 1, 1)
CACHE_MINUTES = 10_000  # minutes a Stamps remembers before starting over: bounds memory on catch-up

# Timestamps. Groups: minute ("2026-11-24T13:59"), second, fraction, zone.
ISO_PATTERN = (r"([0-9]{4}[-/][0-9]{2}[-/][0-9]{2}[Tt ][0-9]{2}:[0-9]{2}):([0-9]{2})"
               r"(?:[.,]([0-9]{1,9}))?(Z|z|[ ]UTC|[+-][0-9]{2}(?::?[0-9]{2})?)?")
ISO_RE = re.compile(ISO_PATTERN)
MONTH_NAMES = "|".join(MONTHS)
BSD_MINUTE_RE = re.compile(rf"({MONTH_NAMES}) ([ 0-9][0-9]) ([0-9]{{2}}):([0-9]{{2}})")
CLF_MINUTE_RE = re.compile(  # "10/Oct/2000:13:55 -0700": the CLF time without its seconds
    rf"([0-9]{{2}})/({MONTH_NAMES})/([0-9]{{4}}):([0-9]{{2}}):([0-9]{{2}}) ([+-][0-9]{{4}})")
EPOCH_TEXT_RE = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,9})?")

ESCAPED = r'[^"\\]*(?:\\.[^"\\]*)*'  # inside "...", with backslash escapes; unrolled for speed

# RFC 5424 structured data: '[id name="value" ...]'; values escape only '"', '\' and ']'.
SD_ELEMENT_RE = re.compile(rf'\[([^ =\]"]+)((?: +[^ =\]"]+="{ESCAPED}")*) *\]')
SD_PARAM_RE = re.compile(rf'([^ =\]"]+)="({ESCAPED})"')
SD_ESCAPE_RE = re.compile(r'\\(["\\\]])')

# NCSA common/combined as Apache and nginx write them by default. Text after the combined fields
# (nginx's "main" adds "$http_x_forwarded_for") is allowed and stays in the message only.
CLF_RE = re.compile(
    rf'(\S+) (\S+) (\S+) \[([^\]]*)\] "({ESCAPED})" ([0-9]{{3}}) ([0-9]{{1,18}}|-)'
    rf'(?: "({ESCAPED})" "({ESCAPED})")?(?:\s|$)', re.ASCII)
CLF_ESCAPE_RE = re.compile(r'\\(["\\])')  # Apache's \" and \\; nginx writes \x22, left as is

# Application loggers: a timestamp (optionally in brackets), then the level as the first word, or
# as the second after a [thread] (log4j2) or a logger name (Python's cookbook: "- name - LEVEL").
# Level words count in upper case, as those layouts write them, or in any case before a tab (zap);
# so a Go log line "error opening x" keeps its first word. No level word: the rest is the message.
UPPER_LEVELS = "|".join(sorted((word for word in LEVELS if word.isalpha()), key=len, reverse=True))
APP_RE = re.compile(rf"""
    \[?(?P<ts>{ISO_PATTERN})\]?(?:[ \t]+|$)
    (?:(?:\[(?P<thread>[^\]]*)\]|(?:-[ \t]+)?(?P<logger>[^\s\[\]]+)(?:[ \t]+-)?)[ \t]+)??
    (?P<level>{UPPER_LEVELS}|(?i:{UPPER_LEVELS})(?=\t))(?=[ \t]|$)
""", re.VERBOSE)
APP_TIME_RE = re.compile(rf"\[?({ISO_PATTERN})\]?(?:[ \t]+|$)")
# What the default layouts put between the level and the message, tried in order; the message
# starts where the first match ends (the last pattern always matches).
APP_TAIL_RES = tuple(re.compile(pattern) for pattern in (
    # Spring Boot: "4242 --- [app] [main] o.s.b.StartupInfoLogger : msg"
    r"[ \t]+(?P<pid>[0-9]+)[ \t]+---[ \t]+(?:\[(?P<thread>[^\]]*)\][ \t]+)*"
    r"(?P<logger>\S+)[ \t]+:(?:[ \t]|$)",
    r"\t(?:(?P<logger>[^\t]+)\t)?(?P<caller>\S+:[0-9]+)(?:\t|$)",  # zap: [name\t]file.go:12\tmsg
    r"[ \t]+(?P<logger>\w[\w.:/$<>-]*?):(?:[ \t]|$)",  # Python "%(name)s: msg", tracing's target
    r"[ \t]+(?P<logger>\w[\w.:/$<>-]*)[ \t]+-(?:[ \t]|$)",  # log4j2 "%logger - %msg"
    r"[ \t]+\[(?P<logger>[^\]\s]+)\](?:[ \t]|$)",  # log4j "[%c] %m"
    r"[ \t]+(?P<logger>[^\s\]]+)\](?:[ \t]|$)",  # env_logger "[time LEVEL target] msg"
    r"[ \t]+-(?:[ \t]|$)|[ \t]*",  # Python cookbook "LEVEL - msg", or the message right away
))
# Java's default layouts: logback's "%d{HH:mm:ss.SSS} [%thread] %-5level %logger{36} - %msg"
# (log4j2's default too), and log4j2's "%d [%t] %-5level %c - %m" and "%d %-5level [%t] %c - %m".
# logback's time has no date: Stamps.clock() dates it by the file.
JAVA_RE = re.compile(rf"""
    (?:(?P<date>{ISO_PATTERN})|(?P<clock>[0-9]{{2}}:[0-9]{{2}}:[0-9]{{2}}(?:[.,][0-9]{{1,9}})?))
    [ ]+(?:\[(?P<thread>[^\]]*)\][ ]+(?P<level>{UPPER_LEVELS})
          |(?P<level_first>{UPPER_LEVELS})[ ]+\[(?P<thread_after>[^\]]*)\])
    [ ]+(?P<logger>[^\s\[\]]+)[ ]+-(?:[ ]|$)
""", re.VERBOSE)
LOGFMT_RE = re.compile(rf'([^\s="]+)=("{ESCAPED}"|\S*)')  # slog TextHandler, logrus
LOGFMT_START_RE = re.compile(r'[^\s="]+=')   # a logfmt line begins with its first key
LOGFMT_TIME_KEYS = ("time", "ts", "t")  # slog and logrus; go-kit, Prometheus, Loki; Grafana
LOGFMT_LEVEL_KEYS = ("level", "lvl")
LOGFMT_MESSAGE_KEYS = ("msg", "message")

UNICODE_ESCAPE_RE = re.compile(r"\\u")
SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud800": JSON can spell lone surrogates
TIME_KEYS = ("time", "timestamp", "ts", "@timestamp")
LEVEL_KEYS = ("level", "severity", "lvl", "levelname")
MESSAGE_KEYS = ("msg", "message", "event")    # MESSAGE_SQL reads them in this order too
JSON_KEY_TEXT = {key: json.dumps(key) for key in MESSAGE_KEYS}
HOST_KEYS = ("host", "hostname")
PROGRAM_KEYS = ("program", "app", "service")
# A column's key whose value is null says only that the column is empty: no field of its own.
COLUMN_KEYS = frozenset(TIME_KEYS + LEVEL_KEYS + MESSAGE_KEYS + HOST_KEYS + PROGRAM_KEYS
                        + ("pid",))

# journalctl -o json: every value is text; a value that is not UTF-8 is an array of its bytes,
# a field given more than once an array of its values. The key journalctl always writes tells
# an entry from other JSON.
JOURNAL_TIME = "__REALTIME_TIMESTAMP"   # microseconds since the epoch, as decimal text
JOURNAL_TIME_KEY = f'"{JOURNAL_TIME}":'


def normalize_level(word: str) -> str | None:
    """The level a word (WARN, err, Critical, "3", ...) stands for, or None."""
    return LEVELS.get(word.upper())


def to_pid(value) -> int | None:
    """A process id from decimal text or an int, or None (SQLite integers are 64-bit)."""
    if isinstance(value, str) and value.isdecimal() and len(value) < 10:
        value = int(value)
    return value if type(value) is int and 0 <= value < 2**32 else None


def minute_text(moment: datetime) -> str:
    """'YYYY-MM-DD HH:MM' (strftime's %Y does not pad years before 1000)."""
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} "
            f"{moment.hour:02d}:{moment.minute:02d}")


def utc_minute(year, month, day, hour, minute, offset_min=None) -> str | None:
    """UTC minute text for a wall-clock minute offset_min east of UTC, local time when None."""
    try:
        wall = datetime(year, month, day, hour, minute)
        if offset_min is None:
            return minute_text(wall.astimezone(timezone.utc))
        return minute_text(wall - timedelta(minutes=offset_min))
    except (ValueError, OverflowError, OSError):  # no such day (Feb 30) or out of the C range
        return None


def zone_minutes(zone: str) -> int:
    """Minutes east of UTC for 'Z', ' UTC', '+01:00', '+0100' or '+01'."""
    if zone in ("Z", "z", " UTC"):
        return 0
    digits = zone[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + int(digits[2:] or 0)
    return -minutes if zone[0] == "-" else minutes


def with_fraction(ts: str, fraction: str) -> str | None:
    """ts with a fraction of a second (1 to 9 digits, cut to microseconds), or None."""
    if 0 < len(fraction) < 10 and fraction.isascii() and fraction.isdigit():
        return f"{ts}.{fraction.ljust(6, '0')[:6]}"
    return None


def remember(cache: dict, key, value):
    """Store value (unless None) under key, starting over when the cache is full; return it."""
    if value is not None:
        if len(cache) >= CACHE_MINUTES:
            cache.clear()
        cache[key] = value
    return value


class Stamps:
    """Timestamps to UTC text 'YYYY-MM-DD HH:MM:SS[.ffffff]', cached per minute; one per tailer.

    A time without a zone is local time, read from TZ when its minute is first seen. DST
    changes fall on whole minutes, so each distinct minute is converted once and the seconds
    appended. A local time that occurs twice (fall-back) is read as the first occurrence, still
    in summer time; one skipped by spring-forward is read with the summer offset (datetime's
    fold=0 for both: Berlin's 02:30 is 00:30 UTC on both change days).
    """

    def __init__(self):
        # Minute keys -> UTC minute text, one dict per format so keys cannot meet by accident.
        self.bsd_minutes = {}  # "Nov 24 13:59", for the current reference year
        self.iso_minutes = {}  # "2026-11-24T13:59" + zone as written
        self.clf_minutes = {}  # "24/Nov/2026:13:59 +0100"
        self.epoch_minutes = {}  # minutes since 1970
        self.clock_minutes = {}  # "13:59", "13:59-" for the day before, on the reference day
        self.reference = None  # (year, month) of the file being parsed, local time
        self.reference_days = None  # its (year, month, day) and the day before's
        self.reference_clock = None  # its time of day, "HH:MM:SS"
        self.set_reference(time.time())

    def set_reference(self, mtime_s: float) -> None:
        """Date year-less BSD timestamps and date-less times of day by this file
        modification time."""
        local = time.localtime(mtime_s)
        if (local.tm_year, local.tm_mon) != self.reference:
            self.reference = (local.tm_year, local.tm_mon)
            self.bsd_minutes = {}
        day = (local.tm_year, local.tm_mon, local.tm_mday)
        if self.reference_days is None or day != self.reference_days[0]:
            try:
                before = datetime(*day) - timedelta(days=1)
            except OverflowError:  # a file dated 1 January of year 1
                before = datetime(*day)
            self.reference_days = (day, (before.year, before.month, before.day))
            self.clock_minutes = {}
        self.reference_clock = f"{local.tm_hour:02d}:{local.tm_min:02d}:{local.tm_sec:02d}"

    def bsd(self, text: str) -> str | None:
        """'Nov 24 13:59:19' or 'Nov  4 03:05:09' (local time, year from the reference)."""
        if (len(text) != 15 or text[12] != ":" or not "0" <= text[13] <= "5"
                or text[14] not in DIGITS):
            return None
        head = self.bsd_minutes.get(text[:12])
        if head is None:
            match = BSD_MINUTE_RE.fullmatch(text, 0, 12)
            if match is None:
                return None
            month_name, day, hour, minute = match.groups()
            month = MONTHS[month_name]
            # A file modified in January holding "Dec 31" lines was written last year.
            year = self.reference[0] - (month > self.reference[1])
            head = remember(self.bsd_minutes, text[:12],
                            utc_minute(year, month, int(day), int(hour), int(minute)))
            if head is None:
                return None
        return head + text[12:]

    def iso(self, text: str) -> str | None:
        """ISO 8601 / RFC 3339, also with '/' (Go's log) and ',' (Python); no zone: local time."""
        # Cut by position; a cached minute and zone passed ISO_RE when first seen, so a hit
        # leaves only the seconds and the fraction to check, cheaper than the regex.
        second, rest = text[17:19], text[19:]
        fraction = None
        if rest[:1] in (".", ","):
            zone = rest[1:].lstrip("0123456789")
            fraction = rest[1:len(rest) - len(zone)]
        else:
            zone = rest
        key = text[:16] + zone
        head = self.iso_minutes.get(key) or self.iso_minute(text, key)
        if (head is None or text[16:17] != ":" or len(second) != 2
                or not "0" <= second[0] <= "5" or second[1] not in DIGITS):
            return None
        if fraction is None:
            return f"{head}:{second}"
        return f"{head}:{second}.{fraction.ljust(6, '0')[:6]}" if 0 < len(fraction) < 10 else None

    def iso_each(self, texts: list) -> list:
        """[self.iso(text) for text in texts] (the distinct times of a chunk's column), a
        step for all at once when they are laid out as the first: of its length, with its
        fraction's length, if any (0.30 against 0.42 us a time, measured). Any other list
        goes time by time."""
        first = texts[0]
        size = len(first)
        fraction = first[19:20] in (".", ",")
        zone_at = size - len(first[20:].lstrip("0123456789")) if fraction else 19
        digits = zone_at - 20
        if (size < 19 or set(map(len, texts)) != {size} or fraction and not 0 < digits < 10
                or set(map(THE_COLON, texts)) != {":"}):
            return list(map(self.iso, texts))
        if fraction:
            fractions = list(map(operator.itemgetter(slice(20, zone_at)), texts))
            if (not set(map(operator.itemgetter(19), texts)) <= {".", ","}
                    or not all(map(str.isdigit, fractions)) or not all(map(str.isascii, fractions))
                    or zone_at < size and set(map(operator.itemgetter(zone_at), texts)) & DIGITS):
                return list(map(self.iso, texts))
        elif size > 19 and set(map(operator.itemgetter(19), texts)) & {".", ","}:
            return list(map(self.iso, texts))
        seconds = list(map(THE_SECONDS, texts))
        if not set(seconds) <= SECONDS:
            return list(map(self.iso, texts))
        keys = list(map(operator.add, map(THE_MINUTE, texts),
                        map(operator.itemgetter(slice(zone_at, None)), texts)))
        heads = list(map(self.iso_minutes.get, keys))
        if None in heads:   # minutes first seen: each converted once
            for key, text in dict(itertools.compress(zip(keys, texts),
                                                     map(operator.not_, heads))).items():
                self.iso_minute(text, key)
            heads = list(map(self.iso_minutes.get, keys))
            if None in heads:
                return list(map(self.iso, texts))
        if not fraction:
            return list(map(":".join, zip(heads, seconds)))
        pad = "0" * (6 - digits)    # none past 6 digits, which are cut to 6
        return [f"{head}:{second}.{part[:6]}{pad}"
                for head, second, part in zip(heads, seconds, fractions)]

    def iso_minute(self, text: str, key: str) -> str | None:
        """UTC minute text of an ISO timestamp not seen before, remembered under key."""
        match = ISO_RE.fullmatch(text)
        if match is None:
            return None
        minute, _, _, zone = match.groups()
        wall = (int(minute[:4]), int(minute[5:7]), int(minute[8:10]),
                int(minute[11:13]), int(minute[14:16]))
        return remember(self.iso_minutes, key,
                        utc_minute(*wall, zone_minutes(zone) if zone else None))

    def clf(self, text: str) -> str | None:
        """'10/Oct/2000:13:55:36 -0700', as Apache's %t and nginx's $time_local write it."""
        if (len(text) != 26 or text[17] != ":" or not "0" <= text[18] <= "5"
                or text[19] not in DIGITS):
            return None
        key = text[:17] + text[20:]
        head = self.clf_minutes.get(key)
        if head is None:
            match = CLF_MINUTE_RE.fullmatch(key)
            if match is None:
                return None
            day, month_name, year, hour, minute, zone = match.groups()
            wall = (int(year), MONTHS[month_name], int(day), int(hour), int(minute))
            head = remember(self.clf_minutes, key, utc_minute(*wall, zone_minutes(zone)))
            if head is None:
                return None
        return head + text[17:20]

    def clock(self, text: str) -> str | None:
        """'13:59:19.123', a time of day alone (logback's default layout): local time on the
        reference day, or on the day before when it is later in the day than the reference,
        since a line is written before its file's modification time (RFC 3164's rule for
        the year, applied to the day)."""
        second, rest = text[6:8], text[8:]
        if (len(text) < 8 or text[2] != ":" or text[5] != ":" or len(second) != 2
                or not "0" <= second[0] <= "5" or second[1] not in DIGITS):
            return None
        day_before = text[:8] > self.reference_clock
        key = text[:5] + "-" if day_before else text[:5]
        head = self.clock_minutes.get(key)
        if head is None:
            hour, minute = text[:2], text[3:5]
            if not (hour + minute).isascii() or not (hour + minute).isdigit():
                return None
            day = self.reference_days[1 if day_before else 0]
            head = remember(self.clock_minutes, key,
                            utc_minute(*day, int(hour), int(minute)))
            if head is None:
                return None
        if not rest:
            return f"{head}:{second}"
        return with_fraction(f"{head}:{second}", rest[1:]) if rest[0] in ".," else None

    def epoch(self, number) -> str | None:
        """Epoch seconds, or milli-, micro- or nanoseconds told apart by size."""
        if type(number) not in (int, float):  # bool is an int, but JSON true is not a time
            return None
        digits = 9 if number > 1e17 else 6 if number > 1e14 else 3 if number > 1e11 else 0
        try:
            if type(number) is int:
                micros = number * 1_000_000 // 10**digits
            else:
                micros = round(number * 10.0 ** (6 - digits))
        except (ValueError, OverflowError):  # NaN or infinity
            return None
        return self.micros(micros, bool(digits) or type(number) is float)

    def micros(self, micros: int, fraction: bool = True) -> str | None:
        """Microseconds since the epoch (journald's __REALTIME_TIMESTAMP)."""
        minute, micros = divmod(micros, 60_000_000)
        head = self.epoch_minutes.get(minute)
        if head is None:
            try:
                utc = EPOCH + timedelta(minutes=minute)
            except OverflowError:  # past year 9999
                return None
            head = remember(self.epoch_minutes, minute, minute_text(utc))
        second, micro = divmod(micros, 1_000_000)
        if fraction:
            return f"{head}:{second:02d}.{micro:06d}"
        return f"{head}:{second:02d}"


def read_time(text: str, stamps: Stamps) -> str | None:
    """UTC text for a timestamp in any form Stamps reads (epoch as digits), or None."""
    ts = stamps.iso(text) or stamps.bsd(text) or stamps.clf(text)
    if ts is None and EPOCH_TEXT_RE.fullmatch(text):
        ts = stamps.epoch(float(text) if "." in text else int(text))
    return ts


def stated_level(message: str) -> str | None:
    """The level a message states at its start ('error: disk full', 'logtail2db: warning:
    ...'), or None; the words stay in the message."""
    match = STATED_RE.match(message)
    return None if match is None else STATED_LEVELS.get(match[1]) or STATED_LEVELS.get(match[2])


def read_pri(line: str) -> tuple[str, str, int] | None:
    """(level, facility, index after '>') for a line starting with '<PRI>', or None."""
    end = line.find(">", 2, 5) + 1
    names = PRIORITIES.get(line[:end])  # also rejects "" when there is no '>', and "<034>"
    return None if names is None else (*names, end)


def unescape_sd(value: str) -> str:
    """An RFC 5424 PARAM-VALUE with its \\" \\\\ \\] escapes undone."""
    return SD_ESCAPE_RE.sub(r"\1", value) if "\\" in value else value


def parse_rfc5424(line: str, stamps: Stamps) -> Parsed | None:
    """RFC 5424: '<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG', '-' meaning absent."""
    pri = read_pri(line)
    if pri is None or not line.startswith("1 ", pri[2]):
        return None
    level, facility, start = pri
    parts = line[start + 2:].split(" ", 5)
    if len(parts) < 6 or "" in parts[:5]:
        return None
    stamp, host, app, procid, msgid, rest = parts
    ts = None if stamp == "-" else stamps.iso(stamp)
    if ts is None and stamp != "-":
        return None
    fields = {"facility": facility}
    if msgid != "-":
        fields["msgid"] = msgid
    pid = to_pid(procid)
    if pid is None and procid != "-":
        fields["procid"] = procid
    if rest[:1] == "-":
        end = 1
    else:
        sd, end = {}, 0
        while rest.startswith("[", end):
            element = SD_ELEMENT_RE.match(rest, end)
            if element is None:
                return None
            sd[element[1]] = {name: unescape_sd(value)
                              for name, value in SD_PARAM_RE.findall(element[2])}
            end = element.end()
        if not sd:
            return None
        fields["sd"] = sd
    if rest[end:end + 1] not in ("", " "):
        return None
    message = rest[end + 1:]
    if message[:1] == "\ufeff":  # RFC 5424 marks UTF-8 MSG with a BOM
        message = message[1:]
    return (ts, None if host == "-" else host, None if app == "-" else app, pid, level,
            fields, message)


def _parse_syslog(line: str, stamps: Stamps) -> Parsed | None:
    """parse_syslog() for every shape."""
    level = fields = None
    start = 0
    if line[:1] == "<":
        pri = read_pri(line)
        if pri is None:
            return None
        level, facility, start = pri
        if line.startswith("1 ", start):
            return parse_rfc5424(line, stamps)
        fields = {"facility": facility}
    if line[start + 3:start + 4] == " " and line[start:start + 3] in MONTHS:
        host_at = start + 16
        ts = stamps.bsd(line[start:host_at - 1])
        if line[host_at - 1:host_at] == "." and ts is not None:    # journalctl -o short-precise
            host_at = line.find(" ", host_at) + 1
            ts = with_fraction(ts, line[start + 16:host_at - 1]) if host_at else None
        elif line[host_at - 1:host_at] != " ":
            ts = None
    elif line[start:start + 1] in DIGITS:
        host_at = line.find(" ", start) + 1
        ts = stamps.iso(line[start:host_at - 1]) if host_at else None
    else:
        return None  # most continuation lines leave here, at the first character or two
    if ts is None:
        return None
    host, _, rest = line[host_at:].partition(" ")
    if not host:
        return None
    tag, _, message = rest.partition(" ")
    if len(tag) < 2 or tag[-1] != ":":
        return ts, host, None, None, level or stated_level(rest), fields, rest
    program, pid = tag[:-1], None
    if program[-1] == "]":
        name, _, number = program[:-1].rpartition("[")
        if name and number.isdecimal() and len(number) < 10:  # to_pid, inlined on the hot path
            program, pid = name, int(number)
    return ts, host, program, pid, level or stated_level(message), fields, message


# The usual shape of a syslog file's line, on the hot path of a catch-up; parse_syslog()
# reads it exactly as its general code above would (a test holds the two to it).
# Its lookahead reads the words stated_level() reads: in the regex that costs less than any
# test in Python.
SYSLOG_RE = re.compile(rf"(?:{MONTH_NAMES}) [ 0-9][0-9] [0-9]{{2}}:[0-9]{{2}}:[0-5][0-9] "
                       rf"([^ ]+) ([^ \[\]:]+)(?:\[([0-9]{{1,9}})\])?: (?={STATED_PATTERN})?")


def parse_syslog(line: str, stamps: Stamps) -> Parsed | None:
    """RFC 3164 as rsyslog and syslog-ng write files: 'Nov 24 13:59:19 host prog[pid]: msg'.

    Also fractions of a second (journalctl -o short-precise), an RFC 3339 time in place of
    the BSD one (-o short-iso), an optional '<PRI>' (giving level and facility), and whole
    RFC 5424 lines. No 'tag:' after the host: program None and the message is the rest ("last
    message repeated 3 times"). Without a PRI, a message stating its level gives it.
    """
    match = SYSLOG_RE.match(line)
    if match is not None:
        head = stamps.bsd_minutes.get(line[:12])
        ts = head + line[12:15] if head is not None else stamps.bsd(line[:15])
        if ts is not None:
            host, program, pid, first, second = match.groups()
            level = first and (STATED_LEVELS.get(first) or STATED_LEVELS.get(second))
            return ts, host, program, pid and int(pid), level, None, line[match.end():]
    return _parse_syslog(line, stamps)


# SYSLOG_RE over a whole chunk: a match a line, its head (up to the message) a group too; no
# group can cross a line's end. Any three letters pass as the month, cheaper than the names:
# the minutes are read by Stamps.bsd(), which knows them.
STATED_IN_LINE = STATED_PATTERN.replace("[^ :]", r"[^ :\n]")
SYSLOG_CHUNK_RE = re.compile(
    rf"^(([A-Z][a-z][a-z] [ 0-9][0-9] [0-9]{{2}}:[0-9]{{2}})(:[0-5][0-9]) ([^ \n]+) "
    rf"([^ \[\]:\n]+)(?:\[([0-9]{{1,9}})\])?: (?={STATED_IN_LINE})?).*$", re.MULTILINE)


def syslog_chunk(text: str, stamps: Stamps):
    """The usual syslog chunk read in one call: (SYSLOG_CHUNK_RE's groups of each line that
    matched, {'Nov 24 13:59': its UTC minute}), or None when a minute is not a date. Every
    line matched when there are as many matches as lines, and then each line's groups are
    what parse_syslog() reads of it (a test holds them to it)."""
    found = SYSLOG_CHUNK_RE.findall(text)
    minutes = {}
    for minute in set(map(operator.itemgetter(1), found)):
        ts = stamps.bsd(minute + ":00")
        if ts is None:
            return None
        minutes[minute] = ts[:-3]
    return found, minutes


def scrub_surrogates(value):
    """value with lone surrogates in its strings made U+FFFD: SQLite cannot encode them."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {scrub_surrogates(key): scrub_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [scrub_surrogates(item) for item in value]
    return value


_RAW_DECODE = json.JSONDecoder().raw_decode
JSON_SPACE = " \t\n\r"


def load_json(text: str):
    """json.loads, minus lone surrogates ('\\ud800' is valid JSON but not storable text)."""
    start = 0 if text[:1] not in JSON_SPACE else len(text) - len(text.lstrip(JSON_SPACE))
    value, end = _RAW_DECODE(text, start)   # json.loads' own wrapper costs as much again
    if end != len(text) and text[end:].strip(JSON_SPACE):
        raise ValueError(f"extra data after the JSON value at {end}")
    if "\\u" in text and SURROGATE_ESCAPE_RE.search(text):    # the substring test is cheaper
        return scrub_surrogates(value)
    return value


def pop_first(obj: dict, keys, convert, *args):
    """Remove and return convert(obj[key], *args) for the first key whose value converts."""
    for key in keys:
        if key in obj:
            value = convert(obj[key], *args)
            if value is not None:
                del obj[key]
                return value
    return None


def text_or_none(value):
    """value if it is text, else None."""
    return value if isinstance(value, str) else None


def json_time(value, stamps: Stamps) -> str | None:
    """UTC text for a JSON time: ISO text or an epoch number."""
    return stamps.iso(value) if isinstance(value, str) else stamps.epoch(value)


def json_times(values: list, stamps: Stamps) -> list:
    """json_time() of each of a column's distinct values: all at once when all are text."""
    if values and set(map(type, values)) == {str}:
        return stamps.iso_each(values)
    return [json_time(value, stamps) for value in values]


def json_texts(values: list) -> list:
    """text_or_none() of each value: values itself when they are all text."""
    if set(map(type, values)) <= {str}:
        return values
    return list(map(text_or_none, values))


def json_pids(values: list) -> list:
    """to_pid() of each value: values itself when they are all ints that are pids, as
    nearly every pid of a JSON line is (a Python call for each cost 0.1 us a line)."""
    if set(map(type, values)) == {int} and min(values) >= 0 and max(values) < 2**32:
        return values
    return list(map(to_pid, values))


def json_levels(values: list) -> list:
    """json_level() of each value."""
    return list(map(json_level, values))


def json_level(value) -> str | None:
    """The level of a JSON value: a word, a syslog severity or a pino/bunyan number."""
    if isinstance(value, str):
        return normalize_level(value)
    return NUMBER_LEVELS.get(value) if type(value) is int else None


def journal_text(value) -> str | None:
    """The text of a journal field's value: bad UTF-8 made U+FFFD, the first of several."""
    if isinstance(value, list) and value and not all(type(item) is int for item in value):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(type(item) is int for item in value):
        try:
            return bytes(value).decode("utf-8", "replace")
        except ValueError:  # a number that is no byte
            return None
    return None


def journal_time(value, stamps: Stamps) -> str | None:
    """UTC text for __REALTIME_TIMESTAMP, to the microsecond."""
    if isinstance(value, str) and value.isascii() and value.isdecimal() and len(value) < 20:
        return stamps.micros(int(value))
    return None


def journal_entry(obj: dict, line: str, stamps: Stamps) -> Parsed:
    """The columns of a journal entry (a dict from journalctl -o json); the rest to fields."""
    ts = pop_first(obj, (JOURNAL_TIME,), journal_time, stamps)
    level = pop_first(obj, ("PRIORITY",), json_level)
    message = pop_first(obj, ("MESSAGE",), journal_text)
    if message is not None and obj.get("_TRANSPORT") == "stdout":
        # A service's stdout and stderr get the unit's one priority (info unless set):
        # the level its line states is the program's own.
        level = stated_level(message) or level
    host = pop_first(obj, ("_HOSTNAME",), journal_text)
    program = pop_first(obj, ("SYSLOG_IDENTIFIER", "_COMM"), journal_text)
    pid = pop_first(obj, ("_PID", "SYSLOG_PID"), to_pid)
    return ts, host, program, pid, level, obj or None, line if message is None else message


def parse_journald(line: str, stamps: Stamps) -> Parsed | None:
    """journalctl -o json: one journal entry per line."""
    if line[:1] != "{" or JOURNAL_TIME_KEY not in line:
        return None
    try:
        obj = load_json(line)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the decoder goes
        return None
    if not isinstance(obj, dict) or JOURNAL_TIME not in obj:
        return None
    return journal_entry(obj, line, stamps)


# The columns' keys of JSON objects with the same keys in the same order (one program's lines):
# key tuple -> (time, level, message, host, program, pid key or None, the other keys, those
# of them that are a column's too).
JSON_PLANS = {}
MAX_JSON_PLANS = 1000


def json_plan(keys: tuple) -> tuple:
    """For objects with these keys, the first key of each column's that is there, and the
    keys left for fields."""
    taken = [next((key for key in candidates if key in keys), None) for candidates in
             (TIME_KEYS, LEVEL_KEYS, MESSAGE_KEYS, HOST_KEYS, PROGRAM_KEYS, ("pid",))]
    if len(JSON_PLANS) >= MAX_JSON_PLANS:
        JSON_PLANS.clear()
    rest = tuple(key for key in keys if key not in taken)
    plan = JSON_PLANS[keys] = (*taken, rest, tuple(key for key in rest if key in COLUMN_KEYS))
    return plan


def parse_json(line: str, stamps: Stamps) -> Parsed | None:
    """One JSON object per line; keys not used for a column (or not usable) go to fields.
    A journal entry is read as parse_journald() reads it. Any other object: a column takes
    the first of its keys whose value it can use; when that is the first of its keys present
    (nearly always), the plan for the line's keys says which, without a search (see
    _parse_json for the rest)."""
    if line[:1] != "{" and line.lstrip(JSON_SPACE)[:1] != "{":
        return None
    try:
        obj = load_json(line)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the decoder goes
        return None
    if type(obj) is not dict:
        return None
    if JOURNAL_TIME in obj:
        return journal_entry(obj, line, stamps)
    keys = tuple(obj)
    plan = JSON_PLANS.get(keys) or json_plan(keys)
    time_key, level_key, message_key, host_key, program_key, pid_key, rest, also = plan
    ts = json_time(obj[time_key], stamps) if time_key is not None else None
    level = json_level(obj[level_key]) if level_key is not None else None
    message = obj[message_key] if message_key is not None else line
    host = obj[host_key] if host_key is not None else None
    program = obj[program_key] if program_key is not None else None
    pid = to_pid(obj[pid_key]) if pid_key is not None else None
    if (time_key is not None and ts is None or level_key is not None and level is None
            or message_key is not None and type(message) is not str
            or host_key is not None and type(host) is not str
            or program_key is not None and type(program) is not str
            or pid_key is not None and pid is None and obj[pid_key] is not None
            or also and None in [obj[key] for key in also]):
        return _parse_json(obj, line, stamps)   # a value a column cannot use: look further
    return ts, host, program, pid, level, {key: obj[key] for key in rest} or None, message


def no_constant(name: str):
    """Refuse NaN, Infinity and -Infinity, which Python's JSON reads and SQLite's does not:
    a chunk with one is parsed line by line, so that every line whose message the entries
    view reads by key is JSON to both (keyed_messages()), even where a key twice hides it."""
    raise ValueError(f"{name} is not JSON to SQLite")


_SCAN_JSON = json.JSONDecoder(parse_constant=no_constant).scan_once     # json.loads' own core
OBJECT_COMMA_RE = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*\{")
FIRST, LAST = operator.itemgetter(0), operator.itemgetter(-1)


def json_objects(text: str, lines: list) -> list | None:
    """The object each line of a chunk (text, cut in lines) is from its first character to
    its last, as scan_once() reads it alone; None when a line is anything else."""
    count = len(lines)
    try:
        braced = set(map(FIRST, lines)) == {"{"} and set(map(LAST, lines)) == {"}"}
    except IndexError:  # an empty line
        return None
    if braced and not OBJECT_COMMA_RE.search(text):
        # Every line from "{" to "}": read as one array, one scan for the chunk. The array's
        # values are the lines' own when it ends at its end and holds as many objects: a
        # comma between two of them that is not one of the joins has one's "}" before it
        # and the next one's "{" after it within a line, which the regex rules out. Besides
        # a scan less a line, the lines' objects share their keys' strings (the scanner's
        # memo lasts a scan): a chunk's JSON cost a fifth less CPU, measured.
        array = "[" + ",".join(lines) + "]"
        try:
            objs, end = _SCAN_JSON(array, 0)
        except (StopIteration, ValueError, RecursionError):     # a line is no JSON
            return None
        if end != len(array) or len(objs) != count:
            return None
    else:
        try:
            objs, ends = zip(*[_SCAN_JSON(line, 0) for line in lines])
        except (StopIteration, ValueError, RecursionError):     # not JSON from the first byte
            return None
        if ends != tuple(map(len, lines)):
            return None
    return objs if set(map(type, objs)) == {dict} else None


def json_chunk(text: str, lines: list, stamps: Stamps) -> tuple | None:
    """parse_json() of each line of a chunk (text, cut in lines) whose every line is an
    object and whose values every column can use, as parse_json() reads them, column by
    column, each distinct value converted once: the lists of the lines' ts, host, program,
    pid, level, fields (None: no line has fields) and message, and whether the entries view
    reads every message by its key (see keyed_messages(); never with fields). None for any
    other chunk, which parse_json() reads line by line (a test holds the two to each
    other)."""
    # Not load_json()'s substring test first: over a whole chunk a regex is three times
    # faster (0.3 against 0.95 ms a MiB, measured).
    escape = UNICODE_ESCAPE_RE.search(text)
    if escape is not None and SURROGATE_ESCAPE_RE.search(text, escape.start()):
        return None
    objs = json_objects(text, lines)
    if objs is None:
        return None
    first = tuple(objs[0])
    plan = JSON_PLANS.get(first) or json_plan(first)
    if not plan[6] and JOURNAL_TIME not in first and set(map(len, objs)) == {len(first)}:
        # Every key of the first object is a column's, and the others have as many keys:
        # they have the same keys if each has the column's keys (a KeyError if not), which
        # is cheaper to see than each object's keys.
        try:
            columns = json_columns(objs, lines, stamps, {first: plan}, None)
        except KeyError:
            pass
        else:
            return columns and (*columns, escape is None
                                and keyed_messages(text, {first: plan}, None, len(lines)))
    keys = list(map(tuple, objs))
    plans = {key: JSON_PLANS.get(key) or json_plan(key) for key in set(keys)}
    if any(JOURNAL_TIME in key or plan[7] for key, plan in plans.items()):
        return None     # journal entries; a column's keys in fields, which a null may leave
    columns = json_columns(objs, lines, stamps, plans, keys)
    if columns is None:
        return None
    return *columns, (escape is None and columns[5] is None
                      and keyed_messages(text, plans, keys, len(lines)))


def keyed_messages(text: str, plans: dict, keys, count: int) -> bool:
    """Whether the entries view reads the message of each of json_columns()' lines (text
    without "\\u", count lines, with these plans and keys) by its key (MESSAGE_SQL's
    msg_at 0): the first of MESSAGE_KEYS there that is not null, by its name in raw. Their
    every key is a column's: the only one of MESSAGE_KEYS a line has is its message's; and
    without "\\u" every name in the text is spelled as it reads. A key is then spelled in
    the text as many times as lines have it exactly when no line has it twice (Python
    reads the last value, SQLite the first) nor a value spelled so."""
    if keys is None:
        (plan,) = plans.values()
        having = {plan[2]: count}
    else:
        having = collections.Counter()
        for key, many in collections.Counter(keys).items():
            having[plans[key][2]] += many
    having.pop(None, None)
    return bool(having) and all(text.count(JSON_KEY_TEXT[key]) == many
                                for key, many in having.items())


def json_columns(objs: list, lines: list, stamps: Stamps, plans: dict, keys) -> tuple | None:
    """json_chunk()'s columns of objects of these plans, keys (None: one plan) the keys
    of each."""
    if len(plans) == 1:     # one program's lines: a column's key is the same on every line
        (plan,) = plans.values()
        row_plans = itertools.repeat(plan)
        column_values = lambda at: (list(map(operator.itemgetter(plan[at]), objs))
                                    if plan[at] is not None else [None] * len(objs))
    else:
        row_plans = list(map(plans.__getitem__, keys))
        column_values = lambda at: list(map(dict.get, objs,
                                            map(operator.itemgetter(at), row_plans)))
    columns = []
    for at, convert in enumerate((lambda values: json_times(values, stamps), json_levels, None,
                                  json_texts, json_texts, json_pids)):
        # A null is as no key: the plans have no other key of the column to look at.
        values = column_values(at)
        if convert is None:     # the message: text, or the line when there is no key
            if not set(map(type, values)) <= {str, type(None)}:
                return None
            if None in values:
                values = [line if value is None else value for value, line in zip(values, lines)]
            columns.append(values)
            continue
        try:
            distinct = set(values)
            distinct.discard(None)
            distinct = list(distinct)
            stored = convert(distinct)     # each value converted once
        except TypeError:   # an unhashable value (a list, an object): no column takes it
            return None
        if stored is distinct:      # every value as it is: pids, host and program at least
            columns.append(values)
            continue
        converted = dict(zip(distinct, stored))
        if None in converted.values():
            return None     # a value the column cannot use: it goes to fields
        if all(map(operator.eq, converted, converted.values())):
            columns.append(values)      # host, program, pid and most levels: as they are
            continue
        converted[None] = None
        columns.append(list(map(converted.__getitem__, values)))
    fields = None
    if any(plan[6] for plan in plans.values()):
        fields = [{key: obj[key] for key in plan[6]} or None
                  for obj, plan in zip(objs, row_plans)]
    ts, level, message, host, program, pid = columns
    return ts, host, program, pid, level, fields, message


def _parse_json(obj: dict, line: str, stamps: Stamps) -> Parsed:
    """parse_json() of an object whose first keys for a column do not all give one."""
    for key in [key for key, value in obj.items() if value is None and key in COLUMN_KEYS]:
        del obj[key]
    ts = pop_first(obj, TIME_KEYS, json_time, stamps)
    level = pop_first(obj, LEVEL_KEYS, json_level)
    message = pop_first(obj, MESSAGE_KEYS, text_or_none)
    host = pop_first(obj, HOST_KEYS, text_or_none)
    program = pop_first(obj, PROGRAM_KEYS, text_or_none)
    pid = pop_first(obj, ("pid",), to_pid)
    return ts, host, program, pid, level, obj or None, line if message is None else message


def unescape_clf(text: str) -> str:
    """A quoted CLF field with Apache's \\" and \\\\ undone."""
    return CLF_ESCAPE_RE.sub(r"\1", text) if "\\" in text else text


def dash_none(text: str) -> str | None:
    """None for CLF's '-' (absent), else text."""
    return None if text == "-" else text


def split_request(request: str) -> tuple:
    """(method, path, protocol) of 'GET /a HTTP/1.1'; protocol None for HTTP/0.9's 'GET /a';
    all None for what is no request line ("-", or the bytes a TLS probe sends)."""
    method, _, target = request.partition(" ")
    if not (method.isascii() and method.isalpha() and target):
        return None, None, None
    path, _, protocol = target.rpartition(" ")
    if path and protocol.startswith("HTTP/"):
        return method, path, protocol
    return method, target, None


def parse_clf(line: str, stamps: Stamps) -> Parsed | None:
    """NCSA common or combined log line; the message is the whole line."""
    match = CLF_RE.match(line)
    if match is None:
        return None
    addr, _ident, user, stamp, request, status, size, referer, agent = match.groups()
    ts = stamps.clf(stamp)
    if ts is None:
        return None
    method, path, protocol = split_request(unescape_clf(request))
    status = int(status)
    fields = {"remote_addr": addr, "user": dash_none(user), "method": method, "path": path,
              "protocol": protocol, "status": status, "bytes": None if size == "-" else int(size)}
    if referer is not None:
        fields["referer"] = dash_none(unescape_clf(referer))
        fields["user_agent"] = dash_none(unescape_clf(agent))
    level = "error" if status >= 500 else "warning" if status >= 400 else "info"
    return ts, None, None, None, level, fields, line


def unquote(value: str) -> str:
    """A logfmt value without its Go-style quotes and escapes."""
    if len(value) > 1 and value[0] == value[-1] == '"':
        try:
            return load_json(value)  # strconv.Quote output is JSON for all but rare escapes
        except ValueError:
            return value[1:-1]
    return value


def parse_logfmt(line: str, stamps: Stamps) -> Parsed | None:
    """'time=... level=info msg="..." key=value' (Go slog TextHandler, logrus, go-kit as
    Prometheus and Loki write it, Grafana): a line of key=value pairs with a time, a level
    or a message among them; the other pairs go to fields."""
    if LOGFMT_START_RE.match(line) is None:
        return None
    pairs = {key: unquote(value) for key, value in LOGFMT_RE.findall(line)}
    ts = pop_first(pairs, LOGFMT_TIME_KEYS, stamps.iso)
    level = pop_first(pairs, LOGFMT_LEVEL_KEYS, normalize_level)
    message = pop_first(pairs, LOGFMT_MESSAGE_KEYS, text_or_none)
    if ts is None and level is None and message is None:
        return None
    return ts, None, None, None, level, pairs or None, line if message is None else message


def parse_app(line: str, stamps: Stamps) -> Parsed | None:
    """'timestamp LEVEL rest' as application loggers write it; see APP_RE and APP_TAIL_RES.

    The logger name or target goes to program, Spring Boot's pid to pid, a thread or zap's
    caller to fields; without a level word, one the message states ('prog: warning: ...').
    A line must begin with a timestamp, or be logfmt with one, so stack-trace lines give None.
    """
    head = APP_RE.match(line)
    if head is None:  # no level word: Go's log package, or just a timestamped line
        head = APP_TIME_RE.match(line)
        if head is None:
            # Lines of go-kit ("level=info ts=...") among others begin entries of their own.
            parsed = parse_logfmt(line, stamps)
            return parsed if parsed is not None and parsed[0] is not None else None
        ts = stamps.iso(head[1])
        message = line[head.end():]
        return (ts, None, None, None, stated_level(message), None, message) if ts else None
    ts = stamps.iso(head["ts"])
    if ts is None:
        return None
    for pattern in APP_TAIL_RES:  # the last one always matches
        tail = pattern.match(line, head.end())
        if tail:
            break
    part = tail.groupdict()
    thread = part.get("thread") or head["thread"]
    fields = {"thread": thread.strip()} if thread else {}
    if "caller" in part:
        fields["caller"] = part["caller"]
    return (ts, None, part.get("logger") or head["logger"], to_pid(part.get("pid")),
            normalize_level(head["level"]), fields or None, line[tail.end():])


def parse_java(line: str, stamps: Stamps) -> Parsed | None:
    """Java's default layouts (see JAVA_RE): thread and logger to fields. A stack trace's
    lines ("\\tat ...", "Caused by: ...", "\\t... 12 more") give None: they continue the
    entry."""
    match = JAVA_RE.match(line)
    if match is None:
        return None
    ts = stamps.iso(match["date"]) if match["date"] else stamps.clock(match["clock"])
    if ts is None:
        return None
    thread = match["thread"] if match["level"] else match["thread_after"]
    return (ts, None, None, None, normalize_level(match["level"] or match["level_first"]),
            {"thread": thread.strip(), "logger": match["logger"]}, line[match.end():])


# Container runtimes write what a container prints with their own time and stream, one line
# a line, a line longer than their buffer (Docker and containerd: 16 KiB) in pieces. A piece:
# (ts, stream, text, partial: the next piece continues it, other fields of the runtime's).
Piece = collections.namedtuple("Piece", "ts stream text partial extra")
CRI_TAGS = {"F": False, "P": True}      # full line, or a partial piece of one
CRI_STREAMS = frozenset({"stdout", "stderr"})


def docker_piece(line: str, stamps: Stamps) -> Piece | None:
    """A line of Docker's json-file driver: '{"log":"text\\n","stream":"stderr","time":...}';
    a "log" without its final newline is a piece of a longer line."""
    if not line.startswith('{"log":'):
        return None
    try:
        obj = load_json(line)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the decoder goes
        return None
    if not isinstance(obj, dict):
        return None
    text, stream, stamp = obj.pop("log", None), obj.pop("stream", None), obj.pop("time", None)
    if not (isinstance(text, str) and isinstance(stream, str) and isinstance(stamp, str)):
        return None
    ts = stamps.iso(stamp)
    if ts is None:
        return None
    partial = text[-1:] != "\n"
    if not partial:
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return Piece(ts, stream, text, partial, obj)


def cri_piece(line: str, stamps: Stamps) -> Piece | None:
    """A line of the CRI log format (containerd, CRI-O: /var/log/containers/*.log):
    'TIME STREAM TAG text', TAG F for a full line, P for a piece that the next one continues."""
    parts = line.split(" ", 3)
    if len(parts) < 3 or parts[1] not in CRI_STREAMS or parts[2] not in CRI_TAGS:
        return None
    ts = stamps.iso(parts[0])
    if ts is None:
        return None
    return Piece(ts, parts[1], parts[3] if len(parts) == 4 else "", CRI_TAGS[parts[2]], None)


def container_entry(piece: Piece, stamps: Stamps) -> Parsed:
    """The entry of a container's line (or of its pieces joined): the runtime's time and
    stream, and what the line itself says when it is JSON, logfmt, a Java layout or an
    application logger's. The time stays the runtime's: every line has it, in UTC, while the
    application's own may have no zone, and a container's zone need not be the tailer's."""
    text = piece.text
    inner = parse_json(text, stamps) if text[:1] == "{" else (
        parse_logfmt(text, stamps) or parse_java(text, stamps) or parse_app(text, stamps))
    fields = {"stream": piece.stream}
    if piece.extra:
        fields.update(piece.extra)
    if piece.partial:   # stored so only when the rest never came
        fields["partial"] = True
    if inner is None:
        return piece.ts, None, None, None, stated_level(text), fields, text
    _, host, program, pid, level, inner_fields, message = inner
    if inner_fields:
        fields = {**inner_fields, **fields}     # the runtime's stream wins over a key of the line's
    return piece.ts, host, program, pid, level, fields, message


def parse_docker(line: str, stamps: Stamps) -> Parsed | None:
    """Docker's json-file log (/var/lib/docker/containers/*/*-json.log); see container_entry."""
    piece = docker_piece(line, stamps)
    return None if piece is None else container_entry(piece, stamps)


def parse_cri(line: str, stamps: Stamps) -> Parsed | None:
    """A CRI container log line (Kubernetes' /var/log/containers); see container_entry."""
    piece = cri_piece(line, stamps)
    return None if piece is None else container_entry(piece, stamps)


def make_pattern_parser(regex: str):
    """A parser for --pattern: named groups ts host program pid level message fill those
    columns, other named groups go to fields; a value that does not convert stays in fields."""
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ValueError(f"--pattern {regex!r} is not a valid regular expression: {exc}") from None
    has_message = "message" in pattern.groupindex

    def parse_pattern(line: str, stamps: Stamps) -> Parsed | None:
        match = pattern.match(line)
        if match is None:
            return None
        found = {key: value for key, value in match.groupdict().items() if value is not None}
        ts = pop_first(found, ("ts",), read_time, stamps)
        pid = pop_first(found, ("pid",), to_pid)
        level = pop_first(found, ("level",), normalize_level)
        host, program = found.pop("host", None), found.pop("program", None)
        message = found.pop("message", "") if has_message else line
        return ts, host, program, pid, level, found or None, message

    return parse_pattern


PARSERS = {"syslog": parse_syslog, "rfc5424": parse_rfc5424, "journald": parse_journald,
           "json": parse_json, "clf": parse_clf, "logfmt": parse_logfmt, "app": parse_app,
           "java": parse_java, "docker": parse_docker, "cri": parse_cri}
MULTILINE_FORMATS = frozenset({"syslog", "rfc5424", "app", "java"})  # entries begin with a header
PIECES = {"docker": docker_piece, "cri": cri_piece}  # formats whose long lines come in pieces
# Ties go to the earlier, stricter format: a journal entry or a Docker line is JSON too, a CRI
# line reads as RFC 3339 syslog (host "stdout") and as a level-less app line, logfmt and Java
# layouts are app lines as well.
DETECT_ORDER = ("journald", "docker", "json", "cri", "clf", "syslog", "logfmt", "java", "app")
DETECT_LINES = 20  # non-empty lines sampled: enough to outvote a stack trace or two


def detect_format(lines: list[str], stamps: Stamps) -> str:
    """The format of a file from its first lines: one of DETECT_ORDER, or "plain".

    A format fits when it parses at least half of the non-empty sample lines. A multi-line
    format also fits when it parses the first line and at least half of the lines any format
    parses: the others are its continuation lines (stack traces). Among fitting formats the one
    with most parsed lines wins, a line with a level counting twice, since a level is the surest
    sign the layout was understood (RFC 3339 syslog also parses as a level-less app line).
    RFC 5424 files come out as "syslog", whose parser reads them too.
    """
    sample = [line for line in lines if line.strip()][:DETECT_LINES]
    if not sample:
        return "plain"
    parsed = {name: [PARSERS[name](line, stamps) for line in sample] for name in DETECT_ORDER}
    headers = sum(1 for row in zip(*parsed.values()) if any(row))
    best, best_score = "plain", 0
    for name, entries in parsed.items():
        hits = [entry for entry in entries if entry is not None]
        fits = 2 * len(hits) >= len(sample) or (
            name in MULTILINE_FORMATS and entries[0] is not None and 2 * len(hits) >= headers)
        score = len(hits) + sum(entry[4] is not None for entry in hits)
        if fits and score > best_score:
            best, best_score = name, score
    return best


ParseOptions = collections.namedtuple(
    "ParseOptions", "format pattern multiline_start max_entry_bytes max_entry_lines")


def _raw(line: bytes):
    """The line as stored in raw: text when it is UTF-8 without NUL, else the bytes."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return line
    return line if "\x00" in text else text


def _readable(raw) -> str:
    """The message text of a raw line: bad UTF-8 bytes become U+FFFD."""
    return raw if type(raw) is str else raw.decode("utf-8", "replace")


def _split_lines(data: bytes):
    """(lines, sizes, text) for data made of complete lines. A line is str when it is
    UTF-8 without NUL, else bytes, and has no final carriage return; sizes[i] is its
    length in the file with its line end, or sizes is None when that is len(line) + 1
    for every line; text is data decoded when every line is str (else None)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text and "\r" not in text:
        lines = text.split("\n")
        lines.pop()     # data ends with "\n": the last item is empty
        if len(text) == len(data):      # ASCII: characters are bytes
            return lines, None, text
        return lines, [len(line.encode()) + 1 for line in lines], text
    lines = data.split(b"\n")
    lines.pop()
    sizes = [len(line) + 1 for line in lines]
    lines = [_raw(line[:-1] if line.endswith(b"\r") else line) for line in lines]
    return lines, sizes, None


def _joined(lines: list):
    """The raw of a multi-line entry: its lines joined, text unless one of them is bytes."""
    if all(type(line) is str for line in lines):
        return "\n".join(lines)
    return b"\n".join(line if type(line) is bytes else line.encode() for line in lines)


def message_span(raw: str, message: str) -> tuple | None:
    """Where the message column finds message in raw, (msg_at, msg_len): from msg_at
    (1-based) to the end when msg_len is None, else msg_len characters of raw, or when
    msg_len is negative -msg_len characters with their \\" read as " (a JSON or logfmt
    value quoting quotes, and nothing else). None when it is not there so."""
    if raw.endswith(message):
        return len(raw) - len(message) + 1, None
    # Any place reads the same; messages sit late in their lines (after a time, a level),
    # where rfind() comes first.
    at = raw.rfind(message)
    if at >= 0:
        return at + 1, len(message)
    return quoted_span(raw, message)


def quoted_span(raw: str, message: str) -> tuple | None:
    """message_span() of a message that is not in raw as it is: quoted there, its \\"
    read as "."""
    if '"' in message and "\\" not in message:
        quoted = message.replace('"', '\\"')
        at = raw.rfind(quoted)
        if at >= 0:
            return at + 1, -len(quoted)
    return None


def places(values: list, value):
    """The indexes of value in values, found by list.index(): few, at C speed."""
    at = -1
    try:
        while True:
            at = values.index(value, at + 1)
            yield at
    except ValueError:
        return


def message_spans(lines: list, messages: list) -> tuple | None:
    """message_span() of each line as two columns, msg_at and msg_len; None when one is
    not found. Column by column it costs half: most messages are inside their lines,
    where rfind() finds them; the few at a line's end or quoted are then looked at
    as message_span() would."""
    at = list(map((1).__add__, map(str.rfind, lines, messages)))
    length = list(map(len, messages))
    for index in places(at, 0):     # not there as it is (nor at the end, then)
        span = quoted_span(lines[index], messages[index])
        if span is None:
            return None
        at[index], length[index] = span
    for index in places(list(map(str.endswith, lines, messages)), True):
        at[index], length[index] = len(lines[index]) - length[index] + 1, None
    return at, length


class EntryBuilder:
    """Turns one file's complete lines into entries; pure, no I/O.

    Entries go to rows, the store's encoder, which makes them rows of its own:
    rows.lines(file_id, offsets, lines) for lines that are text and their own message,
    rows.entry(file_id, offset, parsed, raw, message, msg_at, msg_len, part) for any other
    entry: raw is its text (bytes when it is not UTF-8 without NUL, lines joined by "\\n"),
    parsed the Parsed of its first line (None when it did not parse), message its text
    when it is not found in raw (None when it is, where msg_at and msg_len say: see
    message_span()), part the number of a piece of an over-long line (None for a whole
    entry).
    In a multi-line format the last entry is held back until the next entry begins
    or flush() is called, so that the offset committed (held_offset) never passes
    an entry that is not stored yet. In a format whose long lines come in pieces
    (Docker's, CRI's) a piece that the next line continues is held the same way, and
    the pieces make one entry: raw their lines, message their texts joined.
    """

    def __init__(self, file_id: int, options: ParseOptions, stamps: Stamps, rows,
                 format: str = None, part: int = None):
        self.file_id = file_id
        self.options = options
        self.stamps = stamps
        self.rows = rows
        self.part = part        # number of the next piece while inside an over-long line
        self.held = None        # [offset, parsed, raw lines, size in bytes] of the last entry
        self.format = None
        self.parse = None
        self.multiline = False
        self.piece = None       # the format's reader of pieces (PIECES), if it has them
        if options.pattern is not None or options.format != "auto":
            self.set_format(options.format)     # what the user says wins over what was stored
        elif format is not None:
            self.set_format(format)

    def set_format(self, format: str) -> None:
        if self.options.pattern is not None:
            format = "pattern"
        self.format = format
        self.parse = self.options.pattern or PARSERS.get(format)
        self.multiline = self.options.multiline_start is not None or format in MULTILINE_FORMATS
        # --multiline-start says what an entry is, in any format.
        self.piece = PIECES.get(format) if self.options.multiline_start is None else None

    def held_offset(self, default: int) -> int:
        return self.held[0] if self.held is not None else default

    def feed(self, data: bytes, offset: int, mtime: float = None) -> list:
        """Rows for the complete lines in data (which starts at offset in its file)."""
        return self._feed(data, offset, mtime, False)

    def feed_batch(self, data: bytes, offset: int, mtime: float = None) -> tuple:
        """rows.batch() of feed()'s rows, or a batch that stores the same rows. A chunk of
        one-line JSON entries, the bulk of a JSON backlog, goes from its columns into the
        batch with no rows in between."""
        made = self._feed(data, offset, mtime, True)
        return self.rows.batch(made) if type(made) is list else made

    def _feed(self, data: bytes, offset: int, mtime, columnar: bool) -> list | tuple:
        """feed()'s rows, or with columnar the batch of a chunk of JSON lines that
        rows.json_batch() makes."""
        rows = []
        if self.part is not None:
            # The first line ends an over-long line stored in pieces so far.
            cut = data.index(b"\n") + 1
            rows.extend(self.flush())
            rows.extend(self._pieces(data[:cut - 1], offset))
            data, offset = data[cut:], offset + cut
        if not data:
            return rows
        lines, sizes, text = _split_lines(data)
        all_text = text is not None
        if self.format is None:
            self.set_format(detect_format([_readable(line) for line in lines[:100]],
                                          self.stamps))
        if mtime is not None:
            self.stamps.set_reference(mtime)
        if sizes is None:
            sizes = [len(line) + 1 for line in lines]
        fits = (all_text and self.options.multiline_start is None
                and max(sizes) <= self.options.max_entry_bytes)
        if self.parse is None and fits and not self.multiline:
            rows.extend(self._feed_plain(lines, sizes, offset))
            return rows
        if fits and self.format == "syslog" and self.options.pattern is None:
            found = syslog_chunk(text, self.stamps)
            if found is not None and len(found[0]) == len(lines):
                rows.extend(self._feed_syslog(lines, sizes, found, offset))
                return rows
        if fits and self.format == "json" and self.options.pattern is None:
            columns = json_chunk(text, lines, self.stamps)
            if columns is not None:
                offsets = list(itertools.accumulate(sizes[:-1], initial=offset))
                if columnar and not rows:
                    batch = self.rows.json_batch(self.file_id, offsets, lines, *columns)
                    if batch is not None:
                        return batch
                rows.extend(self.rows.json_lines(self.file_id, offsets, lines, *columns))
                return rows
        texts = lines if all_text else [_readable(line) for line in lines]
        if self.piece is not None:
            pieces = [self.piece(text, self.stamps) for text in texts]
            heads = [piece and container_entry(piece, self.stamps) for piece in pieces]
            if self.held is not None or any(piece and piece.partial for piece in pieces):
                rows.extend(self._feed_pieces(lines, sizes, pieces, heads, offset))
                return rows
        elif self.parse is not None:
            heads = [self.parse(text, self.stamps) for text in texts]
        else:
            heads = [None] * len(lines)
        if fits and all(heads):
            rows.extend(self._feed_headers(lines, sizes, heads, offset))
        elif fits and self.multiline and self.parse is not None:
            rows.extend(self._feed_entries(lines, sizes, heads, offset))
        else:
            rows.extend(self._feed_lines(lines, texts, sizes, heads, offset))
        return rows

    def _feed_plain(self, lines, sizes, offset):
        """Plain text lines, the bulk of many logs: rows made without a Python loop."""
        return self.rows.lines(self.file_id, itertools.accumulate(sizes[:-1], initial=offset),
                               lines)

    def _feed_headers(self, lines, sizes, heads, offset) -> list:
        """Every line begins an entry (most chunks of most logs): an entry a line, and in
        a multi-line format the last one held, as the next chunk may continue it."""
        rows = [self._entry(*self.held[:3])] if self.held is not None else []
        offsets = list(itertools.accumulate(sizes, initial=offset))
        last = len(lines) - 1 if self.multiline else len(lines)
        rows.extend(map(self._one_line, offsets[:last], lines[:last], heads[:last]))
        self.held = ([offsets[last], heads[last], [lines[last]], sizes[last]]
                     if self.multiline else None)
        return rows

    def _feed_syslog(self, lines, sizes, found, offset) -> list:
        """_feed_headers() of a syslog chunk whose every line syslog_chunk() read: its rows
        made by the encoder from the regex's groups, no Python call a line."""
        rows = [self._entry(*self.held[:3])] if self.held is not None else []
        offsets = list(itertools.accumulate(sizes, initial=offset))
        last = len(lines) - 1
        rows.extend(self.rows.syslog_lines(self.file_id, offsets, lines, found[0][:last],
                                           found[1]))
        self.held = [offsets[last], self.parse(lines[last], self.stamps), [lines[last]],
                     sizes[last]]
        return rows

    def _feed_entries(self, lines, sizes, heads, offset) -> list:
        """A multi-line format's chunk with continuation lines among its headers (most
        chunks of a log with stack traces): the general loop's entries, each one-line
        entry made at once, the loop only over the continuation lines."""
        max_bytes, max_lines = self.options.max_entry_bytes, self.options.max_entry_lines
        offsets = list(itertools.accumulate(sizes, initial=offset))
        rows, held, start = [], self.held, 0
        for cont in itertools.compress(itertools.count(), map(operator.not_, heads)):
            if start < cont:    # headers start .. cont - 1: the last one is continued
                if held is not None:
                    rows.append(self._entry(*held[:3]))
                last = cont - 1
                rows.extend(map(self._one_line, offsets[start:last], lines[start:last],
                                heads[start:last]))
                held = [offsets[last], heads[last], [lines[last]], sizes[last]]
            size = sizes[cont]
            if held is not None and held[3] + size <= max_bytes and len(held[2]) < max_lines:
                held[2].append(lines[cont])
                held[3] += size
            else:   # past the cap (or nothing to continue): the entry goes on as a new one
                if held is not None:
                    rows.append(self._entry(*held[:3]))
                held = [offsets[cont], None, [lines[cont]], size]
            start = cont + 1
        if start < len(lines):
            if held is not None:
                rows.append(self._entry(*held[:3]))
            last = len(lines) - 1
            rows.extend(map(self._one_line, offsets[start:last], lines[start:last],
                            heads[start:last]))
            held = [offsets[last], heads[last], [lines[last]], sizes[last]]
        self.held = held
        return rows

    def _feed_lines(self, lines, texts, sizes, heads, offset) -> list:
        """The general case: continuation lines, over-long lines, --multiline-start."""
        start_re = self.options.multiline_start
        max_bytes, max_lines = self.options.max_entry_bytes, self.options.max_entry_lines
        rows, held = [], self.held
        for line, text, size, parsed in zip(lines, texts, sizes, heads):
            if held is not None and self.multiline and (
                    not start_re.match(text) if start_re is not None else parsed is None):
                if held[3] + size <= max_bytes and len(held[2]) < max_lines:
                    held[2].append(line)
                    held[3] += size
                    offset += size
                    continue
                parsed = None   # past the cap: the entry goes on as a new, plain one
            if held is not None:
                rows.append(self._entry(*held[:3]))
            if size > max_bytes:
                held = None
                rows.extend(self._pieces(line, offset))
            else:
                held = [offset, parsed, [line], size]
            offset += size
        if held is not None and not self.multiline:
            rows.append(self._entry(*held[:3]))
            held = None
        self.held = held
        return rows

    def _feed_pieces(self, lines, sizes, pieces, heads, offset) -> list:
        """Lines of a container's log with pieces of long lines among them (or the last
        piece held): a partial piece continues into the next line of its stream."""
        max_bytes, max_lines = self.options.max_entry_bytes, self.options.max_entry_lines
        rows, held = [], self.held
        for line, size, piece, parsed in zip(lines, sizes, pieces, heads):
            # held[1] is the first piece's entry: its fields have the stream.
            if (held is not None and piece is not None and piece.stream == held[1][5]["stream"]
                    and held[3] + size <= max_bytes and len(held[2]) < max_lines):
                held[2].append(line)
                held[3] += size
                offset += size
                if not piece.partial:
                    rows.append(self._entry(*held[:3]))
                    held = None
                continue
            if held is not None:    # the rest never came, or past the cap: it goes on anew
                rows.append(self._entry(*held[:3]))
                held = None
            if size > max_bytes:
                rows.extend(self._pieces(line, offset))
            elif piece is not None and piece.partial:
                held = [offset, parsed, [line], size]
            else:
                rows.append(self._entry(offset, parsed, [line]))
            offset += size
        self.held = held
        return rows

    def feed_piece(self, data: bytes, offset: int) -> list:
        """Rows for a piece of a line longer than max_entry_bytes (data has no newline)."""
        rows = self.flush()
        rows.append(self._piece(data, offset, last=False))
        return rows

    def flush(self) -> list:
        """Rows for the held entry, if any: its writer is done with it."""
        if self.held is None:
            return []
        row = self._entry(*self.held[:3])
        self.held = None
        return [row]

    def _one_line(self, offset, line, parsed):
        """_entry() of a one-line entry that parsed, made short for the usual case."""
        message = parsed[6]
        span = message_span(line, message)
        if span is not None:
            return self.rows.entry(self.file_id, offset, parsed, line, None, *span, None)
        return self.rows.entry(self.file_id, offset, parsed, line, message, 1, None, None)

    def _entry(self, offset, parsed, lines):
        raw = lines[0] if len(lines) == 1 else _joined(lines)
        if len(lines) > 1 and self.piece is not None:
            pieces = [self.piece(_readable(line), self.stamps) for line in lines]
            if None not in pieces:  # as they were when joined; else they are lines
                return self._joined_pieces(offset, pieces, raw)
        if parsed is None:
            message = None if type(raw) is str else _readable(raw)
            return self.rows.entry(self.file_id, offset, None, raw, message, 1, None, None)
        first, message = lines[0], parsed[6]
        if type(raw) is str:
            # Found in raw, the message is not stored twice. Of several lines it is the
            # first one's message and the lines after it: raw's tail, if any.
            span = (message_span(raw, message) if len(lines) == 1 else
                    (len(first) - len(message) + 1, None) if first.endswith(message) else None)
            if span is not None:
                return self.rows.entry(self.file_id, offset, parsed, raw, None, *span, None)
        if len(lines) > 1:
            message += "\n" + _readable(raw)[len(_readable(first)) + 1:]
        return self.rows.entry(self.file_id, offset, parsed, raw, message, 1, None, None)

    def _joined_pieces(self, offset, pieces, raw):
        """_entry() of a line that came in pieces: one entry of the pieces' texts joined."""
        parsed = container_entry(pieces[0]._replace(
            text="".join(piece.text for piece in pieces), partial=pieces[-1].partial),
            self.stamps)
        message = parsed[6]
        if type(raw) is str and raw.endswith(message):
            return self.rows.entry(self.file_id, offset, parsed, raw, None,
                                   len(raw) - len(message) + 1, None, None)
        return self.rows.entry(self.file_id, offset, parsed, raw, message, 1, None, None)

    def _pieces(self, line, offset):
        data = line.encode() if type(line) is str else line
        rows = []
        while len(data) > self.options.max_entry_bytes:
            cut = utf8_boundary(data, self.options.max_entry_bytes)
            rows.append(self._piece(data[:cut], offset, last=False))
            data, offset = data[cut:], offset + cut
        if data or self.part is None:
            rows.append(self._piece(data, offset, last=True))
        else:
            self.part = None    # the newline came right after the last full piece
        return rows

    def _piece(self, data: bytes, offset: int, last: bool):
        part = self.part or 1
        self.part = None if last else part + 1
        if last and data.endswith(b"\r"):
            data = data[:-1]
        raw = _raw(data)
        message = None if type(raw) is str else _readable(raw)
        return self.rows.entry(self.file_id, offset, None, raw, message, 1, None, part)


# Stores #######################################################################

# The entries table of version 3, as migration 2 writes it.
ENTRIES_V3 = r"""CREATE TABLE entries (
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
    msg_at   INTEGER NOT NULL DEFAULT 1,   -- where the message starts in raw (1-based): it is
                                    -- raw from there on; when negative, from -msg_at up to the
                                    -- next '"' (a quoted JSON or logfmt value)
    part     INTEGER,               -- 1, 2, ... for pieces of an entry over --max-entry-bytes
    message  TEXT NOT NULL GENERATED ALWAYS AS (coalesce(msg, CASE WHEN msg_at > 0
        THEN substr(raw, msg_at)
        ELSE substr(raw, -msg_at, instr(substr(raw, -msg_at), '"') - 1) END)) VIRTUAL
)"""
# Version 4: the same message, read without a copy when it is all of raw (a virtual
# column is computed for every row inserted: plain lines' inserts took 0.67 against 0.49 us
# a row).
ENTRIES_V4 = r"""CREATE TABLE entries (
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
    msg_at   INTEGER NOT NULL DEFAULT 1,   -- where the message starts in raw (1-based): it is
                                    -- raw from there on; when negative, from -msg_at up to the
                                    -- next '"' (a quoted JSON or logfmt value)
    part     INTEGER,               -- 1, 2, ... for pieces of an entry over --max-entry-bytes
    message  TEXT NOT NULL GENERATED ALWAYS AS (CASE WHEN msg IS NOT NULL THEN msg
        WHEN msg_at = 1 THEN raw WHEN msg_at > 0 THEN substr(raw, msg_at)
        ELSE substr(raw, -msg_at, instr(substr(raw, -msg_at), '"') - 1) END) VIRTUAL
)"""
# Version 5, SCHEMA's: a message found anywhere in raw is read by its length (msg_len), with
# no search for its end: JSON lines' inserts took 2.2 against 1.65 us a row (measured), and
# a quoted value with \" in it is read from raw too, no longer stored twice in msg. Rows
# stored before keep their meaning (a negative msg_at). msg_len comes after part: it is the
# last column stored, so that rows stored before read it as NULL.
ENTRIES_V5 = r"""CREATE TABLE entries (
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
    msg_at   INTEGER NOT NULL DEFAULT 1,   -- where the message starts in raw (1-based); in rows
                                    -- of older versions, when negative, from -msg_at up to
                                    -- the next '"'
    part     INTEGER,               -- 1, 2, ... for pieces of an entry over --max-entry-bytes
    msg_len  INTEGER,               -- the message's length in raw from msg_at, NULL: to the end;
                                    -- when negative, a quoted value whose \" are read as "
    message  TEXT NOT NULL GENERATED ALWAYS AS (CASE WHEN msg IS NOT NULL THEN msg
        WHEN msg_len >= 0 THEN substr(raw, msg_at, msg_len)
        WHEN msg_len < 0 THEN replace(substr(raw, msg_at, -msg_len), '\"', '"')
        WHEN msg_at = 1 THEN raw WHEN msg_at > 0 THEN substr(raw, msg_at)
        ELSE substr(raw, -msg_at, instr(substr(raw, -msg_at), '"') - 1) END) VIRTUAL
)"""

# Version 6's message of a row of entry_rows, from its columns as prefix names them: "" in
# the entries view, "new." or "old." in a trigger.
MESSAGE_SQL_V6 = r"""CASE WHEN {0}msg IS NOT NULL THEN {0}msg
        WHEN {0}msg_len >= 0 THEN substr({0}raw, {0}msg_at, {0}msg_len)
        WHEN {0}msg_len < 0 THEN replace(substr({0}raw, {0}msg_at, -{0}msg_len), '\"', '"')
        WHEN {0}msg_at = 1 THEN {0}raw WHEN {0}msg_at > 0 THEN substr({0}raw, {0}msg_at)
        ELSE substr({0}raw, -{0}msg_at, instr(substr({0}raw, -{0}msg_at), '"') - 1) END"""

# Version 6: entries is a view of entry_rows that reads each message. As a virtual column
# of the table, SQLite computed the message on every INSERT too, though no row stores it:
# 0.2 us of a syslog row's 1.15, 0.27 of a JSON row's 1.35 (measured).
ENTRY_ROWS_V6 = r"""CREATE TABLE entry_rows (
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
    msg_at   INTEGER NOT NULL DEFAULT 1,   -- where the message starts in raw (1-based); in rows
                                    -- of older versions, when negative, from -msg_at up to
                                    -- the next '"'
    part     INTEGER,               -- 1, 2, ... for pieces of an entry over --max-entry-bytes
    msg_len  INTEGER                -- the message's length in raw from msg_at, NULL: to the end;
                                    -- when negative, a quoted value whose \" are read as "
)"""
ENTRIES_VIEW_V6 = r"""-- The entries as they are queried: every column of entry_rows and the message.
CREATE VIEW entries AS
SELECT id, file_id, offset, ts, host, program, pid, level, fields, raw, msg, msg_at, part,
       msg_len, """ + MESSAGE_SQL_V6.format("") + r""" AS message
FROM entry_rows;
CREATE TRIGGER entries_delete INSTEAD OF DELETE ON entries BEGIN
    DELETE FROM entry_rows WHERE id = old.id;
END"""
ENTRIES_V6 = ENTRY_ROWS_V6 + ";\n\n" + ENTRIES_VIEW_V6


def amended(text: str, old: str, new: str) -> str:
    """text with old, which is there once, made new: a schema's text written as what
    changed since the version before."""
    if text.count(old) != 1:
        raise AssertionError(f"not there once: {old!r}")
    return text.replace(old, new)


# Version 7, SCHEMA's: the message of a JSON line is read from raw by its key (msg_at 0) with
# SQLite's own JSON functions, so that no row stores where it is in raw: finding it took a
# search in every line (0.34 us of a chunk's 2 us a line), and its two columns a binding
# each. The JSON lines' catch-up took 7% less time (1.90 against 2.04 s, best of 5); a scan
# of all their messages takes more (0.75 against 0.38 s a million, LIKE '%x%'). The view
# reads the keys in MESSAGE_KEYS' order, a null as no key; keyed_messages() says which
# lines it reads so. A raw that SQLite does not take for JSON, which keyed_messages() rules
# out, would read as the message instead of failing the query.
MESSAGE_SQL = amended(MESSAGE_SQL_V6, "\n        ELSE", r"""
        WHEN {0}msg_at = 0 AND json_valid({0}raw) THEN coalesce(json_extract({0}raw, '$.msg'),
            json_extract({0}raw, '$.message'), json_extract({0}raw, '$.event'), {0}raw)
        WHEN {0}msg_at = 0 THEN {0}raw
        ELSE""")
ENTRY_ROWS_V7 = amended(ENTRY_ROWS_V6, "(1-based); in rows\n", r"""(1-based); 0: it
                                    -- is the value of the JSON line's first key of msg,
                                    -- message and event that is not null, else raw; in rows
""")
ENTRIES_VIEW_V7 = amended(ENTRIES_VIEW_V6, MESSAGE_SQL_V6.format(""), MESSAGE_SQL.format(""))
ENTRIES_V7 = ENTRY_ROWS_V7 + ";\n\n" + ENTRIES_VIEW_V7

SCHEMA = r"""-- logtail2db schema, version 7 (kept in PRAGMA user_version).
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
""" + ENTRIES_V7 + r""";

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
"""

# version -> the script that brings a database from it to version + 1, run in one
# transaction; a test checks that migrating ends with the schema a new database gets.
# The statements repeat schema.sql's on purpose: a migration is history, and stays as
# written when the schema moves on.
MIGRATIONS = {
    1: """
CREATE TABLE ingested (
    at       TEXT PRIMARY KEY,      -- UTC, 'YYYY-MM-DD HH:MM:SS'
    first_id INTEGER NOT NULL
);
CREATE VIEW logs AS
SELECT e.id, e.ts, e.level, f.path, e.host, e.program, e.pid, e.message, e.fields, e.raw,
       e.file_id, e.offset, e.part
FROM entries AS e JOIN files AS f ON f.id = e.file_id;
PRAGMA user_version = 2;
""",
    # message finds quoted values in raw too. It is a virtual column: no row stores it, so
    # the table's definition is changed in place (as SQLite's ALTER TABLE documentation
    # does for defaults and constraints) instead of copying every entry into a new table.
    2: """
PRAGMA writable_schema = ON;
UPDATE sqlite_master SET sql = '%s'
WHERE type = 'table' AND name = 'entries';
PRAGMA writable_schema = RESET;
DROP VIEW logs;
CREATE VIEW logs AS
SELECT e.id, e.ts, e.level, f.path, e.host, e.program, e.pid, e.message, e.fields, e.raw,
       e.file_id, e.offset, e.part
FROM entries AS e JOIN files AS f ON f.id = e.file_id;
PRAGMA user_version = 3;
""" % ENTRIES_V3.replace("'", "''"),
    3: """
PRAGMA writable_schema = ON;
UPDATE sqlite_master SET sql = '%s'
WHERE type = 'table' AND name = 'entries';
PRAGMA writable_schema = RESET;
PRAGMA user_version = 4;
""" % ENTRIES_V4.replace("'", "''"),
    # msg_len is a column stored after the others: rows stored before have it NULL, as
    # ALTER TABLE ADD COLUMN would leave them, and message reads them as before.
    4: """
PRAGMA writable_schema = ON;
UPDATE sqlite_master SET sql = '%s'
WHERE type = 'table' AND name = 'entries';
PRAGMA writable_schema = RESET;
PRAGMA user_version = 5;
""" % ENTRIES_V5.replace("'", "''"),
    # The message column becomes the entries view's: the table is renamed and its definition
    # changed in place (message was virtual, no row stores it). Renamed the legacy way, the
    # views that read entries (logs, and any of the user's) are left as written: they read
    # the view then. prepare() makes the full-text index's triggers again, if there is one.
    5: """
DROP TRIGGER IF EXISTS entries_fts_insert;
DROP TRIGGER IF EXISTS entries_fts_delete;
PRAGMA legacy_alter_table = ON;
ALTER TABLE entries RENAME TO entry_rows;
PRAGMA legacy_alter_table = OFF;
PRAGMA writable_schema = ON;
UPDATE sqlite_master SET sql = '%s'
WHERE type = 'table' AND name = 'entry_rows';
PRAGMA writable_schema = RESET;
%s;
PRAGMA user_version = 6;
""" % (ENTRY_ROWS_V6.replace("'", "''"), ENTRIES_VIEW_V6),
    # The view reads JSON lines' messages by their key too: made again, with entry_rows'
    # definition changed in place (its msg_at comment) and, if there is a full-text index,
    # its triggers made again by prepare().
    6: """
DROP TRIGGER IF EXISTS entries_fts_insert;
DROP TRIGGER IF EXISTS entries_fts_delete;
DROP VIEW entries;
PRAGMA writable_schema = ON;
UPDATE sqlite_master SET sql = '%s'
WHERE type = 'table' AND name = 'entry_rows';
PRAGMA writable_schema = RESET;
%s;
PRAGMA user_version = 7;
""" % (ENTRY_ROWS_V7.replace("'", "''"), ENTRIES_VIEW_V7),
}

# Rows come in five shapes, told by their length, each with the columns of the one before:
# plain lines, syslog's, most JSON lines' (their message read by key, or found in raw),
# every column. Absent values are None: bound as NULL at once once an adapter is
# registered for it (see SqliteStore.open).
ROW_COLUMNS = {
    3: ("file_id", "offset", "raw"),
    8: ("file_id", "offset", "ts", "host", "program", "pid", "raw", "msg_at"),
    9: ("file_id", "offset", "ts", "host", "program", "pid", "level", "raw", "msg_at"),
    10: ("file_id", "offset", "ts", "host", "program", "pid", "level", "raw", "msg_at",
         "msg_len"),
    13: ("file_id", "offset", "ts", "host", "program", "pid", "level", "fields", "raw", "msg",
         "msg_at", "msg_len", "part"),
}
INSERT_ROW = {size: f"INSERT INTO entry_rows ({', '.join(columns)})"
                    f" VALUES ({', '.join('?' * size)})" for size, columns in ROW_COLUMNS.items()}
# A batch of JSON lines whose messages are read by key, made from their columns, has a shape
# of its own: the 9 columns, msg_at given by the statement (a value less to bind and pass
# from the worker: 3% of the JSON lines' catch-up, measured).
KEYED = "keyed"
INSERT_ROW[KEYED] = (f"INSERT INTO entry_rows ({', '.join(ROW_COLUMNS[9])})"
                     f" VALUES ({', '.join('?' * 8)}, 0)")


def widener(narrow: int, wide: int):
    """A row of the narrow shape as one of the wide shape: None where it has no value,
    msg_at 1 (its default)."""
    has = {column: at for at, column in enumerate(ROW_COLUMNS[narrow])}
    pick = operator.itemgetter(*[has.get(column, narrow + (column == "msg_at"))
                                 for column in ROW_COLUMNS[wide]])
    return lambda row: pick(row + (None, 1))


WIDEN = {(narrow, wide): widener(narrow, wide) for narrow in ROW_COLUMNS for wide in ROW_COLUMNS
         if narrow < wide}
# ROWS_PER_INSERT rows in one statement: a statement's cost is shared by as many rows.
INSERT_ROWS = {size: sql.partition(" VALUES ")[0] + " VALUES "
                  + ", ".join([sql.partition(" VALUES ")[2]] * ROWS_PER_INSERT)
               for size, sql in INSERT_ROW.items()}
UPSERT_FILE = (
    "INSERT INTO files (id, path, path_bytes, dev, ino, offset, fingerprint, resume_hash, part,"
    " format, first_seen, updated, gone) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET path = excluded.path, path_bytes = excluded.path_bytes,"
    " dev = excluded.dev, ino = excluded.ino, offset = excluded.offset,"
    " fingerprint = excluded.fingerprint, resume_hash = excluded.resume_hash,"
    " part = excluded.part, format = excluded.format, updated = excluded.updated,"
    " gone = excluded.gone")
SELECT_FILES = ("SELECT id, path, path_bytes, dev, ino, offset, fingerprint, resume_hash, part,"
                " format, first_seen, updated, gone FROM files")
MARK_INGESTED = ("INSERT OR IGNORE INTO ingested (at, first_id)"
                 " SELECT ?, coalesce(max(id), 0) + 1 FROM entry_rows")
# An entry is older than the cutoff by its own time, or when it has none, by when it was
# stored: before the first entry stored since the cutoff (see the ingested table).
PRUNE = ("DELETE FROM entry_rows WHERE id >= ? AND id < ? AND (ts < ? OR ts IS NULL AND id < ("
         " SELECT coalesce((SELECT first_id FROM ingested WHERE at >= ? ORDER BY at LIMIT 1),"
         " (SELECT max(id) + 1 FROM entry_rows))))")
# External content: the index holds no copy of the messages; the triggers keep it in step
# with the entries inside the same transactions.
FTS_TRIGGERS = """
CREATE TRIGGER entries_fts_insert AFTER INSERT ON entry_rows BEGIN
    INSERT INTO entries_fts (rowid, message) VALUES (new.id, %s);
END;
CREATE TRIGGER entries_fts_delete AFTER DELETE ON entry_rows BEGIN
    INSERT INTO entries_fts (entries_fts, rowid, message) VALUES ('delete', old.id, %s);
END;
""" % (MESSAGE_SQL.format("new."), MESSAGE_SQL.format("old."))
FTS_SCHEMA = """
CREATE VIRTUAL TABLE entries_fts USING fts5 (message, content = 'entries', content_rowid = 'id');
""" + FTS_TRIGGERS + """
INSERT INTO entries_fts (entries_fts) VALUES ('rebuild');
"""
# One encoder for every row: json.dumps() with options builds a new one per call.
FIELDS_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# What --stats shows of a database: per file (path, path_bytes, offset, gone); per level
# (level, count); the newest entry's ts; and since an hour 23 hours ago, (level, hours
# since then, count).
# hosts: for a fleet's server, per host (name, entries, newest ts, last commit), else None.
Stats = collections.namedtuple("Stats", "files levels newest since hourly hosts",
                               defaults=(None,))


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def statements(script: str) -> list:
    """The statements of an SQL script, each complete (triggers with their bodies)."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    return [sql for sql in found if not sql.startswith("--") or "\n" in sql]


class Store:
    """What the event loop asks of a database; SqliteStore and (for fleets) the PostgreSQL
    store (PgStore) implement it. The loop runs every change inside atomic(): a round's add() and
    save() calls are one transaction, committed at the end, rolled back by any exception.

    name: how messages call it (no password). rows: the encoder EntryBuilder hands entries
    to (see EntryBuilder), whose rows add() takes. errors: the exceptions of its driver.
    hurry: set once a stop is asked for; a wait that only keeps the store small ends.
    """

    name = rows = None
    errors = ()
    hurry = False

    def is_transient(self, exc) -> bool:
        """A fault that passes (disk full, locked, a cut connection): retry later."""
        raise NotImplementedError

    def files(self) -> list:
        """The FileStates of the files followed (not gone)."""
        raise NotImplementedError

    def gone_files(self, limit: int) -> list:
        """The FileStates of the files found gone last, the latest first."""
        raise NotImplementedError

    def max_file_id(self) -> int:
        raise NotImplementedError

    def file_states(self, ids) -> dict:
        """{id: FileState} of the files of these ids that are stored (gone or not)."""
        raise NotImplementedError

    def reconnect(self) -> bool:
        """Called before each transaction: make the store usable again after a fault that
        passed. True when its connection was lost and is made again: a COMMIT that got no
        answer may have been stored, so the loop reads the states back (file_states());
        False when nothing was lost (a failed transaction was surely rolled back)."""
        raise NotImplementedError

    def explain(self, exc) -> str:
        """The one line for a fault of this store that does not pass (no password in it)."""
        raise NotImplementedError

    def atomic(self, now: float = None):
        """A context manager: one transaction, rolled back on any exception. now (the
        loop's clock) paces the notes of when entries were stored."""
        raise NotImplementedError

    def add(self, rows: list) -> None:
        """Insert rows of entries (from rows' encoder) into the open transaction."""
        raise NotImplementedError

    def add_batch(self, batch: tuple) -> None:
        """add() the rows of a batch (count, ...) that rows.batch() made of them."""
        raise NotImplementedError

    def save(self, states: list) -> None:
        """Store FileStates in the open transaction: each offset covers exactly the
        entries stored for that file, in this transaction and before; gone set for the
        files gone."""
        raise NotImplementedError

    def prune(self, cutoff: str, low: int, span: int) -> int:
        """--keep: delete the entries older than cutoff among ids low .. low + span - 1,
        in a transaction of its own; returns how many."""
        raise NotImplementedError

    def id_range(self) -> tuple:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def entries(rows, file_id: int, offsets, lines: list, ts, host, program, pid, level, fields,
            messages, _, spans) -> list:
    """rows.entry() of each one-line entry of json_chunk()'s columns, found in its line
    where spans say (message_span())."""
    if fields is None:
        fields = itertools.repeat(None)
    return [rows.entry(file_id, offset, parsed, line, None, *span, None) if span is not None
            else rows.entry(file_id, offset, parsed, line, parsed[6], 1, None, None)
            for offset, line, span, parsed
            in zip(offsets, lines, spans, zip(ts, host, program, pid, level, fields, messages))]


def json_row_columns(lines: list, ts, host, program, pid, level, fields, messages, keyed):
    """The columns after file_id and offset of SQLite's rows of json_chunk()'s entries
    when they all have one shape, made column by column: when no line has fields and
    every message is read by its key (keyed: msg_at 0, not among the columns) or found in
    its line. None when they do not."""
    if fields is not None:
        return None
    spans = [] if keyed else message_spans(lines, messages)
    if spans is None:
        return None
    if "" in host:
        host = [value or None for value in host]
    if "" in program:
        program = [value or None for value in program]
    return [ts, host, program, pid, level, lines, *spans]


class SqliteRows:
    """Entries as rows of INSERT_ROW's shapes (see EntryBuilder for the arguments), and
    rows as the batches SqliteStore.add_batch() inserts."""

    @staticmethod
    def batch(rows: list) -> tuple:
        """(count, shape, parameters of INSERT_ROWS statements, rows left): made where the
        rows are made, in the parse worker, so that the inserting process only inserts."""
        sizes = set(map(len, rows))
        size = max(sizes, default=3)
        if len(sizes) > 1:  # rows of several shapes: all made the widest, so that order holds
            rows = [row if len(row) == size else WIDEN[len(row), size](row) for row in rows]
        whole = len(rows) - len(rows) % ROWS_PER_INSERT
        flat = list(itertools.chain.from_iterable(rows[:whole]))
        step = size * ROWS_PER_INSERT
        return (len(rows), size, [flat[at:at + step] for at in range(0, len(flat), step)],
                rows[whole:])

    @staticmethod
    def lines(file_id: int, offsets, lines: list):
        return zip(itertools.repeat(file_id), offsets, lines)

    @staticmethod
    def entry(file_id, offset, parsed, raw, message, msg_at, msg_len, part):
        if parsed is None:
            if message is None and part is None:
                return (file_id, offset, raw)
            return (file_id, offset, None, None, None, None, None, None, raw, message, msg_at,
                    msg_len, part)
        ts, host, program, pid, level, fields, _ = parsed
        if message is None and not fields and part is None:
            if not level and msg_len is None:
                return (file_id, offset, ts or None, host or None, program or None, pid, raw,
                        msg_at)
            return (file_id, offset, ts or None, host or None, program or None, pid,
                    level or None, raw, msg_at, msg_len)
        return (file_id, offset, ts or None, host or None, program or None, pid, level or None,
                FIELDS_JSON(fields) if fields else None, raw, message, msg_at, msg_len, part)

    @staticmethod
    def syslog_lines(file_id: int, offsets, lines: list, found: list, minutes: dict) -> list:
        """Rows of one-line syslog entries from syslog_chunk()'s groups, as entry() makes
        them of what parse_syslog() reads (a test holds the two to each other)."""
        levels = STATED_LEVELS
        return [(file_id, offset, minutes[minute] + seconds, host, program,
                 int(pid) if pid else None, line, len(head) + 1)
                if not (level := first and (levels.get(first) or levels.get(then))) else
                (file_id, offset, minutes[minute] + seconds, host, program,
                 int(pid) if pid else None, level, line, len(head) + 1, None)
                for offset, line, (head, minute, seconds, host, program, pid, first, then)
                in zip(offsets, lines, found)]

    @classmethod
    def json_lines(cls, file_id: int, offsets: list, lines: list, *columns) -> list:
        """Rows of one-line entries from json_chunk()'s columns, read as entry()'s rows of
        what parse_json() reads are (a test holds the two to each other): stored so too,
        but for messages read by their key."""
        same = json_row_columns(lines, *columns)
        if same is None:
            return entries(cls, file_id, offsets, lines, *columns,
                           list(map(message_span, lines, columns[6])))
        if columns[7]:
            same.append(itertools.repeat(0))    # msg_at: read by key
        return list(zip(itertools.repeat(file_id), offsets, *same))

    @staticmethod
    def json_batch(file_id: int, offsets: list, lines: list, *columns) -> tuple | None:
        """batch() of json_lines()'s rows when json_row_columns() makes them, laid out by
        slice assignment straight from the columns: 0.09 against 0.25 us a row for
        making the rows and then the batch (measured), of shape KEYED when the messages are
        read by key. None when it does not."""
        same = json_row_columns(lines, *columns)
        if same is None:
            return None
        same = [offsets, *same]
        count, size = len(lines), len(same) + 1
        shape = KEYED if columns[7] else size
        whole = count - count % ROWS_PER_INSERT
        flat = [file_id] * (whole * size)
        for at, column in enumerate(same, 1):
            flat[at::size] = column[:whole] if whole < count else column
        step = size * ROWS_PER_INSERT
        return (count, shape, [flat[at:at + step] for at in range(0, len(flat), step)],
                list(zip(itertools.repeat(file_id), *(column[whole:] for column in same))))


FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def check_database_file(path: str) -> None:
    """Refuse a DATABASE that is not an SQLite file, before SQLite may touch it (or create
    anything beside it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise Fatal(f"cannot open database {path!r}: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise Fatal(f"database {path!r} is {kind}, not a file (left untouched)")
    try:
        with open(path, "rb") as file:
            header = file.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise Fatal(f"cannot open database {path!r}: {exc.strerror}")
    if header and header != SQLITE_MAGIC:
        raise Fatal(f"{path!r} is not an SQLite database (left untouched)")


def check_database_directory(path: str) -> None:
    """WAL mode needs DATABASE-wal and DATABASE-shm beside it: say so at once when its
    directory cannot have them, rather than as an I/O error from SQLite later."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK | os.X_OK):
        raise Fatal(f"cannot create files in {directory!r}: SQLite needs to create "
                    f"{os.path.basename(path)}-wal and {os.path.basename(path)}-shm beside "
                    "the database")


def flock_holder(st) -> int | None:
    """The pid holding an flock() on the file of this stat, from /proc/locks, or None.
    Read so, not from the database: through another name (a hard link) SQLite would make
    -wal and -shm files of its own beside it."""
    try:
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        if "->" not in fields and len(fields) >= 6 and fields[1] == "FLOCK" \
                and fields[5] == inode:
            return int(fields[4])
    return None


def lock_database(path: str, mode: int) -> int:
    """An fd holding an exclusive flock() on DATABASE (created with mode, so are its -wal
    and -shm, which SQLite makes with its mode), or Fatal naming who holds it."""
    try:
        lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise Fatal(f"cannot open database {path!r}: {exc.strerror}")
    try:
        # flock() and SQLite's own fcntl() locks do not interact on Linux; this fd stays
        # open as long as the store, so closing it never drops SQLite's locks early.
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = flock_holder(os.fstat(lock_fd))
        os.close(lock_fd)
        who = f"pid {pid}" if pid is not None else "pid unknown"
        raise Fatal(f"database {path!r} is in use by another logtail2db ({who})")
    return lock_fd


SQLITE_CONFIG_MULTITHREAD, SQLITE_CONFIG_MEMSTATUS = 2, 9


def unlock_sqlite() -> None:
    """Set this process's SQLite up as the tool uses it, before any connection: each
    connection used by one thread only (multi-thread mode: no mutex taken around every
    call on a connection) and no memory statistics (a global mutex taken around every
    allocation). Python's sqlite3 offers no way to choose, and its serialized default
    made a row cost 0.9 us to insert against 0.63 (syslog; JSON 1.2 against 0.8,
    measured). Each connection here stays in the thread that opened it, as the sqlite3
    module checks. Done through ctypes on the library the module has loaded, found by
    its path: nothing happens when there is none (SQLite built into the module). For
    the command only: SQLite may be shut down and set up again only while no connection
    is open."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {fields[5] for fields in (line.split(None, 5) for line in maps)
                     if len(fields) == 6 and os.path.basename(fields[5]).startswith("libsqlite3")}
        if len(paths) != 1:
            return
        import ctypes
        library = ctypes.CDLL(paths.pop().rstrip("\n"))
        if library.sqlite3_shutdown() == 0:
            library.sqlite3_config(SQLITE_CONFIG_MULTITHREAD)
            library.sqlite3_config(SQLITE_CONFIG_MEMSTATUS, ctypes.c_int(0))
            library.sqlite3_initialize()
    except (OSError, AttributeError, ImportError) as exc:   # no /proc, no ctypes, no symbol
        log.debug("SQLite left in its default mode: %s", exc)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt() parameters
MALLOC_KEPT_BYTES = 16 << 20    # freed memory kept for reuse, and the smallest block mmap()ed


def steady_malloc() -> None:
    """Keep the memory a chunk frees for the next chunk. glibc gives the top of its heap
    back to the kernel once more than twice its largest recently freed block is free
    there, and each chunk of a catch-up frees a few times its size: page faults to take it
    back, each a page the kernel zeroes (and, in a VM that hands freed memory to its
    host, one the host must provide again). Measured over 1,000,000 lines: minor faults
    164,700 to 20,820 (JSON lines), 52,500 to 23,700 (syslog); the JSON catch-up 2.96
    against 3.37 s (median of 6). Memory kept is bounded by MALLOC_KEPT_BYTES; blocks
    that big still come from mmap() and go back at once. Setting either parameter ends
    glibc's own adjusting of both. Nothing happens where there is no mallopt() (it is
    glibc's; musl's does nothing)."""
    try:
        libc = _load_libc()
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_KEPT_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_KEPT_BYTES)
    except (OSError, AttributeError, ImportError) as exc:
        log.debug("malloc left as it is: %s", exc)


class Checkpointer:
    """A thread with a connection of its own that checkpoints the WAL when asked, so that
    the tailer's commits do not wait for the copy into the database nor its fsync. It runs
    nothing but PASSIVE checkpoints, which never block the writer or a reader.

    A WAL restarts from its start (and is truncated to journal_size_limit) only when the
    writer begins a transaction with every frame checkpointed, which a writer that never
    pauses (a catch-up) never does: its WAL would grow as big as all it writes. So while
    the WAL is over WAL_LIMIT_BYTES, each of the tailer's transactions begins once a
    checkpoint of all it committed has run (see SqliteStore.committed)."""

    def __init__(self, path: str):
        self.path = path
        self.changed = threading.Condition()
        self.asked = 0          # checkpoints asked for ...
        self.done = 0           # ... and the last of them run
        self.stopping = False
        self.alive = True       # False once the thread has ended, asked to or not
        self.thread = threading.Thread(target=self.run, name="checkpoint", daemon=True)
        self.thread.start()

    def ask(self) -> int:
        with self.changed:
            self.asked += 1
            self.changed.notify_all()
            return self.asked

    def wait(self, asked: int, timeout: float) -> bool:
        """Wait (up to timeout) until the checkpoint ask() numbered asked, or a later one,
        has run."""
        with self.changed:
            return self.changed.wait_for(lambda: self.done >= asked or not self.alive, timeout)

    def run(self) -> None:
        try:
            self.checkpoint_when_asked()
        except BaseException as exc:    # its connection failed to open, memory ran out
            log.warning("checkpoint thread: %s; the tailer's connection checkpoints from "
                        "now on", exc)
        finally:
            with self.changed:
                self.alive = False
                self.changed.notify_all()

    def checkpoint_when_asked(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        try:
            while True:
                with self.changed:
                    self.changed.wait_for(lambda: self.asked > self.done or self.stopping)
                    if self.stopping:
                        return
                    asked = self.asked
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:    # full, locked: the next one goes further
                    log.debug("checkpoint: %s", exc)
                with self.changed:
                    self.done = asked
                    self.changed.notify_all()
        finally:
            conn.close()

    def close(self) -> None:
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        self.thread.join()


class SqliteStore(Store):
    """The database: one writer (this process, under flock), any number of readers."""

    rows = SqliteRows
    errors = (sqlite3.Error,)

    def __init__(self, path: str, conn: sqlite3.Connection, lock_fd: int):
        self.name = path
        self.conn = conn
        self.lock_fd = lock_fd
        self.marked_at = None   # when the ingested table last got a row from us
        self.now = None         # the loop's clock when the open transaction began
        self.added = 0          # rows added since the last checkpoint was asked for
        self.checkpointed_at = None     # the loop's clock then
        self.checkpointer = None
        self.restart_asked = None   # the checkpoint the next transaction begins after
        self.wal_path = None

    @classmethod
    def open(cls, path: str, mode: int = 0o600) -> SqliteStore:
        """Open (or create, with mode) DATABASE for writing: locked, in WAL mode, schema up
        to date."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise Fatal(f"this Python's sqlite3 module has SQLite {sqlite3.sqlite_version}; "
                        f"logtail2db needs {'.'.join(map(str, MIN_SQLITE))} or newer "
                        "(generated columns)")
        try:    # in SQLite since 3.38; before, built in by every distribution we know
            with contextlib.closing(sqlite3.connect(":memory:")) as conn:
                conn.execute(JSON_PROBE)
        except sqlite3.OperationalError as exc:
            raise Fatal(f"this Python's sqlite3 module has SQLite {sqlite3.sqlite_version} "
                        f"without its JSON functions ({exc}); logtail2db needs them: the "
                        "entries view reads JSON lines' messages with them") from None
        check_database_file(path)
        check_database_directory(path)
        # CPython's sqlite3 looks for an adapter for every value not str, int, float or
        # bytearray: for None an attribute search that made inserts of rows with NULLs
        # twice as slow (measured). Registered, the search ends at once; {}.get is a
        # C function that returns None, which is bound as NULL.
        sqlite3.register_adapter(type(None), {}.get)
        lock_fd = lock_database(path, mode)
        try:
            store = cls(path, sqlite3.connect(path, isolation_level=None,
                                              timeout=BUSY_TIMEOUT_S), lock_fd)
            store.prepare()
        except BaseException:
            os.close(lock_fd)
            raise
        return store

    def prepare(self) -> None:
        """Check the schema before changing a byte, then WAL mode, then schema up to date."""
        conn, path = self.conn, self.name
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise Fatal(f"{path!r} has schema version {version}, newer than this logtail2db "
                        f"{__version__} knows ({SCHEMA_VERSION}); use a newer logtail2db")
        if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise Fatal(f"{path!r} is an SQLite database of another program "
                        "(it has tables but no logtail2db schema); left untouched")
        if version == 0:    # a new database: only now can its page size be chosen
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = wal").fetchone()[0]
        if mode != "wal":
            log.warning("%s: WAL mode unavailable (journal_mode=%s): readers may block writes",
                        path, mode)
        # In WAL mode NORMAL loses no consistency: a power cut can only roll back the last
        # transactions, entries and offsets together, and they are read again.
        conn.execute("PRAGMA synchronous = normal")
        # Appends touch a few pages; with 16 KiB pages the default 2 MB cache made the
        # peak RSS over 10,000 small files 6 MB bigger, for no speed (measured).
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        # A reader holding a snapshot lets the WAL grow; once readers let go and it is
        # checkpointed, SQLite truncates it back to this size instead of keeping it.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
        if mode == "wal":
            # Checkpoints copy the WAL into the database and fsync it: on the tailer's own
            # connection they took 0.4 us a row of its time (measured); a thread does them.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.checkpointer = Checkpointer(path)
            # Beside the file itself: SQLite follows a DATABASE that is a symlink.
            self.wal_path = conn.execute("PRAGMA database_list").fetchone()[2] + "-wal"
        if version == 0:
            self.run_script(SCHEMA)
        elif version < SCHEMA_VERSION:
            log.info("%s: migrating schema %d -> %d", path, version, SCHEMA_VERSION)
            script = "".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries_fts'").fetchone():
                script += FTS_TRIGGERS  # on entry_rows, reading messages as the view does
            try:
                self.run_script(script)
            except sqlite3.Error as exc:
                raise Fatal(f"{path!r}: migrating schema {version} -> {SCHEMA_VERSION} failed, "
                            f"the database is left as it was: {exc}") from None
        with self.atomic():
            self.begin()
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('pid', ?)",
                         (os.getpid(),))

    @contextlib.contextmanager
    def atomic(self, now: float = None):
        self.now = now
        try:
            yield
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")
                self.committed(now)
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.marked_at = None   # the mark may have gone with the transaction
            raise

    def begin(self) -> None:
        """Begin the transaction at its first write, so that an empty round touches
        nothing; a round's first notes, every MARK_EVERY_S, when its entries are stored."""
        if not self.conn.in_transaction:
            if self.restart_asked is not None:
                self.await_restart()
            self.conn.execute("BEGIN IMMEDIATE")
            if self.now is not None and (self.marked_at is None
                                         or self.now - self.marked_at >= MARK_EVERY_S):
                self.conn.execute(MARK_INGESTED, (utc_now(),))
                self.marked_at = self.now

    def await_restart(self) -> None:
        """Wait, before a transaction begins, for the checkpoint that lets the WAL restart:
        waited for here, not at the commit, so that meanwhile this core read and parsed.
        A disk slower than the tailer slows the tailer down rather than let the WAL grow;
        a reader holding a snapshot only makes the checkpoint stop short, soon. A stop
        asked for ends the wait: the last rounds are small."""
        while not (self.hurry or self.checkpointer.wait(self.restart_asked,
                                                         CHECKPOINT_SLICE_S)):
            pass
        self.restart_asked = None

    def committed(self, now: float | None) -> None:
        """Ask for a checkpoint once enough rows are committed, or a while after a commit;
        after every commit while the WAL is over its limit, the next transaction waiting
        for it. Its size is looked at after each commit: the first one after a restart
        truncates the file to WAL_LIMIT_BYTES, so a bigger file is that much bigger since
        the restart. A reader holding a snapshot keeps the WAL from restarting; once it
        lets go, the next commit's checkpoint and transaction restart it."""
        if self.checkpointer is None:
            return
        if not self.checkpointer.alive:     # as SQLite does it: at commits, on this connection
            self.conn.execute("PRAGMA wal_autocheckpoint = 1000")
            self.checkpointer = None
            return
        try:
            over = os.stat(self.wal_path).st_size > WAL_LIMIT_BYTES
        except OSError:
            over = False
        if not (over or now is None or self.added >= CHECKPOINT_ROWS
                or self.checkpointed_at is None
                or now - self.checkpointed_at >= CHECKPOINT_EVERY_S):
            return
        asked = self.checkpointer.ask()
        if over:
            self.restart_asked = asked
        self.added, self.checkpointed_at = 0, now

    def run_script(self, script: str) -> None:
        """A schema script in one transaction: all of it or nothing."""
        with self.atomic():
            self.begin()
            for sql in statements(script):
                self.conn.execute(sql)

    def is_transient(self, exc) -> bool:
        name = getattr(exc, "sqlite_errorname", None)   # Python 3.11+
        if name is not None:
            return any(name.startswith(prefix) for prefix in TRANSIENT_SQLITE)
        text = str(exc)
        return any(word in text for word in ("locked", "full", "disk I/O", "unable to open"))

    def files(self) -> list:
        return [FileState(*row) for row in self.conn.execute(SELECT_FILES + " WHERE gone IS NULL")]

    def gone_files(self, limit: int) -> list:
        return [FileState(*row) for row in self.conn.execute(
            SELECT_FILES + " WHERE gone IS NOT NULL ORDER BY gone DESC, id DESC LIMIT ?",
            (limit,))]

    def max_file_id(self) -> int:
        return self.conn.execute("SELECT coalesce(max(id), 0) FROM files").fetchone()[0]

    def file_states(self, ids) -> dict:
        ids = list(ids)
        rows = self.conn.execute(SELECT_FILES + f" WHERE id IN ({', '.join('?' * len(ids))})",
                                 ids) if ids else ()
        return {row[0]: FileState(*row) for row in rows}

    def reconnect(self) -> bool:
        return False    # one local connection, never lost; a rollback is certain

    def explain(self, exc) -> str:
        return str(exc)     # main() says "database: " before it

    def add(self, rows: list) -> None:
        self.add_batch(SqliteRows.batch(list(rows)))

    def add_batch(self, batch: tuple) -> None:
        self.begin()
        count, size, statements, rest = batch
        if statements:
            self.conn.executemany(INSERT_ROWS[size], statements)
        if rest:
            self.conn.executemany(INSERT_ROW[size], rest)
        self.added += count

    def save(self, states: list) -> None:
        self.begin()
        self.conn.executemany(UPSERT_FILE, states)

    def enable_fts(self) -> None:
        """--fts: create the full-text index (once), filled from the entries already stored."""
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'entries_fts'").fetchone():
            return
        try:
            self.conn.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5 (x)")
            self.conn.execute("DROP TABLE temp.fts5_probe")
        except sqlite3.OperationalError as exc:
            raise Fatal(f"--fts needs SQLite's FTS5 module, which this Python's sqlite3 "
                        f"lacks ({exc})") from None
        count = self.conn.execute("SELECT count(*) FROM entries").fetchone()[0]
        if count:
            log.info("building the full-text index of %d entries", count)
        self.run_script(FTS_SCHEMA)

    def id_range(self) -> tuple:
        return self.conn.execute("SELECT min(id), max(id) FROM entry_rows").fetchone()

    def prune(self, cutoff: str, low: int, span: int) -> int:
        with self.atomic():
            self.begin()
            deleted = self.conn.execute(PRUNE, (low, low + span, cutoff, cutoff)).rowcount
            self.conn.execute("DELETE FROM ingested WHERE at < ? AND ? > (SELECT max(id) FROM "
                              "entry_rows)", (cutoff, low + span - 1))
        return deleted

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        try:
            self.conn.execute("DELETE FROM meta WHERE key = 'pid'")
        except sqlite3.Error as exc:
            log.debug("could not clear the pid: %s", exc)   # a locked or full DB: harmless
        self.conn.close()
        os.close(self.lock_fd)


def read_sqlite_stats(path: str, now_s: float) -> Stats:
    """What --stats shows of DATABASE, read without writing anything beside it."""
    check_database_file(path)
    if not os.path.exists(path):
        raise Fatal(f"database {path!r} does not exist")
    # Without a -wal file no tailer has the database open: read it as immutable, which
    # creates no -wal and -shm files beside it as a read-only connection would.
    mode = "mode=ro" if os.path.exists(path + "-wal") else "immutable=1"
    conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?{mode}", uri=True,
                           timeout=BUSY_TIMEOUT_S)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not 0 < version <= SCHEMA_VERSION:
            raise Fatal(f"{path!r} is not a logtail2db database this version knows "
                        f"(schema version {version})")
        since = time.strftime("%Y-%m-%d %H:00:00", time.gmtime(now_s - 23 * 3600))
        return Stats(
            conn.execute("SELECT path, path_bytes, offset, gone FROM files ORDER BY path")
            .fetchall(),
            conn.execute("SELECT level, count(*) FROM entries "
                         "GROUP BY 1 ORDER BY 2 DESC, 1").fetchall(),
            conn.execute("SELECT max(ts) FROM entries").fetchone()[0],
            since,
            conn.execute("SELECT level, (strftime('%s', ts) - strftime('%s', ?))"
                         " / 3600, count(*) FROM entries WHERE ts >= ? GROUP BY 1, 2",
                         (since, since)).fetchall())
    finally:
        conn.close()


# -- PostgreSQL: a fleet of tailers into one server ------------------------------
#
# Each host's tailer commits its entries (by COPY) and its files' offsets in one server
# transaction, so a crash, a restarted server or a cut network lose and double nothing.
# Offsets are only ever read from the server: at the start and after every reconnect.

PG_SCHEMES = ("postgresql://", "postgres://")
PG_SCHEMA_VERSION = 1
PG_LOCK_CLASS = 0x6c743264      # "lt2d": first key of our advisory locks, the second being a
                                # host id (its one tailer) or 0 (schema and partition changes)
# conninfo defaults, unless the URL sets them: a dead server is noticed within a minute,
# and the server notices a dead host as soon (see the tcp_keepalives_* settings below),
# which releases that host's lock for its next tailer.
# tcp_user_timeout (ms): data the server has not acknowledged (a COMMIT sent into a cut
# link, where keepalives are not sent) fails the connection as soon, not after the kernel's
# 15 minutes of retransmissions; libpq takes it from version 12 on.
PG_DEFAULTS = {"keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
               "keepalives_count": "6", "connect_timeout": "5", "tcp_user_timeout": "60000",
               "fallback_application_name": "logtail2db"}
# What pg8000 is given of a URL, and where libpq's environment says what a URL leaves unset
# (pg8000 reads neither itself).
PG_ENVIRONMENT = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT",
                  "dbname": "PGDATABASE", "user": "PGUSER", "password": "PGPASSWORD",
                  "passfile": "PGPASSFILE", "connect_timeout": "PGCONNECT_TIMEOUT",
                  "application_name": "PGAPPNAME", "options": "PGOPTIONS",
                  "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
                  "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY"}
PG8000_KEYWORDS = set(PG_ENVIRONMENT) | {"fallback_application_name", "keepalives",
                                         "keepalives_idle", "keepalives_interval",
                                         "keepalives_count", "tcp_user_timeout"}
PG8000_VERSION = (1, 31)        # sock= (1.30) and ssl_context=False meaning no TLS (1.31)
PG_SOCKET_DIRS = ("/var/run/postgresql", "/tmp")    # libpq's default: Debian's, upstream's
PG_SSL_REQUEST = struct.pack("!ii", 8, 80877103)    # the startup message that asks for TLS
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
PG_STOP_GRACE_S = 1.0           # after SIGTERM, a server call may wait this long before its
                                # connection is cut (PgWatch): the last rounds take half that
PG_WATCH_SLICE_S = 0.05         # how often PgWatch looks at the clock while a call waits
PG_SESSION = ("SET TIME ZONE 'UTC'",    # ts and the files' times are UTC text
              "SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5",
              "SET tcp_keepalives_count = 6")
PG_TABLES = ("meta", "hosts", "files", "entries", "logs")
PARTITION_CHECK_S = 3600.0      # how often tomorrow's partition is made sure of
PARTITION_LOCK_TIMEOUT = "1s"   # partition changes wait no longer for other tailers' batches
# SQLSTATE classes and codes of faults that pass: connection (08), transaction rollback
# (40: serialization, deadlock), insufficient resources (53: disk full, too many
# connections), operator intervention (57: shutting down, starting up, cancelled), I/O
# error, lock not available.
PG_TRANSIENT_CLASSES = ("08", "40", "53", "57")
PG_TRANSIENT_CODES = ("58030", "55P03")
CHECK_VIOLATION, LOCK_NOT_AVAILABLE = "23514", "55P03"
# Connection failures come without SQLSTATE; these words make one that does not pass.
PG_PERMANENT_WORDS = ("authentication failed", "does not exist", "no pg_hba.conf entry",
                      "password", "permission denied", "certificate", "invalid",
                      "unsupported", "not supported", "does not support",
                      "SSL is not enabled", "not allowed")

PG_SCHEMA = r"""-- logtail2db PostgreSQL schema, version 1 (kept in meta).
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO meta (key, value) VALUES ('program', 'logtail2db'), ('schema_version', '1');

-- One row per host: a tailer per host name at a time (an advisory lock on its id).
CREATE TABLE hosts (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_commit timestamptz
);

-- One row per file identity of a host, as SQLite's files table.
CREATE TABLE files (
    host_id     integer NOT NULL REFERENCES hosts(id),
    id          bigint NOT NULL,
    path        text NOT NULL,
    path_bytes  bytea,
    dev         numeric(20),        -- st_dev and st_ino are 64-bit unsigned
    ino         numeric(20),
    "offset"    bigint NOT NULL,    -- every byte before it is stored in entries
    fingerprint bytea NOT NULL,
    resume_hash bytea,
    part        integer,
    format      text,
    first_seen  timestamptz NOT NULL,
    updated     timestamptz NOT NULL,
    gone        timestamptz,
    PRIMARY KEY (host_id, id)
);

-- One row per log entry, partitioned by the day it was stored: --keep drops whole days.
-- PostgreSQL text holds neither NUL nor invalid UTF-8: an entry with them has its readable
-- text (U+FFFD for bad bytes and NUL) in raw and its exact bytes in raw_bytes.
CREATE TABLE entries (
    id        bigserial,
    host_id   integer NOT NULL,
    file_id   bigint NOT NULL,
    "offset"  bigint NOT NULL,
    ts        timestamptz,
    host      text,
    program   text,
    pid       bigint,
    level     text,
    fields    jsonb,
    raw       text NOT NULL,
    raw_bytes bytea,
    msg       text,
    msg_at    integer NOT NULL DEFAULT 1,
    part      integer,
    stored    timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (stored);
-- A day without its partition yet (a tailer started past midnight) never fails a batch.
CREATE TABLE entries_default PARTITION OF entries DEFAULT;

CREATE VIEW logs AS
SELECT e.id, e.ts, e.level, h.name AS host, f.path, e.program, e.pid,
       coalesce(e.msg, substr(e.raw, e.msg_at)) AS message, e.fields, e.raw,
       coalesce(e.raw_bytes, convert_to(e.raw, 'UTF8')) AS raw_bytes,
       e.file_id, e."offset", e.part, e.host AS logged_host, e.stored
FROM entries AS e
JOIN hosts AS h ON h.id = e.host_id
JOIN files AS f ON f.host_id = e.host_id AND f.id = e.file_id;
"""

# version -> the script that brings a server's schema from it to version + 1 (see MIGRATIONS).
PG_MIGRATIONS = {}

PG_COLUMNS = ('host_id, file_id, "offset", ts, host, program, pid, level, fields, raw, '
              'raw_bytes, msg, msg_at, part')
# Rows in three shapes: a line that is its own message, a parsed one-line entry (most
# syslog and JSON lines: four columns fewer to make and for the server to read), any entry.
COPY_ROW = {4: 'COPY entries (host_id, file_id, "offset", raw) FROM STDIN',
            10: 'COPY entries (host_id, file_id, "offset", ts, host, program, pid, level, raw,'
                ' msg_at) FROM STDIN',
            14: f"COPY entries ({PG_COLUMNS}) FROM STDIN"}
PG_UPSERT_FILE = (
    'INSERT INTO files (host_id, id, path, path_bytes, dev, ino, "offset", fingerprint,'
    " resume_hash, part, format, first_seen, updated, gone)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (host_id, id) DO UPDATE SET path = excluded.path,"
    " path_bytes = excluded.path_bytes, dev = excluded.dev, ino = excluded.ino,"
    ' "offset" = excluded."offset", fingerprint = excluded.fingerprint,'
    " resume_hash = excluded.resume_hash, part = excluded.part, format = excluded.format,"
    " updated = excluded.updated, gone = excluded.gone")
PG_SELECT_FILES = (
    'SELECT id, path, path_bytes, dev, ino, "offset", fingerprint, resume_hash, part, format,'
    " to_char(first_seen, 'YYYY-MM-DD HH24:MI:SS'), to_char(updated, 'YYYY-MM-DD HH24:MI:SS'),"
    " to_char(gone, 'YYYY-MM-DD HH24:MI:SS') FROM files WHERE host_id = %s")
PG_FTS = ("CREATE INDEX IF NOT EXISTS entries_message_trgm ON entries"
          " USING gin ((coalesce(msg, substr(raw, msg_at))) gin_trgm_ops)")


def is_pg_url(target: str) -> bool:
    return target.startswith(PG_SCHEMES)


def pg_url_parts(url: str) -> tuple:
    """(the URL without its password, the password or None): the first is how messages
    name the server."""
    parts = urllib.parse.urlsplit(url)
    password = parts.password
    netloc = parts.netloc
    if password is not None:
        netloc = netloc.rpartition("@")[2]
        if parts.username is not None:
            netloc = netloc and urllib.parse.quote(parts.username, safe="%") + "@" + netloc
    query = parts.query
    if "password=" in query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        password = password or dict(pairs).get("password")
        query = "&".join(pair for pair in query.split("&") if not pair.startswith("password="))
    # Put together by hand: urlunsplit() drops the empty netloc of postgresql:///logs.
    shown_url = (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
                 + (f"#{parts.fragment}" if parts.fragment else ""))
    return shown_url, password


def with_defaults(params: dict, tcp_user_timeout: bool = True) -> dict:
    """Connection parameters with PG_DEFAULTS for what neither they nor libpq's environment
    set; tcp_user_timeout only where the driver can set it."""
    params = dict(params)
    for key, value in PG_DEFAULTS.items():
        if key == "connect_timeout" and os.environ.get("PGCONNECT_TIMEOUT"):
            continue
        if key == "tcp_user_timeout" and not tcp_user_timeout:
            continue
        params.setdefault(key, value)
    return params


def libpq_params(url: str) -> dict:
    """A postgresql:// URL's connection parameters as libpq reads them: the URL's parts, its
    query (which wins over them), then the PG* environment and libpq's defaults for what
    neither sets. For pg8000, which reads neither URLs nor libpq's environment."""
    unquote = urllib.parse.unquote
    rest, _, query = url.split("://", 1)[1].partition("?")
    netloc, _, dbname = rest.partition("#")[0].partition("/")
    params = {}
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if colon:
            params["password"] = unquote(password)
    if hostport.startswith("["):                        # [IPv6]:port
        host, _, port = hostport[1:].partition("]")
        port = port[1:]
    else:
        host, _, port = hostport.partition(":")
    if host:
        params["host"] = unquote(host)
    if port:
        params["port"] = port
    if dbname:
        params["dbname"] = unquote(dbname)
    for pair in query.partition("#")[0].split("&"):
        if pair:
            key, _, value = pair.partition("=")
            params[unquote(key)] = unquote(value)
    for key, variable in PG_ENVIRONMENT.items():
        if key not in params and os.environ.get(variable):
            params[key] = os.environ[variable]
    if "," in params.get("host", "") + params.get("port", ""):
        raise Fatal(f"{pg_url_parts(url)[0]}: pg8000 connects to one host; for several "
                    'install psycopg (pip install "psycopg[binary]")')
    if "host" not in params and "hostaddr" not in params:
        params["host"] = next((path for path in PG_SOCKET_DIRS if os.path.isdir(path)),
                              PG_SOCKET_DIRS[-1])
    params.setdefault("port", "5432")
    if "user" not in params:
        import pwd
        params["user"] = pwd.getpwuid(os.geteuid()).pw_name
    params.setdefault("dbname", params["user"])
    return params


def pgpass_fields(line: str) -> list:
    """A ~/.pgpass line's five fields: host, port, database, user, password; ':' and '\\'
    escaped by '\\' in the first four."""
    fields, field, chars = [], [], iter(line)
    for char in chars:
        if char == "\\":
            field.append(next(chars, ""))
        elif char == ":" and len(fields) < 4:
            fields.append("".join(field))
            field = []
        else:
            field.append(char)
    return fields + ["".join(field)]


def pgpass_password(params: dict) -> str | None:
    """The password the password file (passfile, PGPASSFILE, ~/.pgpass) has for params, as
    libpq matches it ('*' matches anything, a socket in the default directory is
    'localhost'); None when it has none, or when others may read it, as libpq ignores it then."""
    path = params.get("passfile") or os.path.join(os.path.expanduser("~"), ".pgpass")
    try:
        with open(path, "rb") as file:
            st = os.fstat(file.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("password file %s has group or world access: not read (chmod "
                            "0600 it)", shown(path))
                return None
            text = file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("password file %s: %s", shown(path), exc.strerror)
        return None
    host = params.get("host") or params["hostaddr"]
    if host in PG_SOCKET_DIRS:
        host = "localhost"
    wanted = (host, params["port"], params["dbname"], params["user"])
    for line in text.splitlines():
        if line and not line.startswith("#"):
            fields = pgpass_fields(line)
            if len(fields) == 5 and all(have in ("*", want) for have, want in zip(fields, wanted)):
                return fields[4]
    return None


def plain_bytes(value):
    """bytea as bytes: psycopg2 gives memoryview."""
    return bytes(value) if type(value) is memoryview else value


class PgDriver:
    """The few calls PgStore makes of a driver, the same through psycopg 3, psycopg2 and
    pg8000: a connection from the URL (PG_DEFAULTS for what it leaves unset), statements,
    COPY FROM STDIN of rows, and what an error says (its SQLSTATE, whether the connection
    went with it). Connections are in autocommit mode: PgStore says BEGIN and COMMIT."""

    name = None

    def __init__(self, module):
        self.module = module
        self.errors = (module.Error,)

    def connect(self, url: str, on_socket=None):
        """A connection; on_socket(fd) is told each socket it makes, as soon as there is one."""
        raise NotImplementedError

    def execute(self, conn, sql: str, params=None):
        """The cursor of one statement, its rows fetched."""
        cursor = conn.cursor()
        if params is None:
            cursor.execute(sql)     # no parameters: several statements may be one script
        else:
            cursor.execute(sql, params)
        return cursor

    def executemany(self, conn, sql: str, rows: list) -> None:
        conn.cursor().executemany(sql, rows)

    def copy(self, conn, sql: str, data: bytes) -> None:
        """COPY ... FROM STDIN of data, rows in COPY's text format (copy_data())."""
        raise NotImplementedError

    def close(self, conn) -> None:
        conn.close()

    def sqlstate(self, exc) -> str | None:
        raise NotImplementedError

    def message(self, exc) -> str:
        return str(exc)

    def broken(self, conn, exc) -> bool:
        """Whether the connection went with exc (else a ROLLBACK makes it usable again)."""
        raise NotImplementedError

    def connection_fault(self, exc) -> bool:
        """A fault of the connection itself, without SQLSTATE: refused, unreachable, lost."""
        return isinstance(exc, self.module.OperationalError)


class Psycopg3(PgDriver):
    name = "psycopg 3"

    def __init__(self, module):
        super().__init__(module)
        # psycopg logs what it ignores while closing a broken COPY ("the connection is
        # lost"): we report the fault itself, once, through Backoff.
        quiet = logging.getLogger("psycopg")
        if not quiet.handlers:
            quiet.addHandler(logging.NullHandler())

    def connect(self, url: str, on_socket=None):
        conninfo = self.module.conninfo
        params = with_defaults(conninfo.conninfo_to_dict(url),
                               self.module.pq.version() >= 120000)
        conn = self.module.connect(conninfo.make_conninfo(**params), autocommit=True)
        if on_socket is not None:
            on_socket(conn.fileno())
        return conn

    def copy(self, conn, sql: str, data: bytes) -> None:
        with conn.cursor().copy(sql) as copy:
            copy.write(data)

    def sqlstate(self, exc) -> str | None:
        return getattr(exc, "sqlstate", None)

    def broken(self, conn, exc) -> bool:
        return conn.broken


class Psycopg2(PgDriver):
    name = "psycopg2"

    def connect(self, url: str, on_socket=None):
        extensions = self.module.extensions
        params = with_defaults(extensions.parse_dsn(url), extensions.libpq_version() >= 120000)
        conn = self.module.connect(extensions.make_dsn(**params))
        conn.autocommit = True
        if on_socket is not None:
            on_socket(conn.fileno())
        return conn

    def copy(self, conn, sql: str, data: bytes) -> None:
        conn.cursor().copy_expert(sql, io.BytesIO(data))

    def sqlstate(self, exc) -> str | None:
        return getattr(exc, "pgcode", None)

    def broken(self, conn, exc) -> bool:
        return conn.closed != 0


class Pg8000(PgDriver):
    """pg8000 (pure Python) on a socket of ours: made as libpq would make it from the URL
    (libpq_params()), with its keepalives and TLS, and known to PgWatch from the start."""

    name = "pg8000"

    def connect(self, url: str, on_socket=None):
        params = with_defaults(libpq_params(url))
        unknown = sorted(set(params) - PG8000_KEYWORDS)
        if unknown:
            raise Fatal(f"{pg_url_parts(url)[0]}: pg8000 does not take "
                        f"{', '.join(key + '=' for key in unknown)}; with psycopg every "
                        'libpq parameter works (pip install "psycopg[binary]")')
        password = params.get("password") or pgpass_password(params)
        where = params.get("hostaddr") or params["host"]
        try:
            sock = self.make_socket(params, on_socket)
        except OSError as exc:
            raise self.module.InterfaceError(f"could not connect to {where} port "
                                             f"{params['port']}: {exc}") from None
        try:
            options = params.get("options")
            with self.network():
                conn = self.module.Connection(
                    params["user"], database=params["dbname"], password=password, sock=sock,
                    ssl_context=False, application_name=params.get("application_name")
                    or params.get("fallback_application_name"),
                    startup_params={"options": options} if options else None)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)   # connect_timeout bounds the connection's making only
        conn.autocommit = True
        return conn

    def make_socket(self, params: dict, on_socket):
        """A connected socket: to a unix socket when host is a directory, else TCP with the
        keepalives of params, then TLS as sslmode says (libpq's modes; allow as prefer)."""
        timeout = float(params["connect_timeout"] or 0) or None
        host, port = params.get("host"), int(params["port"])
        if host and host.startswith("/"):
            addresses = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, f"{host}/.s.PGSQL.{port}")]
        else:
            addresses = [(family, kind, proto, address) for family, kind, proto, _, address
                         in socket.getaddrinfo(params.get("hostaddr") or host, port,
                                               type=socket.SOCK_STREAM)]
        for n, (family, kind, proto, address) in enumerate(addresses):
            sock = socket.socket(family, kind, proto)
            try:
                if on_socket is not None:
                    on_socket(sock.fileno())
                sock.settimeout(timeout)
                sock.connect(address)
                break
            except OSError:
                sock.close()
                if n == len(addresses) - 1:
                    raise
        if family == socket.AF_UNIX:
            return sock     # libpq neither keeps alive nor encrypts a unix socket
        try:
            if params["keepalives"] != "0":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for option, key in ((socket.TCP_KEEPIDLE, "keepalives_idle"),
                                    (socket.TCP_KEEPINTVL, "keepalives_interval"),
                                    (socket.TCP_KEEPCNT, "keepalives_count")):
                    sock.setsockopt(socket.IPPROTO_TCP, option, int(params[key]))
            if int(params["tcp_user_timeout"]):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(params["tcp_user_timeout"]))
            return self.start_tls(sock, params)
        except BaseException:
            sock.close()
            raise

    def start_tls(self, sock, params: dict):
        """The socket as sslmode says: TLS asked for with the protocol's SSLRequest."""
        mode = params.get("sslmode", "prefer")
        if mode == "disable":
            return sock
        import ssl
        sock.sendall(PG_SSL_REQUEST)
        answer = sock.recv(1)
        if answer != b"S":
            if mode in ("require", "verify-ca", "verify-full"):
                raise self.module.InterfaceError("server does not support SSL, but SSL was "
                                                 "required")
            if answer != b"N":
                raise self.module.InterfaceError(f"unexpected answer to SSLRequest: {answer!r}")
            return sock
        if mode in ("verify-ca", "verify-full"):
            root = params.get("sslrootcert") or os.path.expanduser("~/.postgresql/root.crt")
            if root != "system" and not os.path.exists(root):
                raise self.module.InterfaceError(f'root certificate file "{root}" does not '
                                                 "exist")
            context = ssl.create_default_context(cafile=None if root == "system" else root)
            context.check_hostname = mode == "verify-full"
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if params.get("sslcert"):
            context.load_cert_chain(params["sslcert"], params.get("sslkey"))
        return context.wrap_socket(sock, server_hostname=params.get("host"))

    @contextlib.contextmanager
    def network(self):
        """pg8000's own error for a socket's: it lets some through (the first read of a
        message, "Connection reset by peer" when the server ends a session)."""
        try:
            yield
        except OSError as exc:
            raise self.module.InterfaceError("network error") from exc

    def execute(self, conn, sql: str, params=None):
        with self.network():
            return super().execute(conn, sql, params)

    def executemany(self, conn, sql: str, rows: list) -> None:
        with self.network():
            super().executemany(conn, sql, rows)

    def copy(self, conn, sql: str, data: bytes) -> None:
        with self.network():
            conn.cursor().execute(sql, stream=[data])

    def close(self, conn) -> None:
        with self.network():
            conn.close()

    def sqlstate(self, exc) -> str | None:
        if isinstance(exc, self.module.DatabaseError) and exc.args \
                and isinstance(exc.args[0], dict):
            return exc.args[0].get("C")
        return None

    def message(self, exc) -> str:
        if self.sqlstate(exc) is not None:
            fields = exc.args[0]    # the server's error fields: M the message, D its detail
            return fields.get("M", "") + (f" DETAIL: {fields['D']}" if "D" in fields else "")
        cause = exc.__cause__
        return f"{exc}: {cause}" if cause is not None else str(exc)

    def broken(self, conn, exc) -> bool:
        return isinstance(exc, self.module.InterfaceError)     # network errors among them

    def connection_fault(self, exc) -> bool:
        return isinstance(exc, self.module.InterfaceError)


def import_pg_driver() -> PgDriver:
    """The first of psycopg 3, psycopg2 and pg8000 that is installed, imported only for a
    PostgreSQL DATABASE; Fatal in one line without any."""
    try:
        import psycopg
    except ImportError:     # also when psycopg finds no libpq to use
        pass
    else:
        return Psycopg3(psycopg)
    try:
        import psycopg2
        import psycopg2.extensions
    except ImportError:
        pass
    else:
        return Psycopg2(psycopg2)
    try:
        import pg8000
    except ImportError:
        pass
    else:
        version = getattr(pg8000, "__version__", "0")
        if tuple(map(int, re.findall(r"[0-9]+", version)[:2])) < PG8000_VERSION:
            raise Fatal(f"pg8000 {version} is too old for logtail2db, which hands it a socket "
                        f"and needs {'.'.join(map(str, PG8000_VERSION))} or newer: pip install "
                        '--upgrade pg8000, or apt-get install python3-psycopg')
        import pg8000.dbapi
        return Pg8000(pg8000.dbapi)
    raise Fatal("a postgresql:// DATABASE needs a PostgreSQL driver (psycopg 3, psycopg2 or "
                "pg8000): apt-get install python3-psycopg, or pip install \"psycopg[binary]\"")


class PgLost(Exception):
    """The connection to the server is gone; the store connects again when retried."""


class PgBusy(Exception):
    """Another session holds this host's lock; after a reconnect, our own old one, until
    the server notices it is dead."""


class PgWatch:
    """Cuts the connection of a server call that still waits PG_STOP_GRACE_S after a stop
    was asked, so that SIGTERM ends a tailer within 2 s whatever the network does.

    Why a thread: a driver blocked in libpq's C code runs no Python signal handler until
    the server answers (libpq retries poll() on EINTR), and a server that went silent
    without closing (packets dropped, a hung proxy or NAT) may not answer for minutes:
    keepalives and tcp_user_timeout notice a dead peer, not one that acknowledges and says
    nothing. So while a call runs, the main thread blocks SIGTERM and SIGINT and this
    thread takes them, passing each on to the main thread (where it waits for the call to
    return); a stop the main thread takes between calls reaches it through the chained
    handlers (chain_handlers()). Once the grace has passed, it shuts the call's socket
    down: every driver then fails the call as a lost connection, which the loop handles as
    a fault that passes (the server rolls back, the loop stops with its warning, exit 4).
    A connection libpq is still making has no socket to shut down yet: then the process
    ends at once with that warning, as kill -9 would, which loses and doubles nothing (no
    transaction of that connection was committed; offsets are read back on the next start).
    """

    def __init__(self, name: str):
        self.name = name        # the server, as messages name it
        self.changed = threading.Condition()    # calls, sock, closing
        self.calls = 0          # driver calls the main thread is in
        self.sock = None        # a duplicate of the connection's socket, to shut down
        self.deadline = None    # time.monotonic() when calls are cut, once a stop came
        self.closing = False
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self.run, name="logtail2db-pg-watch",
                                       daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def call(self):
        """Around each driver call of the main thread: a stop signal meanwhile is ours."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        with self.changed:
            self.calls += 1
            self.changed.notify()
        try:
            yield
        finally:
            with self.changed:
                self.calls -= 1
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def follow(self, fd: int) -> None:
        """The connection's socket (a new one replaces the last)."""
        with self.changed:
            if self.sock is not None:
                self.sock.close()
            self.sock = socket.socket(fileno=os.dup(fd))

    def forget(self) -> None:
        """The connection is closed: its socket is not ours to shut down any more."""
        with self.changed:
            if self.sock is not None:
                self.sock.close()
                self.sock = None

    def chain_handlers(self) -> None:
        """Once the loop's handlers are in place: a stop they take starts the grace too."""
        for signum in STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                def on_stop(signum, frame, handler=handler):
                    self.stop_asked()
                    handler(signum, frame)
                signal.signal(signum, on_stop)

    def stop_asked(self) -> None:
        if self.deadline is None:   # no lock: this runs in signal handlers too
            self.deadline = time.monotonic() + PG_STOP_GRACE_S

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        while True:
            with self.changed:
                while not self.calls and not self.closing:
                    self.changed.wait()
                if self.closing:
                    return
            timeout = PG_WATCH_SLICE_S
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    self.cut()
                else:
                    timeout = min(timeout, left)
            info = signal.sigtimedwait(STOP_SIGNALS, timeout)
            if info is not None:
                signal.pthread_kill(self.main, info.si_signo)  # its handler runs after the call
                self.stop_asked()

    def cut(self) -> None:
        with self.changed:
            if not self.calls:
                return
            if self.sock is None:
                log.warning("stopping: no answer from %s %g s after the stop was asked, while "
                            "connecting; what is not stored yet will be read again on the "
                            "next start", self.name, PG_STOP_GRACE_S)
                for handler in log.handlers:
                    handler.flush()
                os._exit(EXIT_UNSTORED)
            log.warning("no answer from %s %g s after the stop was asked: connection cut",
                        self.name, PG_STOP_GRACE_S)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                log.debug("shutting the connection down: %s", exc)  # it is gone already
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.thread.join(1.0)
        self.forget()


def readable_text(text) -> str:
    """Text PostgreSQL takes: bad UTF-8 bytes and NUL become U+FFFD."""
    if type(text) is bytes:
        text = text.decode("utf-8", "replace")
    return text.replace("\x00", "\ufffd")


# COPY's text format for a run of rows at once. Rows hold NULL as NUL, which no text of ours
# holds (readable_text()), and bytea in its hex form; a run whose values hold no character
# COPY escapes (most runs) is joined and sent as it is.
PG_NULL = "\x00"
COPY_ROWS = 2000    # rows a COPY text is made of at most: the text is made in a few copies
COPY_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))


def copy_escaped(value) -> str:
    if value == PG_NULL:
        return "\\N"
    text = str(value)
    for char, escaped in COPY_ESCAPES:
        if char in text:
            text = text.replace(char, escaped)
    return text


# The lines of COPY_ROW's shapes, unescaped: an f-string of fixed fields is made faster
# than a %-template of them (0.42 against 0.69 us a 14-column row, measured).
COPY_LINES = {
    4: lambda rows: [f"{v0}\t{v1}\t{v2}\t{v3}" for v0, v1, v2, v3 in rows],
    10: lambda rows: [f"{v0}\t{v1}\t{v2}\t{v3}\t{v4}\t{v5}\t{v6}\t{v7}\t{v8}\t{v9}"
                      for v0, v1, v2, v3, v4, v5, v6, v7, v8, v9 in rows],
    14: lambda rows: [f"{v0}\t{v1}\t{v2}\t{v3}\t{v4}\t{v5}\t{v6}\t{v7}\t{v8}\t{v9}\t{v10}"
                      f"\t{v11}\t{v12}\t{v13}"
                      for v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13 in rows],
}


def copy_data(rows: list) -> bytes:
    """rows (tuples of one shape) as the bytes of COPY ... FROM STDIN in text format."""
    shape = COPY_LINES.get(len(rows[0]))
    if shape is not None:
        lines = shape(rows)
    else:
        template = "\t".join(["%s"] * len(rows[0]))
        lines = [template % row for row in rows]
    text = "\n".join(lines)     # faster than joining each row
    if (text.count("\t") == len(rows) * (len(rows[0]) - 1) and text.count("\n") == len(rows) - 1
            and "\\" not in text and "\r" not in text):
        return (text.replace(PG_NULL, "\\N") + "\n").encode()
    return "".join("\t".join(map(copy_escaped, row)) + "\n" for row in rows).encode()


class PgRows:
    """Entries as rows of COPY_ROW's shapes, told by their length: a line that is its own
    message, an entry whose message is in raw and that has no fields nor raw_bytes nor part,
    or every column (see EntryBuilder for the arguments), NULL as PG_NULL. An
    entry that is not UTF-8 without NUL has its readable text in raw and its bytes in
    raw_bytes (bytea's hex form), and rows as the COPY text PgStore.add_batch() sends."""

    def __init__(self, host_id: int):
        self.host_id = host_id

    def lines(self, file_id: int, offsets, lines: list):
        return zip(itertools.repeat(self.host_id), itertools.repeat(file_id), offsets, lines)

    @staticmethod
    def batch(rows: list) -> tuple:
        """(count, [(shape, COPY text of a run of rows of that shape), ...]): made in the
        parse worker, so that the inserting process only sends them."""
        runs = []
        for size, shaped in itertools.groupby(rows, len):
            shaped = list(shaped)
            runs.extend((size, copy_data(shaped[at:at + COPY_ROWS]))
                        for at in range(0, len(shaped), COPY_ROWS))
        return len(rows), runs

    def syslog_lines(self, file_id: int, offsets, lines: list, found: list,
                     minutes: dict) -> list:
        """entry()'s rows of one-line syslog entries from syslog_chunk()'s groups (text
        without NUL: no raw_bytes)."""
        host_id, levels, null = self.host_id, STATED_LEVELS, PG_NULL
        return [(host_id, file_id, offset, minutes[minute] + seconds, host, program,
                 int(pid) if pid else null,
                 first and (levels.get(first) or levels.get(then)) or null, line, len(head) + 1)
                for offset, line, (head, minute, seconds, host, program, pid, first, then)
                in zip(offsets, lines, found)]

    def json_lines(self, file_id: int, offsets, lines: list, *columns) -> list:
        """entry()'s rows of one-line entries from json_chunk()'s columns."""
        return entries(self, file_id, offsets, lines, *columns,
                       list(map(message_span, lines, columns[6])))

    @staticmethod
    def json_batch(*_) -> None:
        return None     # COPY text is made of rows, whatever made them

    def entry(self, file_id, offset, parsed, raw, message, msg_at, msg_len, part):
        if msg_len is not None:     # a part of raw (message_span()): the view reads tails only
            message = raw[msg_at - 1:msg_at - 1 + abs(msg_len)]
            if msg_len < 0:
                message = message.replace('\\"', '"')
            msg_at = 1
        raw_bytes = None
        if type(raw) is bytes:
            raw_bytes, raw = raw, readable_text(raw)
            if message is not None:
                message = readable_text(message)
        if parsed is None:
            if message is None and part is None and raw_bytes is None:
                return (self.host_id, file_id, offset, raw)
            return self.nulled(file_id, offset, None, None, None, None, None, None, raw,
                               raw_bytes, message, msg_at, part)
        ts, host, program, pid, level, fields, _ = parsed
        fields = FIELDS_JSON(fields) if fields else None
        if raw_bytes is not None:
            # Parsed from a line with NUL: the text columns refuse it (JSON spells it \u0000,
            # which jsonb refuses too).
            host, program, level = (value and readable_text(value)
                                    for value in (host, program, level))
            if fields is not None:
                fields = readable_text(fields).replace("\\u0000", "\\ufffd")
        if fields is None and raw_bytes is None and message is None and part is None:
            return (self.host_id, file_id, offset, ts or PG_NULL, host or PG_NULL,
                    program or PG_NULL, PG_NULL if pid is None else pid, level or PG_NULL, raw,
                    msg_at)
        return self.nulled(file_id, offset, ts or None, host or None, program or None, pid,
                           level or None, fields, raw, raw_bytes, message, msg_at, part)

    def nulled(self, *values) -> tuple:
        """A row of every column: NULL as PG_NULL, raw_bytes in bytea's hex form."""
        if values[9] is not None:
            values = (*values[:9], "\\x" + values[9].hex(), *values[10:])
        return (self.host_id, *[PG_NULL if value is None else value for value in values])


class PgStore(Store):
    """A PostgreSQL server that a fleet's tailers share: this host's files and entries,
    under a session advisory lock on the host's id, entries sent by COPY. A lost
    connection is connected again when the loop retries (reconnect())."""

    def __init__(self, url: str, host_name: str, driver: PgDriver):
        self.url = url
        self.name, self.password = pg_url_parts(url)
        self.host_name = host_name
        self.pg = driver
        self.errors = (*driver.errors, PgLost, PgBusy)
        self.conn = None
        self.in_tx = False      # BEGIN said on conn, neither COMMIT nor ROLLBACK yet
        self.watch = None       # PgWatch: for a tailer (open()), not for --stats
        self.host_id = None
        self.rows = None
        self.lost = False       # the connection went with a fault: connect when retried
        self.partitions_at = 0.0    # time.time() when tomorrow's partition is looked at

    @classmethod
    def open(cls, url: str, host_name: str) -> PgStore:
        """Connect as host_name: Fatal for a fault that does not pass (authentication, no
        such database, tables not ours, the host tailed already), PgLost saying why for
        one that does (the server down, starting, unreachable)."""
        store = cls(url, host_name, import_pg_driver())
        store.watch = PgWatch(store.name)
        try:
            store.connect(first=True)
        except store.errors as exc:
            store.close()
            if not store.is_transient(exc):
                raise Fatal(store.explain(exc)) from None
            raise PgLost(store.explain(exc)) from None
        except BaseException:
            store.close()
            raise
        return store

    def call(self):
        """Around a driver call: watched by PgWatch, if the store has one."""
        return self.watch.call() if self.watch is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def on_server(self):
        """Around a call on the connection, which it yields. A fault the connection went
        with is PgLost, whatever it says ("invalid socket" from psycopg2 after a COPY cut
        short): the connection is made again when retried, and a fault that lasts shows
        there."""
        conn = self.live()
        try:
            with self.call():
                yield conn
        except self.pg.errors as exc:
            if not self.pg.broken(conn, exc):
                raise
            message = self.fault_text(exc)
            self.disconnect()
            self.lost = True
            raise PgLost(message) from None

    def execute(self, sql: str, params=None):
        """One statement (or a script, without params); its cursor, rows fetched."""
        with self.on_server() as conn:
            return self.pg.execute(conn, sql, params)

    def connect(self, first: bool = False) -> None:
        """A new connection: schema checked (created, migrated), this host's id and its
        lock; each in its own transaction."""
        self.disconnect()
        try:
            with self.call():
                self.conn = self.pg.connect(self.url, self.watch.follow if self.watch else None)
            for sql in PG_SESSION:
                self.execute(sql)
            self.prepare()
            self.execute("INSERT INTO hosts (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
                         (self.host_name,))
            self.host_id = self.execute("SELECT id FROM hosts WHERE name = %s",
                                        (self.host_name,)).fetchone()[0]
            self.rows = PgRows(self.host_id)
            if not self.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                (PG_LOCK_CLASS, self.host_id)).fetchone()[0]:
                who = self.lock_holder()
                if first:
                    raise Fatal(f"host name {self.host_name!r} is already tailed into "
                                f"{self.name} by another logtail2db ({who}); each host needs "
                                "a --host-name of its own")
                raise PgBusy(f"host name {self.host_name!r} is still locked by {who}, "
                             "until the server notices that connection is gone")
            self.ensure_partitions()
        except BaseException:
            self.disconnect()
            raise
        self.lost = False
        if first:
            log.info("%s: storing as host %r, through %s", self.name, self.host_name,
                     self.pg.name)

    def lock_holder(self) -> str:
        row = self.execute(
            "SELECT a.pid, host(a.client_addr), a.application_name FROM pg_locks AS l"
            " JOIN pg_stat_activity AS a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
            " AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted",
            (PG_LOCK_CLASS, self.host_id)).fetchone()
        if row is None:
            return "a session now gone"
        return (f"server pid {row[0]}, from {row[1] or 'a local socket'}"
                + (f", {row[2]}" if row[2] else ""))

    def prepare(self) -> None:
        """Check the tables before changing anything, then create or migrate them, in one
        transaction that other hosts' tailers wait for."""
        with self.transaction():
            self.execute("SELECT pg_advisory_xact_lock(%s, 0)", (PG_LOCK_CLASS,))
            found = [row[0] for row in self.execute(
                "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n"
                " ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
                " AND c.relname = ANY(%s) ORDER BY 1", (list(PG_TABLES),))]
            meta = dict(self.execute("SELECT key, value FROM meta") if "meta" in found else ())
            if not found:
                log.info("%s: creating the logtail2db schema", self.name)
                self.execute(PG_SCHEMA)
                return
            if meta.get("program") != "logtail2db":
                raise Fatal(f"{self.name} has tables of another program ({', '.join(found)}: "
                            "no logtail2db schema); left untouched")
            version = int(meta.get("schema_version", 0))
            if version > PG_SCHEMA_VERSION:
                raise Fatal(f"{self.name} has schema version {version}, newer than this "
                            f"logtail2db {__version__} knows ({PG_SCHEMA_VERSION}); use a "
                            "newer logtail2db")
            if version < PG_SCHEMA_VERSION:
                log.info("%s: migrating schema %d -> %d", self.name, version, PG_SCHEMA_VERSION)
                for v in range(version, PG_SCHEMA_VERSION):
                    self.execute(PG_MIGRATIONS[v])
                self.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'",
                             (str(PG_SCHEMA_VERSION),))

    def ensure_partitions(self) -> None:
        """Today's and tomorrow's partitions of entries, made ahead of need. A day whose
        rows are in the DEFAULT partition already stays there (--keep deletes them)."""
        self.partitions_at = time.time() + PARTITION_CHECK_S
        now = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        days = [now + timedelta(days=n) for n in (0, 1)]
        existing = self.partition_days()
        missing = [day for day in days if day.strftime("%Y%m%d") not in existing]
        if not missing:
            return
        try:
            with self.transaction():
                self.execute(f"SET LOCAL lock_timeout = '{PARTITION_LOCK_TIMEOUT}'")
                self.execute("SELECT pg_advisory_xact_lock(%s, 0)", (PG_LOCK_CLASS,))
                existing = self.partition_days()
                for day in missing:
                    name = day.strftime("%Y%m%d")
                    if name in existing:
                        continue    # another host's tailer made it meanwhile
                    upper = day + timedelta(days=1)
                    self.execute("SAVEPOINT partition")
                    try:
                        self.execute(
                            f"CREATE TABLE entries_{name} PARTITION OF entries FOR VALUES"
                            f" FROM ('{day:%Y-%m-%d} 00:00+00') TO ('{upper:%Y-%m-%d} 00:00+00')")
                    except self.pg.errors as exc:
                        if self.pg.sqlstate(exc) != CHECK_VIOLATION:
                            raise
                        # Rows of that day are in the DEFAULT partition already.
                        self.execute("ROLLBACK TO SAVEPOINT partition")
        except self.pg.errors as exc:
            if self.pg.sqlstate(exc) != LOCK_NOT_AVAILABLE:
                raise
            log.debug("partitions put off: %s", exc)    # busy: try again soon
            self.partitions_at = time.time() + 60

    def partition_days(self) -> set:
        """The days (YYYYMMDD) that have a partition of entries."""
        return {row[0][len("entries_"):] for row in self.execute(
            "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'entries'::regclass AND c.relname ~ '^entries_[0-9]{8}$'")}

    @contextlib.contextmanager
    def transaction(self):
        """One server transaction of its own (schema, partitions, retention)."""
        self.execute("BEGIN")
        self.in_tx = True
        try:
            yield
            self.commit()
        except BaseException as exc:
            self.abort(exc)
            raise

    def commit(self) -> None:
        self.in_tx = False  # COMMIT ends the transaction, stored or not, whatever its answer
        self.execute("COMMIT")

    def live(self):
        if self.conn is None:
            raise PgLost(f"not connected to {self.name}")
        return self.conn

    def in_transaction(self) -> bool:
        return self.conn is not None and self.in_tx

    def abort(self, exc) -> None:
        """Roll back after exc; a connection that broke is dropped, to be made again. A
        COMMIT it broke in may have been stored: reconnect() tells the loop to read the
        offsets back."""
        if self.conn is None:
            return
        if not self.pg.broken(self.conn, exc) and not isinstance(exc, (KeyboardInterrupt,
                                                                     SystemExit)):
            try:
                if self.in_transaction():
                    self.in_tx = False
                    self.execute("ROLLBACK")
                return
            except self.errors as again:
                log.debug("rollback failed: %s", again)     # the connection went meanwhile
        self.disconnect()
        self.lost = True

    @contextlib.contextmanager
    def atomic(self, now: float = None):
        try:
            yield
            if self.in_transaction():
                self.commit()
        except BaseException as exc:
            self.abort(exc)
            raise

    def begin(self) -> None:
        """Begin the transaction at its first write; it notes when this host last stored."""
        if not self.in_transaction():
            if time.time() >= self.partitions_at:
                self.ensure_partitions()
            self.execute("BEGIN")
            self.in_tx = True
            self.execute("UPDATE hosts SET last_commit = now() WHERE id = %s", (self.host_id,))

    def reconnect(self) -> bool:
        if not self.lost:
            return False
        self.connect()
        log.info("connected to %s again; going on from the offsets it holds", self.name)
        return True

    def is_transient(self, exc) -> bool:
        if isinstance(exc, (PgLost, PgBusy)):
            return True
        if isinstance(exc, Fatal) or not isinstance(exc, self.pg.errors):
            return False
        code = self.pg.sqlstate(exc)
        if code:
            return code[:2] in PG_TRANSIENT_CLASSES or code in PG_TRANSIENT_CODES
        if not self.pg.connection_fault(exc):
            return False
        text = self.pg.message(exc)
        return not any(word in text for word in PG_PERMANENT_WORDS) or "shutting down" in text \
            or "starting up" in text

    def explain(self, exc) -> str:
        return f"{self.name}: {self.fault_text(exc)}"

    def fault_text(self, exc) -> str:
        """What exc says, on one line, without the password."""
        text = self.pg.message(exc) if isinstance(exc, self.pg.errors) else str(exc)
        text = " ".join(text.split()).replace(self.url, self.name)     # over lines in libpq
        text = text.partition(" CONTEXT: ")[0]  # the row COPY was at: log data, not the fault
        if self.password:
            text = text.replace(self.password, "***")
        return text

    def state(self, row) -> FileState:
        row = list(map(plain_bytes, row))
        for at in (3, 4):   # numeric(20): Decimal, as ints again
            if row[at] is not None:
                row[at] = int(row[at])
        return FileState(*row)

    def files(self) -> list:
        return [self.state(row) for row in self.execute(
            PG_SELECT_FILES + " AND gone IS NULL", (self.host_id,))]

    def gone_files(self, limit: int) -> list:
        return [self.state(row) for row in self.execute(
            PG_SELECT_FILES + " AND gone IS NOT NULL ORDER BY gone DESC, id DESC LIMIT %s",
            (self.host_id, limit))]

    def file_states(self, ids) -> dict:
        if not ids:
            return {}
        rows = self.execute(PG_SELECT_FILES + " AND id = ANY(%s)", (self.host_id, list(ids)))
        return {state.id: state for state in map(self.state, rows)}

    def max_file_id(self) -> int:
        return self.execute("SELECT coalesce(max(id), 0) FROM files WHERE host_id = %s",
                            (self.host_id,)).fetchone()[0]

    def add(self, rows: list) -> None:
        self.add_batch(PgRows.batch(list(rows)))

    def add_batch(self, batch: tuple) -> None:
        self.begin()
        for size, data in batch[1]:     # runs of one shape, in order
            with self.on_server() as conn:
                self.pg.copy(conn, COPY_ROW[size], data)

    def save(self, states: list) -> None:
        self.begin()
        host_id = self.host_id
        with self.on_server() as conn:
            self.pg.executemany(conn, PG_UPSERT_FILE, [(host_id, *state) for state in states])

    def enable_fts(self) -> None:
        """--fts: a trigram index of the messages (pg_trgm), for LIKE and ILIKE on them."""
        try:
            with self.transaction():
                self.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except self.pg.errors as exc:
            if self.is_transient(exc):
                raise
            raise Fatal(f"--fts needs the pg_trgm extension in {self.name}, which could not "
                        f"be created ({self.explain(exc)}); a superuser can run CREATE "
                        "EXTENSION pg_trgm there once") from None
        with self.transaction():
            self.execute(PG_FTS)

    def id_range(self) -> tuple:
        # Retention by whole days needs no id ranges: one prune() is the whole sweep.
        return (0, 0)

    def prune(self, cutoff: str, low: int, span: int) -> int:
        """Drop the days stored before cutoff (their partitions), and delete what the DEFAULT
        partition holds of them; returns how many entries went."""
        deleted = 0
        cutoff_day = cutoff[:10].replace("-", "")
        with self.transaction():
            self.execute(f"SET LOCAL lock_timeout = '{PARTITION_LOCK_TIMEOUT}'")
            for day in sorted(self.partition_days()):
                upper = datetime.strptime(day, "%Y%m%d") + timedelta(days=1)
                if upper.strftime("%Y%m%d") <= cutoff_day:
                    deleted += self.execute(f"SELECT count(*) FROM entries_{day}").fetchone()[0]
                    self.execute(f"DROP TABLE entries_{day}")
            deleted += self.execute("DELETE FROM entries_default WHERE stored < %s::date",
                                    (cutoff[:10],)).rowcount
        return deleted

    def disconnect(self) -> None:
        """End the session (the host's lock goes with it), if there is one."""
        if self.conn is not None:
            conn, self.conn, self.in_tx = self.conn, None, False
            try:
                with self.call():
                    self.pg.close(conn)
            except self.pg.errors as exc:
                log.debug("closing the connection: %s", exc)
        if self.watch is not None:
            self.watch.forget()

    def close(self) -> None:
        self.disconnect()
        if self.watch is not None:
            self.watch.close()
            self.watch = None


def read_pg_stats(url: str, host_name: str, now_s: float) -> Stats:
    """What --stats shows of a server: this host's files and entries, and per host of the
    fleet its entries, newest entry and last commit."""
    store = PgStore(url, host_name, import_pg_driver())
    try:
        store.conn = store.pg.connect(url)
    except store.pg.errors as exc:
        raise Fatal(store.explain(exc)) from None
    query = store.execute
    try:
        query("SET TIME ZONE 'UTC'")
        query("SET default_transaction_read_only = on")
        if query("SELECT to_regclass('meta') IS NULL OR to_regclass('entries') IS NULL"
                 ).fetchone()[0]:
            raise Fatal(f"{store.name} has no logtail2db schema")
        host = query("SELECT id FROM hosts WHERE name = %s", (host_name,)).fetchone()
        host_id = host[0] if host else -1
        since = time.strftime("%Y-%m-%d %H:00:00", time.gmtime(now_s - 23 * 3600))
        text_ts = "to_char(max(ts), 'YYYY-MM-DD HH24:MI:SS')"
        return Stats(
            [tuple(map(plain_bytes, row)) for row in query(
                'SELECT path, path_bytes, "offset", gone FROM files WHERE host_id = %s'
                " ORDER BY path", (host_id,))],
            query("SELECT level, count(*) FROM entries WHERE host_id = %s"
                  " GROUP BY 1 ORDER BY 2 DESC, 1", (host_id,)).fetchall(),
            query(f"SELECT {text_ts} FROM entries WHERE host_id = %s", (host_id,)).fetchone()[0],
            since,
            query("SELECT level, floor(extract(epoch FROM ts - %s::timestamptz) / 3600)::int,"
                  " count(*) FROM entries WHERE host_id = %s AND ts >= %s::timestamptz"
                  " GROUP BY 1, 2", (since, host_id, since)).fetchall(),
            query("SELECT h.name, count(e.host_id), to_char(max(e.ts), 'YYYY-MM-DD HH24:MI:SS'),"
                  " to_char(h.last_commit, 'YYYY-MM-DD HH24:MI:SS') FROM hosts AS h"
                  " LEFT JOIN entries AS e ON e.host_id = h.id"
                  " GROUP BY h.id ORDER BY h.name").fetchall())
    except store.pg.errors as exc:
        raise Fatal(store.explain(exc)) from None
    finally:
        store.close()


def open_store(target: str, mode: int = 0o600, host_name: str = None) -> Store:
    """The store DATABASE names, open for writing: a PostgreSQL URL's server as host_name,
    else an SQLite file (a new one gets mode)."""
    if is_pg_url(target):
        return PgStore.open(target, host_name or socket.gethostname())
    return SqliteStore.open(target, mode)


# Event loop ###################################################################

class WorkerLost(Exception):
    """The parse worker died; what it parsed in this round is read again in-process."""


_FRAME = struct.Struct("Q")
DONE_FRAME = marshal.dumps(("done",))     # the worker's end of a run


def send_frame(sock: socket.socket, message, fd: int = None) -> None:
    send_marshalled(sock, marshal.dumps(message), fd)


def send_marshalled(sock: socket.socket, data: bytes, fd: int = None) -> None:
    header = _FRAME.pack(len(data))
    try:
        if fd is None:
            sock.sendall(header + data)
        else:
            sock.sendmsg([header],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise WorkerLost(f"the parse worker's socket closed ({exc.strerror})") from None


def _receive_exactly(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        try:
            n = sock.recv_into(view[got:])
        except ConnectionResetError:
            n = 0
        if n == 0:
            raise WorkerLost("the parse worker's socket closed")
        got += n
    return data


def receive_request(sock: socket.socket):
    """The worker's side: the next request and the fd that came with it (or None)."""
    fds = array.array("i")
    header, ancillary, _, _ = sock.recvmsg(_FRAME.size, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    header += _receive_exactly(sock, _FRAME.size - len(header))
    message = marshal.loads(_receive_exactly(sock, _FRAME.unpack(header)[0]))
    return message, fds[0] if fds else None


class FrameSender:
    """The worker's sending half: frames made by the parsing thread (FRAMES_AHEAD at most
    waiting) and sent by a thread of their own. The kernel caps a socket's buffer
    (net.core.wmem_max, 208 KiB on most boxes) far below a chunk's frame; sent by the
    parsing thread, a frame kept it waiting until the tailer, busy inserting, read the
    last of it, and the tailer found the next not ready and parsed in its place (a
    catch-up 10-30% slower there, measured). The thread only sends: the frame is made
    where its rows are, so that a failure to make one is the parsing thread's."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.frames = queue.Queue(FRAMES_AHEAD)
        threading.Thread(target=self._run, name="frame sender", daemon=True).start()

    def send(self, message) -> None:
        self.frames.put(marshal.dumps(message))

    def _run(self) -> None:
        try:
            while True:
                send_marshalled(self.sock, self.frames.get())
        except WorkerLost:
            os._exit(0)     # the tailer closed the socket: done
        except BaseException as exc:
            log.error("parse worker: %r", exc)
            os._exit(1)     # the tailer sees the socket close and parses in-process


def _parse_run(sock, sender: FrameSender, fd: int, request, options, stamps, rows) -> None:
    """Parse fd from pos to its size a chunk at a time, each answered with its rows and the
    builder's state after it, until done or a "stop" comes."""
    _, file_id, format, part, held, pos = request
    st = os.fstat(fd)
    builder = EntryBuilder(file_id, options, stamps, rows, format, part)
    builder.held = held
    while pos < st.st_size:
        if select.select([sock], [], [], 0)[0]:
            receive_request(sock)       # the "stop" that ends the run early
            return
        left = st.st_size - pos
        data, end, _ = read_lines(fd, pos, min(max(READ_CHUNK, options.max_entry_bytes), left),
                                  min(READ_CHUNK, left))
        if not data:
            return      # a line without its newline yet, or an over-long one
        batch = builder.feed_batch(data, pos, st.st_mtime)
        sender.send(("rows", batch, end, builder.format, builder.part, builder.held))
        pos = end


def _serve(sock: socket.socket, options: ParseOptions, rows) -> None:
    """The worker's life: parse what is asked until the socket closes."""
    try:
        signal.set_wakeup_fd(-1)
        # systemd and terminals signal the whole group: the tailer stores what it took from
        # us, then closes the socket, and that ends us.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        # Keep no fd of the tailer's: not its lock on the database, not its log files.
        os.closerange(3, sock.fileno())
        os.closerange(sock.fileno() + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        stamps = Stamps()
        sender = FrameSender(sock)
        while True:
            try:
                request, fd = receive_request(sock)
            except WorkerLost:
                os._exit(0)     # the tailer closed the socket: done
            if request[0] == "parse":
                try:
                    _parse_run(sock, sender, fd, request, options, stamps, rows)
                finally:
                    os.close(fd)
                sender.send(("done",))
            # else a "stop" for a run that had ended already
    except BaseException as exc:
        log.error("parse worker: %r", exc)
        os._exit(1)     # the tailer sees the socket close and parses in-process
    os._exit(0)


class ParseWorker:
    """A child process that parses a big backlog on the other core while this one inserts;
    one per tailer, started for the first big backlog.

    take() hands it a file's backlog (the fd by SCM_RIGHTS, where to start, the builder's
    state) when it is free, and takes the chunks it has sent back: their rows go to the
    store, the builder takes its state after them. Nothing here waits for the worker but
    the rest of a frame it has begun to send: its socket is in the loop's select(), and the
    file is read on once chunks have come.
    """

    def __init__(self, options: ParseOptions, rows):
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WORKER_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WORKER_BUFFER)
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            _serve(theirs, options, rows)     # never returns
        theirs.close()
        self.sock = ours
        self.file = None        # the Tracked whose backlog it parses
        self.stopping = False   # a run was abandoned: what it sends is dropped until "done"
        self.buffer = bytearray(WORKER_FRAME)   # the frame being received
        self.view = memoryview(self.buffer)
        self.got = 0            # bytes of it received
        self.frame_end = None   # its end in buffer, once its header is received
        self.chunks = collections.deque()   # frames of the run under way, not taken yet
        self.taken = 0          # chunks taken of the run under way
        self.dry = None         # (file, offset) where a run found no whole line to parse
        self.helped = None      # the file last parsed in-process while it was busy

    def fileno(self) -> int:
        return self.sock.fileno()

    def free(self) -> bool:
        return self.file is None and not self.stopping

    def wants_input(self) -> bool:
        """Whether select() should wake the loop for what the worker sends."""
        return (self.file is not None and not self.chunks) or self.stopping

    def take(self, t, budget: int, add_batch) -> int:
        """Take up to budget bytes of t's backlog (starting t's run if the worker is free);
        returns the bytes taken, 0 while its chunks have not come (or it is busy)."""
        if self.free():
            log.debug("parse worker takes %s from offset %d", shown(t.name or t.state.path),
                      t.pos)
            send_frame(self.sock, ("parse", t.id, t.builder.format, t.builder.part,
                                   t.builder.held, t.pos), t.fd)
            self.file = t
        if self.file is not t:
            return 0
        self.receive()
        start = t.pos
        while self.chunks and t.pos - start < budget:
            frame = self.chunks.popleft()
            if frame == DONE_FRAME:
                if not self.taken:
                    self.dry = (t, t.pos)   # no whole line there: not the worker's to read
                self.file, self.taken = None, 0
                break
            # Decoded only now: a chunk's rows take several times its bytes in memory.
            _, batch, t.pos, format, part, held = marshal.loads(frame)
            if format != t.builder.format:
                t.builder.set_format(format)
            t.builder.part, t.builder.held = part, held
            add_batch(t, batch)
            self.taken += 1
        return t.pos - start

    def receive(self) -> None:
        """Take in what the worker has sent while no chunk waits: a frame at a time,
        straight into one buffer kept for the next (a chunk is decoded before the next is
        received), as copying and allocating megabytes a chunk cost more than decoding
        them. Nothing is waited for but the rest of a frame begun (up to FRAME_WAIT_S at a
        time): a frame comes in pieces of the socket's buffer (see FrameSender), and one
        taken for not ready would have this core parse in the worker's place."""
        while not self.chunks:
            end = _FRAME.size if self.frame_end is None else self.frame_end
            try:
                got = self.sock.recv_into(self.view[self.got:end], end - self.got,
                                          socket.MSG_DONTWAIT)
            except BlockingIOError:
                if (self.got or self.frame_end is not None) and select.select(
                        [self.sock], [], [], FRAME_WAIT_S)[0]:
                    continue
                break
            except ConnectionResetError:
                got = 0
            if not got:
                raise WorkerLost("the parse worker's socket closed")
            self.got += got
            if self.got < end:
                continue
            if self.frame_end is None:      # the header: the frame's size
                self.frame_end = _FRAME.size + _FRAME.unpack_from(self.buffer)[0]
                if self.frame_end > len(self.buffer):
                    self.buffer = bytearray(self.frame_end + (self.frame_end >> 3))
                    self.view = memoryview(self.buffer)
                continue
            frame = self.view[_FRAME.size:self.frame_end]
            self.frame_end, self.got = None, 0
            if self.stopping:
                self.stopping = frame != DONE_FRAME
            else:
                self.chunks.append(frame)

    def abandon(self, t) -> None:
        """End t's run: chunks parsed but not taken are dropped, t's builder keeps its state
        as of the last one taken."""
        if self.file is t:
            self.file, self.taken = None, 0
            if DONE_FRAME not in self.chunks:
                send_frame(self.sock, ("stop",))
                self.stopping = True
            self.chunks.clear()

    def close(self) -> None:
        self.sock.close()       # the worker sees EOF and exits
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass    # already reaped


class Backoff:
    """Retries after a fault that passes (disk full, locked): one error line when it
    starts, one line when it works again, the pause doubling up to RETRY_MAX_S."""

    def __init__(self):
        self.at = None      # when to try again
        self.delay = RETRY_MIN_S

    def waiting(self, now: float) -> bool:
        return self.at is not None and now < self.at

    def failed(self, exc, now: float) -> None:
        if self.delay == RETRY_MIN_S:
            log.error("cannot store entries: %s; retrying until it works", exc)
        self.at = now + self.delay
        self.delay = min(self.delay * 2, RETRY_MAX_S)

    def worked(self) -> None:
        if self.delay != RETRY_MIN_S:
            log.warning("database writable again; storing resumed")
        self.at, self.delay = None, RETRY_MIN_S


class Retention:
    """--keep: a sweep over the entries every PRUNE_EVERY_S, deleting among PRUNE_SPAN ids
    per transaction with PRUNE_PAUSE_S between, so that ingestion never waits. Offsets stay
    as they are, so nothing is read again."""

    def __init__(self, keep_s: float, now: float):
        self.keep_s = keep_s
        self.at = now
        self.sweep = None       # [cutoff, next id, last id, deleted] while sweeping

    def step(self, store: Store, now: float) -> None:
        if self.sweep is None:
            low, high = store.id_range()
            if low is None:
                self.at = now + PRUNE_EVERY_S
                return
            cutoff = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - self.keep_s))
            self.sweep = [cutoff, low, high, 0]
        cutoff, low, high, deleted = self.sweep
        try:
            deleted += store.prune(cutoff, low, PRUNE_SPAN)
        except store.errors as exc:
            if not store.is_transient(exc):
                raise
            log.debug("retention put off: %s", exc)     # the commits report the fault
            self.at = now + RETRY_MAX_S
            return
        if low + PRUNE_SPAN > high:
            if deleted:
                log.info("retention: deleted %d entries older than %s UTC", deleted, cutoff)
            self.sweep = None
            self.at = now + PRUNE_EVERY_S
        else:
            self.sweep = [cutoff, low + PRUNE_SPAN, high, deleted]
            self.at = now + PRUNE_PAUSE_S


class Progress:
    """On a terminal, a catch-up longer than PROGRESS_AFTER_S shows one line, in place."""

    def __init__(self, stream, started: float):
        self.stream = stream
        self.started = started
        self.at = started + PROGRESS_AFTER_S
        self.shown = False

    def show(self, now: float, done: int, left: int, entries: int) -> None:
        if not left:
            if self.shown:
                self.stream.write("\r\x1b[K")
                self.shown = False
            return
        if now < self.at:
            return
        self.at = now + PROGRESS_EVERY_S
        elapsed = now - self.started
        eta = left / (done / elapsed) if done else 0
        self.stream.write(f"\rcatching up: {human_bytes(done)} of {human_bytes(done + left)}, "
                          f"{entries / elapsed:,.0f} entries/s, "
                          f"ETA {int(eta) // 60}:{int(eta) % 60:02d}\x1b[K")
        self.stream.flush()
        self.shown = True


class Tracked:
    """A file being followed: its state as committed, how far it is read, what is held."""

    __slots__ = ("state", "name", "fd", "pos", "head", "builder", "size", "last_data",
                 "checkpoints", "candidate", "closed")

    def __init__(self, state: FileState, last_data: float):
        self.state = state          # as committed; for a file not stored yet, as it will be
        self.name = None            # its name in DIRECTORY, None once renamed away or deleted
        self.fd = None
        self.pos = state.offset     # entries in the batch or held by the builder end here
        self.head = state.fingerprint   # its first bytes as read, FINGERPRINT_BYTES at most
        self.builder = None
        self.size = 0               # its size when last looked at
        self.last_data = last_data  # when its size last changed
        self.checkpoints = []       # (offset, tail_hash) after its last reads, for its copies
        if state.offset and state.resume_hash is not None:
            self.checkpoints.append((state.offset, state.resume_hash))
        self.candidate = False      # nothing of it is stored and it may be a copy: decide()
        self.closed = False         # its writer closed it after writing (IN_CLOSE_WRITE)

    @property
    def id(self) -> int:
        return self.state.id

    def position(self) -> FileState:
        """The state to check the file against before reading on: what is read of it."""
        last = self.checkpoints[-1] if self.checkpoints else (None, None)
        return self.state._replace(offset=self.pos, fingerprint=self.head,
                                   resume_hash=last[1] if last[0] == self.pos else None)

    def checkpoint(self, tail: bytes) -> None:
        """Note the hash of the bytes before the read position (tail, as read), for the
        file to be checked against before it is read on, and for its copies."""
        while self.checkpoints and self.checkpoints[-1][0] >= self.pos:
            self.checkpoints.pop()      # read again after a rollback
        if self.pos:
            self.checkpoints.append((self.pos, digest(tail)))
            if len(self.checkpoints) > MAX_CHECKPOINTS:
                self.checkpoints = thin_checkpoints(self.checkpoints, self.pos)

    def original(self, live: bool = True, at: int = None) -> Original:
        """This file as what a copy of it would be checked against; a live one also at
        offset at (the size of the file checked), read from this file itself when it still
        starts as it did: a file that merely starts like it then differs at once."""
        checkpoints = [cp for cp in self.checkpoints if cp[0] <= self.pos]
        if at and self.fd is not None and os.pread(self.fd, len(self.head), 0) == self.head:
            value = tail_hash(self.fd, at)
            if value is not None:
                checkpoints = [cp for cp in checkpoints if cp[0] < at] + [(at, value)]
                checkpoints += [cp for cp in self.checkpoints if at < cp[0] <= self.pos]
        return Original(self.state.id, self.state.path, self.builder.format if self.builder
                        else self.state.format, self.head, tuple(checkpoints), live)

    def look(self, st, hashes: dict, now: float) -> Look:
        """What identify() needs of this file besides the tail hashes: its first bytes, and
        whether it is complete (its writer closed it, or it was quiet for COPY_QUIET_S)."""
        head = os.pread(self.fd, FINGERPRINT_BYTES, 0)
        quiet = now - self.last_data >= COPY_QUIET_S or self.name is None
        return Look(st.st_dev, st.st_ino, self.state.path, st.st_size, head, hashes,
                    self.closed or quiet, quiet)

    def begin(self, state: FileState) -> None:
        """The inode's content is new: follow it as a new file, read from its start."""
        self.state = state
        self.pos, self.head, self.checkpoints, self.candidate = 0, b"", [], False

    def copy_of(self, verdict: Verdict, head: bytes) -> None:
        """A copy: its first verdict.offset bytes are stored already (as its original's)."""
        self.pos = verdict.offset
        self.head = head[:verdict.offset]
        self.checkpoints = [(self.pos, tail_hash(self.fd, self.pos))]
        self.state = self.state._replace(offset=self.pos, format=verdict.original.format)

    def read_state(self) -> FileState:
        """Its state as far as it is read: what was stored of it when its content left."""
        return self.position()._replace(fingerprint=self.head[:self.pos], part=self.builder.part,
                                        format=self.builder.format)

    def committed_state(self, now: str) -> FileState:
        """Its state once the open transaction is committed: its offset just past what is
        stored of it (the entry its builder holds is not), with that offset's tail hash."""
        offset = self.builder.held_offset(self.pos)
        last = self.checkpoints[-1] if self.checkpoints else (None, None)
        if last[0] == offset:
            value = last[1]
        else:
            value = tail_hash(self.fd, offset) if self.fd is not None else None
        return self.state._replace(offset=offset, fingerprint=self.head[:offset],
                                   resume_hash=value, part=self.builder.part,
                                   format=self.builder.format, updated=now)

    def __repr__(self):
        return (f"<Tracked {self.state.id} {shown(self.name)} offset={self.state.offset} "
                f"pos={self.pos}>")


class Directory:
    """DIRECTORY as the tailer follows it: its inotify watch (or polling), which of its
    names are worth reading, the events gathered on them until a round takes them, when to
    scan it again, and the warnings about its names, given once."""

    def __init__(self, path: bytes, options):
        self.path = path
        self.options = options
        self.inotify_fd = self.wd = None
        self.poll_s = options.poll
        self.missing = False    # deleted or moved away: looked for again and again
        self.retry_s = DIR_FIRST_RETRY_S    # how long until the next look, while missing
        self.identity = self.stat()     # (st_dev, st_ino) of the directory followed
        self.suspect = False    # names were created or deleted: is it still the same one?
        self.rescan_at = 0.0
        self.dirty = {}         # name -> inotify mask gathered since the last round
        self.link_watches = {}  # wd -> names: watches on symlink targets (--follow-symlinks)
        self.skip = set()       # (dev, ino) never read: the database's own files...
        self.skip_names = set() # ...and their names, when the database is in DIRECTORY
        self.warned = set()     # (name, what): warnings given once
        self.database = None    # its path, to see who may read it

    def watch(self) -> None:
        """Start inotify on DIRECTORY, or fall back to polling when it cannot be had."""
        if self.poll_s is not None or self.options.once:
            return
        try:
            if self.inotify_fd is None:
                self.inotify_fd = init()
            self.wd = add_watch(self.inotify_fd, self.path, DIR_MASK | IN_ONLYDIR)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise
            self.poll_s = DEFAULT_POLL_S
            log.warning("inotify unavailable (%s): polling %s every %g s instead",
                        exc.strerror, shown(self.path), self.poll_s)

    def stat(self):
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def replaced(self) -> bool:
        """Whether the path now leads to another directory, or nowhere. A file of the old
        one still open keeps its watch alive: no IN_DELETE_SELF comes until it is closed."""
        self.suspect = False
        try:
            return self.stat() != self.identity
        except OSError:
            return True

    def how(self) -> str:
        if self.poll_s is not None:
            return f"polling every {self.poll_s:g} s"
        return f"inotify via {binding_name()}"

    def skip_own_files(self, database: str) -> None:
        """Never read the database's own files, nor a stderr redirected into DIRECTORY."""
        base = os.fsencode(os.path.abspath(database))
        self.database = base
        for suffix in DB_SUFFIXES:
            try:
                st = os.stat(base + suffix)
            except OSError:
                continue    # -wal and -shm come and go with connections
            self.skip.add((st.st_dev, st.st_ino))
        self.skip_names = {os.path.basename(base) + s for s in DB_SUFFIXES
                           if os.path.dirname(base) == self.path}
        try:
            st = os.fstat(sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            return      # no stderr at all (closed by the caller)
        if stat.S_ISREG(st.st_mode):
            self.skip.add((st.st_dev, st.st_ino))

    def holds(self, state: FileState) -> bytes | None:
        """The path of a stored file when it is in DIRECTORY itself, else None."""
        path = state.path_bytes if state.path_bytes is not None else os.fsencode(state.path)
        prefix = self.path + b"/"
        if path.startswith(prefix) and b"/" not in path[len(prefix):]:
            return path
        return None

    def wanted(self, name: bytes) -> bool:
        if name in self.skip_names:
            return False
        text = os.fsdecode(name)
        if self.options.include and not any(fnmatch.fnmatchcase(text, p)
                                            for p in self.options.include):
            return False
        return not any(fnmatch.fnmatchcase(text, p) for p in self.options.exclude)

    def listing(self, now: float) -> dict:
        """{name: inode} of what is in DIRECTORY now; the next scan is due a while later.
        OSError when it is gone, or another directory has taken its path."""
        self.rescan_at = now + (self.poll_s or self.options.rescan)
        if self.replaced():
            raise FileNotFoundError(errno.ENOENT, "replaced by another directory")
        with os.scandir(self.path) as entries:
            return {entry.name: entry.inode() for entry in entries}

    def dispatch(self, event: Event) -> bool:
        """Note an inotify event; True when it says DIRECTORY itself is gone."""
        if event.mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflowed: rescanning %s", shown(self.path))
            self.rescan_at = 0.0
        elif event.wd in self.link_watches:
            if event.mask & IN_IGNORED:
                del self.link_watches[event.wd]     # the target is gone
            for name in self.link_watches.get(event.wd, ()):
                self.dirty[name] = self.dirty.get(name, 0) | event.mask
        elif event.wd != self.wd:
            pass        # an old watch's last events (IN_IGNORED after rm_watch)
        elif not event.name:
            return bool(event.mask & DIR_GONE)
        elif not event.mask & IN_ISDIR:
            self.dirty[event.name] = self.dirty.get(event.name, 0) | event.mask
            self.suspect |= bool(event.mask & (IN_CREATE | IN_DELETE))
        return False

    def take_dirty(self) -> dict:
        dirty, self.dirty = self.dirty, {}
        return dirty

    def open_name(self, name: bytes, open_path):
        """(fd, stat) of the regular file that name leads to, opened with open_path, or None
        (said once why); FileNotFoundError when it leads nowhere."""
        try:
            fd = open_path(os.path.join(self.path, name))
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.warn_once(name, "symlink", logging.INFO,
                               "%s: a symlink, not followed (see --follow-symlinks)")
            elif exc.errno == errno.ENXIO:
                self.warn_once(name, "special", logging.INFO, "%s: not a regular file, skipped")
            else:
                self.warn_once(name, exc.errno, logging.WARNING, "%s: cannot read: %s",
                               exc.strerror)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in self.skip:
            if not stat.S_ISREG(st.st_mode):    # a subdirectory is usual: no need to say so
                level = logging.DEBUG if stat.S_ISDIR(st.st_mode) else logging.INFO
                self.warn_once(name, "special", level, "%s: not a regular file, skipped")
            os.close(fd)
            return None
        if self.warned:
            self.warned = {w for w in self.warned if w[0] != name}
        return fd, st

    def watch_link(self, name: bytes) -> None:
        """A followed symlink's target changes without events in DIRECTORY: watch it too."""
        path = os.path.join(self.path, name)
        if not (self.options.follow_symlinks and self.inotify_fd is not None
                and os.path.islink(path)):
            return
        try:
            wd = add_watch(self.inotify_fd, path, IN_MODIFY | IN_CLOSE_WRITE)
        except OSError as exc:
            self.warn_once(name, "link", logging.WARNING,
                           "%s: cannot watch the symlink's target (%s); it is rescanned", exc)
            return
        self.link_watches.setdefault(wd, set()).add(name)

    def unwatch_link(self, name: bytes) -> None:
        for wd, names in list(self.link_watches.items()):
            names.discard(name)
            if not names:
                del self.link_watches[wd]
                try:
                    rm_watch(self.inotify_fd, wd)
                except OSError:
                    pass    # the target is gone, and its watch with it

    def lose(self, now: float) -> None:
        """DIRECTORY was deleted or moved away: look for it again at once, then ever less
        often, down to every DIR_RETRY_S."""
        log.warning("%s vanished; waiting for it to come back", shown(self.path))
        self.missing = True
        if self.wd is not None:
            try:
                rm_watch(self.inotify_fd, self.wd)
            except OSError:
                pass    # the kernel already dropped the watch (IN_IGNORED after a deletion)
            self.wd = None
        self.retry_s = DIR_FIRST_RETRY_S
        self.rescan_at = now    # one replaced at once is there already

    def find(self, now: float) -> None:
        try:
            if self.inotify_fd is not None:
                self.wd = add_watch(self.inotify_fd, self.path, DIR_MASK | IN_ONLYDIR)
            elif not stat.S_ISDIR(os.stat(self.path).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        except OSError:
            self.rescan_at = now + self.retry_s
            self.retry_s = min(2 * self.retry_s, DIR_RETRY_S)
            return
        log.warning("%s is back; following it again", shown(self.path))
        self.identity = self.stat()
        self.missing = False
        self.rescan_at = 0.0

    def check_file(self, name: bytes, st, head: bytes) -> None:
        """Warn (once) of what a file read from its start makes of the database: text
        whose lines are not split at newlines alone, readers of the logs it stores."""
        encoding = wide_encoding(head)
        if encoding is not None:
            self.warn_once(name, "encoding", logging.WARNING, "%s: %s text (it begins with a "
                           "byte-order mark): stored as its bytes, its messages not readable",
                           encoding)
        try:
            database = os.stat(self.database) if self.database else None
        except OSError:
            return
        who = readers_beyond(database, st) if database is not None else None
        if who is not None:
            self.warn_once(b"", "readers", logging.WARNING, "%s%s may be read by %s, who may "
                           "not read %s (modes %04o and %04o): chmod 600 it, or 640 for the "
                           "logs' group", shown(self.database), who, shown(name),
                           database.st_mode & 0o777, st.st_mode & 0o777)

    def warn_once(self, name: bytes, what, level: int, message: str, *args) -> None:
        if (name, what) not in self.warned:
            self.warned.add((name, what))
            log.log(level, message, shown(name), *args)


class Tailer:
    """Follows DIRECTORY: one select() over inotify, the signal pipe and the parse worker;
    each wake-up's reading stored in one transaction with the files' new offsets."""

    def __init__(self, directory: bytes, store: Store, options, clock=time.monotonic):
        self.directory = Directory(directory, options)
        self.store = store
        self.options = options
        self.clock = clock      # the one clock of the timing rules; tests bring their own
        self.parse_options = ParseOptions(options.format, options.pattern,
                                          options.multiline_start, options.max_entry_bytes,
                                          options.max_entry_lines)
        self.stamps = Stamps()
        self.tracked = {}       # (dev, ino) -> Tracked: files followed, fd open or not
        self.names = {}         # name -> Tracked found under that name
        self.resumable = {}     # (dev, ino) -> FileState: known to the database, not yet found
        self.by_path = {}       # (path, ino) -> (dev, ino) of resumable: for a changed st_dev
        self.originals = Originals()    # what a new file may be a copy of
        self.undecided = {}     # Tracked -> when to look again (or at its next event):
                                # files that may be copies still being written
        self.pending = {}       # Tracked -> None: more to read (an ordered set)
        self.touched = {}       # Tracked -> None: state to store in the next commit
        self.added = 0          # entries in the open transaction
        self.departed = []      # (FileState, rows): files whose content left, to be
                                # committed as gone with the last entries read of them
        self.detached = {}      # Tracked -> None: no longer under any name, read until quiet
        self.holders = set()    # Tracked whose builder holds back a last entry
        self.open = collections.OrderedDict()  # Tracked -> None with an open fd, least
                                               # recently read first: max_open at most
        self.max_open = options.max_open_files
        self.next_id = store.max_file_id() + 1
        self.stopping = False
        self.finishing = False  # in finish(): the last rounds before exiting
        self.hangup = False     # SIGHUP came: rescan at once
        self.starting = True    # until the first scan is through: --from-end, gone files
        self.scan_left = None   # names of a scan still to look at, sorted (None: no scan)
        self.wake_r = self.wake_w = None
        self.backoff = Backoff()
        self.worker = None      # ParseWorker, started for the first big backlog
        self.turns = {}         # Tracked -> None: big backlogs waiting for the worker
        self.backlogs = None    # the waiting ones in the order the worker takes them, as
                                # the round began (see backlog_order())
        self.use_worker = options.cores > 1     # False too once it failed
        self.stats = collections.Counter()     # entries, bytes: for progress and the summary
        self.started = clock()
        self.retention = Retention(options.keep, self.started) if options.keep else None
        show = sys.stderr.isatty() and log.isEnabledFor(logging.INFO)
        self.progress = Progress(sys.stderr, self.started) if show else None

    # -- setting up ------------------------------------------------------------

    def install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum, frame):
        self.stopping = True    # no work in a signal handler: the loop sees the flags
        self.store.hurry = True

    def _on_hup(self, signum, frame):
        self.hangup = True      # the loop says so, and rescans

    def load(self) -> None:
        """Files the database follows in DIRECTORY, to be matched while scanning, and the
        ones whose content left it lately, whose copies may still show up."""
        for state in self.store.files():
            path = self.directory.holds(state)
            if path is not None:
                self.resumable[(state.dev, state.ino)] = state
                self.by_path[(path, state.ino)] = (state.dev, state.ino)
        for state in reversed(self.store.gone_files(MAX_REMEMBERED)):
            if self.directory.holds(state) is not None:
                self.originals.remember(stored_original(state))

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        """Catch up, then follow events until SIGTERM/SIGINT (or, with --once, until caught up)."""
        self.directory.watch()
        now = self.clock()
        while True:     # the first scan, in transactions of at most max_open new files
            self.stored(now, lambda: self.scan(now))
            self.close_idle()
            if self.scan_left is None or self.backoff.at is not None:
                break
        if not self.options.once:
            log.info("watching %s: %d files (%s)", shown(self.directory.path), len(self.names),
                     self.directory.how())
        while not self.stopping and not (self.options.once and self.caught_up()):
            self.wait(now)
            now = self.clock()
            self.round(now)
        self.finish(self.clock())

    def caught_up(self) -> bool:
        """--once is done: nothing to read, nothing to retry, no possible copy to decide
        (COPY_QUIET_S at most), the worker idle."""
        return not (self.pending or self.directory.dirty or self.backoff.at or self.scan_left
                    or self.turns or self.undecided
                    or (self.worker is not None and not self.worker.free()))

    def wait(self, now: float) -> None:
        """Sleep in select() until an event, a signal, the worker's rows or the next
        deadline, and take in what woke it."""
        inotify_fd = self.directory.inotify_fd
        rlist = [self.wake_r]
        if inotify_fd is not None:
            rlist.append(inotify_fd)
        if self.worker is not None and self.worker.wants_input():
            rlist.append(self.worker)
        ready = select.select(rlist, [], [], self.timeout(now))[0]
        if self.wake_r in ready:
            while True:
                try:
                    if not os.read(self.wake_r, 512):
                        break
                except BlockingIOError:
                    break   # drained: the handlers have already set their flags
        if inotify_fd is not None and inotify_fd in ready:
            self.dispatch(get_events(inotify_fd), now)
        if self.worker is not None and self.worker in ready:
            try:
                self.worker.receive()
            except WorkerLost as exc:
                self.lose_worker(exc)   # its chunks taken are stored: read on in-process
            if self.worker is not None and self.worker.file is not None:
                self.pending[self.worker.file] = None
            elif self.turns:
                self.pending.update(self.turns)     # it is free: the next one's turn
                self.turns.clear()

    def timeout(self, now: float):
        """Seconds until the next due thing, 0 when work waits, None when nothing is due."""
        if self.backoff.at is not None:
            return max(0.0, self.backoff.at - now)
        if self.pending or self.directory.dirty or self.stopping or self.scan_left:
            return 0
        due = [self.directory.rescan_at]
        if self.retention is not None:
            due.append(self.retention.at)
        for t in self.holders:
            due.append(t.last_data + HOLD_S)
        due.extend(self.undecided.values())
        if self.detached:
            due.append(now + DETACHED_POLL_S)
        return max(0.0, min(due) - now)

    def dispatch(self, events: list, now: float) -> None:
        for event in events:
            if self.directory.dispatch(event):
                self.lose_directory(now)

    def round(self, now: float) -> None:
        """What one wake-up calls for: read, store, close idle files, retention, progress."""
        if self.hangup:
            self.hangup = False
            log.info("SIGHUP: rescanning %s", shown(self.directory.path))
            self.directory.rescan_at = 0.0
        if self.backoff.waiting(now):
            return
        if not self.directory.missing and (self.directory.suspect or self.detached):
            if self.directory.replaced():
                self.lose_directory(now)
        if self.directory.missing and now >= self.directory.rescan_at:
            self.directory.find(now)
        self.stored(now, lambda: self.read_round(now))
        self.close_idle()
        if self.retention is not None and now >= self.retention.at:
            self.retention.step(self.store, now)
        if self.progress is not None:
            left = sum(max(0, t.size - t.pos) for t in self.pending)
            self.progress.show(now, self.stats["bytes"], left, self.stats["entries"])

    def read_round(self, now: float) -> None:
        """Read what the events and deadlines call for (in the round's transaction)."""
        if ((now >= self.directory.rescan_at or self.scan_left)
                and not self.directory.missing):
            self.scan(now)
        closed = self.take_events(now)
        self.look_again(now)
        if self.turns:  # the worker is free (the next one's turn), or may be behind
            self.pending.update(self.turns)
            self.turns.clear()
        self.read_pending(now)
        for t in closed:
            if t in self.holders and t not in self.pending:
                self.add_rows(t, t.builder.flush())     # its writer is done with the entry
        self.flush_quiet(now)
        self.check_detached(now)

    def stored(self, now: float, step) -> None:
        """Run a step that reads, and store what it read with the files' states, in one
        transaction. A fault that passes (disk full, locked) rolls back, rewinds every
        file to its committed offset and retries with back-off."""
        try:
            if self.store.reconnect():
                self.reload()
            with self.store.atomic(now):
                step()
                states = self.states(utc_now())
                if states:
                    self.store.save(states)
        except WorkerLost as exc:
            self.lose_worker(exc)
            self.rewind()
            return
        except self.store.errors as exc:
            if not self.store.is_transient(exc):
                raise
            self.rewind()
            self.directory.rescan_at = 0.0  # the step may have been a scan, cut short
            self.backoff.failed(self.store.explain(exc), now)
            return
        self.backoff.worked()
        self.committed(states)

    def finish(self, now: float) -> None:
        """After SIGTERM or --once: read what was written, store it with held entries, stop."""
        deadline = now + STOP_BUDGET_S
        if self.directory.inotify_fd is not None:
            self.dispatch(get_events(self.directory.inotify_fd), now)
        if self.backoff.at is None:
            self.last_rounds(deadline)
        if self.backoff.at is not None:
            log.warning("stopping with the database unavailable; what is not stored yet "
                        "will be read again on the next start")
        if self.worker is not None:
            self.worker.close()
        for t in self.undecided:
            log.info("%s: not read yet: it may be a copy still being written (decided on the "
                     "next start)", shown(t.name or t.state.path))
        for t in self.tracked.values():
            self.close(t)

    def last_rounds(self, deadline: float) -> None:
        """Read on until nothing is left or the stop budget is spent, then store the held
        entries: their writers stop with us, or we would hold them across the restart."""
        self.finishing = True
        if self.worker is not None and self.worker.file is not None:
            self.worker.abandon(self.worker.file)   # the builders hold what was taken
        self.use_worker = False     # small rounds in-process, each done soon
        now = self.clock()
        self.stored(now, lambda: self.take_events(now))
        for t in self.tracked.values():
            if t.fd is not None:
                self.pending[t] = None
        while self.pending and now < deadline and self.backoff.at is None:
            self.stored(now, lambda: self.read_pending(now, STOP_ROUND_BYTES))
            now = self.clock()
        if self.backoff.at is None:
            self.stored(now, lambda: [self.add_rows(t, t.builder.flush())
                                      for t in list(self.holders)])

    def cut_short(self) -> bool:
        """A stop is asked for: the round in progress stores what it has and ends (the
        last rounds of finish() then read on, in small steps)."""
        return self.stopping and not self.finishing

    def take_events(self, now: float) -> list:
        """Bring every name that had events up to date; returns the files whose writer
        closed them (IN_CLOSE_WRITE)."""
        closed = []
        for name, mask in self.directory.take_dirty().items():
            self.refresh(name, mask, now)
            t = self.names.get(name)
            if t is not None and mask & (IN_CLOSE_WRITE | IN_MODIFY):
                t.closed = bool(mask & IN_CLOSE_WRITE)
                if t.closed:
                    closed.append(t)
        return closed

    # -- files -----------------------------------------------------------------

    def scan(self, now: float) -> None:
        """Look at every name in DIRECTORY: the start, an overflow, polling, reconciliation.
        New files are looked at max_open at a time, each batch stored before the next, so
        that they may be closed again."""
        if self.scan_left is None and not self.list_directory(now):
            return
        while self.scan_left and len(self.open) < self.max_open:
            name, ino = self.scan_left.pop()
            t = self.names.get(name)
            if t is not None and t.state.ino == ino:
                self.pending[t] = None      # cheap: read() stats it and returns if unchanged
            else:
                self.refresh(name, NAME_CHANGES, now)
        if self.scan_left:
            return      # the next round goes on where this one stopped
        self.scan_left = None
        if self.starting:
            self.starting = False
            for key, state in list(self.resumable.items()):
                log.info("%s: gone while stopped; its unread bytes, if any, are lost",
                         shown(state.path))
                self.depart(state, stored_original(state))
                del self.resumable[key]

    def list_directory(self, now: float) -> bool:
        """Start a scan: the names now in DIRECTORY, those gone let go; False when it is."""
        try:
            names = self.directory.listing(now)
        except OSError as exc:
            if self.starting:
                raise Fatal(f"cannot read directory {shown(self.directory.path)!r}: "
                            f"{exc.strerror}")
            self.lose_directory(now)
            return False
        for name in list(self.names):
            if name not in names:
                self.lose_name(name, now)
        self.scan_left = sorted(names.items(), reverse=True)    # pop() takes the first
        return True

    def refresh(self, name: bytes, mask: int, now: float) -> None:
        """Bring one name up to date after events on it; queue its file for reading."""
        t = self.names.get(name)
        if t is not None and not mask & NAME_CHANGES:
            self.pending[t] = None      # same file under the same name: just read on
            return
        if not self.directory.wanted(name):
            return
        try:
            opened = self.directory.open_name(name, lambda path: self.open_path(path, now))
        except FileNotFoundError:
            if t is not None:
                self.lose_name(name, now)
            return
        if opened is None:
            return      # not a file to read: said why, once
        fd, st = opened
        current = self.tracked.get((st.st_dev, st.st_ino))
        if t is not None and t is not current:
            self.lose_name(name, now)
        if current is None:
            current = self.track(name, fd, st, now)
        elif current.fd is None:
            self.opened(current, fd)    # it was closed as idle; read() checks its first bytes
        else:
            os.close(fd)
        self.attach(current, name)

    def attach(self, t: Tracked, name: bytes) -> None:
        """name leads to t: note it (a rename), watch a symlink's target, queue t."""
        self.directory.watch_link(name)
        if t.name != name:
            if t.name is not None:
                log.info("%s: renamed to %s", shown(t.name), shown(name))
            self.set_name(t, name)
        self.names[name] = t
        self.pending[t] = None

    def set_name(self, t: Tracked, name: bytes) -> None:
        t.name = name
        t.state = t.state._replace(**path_columns(os.path.join(self.directory.path, name)))
        self.detached.pop(t, None)
        if not t.candidate:
            self.touched[t] = None

    def lose_name(self, name: bytes, now: float) -> None:
        """name no longer leads to its file: read that file until it is quiet."""
        self.directory.unwatch_link(name)
        t = self.names.pop(name)
        if t.name == name:
            for other, u in self.names.items():
                if u is t:      # a hard link, or a rename seen before this name's loss
                    self.set_name(t, other)
                    return
            t.name = None
            t.last_data = now
            self.detached[t] = None
            self.pending[t] = None

    # -- identity: what a file is (see identify()) -----------------------------

    def track(self, name: bytes, fd: int, st, now: float) -> Tracked:
        """Follow an inode seen for the first time since the start: resume what is stored of
        it, or begin it; whether a file nothing is stored of is a copy, decide() settles."""
        path = os.path.join(self.directory.path, name)
        known = self.stored_state(st, path)
        state = (self.new_state(st, **path_columns(path)) if known is None else
                 known._replace(dev=st.st_dev, ino=st.st_ino, **path_columns(path)))
        t = Tracked(state, now - max(0.0, time.time() - st.st_mtime))   # quiet since mtime
        self.opened(t, fd)
        self.tracked[(st.st_dev, st.st_ino)] = t
        t.size = st.st_size
        self.directory.check_file(name, st, os.pread(fd, 4, 0))
        if known is not None and (known.offset or known.fingerprint):
            self.resume(t, known, st)
        elif self.starting and self.options.from_end and known is None:
            t.pos = last_line_end(fd, st.st_size)
            t.head = os.pread(fd, FINGERPRINT_BYTES, 0)
            t.state = t.state._replace(offset=t.pos)
        else:
            t.candidate = True
        t.builder = self.new_builder(t)
        log.debug("%s: file %d, from offset %d of %d%s", shown(name), t.id, t.pos, st.st_size,
                  " (maybe a copy)" if t.candidate else "")
        if not t.candidate:
            self.touched[t] = None
        return t

    def resume(self, t: Tracked, known: FileState, st) -> None:
        """Go on with a stored file where it is stored up to, if it still holds that."""
        hashes = {offset: tail_hash(t.fd, offset)
                  for offset in hash_offsets(known, (), st.st_size)}
        look = t.look(st, hashes, self.clock())
        verdict = identify(known, look)
        if verdict.kind in (UNCHANGED, GROWN):
            self.originals.follow(t)
            return
        if verdict.kind == TRUNCATED:
            what = "truncated"
        elif look.head.startswith(known.fingerprint):
            what = "truncated and written again past its stored offset"
        else:
            what = "its first bytes changed (a new file under a reused inode, or rewritten)"
        log.info("%s: %s while stopped; reading it from the start", shown(t.state.path), what)
        self.depart(known, stored_original(known))
        self.begin_again(t, st)

    def stored_state(self, st, path: bytes) -> FileState | None:
        """The state stored for this inode: by (dev, ino), or by inode and path when a
        reboot renumbered the device (LVM, some network and virtual filesystems)."""
        state = self.resumable.pop((st.st_dev, st.st_ino), None)
        if state is None:
            old = self.by_path.get((path, st.st_ino))
            state = self.resumable.pop(old, None) if old is not None else None
            if state is not None:
                log.info("%s: its device number changed (%d -> %d); resuming it by inode and "
                         "path", shown(path), state.dev, st.st_dev)
        return state

    def new_state(self, st, path: str, path_bytes: bytes | None) -> FileState:
        """The state of a file nothing is stored of, under a new id."""
        self.next_id += 1
        now = utc_now()
        return FileState(self.next_id - 1, path, path_bytes, st.st_dev, st.st_ino, offset=0,
                         fingerprint=b"", resume_hash=None, part=None, format=None,
                         first_seen=now, updated=now, gone=None)

    def begin_again(self, t: Tracked, st) -> None:
        """The inode's content is new: follow it as a new file, read from its start."""
        t.begin(self.new_state(st, t.state.path, t.state.path_bytes))
        t.builder = self.new_builder(t)
        self.touched[t] = None

    def decide(self, t: Tracked, st, now: float) -> bool:
        """Settle whether a file nothing is stored of is a copy of an original (see
        copy_of()); True once it may be read, from 0 or from where the copy's original is
        stored up to."""
        look = t.look(st, {}, now)
        originals = self.originals.agreeing(look.head, st.st_size)
        look = look._replace(hashes={offset: tail_hash(t.fd, offset)
                                     for offset in hash_offsets(None, originals, st.st_size)})
        verdict = identify(None, look, originals)
        if verdict.kind == NEW and look.quiet and self.truncated_unseen(originals):
            verdict = Verdict(UNDECIDED, 0, None)   # identify() again once that is read
        if verdict.kind == UNDECIDED:
            if t not in self.undecided:
                log.debug("%s: may be a copy; read once that is settled", shown(t.name))
            self.undecided[t] = max(now, t.last_data + COPY_QUIET_S)
            return False
        self.undecided.pop(t, None)
        t.candidate = False
        if verdict.kind == COPY:
            t.copy_of(verdict, look.head)
            t.builder = self.new_builder(t)
            log.info("%s: a copy of %s; its first %d bytes are stored already", shown(t.name),
                     shown(verdict.original.path), t.pos)
        self.touched[t] = None
        return True

    def truncated_unseen(self, originals: list) -> bool:
        """Whether a live original was truncated since it was last read (a busy tailer may
        not have seen it yet): it is read first, so that its copy is told as one."""
        found = False
        for original in originals:
            source = self.originals.live.get(original.id) if original.live else None
            if source is not None and source.fd is not None \
                    and os.fstat(source.fd).st_size < source.pos:
                self.pending[source] = None
                found = True
        return found

    def look_again(self, now: float) -> None:
        """Possible copies that may have become complete since: decide() them again."""
        for t, again in self.undecided.items():
            if now >= again:
                self.pending[t] = None

    def depart(self, state: FileState, original: Original, rows=()) -> None:
        """A stored file's content left DIRECTORY or its inode: commit it as gone with the
        last entries read of it, and remember it for a copy that may show up."""
        self.departed.append((state._replace(gone=utc_now()), rows))
        self.remember(original)

    def remember(self, original: Original) -> None:
        """Remember what a copy may be checked against; the possible copies look again."""
        self.originals.remember(original)
        for t in self.undecided:
            self.pending[t] = None

    # -- open files ------------------------------------------------------------

    def opened(self, t: Tracked, fd: int) -> None:
        if len(self.open) >= self.max_open:
            self.close_idle()   # before t joins: it is about to be read
        t.fd = fd
        self.open[t] = None

    def close(self, t: Tracked) -> None:
        if t.fd is not None:
            os.close(t.fd)
            t.fd = None
            del self.open[t]

    def close_idle(self, keep: int = None) -> None:
        """Keep at most max_open files open: close the least recently read of those with
        no state in the open transaction (a held entry is in memory, not in the file).
        They are reopened by name, and checked, when needed."""
        if keep is None:
            if len(self.open) < self.max_open:
                return
            keep = self.max_open * 3 // 4
        for t in list(self.open):
            if len(self.open) <= keep:
                break
            if t.name is not None and t not in self.touched:
                self.close(t)

    def open_path(self, path: bytes, now: float) -> int:
        """open_file(), making room when the process is out of file descriptors."""
        try:
            return open_file(path, self.options.follow_symlinks)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.max_open = max(8, min(self.max_open, len(self.open) // 2))
            self.directory.warn_once(b"", "fds", logging.WARNING, "%sout of file descriptors "
                                     "(%s): keeping at most %d log files open", exc.strerror,
                                     self.max_open)
            self.close_idle(keep=self.max_open // 2)
            self.directory.rescan_at = min(self.directory.rescan_at, now + DIR_RETRY_S)
            return open_file(path, self.options.follow_symlinks)

    def reopen(self, t: Tracked, now: float) -> bool:
        """Open a file closed as idle again, by its name, if that still leads to it."""
        name = t.name
        if name is None:
            return False
        try:
            fd = self.open_path(os.path.join(self.directory.path, name), now)
        except OSError:
            self.directory.dirty[name] = NAME_CHANGES   # gone or changed: refresh() sorts it out
            return False
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (t.state.dev, t.state.ino):
            os.close(fd)
            self.directory.dirty[name] = NAME_CHANGES
            return False
        self.opened(t, fd)
        return True

    # -- reading ---------------------------------------------------------------

    def read_pending(self, now: float, budget: int = ROUND_BYTES) -> None:
        """Read queued files, budget bytes at most, and no more files than may stay open
        until the commit; a SIGTERM ends the round between two chunks. Possible copies
        come last: their originals may have been truncated (and remembered) in the same
        round."""
        self.backlogs = None
        for t in sorted(self.pending, key=lambda t: t.candidate):
            if budget <= 0 or len(self.touched) >= self.max_open // 2 or self.cut_short():
                return
            try:
                done, used = self.read(t, budget, now)
            except OSError as exc:
                done, used = True, 0
                self.directory.warn_once(t.name or b"?", exc.errno, logging.WARNING,
                                         "%s: read failed: %s", exc.strerror)
            budget -= used
            if done:
                self.pending.pop(t, None)

    def read(self, t: Tracked, budget: int, now: float):
        """Read t from its position; returns (done for now?, bytes read)."""
        if t.fd is None and not self.reopen(t, now):
            return True, 0
        st = os.fstat(t.fd)
        self.open.move_to_end(t)
        if st.st_size != t.size:
            t.last_data, t.size = now, st.st_size
        if self.worker is not None and self.worker.file is t:
            return self.read_bulk(t, budget, now)   # checked when its run began
        if t.candidate and not self.decide(t, st, now):
            return True, 0      # it may be a copy still being written: nothing read yet
        known = t.position()
        # The bytes before the position: their hash checks the file, and the hash after
        # reading is taken from them and what is read, never from a file truncated meanwhile.
        tail = tail_bytes(t.fd, t.pos) if st.st_size > t.pos else None
        look = t.look(st, {} if tail is None else {t.pos: digest(tail)}, now)
        verdict = identify(known, look)
        if verdict.kind in (TRUNCATED, REPLACED):
            self.start_over(t, verdict.kind, st)
            tail = b""
        if len(t.head) < FINGERPRINT_BYTES:
            t.head = look.head      # the first bytes of what is read from now on
        if verdict.kind == UNCHANGED:
            return True, 0
        if self.for_worker(t, st) and (self.worker is None or self.worker.dry != (t, t.pos)):
            if not self.worker_behind(t):
                return self.read_bulk(t, budget, now)
            budget = min(budget, READ_CHUNK)
        used, tail = self.read_chunks(t, budget, st, tail, now)
        if used and tail is not None:
            t.checkpoint(tail)
        self.stats["bytes"] += used
        return used < budget, used

    def for_worker(self, t: Tracked, st) -> bool:
        """Whether t's backlog is the parse worker's to parse: it is big (or the worker
        has begun it). A big one waits its turn while the worker is busy: this core
        inserts meanwhile, which is what it is best used for (see worker_behind())."""
        if self.worker is not None and self.worker.file is t:
            return True
        return self.use_worker and self.is_backlog(t, st.st_size)

    @staticmethod
    def is_backlog(t: Tracked, size: int) -> bool:
        return (size - t.pos >= BULK_BYTES and t.builder.part is None
                and t.builder.format != "plain")

    def backlog_order(self) -> list:
        """The big backlogs waiting for the busy or free parse worker, in the order it
        takes them: the order their files were found in (their ids). While it is busy
        this core helps with the last of them, so that the last one it takes is small:
        while it parses that one alone, this core has only its rows to insert (the
        benchmark's four JSON files: the last one taken at 30 of its 47 MB, not at 7;
        2.05 against 2.09 s, median of 8). Taken once a round, from the sizes last seen:
        a file not read yet waits for the next round."""
        if self.backlogs is None:
            worker = self.worker
            self.backlogs = sorted(
                (t for t in {**self.pending, **self.turns} if t is not worker.file
                 and t.builder is not None and not t.candidate and worker.dry != (t, t.pos)
                 and self.is_backlog(t, t.size)),
                key=lambda t: t.state.id)
        return self.backlogs

    def worker_behind(self, t: Tracked) -> bool:
        """Whether the parse worker, busy with another file, has no chunk of it ready: this
        core would wait, so it parses a chunk of t meanwhile. Where parsing costs more than
        inserting (JSON lines: 4 against 3 us a line) both cores parse then."""
        worker = self.worker
        if worker is None or worker.free() or worker.file is t:
            return False
        order = self.backlog_order()
        if order and t is not order[-1]:
            return False    # the worker's to take: this core helps with the last one
        worker.receive()
        if worker.chunks:
            self.pending[worker.file] = None    # what came is taken in the next round
            return False
        if worker.helped is not t:
            worker.helped = t
            busy = worker.file
            log.debug("%s: parsing here too, while the parse worker parses %s",
                      shown(t.name or t.state.path), shown(busy.name or busy.state.path))
        return True

    def read_chunks(self, t: Tracked, budget: int, st, tail, now: float):
        """Read and parse t in-process up to budget bytes; returns (bytes read, the bytes
        before the new position as far as known)."""
        used = 0
        window = max(READ_CHUNK, self.parse_options.max_entry_bytes)
        while used < budget and t.pos < st.st_size and not self.cut_short():
            data, end, rest = read_lines(t.fd, t.pos, window)
            if data:
                self.add_batch(t, t.builder.feed_batch(data, t.pos, st.st_mtime))
            elif len(rest) >= self.parse_options.max_entry_bytes:
                data = self.read_piece(t, rest)
                end = t.pos + len(data)
            else:
                break       # a partial last line: it waits for its newline
            if tail is not None:
                tail = (tail + data[-RESUME_CHECK_BYTES:])[-RESUME_CHECK_BYTES:]
            used += end - t.pos
            t.pos = end
            t.last_data = now
            self.touched[t] = None
        return used, tail

    def read_piece(self, t: Tracked, rest: bytes) -> bytes:
        """Store the next piece of a line longer than --max-entry-bytes; returns it."""
        if t.builder.part is None:
            log.warning("%s: a line at offset %d is longer than %d bytes; stored in pieces",
                        shown(t.name or t.state.path), t.pos, self.parse_options.max_entry_bytes)
        piece = rest[:utf8_boundary(rest, self.parse_options.max_entry_bytes)]
        self.add_rows(t, t.builder.feed_piece(piece, t.pos))
        return piece

    def read_bulk(self, t: Tracked, budget: int, now: float):
        """Take up to budget bytes of a big backlog from the parse worker; it parses on
        while this process inserts. Returns (done for now?, bytes taken): done while its
        chunks have not come (the worker's socket wakes the loop then)."""
        if self.worker is None:
            try:
                self.worker = ParseWorker(self.parse_options, self.store.rows)
            except OSError as exc:
                log.warning("cannot start the parse worker (%s); parsing in-process", exc)
                self.use_worker = False
                return False, 0
        if not self.worker.free() and self.worker.file is not t:
            self.turns[t] = None    # pending again when the worker is free
            return True, 0
        if self.worker.free() and t in self.backlog_order()[1:]:
            self.turns[t] = None    # the first is the worker's next
            return True, 0
        start = t.pos
        used = self.worker.take(t, budget, self.add_batch)
        if used:
            t.last_data = now
            self.touched[t] = None
            tail = tail_bytes(t.fd, t.pos)
            if tail is not None:
                t.checkpoint(tail)
        self.stats["bytes"] += t.pos - start
        if self.worker.file is not t:
            return False, used      # its run is over: read on in the next round
        return not self.worker.chunks, used

    def start_over(self, t: Tracked, verdict: str, st) -> None:
        """What was stored of a followed file left its inode (copytruncate, or truncated and
        rewritten): store the entry its builder holds, remember it for its copy, and read
        what the inode holds now as a new file."""
        if self.worker is not None:
            self.worker.abandon(t)
        log.info("%s: %s; reading it again from the start", shown(t.name or t.state.path),
                 "truncated" if verdict == TRUNCATED else "rewritten")
        rows = t.builder.flush()
        self.holders.discard(t)
        self.touched.pop(t, None)
        self.depart(t.read_state(), t.original(live=False), rows)
        self.begin_again(t, st)

    def new_builder(self, t: Tracked) -> EntryBuilder:
        self.holders.discard(t)
        return EntryBuilder(t.id, self.parse_options, self.stamps, self.store.rows,
                            t.state.format, t.state.part)

    def add_rows(self, t: Tracked, rows: list) -> None:
        self.add_batch(t, self.store.rows.batch(rows))

    def add_batch(self, t: Tracked, batch: tuple) -> None:
        if batch[0]:
            self.touched[t] = None      # first: when add() fails, rewind() takes t back too
            self.store.add_batch(batch)
            self.added += batch[0]
        if t.builder.held is not None:
            self.holders.add(t)
        else:
            self.holders.discard(t)

    def flush_quiet(self, now: float) -> None:
        """A held entry whose file has been quiet for HOLD_S is complete."""
        for t in list(self.holders):
            if now - t.last_data >= HOLD_S and (self.worker is None or self.worker.file is not t):
                self.add_rows(t, t.builder.flush())

    def check_detached(self, now: float) -> None:
        """Renamed-away and deleted files get no events: poll them until quiet, then close."""
        for t in list(self.detached):
            if t.name is not None:
                del self.detached[t]
            elif now - t.last_data < ROTATE_WAIT_S or t in self.holders:
                self.pending[t] = None
            elif (t not in self.pending and t not in self.touched
                  and (t.pos >= t.size or t.candidate)):
                del self.detached[t]
                self.forget(t)

    def forget(self, t: Tracked) -> None:
        """Stop following a file that left DIRECTORY, once all of it is read (a possible
        copy that never settled was all in its original)."""
        deleted = t.fd is not None and os.fstat(t.fd).st_nlink == 0
        self.close(t)
        del self.tracked[(t.state.dev, t.state.ino)]
        self.touched.pop(t, None)
        self.undecided.pop(t, None)
        self.turns.pop(t, None)
        self.originals.unfollow(t.id)
        if t.candidate:
            return
        if deleted:
            self.depart(t.state, t.original(live=False))
        else:
            # Moved out of DIRECTORY: if it comes back, it resumes where it was.
            self.resumable[(t.state.dev, t.state.ino)] = t.state
            self.remember(t.original(live=False))

    # -- the directory ---------------------------------------------------------

    def lose_directory(self, now: float) -> None:
        """DIRECTORY was deleted or moved away: read what is open, look for it again."""
        if not self.directory.missing:
            self.directory.lose(now)
            for name in list(self.names):
                self.lose_name(name, now)
            self.scan_left = None

    # -- storing ---------------------------------------------------------------

    def states(self, now: str) -> list:
        """The files' states to store with the open transaction's entries: those touched,
        and those gone with the last entries read of them (added now, so that they are
        stored again after a rollback)."""
        for _, rows in self.departed:
            if rows:
                self.store.add(rows)
                self.added += len(rows)
        return ([t.committed_state(now) for t in self.touched]
                + [state for state, _ in self.departed])

    def committed(self, states: list) -> None:
        """The transaction is stored: the files' states are what it stored."""
        self.stats["entries"] += self.added
        if self.added or states:
            log.debug("stored %d entries and the states of %d files", self.added, len(states))
        for t, state in zip(self.touched, states):
            t.state = state
            self.originals.follow(t)
        self.added = 0
        self.touched = {}
        self.departed = []

    def rewind(self) -> None:
        """The open transaction was rolled back: every file read in it goes back to its
        offset (the files gone, with the last entries read of them, are stored next time)."""
        if self.worker is not None and self.worker.file is not None:
            self.worker.abandon(self.worker.file)
        self.added = 0
        for t in self.touched:      # stays touched: new files still need their row
            t.pos = t.state.offset
            t.builder = self.new_builder(t)
            self.pending[t] = None

    def reload(self) -> None:
        """The store connected again after losing its connection, maybe in a COMMIT that
        was stored after all: what it holds decides, never a guess. A file stored further
        than its committed state goes on from there; a departed file stored as gone is
        not stored again."""
        ids = [t.id for t in self.tracked.values()] + [state.id for state, _ in self.departed]
        held = self.store.file_states(ids)
        for t in self.tracked.values():
            state = held.get(t.id)
            if state is None or (state.offset, state.part) == (t.state.offset, t.state.part):
                continue    # not stored yet, or as committed: rewind() put it there
            log.debug("%s: stored up to %d after all", shown(t.name or state.path),
                      state.offset)
            t.state, t.pos = state, state.offset
            t.checkpoints = [cp for cp in t.checkpoints if cp[0] < state.offset]
            if state.resume_hash is not None:
                t.checkpoints.append((state.offset, state.resume_hash))
            t.builder = self.new_builder(t)
            self.touched.pop(t, None)
            self.pending[t] = None
            self.originals.follow(t)
        self.departed = [(state, rows) for state, rows in self.departed
                         if state.id not in held or held[state.id].gone is None]

    def lose_worker(self, exc: WorkerLost) -> None:
        log.warning("%s; parsing in-process from now on", exc)
        if self.worker.file is not None:
            self.pending[self.worker.file] = None   # read on from what was taken of it
        self.worker.close()
        self.worker, self.use_worker = None, False
        self.pending.update(self.turns)
        self.turns.clear()

    def summary(self) -> str:
        return (f"{len(self.tracked)} files, {self.stats['entries']:,} entries, "
                f"{human_bytes(self.stats['bytes'])} in {self.clock() - self.started:.1f} s")


# --stats ######################################################################

# A read-only look at a database, for people and for monitoring checks.

SPARKS = " ▁▂▃▄▅▆▇█"


def sparkline(counts: list) -> str:
    top = max(counts) or 1
    return "".join(SPARKS[0] if n == 0 else SPARKS[max(1, round(n / top * 8))] for n in counts)


def file_lags(stats: Stats) -> list:
    """(path, size or None when missing, offset, lag) of each file followed."""
    lags = []
    for name, name_bytes, offset, gone in stats.files:
        if gone is None:
            try:
                size = os.stat(name_bytes if name_bytes is not None else name).st_size
            except OSError:
                size = None
            lags.append((name, size, offset, max(0, size - offset) if size is not None else 0))
    return lags


def stats_text(stats: Stats, lags: list) -> str:
    """What --stats prints: the files with their lag, then the entries."""
    lines = [f"{'file':<50} {'size':>10} {'offset':>10} {'lag':>10}"]
    for name, size, offset, lag in lags:
        shown_size = human_bytes(size) if size is not None else "missing"
        lines.append(f"{shown(name):<50} {shown_size:>10} {human_bytes(offset):>10} "
                     f"{human_bytes(lag):>10}")
    gone = len(stats.files) - len(lags)
    lines.append(f"{f'total: {len(lags)} files ({gone} gone)':<50} "
                 f"{human_bytes(sum(size or 0 for _, size, _, _ in lags)):>10} "
                 f"{human_bytes(sum(lag[2] for lag in lags)):>10} "
                 f"{human_bytes(sum(lag[3] for lag in lags)):>10}")
    entries = sum(n for _, n in stats.levels)
    newest = f"{stats.newest} UTC" if stats.newest else "no entry has a time"
    lines += ["", f"entries: {entries:,}; newest: {newest}",
              "by level: " + (", ".join(f"{level or 'no level'} {n:,}" for level, n in
                                        stats.levels) or "no entries"), ""]
    per_level = collections.defaultdict(lambda: [0] * 24)
    for level, hour, n in stats.hourly:
        if 0 <= hour < 24:
            per_level[level or "no level"][hour] += n
    lines.append(f"last 24 h, entries per hour (oldest left, since {stats.since} UTC):")
    for level, counts in sorted(per_level.items(), key=lambda item: -sum(item[1])):
        lines.append(f"  {level:<10} {sparkline(counts)} {sum(counts):,}")
    if not per_level:
        lines.append("  (no entries with a time)")
    if stats.hosts is not None:
        lines += ["", f"{'host':<30} {'entries':>12} {'newest entry (UTC)':>20} "
                      f"{'last commit (UTC)':>20}"]
        for name, count, newest, last in stats.hosts:
            lines.append(f"{shown(name):<30} {count:>12,} {newest or '-':>20} {last or '-':>20}")
    return "\n".join(lines) + "\n"


def show_stats(path: str, max_lag, out=sys.stdout, host_name: str = None) -> int:
    """Print what DATABASE holds (of a fleet's server: host_name's files, and every host);
    3 when a file lags by more than max_lag bytes, else 0. A reader that stops reading
    (--stats | head) changes neither."""
    if is_pg_url(path):
        stats = read_pg_stats(path, host_name or socket.gethostname(), time.time())
    else:
        stats = read_sqlite_stats(path, time.time())
    lags = file_lags(stats)
    try:
        out.write(stats_text(stats, lags))
        out.flush()
    except BrokenPipeError:
        # Nothing more can reach the reader, and the interpreter's own last flush would
        # fail too: what is left goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    lagging = [(name, lag) for name, _, _, lag in lags if max_lag is not None and lag > max_lag]
    if lagging:
        log.warning("%s by more than --max-lag %d bytes: %s",
                    "1 file lags" if len(lagging) == 1 else f"{len(lagging)} files lag", max_lag,
                    ", ".join(f"{shown(name)} ({lag:,} bytes)" for name, lag in lagging))
        return 3
    return 0


# CLI and main #################################################################

USAGE = """\
logtail2db.py [options] DIRECTORY DATABASE
       logtail2db.py --stats [--max-lag BYTES] DATABASE"""

DESCRIPTION = """\
Tail the log files of DIRECTORY into the SQLite DATABASE, exactly once.

Each complete line is parsed into an entry (syslog, JSON lines, web access logs,
application logs, multi-line stack traces, plain text) and committed together
with its file's new offset in one transaction: restarts, kill -9, log rotation
(rename or copytruncate) and files changed while stopped lose nothing and
duplicate nothing. Query DATABASE with sqlite3 while it runs, e.g. the logs view:
  SELECT ts, level, path, message FROM logs WHERE level = 'error' LIMIT 20
DATABASE may be a PostgreSQL URL that many hosts share (each its own --host-name):
  postgresql://logtail@db.example.com/logs, postgresql:///logs?host=/var/run/postgresql"""

EPILOG = """\
exit status:
  0  done (--once), or stopped by SIGTERM/SIGINT with every complete line stored
  1  fatal error, one line "logtail2db: error: ..." on stderr
  2  usage error
  3  --stats: a file lags by more than --max-lag bytes
  4  stopped by SIGTERM/SIGINT while DATABASE could not be written (full, locked,
     a PostgreSQL server unreachable):
     what was not stored is read again on the next start

examples:
  logtail2db.py /var/log/app /var/lib/logtail2db/app.db
      follow the directory until SIGTERM/SIGINT
  logtail2db.py --once --include '*.log' /var/log/app app.db
      catch up with the .log files, then exit (cron, scripts)
  logtail2db.py --fts --keep 30d /var/log/app app.db
      with a full-text index, keeping 30 days of entries
  logtail2db.py --stats --max-lag 1000000 app.db
      how far each file is read; exit 3 when one lags by more than 1 MB
  sqlite3 app.db "SELECT ts, level, path, message FROM logs ORDER BY id DESC LIMIT 20"
  logtail2db.py /var/log/app postgresql://logtail@db.example.com/logs
      one host of a fleet into a shared server (password in ~/.pgpass)
"""


def compiled_regex(text: str):
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a valid regular expression: {exc}")


def pattern_parser(text: str):
    try:
        return make_pattern_parser(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhdw])", text.strip())
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration like 30d, 12h, 90m: {text!r}")
    return float(match[1]) * DURATION_UNITS[match[2]]


def default_max_open() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_FILES
    return max(8, min(MAX_OPEN_FILES, soft // 4))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def file_mode(text: str) -> int:
    """--db-mode: octal permissions such as 0600 or 640, nobody but owner and group."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not octal permissions like 0600: {text!r}") from None
    if mode & ~0o660 or not mode & 0o600 == 0o600:
        raise argparse.ArgumentTypeError(f"{text}: the owner reads and writes (0600), the "
                                         "group may (0660 at most); others never")
    return mode


def version_text() -> str:
    return (f"logtail2db {__version__} (inotify binding: {binding_name()}, "
            f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]})")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's and epilog's lines; show every option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and "(default:" not in text
                and action.default not in (None, False, [], 0)
                and action.option_strings and action.nargs != 0
                and action.default != list(DEFAULT_EXCLUDES)):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logtail2db.py", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="DIRECTORY DATABASE",
                        help="the directory of log files and the SQLite database (created when "
                             "missing); with --stats only DATABASE")
    running = parser.add_argument_group("running")
    running.add_argument("--once", action="store_true",
                     help="catch up with every file, then exit with a summary line")
    running.add_argument("--from-end", action="store_true",
                     help="a file found at start-up that the database has never seen starts at "
                          "its end (files created later are read from their start)")
    running.add_argument("--poll", type=positive_float, metavar="SECONDS",
                     help="scan by stat() every SECONDS instead of using inotify (NFS and other "
                          "filesystems without events; chosen by itself when inotify fails)")
    running.add_argument("--cores", type=int, choices=(1, 2), default=2,
                     help="cores a catch-up may use: with 2, a helper process parses a big "
                          "backlog while the tailer inserts")
    running.add_argument("--rescan", type=positive_float, default=RECONCILE_S, metavar="SECONDS",
                     help="with inotify, rescan DIRECTORY this often anyway, a backstop for "
                          "changes that give no event")
    files = parser.add_argument_group("files")
    files.add_argument("--include", action="append", default=[], metavar="GLOB",
                       help="read only file names matching GLOB (repeatable; default: all)")
    files.add_argument("--exclude", action="append", default=list(DEFAULT_EXCLUDES),
                       metavar="GLOB",
                       help="skip file names matching GLOB (repeatable); compressed rotations "
                            "are always skipped: " + " ".join(DEFAULT_EXCLUDES))
    files.add_argument("--follow-symlinks", action="store_true",
                       help="read the files that symlinks in DIRECTORY point to (a symlink can "
                            "point anywhere the tailer may read, so this is off by default)")
    files.add_argument("--max-open-files", type=positive_int, default=default_max_open(),
                       metavar="N", help="keep at most N log files open; idle ones are closed "
                                         "and reopened by name, checked, when written")
    entries = parser.add_argument_group("entries")
    entries.add_argument("--format", default="auto", choices=FORMATS,
                         help="how lines are parsed: auto decides per file from its first lines; "
                              "syslog (RFC 3164 and 5424, journalctl's short formats), journald "
                              "(journalctl -o json), json (JSON lines), docker (Docker's "
                              "json-file), cri (Kubernetes' /var/log/containers), logfmt, clf "
                              "(web access logs), app ('timestamp LEVEL message' of application "
                              "loggers), java (logback's and log4j2's default layouts), plain")
    entries.add_argument("--pattern", metavar="REGEX", type=pattern_parser,
                         help="parse lines with a Python regex instead: named groups ts, host, "
                              "program, pid, level, message fill those columns, any other goes "
                              "into fields")
    entries.add_argument("--multiline-start", metavar="REGEX", type=compiled_regex,
                         help="a line matching REGEX begins an entry, any other continues the "
                              "one before (default: in syslog and app files, a line without a "
                              "timestamp continues the entry before it)")
    entries.add_argument("--max-entry-bytes", type=positive_int, default=MAX_ENTRY_BYTES,
                         metavar="N", help="a longer entry is stored as consecutive pieces "
                                           "(part 1, 2, ...), never dropped")
    entries.add_argument("--max-entry-lines", type=positive_int, default=MAX_ENTRY_LINES,
                         metavar="N", help="a multi-line entry longer than N lines goes on as "
                                           "a new entry")
    database = parser.add_argument_group("database")
    database.add_argument("--host-name", default=socket.gethostname(), metavar="NAME",
                          help="which host this tailer is, in a postgresql:// DATABASE that "
                               "hosts share (one tailer per name at a time)")
    database.add_argument("--db-mode", type=file_mode, default=0o600, metavar="MODE",
                          help="permissions of a DATABASE it creates, and of its -wal and "
                               "-shm files: 0600 (only its owner), or 0640 for a group that "
                               "may read the logs too (default: 0600)")
    database.add_argument("--fts", action="store_true",
                          help="keep a full-text index (SQLite FTS5) of the messages: "
                               "SELECT * FROM logs WHERE id IN (SELECT rowid FROM entries_fts "
                               "WHERE entries_fts MATCH 'timeout'); in PostgreSQL a pg_trgm "
                               "index for LIKE and ILIKE on logs.message")
    database.add_argument("--keep", type=duration, metavar="DURATION",
                          help="delete entries older than DURATION (30d, 12h, 90m, 2w), a few "
                               "at a time; offsets stay, so nothing is read again (PostgreSQL: "
                               "drops whole days, by when entries were stored)")
    database.add_argument("--stats", action="store_true",
                          help="show per file its size, offset and lag, entries per level and "
                               "per hour of the last day; reads DATABASE only, never writes")
    database.add_argument("--max-lag", type=positive_int, metavar="BYTES",
                          help="with --stats: exit 3 when a file lags by more than BYTES")
    output = parser.add_argument_group("diagnostics (on stderr)")
    output.add_argument("-v", "--verbose", action="count", default=0,
                        help="more diagnostics: what happens to each file and commit")
    output.add_argument("-q", "--quiet", action="count", default=0,
                        help="fewer: warnings and errors only (-q), errors only (-qq)")
    output.add_argument("--version", action="version", version=version_text())
    return parser


def parse_args(argv=None):
    """The options, with DIRECTORY and DATABASE checked against --stats."""
    parser = build_parser()
    args = parser.parse_args(argv)
    expected = 1 if args.stats else 2
    if len(args.paths) > expected:
        parser.error(f"unexpected argument {args.paths[expected]!r}"
                     + (" (--stats takes DATABASE only)" if args.stats else ""))
    if len(args.paths) < expected:
        parser.error("--stats needs DATABASE" if args.stats else
                     "DIRECTORY and DATABASE are required")
    if args.max_lag is not None and not args.stats:
        parser.error("--max-lag goes with --stats")
    if args.stats and args.once:
        parser.error("--stats only reads DATABASE: it goes without --once")
    args.directory, args.database = ([None] + args.paths)[-2:]
    return args


class _Formatter(logging.Formatter):
    """'logtail2db: warning: ...', with the time in front unless a terminal or the
    journal (which stamps lines itself) reads stderr."""

    def __init__(self, stamped: bool):
        super().__init__()
        self.stamped = stamped

    def format(self, record):
        text = f"logtail2db: {record.levelname.lower()}: {record.getMessage()}"
        if self.stamped:
            text = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(record.created)) + text
        return text


def setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    stamped = not (sys.stderr.isatty() or os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(_Formatter(stamped))
    log.handlers[:] = [handler]
    log.setLevel({-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        max(verbosity, -2), logging.DEBUG))
    log.propagate = False


def open_waiting(args) -> Store | None:
    """open_store(); a PostgreSQL server that cannot be reached is waited for with the
    loop's back-off, SIGTERM/SIGINT ending the wait (None). The caller blocks them."""
    backoff = Backoff()
    while True:
        try:
            store = open_store(args.database, args.db_mode, args.host_name)
        except PgLost as exc:
            backoff.failed(exc, time.monotonic())
        else:
            backoff.worked()
            return store
        if signal.sigtimedwait(STOP_SIGNALS, max(0.0, backoff.at - time.monotonic())):
            return None


def run(args) -> int:
    if args.stats:
        return show_stats(args.database, args.max_lag, host_name=args.host_name)
    if is_pg_url(args.database):
        # Until the handlers are in place a SIGTERM waits, blocked: while the server is
        # waited for it ends the wait; once connected, the loop sees it at once.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return run_tailer(args)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return run_tailer(args)


def run_tailer(args) -> int:
    if args.db_mode & 0o060 and not is_pg_url(args.database):
        log.info("--db-mode %04o: the group of %s may read it, as it may read the logs in it",
                 args.db_mode, args.database)
    directory = os.path.abspath(os.fsencode(args.directory))
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise Fatal(f"{args.directory!r} is not a directory")
    except OSError as exc:
        raise Fatal(f"directory {args.directory!r}: {exc.strerror}")
    # A chunk's rows are many objects, freed without cycles; at the default thresholds
    # every 700 of them made the cyclic collector look at all that were alive: 20-25% of
    # the parse worker's time (measured). The worker forks with the same thresholds.
    gc.set_threshold(*GC_THRESHOLDS)
    store = open_waiting(args)
    if store is None:
        log.warning("stopped while %s could not be reached; nothing is stored, all is read "
                    "on the next start", pg_url_parts(args.database)[0])
        return EXIT_UNSTORED
    try:
        if args.fts:
            store.enable_fts()
        tailer = Tailer(directory, store, args)
        tailer.directory.skip_own_files(args.database)
        tailer.load()
        tailer.install_signals()
        if isinstance(store, PgStore):
            store.watch.chain_handlers()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        tailer.run()
        log.info("%s: %s", "done" if args.once else "stopped", tailer.summary())
    except store.errors as exc:
        if isinstance(exc, sqlite3.Error):
            raise   # main() says "database: ..."
        raise Fatal(store.explain(exc)) from None
    finally:
        store.close()
    return EXIT_UNSTORED if tailer.backoff.at is not None else 0


def main(argv=None) -> int:
    args = parse_args(argv)         # usage errors: argparse exits 2
    setup_logging(args.verbose - args.quiet)
    try:
        return run(args)
    except Fatal as exc:
        message = str(exc)
    except sqlite3.Error as exc:
        message = f"database: {exc}"
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    sys.stderr.write(f"logtail2db: error: {message}\n")
    return 1


if __name__ == "__main__":
    unlock_sqlite()
    steady_malloc()
    sys.exit(main())
