"""`conceptseg run`: typed YAML config with overrides, the whole pipeline on a tiny model, resume."""

import json
from pathlib import Path

import pytest
import yaml

from conceptseg.demo import demo_config
from conceptseg.config import override_config
from conceptseg.pipeline import ROW_NAMES, Run, load_config


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"concept": "bird", "images": "cub:/data/CUB", "finetune": {"steps": 10, "method": "lora"}}))
    cfg = load_config(path, ["finetune.steps=20", "segmenter.width=16", "prompt=a photo of a small bird"])
    assert cfg.concept == ["bird"] and cfg.finetune.steps == 20 and cfg.finetune.method == "lora"
    assert cfg.segmenter.width == 16 and cfg.prompt == "a photo of a small bird"
    assert cfg.refine.steps == 50  # untouched defaults are the paper's
    with pytest.raises(ValueError, match="unknown setting.*stepz"):
        load_config(path, ["finetune.stepz=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(path, ["finetune.steps"])
    again = override_config(cfg, ["synth.num=7", "refine.postprocess=true"])  # a built config (the demo's)
    assert again.synth.num == 7 and again.refine.postprocess is True and again.finetune.steps == 20
    assert override_config(cfg, []) is cfg
    with pytest.raises(ValueError, match="unknown setting.*nmu"):
        override_config(cfg, ["synth.nmu=7"])


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    medical = {"mscxr.yaml", "chest.yaml"}  # configs of `conceptseg medical`, not of `conceptseg run`
    for c in configs:
        if c.name in medical:
            from conceptseg.medical_experiment import load_medical_config

            load_medical_config(c)
        else:
            load_config(c)


def _tiny_demo(out, model_dir, num_images=20):
    cfg = demo_config(out, model=str(model_dir), device="cpu", num_images=num_images)  # about 80% train: every stage, seconds
    cfg.prelim.steps = 2
    cfg.finetune.steps = 2
    cfg.refine.steps = 2
    cfg.synth.num, cfg.synth.steps = 3, 2
    cfg.segmenter.steps, cfg.segmenter.width, cfg.segmenter.input_size = 2, 4, 32
    return cfg


def _count_loads(monkeypatch) -> list[str]:
    """The folders whose weights are read from disk, once per read (the SD 1.x/2.x loader)."""
    from conceptseg.families import sd

    loads: list[str] = []
    real = sd._load_parts
    monkeypatch.setattr(sd, "_load_parts", lambda source, *a, **k: loads.append(str(source)) or real(source, *a, **k))
    return loads


def test_tiny_end_to_end_run_then_resume(tiny_model_dir, tmp_path, monkeypatch):
    cfg = _tiny_demo(tmp_path / "run", tiny_model_dir)
    loads = _count_loads(monkeypatch)
    metrics = Run(cfg, progress=False).execute()
    # each model once: the stage-1 model (prelim, the untuned row, then handed to fine-tuning: the
    # same dtype on the CPU) and the fine-tuned one (refine, synth)
    assert loads == [str(tiny_model_dir), str(tmp_path / "run" / "finetune" / "model")]
    assert list(metrics) == list(ROW_NAMES)  # every row of the paper's table
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(saved) == set(ROW_NAMES) | {"protocol"} and "centre crop 32x32" in saved["protocol"]
    # best, worst, and the stage-2 ablation (the demo's untuned row: inpaintings before and after fine-tuning)
    assert (tmp_path / "run" / "report.html").read_text().count("<img src='data:image/png;base64,") == 3
    assert (tmp_path / "run" / "grid_ablation.png").exists() and (tmp_path / "run" / "untuned" / "background").is_dir()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    n_test = manifest["counts"]["images"]["test"]
    for key in ROW_NAMES:
        assert all(0.0 <= saved[key][k] <= 1.0 for k in ("acc", "iou", "miou"))
        assert saved[key]["evaluated"] + saved[key]["missing"] == n_test  # every row on the same test images
    assert manifest["disk_bytes"]["finetune"] > manifest["disk_bytes"]["prelim"] > 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["finetune"]["steps"] == 2 and "torch" in manifest["versions"]
    # each stage's peak resident memory, measured from the stage's start where the kernel allows it
    assert set(manifest["peak_rss_mb"]) == set(manifest["timings_s"]) and all(v > 0 for v in manifest["peak_rss_mb"].values())
    assert manifest["peak_rss_since"] in ("stage start", "process start")
    mask = tmp_path / "run" / "refine" / "masks"
    stamps = {p.name: p.stat().st_mtime_ns for p in mask.iterdir()}
    model_stamp = (tmp_path / "run" / "finetune" / "model" / "unet" / "config.json").stat().st_mtime_ns

    again = Run(cfg, progress=False).execute()  # complete and unchanged: nothing is redone, nor loaded
    assert again == metrics and len(loads) == 2
    assert {p.name: p.stat().st_mtime_ns for p in mask.iterdir()} == stamps
    assert (tmp_path / "run" / "finetune" / "model" / "unet" / "config.json").stat().st_mtime_ns == model_stamp

    def stamp(*parts):
        return (tmp_path / "run" / "segmenter" / Path(*parts) / "model" / "model.safetensors").stat().st_mtime_ns

    segmenters = {name: stamp(name) for name in ("unet_prelim", "supervised", "unet_real", "unet_real_synth")}
    cfg.finetune.steps = 3  # a changed stage is redone, its old folder kept aside, and so is all downstream of it
    Run(cfg, progress=False).execute()
    assert (tmp_path / "run" / "finetune.old").exists()
    assert json.loads((tmp_path / "run" / "finetune" / "checkpoints" / "step-000003" / "state.json").read_text())["step"] == 3
    assert (tmp_path / "run" / "refine.old").exists() and (tmp_path / "run" / "synth.old").exists()
    assert stamp("unet_real") != segmenters["unet_real"] and stamp("unet_real_synth") != segmenters["unet_real_synth"]
    # not downstream of fine-tuning: kept
    assert stamp("unet_prelim") == segmenters["unet_prelim"] and stamp("supervised") == segmenters["supervised"]
    assert not (tmp_path / "run" / "prelim.old").exists()

    # the latent cache changes the training data (fixed views per image instead of a fresh crop and
    # flip per step): an output setting, so turning it on redoes fine-tuning and all downstream of it
    segmenters = {name: stamp(name) for name in segmenters}
    cfg.finetune.latent_cache = 2
    Run(cfg, progress=False).execute()
    old_state = tmp_path / "run" / "finetune.old" / "checkpoints" / "step-000003" / "state.json"
    assert old_state.exists()  # one .old per stage: the steps=3 model replaced the steps=2 one
    assert not (tmp_path / "run" / "finetune.old.old").exists()
    assert stamp("unet_real") != segmenters["unet_real"] and (tmp_path / "run" / "refine.old").exists()
    assert stamp("unet_prelim") == segmenters["unet_prelim"] and not (tmp_path / "run" / "prelim.old").exists()


def test_a_lora_run_loads_each_model_once_and_holds_none_while_segmenters_train(tiny_model_dir, tmp_path, monkeypatch):
    """A LoRA fine-tune's refine and synth load its base once with the adapters attached (not a third
    copy of the base); no diffusion model is held once the last stage that runs one is done."""
    import gc
    import weakref

    from conceptseg import models
    from conceptseg.segmenter import train as segmenter_train

    cfg = override_config(_tiny_demo(tmp_path / "run", tiny_model_dir, num_images=10),
                          ["finetune.method=lora", "finetune.lora_rank=2", "synth.num=1", "baselines=false",
                           "segmenter.train_on_prelim=false", "segmenter.supervised=false"])
    loads, made, alive = _count_loads(monkeypatch), [], []
    real_load, real_train = models.load_model, segmenter_train.train_segmenter

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        made.append(weakref.ref(model))
        return model

    def train(config):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        return real_train(config)

    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(segmenter_train, "train_segmenter", train)
    Run(cfg, progress=False).execute()
    assert loads == [str(tiny_model_dir)] * 2  # the stage-1 model; the fine-tuned one's base, adapters attached
    assert made and alive == [0, 0]  # at each of the two segmenters (D_s, D_s + D'_s)


def _outputs(run: Path) -> dict:
    """Every output file of a run but its run-level records (the stages' manifests included), with
    its modification time and inode (an atomic rewrite makes a new file)."""
    return {p.relative_to(run): (p.stat().st_mtime_ns, p.stat().st_ino) for p in run.rglob("*")
            if p.is_file() and not (p.parent == run and (p.name in ("manifest.json", "stages.json", "metrics.json", "report.html")
                                                          or p.name.startswith("grid_")))
            and "data" not in p.relative_to(run).parts[:1]}


def test_a_moved_run_redoes_nothing_nor_do_execution_settings(tiny_model_dir, tmp_path):
    """Manifests held absolute paths, so a moved run redid stages 3 and 4; batch sizes, checkpoint
    cadence and gradient checkpointing were part of the fingerprints; the model was recorded by its
    path, so a moved model folder redid everything."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    Run(_tiny_demo(tmp_path / "run", tmp_path / "model"), progress=False).execute()
    shutil.move(tmp_path / "run", tmp_path / "moved")
    shutil.move(tmp_path / "model", tmp_path / "models" / "tiny")
    before = _outputs(tmp_path / "moved")
    metrics = json.loads((tmp_path / "moved" / "metrics.json").read_text())
    cfg = override_config(_tiny_demo(tmp_path / "moved", tmp_path / "models" / "tiny"),
                          ["refine.batch_size=3", "prelim.batch_size=7", "synth.batch_size=2", "finetune.checkpoint_every=1",
                           "finetune.gradient_checkpointing=false", "segmenter.checkpoint_every=1",
                           "finetune.checkpoints_total_limit=5"])
    Run(cfg, progress=False).execute()
    assert _outputs(tmp_path / "moved") == before  # not one file rewritten
    assert json.loads((tmp_path / "moved" / "metrics.json").read_text()) == metrics
    assert not list((tmp_path / "moved").rglob("*.old"))


def test_a_plain_folder_of_test_images_is_segmented(tiny_model_dir, tmp_path, make_image):
    cfg = _tiny_demo(tmp_path / "run", tiny_model_dir)
    for i in range(2):
        make_image(tmp_path / "new" / f"photo{i}.jpg", 40, 30, seed=i)
    cfg = override_config(cfg, [f"test_images={tmp_path / 'new'}", "synth.num=0", "segmenter.supervised=false",
                                "segmenter.train_on_prelim=false", "baselines=false"])
    assert Run(cfg, progress=False).execute() == {}  # nothing to score against
    assert sorted(p.name for p in (tmp_path / "run" / "eval" / "unet_real" / "masks").iterdir()) == ["photo0.png", "photo1.png"]


@pytest.mark.long
def test_two_process_sharding_equals_one_process(tiny_model_dir, tmp_path, make_image):
    """`accelerate launch` with 2 CPU processes shards the per-image stages; outputs equal a single process's."""
    import os
    import subprocess
    import sys

    images = tmp_path / "images"
    for i in range(5):
        make_image(images / f"im{i}.png", 30 + 3 * i, 40 - 2 * i, seed=i)
    (images / "broken.png").write_bytes(b"nope")
    common = ["prelim", "--model", str(tiny_model_dir), "--concept", "bird", "--images", str(images), "--steps", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "conceptseg"]
    two = subprocess.run(launch + common + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "conceptseg"] + common + ["--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    for i in range(5):
        a = (tmp_path / "one" / "masks" / f"im{i}.png").read_bytes()
        assert a == (tmp_path / "two" / "masks" / f"im{i}.png").read_bytes()
        assert (tmp_path / "one" / "attention" / f"im{i}.npy").read_bytes() == (tmp_path / "two" / "attention" / f"im{i}.npy").read_bytes()
    merged = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert len(merged["images"]) == 6 and merged["images"]["broken"]["status"] == "failed"
    assert not list((tmp_path / "two").glob("manifest.shard-*"))


@pytest.mark.long
def test_two_process_run_equals_one_process(tiny_model_dir, tmp_path):
    """`accelerate launch -m conceptseg run` with 2 CPU processes: every per-image stage (prelim, refine,
    crop, synth, segment) is sharded and gives the same files as one process, and so the same table.

    The trainers are shared: DDP on 2 processes sees twice the batch, so it is not meant to equal one
    process; the run made with one process is kept and the per-image stages are redone around it."""
    import dataclasses
    import os
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    cfg = _tiny_demo(run, tiny_model_dir)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "conceptseg", "run", str(config)], env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]

    per_image = ["prelim", "refine", "crop", "synth", "eval"]
    outputs = {p.relative_to(run): p.read_bytes() for d in per_image for p in (run / d).rglob("*") if p.suffix in (".png", ".npy")}
    assert {p.parts[0] for p in outputs} == set(per_image) and len(outputs) > 60
    metrics = (run / "metrics.json").read_text()
    trained = (run / "finetune" / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    for d in per_image:
        shutil.rmtree(run / d)
    (run / "metrics.json").unlink()

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "conceptseg"]
    two = subprocess.run(launch + ["run", str(config)], env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    again = {p.relative_to(run): p.read_bytes() for d in per_image for p in (run / d).rglob("*") if p.suffix in (".png", ".npy")}
    assert sorted(again) == sorted(outputs)
    assert [k for k in outputs if again[k] != outputs[k]] == []
    assert (run / "metrics.json").read_text() == metrics
    assert (run / "finetune" / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == trained
    for d in ("prelim", "refine", "synth"):
        assert not list((run / d).glob("manifest.shard-*"))  # the shards' manifests were merged


def test_killed_anywhere_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """SIGKILL `conceptseg run` at several points (inside stage 1, inside a trainer's checkpoint
    write, inside the report), rerun each time: the same
    metrics.json and mask files as a run never interrupted, and no temporary file left."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys
    import time

    def config(run: Path) -> Path:
        cfg = _tiny_demo(run, tiny_model_dir, num_images=12)
        cfg = override_config(cfg, ["synth.num=0", "segmenter.train_on_prelim=false", "segmenter.supervised=false"])
        path = tmp_path / f"{run.name}.yaml"
        path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
        return path

    def start(path: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "conceptseg", "run", str(path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})

    straight = tmp_path / "straight"
    Run(load_config(config(straight)), progress=False).execute()  # in this process: no start-up to pay

    run = tmp_path / "killed"
    path = config(run)
    triggers = [
        lambda: len(list((run / "prelim" / "masks").glob("*.png"))) >= 4,
        lambda: any((run / "finetune" / "checkpoints").glob("step-*")),
        lambda: (run / "grid_best.png").exists() or any(run.glob(".report.html.*")),
    ]
    killed = 0
    for fired in triggers:
        proc = start(path)
        while proc.poll() is None and not fired():
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 2  # the run was really cut short, several times
    last = start(path)
    assert last.wait(timeout=900) == 0, last.stderr.read()[-3000:]

    assert (run / "metrics.json").read_text() == (straight / "metrics.json").read_text()
    masks = {p.relative_to(straight) for p in straight.rglob("*.png") if "masks" in p.parts}
    assert len(masks) > 20 and masks == {p.relative_to(run) for p in run.rglob("*.png") if "masks" in p.parts}
    assert [m for m in masks if (run / m).read_bytes() != (straight / m).read_bytes()] == []
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_a_resolved_value_change_redoes_stage_one_and_everything_downstream(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`dtype: auto` resolving differently (another device) redid stage 1 through its manifest while
    the ledger, which fingerprinted `auto` as written, kept fine-tuning and refinement built from
    the old M_pre. Simulated by a resolver that makes `auto` bf16."""
    import torch

    from conceptseg import models

    cfg = override_config(_tiny_demo(tmp_path / "run", tiny_model_dir, num_images=10),
                          ["synth.num=2", "segmenter.train_on_prelim=true"])
    Run(cfg, progress=False).execute()
    run = tmp_path / "run"
    supervised = (run / "segmenter" / "supervised" / "model" / "model.safetensors").stat().st_mtime_ns

    resolve = models.resolve_dtype
    monkeypatch.setattr(models, "resolve_dtype", lambda dtype, device: torch.bfloat16 if dtype in (None, "auto") else resolve(dtype, device))
    capsys.readouterr()
    Run(cfg, progress=False).execute()
    redone = ["prelim", "finetune", "refine", "crop", "synth", "segmenter/unet_real", "segmenter/unet_real_synth",
              "segmenter/unet_prelim", "eval/unet_real", "eval/unet_real_synth", "eval/unet_prelim"]
    assert [s for s in redone if not (run / f"{s}.old").is_dir()] == []
    assert json.loads((run / "prelim" / "manifest.json").read_text())["settings"]["dtype"] == "bfloat16"
    # the upper bound reads no stage of the run: kept
    assert not (run / "segmenter" / "supervised.old").exists() and not (run / "eval" / "supervised.old").exists()
    assert (run / "segmenter" / "supervised" / "model" / "model.safetensors").stat().st_mtime_ns == supervised
    said = capsys.readouterr().out
    assert "finetune: a stage it reads was redone; redoing it. Its previous outputs are in finetune.old" in said
    assert "`conceptseg run --clean` removes it" in said

    before = _outputs(run)
    Run(cfg, progress=False, clean=True).execute()  # unchanged: nothing redone, and the .old folders go
    assert _outputs(run) == {k: v for k, v in before.items() if ".old" not in str(k)}
    assert not list(run.rglob("*.old"))


def test_the_ledger_cascades_redos_and_keeps_one_old_folder_per_stage(tmp_path):
    """A stage redone because its folder's manifest disagrees (same fingerprint: a lost or edited
    ledger) marks everything downstream stale on disk, so a run interrupted after it still redoes
    them; a second redo replaces `<stage>.old`."""
    from conceptseg.io import SettingsChanged
    from conceptseg.pipeline import Ledger, RunConfig, Stage

    run = Run(RunConfig(concept="bird", images="unused", out=str(tmp_path / "run"), device="cpu"), progress=False)
    made = []

    def stage(name, upstream=(), value=1, refuse=False):
        folder = tmp_path / "run" / name

        def make():
            if refuse and (folder / "out.txt").exists():
                raise SettingsChanged(f"{folder} holds outputs made with other settings (x); pass --overwrite")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "out.txt").write_text(f"{name} {value} {len(made)}")
            made.append(name)

        def run_it():
            return run._per_image(lambda out, shard: make(), out=folder) if refuse else make()

        return Stage(name, folder, run_it, {"value": value}, upstream=upstream)

    for s in (stage("a"), stage("b", ("a",)), stage("c", ("b",)), stage("d")):
        run._stage(s)
    run._stage(stage("a", refuse=True))  # redone by its manifest, fingerprint unchanged; then the run is "killed"
    assert (tmp_path / "run" / "a.old").is_dir()
    assert {n: Ledger(tmp_path / "run").fingerprint(n) for n in "bcd"} == {"b": "stale", "c": "stale", "d": run.ledger.fingerprint("d")}

    again = Run(run.cfg, progress=False)
    made.clear()
    run = again
    for s in (stage("a"), stage("b", ("a",)), stage("c", ("b",)), stage("d")):
        run._stage(s)
    assert made == ["a", "b", "c", "d"]  # stages simply run again; b and c were set aside first
    assert (tmp_path / "run" / "b.old").is_dir() and (tmp_path / "run" / "c.old").is_dir()
    assert not (tmp_path / "run" / "d.old").exists()
    run._stage(stage("b", ("a",), value=2))
    assert (tmp_path / "run" / "b.old" / "out.txt").read_text().startswith("b 1")  # the newest old outputs
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".old")) == ["a.old", "b.old", "c.old"]
    assert len(run.remove_old_outputs()) == 3 and not list((tmp_path / "run").glob("*.old"))


def test_train_and_test_folders_that_reuse_file_names(tiny_model_dir, tmp_path, make_image):
    """`images: folder:A` and `test_images: folder:B,masks=...` both holding 00001.png was refused
    ("train and test images share keys but are different files")."""
    for i in range(4):
        make_image(tmp_path / "A" / f"{i:05d}.png", 48, 48, seed=i)
    for i in range(2):
        make_image(tmp_path / "B" / f"{i:05d}.png", 48, 48, seed=10 + i)
        make_image(tmp_path / "Bm" / f"{i:05d}.png", 48, 48, seed=10 + i, mode="L")
    cfg = override_config(_tiny_demo(tmp_path / "run", tiny_model_dir),
                          [f"images=folder:{tmp_path / 'A'}", f"test_images=folder:{tmp_path / 'B'},masks={tmp_path / 'Bm'}",
                           "synth.num=0", "segmenter.supervised=false", "segmenter.train_on_prelim=false"])
    metrics = Run(cfg, progress=False).execute()
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "prelim" / "masks").iterdir()) == [
        "00000.png", "00001.png", "00002.png", "00003.png", "test_00000.png", "test_00001.png"]
    assert sorted(p.name for p in (run / "eval" / "unet_real" / "masks").iterdir()) == ["test_00000.png", "test_00001.png"]
    assert metrics["unet_real"]["evaluated"] == 2 and metrics["crop"]["evaluated"] == 2


def test_a_model_is_recorded_by_its_content(tmp_path):
    """A model folder's identity: its small files' content and its weight files' names and sizes,
    not its path, nor the `_name_or_path` a re-saved config keeps, nor hidden files."""
    import shutil

    from conceptseg.settings import model_identity

    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (base / "unet" / "config.json").write_text(json.dumps({"sample_size": 8, "_name_or_path": "/somewhere"}))
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)
    identity = model_identity(base)
    assert identity.startswith("content:") and model_identity(None) == "embedded:toy" and model_identity("org/model") == "org/model"
    shutil.copytree(base, tmp_path / "elsewhere" / "copy")
    (tmp_path / "elsewhere" / "copy" / ".cache").mkdir()
    (tmp_path / "elsewhere" / "copy" / "unet" / "config.json").write_text(json.dumps({"_name_or_path": "/moved", "sample_size": 8}))
    assert model_identity(tmp_path / "elsewhere" / "copy") == identity

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "conceptseg_lora.json").write_text(json.dumps({"base_model": str(base), "rank": 4}))
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"y" * 10)
    moved_lora = tmp_path / "lora2"
    shutil.copytree(lora, moved_lora)
    (moved_lora / "conceptseg_lora.json").write_text(json.dumps({"base_model": str(tmp_path / "elsewhere" / "copy"), "rank": 4}))
    assert model_identity(moved_lora) == model_identity(lora)  # its base by the base's content

    (base / "unet" / "config.json").write_text(json.dumps({"sample_size": 16}))
    assert model_identity(base) != identity
    assert model_identity(moved_lora) != model_identity(lora)
    shutil.copy(tmp_path / "elsewhere" / "copy" / "unet" / "config.json", base / "unet" / "config.json")
    assert model_identity(base) == identity
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 101)
    assert model_identity(base) != identity


def test_run_takes_clean(tmp_path, monkeypatch):
    """`conceptseg run CONFIG --clean` hands `clean` to the run."""
    from conceptseg import cli, pipeline

    seen = {}

    class Recorder:
        def __init__(self, cfg, clean=False):
            seen["clean"] = clean

        def execute(self):
            return {}

    monkeypatch.setattr(pipeline, "Run", Recorder)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"concept": "bird", "images": str(tmp_path), "out": str(tmp_path / "run")}))
    for extra, clean in (([], False), (["--clean"], True)):
        assert cli.main(["run", str(config), *extra]) == 0 and seen["clean"] is clean
