"""Generated gRPC/protobuf code for the ``vpp.v1`` API (from ``proto/vpp/v1/*.proto``).

The ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` modules here are written by the
install step (``pip install -e .`` or ``pip install .``, see setup.py) and are not
committed.
"""
