"""Concept-attention maps on joint-attention denoisers (SD 3.x, FLUX.1, FLUX.2, Qwen-Image):
`--maps concept-attention`.

ConceptAttention (Helbling et al., ICML 2025) adds the concept words as extra tokens to each
joint-attention block's TEXT branch. For block l with text-branch modulation from the timestep
embedding (`norm1_context`), its text projections (`add_q_proj`, `add_k_proj`, `add_v_proj`, the
q/k norms `norm_added_q`, `norm_added_k`) and the image tokens' keys K_x and values V_x of the
same pass:

    c~      = norm1_context(c_l, temb)                          (the text stream's pre-attention norm)
    O_c     = softmax(Q(c~) [K_x, K(c~)]^T / sqrt(d)) [V_x, V(c~)]   per head; no text keys
    O_x     = the image tokens' own joint-attention output (the model's, unchanged)
    S_l     = O_x O_c^T        (B, N image tokens, C concepts), the heads concatenated
    c_{l+1} = c_l + g1 * to_add_out(O_c);  c_{l+1} += g2 * ff_context(norm2_context(c_{l+1}) (1 + s2) + b2)

(both outputs before the block's output projections, as ConceptAttention compares them). The
concept tokens read the image but nothing reads them: the image and text streams, and so the
denoiser's output, are exactly what they are without the branch. With several concepts each layer's
map is softmax_C(S_l); with one, S_l itself. The maps are averaged over the chosen layers (and, in
stage 1, over its timesteps).

The concept tokens' input c_0 = the denoiser's `context_embedder` applied to each word's first token
row when the word is encoded alone as a prompt by the family's own text encoders
(`model.conditioning([word])`): ConceptAttention's choice for FLUX (T5's first token of the word).
FLUX's concept tokens have position id 0, as its text tokens do (no rotation); FLUX.2's and
Qwen-Image's text tokens have positions, and their concept tokens none (no rotation either).

The text branch differs by family (`AdaLNZeroBranch`: SD 3.x, FLUX.1; `Flux2Branch`: the
transformer-wide modulation `temb_mod_txt` of affine-free norms; `QwenBranch`: `txt_mod`, `txt_norm1`,
`txt_norm2`, `txt_mlp`, and `txt_in(txt_norm(.))` in place of `context_embedder`); each applies its
family's own modules in the order the block does.

Implementation: a forward pre-hook on the transformer (starts the concept stream), one on each
joint block (the block's `temb`: the text-branch modulation of the concepts) and the blocks'
attention processors swapped through `set_attn_processor`; all removed / restored on exit, also
when the block raises.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from conceptseg.attention import CrossAttentionStore, swapped_processors
from conceptseg.families.base import DiffusionModel
from conceptseg.joint_attention import qwen_qkv, sd3_attend, sd3_project, sd3_qkv

MAP_KINDS = ("cross-attention", "concept-attention")
JOINT_FAMILIES = ("sd3", "flux", "flux2", "qwenimage")


def check_supports_concept_attention(model: DiffusionModel) -> None:
    """One clear error for a family without joint attention (SD 1.x/2.x, SDXL)."""
    if getattr(model, "family", "sd") not in JOINT_FAMILIES:
        raise ValueError(f"--maps concept-attention needs a joint-attention model (SD 3.x, FLUX.1, FLUX.2 or Qwen-Image); "
                         f"{model.describe()} has cross-attention layers only: use --maps cross-attention")


def resolve_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    """Block indices from `concept_layers` (None: every block; negative indices count from the end)."""
    if layers is None:
        return list(range(count))
    resolved = sorted({i % count for i in layers if -count <= i < count})
    if len(resolved) != len(set(layers)):
        raise ValueError(f"concept_layers {list(layers)} names blocks the model does not have: it has {count} "
                         f"joint-attention blocks (0..{count - 1}, or -{count}..-1)")
    return resolved


@torch.no_grad()
def embed_concepts(model: DiffusionModel, words: Sequence[str]) -> torch.Tensor:
    """(1, C, W_text): each word's first token row of `model.conditioning([word])`."""
    rows = []
    for word in words:
        first = model.concept_token_positions(word, [word])[0][0]
        rows.append(model.conditioning([word]).prompt_embeds[0, first])
    return torch.stack(rows)[None]


class AdaLNZeroBranch:
    """The text branch of SD 3.x's and FLUX.1's joint blocks: `norm1_context` is an AdaLayerNormZero
    of the block's `temb` (SD 3's last block: AdaLayerNormContinuous, no text output), the MLP
    `ff_context` after `norm2_context`."""

    @staticmethod
    def embed(transformer, x: torch.Tensor) -> torch.Tensor:
        return transformer.context_embedder(x.to(transformer.context_embedder.weight.dtype))

    @staticmethod
    def enter(block, residual: torch.Tensor, args, kwargs) -> tuple[torch.Tensor, tuple | None]:
        temb = kwargs["temb"] if "temb" in kwargs else args[2]
        if getattr(block, "context_pre_only", False):
            return block.norm1_context(residual, temb), None
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(residual, emb=temb)
        return normed, (gate_msa, shift_mlp, scale_mlp, gate_mlp)

    @staticmethod
    def leave(block, attn, residual: torch.Tensor, heads_out: torch.Tensor, state: tuple) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = state
        c = residual + gate_msa.unsqueeze(1) * attn.to_add_out(heads_out)
        normed = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return c + gate_mlp.unsqueeze(1) * block.ff_context(normed)


class Flux2Branch(AdaLNZeroBranch):
    """FLUX.2's double-stream blocks: affine-free `norm1_context` / `norm2_context` modulated by the
    transformer-wide text modulation `temb_mod_txt` (shift, scale, gate for attention and MLP)."""

    @staticmethod
    def enter(block, residual, args, kwargs):
        from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

        mod = kwargs["temb_mod_txt"] if "temb_mod_txt" in kwargs else args[3]
        (shift, scale, gate), (shift2, scale2, gate2) = Flux2Modulation.split(mod, 2)
        return (1 + scale) * block.norm1_context(residual) + shift, (gate, shift2, scale2, gate2)

    @staticmethod
    def leave(block, attn, residual, heads_out, state):
        gate, shift2, scale2, gate2 = state
        c = residual + gate * attn.to_add_out(heads_out)
        return c + gate2 * block.ff_context(block.norm2_context(c) * (1 + scale2) + shift2)


class QwenBranch:
    """Qwen-Image's blocks: the text enters through `txt_norm` and `txt_in`; per block `txt_mod(temb)`
    modulates `txt_norm1` (attention) and `txt_norm2` (`txt_mlp`), through the block's own `_modulate`."""

    @staticmethod
    def embed(transformer, x: torch.Tensor) -> torch.Tensor:
        return transformer.txt_in(transformer.txt_norm(x.to(transformer.txt_in.weight.dtype)))

    @staticmethod
    def enter(block, residual, args, kwargs):
        temb = kwargs["temb"] if "temb" in kwargs else args[3]
        if block.zero_cond_t:  # as the block: the text is modulated by the first half
            temb = torch.chunk(temb, 2, dim=0)[0]
        mod1, mod2 = block.txt_mod(temb).chunk(2, dim=-1)
        normed, gate1 = block._modulate(block.txt_norm1(residual), mod1)
        return normed, (gate1, mod2)

    @staticmethod
    def leave(block, attn, residual, heads_out, state):
        gate1, mod2 = state
        c = residual + gate1 * attn.to_add_out(heads_out)
        normed, gate2 = block._modulate(block.txt_norm2(c), mod2)
        return c + gate2 * block.txt_mlp(normed)


@dataclass
class ConceptStream:
    """The concept tokens' residual stream through one forward pass and the per-layer maps."""

    embeds: torch.Tensor  # (1, C, W_text) from `embed_concepts`
    recorded: set[int]  # block indices whose maps are kept
    store: CrossAttentionStore
    softmax: bool
    branch: object = AdaLNZeroBranch  # the family's text branch: embed, enter, leave
    residual: torch.Tensor | None = field(default=None, repr=False)  # (B, C, D)
    pending: tuple | None = field(default=None, repr=False)  # (index, block, normed, state) of the running block

    def start(self, transformer, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        c0 = self.branch.embed(transformer, self.embeds.to(hidden.device))
        self.residual, self.pending = c0.expand(hidden.shape[0], -1, -1), None

    def enter_block(self, index: int, block, args, kwargs) -> None:
        """The text branch's pre-attention norm and modulation of the concept tokens."""
        normed, state = self.branch.enter(block, self.residual, args, kwargs)
        self.pending = (index, block, normed, state)

    def finish_block(self, attn, heads_out: torch.Tensor, o_img: torch.Tensor) -> None:
        """Record this layer's map from the concept and image attention outputs (B, C|N, H*D), and
        carry the concept tokens through the text branch's output projection and MLP."""
        index, block, _, state = self.pending
        if index in self.recorded:
            scores = o_img.float() @ heads_out.float().transpose(1, 2)  # (B, N, C)
            self.store.add_maps(scores.softmax(-1) if self.softmax else scores)
        if state is None:
            return
        c = self.branch.leave(block, attn, self.residual, heads_out, state)
        self.residual = c.clip(-65504, 65504) if c.dtype == torch.float16 else c  # as the blocks do


def concept_qkv(attn, normed: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text projections and q/k norms of `attn` applied to the concept tokens: (B, H, C, D) each."""
    if fused:
        q, k, v = attn.to_added_qkv(normed).chunk(3, dim=-1)
    else:
        q, k, v = attn.add_q_proj(normed), attn.add_k_proj(normed), attn.add_v_proj(normed)
    q, k, v = (x.unflatten(-1, (attn.heads, -1)) for x in (q, k, v))  # (B, C, H, D)
    if attn.norm_added_q is not None:
        q = attn.norm_added_q(q)
    if attn.norm_added_k is not None:
        k = attn.norm_added_k(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def concept_outputs(stream: ConceptStream, attn, k_img: torch.Tensor, v_img: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The concept tokens' attention output over [image, concept] keys: (B, C, H*D). k_img, v_img (B, H, N, D)."""
    q, k, v = concept_qkv(attn, stream.pending[2], fused)
    out = F.scaled_dot_product_attention(q, torch.cat([k_img, k], dim=2), torch.cat([v_img, v], dim=2))
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


class SD3ConceptProcessor:
    """`JointAttnProcessor2_0`'s computation (image tokens first, then text), plus the concept branch."""

    def __init__(self, stream: ConceptStream):
        self.stream = stream

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        image, text = sd3_qkv(attn, hidden_states, encoder_hidden_states)
        out, context = sd3_attend(image, text)
        self.stream.finish_block(attn, concept_outputs(self.stream, attn, image[1], image[2]), out)
        return sd3_project(attn, out, context)


class FluxConceptProcessor:
    """`FluxAttnProcessor`'s computation for a double-stream block (text tokens first), plus the
    concept branch."""

    def __init__(self, stream: ConceptStream):
        self.stream = stream

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        fused = attn.fused_projections
        if fused:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            cq, ck, cv = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                          attn.add_v_proj(encoder_hidden_states))
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))
        q, k, v = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
        cq, ck, cv = attn.norm_added_q(heads(cq)), attn.norm_added_k(heads(ck)), heads(cv)
        q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask)  # (B, S, H, D), as FluxAttnProcessor
        out = out.flatten(2, 3).to(q.dtype)
        t = encoder_hidden_states.shape[1]
        context, out = out.split_with_sizes([t, out.shape[1] - t], dim=1)
        k_img, v_img = k[:, t:].transpose(1, 2), v[:, t:].transpose(1, 2)  # after the rotation, as the text sees them
        self.stream.finish_block(attn, concept_outputs(self.stream, attn, k_img, v_img, fused), out)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


class QwenConceptProcessor:
    """`QwenDoubleStreamAttnProcessor2_0`'s computation ([text, image], the text's padding masked),
    plus the concept branch (the concept tokens are not rotated: no RoPE position, as FLUX's id 0)."""

    def __init__(self, stream: ConceptStream):
        self.stream = stream

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        (q, k, v), (cq, ck, cv), attention_mask = qwen_qkv(attn, hidden_states, encoder_hidden_states,
                                                           encoder_hidden_states_mask, attention_mask, image_rotary_emb)
        t = encoder_hidden_states.shape[1]
        out = dispatch_attention_fn(torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1),
                                    attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).to(q.dtype)
        context, img = out[:, :t], out[:, t:]
        self.stream.finish_block(attn, concept_outputs(self.stream, attn, k.transpose(1, 2), v.transpose(1, 2)), img)
        img = attn.to_out[0](img.contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(context.contiguous())


@contextmanager
def capture_concept_attention(transformer, embeds: torch.Tensor, grid: tuple[int, int], processor_class,
                              layers: Sequence[int] | None = None, softmax: bool | None = None,
                              branch=AdaLNZeroBranch) -> Iterator[CrossAttentionStore]:
    """Within the block, every forward pass of `transformer` (SD 3, FLUX.1, FLUX.2 or Qwen-Image)
    carries the concepts `embeds` (1, C, W_text) through its joint blocks (`transformer_blocks`, with
    the family's text `branch`) and adds the maps of blocks `layers` (default: all) to the yielded
    store, one group per concept. `softmax` (default: with more than one concept) over the concepts per layer."""
    blocks = transformer.transformer_blocks
    store = CrossAttentionStore([[i] for i in range(embeds.shape[1])], grid)
    stream = ConceptStream(embeds, set(resolve_layers(layers, len(blocks))), store,
                           embeds.shape[1] > 1 if softmax is None else softmax, branch)
    names = {f"transformer_blocks.{i}.attn.processor" for i in range(len(blocks))}
    with ExitStack() as stack:
        handles = [transformer.register_forward_pre_hook(stream.start, with_kwargs=True)]
        stack.callback(lambda: [h.remove() for h in handles])
        handles += [block.register_forward_pre_hook(_block_hook(stream, i, block), with_kwargs=True)
                    for i, block in enumerate(blocks)]
        stack.enter_context(swapped_processors(transformer, names.__contains__, processor_class(stream)))
        yield store


def _block_hook(stream: ConceptStream, index: int, block) -> Callable:
    return lambda module, args, kwargs: stream.enter_block(index, block, args, kwargs)


def foreground_map(maps: torch.Tensor, n_foreground: int, softmax: bool, valid: np.ndarray) -> torch.Tensor:
    """Stage 1's map from the per-concept maps (N, C, h, w): the sum of the first `n_foreground`
    concepts' maps. With the softmax (competing concepts) it is a probability in [0, 1]; without it
    (raw dot products, any scale and sign) it is min-max scaled to [0, 1] over each image's `valid`
    cells, so that the GMM sees the same values whatever the scale of the model's outputs."""
    fg = maps[:, :n_foreground].sum(1)
    if softmax:
        return fg
    ok = torch.as_tensor(valid, device=fg.device)
    lo = torch.where(ok, fg, torch.inf).flatten(1).amin(1)[:, None, None]
    hi = torch.where(ok, fg, -torch.inf).flatten(1).amax(1)[:, None, None]
    return torch.where(ok, (fg - lo) / (hi - lo).clamp_min(torch.finfo(fg.dtype).tiny), 0.0)
