"""The Open Inference Protocol (KServe v2): REST (`http_api`) and gRPC, sharing one
tensor codec (`tensors`) and the runtime's typed work surface."""
