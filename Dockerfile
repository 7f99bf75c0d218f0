# ftpfix: a transparent FTP proxy that makes passive mode work behind NAT.
#
#   docker build -t ftpfix .
#   docker run -v ./ftpfix.toml:/etc/ftpfix/ftpfix.toml:ro --cap-drop ALL \
#              -p 21:21 -p 50000-50019:50000-50019 ftpfix
#   (add -p 990:990 with [tls] implicit_port = 990: implicit FTPS)
#
# The passive ports published must match [passive] ports in the config (or
# $FTPFIX_PASSIVE_PORTS, which overrides it), and the router must forward the
# same ports to this host. deploy/compose.yaml writes the range once, in
# deploy/.env.
#
# Port 21 without any capability: ftpfix runs as an unprivileged user and the
# image grants nothing (a file capability on the interpreter would make the
# kernel refuse to exec it under --cap-drop ALL). Docker lets any user of a
# container with its own network namespace bind port 21 (it sets
# net.ipv4.ip_unprivileged_port_start=0); podman does not, so add
# --sysctl net.ipv4.ip_unprivileged_port_start=0 there, or listen on an
# unprivileged port and publish it as 21 (-p 21:2121). With host networking,
# only the host's own sysctl decides.
FROM python:3.12-slim

# Dependencies from the lock file, every file checked against its hash; then
# ftpfix itself, built with the locked setuptools and nothing else.
# Regenerate the lock with deploy/lock.
COPY deploy/requirements.lock /tmp/requirements.lock
RUN python -m venv /opt/ftpfix \
 && /opt/ftpfix/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes \
        -r /tmp/requirements.lock \
 && rm /tmp/requirements.lock
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ftpfix ./ftpfix
RUN /opt/ftpfix/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation . \
 && rm -rf /src \
 && useradd --system --uid 2121 --no-create-home --shell /usr/sbin/nologin ftpfix

COPY deploy/ftpfix.toml /etc/ftpfix/ftpfix.toml

ENV PATH=/opt/ftpfix/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FTPFIX_CONFIG=/etc/ftpfix/ftpfix.toml
USER ftpfix
WORKDIR /
# Documentation only (-P publishes them): the control port and the default
# passive range of [passive] ports; compose passes deploy/.env's range.
ARG FTPFIX_PASSIVE_PORTS=50000-50019
EXPOSE 21 ${FTPFIX_PASSIVE_PORTS}
# SIGTERM drains: the listeners close and running transfers get
# [limits] shutdown_grace seconds (8 in the default config) before ftpfix exits 0.
# The engine kills after its own timeout (10 s for docker stop and podman
# stop), so keep shutdown_grace below it, or raise both.
STOPSIGNAL SIGTERM
# Liveness only: /healthz on [metrics] listen (127.0.0.1:9121 in the default
# config). It does not ask the backend, so a backend that is down does not get
# ftpfix restarted; `ftpfix health --ready` is the readiness check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=5s --retries=3 CMD ["ftpfix", "health"]
ENTRYPOINT ["ftpfix"]
CMD ["run"]
