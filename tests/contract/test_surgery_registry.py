"""Contract tests over the surgery registries (timm style): every registered op rule and layer handler
is exercised in a tiny network, and its masked and compacted versions must compute the same outputs.

Registries, enumerated at collection time:

- ``MODULE_RULES``, ``BLOCK_RULES`` (prunekit/surgery/graph.py) and ``LAYER_HANDLERS``
  (prunekit/surgery/compact.py), all keyed by ``"module.QualName"``: one case table, ``CASES``;
- ``FUNCTION_RULES`` (keyed by the function) and ``METHOD_RULES`` (keyed by the tensor method name):
  ``FUNCTION_CASES`` and ``METHOD_CASES``, tiny functional modules that call the op.

A registered key without a case fails (``test_every_registered_*_has_a_case``), so a new rule or handler
comes with its tiny network. Each case names the tensors the plan must cut: those are only prunable when
the rule lets the channels through (or produces them), so a rule that silently blocks fails too.
"""
from __future__ import annotations

import copy
import json
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import surgery_nets as nets
import torch
import torch.nn.functional as F
from timm_compat import import_timm
from torch import nn

from prunekit.apply import masking
from prunekit.errors import PrunekitError
from prunekit.plan import Plan
from prunekit.surgery import LAYER_HANDLERS, compact, compact_shapes, plan_groups, rebuild
from prunekit.surgery.graph import BLOCK_RULES, FUNCTION_RULES, METHOD_RULES, MODULE_RULES, trace, type_key

AMOUNT = 0.5
ATOL = 1e-5



# ----------------------------------------------------------------------------- building blocks

@dataclass
class Case:
    """A tiny network around one registered type or op, and what its plan must cut."""

    model: nn.Module
    inputs: Tuple[Any, ...]
    cut: Sequence[str]                      # tensors the plan must prune (proof the rule let channels through)
    plan_kw: Dict[str, Any] = field(default_factory=dict)
    # expected compacted output when the rule is documented as inexact (then masked != compacted by design)
    reference: Optional[Callable[[nn.Module, Plan, Tuple[Any, ...]], torch.Tensor]] = None


class Net(nn.Module):
    """``op(self, x)`` over the given submodules: a functional network written inline."""

    def __init__(self, op: Callable, **modules: nn.Module):
        super().__init__()
        self.op = op
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, x):
        return self.op(self, x)


_INPUT = {0: (4, 6), 1: (2, 3, 8), 2: (2, 3, 6, 6), 3: (2, 3, 4, 4, 4)}   # Linear, Conv1d, Conv2d, Conv3d inputs
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pair(nd: int, width: int = 8) -> Tuple[nn.Module, nn.Module]:
    """A producer of ``width`` channels and a consumer of them, for inputs of ``_INPUT[nd]``."""
    if nd == 0:
        return nn.Linear(6, width), nn.Linear(width, 3)
    return _CONV[nd](3, width, 3, padding=1), _CONV[nd](width, 4, 1)


def _seeded(fn: Callable[[], Case]) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        case = fn()
        nets.randomize_bn(case.model)
        case.model.eval()
        return case
    return build


def sandwich(nd: int, mid: Callable[[], nn.Module], cut_mid: bool = False) -> Callable[[], Case]:
    """producer ``a`` -> ``mid`` -> consumer ``b``: ``a``'s channels cross ``mid`` (and ``mid.weight`` is cut
    along with them when it is per-channel)."""
    def build() -> Case:
        a, b = _pair(nd)
        model = nn.Sequential(OrderedDict(a=a, mid=mid(), b=b))
        return Case(model, (_x(_INPUT[nd]),), ["a.weight", "b.weight"] + (["mid.weight"] if cut_mid else []))
    return _seeded(build)


def prunable(nd: int, make: Callable[..., nn.Module]) -> Callable[[], Case]:
    """The type itself as producer and consumer: ``make(cin, cout)`` -> ReLU -> ``make(cout, cout2)``."""
    def build() -> Case:
        cin = 6 if nd == 0 else 3
        model = nn.Sequential(OrderedDict(a=make(cin, 8), act=nn.ReLU(), b=make(8, 4)))
        return Case(model, (_x(_INPUT[nd]),), ["a.weight", "b.weight"])
    return _seeded(build)


def around(nd: int, fn: Callable[[torch.Tensor], torch.Tensor], consumer: Optional[Callable[[], nn.Module]] = None,
           shape: Optional[Tuple[int, ...]] = None, producer: Optional[Callable[[], nn.Module]] = None):
    """``b(fn(a(x)))``: ``a``'s channels cross the op ``fn`` into ``b``."""
    def build() -> Case:
        a, b = _pair(nd)
        a = producer() if producer else a
        b = consumer() if consumer else b
        model = Net(lambda m, x: m.b(fn(m.a(x))), a=a, b=b)
        return Case(model, (_x(shape or _INPUT[nd]),), ["a.weight", "b.weight"])
    return _seeded(build)


def joined(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], width_out: int = 8):
    """``c(fn(a(x), b(x)))`` on conv features: two producers whose channels the op combines."""
    def build() -> Case:
        model = Net(lambda m, x: m.c(fn(m.a(x), m.b(x))), a=nn.Conv2d(3, 8, 3, padding=1),
                    b=nn.Conv2d(3, 8, 3, padding=1), c=nn.Conv2d(width_out, 4, 1))
        return Case(model, (_x(_INPUT[2]),), ["a.weight", "b.weight", "c.weight"])
    return _seeded(build)


def _timm():
    timm = import_timm()
    if timm is None:
        pytest.skip("timm not installed")
    return timm


# ----------------------------------------------------------------------------- module rules and layer handlers

@_seeded
def _grouped_conv() -> Case:
    """A grouped conv (groups=2) between 1x1 convs: whole conv-groups go with their input channels."""
    model = nn.Sequential(OrderedDict(a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 8, 3, padding=1, groups=2),
                                      act=nn.ReLU(), b=nn.Conv2d(8, 4, 1)))
    return Case(model, (_x(_INPUT[2]),), ["a.weight", "g.weight", "b.weight"])


@_seeded
def _depthwise_conv() -> Case:
    model = nn.Sequential(OrderedDict(a=nn.Conv2d(3, 8, 1), dw=nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                      act=nn.ReLU(), b=nn.Conv2d(8, 4, 1)))
    return Case(model, (_x(_INPUT[2]),), ["a.weight", "dw.weight", "b.weight"])


@_seeded
def _flatten() -> Case:
    model = nn.Sequential(OrderedDict(a=nn.Conv2d(3, 8, 3, padding=1), mid=nn.Flatten(), b=nn.Linear(8 * 16, 3)))
    return Case(model, (_x((2, 3, 4, 4)),), ["a.weight", "b.weight"])


def _layernorm_reference(model: nn.Module, plan: Plan, inputs) -> torch.Tensor:
    """LayerNorm over the kept channels only: what removing channels from its normalised dim means."""
    pruned = set(plan.tensors["a.weight"].pruned_idx)
    keep = torch.tensor([c for c in range(model.a.out_features) if c not in pruned])
    ln = model.ln
    h = F.linear(inputs[0], model.a.weight[keep], model.a.bias[keep])
    h = F.layer_norm(h, (len(keep),), ln.weight[keep], ln.bias[keep], ln.eps)
    return F.linear(h, model.b.weight[:, keep], model.b.bias)


def _functional_layernorm(fn: Callable) -> Callable[[], Case]:
    """A LayerNorm module's parameters used through the function (timm's LayerNorm2d): as the module, inexact."""
    def build() -> Case:
        model = Net(lambda m, x: m.b(fn(m.a(x), m.ln.normalized_shape, m.ln.weight, m.ln.bias, m.ln.eps)),
                    a=nn.Linear(6, 8), ln=nn.LayerNorm(8), b=nn.Linear(8, 3))
        with torch.no_grad():
            model.ln.weight.normal_()
            model.ln.bias.normal_()
        return Case(model, (_x(_INPUT[0]),), ["a.weight", "ln.weight", "b.weight"], plan_kw={"exact": False},
                    reference=_layernorm_reference)
    return _seeded(build)


def _rmsnorm_reference(model: nn.Module, plan: Plan, inputs) -> torch.Tensor:
    """RMSNorm over the kept channels only."""
    pruned = set(plan.tensors["a.weight"].pruned_idx)
    keep = torch.tensor([c for c in range(model.a.out_features) if c not in pruned])
    h = F.linear(inputs[0], model.a.weight[keep], model.a.bias[keep])
    h = F.rms_norm(h, (len(keep),), model.ln.weight[keep], model.ln.eps)
    return F.linear(h, model.b.weight[:, keep], model.b.bias)


@_seeded
def _rmsnorm_over_channels() -> Case:
    """RMSNorm (Llama's norm) over the channels: inexact like LayerNorm, its weight sliced."""
    model = Net(lambda m, x: m.b(m.ln(m.a(x))), a=nn.Linear(6, 8), ln=nn.RMSNorm(8, eps=1e-6), b=nn.Linear(8, 3))
    with torch.no_grad():
        model.ln.weight.normal_()
    return Case(model, (_x(_INPUT[0]),), ["a.weight", "ln.weight", "b.weight"], plan_kw={"exact": False},
                reference=_rmsnorm_reference)


@_seeded
def _layernorm_over_channels() -> Case:
    """exact=False: the statistics change with the channels, so compare with a hand-sliced LayerNorm."""
    model = Net(lambda m, x: m.b(m.ln(m.a(x))), a=nn.Linear(6, 8), ln=nn.LayerNorm(8), b=nn.Linear(8, 3))
    with torch.no_grad():
        model.ln.weight.normal_()
        model.ln.bias.normal_()
    return Case(model, (_x(_INPUT[0]),), ["a.weight", "ln.weight", "b.weight"], plan_kw={"exact": False},
                reference=_layernorm_reference)


@_seeded
def _layernorm_other_dim() -> Case:
    """A LayerNorm over positions, not channels: the channels pass through, exactly."""
    model = nn.Sequential(OrderedDict(a=nn.Conv1d(3, 8, 3, padding=1), ln=nn.LayerNorm(8), b=nn.Conv1d(8, 4, 1)))
    return Case(model, (_x(_INPUT[1]),), ["a.weight", "b.weight"])


@_seeded
def _mha() -> Case:
    model = Net(lambda m, x: m.head(m.attn(m.emb(x), m.emb(x), m.emb(x), need_weights=False)[0]),
                emb=nn.Linear(6, 16), attn=nn.MultiheadAttention(16, 4, batch_first=True), head=nn.Linear(16, 3))
    return Case(model, (_x((2, 5, 6)),), ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"])


@_seeded
def _mha_kv_dims() -> Case:
    """Separate key/value widths: the key and value producers' channels are consumed by k/v projections."""
    def op(m, x):
        q, k, v = m.q(x), m.k(x), m.v(x)
        return m.head(m.attn(q, k, v, need_weights=True)[0])
    model = Net(op, q=nn.Linear(6, 16), k=nn.Linear(6, 10), v=nn.Linear(6, 12),
                attn=nn.MultiheadAttention(16, 4, kdim=10, vdim=12, batch_first=True), head=nn.Linear(16, 3))
    return Case(model, (_x((2, 5, 6)),), ["k.weight", "v.weight", "attn.q_proj_weight", "attn.k_proj_weight",
                                          "attn.v_proj_weight", "attn.out_proj.weight"])


@_seeded
def _transformer_encoder_layer() -> Case:
    """A block rule inside an otherwise traced model (fx keeps the layer as a leaf)."""
    model = nn.Sequential(OrderedDict(emb=nn.Linear(6, 16),
                                      layer=nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True),
                                      head=nn.Linear(16, 3)))
    return Case(model, (_x((2, 5, 6)),), ["layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight",
                                          "layer.linear1.weight", "layer.linear2.weight"])


def _timm_attention() -> Case:
    from timm.layers.attention import Attention
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(6, 16), attn=Attention(16, num_heads=4, qkv_bias=True),
                                      b=nn.Linear(16, 3))).eval()
    return Case(model, (_x((2, 5, 6)),), ["a.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                                          "b.weight"])


def _timm_window_attention() -> Case:
    """Swin's window attention: heads with their relative-position bias columns; the input width as ViT's."""
    from timm.models.swin_transformer import WindowAttention
    torch.manual_seed(0)
    attn = WindowAttention(16, num_heads=4, window_size=2, qkv_bias=True)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()   # timm starts it near zero: make each head's column count
    model = nn.Sequential(OrderedDict(a=nn.Linear(6, 16), attn=attn, b=nn.Linear(16, 3))).eval()
    return Case(model, (_x((2, 4, 6)),), ["a.weight", "attn.qkv.weight", "attn.relative_position_bias_table",
                                          "attn.proj.weight", "b.weight"])


def _timm_drop_path() -> Case:
    """Stochastic depth (a residual branch dropped per sample in training): the identity in eval."""
    from timm.layers.drop import DropPath
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Conv2d(3, 8, 3, padding=1), drop=DropPath(0.3), b=nn.Conv2d(8, 4, 1)))
    return Case(model.eval(), (_x(_INPUT[2]),), ["a.weight", "b.weight"])


def _timm_attention_scale_norm() -> Case:
    """scale_norm: a LayerNorm over all heads' outputs, inexact (exact=False); the heads still go whole."""
    from timm.layers.attention import Attention
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm)
    with torch.no_grad():
        attn.norm.weight.normal_()
        attn.norm.bias.normal_()
    model = nn.Sequential(OrderedDict(a=nn.Linear(6, 16), attn=attn, b=nn.Linear(16, 3))).eval()
    return Case(model, (_x((2, 5, 6)),), ["attn.qkv.weight", "attn.norm.weight", "attn.proj.weight"],
                plan_kw={"exact": False}, reference=_timm_scale_norm_reference)


def _timm_scale_norm_reference(model: nn.Module, plan: Plan, inputs) -> torch.Tensor:
    """The masked model (removed rows are zeros there) with the heads' LayerNorm over the kept heads only."""
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    attn, hd = masked.attn, masked.attn.head_dim
    q_rows = [tp for tp in plan.tensors.values() if tp.name == "attn.qkv.weight" and tp.dim == 0][0].pruned_idx
    kept = [h for h in range(attn.num_heads) if h * hd not in set(q_rows)]
    cols = torch.tensor([h * hd + i for h in kept for i in range(hd)])
    with torch.no_grad():
        x = masked.a(inputs[0])
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = (t[:, kept] for t in qkv.unbind(0))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, len(kept) * hd)
        out = F.layer_norm(out, (out.shape[-1],), attn.norm.weight[cols], attn.norm.bias[cols], attn.norm.eps)
        return masked.b(F.linear(out, attn.proj.weight[:, cols], attn.proj.bias))


def _timm_attention_gated() -> Case:
    """gated=True: the gate's rows belong to the heads and its columns read the input channels."""
    from timm.layers.attention import Attention
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(6, 16), attn=Attention(16, num_heads=4, gated=True, qkv_bias=True),
                                      b=nn.Linear(16, 3))).eval()
    return Case(model, (_x((2, 5, 6)),), ["a.weight", "attn.qkv.weight", "attn.gate.weight", "attn.gate.bias",
                                          "attn.proj.weight"])


def _timm_bn_act() -> Case:
    from timm.layers.norm_act import BatchNormAct2d
    return sandwich(2, lambda: BatchNormAct2d(8), cut_mid=True)()


def _timm_linear() -> Case:
    from timm.layers.linear import Linear
    return prunable(0, Linear)()


def _hf(kind: str) -> Case:
    """A one-layer Hugging Face encoder: fx cannot trace it, so the block rules declare its heads and FFN."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                  max_position_embeddings=20)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
    else:
        model = transformers.RobertaModel(transformers.RobertaConfig(pad_token_id=1, **common))
    ids = torch.randint(2, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    layer = "encoder.layer.0."
    cut = ["attention.self.query.weight", "attention.self.key.bias", "attention.output.dense.weight",
           "intermediate.dense.weight", "output.dense.weight"]
    return Case(model.eval(), (ids, mask), [layer + n for n in cut])


def _hf_decoder(arch: str) -> Case:
    """A one-layer Hugging Face decoder (GQA: 4 query / 2 KV heads): its block rule declares KV groups and FFN
    neurons (prunekit.surgery.decoder), with no fx."""
    pytest.importorskip("transformers")
    from prunekit.zoo.llm import tiny_decoder

    model = tiny_decoder(arch, num_hidden_layers=1)   # the *Model sits at .model: a named module, as registered
    ids = torch.randint(2, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    cut = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    return Case(_LastHidden(model.eval()), (ids, mask), ["lm.model.layers.0." + n for n in cut])


class _LastHidden(nn.Module):
    """A causal LM's last hidden states (what the contract compares), its decoder still at ``lm.model``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids, mask):
        return self.lm.model(input_ids=ids, attention_mask=mask).last_hidden_state


_T = "torch.nn.modules."
_BERT, _ROBERTA = "transformers.models.bert.modeling_bert.", "transformers.models.roberta.modeling_roberta."

# registry key -> factories of tiny networks containing that type (several: several code paths of one rule;
# for a layer handler the first one must make the handler slice something)
CASES: Dict[str, List[Callable[[], Case]]] = {
    # producers/consumers: the type itself is the pruned layer
    _T + "linear.Linear": [prunable(0, nn.Linear)],
    _T + "conv.Conv1d": [prunable(1, lambda i, o: nn.Conv1d(i, o, 3, padding=1))],
    _T + "conv.Conv2d": [prunable(2, lambda i, o: nn.Conv2d(i, o, 3, padding=1)), _grouped_conv, _depthwise_conv],
    _T + "conv.Conv3d": [prunable(3, lambda i, o: nn.Conv3d(i, o, 3, padding=1))],
    # per-channel layers: sliced along with the producer
    _T + "batchnorm.BatchNorm1d": [sandwich(0, lambda: nn.BatchNorm1d(8), cut_mid=True)],
    _T + "batchnorm.BatchNorm2d": [sandwich(2, lambda: nn.BatchNorm2d(8), cut_mid=True)],
    _T + "batchnorm.BatchNorm3d": [sandwich(3, lambda: nn.BatchNorm3d(8), cut_mid=True)],
    _T + "normalization.GroupNorm": [sandwich(2, lambda: nn.GroupNorm(4, 8), cut_mid=True)],
    _T + "normalization.LayerNorm": [_layernorm_over_channels, _layernorm_other_dim],
    _T + "normalization.RMSNorm": [_rmsnorm_over_channels],
    _T + "activation.PReLU": [sandwich(2, lambda: nn.PReLU(8), cut_mid=True), sandwich(2, lambda: nn.PReLU())],
    _T + "flatten.Flatten": [_flatten],
    # elementwise: channels pass through
    _T + "activation.ReLU": [sandwich(0, nn.ReLU)],
    _T + "activation.ReLU6": [sandwich(0, nn.ReLU6)],
    _T + "activation.LeakyReLU": [sandwich(0, nn.LeakyReLU)],
    _T + "activation.GELU": [sandwich(0, nn.GELU)],
    _T + "activation.SiLU": [sandwich(0, nn.SiLU)],
    _T + "activation.Sigmoid": [sandwich(0, nn.Sigmoid)],
    _T + "activation.Tanh": [sandwich(0, nn.Tanh)],
    _T + "activation.Hardswish": [sandwich(0, nn.Hardswish)],
    _T + "activation.Hardsigmoid": [sandwich(0, nn.Hardsigmoid)],
    _T + "activation.Hardtanh": [sandwich(0, nn.Hardtanh)],
    _T + "activation.ELU": [sandwich(0, nn.ELU)],
    _T + "activation.SELU": [sandwich(0, nn.SELU)],
    _T + "activation.CELU": [sandwich(0, nn.CELU)],
    _T + "activation.Mish": [sandwich(0, nn.Mish)],
    _T + "activation.Softplus": [sandwich(0, nn.Softplus)],
    _T + "linear.Identity": [sandwich(0, nn.Identity)],
    _T + "dropout.Dropout": [sandwich(0, lambda: nn.Dropout(0.5))],
    _T + "dropout.AlphaDropout": [sandwich(0, lambda: nn.AlphaDropout(0.5))],
    _T + "dropout.Dropout1d": [sandwich(1, lambda: nn.Dropout1d(0.5))],
    _T + "dropout.Dropout2d": [sandwich(2, lambda: nn.Dropout2d(0.5))],
    _T + "dropout.Dropout3d": [sandwich(3, lambda: nn.Dropout3d(0.5))],
    _T + "pooling.MaxPool1d": [sandwich(1, lambda: nn.MaxPool1d(2))],
    _T + "pooling.MaxPool2d": [sandwich(2, lambda: nn.MaxPool2d(2))],
    _T + "pooling.MaxPool3d": [sandwich(3, lambda: nn.MaxPool3d(2))],
    _T + "pooling.AvgPool1d": [sandwich(1, lambda: nn.AvgPool1d(2))],
    _T + "pooling.AvgPool2d": [sandwich(2, lambda: nn.AvgPool2d(2))],
    _T + "pooling.AvgPool3d": [sandwich(3, lambda: nn.AvgPool3d(2))],
    _T + "pooling.AdaptiveAvgPool1d": [sandwich(1, lambda: nn.AdaptiveAvgPool1d(3))],
    _T + "pooling.AdaptiveAvgPool2d": [sandwich(2, lambda: nn.AdaptiveAvgPool2d(3))],
    _T + "pooling.AdaptiveAvgPool3d": [sandwich(3, lambda: nn.AdaptiveAvgPool3d(2))],
    _T + "pooling.AdaptiveMaxPool1d": [sandwich(1, lambda: nn.AdaptiveMaxPool1d(3))],
    _T + "pooling.AdaptiveMaxPool2d": [sandwich(2, lambda: nn.AdaptiveMaxPool2d(3))],
    _T + "pooling.AdaptiveMaxPool3d": [sandwich(3, lambda: nn.AdaptiveMaxPool3d(2))],
    _T + "upsampling.Upsample": [sandwich(2, lambda: nn.Upsample(scale_factor=2))],
    # attention
    _T + "activation.MultiheadAttention": [_mha, _mha_kv_dims],
    _T + "transformer.TransformerEncoderLayer": [_transformer_encoder_layer],
    # optional libraries (registered by name, imported only here)
    "timm.layers.attention.Attention": [_timm_attention, _timm_attention_gated, _timm_attention_scale_norm],
    "timm.layers.norm_act.BatchNormAct2d": [_timm_bn_act],
    "timm.models.swin_transformer.WindowAttention": [_timm_window_attention],
    "timm.layers.drop.DropPath": [_timm_drop_path],
    "timm.layers.linear.Linear": [_timm_linear],
    _BERT + "BertLayer": [lambda: _hf("bert")],
    _BERT + "BertSelfAttention": [lambda: _hf("bert")],
    _ROBERTA + "RobertaLayer": [lambda: _hf("roberta")],
    _ROBERTA + "RobertaSelfAttention": [lambda: _hf("roberta")],
    **{f"transformers.models.{arch}.modeling_{arch}.{cls}{part}": [lambda arch=arch: _hf_decoder(arch)]
       for arch, cls in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"))
       for part in ("Attention", "DecoderLayer", "MLP", "Model")},
}
_TIMM_KEYS = {k for k in CASES if k.startswith("timm.")}


# The registries as prunekit fills them, read once at collection time: tests elsewhere register throwaway
# rules while they run (test_surgery_plan.Scale), which are not prunekit's to cover.
REGISTERED_TYPES = sorted(set(MODULE_RULES.names()) | set(LAYER_HANDLERS.names()) | set(BLOCK_RULES.names()))
REGISTERED_FUNCTIONS = list(FUNCTION_RULES)
REGISTERED_METHODS = sorted(METHOD_RULES)


def _short(key: str) -> str:
    return key.replace(_T, "nn.").replace("transformers.models.", "hf.")


def _type_cases():
    out = []
    for key in REGISTERED_TYPES:
        for i in range(max(1, len(CASES.get(key, ())))):
            out.append(pytest.param(key, i, id=f"{_short(key)}-{i}"))
    return out


# ----------------------------------------------------------------------------- the contract

def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _out(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        y = model(*inputs)
    return getattr(y, "last_hidden_state", y)


def _cut_tensors(plan: Plan) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for tp in plan.tensors.values():
        out[tp.name] = out.get(tp.name, 0) + tp.pruned_units
    return {n: k for n, k in out.items() if k}


def check_contract(case: Case) -> Tuple[Plan, nn.Module]:
    """plan_groups + compact: (a) masked == compacted outputs (eval), (b) fewer parameters, (c) same output
    shapes; and the slim architecture rebuilds from its JSON shapes (the handlers' ``attrs`` are complete)."""
    model, inputs = case.model.eval(), case.inputs
    before = copy.deepcopy(model.state_dict())
    plan = plan_groups(model, inputs, AMOUNT, **case.plan_kw)
    cut = _cut_tensors(plan)
    missing = [n for n in case.cut if n not in cut]
    assert not missing, f"the plan does not cut {missing} (cut: {sorted(cut)}); notes:\n" + "\n".join(plan.notes)

    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=inputs)
    assert all(not m.training for m in slim.modules())
    want, got = _out(model, inputs), _out(slim, inputs)
    assert got.shape == want.shape, "compaction changed the output shape"
    expected = _out(masked, inputs) if case.reference is None else case.reference(model, plan, inputs)
    assert torch.allclose(got, expected, atol=ATOL), f"max diff {(got - expected).abs().max()}"
    if case.reference is None and all(torch.is_floating_point(t) for t in inputs):
        other = tuple(_x(t.shape, seed=1) for t in inputs)   # not just the traced example
        assert torch.allclose(_out(slim, other), _out(masked, other), atol=ATOL)
    assert _nparams(slim) < _nparams(model), "the plan cut tensors but the model did not shrink"
    assert not masking.is_masked(slim)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "compact changed the input model"

    rebuilt = rebuild(copy.deepcopy(model), json.loads(json.dumps(compact_shapes(slim))))
    rebuilt.load_state_dict(slim.state_dict())
    rebuilt.eval()
    assert torch.allclose(_out(rebuilt, inputs), got, atol=1e-6), "rebuild(compact_shapes) differs from the slim model"
    return plan, slim


def _modules_of(model: nn.Module, key: str) -> List[str]:
    return [n for n, m in model.named_modules() if type_key(type(m)) == key]


@pytest.mark.parametrize("key,variant", _type_cases())
def test_registered_type_masked_and_compacted_agree(key, variant):
    assert key in CASES, (f"{key} is registered (module rule, block rule or layer handler) but has no tiny "
                          "network in tests/contract/test_surgery_registry.py CASES: add one")
    if key in _TIMM_KEYS:
        _timm()
    case = CASES[key][variant]()
    owners = _modules_of(case.model, key)
    assert owners, f"the case for {key} does not contain that type"
    plan, _ = check_contract(case)
    if key in MODULE_RULES:  # the rule was consulted: fx kept the type as a leaf and saw a call of it
        gm = trace(case.model)
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        assert called & set(owners), f"no call of {key} in the traced graph"
    if key in LAYER_HANDLERS and variant == 0:  # the handler ran: the plan cuts tensors of (or inside) one
        cut = _cut_tensors(plan)
        assert any(n.startswith(f"{o}.") for o in owners for n in cut), f"the plan cuts nothing in a {key}"
    if key in BLOCK_RULES:
        assert any(n.startswith(f"{o}.") for o in owners for n in _cut_tensors(plan)), f"no group inside the {key}"


def test_every_registered_type_has_a_case():
    missing = [k for k in REGISTERED_TYPES if k not in CASES]
    assert not missing, f"registered types without a tiny network in CASES: {missing}"


# ----------------------------------------------------------------------------- function rules

def stochastic_depth(input, p: float, mode: str, training: bool = True):   # noqa: A002 (torchvision's signature)
    """Stands in for torchvision.ops.stochastic_depth (which cannot be installed here): fx-wrapped like it."""
    return input


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


def _fn_id(fn) -> str:
    module = (getattr(fn, "__module__", None) or "").replace("_operator", "operator")
    return f"{module}.{getattr(fn, '__name__', repr(fn))}"


_L = 0  # Linear features
_C2 = 2  # conv2d features


def _flat_linear():
    return nn.Linear(8 * 36, 3)


def _two(pieces, combine: Callable):
    """Unpack two pieces (fx follows a plain unpacking, not ``*pieces``) and combine them."""
    p, q = pieces
    return combine(p, q)


def _glu(p, q):
    return p * torch.sigmoid(q)


# torch function / operator -> factory of a tiny network calling it on the channels of a producer
FUNCTION_CASES: Dict[Any, Callable[[], Case]] = {
    torch.relu: around(_C2, torch.relu),
    torch.relu_: around(_C2, torch.relu_),
    torch.sigmoid: around(_C2, torch.sigmoid),
    torch.tanh: around(_C2, torch.tanh),
    torch.abs: around(_C2, torch.abs),
    torch.neg: around(_C2, torch.neg),
    torch.clamp: around(_C2, lambda h: torch.clamp(h, -0.5, 0.5)),
    F.relu: around(_C2, F.relu),
    F.relu6: around(_C2, F.relu6),
    F.gelu: around(_C2, F.gelu),
    F.silu: around(_C2, F.silu),
    F.mish: around(_C2, F.mish),
    F.hardswish: around(_C2, F.hardswish),
    F.hardsigmoid: around(_C2, F.hardsigmoid),
    F.hardtanh: around(_C2, F.hardtanh),
    F.elu: around(_C2, F.elu),
    F.leaky_relu: around(_C2, F.leaky_relu),
    F.sigmoid: around(_C2, F.sigmoid),
    F.tanh: around(_C2, F.tanh),
    F.softplus: around(_C2, F.softplus),
    F.dropout: around(_L, lambda h: F.dropout(h, 0.5, training=False)),
    F.dropout1d: around(1, lambda h: F.dropout1d(h, 0.5, training=False)),
    F.dropout2d: around(_C2, lambda h: F.dropout2d(h, 0.5, training=False)),
    F.dropout3d: around(3, lambda h: F.dropout3d(h, 0.5, training=False)),
    F.max_pool1d: around(1, lambda h: F.max_pool1d(h, 2)),
    F.max_pool2d: around(_C2, lambda h: F.max_pool2d(h, 2)),
    F.max_pool3d: around(3, lambda h: F.max_pool3d(h, 2)),
    F.avg_pool1d: around(1, lambda h: F.avg_pool1d(h, 2)),
    F.avg_pool2d: around(_C2, lambda h: F.avg_pool2d(h, 2)),
    F.avg_pool3d: around(3, lambda h: F.avg_pool3d(h, 2)),
    F.adaptive_avg_pool1d: around(1, lambda h: F.adaptive_avg_pool1d(h, 3)),
    F.adaptive_avg_pool2d: around(_C2, lambda h: F.adaptive_avg_pool2d(h, 3)),
    F.adaptive_avg_pool3d: around(3, lambda h: F.adaptive_avg_pool3d(h, 2)),
    F.adaptive_max_pool1d: around(1, lambda h: F.adaptive_max_pool1d(h, 3)),
    F.adaptive_max_pool2d: around(_C2, lambda h: F.adaptive_max_pool2d(h, 3)),
    F.adaptive_max_pool3d: around(3, lambda h: F.adaptive_max_pool3d(h, 2)),
    F.interpolate: around(_C2, lambda h: F.interpolate(h, scale_factor=2.0)),
    operator.add: joined(operator.add),
    operator.iadd: joined(operator.iadd),
    operator.sub: joined(operator.sub),
    operator.isub: joined(operator.isub),
    operator.mul: joined(operator.mul),
    operator.imul: joined(operator.imul),
    torch.add: joined(torch.add),
    torch.sub: joined(torch.sub),
    torch.mul: joined(torch.mul),
    operator.truediv: around(_C2, lambda h: operator.truediv(h, 2.0)),
    operator.itruediv: around(_C2, lambda h: operator.itruediv(h, 2.0)),
    torch.div: around(_C2, lambda h: torch.div(h, 2.0)),
    torch.cat: joined(lambda p, q: torch.cat([p, q], 1), width_out=16),
    torch.roll: around(_C2, lambda h: torch.roll(h, (1, 2), (2, 3))),
    "torchvision.ops.stochastic_depth.stochastic_depth": around(_C2, lambda h: stochastic_depth(h, 0.2, "row", False)),
    F.pad: around(_C2, lambda h: F.pad(h, (1, 1, 0, 2))),
    F.layer_norm: _functional_layernorm(F.layer_norm),
    torch.layer_norm: _functional_layernorm(torch.layer_norm),
    torch.concat: joined(lambda p, q: torch.concat([p, q], dim=1), width_out=16),
    torch.flatten: around(_C2, lambda h: torch.flatten(h, 1), consumer=_flat_linear),
    torch.reshape: around(_C2, lambda h: torch.reshape(h, (h.shape[0], -1)), consumer=_flat_linear),
    torch.unsqueeze: around(_L, lambda h: torch.unsqueeze(h, 1)),
    torch.squeeze: around(_L, lambda h: torch.squeeze(h, 1), shape=(4, 1, 6)),
    torch.permute: around(_C2, lambda h: torch.permute(h, (0, 2, 3, 1)), consumer=lambda: nn.Linear(8, 3)),
    torch.transpose: around(1, lambda h: torch.transpose(h, 1, 2), consumer=lambda: nn.Linear(8, 3)),
    torch.mean: around(_C2, lambda h: torch.mean(h, (2, 3)), consumer=lambda: nn.Linear(8, 3)),
    torch.sum: around(_C2, lambda h: torch.sum(h, dim=(2, 3)), consumer=lambda: nn.Linear(8, 3)),
    torch.amax: around(_C2, lambda h: torch.amax(h, dim=(2, 3)), consumer=lambda: nn.Linear(8, 3)),
    torch.amin: around(_C2, lambda h: torch.amin(h, dim=-1, keepdim=True)),
    operator.getitem: around(_C2, lambda h: h[:, :, 1:, None, ..., :-1][:, :, :, 0]),
    # channel c of both halves goes together (a GLU), and pieces along other dims keep the channels
    torch.chunk: around(_L, lambda h: _two(torch.chunk(h, 2, -1), _glu), producer=lambda: nn.Linear(6, 16)),
    torch.split: around(_L, lambda h: _two(torch.split(h, 2, dim=1), operator.add), shape=(2, 4, 6)),
    torch.unbind: around(_L, lambda h: _two(torch.unbind(h, 1), operator.sub), shape=(2, 2, 6)),
    getattr: around(_C2, lambda h: h.view(h.shape[0], h.shape[1], -1).flatten(1), consumer=_flat_linear),
}

# functions whose rule prunekit's tracer never reaches: fx records them as another op (covered by that op's rule)
TRACED_AS = {
    operator.iadd: ("call_function", operator.add),   # fx proxies have no in-place operators
    operator.isub: ("call_function", operator.sub),
    operator.imul: ("call_function", operator.mul),
    operator.itruediv: ("call_function", operator.truediv),
    F.sigmoid: ("call_method", "sigmoid"),            # F.sigmoid/F.tanh are plain `input.sigmoid()` calls
    "torchvision.ops.stochastic_depth.stochastic_depth": ("call_function", stochastic_depth),   # by name
    F.tanh: ("call_method", "tanh"),
}


def _function_cases():
    ids = [_fn_id(f) for f in REGISTERED_FUNCTIONS]
    return [pytest.param(f, id=i if ids.count(i) == 1 else f"{i}-{n}")
            for n, (f, i) in enumerate(zip(REGISTERED_FUNCTIONS, ids))]


def _traced_ops(model: nn.Module) -> set:
    return {(n.op, n.target) for n in trace(model).graph.nodes}


@pytest.mark.parametrize("fn", _function_cases())
def test_function_rule_masked_and_compacted_agree(fn):
    assert fn in FUNCTION_CASES, (f"function rule for {_fn_id(fn)} has no tiny network in "
                                  "tests/contract/test_surgery_registry.py FUNCTION_CASES: add one")
    case = FUNCTION_CASES[fn]()
    expected = TRACED_AS.get(fn, ("call_function", fn))
    assert expected in _traced_ops(case.model), f"the case never calls {_fn_id(fn)} in the traced graph"
    check_contract(case)


def test_every_function_rule_has_a_case():
    missing = [_fn_id(f) for f in REGISTERED_FUNCTIONS if f not in FUNCTION_CASES]
    assert not missing, f"function rules without a tiny network in FUNCTION_CASES: {missing}"


# ----------------------------------------------------------------------------- method rules

def _m(name: str, *args, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: getattr(h, name)(*args, **kwargs)


METHOD_CASES: Dict[str, Callable[[], Case]] = {
    "relu": around(_C2, _m("relu")),
    "relu_": around(_C2, _m("relu_")),
    "sigmoid": around(_C2, _m("sigmoid")),
    "tanh": around(_C2, _m("tanh")),
    "abs": around(_C2, _m("abs")),
    "neg": around(_C2, _m("neg")),
    "clamp": around(_C2, _m("clamp", -0.5, 0.5)),
    "contiguous": around(_C2, lambda h: h.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)),
    "clone": around(_C2, _m("clone")),
    "detach": around(_C2, _m("detach")),
    "float": around(_C2, lambda h: h.double().float()),
    "half": around(_C2, lambda h: h.half().float()),
    "double": around(_C2, lambda h: h.double().float()),
    "to": around(_C2, lambda h: h.to(torch.float64).to(torch.float32)),
    "type_as": around(_C2, lambda h: h.double().type_as(torch.zeros(1))),
    "add": joined(lambda p, q: p.add(q)),
    "add_": joined(lambda p, q: p.add_(q)),
    "sub": joined(lambda p, q: p.sub(q)),
    "sub_": joined(lambda p, q: p.sub_(q)),
    "mul": joined(lambda p, q: p.mul(q)),
    "mul_": joined(lambda p, q: p.mul_(q)),
    "div": around(_C2, _m("div", 2.0)),
    "div_": around(_C2, _m("div_", 2.0)),
    "flatten": around(_C2, _m("flatten", 1), consumer=_flat_linear),
    "view": around(_C2, lambda h: h.view(h.size(0), -1), consumer=_flat_linear),
    "reshape": around(_C2, lambda h: h.reshape(-1, h.shape[1] * h.shape[2] * h.shape[3]), consumer=_flat_linear),
    "size": around(_C2, lambda h: h.view(h.size(0), h.size(1), -1).flatten(1), consumer=_flat_linear),
    "numel": around(_C2, lambda h: h.view(h.size(0), h.numel() // h.size(0)), consumer=_flat_linear),
    "dim": around(_C2, lambda h: h.flatten(1) * (h.dim() - 3), consumer=_flat_linear),
    "unsqueeze": around(_L, _m("unsqueeze", 1)),
    "squeeze": around(_L, _m("squeeze", 1), shape=(4, 1, 6)),
    "permute": around(_C2, _m("permute", 0, 2, 3, 1), consumer=lambda: nn.Linear(8, 3)),
    "transpose": around(1, _m("transpose", 1, -1), consumer=lambda: nn.Linear(8, 3)),
    "mean": around(_C2, _m("mean", (2, 3)), consumer=lambda: nn.Linear(8, 3)),
    "sum": around(_C2, _m("sum", dim=(2, 3)), consumer=lambda: nn.Linear(8, 3)),
    "amax": around(_C2, _m("amax", dim=(2, 3)), consumer=lambda: nn.Linear(8, 3)),
    "amin": around(_C2, _m("amin", -1, keepdim=True)),
    "chunk": around(_L, lambda h: _two(h.chunk(2, dim=-1), _glu), producer=lambda: nn.Linear(6, 16)),
    "split": around(_L, lambda h: _two(h.split(2, 1), operator.add), shape=(2, 4, 6)),
    "unbind": around(_L, lambda h: _two(h.unbind(1), operator.mul), shape=(2, 2, 6)),
    "roll": around(_C2, _m("roll", 1, 3)),
}


@pytest.mark.parametrize("name", REGISTERED_METHODS)
def test_method_rule_masked_and_compacted_agree(name):
    assert name in METHOD_CASES, (f"method rule for Tensor.{name}() has no tiny network in "
                                  "tests/contract/test_surgery_registry.py METHOD_CASES: add one")
    case = METHOD_CASES[name]()
    assert ("call_method", name) in _traced_ops(case.model), f"the case never calls .{name}() in the traced graph"
    check_contract(case)


def test_every_method_rule_has_a_case():
    missing = sorted(set(REGISTERED_METHODS) - set(METHOD_CASES))
    assert not missing, f"method rules without a tiny network in METHOD_CASES: {missing}"


# ----------------------------------------------------------------------------- sizes read into values

@pytest.mark.parametrize("read", ["shape", "size", "numel", "whole_shape"])
def test_channel_count_read_into_a_value_keeps_the_channels(read):
    """``h * h.shape[1]`` would change after compaction: the group is kept whole, with the reason."""
    count = {"shape": lambda h: h.shape[1], "size": lambda h: h.size(1), "numel": lambda h: h.numel(),
             "whole_shape": lambda h: h.shape[1:].numel()}[read]
    case = around(_L, lambda h: h * count(h))()
    if read == "whole_shape":
        with pytest.raises(PrunekitError, match="no prunable channel group"):
            plan_groups(case.model, case.inputs, AMOUNT)
        return
    with pytest.raises(PrunekitError, match="reads the channel count into a value"):
        plan_groups(case.model, case.inputs, AMOUNT)


def test_channel_count_read_into_a_shape_follows_compaction():
    """The same count used as a shape argument (through integer arithmetic) stays prunable and exact."""
    case = around(_L, lambda h: h.reshape(h.shape[0], h.shape[1] * 1).view(h.size(0), -1))()
    plan = plan_groups(case.model, case.inputs, AMOUNT)
    masked = copy.deepcopy(case.model)
    masking.apply(masked, plan)
    slim = compact(case.model, plan, example_inputs=case.inputs)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in case.model.parameters())
    assert torch.allclose(_out(slim, case.inputs), _out(masked, case.inputs), atol=ATOL)
