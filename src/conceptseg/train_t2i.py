"""`conceptseg train-t2i`: train a small text-to-image latent diffusion model, or fine-tune one.

Two modes. From scratch (`preset`): build a VAE, a CLIP text encoder (real tokenizer) and a UNet
from a named preset, train the VAE first, then the UNet and text encoder on the frozen latents.
Fine-tune (`base_model`): continue training an existing diffusers model's UNet on new
image-caption pairs (the paper's medical step, METHOD.md §6), streamed: each step reads and encodes
only its batch's images, so a dataset of any size (MIMIC-CXR: `--data mimic-cxr:ROOT`) fits. Either way the result is a standard
diffusers folder (`OUT/model`) and a sample grid (`OUT/samples.png`).

accelerate runs it on one or several processes (`accelerate launch`), CPU or GPU, with mixed
precision. A step is one optimiser update (of `gradient_accumulation` micro-batches); gradients are
clipped to `max_grad_norm` (diffusers' default 1). Checkpoints (`OUT/checkpoints/step-N`) hold the
accelerate state and the EMA weights; a re-run resumes from the last one with the same data order,
after checking it was made with the same settings (`steps` may grow: the warm-up-then-constant
rate does not depend on it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from conceptseg.data.imagefolder import read_imagefolder
from conceptseg.data.medical import drop_negated_sentences, read_pairs
from conceptseg.geometry import Canvas, load_rgb, to_model_input
from conceptseg.io import publish, save_png, write_folder, write_json
from conceptseg.modeling import build_components
from conceptseg.models import load_model, save_model
from conceptseg.settings import added_setting, execution_setting
from conceptseg.schedules import diffusion_target, scheduler_from_config
from conceptseg.training import (Checkpoints, OptimiserSteps, Precision, check_finite, checkpoint_settings, last_checkpoint,
                                 min_snr_weight, step_rng, trainer_accelerator, with_ema_weights)


@dataclass
class TrainT2IConfig:
    data: Path | str  # imagefolder dataset; fine-tuning also takes "mimic-cxr:ROOT[,reports=DIR][,section=S]"
    out: Path
    preset: str | None = "toy"  # train from scratch with this architecture ...
    base_model: str | None = None  # ... or fine-tune this diffusers model (then preset is ignored)
    steps: int = 3000  # optimiser steps (each of gradient_accumulation micro-batches)
    vae_steps: int = 800
    decoder_steps: int = 0  # from scratch: then fine-tune the VAE decoder alone (encoder frozen) this long
    batch_size: int = 32
    lr: float | None = None  # default: 1e-3 from scratch, 1e-5 fine-tuning
    vae_lr: float = 1e-3
    warmup_steps: int = 300
    caption_dropout: float = 0.1  # empty caption, so classifier-free guidance is possible
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    train_text_encoder: bool | None = None  # default: from scratch yes, fine-tuning no
    # fine-tuning: words whose token embeddings start again from random (the base model's meaning of
    # them is dropped), e.g. ["background"] so that a model never learns the method's prompt as a caption
    forget_words: list[str] = field(default_factory=list)
    # fine-tuning: transformer layers added to the text encoder, starting as the identity; a context-free
    # encoder (no layers, as the embedded toy model's) reads "No pneumothorax." and "Large pneumothorax."
    # alike, so a report's negation can only be learnt with some
    context_layers: int = 0
    # reports: their sentences that negate one of these words ("No pneumothorax.") are left out of the
    # captions; a context-free encoder otherwise sees the word as often without the finding as with it
    # (docs/medical.md). None: captions as written (RoentGen's and the paper's fine-tuning)
    drop_negated: list[str] | None = added_setting(None)
    # fine-tuning: transformer blocks added to each of the UNet's cross-attention blocks (down, mid, up),
    # starting as the identity: more of the denoiser's layers read the prompt at each resolution
    attention_layers: int = added_setting(0)
    checkpoint_every: int = execution_setting(250)
    checkpoints_total_limit: int | None = execution_setting(2)  # keep the newest N checkpoints (None: all)
    mixed_precision: str = "no"
    gradient_accumulation: int = 1
    max_grad_norm: float | None = 1.0  # clip gradients to this norm (diffusers' default); None: no clipping
    seed: int = 0
    sample_prompts: list[str] = field(default_factory=list)  # default: the dataset's single-class captions
    samples_per_prompt: int = 4
    sample_guidance: float = 1.0
    progress: bool = execution_setting(True)


# settings of what is made after the UNet's training (the decoder's fine-tuning, the sample grid):
# its checkpoints do not depend on them
AFTER_THE_UNET = ("decoder_steps", "sample_prompts", "samples_per_prompt", "sample_guidance")


def training_caption(cfg: TrainT2IConfig, text: str) -> str:
    """A pair's text as the model is trained on it."""
    return drop_negated_sentences(text, cfg.drop_negated) if cfg.drop_negated else text


def _load_pairs(cfg: TrainT2IConfig, resolution: int) -> tuple[np.ndarray, list[str]]:
    rows = [r for r in read_imagefolder(cfg.data) if r.split != "test"]
    if not rows:
        raise ValueError(f"{cfg.data}: no training rows (split != 'test') in metadata.jsonl")
    images, captions = [], []
    for r in tqdm(rows, desc="loading images", disable=not cfg.progress, leave=False):
        im = load_rgb(r.image)
        images.append(Canvas(im.width, im.height, resolution).place(im))
        captions.append(training_caption(cfg, r.caption))
    return np.stack(images), captions


class _VAEObjective(torch.nn.Module):
    """Reconstruction (L1 + MSE) with a small KL term, as in latent diffusion's first stage; a module
    of its own so DDP sees one forward pass."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean()


def train_vae(vae, images: np.ndarray, cfg: TrainT2IConfig, accelerator, decoder_only: bool = False) -> None:
    """The VAE from scratch, or (`decoder_only`) its decoder with the encoder frozen: sharper
    reconstructions without moving the latent space a UNet has already learned (as SD's ft-MSE VAE)."""
    precision = Precision(cfg.mixed_precision, accelerator.device)
    vae.train().requires_grad_(not decoder_only)
    if decoder_only:
        vae.encoder.eval()
        for part in (vae.decoder, vae.post_quant_conv):
            part.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    objective, opt = accelerator.prepare(_VAEObjective(vae), torch.optim.AdamW(params, lr=cfg.vae_lr))
    updates = OptimiserSteps(accelerator, precision, opt, params, cfg.gradient_accumulation, cfg.max_grad_norm)
    steps, stream = (cfg.decoder_steps, 7) if decoder_only else (cfg.vae_steps, 1)
    bar = tqdm(range(steps), desc="train VAE decoder" if decoder_only else "train VAE",
               disable=not (cfg.progress and accelerator.is_main_process))
    for step in bar:
        for i in range(cfg.gradient_accumulation):
            rng = step_rng(cfg.seed, stream, step * cfg.gradient_accumulation + i, accelerator.process_index)
            x = to_model_input(images[rng.integers(0, len(images), cfg.batch_size)], accelerator.device)
            with updates.micro_batch(i, objective):
                with precision.autocast():
                    loss = objective(x)
                updates.backward(loss)
        updates.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    accelerator.free_memory()  # the UNet phase's checkpoints hold only the UNet phase's objects


@torch.no_grad()
def _encode_batch(vae, paths: list[Path], resolution: int, gen: torch.Generator, device) -> torch.Tensor:
    """Read, place (one geometry) and encode a batch's images; a latent sample drawn with `gen` (CPU)."""
    placed = []
    for p in paths:
        im = load_rgb(p)
        placed.append(Canvas(im.width, im.height, resolution).place(im))
    d = vae.encode(to_model_input(np.stack(placed), device, vae.dtype)).latent_dist
    return (d.mean.float().cpu() + d.std.float().cpu() * torch.randn(d.mean.shape, generator=gen))


@torch.no_grad()
def _latent_moments(vae, images: np.ndarray, device, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), chunk):
        d = vae.encode(to_model_input(images[i : i + chunk], device, vae.dtype)).latent_dist
        means.append(d.mean.float().cpu())
        stds.append(d.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _add_missing_ema_file(out: Path, train_te: bool, accelerator: Accelerator) -> None:
    """Checkpoints from before ema.safetensors existed kept the EMA weights only in their model
    export; rebuild the file from it so such a run resumes."""
    ckpt = last_checkpoint(out)
    if ckpt is None or (ckpt / "ema.safetensors").exists() or not (ckpt / "model").exists() or not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    from safetensors.torch import save_file

    exported = load_model(ckpt / "model", device="cpu", dtype="fp32")
    params = list(exported.unet.parameters()) + (list(exported.text_encoder.parameters()) if train_te else [])
    save_file({str(i): p.detach().contiguous() for i, p in enumerate(params)}, ckpt / "ema.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    state.setdefault("ema_optimization_step", state["step"])
    write_json(ckpt / "state.json", state)
    accelerator.wait_for_everyone()


def _train_unet(cfg: TrainT2IConfig, unet_p, te_p, scheduler, batch, updates: OptimiserSteps, checkpoints: Checkpoints,
                start: int) -> None:
    """The UNet (and text encoder) loop, from step `start` to `cfg.steps` optimiser steps;
    `batch(k)` gives micro-batch k's clean latents, noise, timesteps and token ids."""
    accelerator, precision = updates.accelerator, updates.precision
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train UNet",
               disable=not (cfg.progress and accelerator.is_main_process))
    for step in bar:
        for i in range(cfg.gradient_accumulation):
            z0, noise, t, ids = batch(step * cfg.gradient_accumulation + i)
            zt = scheduler.add_noise(z0, noise, t)
            with updates.micro_batch(i, unet_p, te_p):
                with precision.autocast():
                    pred = unet_p(zt, t, te_p(ids)[0]).sample
                per_sample = F.mse_loss(pred.float(), diffusion_target(scheduler, z0, noise, t).float(), reduction="none").mean(dim=(1, 2, 3))
                loss = (per_sample * min_snr_weight(alphas_cumprod, t, cfg.min_snr_gamma, scheduler.config.prediction_type)).mean()
                if check_finite(loss, step + 1, checkpoints.out, "stop", accelerator):
                    updates.backward(loss)
        updates.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoints.save(step + 1, precision.state())


def _vae_stage(vae, images: np.ndarray, cfg: TrainT2IConfig, accelerator):
    """Stage A (from scratch only): the VAE, and its latent scaling measured on the data; saved once
    (OUT/vae) so a resumed run does not redo it."""
    vae_dir = Path(cfg.out) / "vae"
    if (vae_dir / "config.json").exists():
        return type(vae).from_pretrained(vae_dir)
    train_vae(vae, images, cfg, accelerator)
    mean, _ = _latent_moments(vae, images[:512], accelerator.device)
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    if accelerator.is_main_process:
        vae.save_pretrained(vae_dir, safe_serialization=True)
    accelerator.wait_for_everyone()
    return vae


def _refuse_fine_tuning_settings(cfg: TrainT2IConfig) -> None:
    if cfg.forget_words:
        raise ValueError("forget_words applies to fine-tuning (--base-model); from scratch every word starts random")
    if cfg.context_layers:
        raise ValueError("context_layers applies to fine-tuning (--base-model); from scratch the preset sets the encoder's layers")
    if cfg.attention_layers:
        raise ValueError("attention_layers applies to fine-tuning (--base-model); from scratch the preset sets the UNet's layers")


def _grown(run: dict, unet, text_encoder):
    """The base model's UNet and text encoder with the layers a fine-tune's settings (`run`: its
    train_config.json, or the config as a dict) add; every added layer starts as the identity."""
    if run.get("context_layers"):
        text_encoder = add_context_layers(text_encoder, run["context_layers"], run["seed"])
    if run.get("attention_layers"):
        unet = add_attention_layers(unet, run["attention_layers"], run["seed"])
    return unet, text_encoder


def _fine_tuning_start(cfg: TrainT2IConfig, unet, text_encoder, tokenizer):
    """The base model's UNet and text encoder as fine-tuning starts from them: forgotten words re-drawn, layers added."""
    if cfg.forget_words:
        forget_word_embeddings(text_encoder, tokenizer, cfg.forget_words, cfg.seed)
    return _grown(asdict(cfg), unet, text_encoder)


def train_t2i(cfg: TrainT2IConfig) -> Path:
    with trainer_accelerator(cfg.gradient_accumulation) as accelerator:
        return _train_t2i(cfg, accelerator)


def _train_t2i(cfg: TrainT2IConfig, accelerator) -> Path:
    out = Path(cfg.out)
    precision = Precision(cfg.mixed_precision, accelerator.device)
    from_scratch = cfg.base_model is None
    if from_scratch:
        _refuse_fine_tuning_settings(cfg)
    lr = cfg.lr if cfg.lr is not None else (1e-3 if from_scratch else 1e-5)
    train_te = cfg.train_text_encoder if cfg.train_text_encoder is not None else from_scratch

    if from_scratch:
        parts = build_components(cfg.preset, seed=cfg.seed)
    else:
        m = load_model(cfg.base_model, device="cpu", dtype="fp32")
        parts = dict(vae=m.vae, unet=m.unet, text_encoder=m.text_encoder, tokenizer=m.tokenizer, scheduler=m.scheduler)
    vae, unet, text_encoder, tokenizer, scheduler = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    if from_scratch:
        images, captions = _load_pairs(cfg, resolution)
        num_images = len(images)
    else:  # streamed: only paths and texts are held
        pairs = read_pairs(cfg.data, "train")
        if not pairs:
            raise ValueError(f"{cfg.data}: no training image-text pairs")
        num_images = len(pairs)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", {**asdict(cfg), "lr": lr, "train_text_encoder": train_te, "num_images": num_images})

    if from_scratch:
        vae = _vae_stage(vae, images, cfg, accelerator)
    vae.to(accelerator.device).eval().requires_grad_(False)
    scale = vae.config.scaling_factor

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

    if from_scratch:
        lat_mean, lat_std = _latent_moments(vae, images, accelerator.device)
        ids_all = tokenize(captions)
    ids_empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]

    if not from_scratch:
        unet, text_encoder = _fine_tuning_start(cfg, unet, text_encoder, tokenizer)

    trained = [unet] + ([text_encoder] if train_te else [])
    for mod in trained:
        mod.train().requires_grad_(True)
    if not train_te:
        text_encoder.requires_grad_(False).to(accelerator.device)
    params = [p for mod in trained for p in mod.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    lr_sched = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)

    unet_p, te_p, optimizer, lr_sched = accelerator.prepare(unet, text_encoder, optimizer, lr_sched)
    ema.to(accelerator.device)
    _add_missing_ema_file(out, train_te, accelerator)
    updates = OptimiserSteps(accelerator, precision, optimizer, params, cfg.gradient_accumulation, cfg.max_grad_norm, ema, lr_sched)
    settings = checkpoint_settings(cfg, out, AFTER_THE_UNET, lr=lr, train_text_encoder=train_te)
    checkpoints = Checkpoints(accelerator, out, settings, ema, cfg.checkpoints_total_limit)
    start, state = checkpoints.resume(cfg.steps)
    precision.load_state(state)

    def batch(micro_batch: int) -> tuple[torch.Tensor, ...]:
        """Micro-batch `micro_batch` (step x accumulation + i): clean latents, noise, timesteps, token ids."""
        rng = step_rng(cfg.seed, 2, micro_batch, accelerator.process_index)
        idx = rng.integers(0, num_images, cfg.batch_size)
        ids = ids_all[idx].clone() if from_scratch else tokenize([training_caption(cfg, pairs[i].caption()) for i in idx])
        ids[rng.random(cfg.batch_size) < cfg.caption_dropout] = ids_empty
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        if from_scratch:
            z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        else:
            z0 = _encode_batch(vae, [pairs[i].image for i in idx], resolution, gen, accelerator.device) * scale
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        return tuple(x.to(accelerator.device) for x in (z0, noise, t, ids))

    _train_unet(cfg, unet_p, te_p, scheduler, batch, updates, checkpoints, start)

    final = out / "model"
    decoder_dir = out / "vae_decoder"
    if from_scratch and cfg.decoder_steps > 0 and not (decoder_dir / "config.json").exists():
        train_vae(vae, images, cfg, accelerator, decoder_only=True)
        if accelerator.is_main_process:
            vae.save_pretrained(decoder_dir, safe_serialization=True)
    if accelerator.is_main_process:
        parts = dict(vae=vae, unet=accelerator.unwrap_model(unet_p), text_encoder=accelerator.unwrap_model(te_p),
                     tokenizer=tokenizer, scheduler=scheduler)
        with_ema_weights(ema, params, lambda: write_folder(final, lambda tmp: save_model(parts, tmp)))  # once, at the end
        if (decoder_dir / "config.json").exists():
            publish(decoder_dir, final / "vae")
        # from scratch: the single-class captions; fine-tuning: the first four distinct reports
        prompts = cfg.sample_prompts or (sorted({c for c in captions if " and " not in c and "," not in c}) if from_scratch
                                         else list(dict.fromkeys(training_caption(cfg, p.caption()) for p in pairs[:64]))[:4])
        save_png(out / "samples.png", sample_grid(final, prompts, cfg.samples_per_prompt, cfg.sample_guidance, cfg.seed,
                                                  device=accelerator.device))
    accelerator.wait_for_everyone()
    return final


def forget_word_embeddings(text_encoder, tokenizer, words: list[str], seed: int) -> list[int]:
    """Re-draw the token embeddings of `words` as CLIP initialises them (normal, std =
    initializer_range x initializer_factor); returns the token ids. The fine-tuned model then reads
    these words as it would a word it never saw."""
    ids = sorted({i for w in words for i in tokenizer(w, add_special_tokens=False).input_ids})
    table = text_encoder.get_input_embeddings().weight
    std = text_encoder.config.initializer_range * text_encoder.config.initializer_factor
    fresh = torch.randn(len(ids), table.shape[1], generator=torch.Generator().manual_seed(seed)) * std
    with torch.no_grad():
        table[ids] = fresh.to(table.dtype)
    return ids


def add_context_layers(text_encoder, layers: int, seed: int):
    """A copy of a CLIP text encoder with `layers` more transformer layers on top of its own. Each new
    layer's attention and MLP output projections start at zero, so the layer is the identity (its
    residual branches add nothing) and the encoder computes what it did; fine-tuning then teaches the
    new layers context. CLIP's attention is causal, so "pneumothorax" in "No pneumothorax." sees "No"."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if not isinstance(text_encoder, CLIPTextModel):
        raise ValueError(f"context_layers needs a CLIP text encoder, got {type(text_encoder).__name__}")
    config = CLIPTextConfig(**{**text_encoder.config.to_dict(), "num_hidden_layers": text_encoder.config.num_hidden_layers + layers})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = CLIPTextModel(config)
    missing, unexpected = grown.load_state_dict(text_encoder.state_dict(), strict=False)
    all_layers = getattr(grown, "text_model", grown).encoder.layers  # transformers 5 dropped CLIPTextModel.text_model
    new_layers = all_layers[len(all_layers) - layers :]
    if unexpected or len(missing) != sum(1 for _ in new_layers.state_dict()):
        raise ValueError(f"context_layers: the grown encoder does not hold the old one's weights ({unexpected or missing[:3]})")
    with torch.no_grad():
        for layer in new_layers:
            for proj in (layer.self_attn.out_proj, layer.mlp.fc2):
                proj.weight.zero_()
                proj.bias.zero_()
    return grown.to(text_encoder.dtype)


def add_attention_layers(unet, layers: int, seed: int):
    """A copy of a UNet2DConditionModel with `layers` more transformer blocks in each of its
    cross-attention blocks (down, mid and up). Each new block's self-attention, cross-attention and
    feed-forward output projections start at zero, so the block is the identity (its residual
    branches add nothing) and the UNet computes what it did; fine-tuning then trains them. Stage 1
    reads every cross-attention layer, the new ones too."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"attention_layers needs a UNet2DConditionModel, got {type(unet).__name__}")
    config = dict(unet.config)
    blocks = len(config["down_block_types"])
    for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        per_block = config.get(key)
        if per_block is not None:
            per_block = [per_block] * blocks if isinstance(per_block, int) else list(per_block)
            config[key] = [p + layers if isinstance(p, int) else [q + layers for q in p] for p in per_block]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = UNet2DConditionModel.from_config(config)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    new_blocks = [b for m in grown.modules() if hasattr(m, "transformer_blocks")
                  for b in m.transformer_blocks[len(m.transformer_blocks) - layers :]]
    if unexpected or len(missing) != sum(len(b.state_dict()) for b in new_blocks):
        raise ValueError(f"attention_layers: the grown UNet does not hold the old one's weights ({unexpected or missing[:3]})")
    with torch.no_grad():
        for block in new_blocks:
            feed_forward_out = [m for m in block.ff.modules() if isinstance(m, torch.nn.Linear)][-1]
            attentions = [a for a in (block.attn1, block.attn2) if a is not None]
            for proj in [a.to_out[0] for a in attentions] + [feed_forward_out]:
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
    return grown.to(unet.dtype)


def checkpoint_model(out: Path, checkpoint: Path, device=None, dtype=None):
    """The model as it stood at `checkpoint` (its EMA weights), without an export per checkpoint:
    the run's `OUT/model` (or, for a fine-tune not yet finished, its base model) gives the
    architecture and the frozen parts, the checkpoint's
    ema.safetensors the trained ones, in the order training listed them (UNet, then the text
    encoder when it was trained)."""
    from safetensors.torch import load_file

    from conceptseg.models import from_components, load_model

    run = json.loads((Path(out) / "train_config.json").read_text())
    train_te = run["train_text_encoder"]
    # a fine-tune still running has no export yet: its base model has the same architecture and VAE
    exported = Path(out) / "model"
    model = load_model(exported if exported.is_dir() or not run.get("base_model") else run["base_model"], device="cpu", dtype="fp32")
    if not exported.is_dir():
        model.unet, model.text_encoder = _grown(run, model.unet, model.text_encoder)
    params = list(model.unet.parameters()) + (list(model.text_encoder.parameters()) if train_te else [])
    shadow = load_file(Path(checkpoint) / "ema.safetensors")
    if len(shadow) != len(params):
        raise ValueError(f"{checkpoint}: {len(shadow)} EMA tensors, but {out / 'model'} trains {len(params)}: not this run's checkpoint")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(shadow[str(i)])
    parts = dict(vae=model.vae, unet=model.unet, text_encoder=model.text_encoder, tokenizer=model.tokenizer, scheduler=model.scheduler)
    return from_components(parts, device=device or "cpu", dtype=dtype, source=str(Path(checkpoint).resolve()))


@torch.no_grad()
def sample_grid(model_dir: Path, prompts: list[str], per_prompt: int, guidance: float, seed: int,
                device: torch.device | str = "cpu") -> np.ndarray:
    """One row per prompt, sampled with the standard diffusers pipeline (proves the folder loads) on
    `device` (the trainer's); the noise is drawn on the CPU, so every device starts from the same."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True).to(device)
    pipe.scheduler = scheduler_from_config(DDIMScheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed + i)
        imgs = pipe([prompt] * per_prompt, num_inference_steps=50, guidance_scale=guidance, generator=gen, output_type="np").images
        rows.append(np.concatenate(list((imgs * 255).round().astype(np.uint8)), axis=1))
    return np.concatenate(rows, axis=0)
