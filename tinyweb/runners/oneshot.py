"""Import WebOb for a one-shot CGI process without the stdlib modules a request never uses.

WebOb binds ``urlopen`` from urllib.request at import (webob/compat.py), which pulls in
http.client, ssl and email parsing: about a sixth of a CGI hello's time (bench/README.md),
for a function WebOb uses only in ``Request.send``. ``importlib.util.LazyLoader`` cannot
help: ``from urllib.request import urlopen`` touches the module at once. So, while WebOb
imports, a stand-in module sits in sys.modules whose ``urlopen`` loads the real module on
first call; it is removed right after, so any later ``import urllib.request`` is real.
Only the CGI gateway uses this: its process serves one request and exits. Long-lived
processes (FastCGI, mod_python, the CGI worker) import WebOb as it is.
"""

import sys
import types

__all__ = ["import_webob"]

# module name -> the names WebOb binds from it with "from ... import"
DEFERRED = {"urllib.request": ("urlopen",)}


class _StandIn(types.ModuleType):
    """A module whose attributes come from the real one, loaded on first use."""

    def _real(self):
        real = self.__dict__.get("_tinyweb_real")
        if real is None:
            name = self.__name__
            if sys.modules.get(name) is self:
                del sys.modules[name]
            __import__(name)
            real = self.__dict__["_tinyweb_real"] = sys.modules[name]
        return real

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._real(), attr)


def _forwarder(stand_in, attr):
    def call(*args, **kwargs):
        return getattr(stand_in._real(), attr)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    return call


def import_webob():
    """Import the WebOb modules a request uses, deferring DEFERRED until first use."""
    if "webob" in sys.modules:
        return  # app.py imported it already: nothing left to save
    placed = {}
    for name, attrs in DEFERRED.items():
        if name in sys.modules:
            continue
        stand_in = _StandIn(name)
        for attr in attrs:
            setattr(stand_in, attr, _forwarder(stand_in, attr))
        sys.modules[name] = placed[name] = stand_in
    try:
        import webob.exc  # noqa: F401
        import webob.request  # noqa: F401
        import webob.response  # noqa: F401
    finally:
        for name, stand_in in placed.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
