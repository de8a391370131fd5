"""Attention heads and transformer blocks: their propagation rules and layer handlers.

A *head group* has one channel per attention head. Head ``h`` owns ``head_dim``
consecutive rows of each of the query, key and value projections and the same
columns of the output projection, so its member slices have ``inner = head_dim``
(see :class:`~prunekit.surgery.graph.Member`). Removing a head removes all of
them; the masked model computes the same outputs, because a head whose q/k/v
rows are zero contributes nothing once its output-projection columns are zero.

Covered here:

- ``nn.MultiheadAttention`` (traced as a leaf). PyTorch's implementation requires
  ``num_heads * head_dim == embed_dim``, so a compacted one becomes
  :class:`SlimMultiheadAttention`: a subclass with the same tensors and call
  signature whose forward allows fewer heads. It is the one compacted layer that
  needs prunekit to run.
- timm's ``Attention`` (ViT, DeiT; traced as a leaf): ``num_heads``/``attn_dim``
  follow the projections.
- Hugging Face BERT-style layers (``BertLayer``, ``RobertaLayer``) and
  ``nn.TransformerEncoderLayer``, by *block rules*: fx cannot trace Hugging Face
  models, so :func:`~prunekit.surgery.build_groups` falls back to declaring the
  heads and FFN neurons inside each known block.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.surgery.compact import SLIM_CLASSES, Cuts, register_layer_handler, slice_tensors
from prunekit.surgery.graph import Propagation, Seg, Tag, describe_node, register_block_rule, register_module_rule
from prunekit.surgery.rules import (
    ELEMENTWISE_MODULES,
    batchnorm_rule,
    consume,
    linear_rule,
    node_arg,
    param_name,
    produce,
)


def head_group(prop: Propagation, heads: int, head_dim: int, rows: Sequence[Tuple[str, int]],
               cols: Sequence[str]) -> int:
    """A group of ``heads`` channels: ``rows`` are (tensor, base) projections writing the heads
    (dim 0), ``cols`` the output projections reading them (dim 1)."""
    g = prop.new_group(heads)
    for name, base in rows:
        prop.add(g, name, 0, "producer", Seg(g, base=base, inner=head_dim))
    for name in cols:
        prop.add(g, name, 1, "consumer", Seg(g, inner=head_dim))
    return g


def ffn_group(prop: Propagation, up: nn.Linear, up_name: str, down_name: str) -> int:
    """Hidden neurons of a feed-forward pair: rows (and bias) of ``up``, columns of ``down``."""
    g = prop.new_group(up.out_features)
    prop.add(g, param_name(up_name, "weight"), 0, "producer")
    if up.bias is not None:
        prop.add(g, param_name(up_name, "bias"), 0, "producer")
    prop.add(g, param_name(down_name, "weight"), 1, "consumer")
    return g


# ----------------------------------------------------------------------------- nn.MultiheadAttention

def _mha_rows(name: str, m: nn.MultiheadAttention) -> List[Tuple[str, int]]:
    """(tensor, base) of the q, k, v rows: packed in in_proj_weight, or three separate weights."""
    e = m.embed_dim
    if m.in_proj_weight is not None:
        rows = [(param_name(name, "in_proj_weight"), k * e) for k in range(3)]
    else:
        rows = [(param_name(name, f"{w}_proj_weight"), 0) for w in "qkv"]
    if m.in_proj_bias is not None:
        rows += [(param_name(name, "in_proj_bias"), k * e) for k in range(3)]
    return rows


def mha_heads_fixed(m: nn.MultiheadAttention) -> Optional[str]:
    """Why the heads of ``m`` cannot be removed, or None."""
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv/add_zero_attn are not supported by head removal"
    return None


@register_module_rule(nn.MultiheadAttention)
def _mha(prop: Propagation, node: fx.Node, name: str, m: nn.MultiheadAttention) -> None:
    q, k, v = (node_arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
    # torch needs the query width to equal embed_dim (and num_heads * head_dim): keep it whole
    prop.block(prop.tag(q), f"{describe_node(prop, node)} needs its query width to stay embed_dim")
    for arg, wname in ((k, "k_proj_weight"), (v, "v_proj_weight")):
        t = prop.tag(arg)
        if t is None or arg is q:
            continue
        if m.in_proj_weight is not None or t.dim != len(prop.shape(arg)) - 1:
            prop.block(t, f"{describe_node(prop, node)} reads key/value through the packed projection")
        else:
            consume(prop, t, param_name(name, wname), 1)
    g = head_group(prop, m.num_heads, m.head_dim, _mha_rows(name, m), [param_name(name, "out_proj.weight")])
    why = mha_heads_fixed(m)
    if why:
        prop.block_group(g, f"{name}: {why}")
    prop.tuple_tags[node] = {}   # the outputs keep embed_dim channels
    return None


class SlimMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after head removal: ``num_heads * head_dim`` may be below ``embed_dim``.

    Made by :func:`prunekit.surgery.compact` (never constructed directly): same tensors
    and state_dict keys, same call signature. ``kept_heads`` are the original indices of
    the remaining heads, used to pick their slices of a per-head ``attn_mask``.
    Returned attention weights are averaged over the kept heads.
    """

    @property
    def _qkv_same_embed_dim(self) -> bool:   # noqa: D401
        # False keeps nn.TransformerEncoderLayer off its fused fast path, which assumes full width
        return False

    @_qkv_same_embed_dim.setter
    def _qkv_same_embed_dim(self, value: bool) -> None:
        pass

    def _project(self, query, key, value):
        inner = self.num_heads * self.head_dim
        if self.in_proj_weight is not None:
            wq, wk, wv = self.in_proj_weight.split(inner)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split(inner)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _mask(self, attn_mask, key_padding_mask, b: int, dtype) -> Optional[torch.Tensor]:
        """One additive float mask of shape broadcastable to (b, heads, L, S)."""
        out = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            if m.dim() == 3:   # (b * original heads, L, S): keep the rows of the kept heads
                m = m.reshape(b, -1, *m.shape[-2:])[:, list(self.kept_heads)]
            out = m
        if key_padding_mask is not None:
            kp = _additive(key_padding_mask, dtype)[:, None, None, :]
            out = kp if out is None else out + kp
        return out

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, L, S = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = (t.reshape(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self._project(query, key, value))
        mask = self._mask(attn_mask, key_padding_mask, b, q.dtype)
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif causal:
                scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


SLIM_CLASSES[SlimMultiheadAttention.__name__] = SlimMultiheadAttention


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """nn.MultiheadAttention's convention: True (bool) means *not allowed*; floats are added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _kept_heads(m: nn.MultiheadAttention, cuts: Cuts) -> List[int]:
    """Original indices of the heads the cuts keep (from the query rows)."""
    weight = "in_proj_weight" if m.in_proj_weight is not None else "q_proj_weight"
    current = list(getattr(m, "kept_heads", range(m.num_heads)))
    rows = cuts.get(weight, {}).get(0)
    if rows is None:
        return current
    inner = m.num_heads * m.head_dim
    q_rows = rows[rows < inner]
    heads = sorted({int(r) // m.head_dim for r in q_rows})
    if len(q_rows) != len(heads) * m.head_dim:
        raise PrunekitError("the plan removes part of an attention head; heads go whole (use plan_groups)")
    return [current[h] for h in heads]


_MHA_CUTS = {"in_proj_weight": {0}, "in_proj_bias": {0}, "q_proj_weight": {0},
             "k_proj_weight": {0, 1}, "v_proj_weight": {0, 1}}


@register_layer_handler(nn.MultiheadAttention,
                        attrs=("num_heads", "head_dim", "kdim", "vdim", "kept_heads"))
def _mha_handler(m: nn.MultiheadAttention, cuts: Cuts) -> None:
    for attr, dims in cuts.items():
        if not set(dims) <= _MHA_CUTS.get(attr, set()):
            raise PrunekitError(f"nn.MultiheadAttention cannot lose slices of {attr} along dims {sorted(dims)}: "
                             "it keeps its query width (embed_dim); heads and key/value inputs can go")
    why = mha_heads_fixed(m)
    if why and any(0 in dims for dims in cuts.values()):
        raise PrunekitError(f"cannot remove heads: {why}")
    kept = _kept_heads(m, cuts)
    slice_tensors(m, cuts)
    m.__class__ = SlimMultiheadAttention
    m.num_heads, m.kept_heads = len(kept), kept
    if m.k_proj_weight is not None:
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]


# ----------------------------------------------------------------------------- timm

_TIMM_ATTENTION = "timm.layers.attention.Attention"


def _qkv_input(prop: Propagation, node: fx.Node, name: str) -> Tuple[Optional[Tag], int]:
    """(tag, last dim) of a timm attention's input, read by its qkv projection over the last dim."""
    x = node.args[0]
    t, last = prop.tag(x), len(prop.shape(x)) - 1
    if t is not None and t.dim != last:
        prop.block(t, f"{describe_node(prop, node)} reads features from the last dim")
        t = None
    consume(prop, t, param_name(name, "qkv.weight"), 1)
    return t, last


@register_module_rule(_TIMM_ATTENTION)
def _timm_attention(prop: Propagation, node: fx.Node, name: str, m: nn.Module) -> Tag:
    t, last = _qkv_input(prop, node, name)
    gate = getattr(m, "gate", None)
    if gate is not None:
        consume(prop, t, param_name(name, "gate.weight"), 1)
    a, hd = m.attn_dim, m.head_dim
    rows = [(param_name(name, "qkv.weight"), k * a) for k in range(3)]
    rows += [(param_name(name, "qkv.bias"), k * a) for k in range(3)] if m.qkv.bias is not None else []
    if gate is not None:
        rows += [(param_name(name, "gate.weight"), 0)]
        rows += [(param_name(name, "gate.bias"), 0)] if gate.bias is not None else []
    g = head_group(prop, m.num_heads, hd, rows, [param_name(name, "proj.weight")])
    _timm_scale_norm(prop, g, name, m)
    return produce(prop, param_name(name, "proj"), m.proj, m.proj.out_features, last)


def _timm_scale_norm(prop: Propagation, g: int, name: str, m: nn.Module) -> None:
    """``scale_norm`` normalises over all heads' outputs: a per-head slice, and not exact."""
    norm = getattr(m, "norm", None)
    if norm is None or isinstance(norm, nn.Identity):
        return
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
        prop.block_group(g, f"{name}.norm ({type(norm).__name__}) over the heads is not supported")
        return
    for attr in ("weight", "bias"):
        if getattr(norm, attr, None) is not None:
            prop.add(g, param_name(name, f"norm.{attr}"), 0, "channelwise", Seg(g, inner=m.head_dim))
    prop.group(g).exact = False


@register_layer_handler(_TIMM_ATTENTION, attrs=("num_heads", "attn_dim"), refresh=True)
def _timm_attention_handler(m: nn.Module, cuts: Cuts) -> None:
    m.num_heads = m.qkv.out_features // (3 * m.head_dim)
    m.attn_dim = m.num_heads * m.head_dim
    if not isinstance(getattr(m, "norm", None), (type(None), nn.Identity)):
        m.norm.normalized_shape = (m.attn_dim,)


_TIMM_WINDOW_ATTENTION = "timm.models.swin_transformer.WindowAttention"


@register_module_rule(_TIMM_WINDOW_ATTENTION)
def _timm_window_attention(prop: Propagation, node: fx.Node, name: str, m: nn.Module) -> Tag:
    """Swin's window attention: heads as in ViT's, plus each head's column of the relative-position bias
    table (indexed per window position, one column per head)."""
    _, last = _qkv_input(prop, node, name)
    a = m.qkv.out_features // 3
    rows = [(param_name(name, "qkv.weight"), k * a) for k in range(3)]
    rows += [(param_name(name, "qkv.bias"), k * a) for k in range(3)] if m.qkv.bias is not None else []
    g = head_group(prop, m.num_heads, a // m.num_heads, rows, [param_name(name, "proj.weight")])
    prop.add(g, param_name(name, "relative_position_bias_table"), 1, "channelwise", Seg(g))
    return produce(prop, param_name(name, "proj"), m.proj, m.proj.out_features, last)


@register_layer_handler(_TIMM_WINDOW_ATTENTION, attrs=("num_heads",), refresh=True)
def _timm_window_attention_handler(m: nn.Module, cuts: Cuts) -> None:
    slice_tensors(m, cuts)   # the bias table's columns (its qkv / proj are sliced by their own handlers)
    m.num_heads = m.relative_position_bias_table.shape[1]


_TIMM_NORM_ACT = "timm.layers.norm_act.BatchNormAct2d"


@register_module_rule(_TIMM_NORM_ACT)
def _timm_bn_act(prop: Propagation, node: fx.Node, name: str, m: nn.Module) -> Optional[Tag]:
    """timm's BatchNorm + activation in one module: a BatchNorm, then elementwise ops."""
    for part in ("drop", "act"):
        sub = getattr(m, part, None)
        if sub is not None and not isinstance(sub, ELEMENTWISE_MODULES):
            prop.block(prop.tag(node.args[0]), f"{name}.{part} ({type(sub).__name__}) is not elementwise")
            return None
    return batchnorm_rule(prop, node, name, m)


@register_module_rule("timm.layers.linear.Linear")
def _timm_linear(prop: Propagation, node: fx.Node, name: str, m: nn.Linear) -> Tag:
    """timm's Linear only adds a TorchScript cast to nn.Linear's forward."""
    return linear_rule(prop, node, name, m)


@register_module_rule("timm.layers.drop.DropPath")
def _timm_drop_path(prop: Propagation, node: fx.Node, name: str, m: nn.Module) -> Optional[Tag]:
    """Stochastic depth: the identity in eval; in training each sample is zeroed or scaled whole, never one
    channel against another, so channels pass through exactly in both modes."""
    return prop.passthrough(node, node.args[0])


# ----------------------------------------------------------------------------- block rules

@register_block_rule(nn.TransformerEncoderLayer)
def _encoder_layer(prop: Propagation, name: str, m: nn.TransformerEncoderLayer) -> None:
    attn = m.self_attn
    g = head_group(prop, attn.num_heads, attn.head_dim, _mha_rows(param_name(name, "self_attn"), attn),
                   [param_name(name, "self_attn.out_proj.weight")])
    why = mha_heads_fixed(attn)
    if why:
        prop.block_group(g, f"{name}.self_attn: {why}")
    ffn_group(prop, m.linear1, param_name(name, "linear1"), param_name(name, "linear2"))


def _bert_like(m: nn.Module) -> bool:
    try:
        s = m.attention.self
        parts = (s.query, s.key, s.value, m.attention.output.dense, m.intermediate.dense, m.output.dense)
    except AttributeError:
        return False
    return all(isinstance(p, nn.Linear) for p in parts) and hasattr(s, "attention_head_size")


_BERT_LAYERS = ("transformers.models.bert.modeling_bert.BertLayer",
                "transformers.models.roberta.modeling_roberta.RobertaLayer")
_BERT_SELF = ("transformers.models.bert.modeling_bert.BertSelfAttention",
              "transformers.models.roberta.modeling_roberta.RobertaSelfAttention")


@register_block_rule(*_BERT_LAYERS)
def _bert_layer(prop: Propagation, name: str, m: nn.Module) -> None:
    if not _bert_like(m):
        return
    s, sname = m.attention.self, param_name(name, "attention.self")
    rows = []
    for proj in ("query", "key", "value"):
        rows.append((param_name(sname, f"{proj}.weight"), 0))
        if getattr(s, proj).bias is not None:
            rows.append((param_name(sname, f"{proj}.bias"), 0))
    head_group(prop, s.num_attention_heads, s.attention_head_size, rows,
               [param_name(name, "attention.output.dense.weight")])
    ffn_group(prop, m.intermediate.dense, param_name(name, "intermediate.dense"), param_name(name, "output.dense"))


@register_layer_handler(*_BERT_SELF, attrs=("num_attention_heads", "all_head_size"), refresh=True)
def _bert_self_handler(m: nn.Module, cuts: Cuts) -> None:
    m.all_head_size = m.query.out_features
    m.num_attention_heads = m.all_head_size // m.attention_head_size
