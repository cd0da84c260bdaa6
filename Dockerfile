FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY schemas ./schemas
COPY worker ./worker
COPY consumer ./consumer
COPY tokenbus ./tokenbus
RUN pip install -c requirements.lock '.[worker,gateway,top]' && useradd --system --no-create-home tokenbus
USER tokenbus
CMD ["tokenbus", "worker"]
