"""Rules for modern vision blocks, each checked against the running layer and the tools.

Layer scale, layer/RMS/group/instance norms, GELU/SiLU/Hardswish, split/chunk/unbind/pad/roll,
permute/transpose/reshape, functional dropout, matmul/bmm/einsum, softmax, scaled dot-product
attention, nn.MultiheadAttention, Conv1d/Conv3d/ConvTranspose1d/3d, PixelShuffle/Unshuffle,
nn.LSTM.
"""

from __future__ import annotations

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from convtally.analysis.accounting import H, W, analyse
from convtally.analysis.conventions import preset
from convtally.analysis.verification import verify
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests.analysis.test_accounting import assert_matches_running_network
from tests.analysis.test_conventions import preset_problems, tool_results


class ModernBlocks(nn.Module):
    """One network using every new rule (4-d image in, logits out)."""

    def __init__(self, channels: int = 8, heads: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 4, stride=4)
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))  # layer scale
        self.norm = nn.LayerNorm(channels)
        self.rms = nn.RMSNorm(channels)
        self.group = nn.GroupNorm(2, channels)
        self.instance = nn.InstanceNorm2d(channels, affine=True)
        self.gelu, self.silu, self.hardswish = nn.GELU(), nn.SiLU(), nn.Hardswish()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.heads = heads
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.conv1d = nn.Conv1d(channels, channels, 3, padding=1)
        self.deconv1d = nn.ConvTranspose1d(channels, channels, 2, stride=2)
        self.conv3d = nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1))
        self.deconv3d = nn.ConvTranspose3d(channels, channels, (1, 2, 2), stride=(1, 2, 2))
        self.shuffle = nn.PixelShuffle(2)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma * self.instance(self.group(x))
        b, c, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
        tokens = self.rms(self.gelu(tokens))
        q, k, v = self.qkv(tokens).reshape(b, -1, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4
        ).unbind(0)
        scores = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        mixed = torch.matmul(F.dropout(scores, 0.1, training=False), v)
        fused = F.scaled_dot_product_attention(q, k, v)
        mixed = torch.einsum("bhnd,bhmd->bhnm", mixed, fused).softmax(-1) @ v
        tokens = tokens + mixed.transpose(1, 2).reshape(b, -1, c).contiguous()
        tokens = tokens + self.attention(tokens, tokens, tokens)[0]
        one, two = tokens.split([c // 2, c - c // 2], dim=-1)
        tokens = torch.cat([two, one], dim=-1)
        a, bb = tokens.chunk(2, dim=1)
        tokens = torch.cat([bb, a], dim=1)
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        x = torch.roll(F.pad(x, (1, 1, 1, 1)), shifts=1, dims=2)[:, :, 1:-1, 1:-1]
        x = self.unshuffle(self.shuffle(self.silu(x)))
        seq = self.deconv1d(self.conv1d(x.flatten(2)))  # (B, C, 2N)
        x = x + seq[:, :, : h * w].reshape(b, c, h, w)
        vol = self.deconv3d(self.conv3d(self.hardswish(x).unsqueeze(2)))  # (B, C, 1, 2h, 2w)
        x = F.avg_pool2d(vol.squeeze(2), 2) + torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2)
                                                         ).mean() * x
        return self.head(x.mean((2, 3)))


def test_modern_blocks_match_the_running_network():
    torch.manual_seed(0)
    network = ModernBlocks().eval()
    analysis = analyse(network)
    assert not [layer.name for layer in analysis.layers if not layer.known]
    assert_matches_running_network(analysis, network, 3, [(32, 32), (48, 64)])
    assert analysis.total("weights") == sum(p.numel() for p in network.parameters())


def test_layer_scale_owns_its_parameter():
    analysis = analyse(ModernBlocks())
    row = next(layer for layer in analysis.layers if layer.name == "mul")
    assert row.weights == 8  # gamma (8, 1, 1), the element-wise product's row
    assert sp.expand(row.connections - 2 * 8 * H * W / 16) == 0


def test_modern_blocks_presets_equal_fvcore_and_torch():
    analysis = analyse(ModernBlocks())
    theirs = tool_results(lambda: ModernBlocks(), 3, 32, 48, tools=("fvcore", "torch"))
    assert preset_problems(analysis, theirs, 32, 48) == []


class RowLSTM(nn.Module):
    """A conv stem, then every feature-map row read as a sequence by an LSTM (sequencer2d's
    layout: batch x rows as the LSTM's batch, columns as its sequence)."""

    def __init__(self, **settings):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.rnn = nn.LSTM(8, 16, **{"batch_first": True, **settings})
        self.head = nn.Linear(self.rnn.proj_size or 16, 5)

    def sequences(self, x):
        b, c, h, w = x.shape
        if self.rnn.batch_first:
            return x.permute(0, 2, 3, 1).reshape(b * h, w, c)
        return x.permute(3, 0, 2, 1).reshape(w, b * h, c)

    def forward(self, x):
        output, (h_n, c_n) = self.rnn(self.sequences(self.stem(x)))
        return self.head(h_n[-1]).mean(0) + c_n.mean()


LSTM_SETTINGS = [
    {},
    {"bidirectional": True, "num_layers": 2},
    {"proj_size": 4},
    {"num_layers": 3, "bias": False, "bidirectional": True},
    {"batch_first": False, "num_layers": 2},
]


@pytest.mark.parametrize("settings", LSTM_SETTINGS, ids=lambda s: "-".join(map(str, s.values()))
                         or "plain")
def test_lstm_against_the_running_layer_and_every_tool(settings):
    """Outputs (the sequence and both states) and weights against the running layer; the
    multiply-adds against FlopCounterMode with oneDNN off (the LSTM then runs as matmuls);
    each preset against its tool, in total and module by module."""
    network = RowLSTM(**settings).eval()
    analysis = analyse(network)
    assert not [layer.name for layer in analysis.layers if not layer.known]
    result = verify(analysis, [(32, 32), (48, 64)])
    # the memory model counts a tensor whose batch left the first dimension as one example's
    # (here the sequence-first input), so its saved bytes are checked batch-first only
    assert not [check for check in result.mismatches
                if settings.get("batch_first", True) or "saved" not in " ".join(check.problems)]
    row = next(i for i, layer in enumerate(analysis.layers) if layer.name == "rnn")
    for height, width in [(32, 32), (48, 64)]:
        sequences = network.sequences(network.stem(torch.zeros(1, 3, height, width)))
        with (torch.backends.mkldnn.flags(enabled=False), torch.no_grad(),
              FlopCounterMode(display=False) as counter):
            network.rnn(sequences)
        connections = analysis.evaluate([(height, width)])["connections"][row, 0]
        assert 2 * connections == counter.get_total_flops(), (height, width)
    theirs = tool_results(lambda: RowLSTM(**settings), 3, 32, 48)
    assert preset_problems(analysis, theirs, 32, 48) == []


def tiny_swin(version: int) -> nn.Module:
    """torchvision's SwinTransformer, two stages of 16 and 32 channels, 4x4 windows."""
    from torchvision.models import swin_transformer as swin

    blocks = {} if version == 1 else {"block": swin.SwinTransformerBlockV2,
                                      "downsample_layer": swin.PatchMergingV2}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 2], num_heads=[1, 2],
                                window_size=[4, 4], num_classes=10, **blocks).eval()


@pytest.mark.parametrize("version", [1, 2])
def test_swin_window_attention_against_the_running_network_and_every_tool(version):
    """torchvision's shifted_window_attention, _patch_merging_pad and the relative-position bias
    as fx rules: formulas in H, W (windows padded up, odd sizes merged) that match the running
    network, and every preset equal to its tool, in total and module by module. 36x44 pads the
    first stage's 9x11 tokens to 12x12 and merges an odd 5x6 grid."""
    torch.manual_seed(0)
    analysis = analyse(tiny_swin(version), exact=True)
    assert analysis.capture == "fx" and analysis.symbolic and analysis.complete
    rows = [layer for layer in analysis.layers if layer.cost.op == "shifted_window_attention"]
    assert len(rows) == 3 and all(row.connections.has(H) for row in rows)
    sizes = [(64, 64), (36, 44)]
    assert not verify(analysis, sizes).mismatches
    for height, width in sizes:
        theirs = tool_results(lambda: tiny_swin(version), 3, height, width)
        assert preset_problems(analysis, theirs, height, width) == []


class BuiltFromSizes(nn.Module):
    """Tensors made from the input's sizes (edgenext's mask, bat_resnext's eye, mobilevit's
    math.ceil of a patch count), a cumulative sum and a logical not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        import math

        x = self.conv(x)
        b, c, h, w = x.shape
        mask = torch.zeros((b, h, w), device=x.device).bool()
        position = (~mask).cumsum(1).float()  # (B, H, W): 1, 2, 3, ... down the rows
        identity = torch.eye(h, device=x.device)
        mixed = identity @ x.mean(1) + position  # (B, H, W)
        x = x + mixed.unsqueeze(1)
        # padded up to even sizes, as mobilevit pads to whole patches
        x = F.pad(x, (0, 2 * math.ceil(w / 2) - w, 0, 2 * math.ceil(h / 2) - h))
        return self.head(F.max_pool2d(x, 2).mean((2, 3)))


def test_tensors_built_from_sizes_against_the_running_network_and_fvcore():
    network = BuiltFromSizes().eval()
    analysis = analyse(network, exact=True)
    assert analysis.capture == "fx" and analysis.complete and analysis.symbolic
    assert not verify(analysis, [(32, 32), (30, 44)]).mismatches
    theirs = tool_results(lambda: BuiltFromSizes(), 3, 30, 44, tools=("fvcore", "torch"))
    assert preset_problems(analysis, theirs, 30, 44) == []


class AttentionOfRank(nn.Module):
    """scaled_dot_product_attention on q, k, v of a given rank (5: hiera's mask units, whose
    queries are pooled to a quarter of the keys)."""

    def __init__(self, rank: int, channels: int = 8):
        super().__init__()
        self.rank = rank
        self.stem = nn.Conv2d(3, channels, 4, stride=4)
        self.qkv = nn.Linear(channels, 3 * channels)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, C)
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        if self.rank == 5:  # (B, heads, windows, N / windows, C / heads), pooled queries
            q, k, v = (t.reshape(b, 2, 2, n // 2, c // 2) for t in (q, k, v))
            q = q.reshape(b, 2, 2, 4, n // 8, c // 2).amax(dim=3)
        elif self.rank == 4:
            q, k, v = (t.reshape(b, n, 2, c // 2).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).sum()


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("rank", [3, 4, 5])
def test_attention_of_any_rank_under_the_torch_preset_equals_flop_counter_mode(rank, capture):
    """On the CPU, sdpa of 3-d or 4-d q, k, v runs the fused kernel FlopCounterMode has no
    formula for (0); other ranks run the math path, whose two matmuls it counts as bmm."""
    network = AttentionOfRank(rank).eval()
    analysis = analyse(network, convention=preset("torch"), capture=capture)
    for size in [(32, 32), (64, 48)]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network(torch.zeros(1, 3, *size))
        assert analysis.totals_at([size])["connections"][0] == counter.get_total_flops()
        row = next(layer for layer in analysis.layers if "scaled_dot" in layer.name)
        attention = int(sp.sympify(row.connections).subs(
            {**dict(zip((H, W), size)), **analysis.substitutions()}))
        assert (attention == 0) == (rank in (3, 4))


class PaddedWindows(nn.Module):
    """Window attention's size arithmetic, as timm's DaViT and SAM's Hiera write it: tokens
    padded up to a multiple of the window, windows cut out with view(-1, ...), the batch read
    back from the window count, the padding cropped; plus tile, repeat_interleave and unfold."""

    window = 4

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mix = nn.Linear(8, 8)
        self.window_bias = nn.Parameter(torch.zeros(1, 8, 2, 2))
        self.patches = nn.Unfold(2, stride=2)
        self.head = nn.Linear(8 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        h, w = x.shape[2:]
        x = x + self.window_bias.tile(((h + 1) // 2, (w + 1) // 2))[..., :h, :w]
        x = x.permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        n = self.window
        pad_bottom, pad_right = (n - h % n) % n, (n - w % n) % n
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_h, padded_w = h + pad_bottom, w + pad_right
        x = x.view(b, padded_h // n, n, padded_w // n, n, c).permute(0, 1, 3, 2, 4, 5)
        windows = self.mix(x.contiguous().view(-1, n * n, c))
        batch = windows.shape[0] // (padded_h * padded_w // n // n)
        x = windows.view(batch, padded_h // n, padded_w // n, n, n, -1).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, padded_h, padded_w, -1)[:, :h, :w, :].permute(0, 3, 1, 2)
        x = x.repeat_interleave(2, dim=1)[:, ::2]  # the same channels again
        x = self.patches(x)  # (B, 8 * 2 * 2, positions)
        return self.head(x.mean(2))


def test_padded_windows_have_formulas_in_h_w_that_match_the_running_network_and_fvcore():
    """Sizes padded to a multiple of the window reduce (n*ceiling(H/n)), so the view's -1
    and the batch read back from the window count cancel: formulas in H, W where the fx rung
    used to refuse, equal to the running network and to fvcore at sizes that need padding."""
    torch.manual_seed(0)
    analysis = analyse(PaddedWindows().eval(), exact=True)
    assert analysis.capture == "fx" and analysis.symbolic and analysis.complete
    sizes = [(32, 32), (30, 44), (26, 38)]
    assert not verify(analysis, sizes).mismatches
    for height, width in sizes[1:]:
        theirs = tool_results(lambda: PaddedWindows(), 3, height, width,
                              tools=("fvcore", "torch"))
        assert preset_problems(analysis, theirs, height, width) == []


def test_repeat_interleave_by_a_tensor_is_refused_with_what_to_do():
    class ByTensor(nn.Module):
        def forward(self, x):
            return x.repeat_interleave(torch.tensor([1, 2, 3]), dim=1)

    with pytest.raises(ValueError, match="tensor of repeats.*--allow-unknown"):
        analyse(ByTensor(), capture="fx")


class OutlooksAndTakesMaxima(nn.Module):
    """timm VOLO's pieces: an unfold, a product per window, F.fold back onto the map, and a
    head that takes maxima (values and indices along a dimension, over every value, and of two
    tensors)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.unfold = nn.Unfold(3, padding=1, stride=2)
        self.window = nn.Linear(36, 36)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = self.stem(x)
        height, width = x.shape[2:]
        columns = self.window(self.unfold(x).transpose(1, 2)).transpose(1, 2)  # (B, 36, L)
        x = x + F.fold(columns, (height, width), 3, padding=1, stride=2)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        top, _ = tokens.max(1)
        return self.head(torch.max(top, tokens.min(dim=1)[0]) + tokens.max())


@pytest.mark.parametrize("exact", [False, True])
def test_fold_and_maxima_against_the_running_network_and_the_tools(exact):
    network = OutlooksAndTakesMaxima().eval()
    analysis = analyse(network, exact=exact)
    assert analysis.capture == "fx" and analysis.complete and analysis.symbolic
    sizes = [(32, 32), (30, 44)] if exact else [(32, 32), (48, 64)]
    assert not verify(analysis, sizes).mismatches
    theirs = tool_results(lambda: OutlooksAndTakesMaxima(), 3, *sizes[1], tools=("fvcore",
                                                                              "torch"))
    assert preset_problems(analysis, theirs, *sizes[1]) == []
    exported = analyse(network, exact=exact, capture="export")  # aten.col2im, aten.max
    assert exported.totals_at(sizes) == analysis.totals_at(sizes)
    # along a dimension, along one by keyword, of two tensors, over every value
    assert [layer.cost.op for layer in analysis.layers if layer.type in ("max", "min")] == [
        "max", "min", "max", "max"]
    fold = next(layer for layer in analysis.layers if layer.type == "fold")
    assert (fold.kind, str(fold.connections)) == ("elementwise", str(analysis.layers[
        [layer.name for layer in analysis.layers].index("window")].outputs))


@pytest.mark.parametrize("output_size, kernel, stride, padding", [
    ((8, 8), 3, 2, 1), ((9, 7), (2, 3), 1, 0), ((10, 10), 4, 3, 2)])
def test_an_nn_fold_gives_the_shape_pytorch_gives(output_size, kernel, stride, padding):
    from convtally.analysis.rules import BATCH, SymTensor, fold_module

    module = nn.Fold(output_size, kernel, padding=padding, stride=stride)
    columns = F.unfold(torch.zeros(1, 2, *output_size), kernel, padding=padding, stride=stride)
    cost = fold_module(module, {}, SymTensor((BATCH, *map(sp.Integer, columns.shape[1:]))))
    assert tuple(int(d) for d in cost.output.shape[1:]) == tuple(module(columns).shape[1:])
    assert cost.requires == () and int(cost.connections) == columns[0].numel()
    with pytest.raises(ValueError, match="fold's columns must be the sliding positions"):
        fold_module(module, {}, SymTensor((BATCH, columns.shape[1], columns.shape[2] + 1)))


class BiasedAttention(nn.Module):
    """timm coatnet's attention: F.scaled_dot_product_attention with a relative-position bias
    made for 4x4 tokens as its mask."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)
        self.bias = nn.Parameter(torch.zeros(2, 16, 16))

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias).mean((1, 2))


@pytest.mark.parametrize("exact", [False, True])
def test_an_attention_mask_of_fixed_size_pins_the_tokens(exact):
    from tests.analysis.test_indexing_rules import runs

    network = BiasedAttention().eval()
    analysis = analyse(network, exact=exact)
    sizes = [(16, 16), (32, 32), (16, 20), (12, 20)]
    assert analysis.runnable(sizes) == [runs(network, size) for size in sizes] == [
        True, False, False, False]
    theirs = tool_results(lambda: BiasedAttention(), 3, 16, 16, tools=("fvcore",))
    assert preset_problems(analysis, theirs, 16, 16) == []
