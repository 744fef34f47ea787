"""The Open Inference Protocol (KServe v2): REST (`http_api`) and gRPC, sharing one
tensor codec (`tensors`) and the runtime's typed work surface."""


class TensorError(ValueError):
    """A tensor in a request is malformed; the message names it and says why.

    Defined here rather than beside the codec (`tensors`, which needs numpy) so the error
    mapping (agent/http/errors.py) knows it in an agent that never decodes a tensor."""
