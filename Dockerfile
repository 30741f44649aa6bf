# The proxy as a container image: docker build -t skill-engine-proxy:0.1.0 .
# See the README's "Deploy" section, and deploy/ for Kubernetes, compose and monitoring.

# Build stage: the project's wheel, installed with its runtime dependencies into a virtual
# environment that the final stage copies as it is. Nothing else of this stage is kept.
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# The project's runtime extras, all of them (a test holds this list to pyproject.toml):
# redis, for token_store.backend: redis; speed, for uvloop.
ARG EXTRAS=redis,speed

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv --without-pip /opt/skill-engine-proxy \
    && wheel="$(echo /wheels/skill_engine_proxy-*.whl)" \
    && pip --python /opt/skill-engine-proxy/bin/python install \
        "skill-engine-proxy[${EXTRAS}] @ file://${wheel}"

# Final stage: the interpreter of the same base image, the virtual environment, the default
# config. No compiler, no pip cache, no sources, no tests.
FROM python:3.11-slim

# A fixed numeric user and group, so that Kubernetes can check runAsNonRoot and mounted
# secrets can be made readable to it (fsGroup).
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --no-log-init --uid 10001 --gid proxy \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin proxy

COPY --from=build /opt/skill-engine-proxy /opt/skill-engine-proxy
COPY deploy/docker/config.yaml /etc/skill-engine-proxy/config.yaml

# The root filesystem may be read-only: bytecode was compiled at install, and the proxy
# writes only under /tmp (the directories of run --workers, the file token store's default
# path), so mount a writable /tmp: an emptyDir, or --tmpfs /tmp. PROMETHEUS_MULTIPROC_DIR
# stays unset: run --workers makes its own there, and set globally it would put a single
# process on file-backed metrics.
ENV PATH=/opt/skill-engine-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SKILL_ENGINE_PROXY_CONFIG=/etc/skill-engine-proxy/config.yaml

USER 10001:10001

# The proxy and the admin listener (/metrics, /healthz, /readyz) of the default config.
EXPOSE 8080 9090

# http.client rather than urllib: it ignores HTTP_PROXY, which a corporate network may set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import http.client, os, sys; port = int(os.environ.get('SKILL_ENGINE_PROXY_ADMIN_LISTEN', ':9090').rpartition(':')[2]); connection = http.client.HTTPConnection('127.0.0.1', port, timeout=4); connection.request('GET', '/healthz'); sys.exit(connection.getresponse().status != 200)"]

ENTRYPOINT ["skill-engine-proxy", "run"]
