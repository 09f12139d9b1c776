# pipeconnect-proxy as a sidecar container: see README.md, "Deploy as a sidecar".
#
#   docker build -t pipeconnect-proxy .
#   podman build --format docker -t pipeconnect-proxy .    # docker format keeps the HEALTHCHECK
#
# BASE is any Debian-like image with python3 (3.11+) and the venv module; both stages must use
# the same one, because the virtual environment links to the base's interpreter.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
WORKDIR /src
RUN python3 -m venv /opt/pipeconnect
# Dependencies (and the build backend) first, from pyproject.toml alone: this layer stays cached
# while the source changes.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print(*d['project']['dependencies'], *d['build-system']['requires'], sep='\n')" > requirements.txt \
    && /opt/pipeconnect/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY README.md ./
COPY proxy ./proxy
# The package alone, offline (no build isolation: setuptools is there); then pip and setuptools
# go, the runtime installs nothing.
RUN /opt/pipeconnect/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation . \
    && /opt/pipeconnect/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
ARG BASE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pipeconnect-proxy" \
      org.opencontainers.image.description="Transparent SMTP proxy that gives a legacy MTA early pipelining (PIPECONNECT)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE}"
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it and mounted files
# can be made readable for it.
# /var/lib/pipeconnect-proxy: outbound mode's EHLO cache (outbound.cache), the one place the
# proxy writes. The root filesystem is meant to run read-only: mount a volume here (a named
# volume takes this directory's owner; Kubernetes: an emptyDir). Without one the proxy
# relays its outbound sessions without the cache and says so once.
RUN groupadd --gid 10025 pipeconnect \
    && useradd --uid 10025 --gid 10025 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin pipeconnect \
    && install -d -o 10025 -g 10025 -m 0700 /var/lib/pipeconnect-proxy
COPY --from=build /opt/pipeconnect /opt/pipeconnect
COPY deploy/container/proxy.toml /etc/pipeconnect/proxy.toml
ENV PATH=/opt/pipeconnect/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIPECONNECT_HEALTHZ=http://127.0.0.1:9464/healthz
USER 10025:10025
# 25: SMTP (binding it as non-root needs net.ipv4.ip_unprivileged_port_start=0, the default in
# Docker's own network namespaces); 465: TLS on connect, when configured; 9464: metrics, /healthz;
# 10025: outbound mode's listener, on 127.0.0.1 only: the MTA's port-25 connections reach it
# through the NAT rule of deploy/outbound/ in the shared network namespace. Never publish it.
EXPOSE 25 465 9464 10025
# The proxy is PID 1 and handles SIGTERM itself (stop accepting, let sessions finish within
# [server] shutdown_grace, then 421); it starts no child processes, so no init is needed.
STOPSIGNAL SIGTERM
# Only the standard library: slim images have no curl. Set PIPECONNECT_HEALTHZ when the
# configuration moves [metrics] listen.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request as u\ntry: u.urlopen(os.environ['PIPECONNECT_HEALTHZ'], timeout=4)\nexcept Exception as e: sys.exit(f'unhealthy: {e}')"]
ENTRYPOINT ["pipeconnect-proxy"]
CMD ["serve", "--config", "/etc/pipeconnect/proxy.toml"]
