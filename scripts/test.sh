#!/usr/bin/env bash
# Run the whole test suite. Tests that need Apache, mod_python, mod_fcgid or nginx use the
# Debian packages; as root this installs any that are missing, otherwise those tests skip
# (under CI they fail instead).
set -euo pipefail
cd "$(dirname "$0")/.."
packages="apache2 libapache2-mod-python libapache2-mod-fcgid nginx-light python3-venv wrk"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=$(dpkg-query -W -f='${Package} ${Status}\n' $packages 2>/dev/null | grep -vc ' installed$' || true)
    if ! dpkg-query -W $packages >/dev/null 2>&1 || [ "$missing" != 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
    fi
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
