"""The runtime's error hierarchy.

Every failure a caller can act on is one of these; the agent maps them to
OpenAI / KServe v2 error JSON in one place (agent/http/errors.py). Anything else
escaping the runtime is a bug and is reported as an internal error.
"""

from __future__ import annotations


class RuntimeLayerError(Exception):
    """Base of every error the runtime raises on purpose."""


class BundleError(RuntimeLayerError):
    """A model bundle on disk is missing, incomplete or has an invalid model.toml."""


class StoreError(RuntimeLayerError):
    """The model store cannot do what was asked (bad name, missing blob, no version to roll back to)."""


class ModelLoadError(RuntimeLayerError):
    """The backend could not load a bundle (bad weights, unsupported format, out of memory)."""


class ProbeFailedError(RuntimeLayerError):
    """A loaded version did not pass its smoke test (a real inference on its probe input)."""


class ModelNotFoundError(RuntimeLayerError):
    """No model of that name is known to the registry."""

    def __init__(self, name: str) -> None:
        super().__init__(f"The model '{name}' does not exist")
        self.name = name


class ModelNotReadyError(RuntimeLayerError):
    """The model exists but is loading, unloading or failed to load."""

    def __init__(self, name: str, state: str, retry_after_s: float = 1.0) -> None:
        super().__init__(f"The model '{name}' is not ready (state: {state})")
        self.name = name
        self.state = state
        self.retry_after_s = retry_after_s


class UnsupportedOperationError(RuntimeLayerError):
    """The model cannot do what was asked (embeddings from a chat model, tensors from GGUF)."""


class InvalidInputError(RuntimeLayerError):
    """The request's content is wrong for this model (tensor shape, dtype, name...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidInputError):
    """Prompt plus requested completion does not fit the model's context window."""

    def __init__(self, n_ctx: int, prompt_tokens: int, max_tokens: int | None, at_least: bool = False) -> None:
        if max_tokens is None or at_least:
            message = (
                f"This model's maximum context length is {n_ctx} tokens. "
                f"However, your prompt is {'more than ' if at_least else ''}{prompt_tokens} tokens."
            )
        else:
            message = (
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens."
            )
        super().__init__(message, param="messages" if max_tokens is None or at_least else "max_tokens")
        self.n_ctx = n_ctx
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class OverloadedError(RuntimeLayerError):
    """The model's queue is full; the caller should retry after `retry_after_s`."""

    def __init__(self, name: str, depth: int, retry_after_s: float) -> None:
        super().__init__(
            f"The model '{name}' has {depth} requests queued, its limit; retry later"
        )
        self.name = name
        self.retry_after_s = retry_after_s


class ShuttingDownError(RuntimeLayerError):
    """The scheduler is draining and accepts no new work (or dropped this queued request)."""

    def __init__(self, name: str, retry_after_s: float = 5.0) -> None:
        super().__init__(f"The model '{name}' is shutting down; retry later")
        self.name = name
        self.retry_after_s = retry_after_s


class WorkStopped(RuntimeLayerError):
    """Raised by a backend that saw its job's cancel flag during work that cannot return
    a partial result; the scheduler turns it into the error that says why it stopped."""


class ModelTimeExceededError(InvalidInputError):
    """The request used more model time than a request may (`max_model_time_s`)."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(
            f"This request needed more than {limit_s:g} s of model time, the limit per request; "
            "send less work per request"
        )
        self.limit_s = limit_s


class WorkingSetTooLargeError(InvalidInputError):
    """The request's estimated working memory does not fit the model's memory budget."""

    def __init__(self, needed_mb: float, budget_mb: float, what: str) -> None:
        super().__init__(
            f"This request needs about {needed_mb:.0f} MB of working memory for {what}; "
            f"this model's budget is {budget_mb:.0f} MB. Send smaller inputs"
        )
        self.needed_mb = needed_mb
        self.budget_mb = budget_mb


class PromptTooLargeError(InvalidInputError):
    """A prompt exceeds a limit that is checked before tokenizing (messages, characters)."""


class InferenceError(RuntimeLayerError):
    """The backend failed while running a request that was valid."""
