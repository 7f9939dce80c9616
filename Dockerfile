FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY listener ./listener
COPY sql ./sql
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
CMD ["merkle-listener", "--help"]
