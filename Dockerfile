# One roomcast node. docker-compose.yml runs three of these behind HAProxy.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs (pyproject.toml installs node/, broker/, shared/ as
# roomcast.node, roomcast.broker, roomcast.shared; the readme).
COPY pyproject.toml README.md /tmp/roomcast/
COPY node /tmp/roomcast/node
COPY broker /tmp/roomcast/broker
COPY shared /tmp/roomcast/shared
# With the uvloop extra: `roomcast serve` (--loop auto) runs on uvloop, the faster loop,
# and logs "event loop: uvloop <version>" at start-up.
# Offline builds (the compose smoke test): ROOMCAST_WHEELS names a folder of the build
# context holding wheels of every dependency (uvloop's too) and of setuptools, and pip
# installs from it alone, with no index. Unset (the default), the COPY below only copies
# pyproject.toml again and pip installs from the package index as usual.
ARG ROOMCAST_WHEELS=
COPY ${ROOMCAST_WHEELS:-pyproject.toml} /tmp/wheels/
RUN if [ -n "$ROOMCAST_WHEELS" ]; then \
        pip install --no-index --find-links /tmp/wheels '/tmp/roomcast[uvloop]'; \
    else \
        pip install '/tmp/roomcast[uvloop]'; \
    fi && rm -rf /tmp/roomcast /tmp/wheels

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/roomcast --shell /usr/sbin/nologin roomcast
USER roomcast
WORKDIR /home/roomcast

# Every setting is a ROOMCAST_* variable (roomcast serve --help); these are the defaults
# the healthcheck and docker-compose.yml rely on.
ENV ROOMCAST_HOST=0.0.0.0 \
    ROOMCAST_PORT=8080
EXPOSE 8080

# Liveness: the process answers /healthz (the load balancer checks /readyz itself).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ROOMCAST_PORT', '8080'), timeout=2)"]

# SIGTERM drains: readiness fails first (ROOMCAST_DRAIN_NOTICE_SECONDS), then clients get
# a 1001 close, presence is removed, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["roomcast"]
CMD ["serve"]
