"""``torch.compile`` of the library's fused loops (dequantized weights, attention from KV codes), made on
first use, with an eager fallback where compiling fails."""

from __future__ import annotations

import warnings

import torch


class Compiled:
    """Calls of functions under ``torch.compile``, each compiled on its first call; if compiling fails (no C++
    compiler, an unsupported device) a warning says why, the call returns None (the caller then runs its eager
    path) and nothing is compiled again.

    Args:
        what: the words for the work in the warning.
        dynamic: ``torch.compile``'s ``dynamic`` (sizes that change every call, such as a cache's tokens).
    """

    #: graphs a compiled function may keep (every method and layer shape of a model). Raised (never lowered)
    #: in ``torch._dynamo.config`` on first use: dynamo's default, 8, would leave the others eager.
    RECOMPILE_LIMIT = 256

    def __init__(self, what: str, dynamic: bool):
        self.what, self.dynamic = what, dynamic
        self.failed: str | None = None
        self.functions: dict = {}

    def __call__(self, function, *args):
        if self.failed is not None:
            return None
        if function not in self.functions:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, self.RECOMPILE_LIMIT)
            self.functions[function] = torch.compile(function, dynamic=self.dynamic)
        try:
            return self.functions[function](*args)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError, OSError) as err:
            self.failed = f"{type(err).__name__}: {err}"
            warnings.warn(f"torch.compile of {self.what} failed; eager from now on: {err}", stacklevel=3)
            return None
