"""The dispatch service: storage, the 15-minute loop, the gRPC API and metrics."""
