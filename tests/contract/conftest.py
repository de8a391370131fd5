"""The contract tests reuse the surgery tests' helpers (``surgery_nets``, ``timm_compat``) from tests/surgery,
imported the way the tests there import them."""
import sys
from pathlib import Path

_SURGERY = str(Path(__file__).resolve().parent.parent / "surgery")
if _SURGERY not in sys.path:
    sys.path.insert(0, _SURGERY)
