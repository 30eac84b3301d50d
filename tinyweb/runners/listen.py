"""Bind, check and hand over the listening socket of a FastCGI server.

What flup gets wrong here (fcgi_base.py:1042-1072): it unlinks whatever sits at a unix
socket path before binding (stealing a live server's socket, or deleting a regular file),
and leaves the socket file behind at exit. This module tells a stale socket from a live
one, applies the group and mode a web server needs, and keeps the socket across a SIGHUP
re-exec.
"""

import errno
import grp
import os
import socket
import stat
import struct
import sys

from tinyweb.runners.prefork import log

__all__ = ["Listener", "BindError", "listen", "reexec"]

# Set by a server that re-executes itself on SIGHUP: "pid:fd:pid,pid" (see reexec).
_INHERIT_ENV = "TINYWEB_FCGI_INHERIT"


class BindError(Exception):
    """The listening socket cannot be set up; the message says what to do."""


class Listener:
    """A listening socket, and the unix socket file to remove when the server that made it exits."""

    def __init__(self, sock, path=None):
        self.sock = sock
        self.path = path
        self._identity = _identity(path) if path is not None else None
        self._pid = os.getpid()

    def close(self):
        """Close the socket; remove the file if it is still ours and this is our process."""
        self.sock.close()
        # flup 1.0.3 leaves the socket file behind (fcgi_base.py:1070), and its prefork children
        # unwind through the caller's stack: only the process that bound the path removes it,
        # and only while the path is still the socket it bound.
        if self.path is None or os.getpid() != self._pid:
            return
        if self._identity is not None and _identity(self.path) == self._identity:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _identity(path):
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def listen(options):
    """Return (Listener, pids of retiring workers): the socket inherited across a reload, or a new one."""
    inherited = _inherited(options)
    if inherited is not None:
        return inherited
    if isinstance(options.bind, str):
        listener = _bind_unix(options.bind, options)
    else:
        if options.socket_mode is not None or options.socket_group:
            log("--socket-mode and --socket-group apply to a unix socket; ignored for TCP")
        listener = Listener(_bind_tcp(options.bind))
    listener.sock.setblocking(False)
    return listener, []


def _inherited(options):
    value = os.environ.pop(_INHERIT_ENV, "")
    try:
        pid, fd, pids = value.split(":")
        pid, fd = int(pid), int(fd)
        retiring = [int(p) for p in pids.split(",") if p]
    except ValueError:
        return None
    # The pid check makes the variable worthless to any other process that inherits it.
    if pid != os.getpid():
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        sock.detach()
        return None
    sock.set_inheritable(False)
    sock.setblocking(False)
    path = options.bind if isinstance(options.bind, str) else None
    return Listener(sock, path), retiring


def _bind_unix(path, options):
    gid = _group_id(options.socket_group) if options.socket_group else None
    _clear_unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_failure("socket %s" % path, exc, path)) from None
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        mode = options.socket_mode
        if mode is None and gid is not None:
            mode = 0o660  # PHP-FPM's listen.mode default: the group only helps if it may write
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        os.unlink(path)
        raise BindError("cannot set up socket %s: %s" % (path, exc.strerror or exc)) from None
    return Listener(sock, path)


def _clear_unix_path(path):
    """Remove a stale socket file at ``path``; refuse a live socket or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError("cannot use socket %s: %s" % (path, exc.strerror)) from None
    # flup 1.0.3 unlinks whatever is there (fcgi_base.py:1048): a running server's socket, or a file.
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(
            "%s exists and is not a socket; remove it or choose another --bind" % path
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # no one listens: a stale file left by a server that died
    except FileNotFoundError:
        return
    except PermissionError:
        raise BindError(
            "socket %s exists and this user may not connect to it, so it may belong to a "
            "running server; stop that server or remove the file, or choose another --bind" % path
        ) from None
    except OSError:  # a full backlog (EAGAIN) or a timeout: someone is listening
        raise BindError(_held_message(path, None)) from None
    else:
        raise BindError(_held_message(path, _peer_pid(probe)))
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BindError("cannot remove stale socket %s: %s" % (path, exc.strerror)) from None


def _held_message(path, pid):
    who = "a running server (pid %d)" % pid if pid else "a running server"
    return "socket %s is held by %s; stop it or choose another --bind" % (path, who)


def _peer_pid(sock):
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    except (AttributeError, OSError):
        return None


def _group_id(group):
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise BindError("unknown group %r (--socket-group); name an existing group" % group) from None


def _bind_tcp(address):
    family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shown = "[%s]:%d" % address[:2] if family == socket.AF_INET6 else "%s:%d" % address
    try:
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_failure("address " + shown, exc, None)) from None
    return sock


def _bind_failure(what, exc, path):
    if exc.errno == errno.EADDRINUSE:
        return "%s is in use by another server; stop it or choose another --bind" % what
    if path is not None and exc.errno == errno.ENOENT:
        return "cannot create %s: directory %s does not exist" % (
            what, os.path.dirname(os.path.abspath(path)))
    if path is not None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "cannot create %s: directory %s is not writable by this user" % (
            what, os.path.dirname(os.path.abspath(path)))
    return "cannot listen on %s: %s" % (what, exc.strerror or exc)


def reexec(listener, retiring):
    """Run this program again in this process, keeping the listening socket (SIGHUP reload)."""
    fd = listener.sock.fileno()
    os.set_inheritable(fd, True)
    os.environ[_INHERIT_ENV] = "%d:%d:%s" % (os.getpid(), fd, ",".join(map(str, retiring)))
    # sys.orig_argv (3.10+) keeps interpreter flags such as -X or -m.
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        del os.environ[_INHERIT_ENV]
        os.set_inheritable(fd, False)
        log("cannot re-execute %s (%s); restarting the workers without reloading" % (argv, exc))
