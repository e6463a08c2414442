# One image for both roles: `seco api` and `seco worker` (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SECO_DATA_DIR=/data

WORKDIR /app
# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p service worker seco_core benchmarks \
    && touch service/__init__.py worker/__init__.py seco_core/__init__.py benchmarks/__init__.py \
    && pip install ".[server]" \
    && pip uninstall -y seco-tune
COPY service ./service
COPY worker ./worker
COPY seco_core ./seco_core
COPY benchmarks ./benchmarks
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 seco \
    && mkdir -p /data /scratch && chown seco:seco /data /scratch
USER seco
VOLUME ["/data"]
EXPOSE 8000
CMD ["seco", "api", "--host", "0.0.0.0", "--port", "8000"]
