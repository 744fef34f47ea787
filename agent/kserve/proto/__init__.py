"""Generated KServe v2 gRPC messages and service (scripts/gen_grpc.sh); do not edit."""
