#!/usr/bin/env python3
"""The tinyweb demo site: a page, a form, a session counter, a file upload and a PNG."""
import datetime
import hashlib
import html
import os
import re
import sys
import time

# From a checkout, tinyweb sits one folder up; an installed tinyweb is found the usual way.
# (Checked before inserting: mod_python runs this file again on every request.)
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_checkout, "tinyweb")) and _checkout not in sys.path:
    sys.path.insert(1, _checkout)

import tinyweb  # noqa: E402
from webob import exc  # noqa: E402

app = tinyweb.App(__name__)

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""


def page(title, body):
    return PAGE.format(title=html.escape(title), body=body)


@app.get("/", name="index")
def index(request):
    links = [
        ("user", request.url_for("user", id=7), "user 7 as JSON"),
        ("form", request.url_for("form"), "a form"),
        ("counter", request.url_for("counter"), "a session counter"),
        ("upload", request.url_for("upload"), "a file upload"),
        ("logo", request.url_for("logo"), "a PNG"),
        ("wait", request.url_for("wait"), 'a "please wait" page, streamed'),
        ("report", request.url_for("report"), "work done after the response"),
        ("article", request.url_for("article"), "a long page: gzip and conditional GET"),
        ("error", request.url_for("error"), "an error, as visitors see it"),
    ]
    items = "\n".join(
        '<li><a id="{0}" href="{1}">{2}</a></li>'.format(key, html.escape(href), text)
        for key, href, text in links
    )
    mode = html.escape(request.environ.get("tinyweb.mode", "?"))
    return page("tinyweb demo", "<p>Served in <b>%s</b> mode.</p>\n<ul>\n%s\n</ul>" % (mode, items))


@app.route("/users/{id:int}", methods=["GET", "POST"], name="user")
def user(request, id):
    return {"id": id, "url": request.url_for("user", id=id)}


FORM = """<form method="post" action="{action}">
<label>Your name <input name="name" value=""></label> <button>Send</button>
</form>"""


@app.get("/form", name="form")
def form(request):
    return page("A form", FORM.format(action=html.escape(request.url_for("form"))))


@app.post("/form")
def form_post(request):
    name = request.POST.get("name", "")
    return page("A form", "<p id=\"greeting\">Hello, %s!</p>" % html.escape(name))


@app.get("/counter", name="counter")
def counter(request):
    request.session["count"] = request.session.get("count", 0) + 1
    return {"count": request.session["count"]}


UPLOAD = """<form method="post" enctype="multipart/form-data" action="{action}">
<input type="file" name="file"> <button>Upload</button>
</form>"""


@app.get("/upload", name="upload")
def upload_form(request):
    return page("An upload", UPLOAD.format(action=html.escape(request.url_for("upload"))))


@app.post("/upload")
def upload(request):
    field = request.POST.get("file")
    if field is None or not hasattr(field, "file"):
        raise exc.HTTPBadRequest("send a file in the field 'file'")
    data = field.file.read()
    return {"filename": field.filename, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@app.get("/logo.png", name="logo")
def logo(request):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "logo.png"), "rb") as f:
        request.response.content_type = "image/png"
        return f.read()


@app.get("/go", name="go")
def go(request):
    raise exc.HTTPFound(location=request.url_for("index"))


def _seconds(request, default):
    try:
        return min(max(float(request.GET.get("seconds", default)), 0.0), 10.0)
    except ValueError:
        return default


@app.get("/wait", name="wait")
def wait(request):
    # A generator is streamed: the first chunk reaches the browser before the work is done.
    seconds = _seconds(request, 2)
    yield page("Please wait", '<p id="wait">Please wait while we work on it\u2026</p>').split("</body>")[0]
    time.sleep(seconds)
    yield '<p id="done">Done after %g seconds.</p>\n</body></html>\n' % seconds


def _write_report(path, seconds, fail):
    """Slow work that must not keep the visitor waiting: it runs after the response."""
    time.sleep(seconds)
    if fail:
        raise RuntimeError("the report could not be made (asked to fail)")
    with open(path, "w", encoding="utf-8") as f:
        f.write("report made at %s\n" % datetime.datetime.now(datetime.timezone.utc).isoformat())


@app.get("/report", name="report")
def report(request):
    name = request.GET.get("name", "latest")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
        raise exc.HTTPBadRequest("name: letters, digits, - and _ only")
    data_dir = str(request.app.config.data_dir)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(data_dir, "report-%s.txt" % name)
    fail = request.GET.get("fail") == "1"
    request.defer(_write_report, path, _seconds(request, 5), fail)
    return page("A report", "<p id=\"queued\">Your report <b>%s</b> is being made; "
                "it lands in the data dir as %s.</p>" % (html.escape(name), html.escape(os.path.basename(path))))


ARTICLE_DATE = datetime.datetime(2026, 1, 15, 12, 0, tzinfo=datetime.timezone.utc)


@app.get("/article", name="article")
def article(request):
    # About 20 KB of HTML: sent gzipped to browsers that accept it, with an ETag, and
    # answered 304 when the browser already has this version.
    request.response.last_modified = ARTICLE_DATE
    paragraph = ("<p>tinyweb serves the same app.py as CGI, under mod_python and as FastCGI. "
                 "This paragraph is here to make the page long enough to be worth compressing.</p>\n")
    return page("A long article", paragraph * 130)


@app.get("/error", name="error")
def error(request):
    raise RuntimeError("a deliberate error, to show the 500 page (the traceback is in the error log)")


@app.get("/about", name="about")
def about(request):
    return {
        "mode": request.environ.get("tinyweb.mode"),
        "python": sys.version.split()[0],
        "loaded": {name: name in sys.modules for name in ("beaker", "flup")},
        # Under mod_python: whether tinyweb was preloaded (PythonImport) and kept since.
        "preloaded": getattr(sys.modules.get("tinyweb.runners.modpython"), "preloaded", False),
    }


app.run()
