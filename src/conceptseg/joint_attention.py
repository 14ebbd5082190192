"""Capture of image-to-text attention inside joint (MMDiT) attention: SD 3.x, FLUX.1, FLUX.2 and
Qwen-Image.

In a joint block image and text tokens attend together in one softmax. Stage 1 wants, for each
image query, its attention to the concept's text tokens. Two readings:

- "text" (default): the image-to-text block renormalised over the text keys, i.e. the softmax of
  the image queries' text logits alone: a distribution over text tokens per image position, as
  cross-attention gives in SD 1.x (what METHOD.md §1 averages).
- "joint": the columns of the full joint softmax as the model computes it (their sum over text
  tokens is below 1; the rest goes to image keys). The normaliser is a logsumexp over all keys,
  accumulated over key chunks.

The block's output is computed as usual with fused SDPA; the probabilities are computed apart,
chunked over heads and queries so that no (queries x keys) matrix for all heads is ever held, and
only the concept columns (head-averaged) are kept. Processors are swapped through the public
`set_attn_processor` API and restored on exit (`attention.swapped_processors`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from conceptseg.attention import CrossAttentionStore, swapped_processors

NORMALISATIONS = ("text", "joint")
# Elements of one float32 score block (query chunk x keys x heads x batch): 2^25 = 128 MiB.
SCORE_BLOCK_ELEMENTS = 2**25


def concept_columns(q_img: torch.Tensor, k_txt: torch.Tensor, k_img: torch.Tensor | None, groups: Sequence[Sequence[int]],
                    normalisation: str = "text", block: int = SCORE_BLOCK_ELEMENTS,
                    text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of image queries to each token group (the mean over its tokens).

    q_img (B, H, N, D); k_txt (B, H, T, D); k_img (B, H, N', D), used with "joint" only; text_mask
    (B, T) bool: the text keys the model attends to (Qwen-Image's padding is masked), None: all.
    Returns (B, N, G) float32. Scores are in float32 with SDPA's default scale 1/sqrt(D).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown attention normalisation {normalisation!r}; use one of {', '.join(NORMALISATIONS)}")
    b, heads, n, d = q_img.shape
    t = k_txt.shape[2]
    scale = d**-0.5
    key_chunk = t if normalisation == "text" else max(t, min(k_img.shape[2], max(1, block // max(1, b * n))))
    head_chunk = max(1, min(heads, block // max(1, b * n * key_chunk)))
    query_chunk = max(1, min(n, block // max(1, b * head_chunk * key_chunk)))
    out = torch.zeros(b, n, len(groups), device=q_img.device, dtype=torch.float32)
    for h0 in range(0, heads, head_chunk):
        kt = k_txt[:, h0 : h0 + head_chunk].float()
        for n0 in range(0, n, query_chunk):
            q = q_img[:, h0 : h0 + head_chunk, n0 : n0 + query_chunk].float()
            logits = (q @ kt.transpose(-1, -2)) * scale  # (B, h, q, T)
            if text_mask is not None:
                logits = logits.masked_fill(~text_mask.bool()[:, None, None, :], float("-inf"))
            lse = logits.logsumexp(-1)
            if normalisation == "joint":
                for k0 in range(0, k_img.shape[2], key_chunk):
                    ki = k_img[:, h0 : h0 + head_chunk, k0 : k0 + key_chunk].float()
                    lse = torch.logaddexp(lse, ((q @ ki.transpose(-1, -2)) * scale).logsumexp(-1))
            for j, g in enumerate(groups):
                probs = (logits[..., list(g)] - lse.unsqueeze(-1)).exp()  # (B, h, q, |g|)
                out[:, n0 : n0 + query_chunk, j] += probs.mean(-1).sum(1)
    return out / heads


def qwen_qkv(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, attention_mask=None,
             image_rotary_emb=None):
    """`QwenDoubleStreamAttnProcessor2_0`'s projections: ((q, k, v) of the image tokens, (q, k, v) of
    the text tokens), each (B, S, H, D) after the block's q/k norms and each stream's RoPE, and the
    attention mask over [text, image] that masks the text's padding."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    if encoder_hidden_states_mask is not None:
        image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
    head_dim = attn.inner_dim // attn.heads
    heads = lambda x: x.unflatten(-1, (-1, head_dim))  # noqa: E731
    q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
    cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
    cv = heads(attn.add_v_proj(encoder_hidden_states))
    q, k = (attn.norm_q(q) if attn.norm_q is not None else q), (attn.norm_k(k) if attn.norm_k is not None else k)
    cq = attn.norm_added_q(cq) if attn.norm_added_q is not None else cq
    ck = attn.norm_added_k(ck) if attn.norm_added_k is not None else ck
    if image_rotary_emb is not None:
        img_freqs, txt_freqs = image_rotary_emb
        q, k = apply_rotary_emb_qwen(q, img_freqs, use_real=False), apply_rotary_emb_qwen(k, img_freqs, use_real=False)
        cq, ck = apply_rotary_emb_qwen(cq, txt_freqs, use_real=False), apply_rotary_emb_qwen(ck, txt_freqs, use_real=False)
    return (q, k, v), (cq, ck, cv), attention_mask


def sd3_qkv(attn, hidden_states, encoder_hidden_states=None):
    """`JointAttnProcessor2_0`'s projections: ((q, k, v) of the image tokens, (q, k, v) of the text
    tokens, or None without `encoder_hidden_states`), each (B, H, S, D) after the block's q/k norms."""
    b = hidden_states.shape[0]
    split = lambda x: x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
    q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if encoder_hidden_states is None:
        return (q, k, v), None
    cq = split(attn.add_q_proj(encoder_hidden_states))
    ck = split(attn.add_k_proj(encoder_hidden_states))
    cv = split(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    return (q, k, v), (cq, ck, cv)


def sd3_attend(image, text):
    """The joint softmax over [image, text] tokens (fused SDPA), as `JointAttnProcessor2_0` computes it:
    (the image tokens' output (B, N, H*D), the text tokens' or None), before the output projections."""
    q, k, v = image if text is None else (torch.cat([a, c], dim=2) for a, c in zip(image, text))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[-1]).to(q.dtype)
    n = image[0].shape[2]
    return (out, None) if text is None else (out[:, :n], out[:, n:])


def sd3_project(attn, out, context):
    """The block's output projections of `sd3_attend`'s outputs (the text's: not in SD 3's last block)."""
    out = attn.to_out[1](attn.to_out[0](out))
    if context is None:
        return out
    return out, context if attn.context_pre_only else attn.to_add_out(context)


class SD3CaptureProcessor:
    """`JointAttnProcessor2_0`'s computation (image tokens first, then text) plus the capture."""

    def __init__(self, store: CrossAttentionStore, normalisation: str = "text"):
        self.store, self.normalisation = store, normalisation

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        image, text = sd3_qkv(attn, hidden_states, encoder_hidden_states)
        if text is not None:
            self.store.add_maps(concept_columns(image[0], text[1], image[1], self.store.token_groups, self.normalisation))
        return sd3_project(attn, *sd3_attend(image, text))


class FluxCaptureProcessor:
    """`FluxAttnProcessor`'s computation (text tokens first; double-stream blocks get the text as
    `encoder_hidden_states`, single-stream blocks get [text, image] as one sequence of which the
    first `text_len` are text) plus the capture."""

    def __init__(self, store: CrossAttentionStore, text_len: int, normalisation: str = "text"):
        self.store, self.text_len, self.normalisation = store, text_len, normalisation

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))
        q, k, v = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            if attn.fused_projections:
                cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                cq, ck, cv = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                              attn.add_v_proj(encoder_hidden_states))
            cq, ck, cv = attn.norm_added_q(heads(cq)), attn.norm_added_k(heads(ck)), heads(cv)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
            text_len = encoder_hidden_states.shape[1]
        else:
            text_len = self.text_len
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        self.store.add_maps(concept_columns(q[:, :, text_len:], k[:, :, :text_len], k[:, :, text_len:],
                                            self.store.token_groups, self.normalisation))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            context, out = out[:, :text_len], out[:, text_len:]
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(context.contiguous())
        return out


class Flux2CaptureProcessor(FluxCaptureProcessor):
    """FLUX.2: `Flux2AttnProcessor`'s double-stream computation is FLUX.1's (`FluxCaptureProcessor`);
    the single-stream blocks' `Flux2ParallelSelfAttnProcessor` fuses q/k/v with the MLP's input
    projection and the attention output with the MLP's output ([text, image] in one sequence, the
    first `text_len` text). One instance serves both kinds of block."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if not hasattr(attn, "to_qkv_mlp_proj"):
            return super().__call__(attn, hidden_states, *args, **kwargs)
        attention_mask, image_rotary_emb = (list(args) + [None, None])[:2]
        h = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        n = h.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(h, [n, h.shape[-1] - n], dim=-1)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        t = self.text_len
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        self.store.add_maps(concept_columns(qh[:, :, t:], kh[:, :, :t], kh[:, :, t:], self.store.token_groups,
                                            self.normalisation))
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask).flatten(2, 3).to(q.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class QwenCaptureProcessor:
    """`QwenDoubleStreamAttnProcessor2_0`'s computation ([text, image] in one softmax, the text's
    padding masked by `encoder_hidden_states_mask`; text and image rotated by their own RoPE) plus
    the capture."""

    def __init__(self, store: CrossAttentionStore, normalisation: str = "text"):
        self.store, self.normalisation = store, normalisation

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        (q, k, v), (cq, ck, cv), attention_mask = qwen_qkv(attn, hidden_states, encoder_hidden_states,
                                                           encoder_hidden_states_mask, attention_mask, image_rotary_emb)
        self.store.add_maps(concept_columns(q.transpose(1, 2), ck.transpose(1, 2), k.transpose(1, 2), self.store.token_groups,
                                            self.normalisation, text_mask=encoder_hidden_states_mask))
        t = encoder_hidden_states.shape[1]
        out = dispatch_attention_fn(torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1),
                                    attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).to(q.dtype)
        img = attn.to_out[0](out[:, t:].contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(out[:, :t].contiguous())


@contextmanager
def capture_joint_attention(model, chosen: Callable[[str], bool], processor_for: Callable[[CrossAttentionStore], object],
                            token_groups: Sequence[Sequence[int]], grid: tuple[int, int],
                            per_level: bool = False) -> Iterator[CrossAttentionStore]:
    """Within the block, the `chosen` joint-attention layers of `model` add their maps to the yielded store."""
    store = CrossAttentionStore(token_groups, grid, per_level=per_level)
    with swapped_processors(model, chosen, processor_for(store)):
        yield store
