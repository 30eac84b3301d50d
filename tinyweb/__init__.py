"""tinyweb: one app.py that runs unchanged as CGI, under mod_python, or as a FastCGI server."""

from tinyweb.app import App

__all__ = ["App", "Request", "Response", "TooManyTasks", "__version__"]
__version__ = "0.1.0"


def __getattr__(name):
    # Request and Response pull in WebOb; `import tinyweb` alone does not (PEP 562).
    if name in ("Request", "Response"):
        from tinyweb import request

        return getattr(request, name)
    if name == "TooManyTasks":
        from tinyweb.deferred import TooManyTasks

        return TooManyTasks
    raise AttributeError("module 'tinyweb' has no attribute %r" % name)
