# tokend container image.
#
#   docker build -t tokend .
#   docker run --read-only \
#       -v /srv/tokend/config.toml:/etc/tokend/config.toml:ro \
#       -v tokend-state:/var/lib/tokend \
#       -p 9464:9464 tokend
#
# The configuration is read from /etc/tokend/config.toml, mounted read-only
# (a file bind mount or a Kubernetes secret volume; it names its secrets by
# environment variable or file, so none need to be baked in). HTTP listens on
# 127.0.0.1:9464 by default, enough for the health check below; to let
# Prometheus scrape from outside the container, set
# `[http] listen = "0.0.0.0:9464"` in that file.

# The build stage installs tokend and its dependencies into a virtualenv, so
# the runtime stage copies one directory and carries no build tooling.
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/tokend

WORKDIR /src
COPY . .
RUN /opt/tokend/bin/pip install .


FROM python:3.11-slim-bookworm

# DL3064 reads the TOKEN in TOKEND_ as a credential; these values are not secret.
# hadolint ignore=DL3064
ENV PATH=/opt/tokend/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKEND_LOG_FORMAT=json

# A fixed numeric id, so that `runAsNonRoot` can verify it and volume
# ownership is the same on every host. /var/lib/tokend holds the write-ahead
# spool of rotated tokens not yet stored in Postgres; only tokend may read it.
RUN groupadd --system --gid 10001 tokend \
    && useradd --system --uid 10001 --gid tokend --no-create-home \
        --home-dir /var/lib/tokend --shell /usr/sbin/nologin tokend \
    && install -d -o root -g tokend -m 0750 /etc/tokend \
    && install -d -o tokend -g tokend -m 0700 /var/lib/tokend

COPY --from=build /opt/tokend /opt/tokend

USER 10001:10001
WORKDIR /var/lib/tokend
# Unreplayed rotated tokens must outlive the container: keep the spool on a
# volume even when the operator forgets to mount one.
VOLUME ["/var/lib/tokend"]

EXPOSE 9464

# The proxy handler is emptied so that an HTTP(S)_PROXY in the environment
# cannot send the probe of our own loopback port elsewhere.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["python", "-c", "\
import sys, urllib.request as r; \
o = r.build_opener(r.ProxyHandler({})); \
sys.exit(o.open('http://127.0.0.1:9464/healthz', timeout=4).status != 200)"]

# tokend runs as PID 1 (exec form, no shell) and handles SIGTERM itself: it
# drains in-flight refreshes for up to 20 s, so give `docker stop` --time=30.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokend"]
CMD ["run", "--config", "/etc/tokend/config.toml"]
