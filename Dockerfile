# Two targets: `api` (no torch: small, CPU-only) and `worker` (torch + transformers; the PyPI torch wheel for
# linux/x86_64 is the CUDA build, so the same image runs on GPU hosts).
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HUBTUNE_HOME=/data
WORKDIR /app
RUN useradd --create-home --uid 1000 hubtune && mkdir -p /data /cache && chown hubtune /data /cache
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations

FROM base AS api
# the dashboard's chart library, fetched at build time (checked against its pinned integrity), then packaged
RUN python service/web/assets.py && pip install '.[s3]'
USER hubtune
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["hubtune", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

FROM base AS worker
# torch first and pinned, then the project: an unpinned resolution would pick another torch.
RUN pip install torch==2.13.0 && pip install '.[worker,s3]'
USER hubtune
CMD ["hubtune", "worker", "--queues", "rank,tune", "--concurrency", "1"]
