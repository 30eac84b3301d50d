"""Match request paths to handlers and build paths back from route names.

``Router.match`` returns ``(route, params)`` or raises 404/405, as Bottle's router does.
"""


__all__ = ["Route", "Router", "RouteError"]

# {name}: one path segment; {name:int}: digits, passed as int; {name:path}: the rest.
_CONVERTERS = {
    "str": (r"[^/]+", str),
    "int": (r"[0-9]+", int),
    "path": (r".+", str),
}
_NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_NAME_REST = _NAME_START | frozenset("0123456789")
_KIND = frozenset("abcdefghijklmnopqrstuvwxyz")
_ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


class RouteError(ValueError):
    """A route pattern or a url_for call is malformed."""


class Route:
    """One path pattern, the handler it calls, and the methods it answers."""

    def __init__(self, pattern, handler, methods, name=None):
        if not pattern.startswith("/"):
            raise RouteError("route %r must start with '/'" % pattern)
        self.pattern = pattern
        self.handler = handler
        self.methods = frozenset(m.upper() for m in methods)
        self.name = name
        # Parsed now with string methods, so a malformed pattern fails where it is declared;
        # the regex is compiled on the first match: importing re costs a CGI request ~10 ms,
        # and a warm CGI entry (runners/persistent.py) never matches a route at all.
        self.converters, self._parts = self._parse(pattern)
        self._regex = None

    @staticmethod
    def _stray(pattern, index):
        # A brace outside a well-formed {name} or {name:kind} is a typo ("{user-id}",
        # "{id:Int}", "{id"); matched literally it would only ever give 404s.
        start = pattern.rfind("/", 0, index) + 1
        end = pattern.find("/", index)
        segment = pattern[start:end if end >= 0 else len(pattern)]
        return RouteError("route %r: %r is not a parameter: write {name}, {name:int} or "
                          "{name:path}, with a name made of letters, digits and _" % (pattern, segment))

    @classmethod
    def _parse(cls, pattern):
        converters, parts, pos = {}, [], 0
        while True:
            start = pattern.find("{", pos)
            literal = pattern[pos:start if start >= 0 else len(pattern)]
            if "}" in literal:
                raise cls._stray(pattern, pos + literal.index("}"))
            parts.append(literal)
            if start < 0:
                return converters, parts
            end = pattern.find("}", start)
            inner = pattern[start + 1:end] if end >= 0 else "{"
            name, colon, kind = inner.partition(":")
            if (not name or name[0] not in _NAME_START or not set(name) <= _NAME_REST
                    or (colon and (not kind or not set(kind) <= _KIND))):
                raise cls._stray(pattern, start)
            kind = kind or "str"
            if kind not in _CONVERTERS:
                raise RouteError("route %r: unknown converter %r (use int or path)" % (pattern, kind))
            if name in converters:
                raise RouteError("route %r: parameter %r appears twice" % (pattern, name))
            converters[name] = (kind, _CONVERTERS[kind][1])
            parts.append((name, kind))
            pos = end + 1

    @property
    def regex(self):
        if self._regex is None:
            import re

            self._regex = re.compile("^%s$" % "".join(
                re.escape(part) if isinstance(part, str) else "(?P<%s>%s)" % (part[0], _CONVERTERS[part[1]][0])
                for part in self._parts))
        return self._regex

    def match(self, path):
        """Return the converted parameters if ``path`` matches, else None."""
        found = self.regex.match(path)
        if found is None:
            return None
        return {name: self.converters[name][1](value) for name, value in found.groupdict().items()}

    def build(self, params):
        """Return the path for ``params``; parameters the pattern lacks become the query."""
        from urllib.parse import quote, urlencode

        out, extra = [], dict(params)
        for part in self._parts:
            if isinstance(part, str):
                out.append(quote(part))
                continue
            name, kind = part
            if name not in extra:
                raise RouteError("url_for(%r) needs the parameter %r" % (self.name, name))
            value = str(extra.pop(name))
            if kind == "int" and not value.isdigit():
                raise RouteError("url_for(%r): %r must be a whole number" % (self.name, name))
            out.append(quote(value, safe="/" if kind == "path" else ""))
        path = "".join(out)
        if extra:
            path += "?" + urlencode(extra, doseq=True)
        return path


class Router:
    """An ordered list of routes; the first whose pattern and method match wins."""

    def __init__(self):
        self.routes = []
        self.names = {}
        # Methods allowed per pattern, kept up to date as routes are added, so a 405's
        # Allow header costs nothing per request.
        self._allowed = {}

    def add(self, pattern, handler, methods=("GET",), name=None):
        methods = {m.upper() for m in methods}
        unknown = methods - set(_ALL_METHODS)
        if unknown:
            raise RouteError("route %r: unknown method(s) %s" % (pattern, ", ".join(sorted(unknown))))
        if "GET" in methods:
            methods.add("HEAD")
        route = Route(pattern, handler, methods, name)
        if name is not None:
            if name in self.names:
                raise RouteError("two routes are named %r" % name)
            self.names[name] = route
        self.routes.append(route)
        allowed = self._allowed.setdefault(pattern, set())
        allowed.update(route.methods)
        return route

    def match(self, method, path):
        """Return ``(route, params)`` for a request, or raise HTTPNotFound / HTTPMethodNotAllowed."""
        allowed = None
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if method in route.methods:
                return route, params
            allowed = (allowed or set()) | self._allowed[route.pattern]
        from webob import exc

        if allowed is None:
            raise exc.HTTPNotFound()
        raise exc.HTTPMethodNotAllowed(headers={"Allow": ", ".join(sorted(allowed))})

    def build(self, name, params):
        route = self.names.get(name)
        if route is None:
            raise RouteError("no route is named %r" % name)
        return route.build(params)
