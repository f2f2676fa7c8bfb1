"""A catalog of small topologies, one per channel rule the analysis must get right."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CATALOG", "Case"]

Case = tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]


def _img(c: int = 3, s: int = 8, n: int = 2) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(n, c, s, s)


class ConvChain1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv1d(3, 8, 3), nn.Conv1d(8, 12, 3, padding=1), nn.Conv1d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class ConvChain3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.Conv3d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.bn(self.a(x))))


class ConvTransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.dw = nn.ConvTranspose2d(12, 12, 3, padding=1, groups=12)
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.dw(F.relu(self.up(F.relu(self.a(x))))))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.gn = nn.Conv2d(8, 12, 3, padding=1), nn.GroupNorm(4, 12)
        self.c, self.inorm = nn.Conv2d(12, 8, 1), nn.InstanceNorm2d(8, affine=True)
        self.prelu = nn.PReLU(8)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.a(x)))
        x = F.relu(self.gn(self.b(x)))
        return self.d(self.prelu(self.inorm(self.c(x))))


class TokenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.ln(self.a(x)))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 12), nn.Linear(12, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids))


class Depthwise(nn.Module):
    """Depthwise with a channel multiplier of two, then a grouped convolution with 4 groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.b = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.g(F.relu(self.dw(F.relu(self.a(x)))))))


class SqueezeExcite(nn.Module):
    """``x * gate`` with a per-channel gate couples the gate's channels with x."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.b(x * s)


class SpatialMask(nn.Module):
    """``x * mask`` with a ``[N, 1, H, W]`` mask does not couple the mask with x."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.m, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        return self.b(x * torch.sigmoid(self.m(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.proj, self.c = nn.Conv2d(8, 12, 1), nn.Conv2d(8, 12, 3, padding=1)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x = x + F.relu(self.b(x))
        return self.out(self.proj(x) + self.c(x))


class NestedCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 1)
        self.bn, self.out = nn.BatchNorm2d(15), nn.Conv2d(15, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.out(F.relu(self.bn(torch.cat([inner, self.c(x)], 1))))


class SplitChunkUnbind(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 12, 1), nn.Conv2d(3, 8, 1)
        self.c, self.d, self.e = nn.Conv2d(5, 4, 1), nn.Conv2d(7, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(self.a(x), [5, 7], dim=1)
        r, s = self.b(x).chunk(2, dim=1)
        rows = torch.unbind(x, dim=2)  # along a spatial dim: channels pass through
        t = self.a(x)[:, 2:9] + self.a(x)[:, 2:9]
        return self.c(p) + self.d(q) + self.e(r * s) + rows[0].mean() + t.sum()


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(6 * 16, 10), nn.Linear(6 * 16, 10), nn.Linear(6 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b(F.relu(self.a(x))))
        return self.fc1(torch.flatten(y, 1)) + self.fc2(y.view(y.size(0), -1)) + self.fc3(y.reshape(2, 96))


class FeatureSelect(nn.Module):
    """Input features chosen by an index buffer (function and method form, one buffer) into Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.tensor([0, 2, 3, 5, 7, 8, 10, 11, 13, 14, 17, 19]))
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 6), nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, g = torch.index_select(x, 1, self.kept), x.index_select(1, self.kept)
        return self.fc3(F.relu(self.fc1(f)) + F.relu(self.fc2(g)))


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block: depthwise conv, permute to NHWC, LayerNorm, MLP, layer scale, back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 32), nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.ln(y)))).transpose(1, 3).transpose(2, 3)
        return self.head(x + self.gamma * y)


class PoolInterp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.pool, self.up = nn.MaxPool2d(2), nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.pool(F.relu(self.a(x))))
        y = F.interpolate(F.avg_pool2d(y, 2), scale_factor=2.0, mode="bilinear") + F.adaptive_avg_pool2d(y, 8)
        return self.b(y)


class Shuffle(nn.Module):
    """ShuffleNet's functional channel shuffle after a two-branch cat, plus ``nn.ChannelShuffle``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.shuffle, self.c, self.out = nn.ChannelShuffle(4), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        left, right = y.chunk(2, dim=1)
        return self.out(self.shuffle(self.c(torch.cat([left, right], 1))))


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.ps, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(8, 4, 1)
        self.unshuffle, self.c = nn.PixelUnshuffle(2), nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(F.relu(self.ps(self.a(x))))
        return self.c(self.unshuffle(y))


class TorchMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.ln, self.mlp, self.out = nn.LayerNorm(16), nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        y = self.ln(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.out(F.gelu(self.mlp(self.ln(x))))
        return self.head(x)


class ReshapeHeads(nn.Module):
    """Attention written with reshapes into heads, matmuls and a constant softmax scale."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 2
        self.inp, self.qkv, self.proj = nn.Linear(6, 16), nn.Linear(16, 48), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * 0.25).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, c)
        y = y + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(x + self.proj(y))


class Tokens(nn.Module):
    """Class token, position embedding and layer scale: parameters used directly (``get_attr``)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 5, 16))
        self.scale = nn.Parameter(torch.rand(16))
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.scale * self.fc(x)
        return self.head(x[:, 0])


class Reused(nn.Module):
    """The same module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.shared, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.shared(F.relu(self.shared(F.relu(self.a(x))))))


class MultiOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = F.relu(self.a(x))
        return self.b(y), {"logits": self.c(y.mean((2, 3)))}


class Unknown(nn.Module):
    """``cumsum`` over channels has no rule: the groups it touches are pinned, never guessed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        return self.c(torch.cumsum(self.b(y), dim=1))


CATALOG: dict[str, Case] = {
    "conv1d": (ConvChain1d, lambda: torch.randn(2, 3, 16)),
    "conv3d": (ConvChain3d, lambda: torch.randn(2, 3, 4, 6, 6)),
    "conv_transpose": (ConvTransposeNet, _img()),
    "linear": (Mlp, lambda: torch.randn(4, 10)),
    "norms": (Norms, _img()),
    "layer_norm": (TokenNorm, lambda: torch.randn(2, 5, 6)),
    "embedding": (EmbeddingNet, lambda: torch.randint(0, 20, (2, 7))),
    "depthwise_grouped": (Depthwise, _img()),
    "se_gate": (SqueezeExcite, _img()),
    "spatial_mask": (SpatialMask, _img()),
    "residual": (Residual, _img()),
    "nested_cat": (NestedCat, _img()),
    "split_chunk_unbind": (SplitChunkUnbind, _img()),
    "flatten_linear": (FlattenLinear, _img()),
    "feature_select": (FeatureSelect, lambda: torch.randn(4, 20)),
    "channels_last": (ChannelsLast, _img()),
    "pool_interpolate": (PoolInterp, _img()),
    "channel_shuffle": (Shuffle, _img()),
    "pixel_shuffle": (PixelShuffleNet, _img()),
    "multihead_attention": (TorchMHA, lambda: torch.randn(2, 5, 6)),
    "reshape_heads": (ReshapeHeads, lambda: torch.randn(2, 5, 6)),
    "tokens": (Tokens, _img(s=8)),
    "reused_module": (Reused, _img()),
    "multi_output": (MultiOutput, _img()),
    "unknown_op": (Unknown, _img()),
}
