# The coordinator image: API (uvicorn), Celery worker and beat, migrations, and the provider agent
# (`tunegrid-worker`), one image with different commands (see docker-compose.yml). The training jobs
# themselves run in the separate trainer image (worker/trainer/Dockerfile), started by the agent.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p shared coordinator worker client demo migrations \
 && touch shared/__init__.py coordinator/__init__.py worker/__init__.py client/__init__.py demo/__init__.py \
          migrations/__init__.py \
 && pip install ".[coordinator,worker,client]" \
 && pip uninstall -y tunegrid

COPY alembic.ini ./
COPY shared/ shared/
COPY coordinator/ coordinator/
COPY worker/ worker/
COPY client/ client/
COPY demo/ demo/
COPY migrations/ migrations/
RUN pip install --no-deps . \
 && useradd --uid 10001 --create-home --home-dir /home/tunegrid tunegrid \
 && mkdir -p /data && chown tunegrid /data

USER tunegrid
ENV TUNEGRID_DATA_DIR=/data TUNEGRID_HOST=0.0.0.0
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["tunegrid-coordinator", "serve", "--workers", "4"]
