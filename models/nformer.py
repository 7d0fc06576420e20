"""NFormer (Wang et al., CVPR 2022): a Transformer over a *set* of image features, so that every feature is
corrected by its reciprocal neighbours. Written from `../shared/specs/NFORMER.md` (the official code's
behaviour), with three forward paths that compute the same function:

- `dense=True`, the official formulation: the full N x N landmark-factorised logits and a masked softmax.
  O(N^2) memory; kept for parity tests and as the benchmark baseline.
- sparse (default): logits only on each token's top-k neighbours, softmax restricted to the reciprocal ones.
  O(N*k*L) time and O(N*k) memory, so the paper's joint refinement of ~20,000 features fits in well under 2 GB.
  This is the path that is trained.
- `NFormer.refine_sequence`, the sparse path for one sequence at inference, written for a small graph: this is
  what `nformer.onnx` is exported from, and the export is checked against `forward`.

Tokens are images: no positional encoding, no class token, D -> D."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from index.refine import sample_landmarks


@dataclass
class NFormerConfig:
    dim: int = 256
    heads: int = 2
    layers: int = 4
    topk: int = 20
    landmarks: int = 5  # the released Market recipe (defaults.py says 10)
    dropout: float = 0.1  # on the attention output and the FFN output, training only
    num_classes: int = 0  # training identities; 0 = no classifier (inference)
    landmark_seed: int = 0  # landmarks at inference: a fixed seeded draw, so a request's answer is repeatable

    def card(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "num_classes"}


def topk_neighbors(z: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """[B,N,k] indices of each token's k most cosine-similar tokens (itself included), row chunks at a time."""
    zn = F.normalize(z, dim=-1)
    return torch.cat([torch.topk(zn[:, s:s + chunk] @ zn.transpose(1, 2), k, dim=-1).indices
                      for s in range(0, z.shape[1], chunk)], dim=1)


def reciprocal_mask(neighbors: torch.Tensor) -> torch.Tensor:
    """[B,N,k] bool: neighbour m of token i is reciprocal when i is also among that neighbour's top-k."""
    batch = torch.arange(neighbors.shape[0], device=neighbors.device)[:, None, None]
    their_neighbors = neighbors[batch, neighbors]  # [B,N,k,k]
    me = torch.arange(neighbors.shape[1], device=neighbors.device)[None, :, None, None]
    return (their_neighbors == me).any(-1)


def dense_reciprocal_mask(neighbors: torch.Tensor) -> torch.Tensor:
    """[B,N,N] bool, the official mask: M = Mdir * Mdir^T."""
    b, n, _ = neighbors.shape
    directed = torch.zeros(b, n, n, dtype=torch.bool, device=neighbors.device)
    directed.scatter_(2, neighbors, True)
    return directed & directed.transpose(1, 2)


class LandmarkAgentAttention(nn.Module):
    """Logits P.R / sqrt(d_h) with P = Q.K[λ]^T [N,L] and R = Q[λ].K^T [L,N] (no softmax on the factors), then
    Reciprocal Neighbor Softmax: a softmax over the reciprocal top-k neighbours only."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, landmarks, neighbors, reciprocal, dense: bool, trace: dict | None = None):
        b, n, d = x.shape
        # qkv columns: Q | K | V, each split into heads as contiguous blocks of d_h
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B,H,N,dh]
        p = q @ k[:, :, landmarks].transpose(-1, -2)  # [B,H,N,L]
        r = q[:, :, landmarks] @ k.transpose(-1, -2)  # [B,H,L,N]
        scale = 1.0 / math.sqrt(self.head_dim)
        if dense:
            logits = (p @ r) * scale  # [B,H,N,N]
            attention = logits.masked_fill(~reciprocal[:, None], -1e9).softmax(-1)
            heads_out = attention @ v
            if trace is not None:
                trace.update(logits=logits, attention=attention)
        else:
            # gather each token's k neighbours per head: [B,H,N,k,*]; batched matmuls, no transposed copies
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            heads = torch.arange(self.heads, device=x.device)[None, :, None, None]
            at = (batch, heads, neighbors[:, None])
            r_at_neighbors = r.transpose(-1, -2)[at]  # [B,H,N,k,L]
            logits = (r_at_neighbors @ p.unsqueeze(-1)).squeeze(-1) * scale  # [B,H,N,k]
            attention = logits.masked_fill(~reciprocal[:, None], float("-inf")).softmax(-1)
            heads_out = (attention.unsqueeze(-2) @ v[at]).squeeze(-2)  # [B,H,N,dh]
            if trace is not None:
                dense_attention = torch.zeros(b, self.heads, n, n, dtype=x.dtype, device=x.device)
                index = neighbors[:, None].expand(b, self.heads, n, neighbors.shape[-1])
                trace.update(attention=dense_attention.scatter(3, index, attention), logits=(p @ r) * scale)
        if trace is not None:
            trace["heads_out"] = heads_out
        merged = heads_out.transpose(1, 2).reshape(b, n, d)
        return self.dropout(self.proj(merged))

    def attend_sequence(self, x, landmarks, neighbors, reciprocal_bias):
        """The sparse path for one sequence at inference, written for a small exported graph: x [N,D],
        neighbors [N,k], reciprocal_bias [N,k] (0 where reciprocal, -inf elsewhere) -> [N,D]. No batch index,
        no shape arithmetic on N (that was half of the graph's nodes), plain Gathers and batched MatMuls."""
        q, k, v = self.qkv(x).unflatten(-1, (3 * self.heads, self.head_dim)).transpose(0, 1).split(self.heads)
        p = (q @ k[:, landmarks].transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))  # [H,N,L], scaled
        r_t = k @ q[:, landmarks].transpose(-1, -2)  # [H,N,L]: R transposed, so neighbours are rows
        logits = (r_t[:, neighbors] @ p.unsqueeze(-1)).squeeze(-1) + reciprocal_bias  # [H,N,k]
        heads_out = (logits.softmax(-1).unsqueeze(-2) @ v[:, neighbors]).squeeze(-2)  # [H,N,dh]
        return self.proj(heads_out.transpose(0, 1).flatten(1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Post-LN: LN(x + attention(x)), then LN(. + FFN(.))."""

    def __init__(self, cfg: NFormerConfig):
        super().__init__()
        self.attn = LandmarkAgentAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.mlp = FeedForward(cfg.dim, cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=1e-5)

    def forward(self, x, landmarks, neighbors, reciprocal, dense, trace=None):
        x = self.ln_1(x + self.attn(x, landmarks, neighbors, reciprocal, dense, trace))
        return self.ln_2(x + self.mlp(x))

    def forward_sequence(self, x, landmarks, neighbors, reciprocal_bias):
        x = self.ln_1(x + self.attn.attend_sequence(x, landmarks, neighbors, reciprocal_bias))
        return self.ln_2(x + self.mlp(x))


class NFormer(nn.Module):
    """Train mode returns (logits, pre-BN output) for the ID loss and the metric losses; eval mode returns
    the post-BN features. `landmarks` ([layers, L] indices) and `neighbors` ([B,N,k] top-k indices) may be
    injected; otherwise landmarks are drawn from torch's RNG in training (a new draw per layer and call, as
    the official code) and from a fixed seeded draw at inference."""

    def __init__(self, cfg: NFormerConfig):
        super().__init__()
        self.cfg = cfg
        block = Block(cfg)
        self._init_block(block)
        # the official layers are deep copies of one block: all start with identical weights
        self.blocks = nn.ModuleList([block] + [copy.deepcopy(block) for _ in range(cfg.layers - 1)])
        self.bottleneck = nn.BatchNorm1d(cfg.dim)
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(cfg.dim, cfg.num_classes, bias=False) if cfg.num_classes else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    @staticmethod
    def _init_block(block: Block):
        for module in block.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def draw_landmarks(self, n: int, device) -> torch.Tensor:
        count = min(self.cfg.landmarks, n)
        if self.training:
            return torch.stack([torch.randperm(n)[:count] for _ in range(self.cfg.layers)]).to(device)
        return torch.from_numpy(sample_landmarks(n, self.cfg.layers, self.cfg.landmarks, self.cfg.landmark_seed)).to(device)

    def forward(self, z: torch.Tensor, landmarks: torch.Tensor | None = None, neighbors: torch.Tensor | None = None,
                dense: bool = False, trace: dict | None = None):
        b, n, d = z.shape
        if neighbors is None:
            neighbors = topk_neighbors(z, min(self.cfg.topk, n))
        if landmarks is None:
            landmarks = self.draw_landmarks(n, z.device)
        reciprocal = dense_reciprocal_mask(neighbors) if dense else reciprocal_mask(neighbors)
        if trace is not None:
            trace.update(neighbors=neighbors, reciprocal=reciprocal, layers=[])
        x = z
        for layer, block in enumerate(self.blocks):
            layer_trace = {} if trace is not None else None
            x = block(x, landmarks[layer], neighbors, reciprocal, dense, layer_trace)
            if trace is not None:
                trace["layers"].append({**layer_trace, "out": x})
        features = self.bottleneck(x.reshape(b * n, d)).view(b, n, d)
        if self.training:
            if self.classifier is None:
                raise RuntimeError("NFormer built without a classifier (num_classes=0) cannot train")
            return self.classifier(features), x
        return features

    def refine_sequence(self, z: torch.Tensor, neighbors: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Eval-mode `forward` of one sequence (z [N,D], neighbors [N,k], landmarks [layers,L]) -> post-BN [N,D]:
        the same function (tests compare the exported graph with `forward`), as the leaner graph it exports."""
        if self.training:
            raise RuntimeError("refine_sequence is the inference path: call .eval() first")
        # reciprocal_mask of one sequence; shapes taken from tensors (len() would freeze N in the traced graph)
        reciprocal = (neighbors[neighbors] == torch.arange(z.shape[0])[:, None, None]).any(-1)
        bias = torch.zeros_like(reciprocal, dtype=z.dtype).masked_fill(~reciprocal, float("-inf"))
        x = z
        for layer, block in enumerate(self.blocks):
            x = block.forward_sequence(x, landmarks[layer], neighbors, bias)
        return self.bottleneck(x)


# The official state_dict names (modeling/nformer.py, GPT-style Conv1D weights stored [in, out]) mapped onto
# this module's nn.Linear names (stored [out, in]). The one place that knows both.
_OFFICIAL_LAYER_NAMES = {
    "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
    "ln_1": "ln_1", "ln_2": "ln_2",
}


def from_official_state_dict(official: dict[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate an official NFormer state_dict (`h.{l}.*`, optionally under `nformer.`) to ours."""
    ours = {}
    for name, value in official.items():
        value = torch.as_tensor(np.asarray(value))
        name = name.removeprefix("nformer.")
        if not name.startswith("h."):
            ours[name] = value  # bottleneck.* and classifier.weight keep their names
            continue
        _, layer, rest = name.split(".", 2)
        module, leaf = rest.rsplit(".", 1)
        target = f"blocks.{layer}.{_OFFICIAL_LAYER_NAMES[module]}"
        if leaf == "w":
            ours[f"{target}.weight"] = value.T.contiguous()
        elif leaf == "g":
            ours[f"{target}.weight"] = value
        else:
            ours[f"{target}.bias"] = value
    return ours


class ExportableNFormer(nn.Module):
    """What `nformer.onnx` computes: one sequence [N,D] of L2-normalised features, its top-k neighbour indices
    [N,k'] and the landmark indices [layers,L'] (both chosen by the caller, so the graph stays O(N*k) and
    deterministic), to refined, L2-normalised features [N,D]."""

    def __init__(self, nformer: NFormer):
        super().__init__()
        self.nformer = nformer
        self.eval()  # the exporter restores the wrapper's mode afterwards: make that mode eval

    def forward(self, features, neighbors, landmarks):
        return F.normalize(self.nformer.refine_sequence(features, neighbors, landmarks), dim=-1)
