"""mmict_kernels: fast M-Hub (BLIP-2 Q-Former) and demo-prefix attention for multi-modal in-context tuning.

Public API:
- ``mmict_kernels.ops``: ``hub_cross_attention``, ``hub_self_attention``, ``prefix_attention``
  (backends: CUDA C++, Triton, PyTorch reference; ``backend="auto"`` picks).
- ``FusedMHub``: drop-in for transformers' ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``.
- ``mmict_kernels.backends``: which backend runs an op, and why another was refused.
"""

__version__ = "0.1.0"

from . import backends, ops  # noqa: E402
from .backends import BackendUnavailableError  # noqa: E402


def __getattr__(name):
    # Modules pull in transformers; import them lazily so `import mmict_kernels.ops` stays light.
    if name in ("FusedMHub", "MHubOutput"):
        from .modules import fused_mhub

        return getattr(fused_mhub, name)
    raise AttributeError(f"module 'mmict_kernels' has no attribute {name!r}")


__all__ = ["ops", "backends", "BackendUnavailableError", "FusedMHub", "MHubOutput", "__version__"]
