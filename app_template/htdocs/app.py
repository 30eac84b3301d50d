#!/usr/bin/env python3
# Line 1 names the Python that runs this file as CGI or FastCGI: `tinyweb new` wrote the one it
# ran under. It needs tinyweb installed, and the web server's user must be able to run it.
"""A tinyweb app: this one file runs unchanged as CGI, under mod_python, as FastCGI or in the dev server.

A CGI server compiles this file on every request (the script it runs is never cached as
bytecode): keep it thin. Put the bulk of your code in a package outside htdocs/ (every .py
file in htdocs/ is a script the web server will run or serve), installed in the same venv
(`pip install -e .`), where it is compiled once.
"""
import tinyweb

app = tinyweb.App(__name__)


@app.get("/", name="index")
def index(request):
    return '<h1>Hello</h1>\n<p><a href="%s">You, as JSON</a></p>\n' % request.url_for("user", id=1)


@app.route("/users/{id:int}", methods=["GET", "POST"], name="user")
def user(request, id):
    request.session["seen"] = request.session.get("seen", 0) + 1
    return {"id": id, "seen": request.session["seen"]}


# Unguarded, at module level: mod_python imports this file as module "app", not "__main__",
# so an `if __name__ == "__main__":` guard would never serve. Imported elsewhere, it does nothing.
app.run()
