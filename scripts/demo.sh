#!/usr/bin/env bash
# Run the demo site in htdocs/ on http://127.0.0.1:8000/ (pass --port N, --mode ..., etc.).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f tinyweb.ini ]; then
    # A fresh secret for this checkout only; tinyweb.ini is git-ignored.
    umask 077
    printf '[tinyweb]\nsecret = %s\n' "$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')" > tinyweb.ini
fi
exec .venv/bin/python htdocs/app.py "$@"
