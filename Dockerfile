FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY config ./config
RUN pip install --no-cache-dir .
ENV GATEWAY_CONFIG=/app/config/gateway.toml
EXPOSE 8000
# The API; run the same image with `gateway worker` for delivery workers. Both need REDIS_URL.
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
