"""Import WebOb and Beaker in a one-shot CGI process without stdlib modules a request never uses.

WebOb and Beaker bind names from stdlib modules at import that most requests never call,
and loading those modules is about a third of a cold CGI hello (bench/README.md, "CGI"):

- webob/compat.py: ``urlopen`` from urllib.request (http.client, ssl, email parsing), used
  only by ``Request.send``; ``cgi`` and ``tempfile`` (email.parser, shutil, bz2, lzma,
  random), used only to parse a form body or spool a large one;
- webob/datetime_utils.py: ``formatdate``, ``mktime_tz`` and ``parsedate_tz`` from
  email.utils, and ``calendar`` (socket, locale, email.charset), used only when a date
  header is read or written; webob/request.py: ``mimetypes``, for ``Request.blank``;
  ``json`` (webob's request, response, cookies, exc) and ``escape`` from html, used only
  by a JSON body or cookie and by WebOb's own error pages; ``hashlib`` and ``hmac``
  (OpenSSL's libcrypto), used only by signed cookies and ``md5_etag``; ``Queue`` and
  ``Empty`` from queue (threading), which WebOb binds and never uses;
- beaker/cache.py: ``importlib.metadata`` (zipfile, csv, email), used only to look up a
  backend that is not built in, and ``traceback``, to report one that fails to load;
  ``signature`` from inspect (ast, dis, tokenize), used only by Beaker's cache
  decorators; beaker/util.py: ``socket``, unused; beaker/_compat.py: ``dbm.dumb`` (ast)
  where there is no gdbm, for the dbm backend only; beaker/crypto/util.py: ``md5`` and
  ``sha1`` from hashlib, loaded when a session's cookie is signed.

``importlib.util.LazyLoader`` cannot help: ``from urllib.request import urlopen`` touches
the module at once. So, while a module of WebOb or Beaker executes for the first time, a
stand-in sits in sys.modules for each of these; its functions and attributes load the real
module on first use. The stand-ins are removed as soon as that import is done, so any
other import of them is real. WebOb subclasses ``cgi.FieldStorage`` at import
(webob.compat.cgi_FieldStorage), so the cgi stand-in offers a base class that puts the
real ``FieldStorage`` beneath itself the first time a form is parsed.

Only the CGI gateway installs this: its process serves one request and exits. Long-lived
processes (FastCGI, mod_python, the CGI worker) import WebOb and Beaker as they are.
"""

import sys
import types

__all__ = ["install"]

# The packages whose imports run with the stand-ins in place.
PACKAGES = ("webob", "beaker")

# module name -> the names those packages bind from it with "from ... import"
DEFERRED = {
    "urllib.request": ("urlopen",),
    "email.utils": ("formatdate", "mktime_tz", "parsedate_tz"),
    "calendar": (),
    "cgi": ("parse_header",),
    "tempfile": (),
    "mimetypes": (),
    "json": (),
    "html": ("escape",),
    "importlib.metadata": (),
    "inspect": ("signature",),
    "traceback": (),
    "socket": (),
    "dbm.dumb": (),
    "hashlib": ("md5", "sha1"),
    "hmac": ("compare_digest",),
    "queue": ("Queue", "Empty"),
}


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


class _NotLoaded:
    """The base of FieldStorage until the real cgi module is loaded."""


class FieldStorage(_NotLoaded):
    """cgi.FieldStorage, loaded when the first instance of a subclass is made."""

    def __new__(cls, *args, **kwargs):
        if FieldStorage.__bases__ == (_NotLoaded,):
            # The real class goes beneath this one, so WebOb's subclass made at import
            # inherits everything from it; __bases__ cannot be set on a class whose only
            # base is object, hence _NotLoaded.
            import cgi

            FieldStorage.__bases__ = (cgi.FieldStorage,)
        return super().__new__(cls)


def _stand_in(name):
    stand_in = _StandIn(name)
    for attr in DEFERRED[name]:
        setattr(stand_in, attr, _forwarder(stand_in, attr))
    if name == "cgi":
        stand_in.FieldStorage = FieldStorage
    parent, _, child = name.rpartition(".")
    if parent in sys.modules and not hasattr(sys.modules[parent], child):
        # "import importlib.metadata" finds the stand-in in sys.modules and binds the
        # package, so the code reads it back as an attribute of the package; the real
        # import replaces it there too.
        setattr(sys.modules[parent], child, stand_in)
    return stand_in


class _Loader:
    """Run the real loader's exec_module with the stand-ins in place."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with self._finder:
            self._loader.exec_module(module)


class _Finder:
    """A meta path finder that hands PACKAGES' modules to _Loader; the rest it leaves alone."""

    def __init__(self):
        self._depth = 0
        self._placed = {}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in PACKAGES:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def __enter__(self):
        if self._depth == 0:
            for name in DEFERRED:
                if name not in sys.modules:
                    sys.modules[name] = self._placed[name] = _stand_in(name)
        self._depth += 1

    def __exit__(self, *exc_info):
        self._depth -= 1
        if self._depth == 0:
            for name, stand_in in self._placed.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
            self._placed.clear()


def install():
    """From now on, import WebOb and Beaker deferring DEFERRED until first use."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
