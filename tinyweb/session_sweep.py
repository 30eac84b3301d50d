"""Sweep Beaker's file store of sessions unused for their lifetime: PHP's session GC, bounded.

Beaker's file store never deletes a session or lock file (container.py has no sweeper):
every client that gets a session leaves two files forever. tinyweb.sessions calls sweep()
on one save in CLEANUP_EVERY; it scans a bounded run of the 256 two-level buckets Beaker
spreads files over (util.encoded_path, util.py:219-245), from a random one, and removes
files of ours older than the lifetime. It never follows a symlink (lstat, O_NOFOLLOW) and
never touches a name it did not make; a file whose lock another request holds is skipped.
"""

import fcntl
import hashlib
import os
import re
import time

__all__ = ["sweep"]

# One sweep stops after this many directory entries or this many seconds, whichever first.
CLEANUP_MAX_ENTRIES = 1000
CLEANUP_MAX_SECONDS = 0.05
# A "<id>.cache.temp" this old was left by a writer that died between write and rename.
STALE_TEMP = 3600

# The only names the sweep removes: Beaker's session files container_file/a/ab/<id>.cache
# (digest_filenames=False, session.py:414) with their ".temp" (util.py:444), and its lock
# files container_file_lock/x/xy/<sha1 of id>.lock (synchronization.py:223).
_STORE_FILE = re.compile(r"^([0-9a-f]{32})\.cache(\.temp)?$")
_LOCK_FILE = re.compile(r"^[0-9a-f]{40}\.lock$")


def sweep(session, lifetime):
    """Remove a bounded batch of session files unused for ``lifetime`` seconds, their lock
    files, and stale temp files, from ``session``'s store."""
    args = session.namespace_args
    if "file_dir" in args or "lock_dir" in args:
        return  # a layout chosen in [session], maybe shared: not tinyweb's to sweep
    limits = {None: lifetime, ".temp": min(STALE_TEMP, lifetime)}
    now = time.time()
    deadline = time.monotonic() + CLEANUP_MAX_SECONDS
    budget = CLEANUP_MAX_ENTRIES
    # The two roots as configured (a data dir may sit behind a symlink); below them, every
    # directory is opened with O_NOFOLLOW and every name used relative to it.
    files = os.open(os.path.join(session.data_dir, "container_file"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        locks = os.open(os.path.join(session.data_dir, "container_file_lock"), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        os.close(files)
        raise
    try:
        start = os.urandom(1)[0]
        for step in range(256):
            prefix = "%02x" % ((start + step) % 256)
            for top, sweep_one in ((files, _sweep_store_file), (locks, _sweep_lock_file)):
                budget -= 1
                try:
                    bucket = _open_bucket(top, prefix)
                except OSError:
                    continue  # no such bucket yet, or a symlink: not followed
                try:
                    with os.scandir(bucket) as entries:
                        for entry in entries:
                            budget -= 1
                            if budget < 0 or time.monotonic() > deadline:
                                return
                            try:
                                sweep_one(entry, bucket, now, limits, locks)
                            except OSError:
                                pass  # gone meanwhile, in use, or not ours: left for next time
                finally:
                    os.close(bucket)
            if budget < 0 or time.monotonic() > deadline:
                return
    finally:
        os.close(files)
        os.close(locks)


def _open_bucket(top, prefix):
    """Return an fd of the bucket ``prefix[0]/prefix`` below the directory ``top``."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    first = os.open(prefix[0], flags, dir_fd=top)
    try:
        return os.open(prefix, flags, dir_fd=first)
    finally:
        os.close(first)


def _expired(entry, limit, now):
    return entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > limit


def _sweep_store_file(entry, bucket, now, limits, locks):
    match = _STORE_FILE.match(entry.name)
    if not match or not _expired(entry, limits[match.group(2)], now):
        return
    digest = hashlib.sha1(match.group(1).encode("ascii")).hexdigest()  # synchronization.py:223
    lock_name = digest + ".lock"
    try:
        lock_bucket = _open_bucket(locks, digest[:2])
    except FileNotFoundError:
        lock_bucket = None  # never locked since its lock file was swept: nobody holds it
    try:
        # BlockingIOError if a request is reading or writing this session right now.
        fd = None if lock_bucket is None else _lock_now(lock_name, lock_bucket)
        try:
            # Checked again under the lock: a save may have renamed a fresh file in meanwhile.
            info = os.stat(entry.name, dir_fd=bucket, follow_symlinks=False)
            if now - info.st_mtime > limits[match.group(2)] and info.st_ino == entry.inode():
                os.unlink(entry.name, dir_fd=bucket)
                if match.group(2) is None and fd is not None:
                    os.unlink(lock_name, dir_fd=lock_bucket)
        finally:
            if fd is not None:
                os.close(fd)
    finally:
        if lock_bucket is not None:
            os.close(lock_bucket)


def _sweep_lock_file(entry, bucket, now, limits, locks):
    # A lock file is re-stamped by every save and by _keep_alive, so an old one belongs to a
    # session unused for its lifetime, or to one that is gone (a logout, a read of a removed
    # session: Beaker creates the lock file even to read, synchronization.py:242).
    if not _LOCK_FILE.match(entry.name) or not _expired(entry, limits[None], now):
        return
    fd = _lock_now(entry.name, bucket)
    if fd is None:
        return
    try:
        if os.fstat(fd).st_ino == os.stat(entry.name, dir_fd=bucket, follow_symlinks=False).st_ino:
            os.unlink(entry.name, dir_fd=bucket)
    finally:
        os.close(fd)


def _lock_now(name, dir_fd):
    """Return an fd holding the exclusive flock of ``name`` in ``dir_fd``, or None if it is absent.

    Raises BlockingIOError when another process or thread holds the lock.
    """
    try:
        # O_NONBLOCK: a FIFO put in a lock file's place must not hang the sweep.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd
