"""Fork a grandchild that outlives a CGI request without holding the web server's pipes."""

import os
import sys

__all__ = ["detach", "error_log_fd"]


def error_log_fd():
    """Return a new fd for a detached process's stderr: our fd 2 if it is a file, else /dev/null.

    mod_cgid (and mod_fcgid) make fd 2 the error log file itself; mod_cgi makes it a pipe
    that Apache reads to EOF, which a detached process must not hold (notes/servers.md §2).
    """
    import stat

    try:
        if stat.S_ISREG(os.fstat(2).st_mode):
            return os.dup(2)
    except OSError:
        pass
    return os.open(os.devnull, os.O_WRONLY)


def detach(log_fd, what):
    """Fork a grandchild in its own session; return True in it and False here, at once.

    The web server reads the response until every holder of our stdout (and, under mod_cgi,
    stderr) has closed it: a child that merely inherits them keeps the browser waiting
    until it ends. So: flush, fork, setsid, fork again, and in the grandchild point fds 0
    and 1 at /dev/null and fd 2 at ``log_fd`` (dup2, which closes the inherited ones;
    closing sys.stdout alone would leave fd 1 open). ``log_fd`` is closed in both. The
    grandchild must leave with os._exit: it is not the request process.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(log_fd)
        os.waitpid(pid, 0)  # the middle child exits at once
        return False
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        sys.stdout = sys.stderr
        return True
    except BaseException:
        # Say why (the second fork fails with EAGAIN at the process limit) on fd 2, still
        # the error log here, rather than vanish through os._exit.
        import traceback

        os.write(2, ("tinyweb: %s not started\n%s" % (what, traceback.format_exc())).encode("utf-8", "replace"))
        os._exit(0)
