# One image for every gateway process: `gateway serve` (the default command) and `gateway worker`.
# Not built on the machine this was written on (no Docker engine there); tests/test_containers.py
# checks what can be checked without one.

# Stage 1: wheels of the gateway and of everything it needs.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Stage 2: a slim runtime with those wheels installed, run by a user without privileges.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels webhook-gateway && rm -rf /wheels
COPY config /etc/gateway
ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    PYTHONUNBUFFERED=1
USER gateway
EXPOSE 8000
# The API's liveness; a worker container turns it off (it serves no HTTP: see /readyz on the API,
# which is ready only while a worker's heartbeat is fresh).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# SIGTERM stops a process gracefully: the API drains its open requests, a worker lets its attempts
# finish within [worker] shutdown_grace_s and hands back the rest.
STOPSIGNAL SIGTERM
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
