"""Capture of cross-attention maps through diffusers' public attention-processor API.

Only cross-attention (`attn2`) layers get the capturing processor; self-attention keeps whatever
fused processor the model had. For each captured layer only the requested token columns are kept,
averaged over heads (and over the tokens of one word), nearest-upsampled to the latent grid and
summed as they come: no full attention tensor outlives its layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F


class CrossAttentionStore:
    """Running sum over layers of the chosen token groups' head-averaged attention, per batch row."""

    def __init__(self, token_groups: Sequence[Sequence[int]], latent_hw: tuple[int, int], per_level: bool = False):
        if not token_groups or any(len(g) == 0 for g in token_groups):
            raise ValueError("every token group needs at least one token position")
        self.token_groups = [list(g) for g in token_groups]
        self.latent_hw = latent_hw
        self.per_level = per_level  # also keep a sum per UNet resolution (a diagnostic)
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None  # (B, G, H, W) float32
        self.num_layers = 0
        self.level_totals: dict[str, torch.Tensor] = {}  # "16x16" -> (B, G, H, W), with per_level
        self.level_layers: dict[str, int] = {}

    def _grid(self, n: int) -> tuple[int, int]:
        h, w = self.latent_hw
        for f in (1, 2, 4, 8, 16, 32, 64):
            gh, gw = -(-h // f), -(-w // f)
            if gh * gw == n:
                return gh, gw
        raise ValueError(f"cannot place {n} attention queries on a {h}x{w} latent grid")

    def add(self, probs: torch.Tensor) -> None:
        """probs: (B, heads, N, T) softmax over T text tokens for N = h*w image positions."""
        cols = torch.stack([probs[..., g].mean(-1) for g in self.token_groups], dim=-1)  # (B, heads, N, G)
        self.add_maps(cols.mean(1))

    def add_maps(self, cols: torch.Tensor) -> None:
        """cols: (B, N, G) head-averaged attention of N = h*w image positions to each token group."""
        b, n, _ = cols.shape
        grid = self._grid(n)
        maps = cols.transpose(1, 2).reshape(b, len(self.token_groups), *grid).float()
        maps = F.interpolate(maps, size=self.latent_hw, mode="nearest")
        self.total = maps if self.total is None else self.total + maps
        self.num_layers += 1
        if self.per_level:
            level = f"{grid[0]}x{grid[1]}"
            self.level_totals[level] = self.level_totals[level] + maps if level in self.level_totals else maps
            self.level_layers[level] = self.level_layers.get(level, 0) + 1

    def pop_mean(self) -> torch.Tensor:
        """Equal-weight mean over the layers seen since the last call, (B, G, H, W); then reset."""
        if self.total is None:
            raise RuntimeError("no cross-attention layer ran: does this UNet have attn2 layers?")
        mean = self.total / self.num_layers
        self.reset()
        return mean

    def pop_level_means(self) -> dict[str, torch.Tensor]:
        """With `per_level`: the mean over each resolution's layers since the last call, keyed
        "HxW" of the attention grid; then reset."""
        if not self.per_level:
            raise RuntimeError("this store was made without per_level=True")
        if not self.level_totals:
            raise RuntimeError("no cross-attention layer ran: does this UNet have attn2 layers?")
        means = {k: self.level_totals[k] / self.level_layers[k] for k in self.level_totals}
        self.reset()
        return means


class CrossAttentionCaptureProcessor:
    """Attention with explicit probabilities (cross-attention has only 77 keys, so this is cheap);
    the output is computed from the same probabilities, so the forward pass is unchanged."""

    def __init__(self, store: CrossAttentionStore):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(b, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        # scores in fp32 whatever the model dtype: fp16 SD 2.x relies on upcast attention
        scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b)
            scores = scores + mask.view(b, attn.heads, -1, mask.shape[-1]).float()
        probs = scores.softmax(dim=-1)
        self.store.add(probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def is_cross_attention(name: str) -> bool:
    return name.endswith("attn2.processor")


@contextmanager
def swapped_processors(model, chosen: Callable[[str], bool], processor) -> Iterator[None]:
    """Within the block, the attention layers whose processor name is `chosen` use `processor`;
    every layer gets its original processor back on exit, also when the block raises.

    Only the public `attn_processors` / `set_attn_processor` API is used (no class patching).
    """
    original = dict(model.attn_processors)
    if not any(chosen(name) for name in original):
        raise RuntimeError(f"{type(model).__name__} has no attention layer to capture")
    # set_attn_processor pops entries from the dict it is given: always hand it a fresh one.
    model.set_attn_processor({name: processor if chosen(name) else proc for name, proc in original.items()})
    try:
        yield
    finally:
        model.set_attn_processor(dict(original))


@contextmanager
def capture_cross_attention(unet, token_groups: Sequence[Sequence[int]], latent_hw: tuple[int, int],
                            per_level: bool = False) -> Iterator[CrossAttentionStore]:
    """Within the block, every cross-attention layer of `unet` adds its maps to the yielded store.

    The original processors are restored on exit, also when the block raises.
    """
    store = CrossAttentionStore(token_groups, latent_hw, per_level=per_level)
    with swapped_processors(unet, is_cross_attention, CrossAttentionCaptureProcessor(store)):
        yield store
