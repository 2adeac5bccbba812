"""Optional fused GPU kernels (Triton). Importable without Triton; ``supports()`` is then False everywhere."""

from .inception_dw import inception_dwconv, launch_counts, supports, triton_available

__all__ = ["inception_dwconv", "launch_counts", "supports", "triton_available"]
