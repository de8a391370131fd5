"""Attention heads and FFN neurons: masked and compacted transformers agree (the surgery contract)."""
import copy
import importlib.util

import pytest
import torch
from torch import nn

import prunekit
from prunekit.apply import masking
from prunekit.surgery import (
    SlimMultiheadAttention,
    TraceError,
    build_groups,
    compact,
    compact_shapes,
    plan_groups,
    rebuild,
)
from prunekit.surgery.attention import _MHA_CUTS


class TinyViT(nn.Module):
    """Pre-norm encoder written out around nn.MultiheadAttention (fx traces it; MHA is a leaf)."""

    def __init__(self, d=32, heads=4, layers=2, batch_first=True, need_weights=False):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.emb = nn.Linear(12, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), attn=nn.MultiheadAttention(d, heads, batch_first=batch_first),
            ln2=nn.LayerNorm(d), fc1=nn.Linear(d, 2 * d), fc2=nn.Linear(2 * d, d))) for _ in range(layers))
        self.head = nn.Linear(d, 5)

    def forward(self, x, key_padding_mask=None):
        x = self.emb(x)
        for b in self.blocks:
            y = b["ln1"](x)
            x = x + b["attn"](y, y, y, key_padding_mask=key_padding_mask, need_weights=self.need_weights)[0]
            x = x + b["fc2"](torch.relu(b["fc1"](b["ln2"](x))))
        return self.head(x.mean(1 if self.batch_first else 0))


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def _prune_both(model, x, amount=0.5, **kw):
    plan = plan_groups(model, x, amount, **kw)
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=x)
    return plan, masked, slim


def _out(model, x):
    with torch.no_grad():
        y = model(*x) if isinstance(x, tuple) else model(x)
    return getattr(y, "last_hidden_state", y)


def _assert_agree(model, x, **kw):
    model.eval()
    plan, masked, slim = _prune_both(model, x, **kw)
    a, b = _out(masked, x), _out(slim, x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert _nparams(slim) < _nparams(model)
    return plan, masked, slim


def _head_groups(graph):
    return [g for g in graph.groups if any(m.inner > 1 and m.dim == 0 for m in g.members)]


# ----------------------------------------------------------------------------- nn.MultiheadAttention

def test_mha_heads_form_one_group_per_layer():
    torch.manual_seed(0)
    graph = build_groups(TinyViT().eval(), torch.randn(2, 5, 12))
    heads = _head_groups(graph)
    assert [g.channels for g in heads] == [4, 4]
    members = {(m.name, m.dim, m.base, m.inner) for m in heads[0].members}
    assert ("blocks.0.attn.in_proj_weight", 0, 32, 8) in members       # key rows of head h: 32 + 8h ...
    assert ("blocks.0.attn.out_proj.weight", 1, 0, 8) in members
    assert all(g.prunable for g in heads)
    # the residual stream (query width) must stay whole, and says why
    emb = graph.group_of("emb.weight")[0]
    assert not emb.prunable and "embed_dim" in emb.reason


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_mha_masked_and_compacted_agree(batch_first, need_weights, scope):
    torch.manual_seed(1)
    model = TinyViT(batch_first=batch_first, need_weights=need_weights)
    x = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    plan, masked, slim = _assert_agree(model, x, scope=scope)
    attn = slim.blocks[0]["attn"]
    assert isinstance(attn, SlimMultiheadAttention)
    assert attn.num_heads < 4 and attn.in_proj_weight.shape == (3 * attn.num_heads * 8, 32)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True   # padded keys are ignored the same way in both models
    with torch.no_grad():
        if batch_first:
            assert torch.allclose(masked(x, pad), slim(x, pad), atol=1e-5)


def test_mha_compacted_parameters_equal_masked_nonzeros():
    torch.manual_seed(2)
    model = TinyViT().eval()
    plan, masked, slim = _prune_both(model, torch.randn(2, 5, 12), amount=0.5)
    pruned = sum(int((~k).sum()) for k in masking.masks(masked).values())
    assert pruned > 0
    assert _nparams(model) - _nparams(slim) == pruned


def test_mha_heads_removed_whole_and_training_mode_untouched():
    torch.manual_seed(3)
    model = TinyViT().train()
    plan = plan_groups(model, torch.randn(2, 5, 12), 0.5)
    assert all(m.training for m in model.modules())
    w = plan.tensors["blocks.0.attn.out_proj.weight"]
    assert len(w.pruned_idx) % 8 == 0 and len(w.pruned_idx) == 16   # 2 of 4 heads, 8 columns each
    heads = {i // 8 for i in w.pruned_idx}
    assert all(set(range(h * 8, h * 8 + 8)) <= set(w.pruned_idx) for h in heads)


def test_slim_mha_saves_and_loads_without_pickle(tmp_path):
    torch.manual_seed(4)
    model = TinyViT().eval()
    x = torch.randn(2, 5, 12)
    _, _, slim = _prune_both(model, x)
    prunekit.save(slim, tmp_path / "slim")
    again = prunekit.load(tmp_path / "slim", model=TinyViT())
    assert isinstance(again.blocks[1]["attn"], SlimMultiheadAttention)
    assert again.blocks[1]["attn"].kept_heads == slim.blocks[1]["attn"].kept_heads
    assert torch.allclose(_out(again.eval(), x), _out(slim, x), atol=0)
    # shapes alone rebuild the slim architecture
    assert _nparams(rebuild(TinyViT(), compact_shapes(slim))) == _nparams(slim)


def _full_slim(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """A SlimMultiheadAttention that kept every head: must compute exactly what torch's does."""
    slim = copy.deepcopy(mha)
    slim.__class__ = SlimMultiheadAttention
    slim.kept_heads = list(range(mha.num_heads))
    return slim


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_slim_mha_matches_torch_on_every_option(batch_first, kdim):
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    slim = _full_slim(mha)
    b, L, S = 2, 3, 5
    shape = (lambda n, d: (b, n, d)) if batch_first else (lambda n, d: (n, b, d))
    q, k = torch.randn(shape(L, 16)), torch.randn(shape(S, kdim or 16))
    v = torch.randn(shape(S, kdim or 16))
    pad = torch.tensor([[False] * S, [False] * (S - 2) + [True] * 2])
    bool_mask = torch.ones(L, S, dtype=torch.bool).triu(1)
    per_head = torch.randn(b * 4, L, S)
    cases = [dict(), dict(key_padding_mask=pad), dict(attn_mask=bool_mask), dict(attn_mask=per_head),
             dict(attn_mask=torch.randn(L, S), key_padding_mask=pad), dict(average_attn_weights=False)]
    with torch.no_grad():
        for kw in cases:
            for need in (True, False):
                want, wa = mha(q, k, v, need_weights=need, **kw)
                got, ga = slim(q, k, v, need_weights=need, **kw)
                assert torch.allclose(want, got, atol=1e-5), kw
                assert (wa is None) == (ga is None) and (wa is None or torch.allclose(wa, ga, atol=1e-6))
        unbatched = [t[0] if batch_first else t[:, 0] for t in (q, k, v)]
        assert torch.allclose(mha(*unbatched)[0], slim(*unbatched)[0], atol=1e-5)


def test_slim_mha_selects_kept_heads_of_a_per_head_mask():
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 3, 16)
    per_head = torch.randn(2 * 4, 3, 3)
    masked = copy.deepcopy(mha)
    rows = torch.ones(48, dtype=torch.bool)
    for base in (0, 16, 32):
        rows[base + 4:base + 8] = False   # head 1 gone from q, k, v
    cols = rows[:16]
    with torch.no_grad():
        masked.in_proj_weight[~rows] = 0
        masked.in_proj_bias[~rows] = 0
        masked.out_proj.weight[:, ~cols] = 0
    slim = copy.deepcopy(mha)
    from prunekit.surgery.attention import _mha_handler
    _mha_handler(slim, {"in_proj_weight": {0: rows.nonzero().squeeze(1)},
                        "in_proj_bias": {0: rows.nonzero().squeeze(1)}})
    slim.out_proj.weight = nn.Parameter(mha.out_proj.weight[:, cols])
    slim.out_proj.in_features = 12
    assert slim.kept_heads == [0, 2, 3]
    with torch.no_grad():
        assert torch.allclose(masked(x, x, x, attn_mask=per_head, need_weights=False)[0],
                              slim(x, x, x, attn_mask=per_head, need_weights=False)[0], atol=1e-5)


def test_mha_handler_refuses_to_narrow_the_query():
    mha = nn.MultiheadAttention(16, 4)
    from prunekit.surgery.attention import _mha_handler
    with pytest.raises(ValueError, match="embed_dim"):
        _mha_handler(mha, {"in_proj_weight": {1: torch.arange(8)}})
    assert set(_MHA_CUTS["in_proj_weight"]) == {0}


def test_mha_with_bias_kv_keeps_its_heads_and_says_why():
    torch.manual_seed(7)
    model = TinyViT()
    model.blocks[0]["attn"] = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True)
    graph = build_groups(model.eval(), torch.randn(2, 5, 12))
    first = graph.group_of("blocks.0.attn.out_proj.weight", 1)[0]
    assert not first.prunable and "add_bias_kv" in first.reason
    assert graph.group_of("blocks.1.attn.out_proj.weight", 1)[0].prunable


# ----------------------------------------------------------------------------- fallback blocks

def test_transformer_encoder_falls_back_to_block_rules():
    torch.manual_seed(8)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 32)
    plan, masked, slim = _assert_agree(enc, x, amount=0.5)
    assert any("fx could not trace" in n for n in plan.notes)
    assert slim.layers[0].linear1.out_features == 32 and slim.layers[0].self_attn.num_heads == 2
    assert all(not m.training for m in enc.modules())


def test_untraceable_model_without_known_blocks_still_raises():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(TraceError, match="Branchy"):
        build_groups(Branchy(), torch.randn(2, 4))


# ----------------------------------------------------------------------------- Hugging Face BERT

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_hf_bert_heads_and_ffn_neurons_compact():
    from transformers import BertConfig, BertModel
    torch.manual_seed(9)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    attn = torch.ones(2, 7, dtype=torch.long)
    attn[1, 5:] = 0
    plan, masked, slim = _assert_agree(model, (ids, attn), amount=0.5)
    sa = slim.encoder.layer[0].attention.self
    assert sa.num_attention_heads == 2 and sa.all_head_size == 16 and sa.query.out_features == 16
    assert slim.encoder.layer[0].intermediate.dense.out_features == 32


class EncoderClassifier(nn.Module):
    """Traceable around an nn.TransformerEncoder, which fx keeps as one opaque leaf."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(self.encoder(self.embed(x)).mean(1))


def test_block_rules_apply_inside_an_opaque_leaf_of_a_traced_model():
    torch.manual_seed(10)
    model = EncoderClassifier().eval()
    x = torch.randn(2, 6, 12)
    graph = build_groups(model, x)
    assert not any("fx could not trace" in n for n in graph.notes)    # traced, not the fallback
    leads = {g.lead().name for g in graph.prunable()}
    assert {"encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.linear1.weight"} <= leads
    assert not graph.group_of("embed.weight")[0].prunable               # the encoder keeps its width
    _assert_agree(model, x, amount=0.5, scope="global")
