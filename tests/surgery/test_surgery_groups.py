"""Channel groups: coupling through residuals, concatenations, depthwise convs; refusals with reasons."""
import json

import pytest
import surgery_nets as nets
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.surgery import ChannelGraph, TraceError, build_groups, plan_groups

X = torch.randn(2, 3, 16, 16)


def _groups_with(graph, name, dim=0):
    found = graph.group_of(name, dim)
    assert len(found) == 1, found
    return found[0]


def _names(group, role=None):
    return {(m.name, m.dim) for m in group.members if role is None or m.role == role}


def test_residual_blocks_share_one_group():
    g = build_groups(nets.TinyResNet().eval(), X)
    # basic block without downsample: stem and layer1's last conv are summed
    stem = _groups_with(g, "stem.0.weight")
    assert {("layer1.conv2.weight", 0), ("layer1.bn2.running_var", 0), ("layer2.conv1.weight", 1),
            ("layer2.downsample.0.weight", 1)} <= _names(stem)
    # bottleneck with downsample, then bottleneck without: one group through both additions, to fc
    last = _groups_with(g, "layer3.conv3.weight")
    assert {("layer3.downsample.0.weight", 0), ("layer4.conv3.weight", 0), ("fc.weight", 1)} <= _names(last)
    assert last.prunable and stem.prunable
    assert not _groups_with(g, "fc.weight").prunable    # the output layer's out features


def test_residual_group_is_pruned_together():
    model = nets.TinyResNet().eval()
    plan = plan_groups(model, X, 0.5)
    entry = {name: tp for name, tp in plan.tensors.items()}
    rows = {n: entry[n].pruned_idx for n in ("layer3.conv3.weight", "layer3.downsample.0.weight",
                                            "layer4.conv3.weight", "layer4.bn3.weight")}
    assert len({tuple(v) for v in rows.values()}) == 1 and len(rows["layer4.conv3.weight"]) == 12
    assert entry["fc.weight"].dim == 1 and entry["fc.weight"].pruned_idx == rows["layer4.conv3.weight"]


def test_concat_splits_the_consumer_into_producer_groups():
    g = build_groups(nets.TinyDenseNet().eval(), X[..., :8, :8])
    stem = _groups_with(g, "stem.weight")
    second = _groups_with(g, "dense1.1.block.5.weight")
    bases = {m.name: m.base for m in stem.members}
    assert bases["transition.0.weight"] == 0 and bases["transition.2.weight"] == 0
    assert {m.name: m.base for m in second.members}["transition.2.weight"] == 12   # after 8 + 4 channels
    model = nets.TinyDenseNet().eval()
    plan = plan_groups(model, X[..., :8, :8], 0.5)
    meta = {grp["lead"]: grp["pruned"] for grp in plan.meta["groups"]}
    expected = sorted(meta["stem.weight"] + [8 + c for c in meta["dense1.0.block.5.weight"]]
                      + [12 + c for c in meta["dense1.1.block.5.weight"]])
    assert plan.tensors["transition.0.weight"].pruned_idx == expected
    assert plan.tensors["transition.2.weight#dim1"].pruned_idx == expected


def test_depthwise_couples_its_input_and_output():
    g = build_groups(nets.TinyMobileNet().eval(), X)
    expand = _groups_with(g, "blocks.0.conv.0.weight")
    assert {("blocks.0.conv.3.weight", 0), ("blocks.0.conv.4.weight", 0),
            ("blocks.0.conv.6.weight", 1)} <= _names(expand)
    assert ("blocks.0.conv.3.weight", 1) not in _names(expand)


def test_flatten_expands_each_channel_to_its_features():
    from prunekit.zoo.models import LeNet5
    g = build_groups(LeNet5(), torch.randn(2, 1, 28, 28))
    fc = next(m for m in _groups_with(g, "features.2.weight").members if m.name == "classifier.1.weight")
    assert (fc.dim, fc.inner) == (1, 16)                             # 4x4 map: 16 features per channel
    assert fc.positions([2]).tolist() == [list(range(32, 48))]


def test_groups_are_json_safe():
    g = build_groups(nets.TinyDenseNet().eval(), X[..., :8, :8])
    again = ChannelGraph.from_dict(json.loads(json.dumps(g.to_dict())))
    assert again.to_dict() == g.to_dict()


def test_tracing_does_not_move_batchnorm_statistics():
    model = nets.TinyResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_groups(model, X)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- refusals

class _ChannelMixer(nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.mix = mix
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        if self.mix == "view":
            y = y.view(y.size(0), -1, 2).sum(-1).view(y.size(0), 8, 16, 8).repeat(1, 1, 1, 2)
        else:
            y = torch.roll(y, 1, dims=1)
        return self.head(torch.flatten(torch.relu(self.conv2(y)), 1))


@pytest.mark.parametrize("mix, op", [("view", "view"), ("roll", "roll")])
def test_channel_mixing_op_makes_the_group_unprunable(mix, op):
    g = build_groups(_ChannelMixer(mix), X)
    conv1 = _groups_with(g, "conv1.weight")
    assert not conv1.prunable and op in conv1.reason, conv1.reason
    assert _groups_with(g, "conv2.weight").prunable        # the rest of the model is still prunable
    plan = plan_groups(_ChannelMixer(mix), X, 0.5)
    assert "conv1.weight" not in plan.tensors and plan.tensors["conv2.weight"].pruned_units == 4
    assert any("conv1.weight" in n and op in n for n in plan.notes)


def test_unknown_module_and_full_size_operand_block_their_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.gn = nn.LocalResponseNorm(3)   # mixes neighbouring channels: no rule
            self.register_buffer("offset", torch.zeros(1, 8, 1, 1))   # a buffer: not the model's to slice
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.head(torch.cat([self.gn(self.a(x)), self.b(x) + self.offset], 1))
    g = build_groups(Net(), X)
    a, b = _groups_with(g, "a.weight"), _groups_with(g, "b.weight")
    assert not a.prunable and "LocalResponseNorm" in a.reason
    assert not b.prunable and "keeps all its 8 channels" in b.reason


def test_a_per_channel_parameter_read_twice_still_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.bias = nn.Parameter(torch.zeros(1, 8, 1, 1))
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x):   # one learned bias added to two streams: slicing it for one would break the other
            return self.head(torch.cat([self.a(x) + self.bias, self.b(x) + self.bias], 1))
    g = build_groups(Net(), X)
    assert not _groups_with(g, "a.weight").prunable and not _groups_with(g, "b.weight").prunable


def test_hard_coded_reshape_size_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 256, 4)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 8 * 256))
    grp = _groups_with(build_groups(Net(), X), "conv.weight")
    assert not grp.prunable and "hard-codes" in grp.reason


class _Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:   # data-dependent control flow: fx cannot trace this
            return x
        return -x


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _Gate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.conv(x)))


def test_untraceable_model_raises_a_clear_error():
    with pytest.raises(TraceError) as info:
        build_groups(_Branchy(), X)
    msg = str(info.value)
    assert "gate" in msg and "_Gate" in msg and "control flow" in msg and "leaf_modules=['gate']" in msg
    assert "test_surgery_groups.py" in msg           # points at the offending line
    assert isinstance(info.value, ValueError)


def test_leaf_modules_gets_past_tracing_and_keeps_their_channels():
    g = build_groups(_Branchy(), X, leaf_modules=["gate"])
    grp = _groups_with(g, "conv.weight")
    assert not grp.prunable and "module 'gate' (_Gate)" in grp.reason


def test_layernorm_over_channels_needs_exact_false():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln, self.fc2 = nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(F.gelu(self.ln(self.fc1(x))))
    x = torch.randn(4, 12)
    grp = _groups_with(build_groups(Net(), x), "fc1.weight")
    assert not grp.prunable and "LayerNorm" in grp.reason
    grp = _groups_with(build_groups(Net(), x, exact=False), "fc1.weight")
    assert grp.prunable and not grp.exact and ("ln.weight", 0) in _names(grp)
    from prunekit.surgery import compact
    net = Net()
    slim = compact(net, plan_groups(net, x, 0.5, exact=False), example_inputs=x)
    assert slim.ln.normalized_shape == (8,) and slim.fc2.in_features == 8


def test_a_module_called_twice_ties_its_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
            self.shared = nn.Linear(8, 8)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(torch.cat([torch.relu(self.shared(self.a(x))),
                                        torch.relu(self.shared(self.b(x)))], 1))
    g = build_groups(Net(), torch.randn(2, 6))
    ab = _groups_with(g, "a.weight")
    assert ("b.weight", 0) in _names(ab)                   # both feed shared's input columns
    out = _groups_with(g, "shared.weight")
    assert {m.base for m in out.members if m.name == "head.weight"} == {0, 8}


def test_tied_or_directly_read_weights_block_their_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.e = nn.Linear(4, 6), nn.Linear(4, 6)
            self.e.weight = self.a.weight                      # tied
            self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x)) + self.e(x) * self.b.weight.sum()   # b.weight read directly
            return self.c(torch.relu(self.b(h)))
    g = build_groups(Net(), torch.randn(2, 4))
    assert "a.weight is tied to e.weight" in _groups_with(g, "a.weight").reason
    assert "b.weight is also read directly" in _groups_with(g, "b.weight").reason


def test_model_output_tuple_blocks_every_returned_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            feats = self.body(x)
            return feats, self.head(feats)
    g = build_groups(Net(), torch.randn(2, 4))
    assert not _groups_with(g, "body.weight").prunable


def test_trace_errors_name_the_real_cause_and_fix():
    from prunekit.zoo.llm import tiny_decoder

    with pytest.raises(TraceError) as info:
        build_groups(tiny_decoder("llama"), torch.randint(0, 64, (2, 8)), fallback=False)
    msg = str(info.value)
    assert "Hugging Face" in msg and "plan_decoder" in msg and "register_block_rule" in msg
    assert "torch.where" not in msg       # control flow is not the cause here

    class Reversed(nn.Module):
        def forward(self, x):
            return torch.stack(list(x.unbind(1))[::-1], 1)   # iterates over a proxy
    with pytest.raises(TraceError) as info:
        build_groups(nn.Sequential(nn.Conv2d(3, 8, 3), Reversed()), X)
    assert "iterates over a traced tensor" in str(info.value) and "torch.where" not in str(info.value)

    class Sized(nn.Module):
        def forward(self, x):
            return x * len(x)   # len() of a proxy: fx refuses it
    with pytest.raises(TraceError) as info:
        build_groups(nn.Sequential(nn.Conv2d(3, 8, 3), Sized()), X)
    assert "register_module_rule" in str(info.value) and "torch.where" not in str(info.value)


def test_roll_and_pad_over_positions_keep_channels_and_over_channels_block():
    class Shift(nn.Module):
        def __init__(self, roll_dims, pad):
            super().__init__()
            extra = pad[4] + pad[5] if len(pad) > 4 else 0   # channels added by padding dim 1
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8 + extra, 4, 1)
            self.roll_dims, self.pad = roll_dims, pad

        def forward(self, x):
            shifts = (1,) * len(self.roll_dims) if isinstance(self.roll_dims, tuple) else 1
            y = torch.roll(self.a(x), shifts=shifts, dims=self.roll_dims)
            return self.b(F.pad(y, self.pad)).mean((2, 3))
    assert _groups_with(build_groups(Shift((2, 3), (1, 1, 0, 2)), X), "a.weight").prunable
    assert "rolls along the channels" in _groups_with(build_groups(Shift(1, (1, 1)), X), "a.weight").reason
    grp = _groups_with(build_groups(Shift(2, (0, 0, 0, 0, 1, 0)), X), "a.weight")
    assert not grp.prunable and "pads the channels" in grp.reason
