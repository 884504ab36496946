"""quantsafe: a release gate for quantized language models.

Screens a quantized candidate against its full-precision baseline for
refusal-template drift (RTSI, paper arXiv:2606.10154). A screen, not a
certificate: see ``pytest_quantsafe.types.LIMITS_SENTENCE``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
