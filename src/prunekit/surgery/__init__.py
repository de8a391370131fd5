"""Structural surgery: find coupled channels, plan whole-channel pruning, remove the channels.

    graph = surgery.build_groups(model, x)            # which slices go together (and why not)
    plan = surgery.plan_groups(model, x, 0.5)         # a normal prunekit Plan
    prunekit.apply(masked, plan)                      # masking applier: zeros, same shapes
    slim = surgery.compact(model, plan)               # surgery applier: smaller dense model
    shapes = surgery.compact_shapes(slim)             # JSON; rebuild(model, shapes) + state_dict

The masked and the compacted model compute the same outputs.
"""
from prunekit.surgery import (
    attention,  # noqa: F401  (attention heads, timm and Hugging Face blocks)
    rules,  # noqa: F401,I001  (built-in propagation rules: registered on import)
)
from prunekit.surgery.attention import SlimMultiheadAttention
from prunekit.surgery.compact import (
    LAYER_HANDLERS,
    LayerHandler,
    check_runs,
    compact,
    compact_shapes,
    handler_for,
    rebuild,
    register_layer_handler,
    same_channels,
    slice_tensors,
)
from prunekit.surgery.criteria import AGGREGATES, group_scores, plan_groups
from prunekit.surgery.decoder import (  # decoder LLMs without fx; its block rule and handlers register on import
    DecoderStats,
    block_influence,
    compact_decoder,
    decoder_layout,
    decoder_plan,
    decoder_stats,
    plan_decoder,
    unit_members,
)
from prunekit.surgery.graph import (
    ChannelGraph,
    Group,
    Member,
    Propagation,
    Seg,
    Tag,
    TraceError,
    build_groups,
    register_block_rule,
    register_function_rule,
    register_module_rule,
)
from prunekit.surgery.rules import batchnorm_rule, consume, linear_rule, node_arg, param_name, produce

__all__ = [
    "ChannelGraph", "Group", "Member", "Propagation", "Seg", "Tag", "TraceError", "build_groups",
    "register_function_rule", "register_module_rule", "AGGREGATES", "group_scores", "plan_groups", "LAYER_HANDLERS",
    "check_runs", "compact", "compact_shapes", "handler_for", "LayerHandler", "rebuild", "register_layer_handler",
    "same_channels", "slice_tensors", "register_block_rule", "SlimMultiheadAttention",
    "batchnorm_rule", "consume", "linear_rule", "node_arg", "param_name", "produce",
    "DecoderStats", "block_influence", "compact_decoder", "decoder_layout", "decoder_plan", "decoder_stats",
    "plan_decoder", "unit_members",
]
