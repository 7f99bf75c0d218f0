# ftpfix: a transparent FTP proxy that makes passive mode work behind NAT.
#
#   docker build -t ftpfix .
#   docker run -v ./ftpfix.toml:/etc/ftpfix/ftpfix.toml:ro \
#              -p 21:21 -p 50000-50019:50000-50019 ftpfix
#
# The passive ports published here must match [passive] ports in the config,
# and the router must forward the same ports to this host.
FROM python:3.12-slim

# libcap2-bin only to grant the one capability below, then it goes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcap2-bin \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ftpfix ./ftpfix
RUN python -m venv /opt/ftpfix \
 && /opt/ftpfix/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && rm -rf /src \
 # Port 21 is privileged. Docker's bridge network lets any user bind it, but
 # host networking does not: give the interpreter just that capability, so
 # ftpfix never needs to run as root.
 && setcap cap_net_bind_service=+ep "$(readlink -f /opt/ftpfix/bin/python)" \
 && apt-get purge -y libcap2-bin && apt-get autoremove -y \
 && useradd --system --uid 2121 --no-create-home --shell /usr/sbin/nologin ftpfix

COPY deploy/ftpfix.toml /etc/ftpfix/ftpfix.toml

ENV PATH=/opt/ftpfix/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FTPFIX_CONFIG=/etc/ftpfix/ftpfix.toml
USER ftpfix
WORKDIR /
EXPOSE 21 50000-50019
HEALTHCHECK --interval=30s --timeout=10s --start-period=5s --retries=3 CMD ["ftpfix", "health"]
ENTRYPOINT ["ftpfix"]
CMD ["run"]
