"""`conceptseg plan`: parameter counts of the published architectures from config-only folders (built
with the benchmarks' builders on the meta device, written as configs without weights), the plan's
arithmetic at real size, the knobs, `check_fits`, the CLI, and the toy model's prediction against
the peak RSS of a real fine-tune on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptseg.pipeline import load_config
from conceptseg.plan import GiB, PlanDoesNotFit, check_fits, lora_parameters, plan_run, read_model, write_config_folder

PUBLISHED = {  # diffusers' published checkpoints, parameters in millions
    "sd15": {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7},
    "sdxl": {"unet": 2567.5, "text_encoder": 123.1, "text_encoder_2": 694.7, "vae": 83.7},
    "flux": {"transformer": 11901.4, "text_encoder_2": 4762.3, "text_encoder": 123.1, "vae": 83.8},
}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module")
def config_folders(tmp_path_factory) -> dict[str, Path]:
    """Config-only folders of SD 1.5, SDXL base 1.0 and FLUX.1-dev: no weights anywhere."""
    from conceptseg.modeling.sd import build_components
    from conceptseg.modeling.presets import build_family_components

    root = tmp_path_factory.mktemp("configs")
    with torch.device("meta"):
        sd15 = build_components("sd15")
    parts = {"sd15": sd15, "sdxl": build_family_components("sdxl", "full", device="meta"),
             "flux": build_family_components("flux", "full", device="meta")}
    return {name: write_config_folder(p, PIPELINES[name], root / name) for name, p in parts.items()}


def _plan(folder: Path, *sets: str, memory: float | None = 80.0):
    cfg = load_config(None, ["concept=bird", f"images={folder}/no-images", f"model={folder}", *sets])
    return plan_run(cfg, memory)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_from_configs_alone(config_folders, name):
    folder = config_folders[name]
    assert not [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json"], "weights in a config-only folder"
    counts = read_model(folder).parameters
    for component, millions in PUBLISHED[name].items():
        assert counts[component] / 1e6 == pytest.approx(millions, rel=0.01), component


def test_flux_full_does_not_fit_and_lora_does(config_folders):
    full = _plan(config_folders["flux"], "finetune.method=full", "finetune.mixed_precision=bf16", "finetune.batch_size=1",
                 "finetune.gradient_checkpointing=true")
    assert full.stages["finetune"].memory > 150 * GiB  # fp32 weights, gradients, 2 AdamW states, EMA: 16 B x 11.9 B
    assert not full.fits("finetune") and any("LoRA" in k for k in full.stages["finetune"].knobs)
    lora = _plan(config_folders["flux"], "finetune.method=lora", "finetune.mixed_precision=bf16", "finetune.batch_size=1",
                 "finetune.gradient_checkpointing=true")
    assert lora.stages["finetune"].memory < 80 * GiB and lora.fits("finetune")
    assert lora.stages["finetune"].disk_total < 2 * GiB  # adapters-only checkpoints


def test_sdxl_lora_1024_batch_1_fits_80_gb(config_folders):
    plan = _plan(config_folders["sdxl"], "finetune.method=lora", "finetune.mixed_precision=bf16", "finetune.batch_size=1")
    assert plan.model.resolution == 1024
    assert plan.stages["finetune"].memory < 80 * GiB and plan.fits("finetune")


def test_knobs_shrink_the_stage_they_name(config_folders):
    """Each knob lowers the prediction where it applies (SDXL full at 1024 px, batch 4, peaks in the forward pass)."""
    base = ("finetune.method=full", "finetune.mixed_precision=bf16", "finetune.batch_size=4", "finetune.gradient_checkpointing=false")
    memory = lambda *s: _plan(config_folders["sdxl"], *base, *s, memory=None).stages["finetune"].memory  # noqa: E731
    full = memory()
    for knob in ("finetune.gradient_checkpointing=true", "finetune.batch_size=1", "finetune.optimizer=adamw-8bit",
                 "finetune.method=lora"):
        assert memory(knob) < full, knob


def test_finetune_plan_holds_what_finetune_keeps_on_the_device(config_folders):
    """The text encoders count only while the conditioning is computed (finetune moves them off the
    device before the first step); the frozen VAE is in the weight dtype, a full fine-tune's
    denoiser in fp32; gradient checkpointing is on by default."""
    plan = _plan(config_folders["flux"], "finetune.method=full", "finetune.mixed_precision=bf16", memory=None)
    phases = plan.stages["finetune"].phases
    assert phases["text encoding"]["weights: text encoders (bf16)"] > 9 * GiB  # T5-XXL and CLIP-L in bf16
    for name in ("forward", "optimiser step", "VAE encode", "preview"):
        assert not [item for item in phases[name] if "text encoders" in item], name
    assert {"weights: vae (bf16)", "weights: transformer (fp32)"} <= set(phases["forward"])
    assert any("checkpointed" in item for item in phases["forward"])


def test_lora_count_is_what_finetune_trains():
    """The planner's LoRA count equals the trainable parameters `finetune` creates with peft."""
    from conceptseg.finetune import FinetuneConfig, trainable_parameters
    from conceptseg.modeling.sd import build_components
    from conceptseg.modeling.presets import build_family_components

    for parts in (build_components("tiny"), build_family_components("flux", "tiny")):
        denoiser = parts.get("unet") or parts["transformer"]
        expected = lora_parameters(denoiser, 4)
        cfg = FinetuneConfig("bird", [], Path("."), Path("."), method="lora", lora_rank=4)
        assert sum(p.numel() for p in trainable_parameters(denoiser, cfg)) == expected > 0


def test_check_fits_names_stage_memory_and_knobs(config_folders):
    cfg = load_config(None, ["concept=bird", "images=x", f"model={config_folders['flux']}", "finetune.method=full",
                             "finetune.mixed_precision=bf16"])
    with pytest.raises(PlanDoesNotFit) as e:
        check_fits(cfg, device_memory_gb=80)
    said = str(e.value)
    assert "finetune: predicted" in said and "of 80.0 GB" in said and "finetune.method=lora" in said
    check_fits(load_config(None, ["concept=bird", "images=x"]), device_memory_gb=80)  # the toy model fits


def test_cli_json_on_the_embedded_model(capsys):
    from conceptseg.cli import main

    assert main(["plan", "configs/toy.yaml", "--json", "--device-memory-gb", "80"]) == 0
    out = json.loads(capsys.readouterr().out)
    stages = {"prelim", "finetune", "refine", "synth", "segmenter", "evaluation"}
    assert set(out["device_memory_gb"]) == set(out["disk_gb"]) == stages
    assert all(out["fits"].values()) and out["parameters"]["unet"] > 0


def test_run_refuses_a_config_that_does_not_fit_before_loading_anything(config_folders, tmp_path, monkeypatch):
    """`conceptseg run` calls check_fits first: FLUX full fine-tuning on an 80 GB GPU stops at once."""
    from conceptseg import plan
    from conceptseg.pipeline import Run

    monkeypatch.setattr(plan, "visible_device_memory_gb", lambda: 80.0)
    cfg = load_config(None, ["concept=bird", "images=x", f"model={config_folders['flux']}", "finetune.method=full",
                             "finetune.mixed_precision=bf16", "device=cuda", f"out={tmp_path / 'run'}"])
    with pytest.raises(PlanDoesNotFit, match="finetune.method=lora"):
        Run(cfg, progress=False).execute()
    assert not (tmp_path / "run").exists()  # nothing was written
