"""DEPLOY: make the pruned model really smaller and faster, and ship it.

- :mod:`~prunekit.deploy.io`: ``save`` / ``load`` (safetensors + a validated JSON spec, never pickle);
- :mod:`~prunekit.deploy.compress`: compressed storage of sparse tensors (bitmask, CSR);
- :mod:`~prunekit.deploy.sparse`: ``to_sparse``, sparse CPU kernels where measured faster;
- :mod:`~prunekit.deploy.native`: prunekit's C kernel, compiled on first use;
- :mod:`~prunekit.deploy.export`: ONNX export and onnxruntime latency.
"""
from prunekit.deploy.io import load, save
from prunekit.deploy.sparse import SparseConv2d, SparseLinear, measure_break_even, to_dense, to_sparse

__all__ = ["load", "save", "SparseConv2d", "SparseLinear", "measure_break_even", "to_dense", "to_sparse"]
