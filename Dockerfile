# vpp dispatch service: gRPC on 50051, Prometheus metrics on 9108.
#   docker build -t vpp .
#   docker run -p 50051:50051 -p 9108:9108 -v vpp-data:/data vpp
# The first start writes bearer tokens to /data/tokens.toml (only their hashes go to the database).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VPP_DATA_DIR=/data \
    VPP_GRPC_ADDRESS=0.0.0.0:50051 \
    VPP_METRICS_ADDRESS=0.0.0.0

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY vpp ./vpp
COPY sim ./sim
# The install step generates the gRPC code from proto/ (see setup.py).
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /data --create-home vpp

USER vpp
VOLUME ["/data"]
EXPOSE 50051 9108

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4); \
sys.exit(0 if s.status == h.HealthCheckResponse.SERVING else 1)"

CMD ["vpp", "serve"]
