# Shared by scripts/demo and scripts/test: a virtualenv in .venv with the
# project and its development dependencies, pinned by requirements/constraints.txt.
# Sourced, not run.

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "verity_django needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    return 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    # Install the Debian packages that are missing, and nothing else.
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "Installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    # Services must not start on install: the tests start their own on loopback.
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    as_root rm -f /usr/sbin/policy-rc.d
}

setup_venv() {
    local python
    python=$(find_python)
    if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    if [ ! -x .venv/bin/python ]; then
        "$python" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q --disable-pip-version-check \
        -c requirements/constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    # django_eventstream reads settings when imported, so it is only located here.
    .venv/bin/python -c 'import importlib.util, verity_django, django, rest_framework
assert importlib.util.find_spec("django_eventstream")' || {
        echo "The virtualenv in .venv is incomplete; remove it and run again." >&2
        return 1
    }
}
