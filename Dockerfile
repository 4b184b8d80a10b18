FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir ".[flower]"
# Celery refuses nothing as root, but a worker has no reason to be root.
RUN useradd --create-home tracker
USER tracker
CMD ["celery", "-A", "smsbat_tracker.worker", "worker", "--loglevel", "INFO"]
