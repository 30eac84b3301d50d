"""The Router on its own: patterns, converters, 404/405, building paths, and pattern errors."""

import pytest
from webob import exc

from tinyweb.routing import RouteError, Router


def handler(request, **params):
    return params


@pytest.fixture
def router():
    r = Router()
    r.add("/", handler, ["GET"], name="index")
    r.add("/users/{id:int}", handler, ["GET", "POST"], name="user")
    r.add("/users/{name}", handler, ["DELETE"], name="user_by_name")
    r.add("/files/{rest:path}", handler, ["GET"], name="file")
    r.add("/a/{x}/b/{y}", handler, ["PUT"], name="two")
    r.add("/static/{name}.css", handler, ["GET"], name="css")
    return r


@pytest.mark.parametrize("method, path, name, params", [
    ("GET", "/", "index", {}),
    ("GET", "/users/42", "user", {"id": 42}),
    ("POST", "/users/007", "user", {"id": 7}),
    ("DELETE", "/users/bob", "user_by_name", {"name": "bob"}),
    ("DELETE", "/users/42", "user_by_name", {"name": "42"}),
    ("GET", "/files/a/b/c.txt", "file", {"rest": "a/b/c.txt"}),
    ("GET", "/files/x", "file", {"rest": "x"}),
    ("PUT", "/a/1/b/zoë", "two", {"x": "1", "y": "zoë"}),
    ("GET", "/static/site.css", "css", {"name": "site"}),
    ("HEAD", "/users/1", "user", {"id": 1}),
])
def test_match(router, method, path, name, params):
    route, found = router.match(method, path)
    assert route.name == name
    assert found == params
    assert type(found.get("id", 0)) is int


@pytest.mark.parametrize("path", [
    "/users", "/users/", "/users/1/", "/users/1/x", "/files/", "/a/1/b/", "/a//b/2",
    "/static/.css", "/static/a/b.css", "//", "",
])
def test_no_match_is_404(router, path):
    with pytest.raises(exc.HTTPNotFound):
        router.match("GET", path)


def test_int_converter_refuses_non_digits(router):
    # "-1" and "1.5" are not {id:int}, so they fall to {name}, which only answers DELETE.
    for path in ("/users/-1", "/users/1.5", "/users/١٢"):
        with pytest.raises(exc.HTTPMethodNotAllowed):
            router.match("GET", path)
        assert router.match("DELETE", path)[0].name == "user_by_name"


def test_405_lists_the_methods_of_every_matching_pattern(router):
    with pytest.raises(exc.HTTPMethodNotAllowed) as caught:
        router.match("PATCH", "/users/5")
    assert caught.value.headers["Allow"] == "DELETE, GET, HEAD, POST"
    with pytest.raises(exc.HTTPMethodNotAllowed) as caught:
        router.match("GET", "/a/1/b/2")
    assert caught.value.headers["Allow"] == "PUT"


def test_first_route_wins():
    r = Router()
    r.add("/x/{a}", lambda req, a: "first", ["GET"], name="first")
    r.add("/x/{b}", lambda req, b: "second", ["GET"], name="second")
    assert r.match("GET", "/x/1")[0].name == "first"


def test_head_follows_get_only():
    r = Router()
    r.add("/p", handler, ["POST"])
    with pytest.raises(exc.HTTPMethodNotAllowed) as caught:
        r.match("HEAD", "/p")
    assert caught.value.headers["Allow"] == "POST"


@pytest.mark.parametrize("name, params, path", [
    ("index", {}, "/"),
    ("user", {"id": 7}, "/users/7"),
    ("user", {"id": "12"}, "/users/12"),
    ("user_by_name", {"name": "a b/c?"}, "/users/a%20b%2Fc%3F"),
    ("user_by_name", {"name": "zoë"}, "/users/zo%C3%AB"),
    ("file", {"rest": "dir/a b.txt"}, "/files/dir/a%20b.txt"),
    ("two", {"x": 1, "y": 2}, "/a/1/b/2"),
    ("user", {"id": 7, "tab": "x y", "n": [1, 2]}, "/users/7?tab=x+y&n=1&n=2"),
    ("css", {"name": "site"}, "/static/site.css"),
])
def test_build(router, name, params, path):
    assert router.build(name, params) == path


def test_build_round_trips_through_match(router):
    from urllib.parse import unquote

    for name, params in [("user", {"id": 31}), ("file", {"rest": "x/ÿ z"}), ("two", {"x": "é", "y": "+"})]:
        built = router.build(name, params)
        route, found = router.match("PUT" if name == "two" else "GET", unquote(built))
        assert (route.name, found) == (name, params)


@pytest.mark.parametrize("name, params, message", [
    ("nope", {}, "no route is named 'nope'"),
    ("user", {}, "url_for('user') needs the parameter 'id'"),
    ("user", {"id": "abc"}, "url_for('user'): 'id' must be a whole number"),
    ("user", {"id": -3}, "url_for('user'): 'id' must be a whole number"),
])
def test_build_errors(router, name, params, message):
    with pytest.raises(RouteError) as caught:
        router.build(name, params)
    assert str(caught.value) == message


@pytest.mark.parametrize("pattern, methods, message", [
    ("users", ["GET"], "must start with '/'"),
    ("/u/{id:float}", ["GET"], "unknown converter 'float'"),
    ("/u/{id}/{id}", ["GET"], "parameter 'id' appears twice"),
    ("/u", ["FETCH"], "unknown method(s) FETCH"),
    ("/u/{user-id}", ["GET"], "'{user-id}'"),
    ("/u/{id:Int}", ["GET"], "'{id:Int}'"),
    ("/u/{id", ["GET"], "'{id'"),
    ("/u/id}", ["GET"], "'id}'"),
])
def test_pattern_errors(pattern, methods, message):
    with pytest.raises(RouteError) as caught:
        Router().add(pattern, handler, methods)
    assert message in str(caught.value)


def test_duplicate_name_is_an_error():
    r = Router()
    r.add("/a", handler, name="x")
    with pytest.raises(RouteError, match="two routes are named 'x'"):
        r.add("/b", handler, name="x")


def test_regex_characters_in_a_pattern_are_literal():
    r = Router()
    r.add("/a.b/(c)+", handler)
    assert r.match("GET", "/a.b/(c)+")[1] == {}
    with pytest.raises(exc.HTTPNotFound):
        r.match("GET", "/axb/cc")


def test_app_decorators_register_methods(tmp_path):
    from tinyweb import App

    app = App(__name__)
    for verb in ("get", "post", "put", "delete"):
        getattr(app, verb)("/thing")(handler)
    app.route("/other", methods=["PATCH", "options"])(handler)
    methods = sorted(m for route in app.router.routes for m in route.methods)
    assert methods == ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"]
