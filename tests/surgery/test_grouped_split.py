"""Grouped convolutions, GroupNorm and chunk/split: whole units go, masked and compacted models agree."""
import copy

import pytest
import surgery_nets as nets
import torch
from torch import nn

import prunekit
from prunekit.apply import masking
from prunekit.surgery import build_groups, compact, compact_shapes, plan_groups, rebuild


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (groups=4) -> 1x1 bottleneck with a residual, as in ResNeXt."""

    def __init__(self, c=16, mid=32, groups=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.reduce = nn.Conv2d(c, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.grouped = nn.Conv2d(mid, mid, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.expand = nn.Conv2d(mid, c, 1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.reduce(x)))
        y = torch.relu(self.bn2(self.grouped(y)))
        x = x + self.expand(y)
        return self.fc(x.mean((2, 3)))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1)
        self.gn = nn.GroupNorm(6, 24)
        self.conv2 = nn.Conv2d(24, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.gn(self.conv1(x))))).mean((2, 3)))


class GLU(nn.Module):
    """x.chunk(2) -> a * sigmoid(b): channel c of both halves must go together."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(10, 32)
        self.down = nn.Linear(16, 3)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(a * torch.sigmoid(b))


class ChunkCat(nn.Module):
    """cat of two branches, then chunk back into them: each piece is one branch's group."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        p, q = torch.cat([self.a(x), self.b(x)], dim=1).chunk(2, dim=1)
        return self.out(torch.relu(p) + q)


class ChunkTokens(nn.Module):
    """chunk along a non-channel dim: the channels pass through untouched."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 2)

    def forward(self, x):
        first, second = self.fc1(x).chunk(2, dim=1)
        return self.fc2(torch.relu(first) + second).mean(1)


class SplitChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(4, 2)

    def forward(self, x):
        a, b = torch.split(self.fc1(x), [4, 8], dim=1)
        return self.fc2(a) + b.sum(1, keepdim=True)


CASES = {"resnext": (ResNeXtBlock, (2, 3, 8, 8)), "groupnorm": (GroupNormNet, (2, 3, 8, 8)),
         "glu": (GLU, (4, 10)), "chunk_cat": (ChunkCat, (4, 6)), "chunk_tokens": (ChunkTokens, (3, 4, 6))}


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masked_and_compacted_agree(name, scope):
    cls, shape = CASES[name]
    torch.manual_seed(0)
    model = nets.randomize_bn(cls(), 0).eval()
    x = torch.randn(*shape)
    plan = plan_groups(model, x, 0.5, scope=scope)
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=x)
    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            assert torch.allclose(masked(inp), slim(inp), atol=1e-5), (masked(inp) - slim(inp)).abs().max()
    pruned = sum(int((~k).sum()) for k in masking.masks(masked).values())
    assert pruned > 0 and _nparams(model) - _nparams(slim) == pruned
    assert _nparams(rebuild(cls(), compact_shapes(slim))) == _nparams(slim)


def test_grouped_conv_narrows_every_conv_group_alike():
    """A unit is position c inside each of the 4 conv-groups (issue 12: RegNet, ResNeXt): the group count stays
    and each group narrows, so MACs fall with the square of the group width, as with Torch-Pruning."""
    torch.manual_seed(1)
    model = ResNeXtBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_groups(model, x)
    g = graph.group_of("reduce.weight")[0]
    assert g.prunable and g.channels == 8   # 8 positions, each in all 4 conv-groups of 8 channels
    members = {(m.name, m.dim, m.outer, m.outer_stride) for m in g.members}
    assert {("reduce.weight", 0, 4, 8), ("grouped.weight", 1, 1, 0)} <= members
    out = graph.group_of("grouped.weight")[0]
    assert {("grouped.weight", 0, 4, 8), ("bn2.running_mean", 0, 4, 8), ("expand.weight", 1, 4, 8)} <= {
        (m.name, m.dim, m.outer, m.outer_stride) for m in out.members}
    plan = plan_groups(model, x, 0.5, graph=graph, scope="layer")
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=x)
    assert (slim.grouped.groups, slim.grouped.in_channels, slim.grouped.out_channels) == (4, 16, 16)
    assert slim.reduce.out_channels == 16 and slim.bn2.num_features == 16
    with torch.no_grad():
        assert torch.allclose(masked(x), slim(x), atol=1e-5)


def test_uneven_conv_groups_are_refused_by_compact():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.Conv2d(8, 4, 1))
    plan = prunekit.plan_pruning(model, 0.25, pattern="structured", dim=0, types=["Conv2d"], include="1")
    plan.tensors["1.weight"].pruned_idx = [0, 1]          # two rows of conv-group 0, none of group 1
    plan.tensors["1.weight"].pruned_units = 2
    with pytest.raises(prunekit.PrunekitError, match="uneven"):
        compact(model, plan)


def test_grouped_conv_on_fixed_input_keeps_its_channels():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    graph = build_groups(model, torch.randn(2, 4, 6, 6))
    g = graph.group_of("0.weight")[0]
    assert not g.prunable and "conv-groups" in g.reason


def test_groupnorm_removes_whole_groups():
    torch.manual_seed(2)
    model = GroupNormNet().eval()
    x = torch.randn(2, 3, 8, 8)
    g = build_groups(model, x).group_of("conv1.weight")[0]
    assert g.prunable and g.channels == 6 and g.exact
    slim = compact(model, plan_groups(model, x, 0.5, scope="layer"), example_inputs=x)
    assert (slim.gn.num_groups, slim.gn.num_channels, slim.conv1.out_channels) == (3, 12, 12)


def test_chunk_couples_channel_c_of_every_piece():
    torch.manual_seed(3)
    model = GLU().eval()
    g = build_groups(model, torch.randn(4, 10)).group_of("up.weight")[0]
    up = [m for m in g.members if m.name == "up.weight"][0]
    assert g.channels == 16 and (up.outer, up.outer_stride) == (2, 16)
    slim = compact(model, plan_groups(model, torch.randn(4, 10), 0.25), example_inputs=torch.randn(4, 10))
    assert slim.up.out_features == 24 and slim.down.in_features == 12


def test_split_into_fixed_sizes_keeps_the_channels_and_says_why():
    graph = build_groups(SplitChannels(), torch.randn(3, 6))
    g = graph.group_of("fc1.weight")[0]
    assert not g.prunable and "fixed sizes" in g.reason


class ShuffleBlock(nn.Module):
    """ShuffleNet's unit in miniature: 1x1 conv, channel shuffle, depthwise conv, 1x1 conv."""

    def __init__(self, c=12, groups=3, literal=False):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.dw, self.b = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, 4, 1)
        self.groups, self.literal = groups, literal

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        b, c, h, w = x.size()
        width = 4 if self.literal else c // self.groups
        x = x.view(b, self.groups, width, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.b(self.dw(x))


def test_channel_shuffle_keeps_its_pieces_equal_and_compacts_exactly():
    torch.manual_seed(3)
    model = nets.randomize_bn(ShuffleBlock()).eval()
    x = torch.randn(2, 3, 6, 6)
    g = build_groups(model, x).group_of("a.weight")[0]
    assert g.prunable and g.channels == 4   # channel j of each of the 3 pieces is one unit
    plan = plan_groups(model, x, 0.5, scope="layer")
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=x)
    assert slim.a.out_channels == 6 and slim.dw.groups == 6 and slim.b.in_channels == 6
    with torch.no_grad():
        assert torch.allclose(masked(x), slim(x), atol=1e-5)
    # a literal piece width would be wrong after compaction: those channels stay
    assert not build_groups(ShuffleBlock(literal=True).eval(), x).group_of("a.weight")[0].prunable
