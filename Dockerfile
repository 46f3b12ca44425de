# uturn's container image: the relay built on the host, on debian:bookworm-slim, as a non-root
# user whose binary carries CAP_NET_BIND_SERVICE (a file capability), so it may listen on 443.
#
#   cargo build --release --bin uturn          # first: the image takes target/release/uturn
#   docker build -t uturn:0.1.0 .
#   docker run -d --network host -e UTURN_STATIC_AUTH_SECRET=... \
#     -e UTURN_LISTEN=0.0.0.0:3478 -e UTURN_RELAY_IP=203.0.113.10 uturn:0.1.0
#
# Configuration: a TOML mounted at /etc/uturn/uturn.toml (-v ./uturn.toml:/etc/uturn/uturn.toml:ro;
# the image's own is docs/uturn.example.toml, loopback and the demo credential), and/or UTURN_*
# variables, which act as the flags do and override the file's keys (docs/operations.md,
# "Container image"). Arguments after the image name are uturn's: `docker run IMAGE check-config`.
# Build context: .dockerignore sends only the binary and the example config. The apt-get of
# both stages needs Debian's archive (a daemon without a bridge: `docker build --network host`).
# Stage 1: the binary stripped of its debug info (the release profile keeps it for profiling:
# 69 MB, stripped 10 MB); binutils comes from Debian here and stays out of the image.
FROM debian:bookworm-slim AS binary
# The release binary by default; `--build-arg UTURN_BINARY=PATH` takes another file inside the
# build context.
ARG UTURN_BINARY=target/release/uturn
COPY ${UTURN_BINARY} /uturn
RUN set -eu; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null; \
    strip --strip-debug -o /usr/bin/uturn /uturn

# Stage 2: the runtime.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 uturn \
    && useradd --system --uid 10001 --gid uturn --home-dir /var/lib/uturn --shell /usr/sbin/nologin uturn \
    && install -d -o uturn -g uturn -m 0750 /var/lib/uturn \
    && install -d -m 0755 /etc/uturn
COPY --from=binary /usr/bin/uturn /usr/bin/uturn
COPY docs/uturn.example.toml /etc/uturn/uturn.toml

# CAP_NET_BIND_SERVICE as a file capability: the only way a non-root process gets it in a
# container (Docker and Kubernetes set no ambient capabilities). It is set here, in the last
# stage, because COPY does not carry extended attributes. setcap comes from libcap2-bin, which
# slim lacks: installed and purged in this one layer. The capability needs the container's
# bounding set to hold it (Docker's default does; `--cap-drop ALL` without
# `--cap-add NET_BIND_SERVICE` makes the exec fail with EPERM).
RUN set -eu; \
    chmod 0755 /usr/bin/uturn; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libcap2-bin >/dev/null; \
    setcap cap_net_bind_service=+ep /usr/bin/uturn; \
    apt-get purge -y -qq --auto-remove libcap2-bin >/dev/null; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin; \
    /usr/bin/uturn --version

USER uturn:uturn
WORKDIR /var/lib/uturn
ENV UTURN_CONFIG=/etc/uturn/uturn.toml \
    UTURN_ADMIN_LISTEN=127.0.0.1:3480
EXPOSE 3478/udp 3478/tcp 9478/tcp

# GET /health on the admin API (UTURN_ADMIN_LISTEN's port) over bash's /dev/tcp: slim has no
# curl, and the admin API wants `Host: IP:PORT`.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/bin/bash", "-c", "p=${UTURN_ADMIN_LISTEN##*:}; exec 3<>/dev/tcp/127.0.0.1/$p && printf 'GET /health HTTP/1.1\\r\\nHost: 127.0.0.1:%s\\r\\nConnection: close\\r\\n\\r\\n' $p >&3 && head -1 <&3 | grep -q ' 200 '"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/uturn"]
