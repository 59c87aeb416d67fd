"""mmict_kernels: fast M-Hub (BLIP-2 Q-Former) and demo-prefix attention for multi-modal in-context tuning.

Public API:
- ``mmict_kernels.ops``: ``hub_cross_attention``, ``hub_self_attention``, ``prefix_attention``
  (backends: CUDA C++, Triton, PyTorch reference; ``backend="auto"`` picks).
- ``FusedMHub``: drop-in for transformers' ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``;
  ``apply_mmict_kernels(model)`` swaps it into BLIP-2 / InstructBLIP models in place.
- ``mmict_kernels.modules``: ``DemoPrefixCache`` and friends (demonstrations shared as an LLM prefix).
- ``mmict_kernels.backends``: which backend runs an op, and why another was refused.
"""

__version__ = "0.1.0"

from . import backends, ops  # noqa: E402
from .backends import BackendUnavailableError  # noqa: E402


def __getattr__(name):
    # Modules pull in transformers; import them lazily so `import mmict_kernels.ops` stays light.
    if name in ("FusedMHub", "MHubOutput"):
        from .modules import mhub

        return getattr(mhub, name)
    if name == "apply_mmict_kernels":
        from .modules.mhub.swap_in import apply_mmict_kernels

        return apply_mmict_kernels
    raise AttributeError(f"module 'mmict_kernels' has no attribute {name!r}")


__all__ = ["ops", "backends", "BackendUnavailableError", "FusedMHub", "MHubOutput", "apply_mmict_kernels", "__version__"]
