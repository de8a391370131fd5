"""The contract tests reuse the surgery tests' helpers (``surgery_nets``, ``timm_compat``) from tests/surgery,
imported the way the tests there import them; and run tiny models on one thread."""
import sys
from pathlib import Path

import pytest
import torch

_SURGERY = str(Path(__file__).resolve().parent.parent / "surgery")
if _SURGERY not in sys.path:
    sys.path.insert(0, _SURGERY)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster; on a busy machine 2 threads spin-wait (3 fine-tuning
    steps took 1 s instead of 6 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
