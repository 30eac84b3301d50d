"""Serve a WSGI app over FastCGI: choose the socket and the processes, and run the workers.

flup 1.0.3 speaks the protocol; what it gets wrong is replaced in fcgi_connection.py (records)
and fcgi_server.py (the WSGI call), and so are its socket binding (listen.py) and its
processes (prefork.py, supervisor.py). Nothing imports flup until ``serve`` runs: a CGI request never pays
for it.
"""

import os
import socket
import sys

from tinyweb.runners.listen import BindError, listen, reexec
from tinyweb.runners.prefork import Worker, log
from tinyweb.runners.supervisor import Supervisor

__all__ = ["serve", "BindError"]

# notes/performance.md: prefork with 2 single-threaded workers was fastest on 2 cores.
DEFAULT_WORKERS = 2

def serve(app, options):
    """Serve ``app`` over FastCGI as ``options`` say; return the exit status."""
    if options.umask is not None:
        os.umask(options.umask)
    if options.bind is None:
        return _serve_stdin(app, options)
    try:
        listener, retiring = listen(options)
    except BindError as exc:
        sys.stderr.write("tinyweb: %s\n" % exc)
        return 1
    threads = options.threads or 1
    workers = 1 if options.threads else (options.workers or DEFAULT_WORKERS)
    server, connection_class = _make_server(app, options.bind, threads, multiprocess=workers > 1)
    _share_before_fork(app)

    def worker_main(parent_pid):
        return Worker(server, listener.sock, connection_class, threads, options.max_requests,
                      parent_pid).run()

    supervisor = Supervisor(
        worker_main, workers, reexec=lambda pids: reexec(listener, pids), retiring=retiring
    )
    try:
        return supervisor.run()
    finally:
        listener.close()


def _share_before_fork(app):
    """Load what every worker needs in the supervisor, so the workers share those pages."""
    # Each worker importing WebOb itself cost ~1.3 x a bare WebOb worker's memory
    # (bench/README.md). gc.freeze() keeps the collector from touching, and so copying,
    # the shared objects in each worker.
    from tinyweb.runners import import_request_modules

    import_request_modules()
    try:
        app.config  # read tinyweb.ini once; a bad one is reported on each request
    except Exception:
        pass
    import gc

    gc.collect()
    gc.freeze()


def _serve_stdin(app, options):
    """Serve on the listening socket a FastCGI process manager left on fd 0 (mod_fcgid)."""
    sock = None
    try:
        sock = socket.socket(fileno=os.dup(0))
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        listening = False
    if not listening:
        if sock is not None:
            sock.close()
        sys.stderr.write(
            "tinyweb: --mode fcgi without --bind serves the listening socket a FastCGI server "
            "puts on stdin (mod_fcgid, spawn-fcgi), and stdin is not one; give --bind PATH "
            "or --bind :PORT to start a server yourself\n"
        )
        return 2
    if options.workers:
        log("--workers is ignored on the socket on stdin: the web server starts the processes")
    sock.setblocking(False)
    # mod_fcgid sends one request at a time to a process and starts more processes itself.
    threads = options.threads or 1
    server, connection_class = _make_server(app, None, threads, multiprocess=True)
    try:
        return Worker(server, sock, connection_class, threads, options.max_requests).run()
    finally:
        sock.close()


def _make_server(app, bind, threads, multiprocess):
    from tinyweb.runners.fcgi_server import make_server

    return make_server(app, bind, threads, multiprocess)
