# receiver: a wss endpoint that records SignalWire media streams.
#   docker build -t receiver .
#   mkdir -p recordings && sudo chown 10001 recordings     # the server runs as uid 10001
#   docker run -p 8443:8443 -e RECEIVER_TOKENS=... -v "$PWD/recordings:/recordings" receiver
# (or run it as yourself: --user "$(id -u)" with a host directory of yours at /state as well).
# The health check probes RECEIVER_HOST/RECEIVER_PORT (loopback when bound to 0.0.0.0).
# Without RECEIVER_TLS_CERT/RECEIVER_TLS_KEY it serves a self-signed development certificate
# (kept in the /state volume); mount real PEM files for production, or put a TLS proxy in
# front and set RECEIVER_INSECURE_WS=true.

FROM python:3.12-slim AS build
# gcc builds receiver/_speedups.c, the hot path's loops in C (only the wheel reaches the image).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY receiver ./receiver
# The [uvloop] extra: the event loop `receiver serve` picks when installed (bench/README.md).
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[uvloop]'

FROM python:3.12-slim
# soundfile's wheels carry libsndfile; nothing else is needed from Debian.
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /state --no-create-home receiver \
 && mkdir -p /recordings /state && chown receiver:receiver /recordings /state
USER receiver
WORKDIR /state
ENV RECEIVER_RECORDINGS_DIR=/recordings \
    RECEIVER_STATE_DIR=/state \
    PYTHONUNBUFFERED=1
VOLUME ["/recordings", "/state"]
EXPOSE 8443
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["receiver", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["receiver"]
CMD ["serve"]
