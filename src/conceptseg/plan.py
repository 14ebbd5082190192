"""`conceptseg plan CONFIG`: each stage's peak device memory and disk, predicted before anything runs.

The model folder's configs are all it reads (`model_index.json` and each component's
`config.json`; no weights): every network is built on torch's `meta` device with `from_config`,
so parameter counts are exact, and the family's own model class gives the resolution, latent grid
and denoiser. Memory is then added up per stage (docs/plan.md has the formulas):

  weights       parameters x bytes of the stage's dtype, for every resident component (a fine-tune:
                the denoiser in its training dtype, the frozen VAE in the weight dtype, the text
                encoders only while the conditioning is computed, before training)
  training      fp32 gradients and AdamW states (2 x fp32; 8-bit AdamW 2 x 1 byte) for the trainable
                parameters (the whole denoiser, or LoRA rank r on to_q/to_k/to_v/to_out.0), an fp32
                EMA copy of them, the foreach AdamW step's temporary (1 x fp32, none when fused or
                8-bit), the 16-bit weight copies autocast keeps for the backward pass (full only)
  activations   batch x sum over layers of tokens x width x elements-per-layer (`ELEMENTS`), in
                the autocast dtype; with gradient checkpointing one input per layer plus the
                largest layer's activations, which are recomputed
  inference     batch x (the UNet's skip connections + the largest layer's working set), and for
                stage 1 the captured attention probabilities (fp32, heads x image x text tokens)
  VAE           batch x 3 full-resolution feature maps of the channels that reach full resolution

Each stage is predicted alone (the models of the other stages freed). A training stage peaks in
one of its phases (text encoding before training, forward, optimiser step, VAE encoding, the
inpainting preview); the table shows that phase's items. GB here are GiB (2**30 bytes), what
torch.cuda reports.

Disk: checkpoints (`checkpoints_total_limit` of them, plus the one being written before the
oldest is removed): weights + AdamW + EMA of the trainable parameters (adapters only for LoRA);
the exported model; per-image outputs at nominal PNG sizes (`PNG_BYTES_PER_PIXEL`), images taken
at the model's resolution.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conceptseg.config import override_config
from conceptseg.families.base import LORA_TARGETS

GiB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# Activation elements saved for the backward pass per (token x channel) of one layer (16-bit
# under autocast). A transformer layer with fused attention saves about 17 (Korthikanti et al.
# 2022, "Reducing activation recomputation in large transformer models": 34 s*b*h bytes, no
# dropout, no s^2 term with flash attention); diffusers' UNet block adds cross-attention and a
# GEGLU feed-forward (8x wide), FLUX/SD 3 blocks adaLN modulation and q/k norms and RoPE.
ELEMENTS = {"resnet": 8, "transformer": 32, "joint": 30, "single": 26}
# The working set of one layer in a no-grad pass (ff hidden, attention output, residual).
INFERENCE_ELEMENTS = {"resnet": 4, "transformer": 16, "joint": 16, "single": 16}
VAE_FULL_RES_MAPS = 3
PNG_BYTES_PER_PIXEL = {"rgb": 1.5, "mask": 0.05}
CUDA_OVERHEAD = 1.0 * GiB  # CUDA context and kernels' workspaces, outside torch's allocator
# finetune.py computes the conditioning once, before training, then the text encoders leave the
# device (`residency`): they count in that phase only
TEXT_ENCODERS_RESIDENT_IN_TRAINING = False
NOT_NETWORKS = ("tokenizer", "scheduler", "feature_extractor", "safety_checker", "image_encoder")


class PlanDoesNotFit(ValueError):
    """A config whose predicted peak memory exceeds the device's."""


# ---------------------------------------------------------------- the model, from its configs

@dataclass(frozen=True)
class Layer:
    kind: str  # a key of ELEMENTS
    tokens: int  # positions (pixels of a feature map, or tokens) per sample
    width: int  # channels / hidden size
    heads: int = 0  # attention heads reading text (the capture's cost), 0 for none
    text_tokens: int = 0


@dataclass
class ModelSizes:
    """What the planner needs of a model: exact parameter counts and the shapes at its resolution."""

    source: str
    family: str
    parameters: dict[str, int]  # network component -> parameters
    denoiser_name: str
    resolution: int
    latent_side: int
    vae_channels: tuple[int, ...]
    layers: list[Layer]
    skip_elements: int  # the UNet's skip connections per sample in a no-grad pass (0 for transformers)
    lora_parameters: dict[int, int] = field(default_factory=dict)  # rank -> trainable parameters
    _denoiser: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def denoiser_parameters(self) -> int:
        return self.parameters[self.denoiser_name]

    @property
    def text_encoder_parameters(self) -> int:
        return sum(n for k, n in self.parameters.items() if k.startswith("text_encoder"))

    def lora(self, rank: int) -> int:
        if rank not in self.lora_parameters:
            self.lora_parameters[rank] = lora_parameters(self._denoiser, rank)
        return self.lora_parameters[rank]


def lora_parameters(denoiser: torch.nn.Module, rank: int, targets=None) -> int:
    """LoRA's trainable parameters: r x (in + out) for every Linear whose name ends in a target (peft's
    match); the targets `finetune` adapts unless given."""
    from conceptseg.families.base import lora_targets

    targets = lora_targets(denoiser) if targets is None else targets
    return sum(rank * (m.in_features + m.out_features) for name, m in denoiser.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def model_folder(model: str | Path | None) -> tuple[str | Path, bool]:
    """(where the configs are, whether it is local): the embedded models, a LoRA fine-tune's base, a folder or a hub id."""
    from conceptseg.models import LORA_CONFIG_FILE, embedded_folder

    if embedded_folder(model) is not None:
        return embedded_folder(model), True
    path = Path(model)
    if (path / LORA_CONFIG_FILE).exists():
        return model_folder(json.loads((path / LORA_CONFIG_FILE).read_text())["base_model"])
    return (path, True) if path.exists() else (str(model), False)


def _config_file(source, local: bool, component: str) -> Path:
    if local:
        path = Path(source) / component / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: `conceptseg plan` reads each component's config.json "
                                    f"(a diffusers folder, weights not needed)")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(source), "config.json", subfolder=component))


def build_on_meta(library: str, class_name: str, config_file: Path) -> torch.nn.Module:
    """A network from its config.json on the meta device: exact shapes, no memory."""
    import diffusers
    import transformers

    with torch.device("meta"):
        if library == "transformers":
            config = transformers.AutoConfig.from_pretrained(config_file.parent)
            return getattr(transformers, class_name)(config)
        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(config_file.parent))


def read_model(model: str | Path | None) -> ModelSizes:
    """The planner's view of a model folder (or hub id) from its configs alone."""
    from conceptseg.families import family_class, family_of, read_model_index

    source, local = model_folder(model)
    index = read_model_index(source, local)
    if index is None and not local:
        raise FileNotFoundError(f"model {source}: not a local folder, and its model_index.json is neither in the hub cache "
                                "nor online; pass a diffusers folder (its configs alone are enough)")
    if index is None:  # an SD 1.x/2.x folder without model_index.json, as load_model accepts
        index = {"vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "text_encoder": ["transformers", "CLIPTextModel"]}
    family = family_of(index, str(source)) if "_class_name" in index else "sd"
    cls = family_class(family)
    wanted = [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "device", "dtype")]
    parts = {}
    for name in wanted:
        entry = index.get(name) or [None, None]
        if entry[0] is None or name.startswith(NOT_NETWORKS):
            continue
        parts[name] = build_on_meta(entry[0], entry[1], _config_file(source, local, name))
    meta = cls(**{k: parts.get(k) for k in wanted}, source=str(source), device=torch.device("meta"), dtype=torch.float32)
    denoiser = meta.denoiser
    layers, skips = denoiser_layers(denoiser, meta.latent_resolution, _text_tokens(meta))
    return ModelSizes(source=str(model or "embedded:toy"), family=family,
                      parameters={k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()},
                      denoiser_name=meta.denoiser_name, resolution=meta.resolution, latent_side=meta.latent_resolution,
                      vae_channels=vae_channels(meta.vae.config), layers=layers, skip_elements=skips,
                      _denoiser=denoiser)


def vae_channels(config) -> tuple[int, ...]:
    """The VAE's channels per level: `block_out_channels`, or Qwen-Image's (Wan's) base_dim x dim_mult."""
    if "block_out_channels" in config:
        return tuple(config["block_out_channels"])
    return tuple(config["base_dim"] * m for m in config["dim_mult"])


def _text_tokens(model) -> int:
    if model.family == "flux":
        return model.t5_length
    if model.family in ("flux2", "qwenimage"):  # FLUX.2 pads to 512; Qwen-Image's prompts are at most 512 tokens
        return model.text_length
    if model.family == "sd3":
        from conceptseg.families.sd3 import CLIP_LENGTH, T5_LENGTH

        return CLIP_LENGTH + T5_LENGTH
    return model.text_encoder.config.max_position_embeddings


def denoiser_layers(denoiser: torch.nn.Module, latent_side: int, text_tokens: int) -> tuple[list[Layer], int]:
    """The denoiser's layers at a latent side (tokens, width) and its skip-connection elements."""
    c = denoiser.config
    name = type(denoiser).__name__
    if name == "UNet2DConditionModel":
        return _unet_layers(c, latent_side, text_tokens)
    patch = c.get("patch_size", 1) or 1
    # FLUX.1 packs 2x2 latents; FLUX.2's latent grid is already patchified; SD 3 and Qwen-Image patch by 2
    image = (latent_side // (2 if name == "FluxTransformer2DModel" else patch)) ** 2
    width, heads = c.num_attention_heads * c.attention_head_dim, c.num_attention_heads
    layers = [Layer("joint", image + text_tokens, width, heads, text_tokens) for _ in range(c.num_layers)]
    layers += [Layer("single", image + text_tokens, width, heads, text_tokens) for _ in range(c.get("num_single_layers", 0))]
    # the capture reads image-to-text attention over the image tokens: tokens here count both
    return layers, 0


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _unet_layers(c, latent_side: int, text_tokens: int) -> tuple[list[Layer], int]:
    levels = len(c.block_out_channels)
    per_block = _per_level(c.layers_per_block, levels)
    depth = _per_level(c.transformer_layers_per_block, levels)
    heads = _per_level(c.num_attention_heads or c.attention_head_dim, levels)  # SD-1 naming: the head count
    layers, skips = [], 0
    for i, ch in enumerate(c.block_out_channels):
        tokens = (latent_side >> i) ** 2
        attention = "CrossAttn" in c.down_block_types[i]
        for _ in range(per_block[i]):  # down path
            layers.append(Layer("resnet", tokens, ch))
            layers += [Layer("transformer", tokens, ch, heads[i], text_tokens) for _ in range(depth[i] if attention else 0)]
        skips += (per_block[i] + 1) * ch * tokens
        for _ in range(per_block[i] + 1):  # up path, the same level
            layers.append(Layer("resnet", tokens, ch))
            layers += [Layer("transformer", tokens, ch, heads[i], text_tokens) for _ in range(depth[i] if attention else 0)]
    last, ch = (latent_side >> (levels - 1)) ** 2, c.block_out_channels[-1]
    layers += [Layer("resnet", last, ch)] * 2
    if c.mid_block_type and "CrossAttn" in c.mid_block_type:
        layers += [Layer("transformer", last, ch, heads[-1], text_tokens)] * depth[-1]
    return layers, skips


# ---------------------------------------------------------------- memory of one pass

def training_activations(model: ModelSizes, batch: int, checkpointing: bool) -> int:
    """Activation ELEMENTS kept for one training pass of `batch` samples (multiply by the dtype's bytes)."""
    per_layer = [ELEMENTS[x.kind] * x.tokens * x.width for x in model.layers]
    if checkpointing:  # each checkpointed block keeps its input; one block's activations are recomputed at a time
        return batch * (sum(x.tokens * x.width for x in model.layers) + max(per_layer))
    return batch * sum(per_layer)


def inference_activations(model: ModelSizes, rows: int) -> int:
    """Elements of a no-grad forward pass of `rows` samples at its peak."""
    return rows * (model.skip_elements + max(INFERENCE_ELEMENTS[x.kind] * x.tokens * x.width for x in model.layers))


def capture_bytes(model: ModelSizes, rows: int) -> int:
    """Stage 1's attention capture, one layer at a time: fp32 scores, probabilities and their cast over
    heads x image x text tokens (`attention.py`); joint blocks compute them in chunks (`joint_attention.py`)."""
    from conceptseg.joint_attention import SCORE_BLOCK_ELEMENTS

    def scores(x: Layer) -> int:
        joint = x.kind in ("joint", "single")
        full = rows * x.heads * (x.tokens - (x.text_tokens if joint else 0)) * x.text_tokens
        return min(full, SCORE_BLOCK_ELEMENTS) if joint else full

    return 3 * 4 * max(scores(x) for x in model.layers)


def vae_bytes(model: ModelSizes, batch: int, dtype: torch.dtype) -> int:
    """VAE encoding or decoding of `batch` images: full-resolution maps of the channels that reach full resolution."""
    wide = model.vae_channels[min(1, len(model.vae_channels) - 1)]
    return batch * VAE_FULL_RES_MAPS * wide * model.resolution**2 * BYTES[dtype]


def weights(model: ModelSizes, dtype: torch.dtype, text_encoders: bool = True, frozen: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of the resident weights: the denoiser in `dtype`, the other networks in `frozen` (default `dtype`)."""
    frozen = frozen or dtype
    out = {}
    for k, n in model.parameters.items():
        if not k.startswith("text_encoder"):
            d = dtype if k == model.denoiser_name else frozen
            out[f"weights: {k} ({_dtype_name(d)})"] = n * BYTES[d]
    if text_encoders and model.text_encoder_parameters:
        out[f"weights: text encoders ({_dtype_name(frozen)})"] = model.text_encoder_parameters * BYTES[frozen]
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _mixed(name: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


# ---------------------------------------------------------------- the stages

@dataclass
class StagePlan:
    name: str
    phases: dict[str, dict[str, float]]  # phase -> item -> bytes; the peak is the largest phase's sum
    disk: dict[str, float]  # item -> bytes
    knobs: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def memory(self) -> float:
        return sum(self.phases[self.peak_phase].values())

    @property
    def disk_total(self) -> float:
        return sum(self.disk.values())


@dataclass
class PlanInputs:
    """What a stage's plan depends on besides its config section."""

    model: ModelSizes
    dtype: torch.dtype  # the run's inference dtype
    cuda: bool
    train_images: int
    test_images: int
    text_encoders_resident: bool = TEXT_ENCODERS_RESIDENT_IN_TRAINING

    def overhead(self) -> dict[str, float]:
        return {"CUDA context": CUDA_OVERHEAD} if self.cuda else {}


def plan_prelim(cfg, x: PlanInputs) -> StagePlan:
    rows, b = cfg.prelim.batch_size, BYTES[x.dtype]
    fixed = {**x.overhead(), **weights(x.model, x.dtype)}
    pixels = x.model.resolution**2
    per_image = x.model.latent_side**2 * 4 + 128 + pixels * PNG_BYTES_PER_PIXEL["mask"]
    return StagePlan("prelim", {
        "denoiser passes": {**fixed, f"activations ({rows} rows)": inference_activations(x.model, rows) * b,
                            "attention capture (fp32)": capture_bytes(x.model, rows)},
        "VAE encode": {**fixed, "VAE (1 image)": vae_bytes(x.model, 1, x.dtype)},
    }, {f"maps + masks ({x.train_images + x.test_images} images)": per_image * (x.train_images + x.test_images)})


def _checkpoints_kept(section) -> int:
    written = math.ceil(section.steps / section.checkpoint_every)
    limit = section.checkpoints_total_limit
    return written if limit is None else min(written, limit + 1)  # the newest is written before the oldest goes


def plan_finetune(cfg, x: PlanInputs) -> StagePlan:
    f, m = cfg.finetune, x.model
    lora = f.method == "lora"
    act_dtype = _mixed(f.mixed_precision) or torch.float32  # the weight dtype: autocast's, and the frozen parts'
    base_dtype = act_dtype if lora else torch.float32  # the denoiser's (`finetune.training_dtypes`)
    trainable = m.lora(f.lora_rank) if lora else m.denoiser_parameters
    state_bytes = {"adamw": 8, "adamw-fused": 8, "adamw-8bit": 2}[f.optimizer]
    encoding = {**x.overhead(), **weights(m, base_dtype, True, act_dtype)}  # before training: no optimiser, no EMA yet
    fixed = {**x.overhead(), **weights(m, base_dtype, x.text_encoders_resident, act_dtype)}
    if lora:
        fixed["LoRA adapters (fp32)"] = trainable * 4
    fixed[f"optimiser states ({f.optimizer})"] = trainable * state_bytes
    fixed["EMA copy (fp32)"] = trainable * 4
    grads = {"gradients (fp32)": trainable * 4}
    forward = {**fixed, **(grads if f.gradient_accumulation > 1 else {}),
               f"activations (batch {f.batch_size}{', checkpointed' if f.gradient_checkpointing else ''})":
                   training_activations(m, f.batch_size, f.gradient_checkpointing) * BYTES[act_dtype]}
    if not lora and act_dtype != torch.float32:
        forward["autocast weight copies (16-bit)"] = m.denoiser_parameters * 2
    step = {**fixed, **grads}
    if f.optimizer == "adamw":
        step["AdamW foreach temporary (fp32)"] = trainable * 4
    phases = {"text encoding": encoding, "forward": forward, "optimiser step": step,
              "VAE encode": {**fixed, f"VAE ({f.batch_size} images)": vae_bytes(m, f.batch_size, act_dtype)},
              "preview": {**fixed, "activations (4 rows, no grad)": inference_activations(m, 4) * BYTES[base_dtype],
                          "VAE (4 images)": vae_bytes(m, 4, act_dtype)}}
    checkpoint = trainable * (4 + state_bytes + 4) + 64 * 2**20  # weights + optimiser + EMA, RNG and small state
    kept = _checkpoints_kept(f)
    # full: the fp32 denoiser and the frozen parts as training held them (in the weight dtype)
    exported = trainable * 4 if lora else m.denoiser_parameters * 4 + (sum(m.parameters.values()) - m.denoiser_parameters) * BYTES[act_dtype]
    return StagePlan("finetune", phases, {f"checkpoints ({kept} x {'adapters' if lora else 'denoiser'} + optimiser + EMA)":
                                          kept * checkpoint, f"exported model ({'LoRA weights' if lora else 'diffusers folder'})": exported})


def _sampling(name: str, x: PlanInputs, batch: int, guidance: float) -> dict:
    rows = batch * (2 if guidance != 1 else 1)
    fixed = {**x.overhead(), **weights(x.model, x.dtype)}
    return {"sampling": {**fixed, f"activations ({rows} rows)": inference_activations(x.model, rows) * BYTES[x.dtype]},
            "VAE": {**fixed, f"VAE ({batch} images)": vae_bytes(x.model, batch, x.dtype)}}


def plan_refine(cfg, x: PlanInputs) -> StagePlan:
    r = cfg.refine
    n = x.train_images + x.test_images
    per_image = x.model.resolution**2 * (PNG_BYTES_PER_PIXEL["rgb"] + PNG_BYTES_PER_PIXEL["mask"])
    return StagePlan("refine", _sampling("refine", x, r.batch_size, 1.0), {f"backgrounds + masks ({n} images)": per_image * n})


def plan_synth(cfg, x: PlanInputs) -> StagePlan:
    s = cfg.synth
    phases = _sampling("synth", x, s.batch_size, s.guidance)
    rows = cfg.prelim.batch_size
    phases["stage 1 on the samples"] = {**x.overhead(), **weights(x.model, x.dtype),
                                        f"activations ({rows} rows)": inference_activations(x.model, rows) * BYTES[x.dtype],
                                        "attention capture (fp32)": capture_bytes(x.model, rows)}
    per_image = x.model.resolution**2 * (PNG_BYTES_PER_PIXEL["rgb"] + PNG_BYTES_PER_PIXEL["mask"])
    return StagePlan("synth", phases, {f"images + masks ({s.num})": per_image * s.num})


def segmenter_parameters(width: int) -> int:
    from conceptseg.modeling.segmenter import UNet

    with torch.device("meta"):
        return sum(p.numel() for p in UNet(3, 1, width).parameters())


def segmenter_activations(width: int, size: int) -> int:
    """Elements per sample: per level, a DoubleConv's 5 saved maps going down, 8 coming up (transposed conv, concat, DoubleConv)."""
    return sum(width * 2**i * (size >> i) ** 2 * (5 + (8 if i < 4 else 0)) for i in range(5))


def segmenters_trained(cfg) -> list[str]:
    """The U-Nets `conceptseg run` trains (the supervised one where the images have true masks)."""
    names = ["unet_real"] + (["unet_real_synth"] if cfg.synth.num > 0 else [])
    names += (["unet_prelim"] if cfg.segmenter.train_on_prelim else []) + (["supervised"] if cfg.segmenter.supervised else [])
    return names


def plan_segmenter(cfg, x: PlanInputs) -> StagePlan:
    s = cfg.segmenter
    n = segmenter_parameters(s.width)
    act = _mixed(s.mixed_precision) or torch.float32
    fixed = {**x.overhead(), "weights + gradients (fp32)": n * 8, "AdamW states (fp32)": n * 8}
    phases = {"training step": {**fixed, f"activations (batch {s.batch_size}, {s.input_size} px)":
                                segmenter_activations(s.width, s.input_size) * s.batch_size * BYTES[act]}}
    kept = _checkpoints_kept(s)
    unets = segmenters_trained(cfg)
    return StagePlan("segmenter", phases, {f"checkpoints + export ({len(unets)} U-Nets x ({kept} checkpoints + 1))":
                                           len(unets) * n * (16 * kept + 4)})


def plan_evaluation(cfg, x: PlanInputs) -> StagePlan:
    s = cfg.segmenter
    n = segmenter_parameters(s.width)
    phases = {"segmenting": {**x.overhead(), "weights (fp32)": n * 4,
                             "activations (1 image)": segmenter_activations(s.width, s.input_size) * 4}}
    rows = len(segmenters_trained(cfg))
    return StagePlan("evaluation", phases, {f"masks ({rows} rows x {x.test_images} images)":
                                            rows * x.test_images * x.model.resolution**2 * PNG_BYTES_PER_PIXEL["mask"]})


STAGES = {"prelim": plan_prelim, "finetune": plan_finetune, "refine": plan_refine, "synth": plan_synth,
          "segmenter": plan_segmenter, "evaluation": plan_evaluation}


def stages_run(cfg) -> list[str]:
    return [s for s in STAGES if (s != "synth" or cfg.synth.num > 0) and (s != "evaluation" or cfg.test_images)]


# ---------------------------------------------------------------- knobs that make a stage fit

@dataclass(frozen=True)
class Knob:
    label: str
    overrides: tuple[str, ...] = ()  # `--set` overrides of the run config


def _batch_knobs(cfg, section: str, accumulate: bool) -> list[Knob]:
    """Halved batch sizes, largest first; a fine-tune keeps its effective batch by accumulating gradients."""
    sec = getattr(cfg, section)
    out, b = [], sec.batch_size // 2
    while b >= 1:
        sets = (f"{section}.batch_size={b}",)
        if accumulate:
            sets += (f"{section}.gradient_accumulation={sec.gradient_accumulation * math.ceil(sec.batch_size / b)}",)
        out.append(Knob(f"{section} batch size {b}", sets))
        b //= 2
    return out


def candidate_knobs(stage: str, cfg, x: PlanInputs) -> list[list[Knob]]:
    """Per kind of change, its options (a batch size is one kind with several options), most effective first."""
    kinds: list[list[Knob]] = []
    if stage == "finetune":
        f = cfg.finetune
        if f.method == "full":
            kinds.append([Knob("LoRA", ("finetune.method=lora",) + (("finetune.mixed_precision=bf16",) if f.mixed_precision == "no" else ()))])
        if not f.gradient_checkpointing:
            kinds.append([Knob("gradient checkpointing", ("finetune.gradient_checkpointing=true",))])
        if f.optimizer != "adamw-8bit":
            kinds.append([Knob("8-bit AdamW", ("finetune.optimizer=adamw-8bit",))])
        kinds.append(_batch_knobs(cfg, "finetune", accumulate=True))
    elif stage in ("prelim", "refine", "synth"):
        if x.dtype == torch.float32 and x.cuda:
            kinds.append([Knob("bf16 weights", ("dtype=bf16",))])
        kinds.append(_batch_knobs(cfg, stage, accumulate=False))
        if stage == "synth":
            kinds.append(_batch_knobs(cfg, "prelim", accumulate=False))
    elif stage == "segmenter":
        if cfg.segmenter.mixed_precision == "no":
            kinds.append([Knob("bf16 autocast", ("segmenter.mixed_precision=bf16",))])
        kinds.append(_batch_knobs(cfg, "segmenter", accumulate=False))
    return [k for k in kinds if k]


def _replan(stage: str, cfg, x: PlanInputs, knobs: list[Knob]) -> StagePlan:
    from conceptseg.models import resolve_dtype

    changed = override_config(cfg, [o for k in knobs for o in k.overrides])
    inputs = dataclasses.replace(x, dtype=resolve_dtype(changed.dtype, torch.device("cuda" if x.cuda else "cpu")))
    return STAGES[stage](changed, inputs)


def knobs_to_fit(stage: str, cfg, x: PlanInputs, available: float) -> list[str]:
    """Each change that alone makes the stage fit `available` bytes; if none does, the shortest
    combination (in `candidate_knobs`' order) that does, or the most that can be done."""
    kinds = candidate_knobs(stage, cfg, x)
    singles = []
    for options in kinds:
        fitting = [(k, p) for k in options if (p := _replan(stage, cfg, x, [k])).memory <= available]
        if fitting:
            k, p = fitting[0]  # the largest batch that fits
            singles.append(_say([k], p))
    if singles:
        return singles
    chosen: list[Knob] = []
    for options in kinds:
        fitting = [k for k in options if _replan(stage, cfg, x, chosen + [k]).memory <= available]
        chosen.append(fitting[0] if fitting else options[-1])
        if fitting:
            return ["together: " + _say(chosen, _replan(stage, cfg, x, chosen))]
    return ["does not fit even with all of: " + _say(chosen, _replan(stage, cfg, x, chosen))] if chosen else []


def _say(knobs: list[Knob], plan: StagePlan) -> str:
    sets = " ".join(f"--set {o}" for k in knobs for o in k.overrides)
    return f"{' + '.join(k.label for k in knobs)} ({sets + ', ' if sets else ''}{plan.memory / GiB:.1f} GB)"


# ---------------------------------------------------------------- a run's plan

@dataclass
class RunPlan:
    model: ModelSizes
    device: str
    dtype: torch.dtype
    available: float | None  # bytes of device memory to fit, None: not checked
    stages: dict[str, StagePlan]
    notes: list[str]

    def fits(self, stage: str) -> bool | None:
        return None if self.available is None else self.stages[stage].memory <= self.available


def visible_device_memory_gb() -> float | None:
    """The visible CUDA device's memory in GiB, or None without one."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB if torch.cuda.is_available() else None


def count_images(cfg, assumed: int | None = None) -> tuple[int, int, list[str]]:
    """(train, test) image counts from the config's datasets; `assumed` (or 0) where they cannot be listed."""
    from conceptseg.data.readers import list_samples

    counts, notes = [], []
    for spec, split in ((cfg.images, cfg.split), (cfg.test_images, cfg.test_split)):
        if spec is None:
            counts.append(0)
            continue
        try:
            counts.append(len(list_samples(spec, split)))
        except (OSError, ValueError) as e:
            counts.append(assumed or 0)
            notes.append(f"{spec} ({split}) could not be listed ({str(e).split('. ')[0]}): per-image outputs counted "
                         f"for {assumed or 0} images (--images N to assume a count)")
    return counts[0], counts[1], notes


def plan_run(cfg, device_memory_gb: float | None = None, images: int | None = None, model: ModelSizes | None = None) -> RunPlan:
    """Every stage's predicted peak device memory and disk for a RunConfig (`pipeline.load_config`)."""
    from conceptseg.models import resolve_dtype

    device = torch.device(cfg.device or "cuda")
    dtype = resolve_dtype(cfg.dtype, device)
    model = model or read_model(cfg.model)
    train, test, notes = count_images(cfg, images)
    x = PlanInputs(model, dtype, device.type == "cuda", train, test)
    stages = {name: STAGES[name](cfg, x) for name in stages_run(cfg)}
    available = device_memory_gb * GiB if device_memory_gb else None
    if available is not None:
        for name, stage in stages.items():
            if stage.memory > available:
                stage.knobs = knobs_to_fit(name, cfg, x, available)
    return RunPlan(model, str(device), dtype, available, stages, notes)


def plan_json(plan: RunPlan) -> dict:
    gb = lambda v: round(v / GiB, 2)  # noqa: E731
    return {
        "model": plan.model.source, "family": plan.model.family, "parameters": plan.model.parameters,
        "resolution": plan.model.resolution, "device": plan.device, "dtype": _dtype_name(plan.dtype),
        "device_memory_available_gb": None if plan.available is None else gb(plan.available),
        "device_memory_gb": {k: gb(s.memory) for k, s in plan.stages.items()},
        "disk_gb": {k: gb(s.disk_total) for k, s in plan.stages.items()},
        "fits": {k: plan.fits(k) for k in plan.stages} if plan.available is not None else None,
        "knobs": {k: s.knobs for k, s in plan.stages.items() if s.knobs},
        "details": {k: {"peak_phase": s.peak_phase, "memory_gb": {i: gb(v) for i, v in s.phases[s.peak_phase].items()},
                        "disk_gb": {i: gb(v) for i, v in s.disk.items()}} for k, s in plan.stages.items()},
        "notes": plan.notes,
    }


def format_plan(plan: RunPlan) -> str:
    m = plan.model
    params = ", ".join(f"{k} {n / 1e6:,.1f} M" for k, n in m.parameters.items())
    lines = [f"{m.source}: {m.family}, {m.resolution} px; parameters: {params}",
             f"device {plan.device}, dtype {_dtype_name(plan.dtype)}"
             + (f", {plan.available / GiB:.1f} GB to fit" if plan.available is not None else ", no device memory to check against"),
             "", "| stage | peak device memory (GB) | peak in | disk (GB) |" + (" fits |" if plan.available else ""),
             "|---|---:|---|---:|" + ("---|" if plan.available else "")]
    for name, s in plan.stages.items():
        fit = ({True: " yes |", False: " NO |"}[plan.fits(name)]) if plan.available else ""
        lines.append(f"| {name} | {s.memory / GiB:.2f} | {s.peak_phase} | {s.disk_total / GiB:.2f} |{fit}")
    for name, s in plan.stages.items():
        lines += ["", f"{name} ({s.peak_phase}):"]
        lines += [f"  {item:<58} {v / GiB:9.2f} GB" for item, v in s.phases[s.peak_phase].items()]
        lines += [f"  disk: {item:<52} {v / GiB:9.2f} GB" for item, v in s.disk.items()]
        lines += [f"  to fit: {k}" for k in s.knobs]
    return "\n".join(lines + [""] + [f"note: {n}" for n in plan.notes]).rstrip()


def check_fits(config, device_memory_gb: float | None = None) -> None:
    """Raise PlanDoesNotFit naming each stage whose predicted peak exceeds the device's memory
    (the visible CUDA device unless given), with the predicted and available memory and the knobs
    that would make it fit. Nothing is checked on a CPU run or without a CUDA device."""
    import warnings

    available = device_memory_gb or visible_device_memory_gb()
    if available is None or (config.device or "cuda").startswith("cpu"):
        return
    try:
        plan = plan_run(config, available)
    except (OSError, ValueError) as e:  # the model's loader names the problem better; the run goes on
        warnings.warn(f"no memory plan for {config.model} ({e}); running without the up-front check", stacklevel=2)
        return
    over = [name for name in plan.stages if not plan.fits(name)]
    if over:
        said = "; ".join(f"{n}: predicted {plan.stages[n].memory / GiB:.1f} GB of {available:.1f} GB; to fit: "
                         + (" or ".join(plan.stages[n].knobs) or "no knob is enough") for n in over)
        raise PlanDoesNotFit(f"this config does not fit the device ({said}). `conceptseg plan` shows the whole plan")


def write_config_folder(components: dict, pipeline: str, out: Path) -> Path:
    """A diffusers folder of configs only (model_index.json, each network's config.json, the
    scheduler's config; no weights, no tokenizer files): what `plan` reads. For tests and docs, from
    components built on the meta device (`modeling.presets.build_family_components(..., device="meta")`)."""
    out = Path(out)
    index = {"_class_name": pipeline}
    for name, part in components.items():
        library = type(part).__module__.split(".")[0]
        index[name] = [library, type(part).__name__]
        if hasattr(part, "save_config"):  # diffusers models and schedulers
            part.save_config(out / name)
        elif hasattr(part, "config") and hasattr(part.config, "save_pretrained"):  # transformers models
            part.config.save_pretrained(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
