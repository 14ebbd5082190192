"""`conceptseg` command line: one subcommand per stage, and the commands that use, score and
reproduce the result (grouped in `conceptseg --help` by COMMAND_GROUPS)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conceptseg import distributed


def _cmd_toyworld(args) -> None:
    from conceptseg.data.toyworld import ToyWorldConfig, generate

    cfg = _config(args, ToyWorldConfig)
    if args.domain == "chest":
        from conceptseg.data.chest import FINDINGS, ChestWorldConfig, generate as generate_chest

        chest = ChestWorldConfig(size=cfg.size, findings=tuple(args.classes or FINDINGS))
        out = generate_chest(args.out, args.num, seed=args.seed, config=chest, workers=args.workers)
        print(f"wrote {args.num} chest radiographs with reports to {out}")
        return
    if args.classes:
        cfg.classes = tuple(args.classes)
    out = generate(args.out, args.num, seed=args.seed, config=cfg, workers=args.workers)
    print(f"wrote {args.num} rows to {out}")


def _cmd_train_t2i(args) -> None:
    import torch

    from conceptseg.train_t2i import TrainT2IConfig, train_t2i

    if args.threads:
        torch.set_num_threads(args.threads)
    final = train_t2i(_config(args, TrainT2IConfig))
    print(f"model: {final}\nsamples: {Path(args.out) / 'samples.png'}")


def _cmd_prelim(args) -> None:
    from conceptseg.models import load_model
    from conceptseg.prelim import PrelimConfig, run_prelim

    cfg = _config(args, PrelimConfig)
    model = load_model(args.model, device=args.device or distributed.device(), dtype=args.dtype)
    print(f"prelim: {model.describe()}")
    summary = run_prelim(model, args.images, args.out, cfg, overwrite=args.overwrite, split=args.split, shard=distributed.shard())
    distributed.finish_per_image_stage(args.out)
    print(f"prelim: {summary['processed']} done, {summary['skipped_done']} already done, {summary['failed']} failed "
          f"-> {args.out}")


def _cmd_eval_toy_model(args) -> None:
    import json

    from conceptseg.io import write_json
    from conceptseg.models import load_model
    from conceptseg.toy_eval import ToyEvalConfig, evaluate_toy_model

    cfg = _config(args, ToyEvalConfig, parts=tuple(args.parts))
    reports = {}
    for name in args.model:
        model = load_model(name, device=args.device, dtype=args.dtype)
        reports[str(name)] = evaluate_toy_model(model, args.data, cfg)
        r = reports[str(name)]
        line = [f"AUC {r['correct_word']['auc']:.3f}  IoU(M_pre) {r['correct_word']['prelim_iou']:.3f}" if "correct_word" in r else "",
                f"class-by-denoising {r['class_by_denoising_accuracy']:.3f}" if "class_by_denoising_accuracy" in r else "",
                f"binding AUC {r['binding_auc']:.3f}" if "binding_auc" in r else "",
                f"wrong-word AUC {r['wrong_word']['auc']:.3f}" if "wrong_word" in r else "",
                f"random-init AUC {r['random_init']['auc']:.3f}" if "random_init" in r else "",
                f"centre-prior AUC {r['centre_prior_auc']:.3f}" if "centre_prior_auc" in r else "",
                "AUC per level " + ", ".join(f"{k} {v:.3f}" for k, v in r["auc_per_level"].items()) if "auc_per_level" in r else ""]
        print(f"{name}: " + "  ".join(x for x in line if x), flush=True)
        if args.out:
            write_json(args.out, reports)
    if not args.out:
        print(json.dumps(reports, indent=2))


def _cmd_demo(args) -> None:
    if args.medical:
        from conceptseg.demo import medical_demo_config
        from conceptseg.medical_experiment import run_medical

        run_medical(medical_demo_config(args.out, model=args.model, device=args.device, num_images=args.num_images))
        print(f"\nnumbers: {args.out}/findings.json")
        return
    from conceptseg.demo import demo_config
    from conceptseg.config import override_config
    from conceptseg.pipeline import Run
    from conceptseg.tables import format_table

    cfg = demo_config(args.out, args.concept, full=args.full, model=args.model, device=args.device, num_images=args.num_images,
                      world=args.world)
    cfg = override_config(cfg, args.set or [])
    metrics = Run(cfg).execute()
    print(f"\nheld-out toy-world '{args.concept}' images, pooled over all pixels (%):\n{format_table(metrics)}")
    print(f"\nrun folder: {args.out}   numbers: {args.out}/metrics.json   report: {args.out}/report.html")


def _cmd_medical(args) -> None:
    from conceptseg.medical_experiment import load_medical_config, run_medical

    cfg = load_medical_config(args.config, args.set or [])
    run_medical(cfg)
    print(f"\nrun folder: {cfg.out}")


def _cmd_run(args) -> None:
    from conceptseg.pipeline import Run, load_config
    from conceptseg.tables import format_table

    cfg = load_config(args.config, args.set or [])
    metrics = Run(cfg, clean=args.clean).execute()
    if metrics:
        print(f"\n{format_table(metrics)}")
    print(f"\nrun folder: {cfg.out}")


def _cmd_plan(args) -> None:
    import json

    from conceptseg.pipeline import load_config
    from conceptseg.plan import format_plan, plan_json, plan_run, visible_device_memory_gb

    cfg = load_config(args.config, args.set or [])
    plan = plan_run(cfg, args.device_memory_gb or visible_device_memory_gb(), images=args.images)
    print(json.dumps(plan_json(plan), indent=2) if args.json else format_plan(plan))


def _cmd_finetune(args) -> None:
    from conceptseg.finetune import FinetuneConfig, finetune

    print(f"fine-tuned model: {finetune(_config(args, FinetuneConfig))}")


def _cmd_refine(args) -> None:
    from conceptseg.models import load_model
    from conceptseg.refine import RefineConfig, run_refine

    cfg = _config(args, RefineConfig)
    # the crop inpainter needs no model: it works on stage 1's canvas, read from its manifest
    model = None
    if args.inpainter == "model":
        model = load_model(args.model, device=args.device or distributed.device(), dtype=args.dtype)
    summary = run_refine(model, args.images, args.prelim, args.out, cfg, overwrite=args.overwrite, split=args.split,
                         shard=distributed.shard())
    distributed.finish_per_image_stage(args.out)
    print(f"refine: {summary['processed']} done, {summary['skipped_done']} already done, {summary['failed']} failed -> {args.out}")


def _cmd_synth(args) -> None:
    from conceptseg.models import load_model
    from conceptseg.refine import RefineConfig
    from conceptseg.synth import SynthConfig, run_synth, write_metadata

    cfg = _config(args, SynthConfig, refine=_config(args, RefineConfig))
    model = load_model(args.model, device=args.device or distributed.device(), dtype=args.dtype)
    run_synth(model, args.out, cfg, shard=distributed.shard())
    distributed.finish_per_image_stage(args.out)
    if distributed.is_main():
        write_metadata(args.out, cfg)
    print(f"synthetic dataset: {args.out}")


def _cmd_train_seg(args) -> None:
    from conceptseg.segmenter.train import TrainSegConfig, train_segmenter

    print(f"segmenter: {train_segmenter(_config(args, TrainSegConfig))}")


def _say(args, picked) -> str | None:
    """Print what a run folder or stage folder was taken to mean; return what to load."""
    if picked.note:
        print(f"{args.command}: {picked.note}", flush=True)
    return picked.source


def _segmenter_source(args) -> str:
    """--segmenter (a segmenter, a run's stage folder or the run, an .onnx file, a hub id), else --run's best."""
    from conceptseg.runs import resolve_segmenter, segmenter_of_run

    return _say(args, resolve_segmenter(args.segmenter) if args.segmenter is not None else segmenter_of_run(args.run))


def _model_source(args, from_run: bool = True) -> str | None:
    """--model (a run's stage folder or the run: its fine-tuned model), else --run's fine-tuned model
    (`from_run`), else None: the embedded model."""
    from conceptseg.runs import pick_model, resolve_model

    if args.model is None and from_run and getattr(args, "run", None) is not None:
        return _say(args, pick_model(args.run))
    return _say(args, resolve_model(args.model))


def _cmd_segment(args) -> None:
    from conceptseg.segmenter.predict import collect_rle, load_segmenter, run_segment

    seg = load_segmenter(_segmenter_source(args), device=args.device or distributed.device(), threshold=args.threshold, provider=args.provider)
    summary = run_segment(seg, args.images, args.out, outputs=args.output, cutouts=args.cutout, color=args.color,
                          background=args.background, rle=args.rle, batch_size=args.batch_size, overwrite=args.overwrite,
                          split=args.split, shard=distributed.shard(), num_workers=args.num_workers)
    distributed.finish_per_image_stage(args.out)
    if args.rle and distributed.is_main():
        print(f"COCO RLE: {collect_rle(args.out)}")
    print(f"segment: {summary['processed']} done, {summary['skipped_done']} already done, {summary['failed']} failed -> {args.out}")


def _cmd_export_onnx(args) -> None:
    from conceptseg.segmenter.predict import export_onnx, load_segmenter

    diff = export_onnx(load_segmenter(_segmenter_source(args)), args.out, check=not args.no_check)
    print(f"wrote {args.out}" + (f" (max abs difference to torch: {diff:.2e})" if diff is not None else ""))


def _edit_inputs(args):
    from conceptseg.edit import EditConfig, MaskSource

    if args.masks is None and args.segmenter is None and args.run is None:
        raise ValueError("no masks: give --masks DIR, --segmenter SEGMENTER or --run RUN")
    segmenter = None
    if args.masks is None:
        from conceptseg.segmenter.predict import load_segmenter

        segmenter = load_segmenter(_segmenter_source(args), device=args.device or distributed.device())
    return MaskSource(args.masks, segmenter), _config(args, EditConfig)


def _cmd_remove(args) -> None:
    from conceptseg.edit import run_remove
    from conceptseg.models import load_model

    masks, cfg = _edit_inputs(args)
    model = load_model(_model_source(args), device=args.device or distributed.device(), dtype=args.dtype)
    summary = run_remove(model, args.images, masks, args.out, cfg, overwrite=args.overwrite, split=args.split, shard=distributed.shard())
    distributed.finish_per_image_stage(args.out)
    print(f"remove: {summary['processed']} done, {summary['skipped_done']} already done, {summary['failed']} failed -> {args.out}/removed")


def _cmd_composite(args) -> None:
    from conceptseg.edit import run_composite

    masks, cfg = _edit_inputs(args)
    model = None
    if args.background is None:
        from conceptseg.models import load_model

        model = load_model(_model_source(args), device=args.device or distributed.device(), dtype=args.dtype)
    summary = run_composite(args.images, masks, args.out, cfg, background=args.background, model=model, overwrite=args.overwrite,
                            split=args.split, shard=distributed.shard())
    distributed.finish_per_image_stage(args.out)
    print(f"composite: {summary['processed']} done, {summary['skipped_done']} already done, {summary['failed']} failed -> {args.out}/composites")


def _cmd_serve(args) -> None:
    from conceptseg.serve import App, make_server
    from conceptseg.segmenter.predict import load_segmenter

    device = args.device or distributed.device()
    source = _segmenter_source(args)
    seg = load_segmenter(source, device=device, threshold=args.threshold, provider=args.provider)
    model = None
    if args.model is not None:
        from conceptseg.models import load_model

        model = load_model(_model_source(args, from_run=False), device=device, dtype=args.dtype)
    if args.example is not None and not Path(args.example).is_file():
        raise FileNotFoundError(f"example image {args.example} not found")
    if args.maps != "cross-attention" and model is None:
        raise ValueError("--maps chooses stage 1's maps, which need --model")
    server = make_server(App(seg, model, args.example, source, args.maps), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"conceptseg serving {source} on http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _cmd_share(args) -> None:
    from conceptseg.runs import pick_segmenter, require_run, segmenter_of_run
    from conceptseg.segmenter.card import model_card
    from conceptseg.segmenter.predict import load_segmenter

    run = require_run(args.run)
    picked = pick_segmenter(run, args.row) if args.row else segmenter_of_run(args.run)
    seg = load_segmenter(_say(args, picked))
    card = model_card(run, picked.row)
    row = picked.row
    print(f"saved {row} with its model card: {seg.save_pretrained(args.out, card)}")
    if args.push_to_hub:
        print(f"pushed: {seg.push_to_hub(args.push_to_hub, card, private=args.private)}")


def _cmd_evaluate(args) -> None:
    from conceptseg.evaluate import format_summary, run_evaluate

    report = run_evaluate(args.pred, args.dataset, args.split, args.out, args.protocol, args.size)
    s = report["summary"]
    print(f"{args.dataset} ({args.split}), pooled over all pixels (%); box IoU averaged over images; {s['protocol']}:\n"
          f"{format_summary(s)}")
    if s["missing"]:
        print(f"{s['missing']} images had no prediction and were scored as empty masks (listed in the JSON)")


def _cmd_evaluate_findings(args) -> None:
    from conceptseg.data.medical import read_finding_cases, read_reported_images
    from conceptseg.io import write_json
    from conceptseg.medical_eval import FindingEvalConfig, evaluate_findings, format_table
    from conceptseg.models import load_model

    cfg = _config(args, FindingEvalConfig)
    cases = read_finding_cases(args.dataset, args.split)
    models = {str(m or "embedded toy model"): load_model(m, device=args.device, dtype=args.dtype) for m in args.model}
    report = evaluate_findings(models, cases, cfg, images=read_reported_images(args.dataset, args.split))
    report["dataset"], report["split"] = args.dataset, args.split
    print(f"{args.dataset} ({args.split}): pixel-wise AUC-ROC of the raw stage-1 map against the union of the finding's boxes, "
          f"mean over its cases; prompt: {cfg.prompt}; M_pre with a {cfg.gmm_components}-component GMM\n{format_table(report)}")
    if args.out:
        write_json(args.out, report)
        print(f"report: {args.out}")


def _cmd_fid(args) -> None:
    from conceptseg.fid import fid

    print(f"FID {fid(args.real, args.fake, args.inception_weights, device=args.device or 'cpu'):.2f}")


# ---------------------------------------------------------------- options from the stage configs
#
# An option that sets a field of a stage's config dataclass takes its default, and how its value
# is read, from that field (`_config_option`): a default is written once, in the config, which the
# run's YAML sections and the Python API read too. `_config` builds the config from those options.

_CONFIG_OPTIONS = "config_options"  # the namespace's {config class: {option dest: field name}}


def _or_none(kind: type) -> Callable[[str], Any]:
    """`kind`, or None for the word 'none' (an optional setting switched off: --max-grad-norm none)."""
    def read(text: str):
        return None if text.lower() == "none" else kind(text)

    read.__name__ = kind.__name__  # argparse names it in its error: "invalid float value: 'x'"
    return read


def _limit(text: str) -> int | None:
    """A number of checkpoints to keep; 'none' or 0: all of them."""
    return _or_none(int)(text) or None


def _reader(hint: Any, default: Any, where: str) -> dict:
    """How argparse reads a value of the annotation `hint`: a bool field is a flag (store_true when it
    defaults to False; --x/--no-x when it defaults to True or is `bool | None`, so that --x never turns
    it off), a number is converted (an optional one also takes 'none'), a path is a Path."""
    parts = typing.get_args(hint)
    optional = type(None) in parts and len(parts) == 2
    kind = next(p for p in parts if p is not type(None)) if optional else hint
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if optional or default else "store_true"}
    if kind in (int, float):
        return {"type": _or_none(kind) if optional else kind}
    if kind is Path:
        return {"type": Path}
    if kind is str:
        return {}
    raise TypeError(f"{where}: argparse cannot read a {hint}; give the option type=, nargs= or action=")


def _config_option(container, config: type, name: str, *flags: str, **kwargs) -> argparse.Action:
    """Add the option that sets field `name` of the dataclass `config` (`flags`; default
    --<name with dashes>): its default from the field (no default: a required option), its type or
    action from the field's annotation unless `kwargs` give one; `kwargs` add help, choices, ..."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    if field.default is not dataclasses.MISSING:
        kwargs["default"] = field.default
    elif field.default_factory is not dataclasses.MISSING:
        kwargs["default"] = field.default_factory()
    else:
        kwargs.setdefault("required", True)
    if flags and flags[0].startswith("--no-") and kwargs.get("default") is True:
        kwargs.setdefault("action", "store_false")  # --no-orphan-filter: the one flag that turns it off
    if not {"type", "action", "nargs"} & set(kwargs):
        kwargs.update(_reader(typing.get_type_hints(config)[name], kwargs.get("default"), f"{config.__name__}.{name}"))
    if kwargs.get("action") == "store_false":
        kwargs.setdefault("dest", name)  # --no-orphan-filter sets orphan_filter
    action = container.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), **kwargs)
    options = container.get_default(_CONFIG_OPTIONS)
    if options is None:
        options = {}
        container.set_defaults(**{_CONFIG_OPTIONS: options})
    options.setdefault(config, {})[action.dest] = name
    return action


def _config(args, config: type, **given):
    """`config` from the options `_config_option` added for it; `given` fields replace theirs."""
    options = getattr(args, _CONFIG_OPTIONS, {}).get(config, {})
    return config(**{**{name: getattr(args, dest) for dest, name in options.items()}, **given})


def _add_clip_arg(s, config: type) -> None:
    _config_option(s, config, "max_grad_norm", help="clip gradients to this norm ('none': no clipping; default %(default)s)")


def _add_gmm_arg(s, config: type) -> None:
    from conceptseg.thresholding import GMM_METHODS

    _config_option(s, config, "gmm", choices=GMM_METHODS,
                   help="GMM threshold fit: sklearn, or torch (the same fit, its EM on the model's device; thresholds "
                        "equal to rounding)")


def _add_checkpoint_args(s, config: type, limit_help: str = "keep the newest N checkpoints ('none': all)") -> None:
    _config_option(s, config, "checkpoint_every")
    _config_option(s, config, "checkpoints_total_limit", type=_limit, help=limit_help)


def _add_model_args(s: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        s.add_argument("--model", nargs="+", default=[None], help="diffusers folders or hub ids (default: the embedded model)")
    else:
        s.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded toy-world model)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")


def _add_images_args(s, help: str = "image folder (subfolders too), image file, glob, or dataset spec "
                                    "(cub:/data/CUB_200_2011) with --split") -> None:
    s.add_argument("--images", required=True, help=help)
    s.add_argument("--split", default="all", choices=["train", "test", "all"], help="with a dataset spec")


def _add_edit_args(s: argparse.ArgumentParser) -> None:
    from conceptseg.edit import EditConfig

    _add_images_args(s, "an image file, a folder, a quoted glob, or a dataset spec with --split")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--masks", type=Path, help="folder of <stem>.png masks (refine's OUT/masks, segment's OUT/masks)")
    where.add_argument("--segmenter", help="or predict the masks with this segmenter (folder, a run's segmenter/<row>, hub id or .onnx)")
    s.add_argument("--run", type=Path, help="a run folder: its best segmenter (unless --masks or --segmenter) and its "
                                            "fine-tuned model (unless --model)")
    s.add_argument("--out", type=Path, required=True)
    _config_option(s, EditConfig, "prompt", help="what the model inpaints or generates")
    _config_option(s, EditConfig, "steps", help="sampling steps")
    _config_option(s, EditConfig, "guidance")
    _config_option(s, EditConfig, "seed")
    _config_option(s, EditConfig, "batch_size")
    s.add_argument("--overwrite", action="store_true")


def _add_segmenter_args(s: argparse.ArgumentParser, what: str) -> None:
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--segmenter", help=what + "; a run's segmenter/<row> folder or the run folder itself also work")
    which.add_argument("--run", type=Path, help="a run folder of `conceptseg run` or `demo`: the segmenter it scored best")


def _add_set_arg(s, example: str = "finetune.steps=200") -> None:
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"override a setting, e.g. {example} (repeatable)")


# ---------------------------------------------------------------- each subcommand's options

def _demo_options(s) -> None:
    s.add_argument("--out", type=Path, default=Path("runs/demo"))
    s.add_argument("--concept", default="fish", help="toy-world class")
    s.add_argument("--full", action="store_true", help="the paper's settings instead of the reduced ones (hours on a CPU)")
    s.add_argument("--model", default=None, help="default: the embedded toy-world model (embedded:toy; also embedded:toy-v1, embedded:toy-v2)")
    s.add_argument("--world", choices=["v1", "v2"], default=None, help="toy world to draw (default: the one the embedded model knows; else v1)")
    s.add_argument("--device", default=None)
    s.add_argument("--num-images", type=int, default=None, help="toy-world images, 80%% train / 20%% test (default: 400, --full 2000)")
    _add_set_arg(s, "synth.num=256")
    s.add_argument("--medical", action="store_true",
                   help="instead: per-finding AUC on held-out chest-world radiographs, embedded chest model against the toy model")


def _medical_options(s) -> None:
    s.add_argument("config", type=Path)
    _add_set_arg(s)


def _run_options(s) -> None:
    s.add_argument("config", type=Path)
    _add_set_arg(s)
    s.add_argument("--clean", action="store_true",
                   help="once the run has finished, remove the <stage>.old folders (the previous outputs of redone stages)")


def _plan_options(s) -> None:
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, as `run` takes it (repeatable)")
    s.add_argument("--json", action="store_true", help='print {"device_memory_gb": {stage: GB}, "disk_gb": {stage: GB}, ...}')
    s.add_argument("--device-memory-gb", type=float, default=None,
                   help="device memory to fit, GiB (default: the visible CUDA device's, else none: no knobs)")
    s.add_argument("--images", type=int, default=None, help="images to assume where the config's datasets cannot be listed")


def _toyworld_options(s) -> None:
    from conceptseg.data.toyworld import ToyWorldConfig, WORLDS

    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--num", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    _config_option(s, ToyWorldConfig, "size")
    s.add_argument("--domain", choices=["toy", "chest"], default="toy",
                   help="toy: objects on photo backgrounds; chest: radiographs with findings and reports")
    _config_option(s, ToyWorldConfig, "world", choices=list(WORLDS),
                   help="toy domain: v1 objects on photo textures; v2 structured scenes, large occluded objects, web-like captions")
    s.add_argument("--classes", nargs="+", help="subset of the toy classes, or of the chest findings (default: all)")
    s.add_argument("--workers", type=int, default=1, help="render rows in this many processes (same output)")


def _prelim_options(s) -> None:
    from conceptseg.concept_attention import MAP_KINDS
    from conceptseg.joint_attention import NORMALISATIONS
    from conceptseg.prelim import PrelimConfig
    from conceptseg.schedules import SIGMA_GRIDS

    _add_model_args(s)
    _config_option(s, PrelimConfig, "concept", nargs="+", help="concept word(s); several words' maps are summed")
    _config_option(s, PrelimConfig, "prompt", help='default: "a photo of a {first concept word}"')
    _add_images_args(s)
    s.add_argument("--out", type=Path, required=True)
    _config_option(s, PrelimConfig, "seed")
    _config_option(s, PrelimConfig, "steps", help="T0: how many of the smallest DDIM-grid timesteps")
    _config_option(s, PrelimConfig, "batch_size", help="UNet rows per forward pass (T0 rows make one image)")
    _config_option(s, PrelimConfig, "orphan_filter", "--no-orphan-filter")
    _config_option(s, PrelimConfig, "sigma_grid", choices=SIGMA_GRIDS,
                   help="SD 3.x / FLUX: the T0 smallest sigmas of the default sampler's 50-step grid, or of k/50 unshifted")
    _config_option(s, PrelimConfig, "joint_attention", choices=NORMALISATIONS,
                   help="SD 3.x / FLUX: image-to-text attention renormalised over the text tokens, or the joint softmax's columns")
    _config_option(s, PrelimConfig, "maps", choices=MAP_KINDS,
                   help="cross-attention (the paper's) or concept-attention (ConceptAttention; joint-attention families only: "
                        "several --concept words then compete per pixel and the first is the foreground; "
                        "docs/concept_attention.md)")
    _config_option(s, PrelimConfig, "gmm_components",
                   help="GMM components of the threshold (2: the paper; 3 for chest radiographs); foreground = highest mean")
    _add_gmm_arg(s, PrelimConfig)
    _config_option(s, PrelimConfig, "compile",
                   help="torch.compile the denoiser pass with the capture (same maps; compiles once, pays off on long runs)")
    _config_option(s, PrelimConfig, "compile_mode", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    _config_option(s, PrelimConfig, "channels_last", help="UNet weights and inputs in channels_last (same maps)")
    s.add_argument("--overwrite", action="store_true", help="redo images already done")


def _finetune_options(s) -> None:
    from conceptseg.finetune import FinetuneConfig as C
    from conceptseg.training import MIXED_PRECISION, NONFINITE_LOSS

    _config_option(s, C, "model", help="diffusers folder or hub id (default: the embedded toy-world model)")
    _config_option(s, C, "concept", nargs="+")
    _config_option(s, C, "prompt", help='concept prompt y_f; default "a photo of a {first concept word}"')
    _config_option(s, C, "images", type=str, help="image folder (subfolders too), image file, glob, or dataset spec "
                                                  "(cub:/data/CUB_200_2011) with --split")
    _config_option(s, C, "split", choices=["train", "test", "all"], help="with a dataset spec")
    _config_option(s, C, "prelim", help="output folder of `conceptseg prelim`")
    _config_option(s, C, "out")
    _config_option(s, C, "steps")
    _config_option(s, C, "batch_size", help="per process")
    _config_option(s, C, "lr")
    _config_option(s, C, "method", choices=["full", "lora"], help="full UNet (the paper) or LoRA adapters")
    _config_option(s, C, "lora_rank")
    _config_option(s, C, "mixed_precision", choices=MIXED_PRECISION)
    _config_option(s, C, "gradient_accumulation", help="micro-batches per optimiser step")
    _add_clip_arg(s, C)
    _config_option(s, C, "gradient_checkpointing")
    _config_option(s, C, "optimizer", choices=["adamw", "adamw-fused", "adamw-8bit"])
    _config_option(s, C, "latent_cache", metavar="VIEWS",
                   help="precompute this many augmented views per image, encode them once and train on those fixed "
                        "views (faster; other training data than a fresh crop and flip each step, the default 0)")
    _add_checkpoint_args(s, C)
    _config_option(s, C, "nonfinite_loss", choices=NONFINITE_LOSS,
                   help="a NaN/inf loss stops training with an error naming the step (stop) or skips that batch (skip)")
    _config_option(s, C, "report_to", help="accelerate tracker for the loss (tensorboard, wandb, ...); always: OUT/train_log.jsonl")
    _config_option(s, C, "seed")


def _refine_options(s) -> None:
    from conceptseg.refine import INPAINTERS, RefineConfig as C

    _add_model_args(s)
    _add_images_args(s)
    s.add_argument("--prelim", type=Path, required=True, help="output folder of `conceptseg prelim`")
    s.add_argument("--out", type=Path, required=True)
    _config_option(s, C, "prompt", help="background prompt y_b")
    _config_option(s, C, "inpainter", choices=INPAINTERS, help="crop: the paper's M_crop ablation")
    _config_option(s, C, "steps", "--inpaint-steps")
    _config_option(s, C, "sampler", choices=["ddim", "dpm++"])
    _config_option(s, C, "guidance")
    _config_option(s, C, "concept_prompt", help="with --guidance != 1: guide away from this prompt")
    _config_option(s, C, "samples", help="inpaintings per image, difference maps averaged")
    _config_option(s, C, "postprocess", help="binary closing + fill holes")
    _config_option(s, C, "difference_to", choices=["image", "reconstruction"],
                   help="compare the inpainted background with the image (the paper) or with its VAE reconstruction")
    _config_option(s, C, "overlay", help="paste the image back outside M_pre before comparing (a deviation; the paper "
                   "compares the decoding everywhere)")
    _config_option(s, C, "batch_size")
    _add_gmm_arg(s, C)
    _config_option(s, C, "seed")
    s.add_argument("--overwrite", action="store_true")


def _synth_options(s) -> None:
    from conceptseg.refine import RefineConfig
    from conceptseg.synth import SynthConfig as C

    _add_model_args(s)
    _config_option(s, C, "concept", nargs="+")
    _config_option(s, C, "prompt", help='default "a photo of a {first concept word}"')
    _config_option(s, C, "num")
    s.add_argument("--out", type=Path, required=True)
    _config_option(s, C, "steps", "--sample-steps")
    _config_option(s, C, "guidance")
    _config_option(s, C, "prelim_steps", help="T0 of stage 1 on the synthetic images")
    _config_option(s, RefineConfig, "steps", "--inpaint-steps")
    _config_option(s, RefineConfig, "postprocess", help="binary closing + fill holes on the masks")
    _config_option(s, C, "batch_size")
    _config_option(s, C, "seed")


def _train_seg_options(s) -> None:
    from conceptseg.segmenter.train import LR_SCHEDULES, TrainSegConfig as C
    from conceptseg.training import MIXED_PRECISION, NONFINITE_LOSS

    _config_option(s, C, "data", action="append",
                   help="dataset spec, repeatable: an imagefolder DIR, folder:IMAGES,masks=MASKS, cub:ROOT, ...")
    _config_option(s, C, "out")
    _config_option(s, C, "steps")
    _config_option(s, C, "batch_size")
    _config_option(s, C, "lr")
    _config_option(s, C, "lr_schedule", choices=sorted(LR_SCHEDULES), help="constant (the paper gives no schedule) or cosine decay to 0")
    _config_option(s, C, "width", help="first-level channels (64: the paper's 64..1024)")
    _config_option(s, C, "input_size")
    _config_option(s, C, "val_fraction")
    _config_option(s, C, "mixed_precision", choices=MIXED_PRECISION)
    _add_clip_arg(s, C)
    _add_checkpoint_args(s, C)
    _config_option(s, C, "num_workers",
                   help="DataLoader worker processes that read images and cut batches (same result for any count)")
    _config_option(s, C, "nonfinite_loss", choices=NONFINITE_LOSS)
    _config_option(s, C, "seed")


def _segment_options(s) -> None:
    _add_segmenter_args(s, "folder made by train-seg (OUT or OUT/model), a saved or hub segmenter, or an .onnx file from export-onnx")
    _add_images_args(s, "an image file, a folder, a quoted glob ('shots/*.jpg'), or a dataset spec (cub:ROOT) with --split")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--output", nargs="+", default=["mask"], choices=["mask", "rgba", "color", "background"],
                   help="what to write, one sub-folder each: mask (0/255 PNG, masks/), rgba (cut-out, cutouts/), "
                        "color (over --color, on_color/), background (over --background, on_background/)")
    s.add_argument("--cutout", action="store_true", help="same as adding rgba to --output")
    s.add_argument("--color", default="white", help="background colour for --output color (name, #rrggbb)")
    s.add_argument("--background", type=Path, help="background picture for --output background (scaled to cover, centred)")
    s.add_argument("--threshold", type=float, default=0.5, help="foreground where the probability exceeds this")
    s.add_argument("--rle", action="store_true", help="also COCO RLE: rle/<key>.json and OUT/masks_coco_rle.json (needs pycocotools)")
    s.add_argument("--provider", default="auto",
                   help="onnxruntime provider for an .onnx segmenter: auto (best available), cpu, cuda, tensorrt, coreml, ...")
    s.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes that read images ahead")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--device", default=None)
    s.add_argument("--overwrite", action="store_true")


def _export_onnx_options(s) -> None:
    s.add_argument("--segmenter", required=True, help="segmenter folder (train-seg's OUT or OUT/model, a run's segmenter/<row>, or the run)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def _remove_options(s) -> None:
    from conceptseg.edit import EditConfig

    _add_model_args(s)
    _add_edit_args(s)
    _config_option(s, EditConfig, "grow", help="grow the mask by this many pixels first (covers the object's fringe)")
    _config_option(s, EditConfig, "concept_prompt", help="with --guidance > 1: steer the inpainting away from this prompt")


def _composite_options(s) -> None:
    from conceptseg.edit import EditConfig

    _add_model_args(s)
    _add_edit_args(s)
    s.add_argument("--background", type=Path, help="background picture (scaled to cover, centred); default: generate one per image")
    _config_option(s, EditConfig, "feather", help="soften the alpha edge (Gaussian blur radius, pixels)")


def _serve_options(s) -> None:
    _add_segmenter_args(s, "segmenter folder, hub id or .onnx file (as for segment)")
    s.add_argument("--model", default=None, help="diffusers folder or hub id: also serve stage 1 (the attention map and M_pre of a word)")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    s.add_argument("--maps", default="cross-attention", choices=["cross-attention", "concept-attention"],
                   help="stage 1's maps with --model (concept-attention: joint-attention families; docs/concept_attention.md)")
    s.add_argument("--example", type=Path, help="an image the page offers as an example (/?example loads it at once)")
    s.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    s.add_argument("--port", type=int, default=7860, help="0: any free port")
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--provider", default="auto", help="onnxruntime provider for an .onnx segmenter")
    s.add_argument("--device", default=None)


def _share_options(s) -> None:
    from conceptseg.runs import METHOD_ROWS, REFERENCE_ROWS

    s.add_argument("--run", type=Path, required=True,
                   help="run folder of `conceptseg run` or `demo` (or its segmenter/<row> folder: that segmenter)")
    s.add_argument("--row", choices=[*METHOD_ROWS, *REFERENCE_ROWS],
                   help="which segmenter (default: the method's segmenter with the best IoU in the run's metrics.json)")
    s.add_argument("--out", type=Path, required=True, help="folder to write (config.json, model.safetensors, README.md)")
    s.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to the Hugging Face Hub (needs a login: hf auth login)")
    s.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")


def _evaluate_options(s) -> None:
    s.add_argument("--pred", type=Path, required=True, help="folder of <key>.png masks (or with a masks/ subfolder)")
    s.add_argument("--dataset", required=True, help="SPEC: cub:ROOT, dogs:ROOT, cars:ROOT, h36m:ROOT, folder:IMAGES,masks=MASKS, imagefolder:ROOT")
    s.add_argument("--split", default="test", choices=["train", "test", "all"])
    s.add_argument("--out", type=Path, help="JSON report (default: PRED/evaluation.json)")
    s.add_argument("--protocol", choices=["paper", "full"], default="paper",
                   help="paper: short side resized to --size, centre crop (METHOD.md §5); full: whole image at original size")
    s.add_argument("--size", type=int, default=128, help="the paper protocol's size (128)")


def _evaluate_findings_options(s) -> None:
    from conceptseg.medical_eval import PROMPTS, FindingEvalConfig as C

    _add_model_args(s, several=True)
    s.add_argument("--dataset", required=True, help="chest:ROOT (the chest world) or ms-cxr:ROOT[,images=MIMIC_CXR_JPG_ROOT]")
    s.add_argument("--split", default="test", choices=["train", "test", "all"], help="chest world split (MS-CXR: all of it)")
    _config_option(s, C, "prompt", choices=PROMPTS,
                   help='finding: "pleural effusion"; phrase: the case\'s own phrase; photo: "a photo of a pleural effusion"')
    _config_option(s, C, "per_finding", help="at most this many cases per finding (default: all)")
    _config_option(s, C, "steps", help="T0 of stage 1")
    _config_option(s, C, "batch_size")
    _config_option(s, C, "gmm_components", help="M_pre threshold (3: background, chest, lesion)")
    _config_option(s, C, "wrong_word", "--no-wrong-word", help="skip the wrong-finding-word baseline (half the time)")
    _config_option(s, C, "seed")
    s.add_argument("--out", type=Path, help="JSON report")


def _fid_options(s) -> None:
    s.add_argument("--real", required=True, help="image folder or dataset spec")
    s.add_argument("--fake", required=True, help="image folder (e.g. SYNTH/images)")
    s.add_argument("--inception-weights", type=Path, help="torch-fidelity's inception-v3-compat weights file")
    s.add_argument("--device", default=None)


def _eval_toy_model_options(s) -> None:
    from conceptseg.toy_eval import ToyEvalConfig as C

    _add_model_args(s, several=True)
    s.add_argument("--data", type=Path, required=True, help="toy-world dataset with a test split")
    _config_option(s, C, "per_class")
    _config_option(s, C, "binding_scenes")
    _config_option(s, C, "steps")
    _config_option(s, C, "seed")
    _config_option(s, C, "parts", nargs="+", metavar="PART",
                   help="measurements to make: localisation classify binding wrong_word random_init centre_prior per_level (default: all)")
    s.add_argument("--out", type=Path, help="JSON report")


def _train_t2i_options(s) -> None:
    from conceptseg.train_t2i import TrainT2IConfig as C
    from conceptseg.training import MIXED_PRECISION

    _config_option(s, C, "data", type=Path, help="imagefolder dataset (metadata.jsonl with captions)")
    _config_option(s, C, "out")
    mode = s.add_mutually_exclusive_group()
    _config_option(mode, C, "preset", help="architecture preset when training from scratch")
    _config_option(mode, C, "base_model", help="diffusers folder or hub id to fine-tune instead")
    _config_option(s, C, "steps")
    _config_option(s, C, "vae_steps")
    _config_option(s, C, "decoder_steps", help="then fine-tune the VAE decoder alone (encoder frozen)")
    _config_option(s, C, "batch_size")
    _config_option(s, C, "lr")
    _config_option(s, C, "warmup_steps", help="linear learning-rate warm-up, then constant")
    _config_option(s, C, "seed")
    _config_option(s, C, "checkpoint_every")
    _config_option(s, C, "mixed_precision", choices=MIXED_PRECISION)
    _config_option(s, C, "gradient_accumulation", help="micro-batches per optimiser step")
    _add_clip_arg(s, C)
    _config_option(s, C, "sample_prompts", "--sample-prompt", action="append", help="prompt for the sample grid (repeatable)")
    _config_option(s, C, "sample_guidance")
    _config_option(s, C, "train_text_encoder", help="train the text encoder too (default: yes from scratch, no when fine-tuning)")
    _config_option(s, C, "forget_words", "--forget-word", action="append",
                   help="fine-tuning: start this word's token embedding again from random (repeatable)")
    _config_option(s, C, "drop_negated", "--drop-negated", action="append", metavar="WORD",
                   help="leave the report sentences that negate WORD ('No pneumothorax.') out of the captions (repeatable)")
    _config_option(s, C, "context_layers",
                   help="fine-tuning: add this many transformer layers (starting as the identity) to a context-free text encoder")
    _config_option(s, C, "attention_layers",
                   help="fine-tuning: add this many transformer blocks (starting as the identity) to each of the UNet's cross-attention blocks")
    _config_option(s, C, "checkpoints_total_limit", type=_limit, help="keep the newest N checkpoints (0: keep all)")
    s.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")


# ---------------------------------------------------------------- the parser

class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser whose options are added when it is first used (parsing, help, usage):
    they are read from the stage configs, whose modules import torch, which `conceptseg --help` and
    the other subcommands need not wait for."""

    def __init__(self, *args, options: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_options = options

    def built(self) -> "_Subcommand":
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(_Subcommand, self.built()).parse_known_args(args, namespace)

    def format_usage(self) -> str:
        return super(_Subcommand, self.built()).format_usage()

    def format_help(self) -> str:
        return super(_Subcommand, self.built()).format_help()


# every subcommand: its name, its line in `conceptseg --help`, what adds its options, what runs it
SUBCOMMANDS: tuple[tuple[str, str, Callable, Callable], ...] = (
    ("demo", "run the pipeline on held-out toy-world images with the embedded model and score it", _demo_options, _cmd_demo),
    ("medical", "the medical experiment from a YAML config: fine-tune on image-report pairs, score per finding",
     _medical_options, _cmd_medical),
    ("run", "every stage in order into one run directory, from a YAML config", _run_options, _cmd_run),
    ("plan", "each stage's predicted peak device memory and disk for a run config, from the model's configs alone",
     _plan_options, _cmd_plan),
    ("toyworld", "generate a procedural known-truth world (images, exact masks, captions or reports)", _toyworld_options,
     _cmd_toyworld),
    ("prelim", "stage 1: preliminary masks from cross-attention", _prelim_options, _cmd_prelim),
    ("finetune", "stage 2: fine-tune the model to inpaint background (concept distillation)", _finetune_options, _cmd_finetune),
    ("refine", "stage 3: refined masks from |image - inpainted background|", _refine_options, _cmd_refine),
    ("synth", "stage 4: sample a synthetic image + mask dataset from the fine-tuned model", _synth_options, _cmd_synth),
    ("train-seg", "stage 5: train the U-Net segmenter on one or more mask datasets", _train_seg_options, _cmd_train_seg),
    ("segment", "apply a trained segmenter: masks at the original size, cut-outs, new backgrounds", _segment_options, _cmd_segment),
    ("export-onnx", "export a trained segmenter to ONNX, checked against torch", _export_onnx_options, _cmd_export_onnx),
    ("remove", "the concept removed: the fine-tuned model inpaints the masked object, original size", _remove_options, _cmd_remove),
    ("composite", "the cut-out over a new background: a given picture, or one the model generates", _composite_options,
     _cmd_composite),
    ("serve", "an HTTP server on localhost: POST an image, get a mask or cut-out; a page at /", _serve_options, _cmd_serve),
    ("share", "a run's segmenter as a Hugging Face folder (save_pretrained) with a model card; optionally pushed",
     _share_options, _cmd_share),
    ("evaluate", "stage 6: score predicted masks against a dataset's ground truth", _evaluate_options, _cmd_evaluate),
    ("evaluate-findings", "medical: AUC-ROC of stage-1 maps per finding against boxes (MS-CXR protocol)",
     _evaluate_findings_options, _cmd_evaluate_findings),
    ("fid", "FID of generated images against real ones (standard InceptionV3 features)", _fid_options, _cmd_fid),
    ("eval-toy-model", "score a text-to-image model's localisation on held-out toy images", _eval_toy_model_options,
     _cmd_eval_toy_model),
    ("train-t2i", "train a text-to-image latent diffusion model (from scratch or fine-tune)", _train_t2i_options, _cmd_train_t2i),
)

# `conceptseg --help` lists the subcommands in these groups, in this order; every subcommand is in one.
COMMAND_GROUPS = (
    ("the pipeline's stages", ("run", "plan", "prelim", "finetune", "refine", "synth", "train-seg")),
    ("using the result", ("segment", "serve", "share", "remove", "composite", "export-onnx")),
    ("experiments and evaluation", ("demo", "evaluate", "medical", "evaluate-findings", "fid")),
    ("toy worlds and training", ("toyworld", "train-t2i", "eval-toy-model")),
)

_DESCRIPTION = ("Foreground/background segmentation of a concept named in words, distilled from a text-to-image\n"
                "diffusion model without segmentation labels (Dombrowski et al., ICCV 2023).")


def _grouped_commands() -> str:
    """The subcommands under COMMAND_GROUPS' titles, as git and docker list theirs."""
    helps = {name: line for name, line, _, _ in SUBCOMMANDS}
    width = max(map(len, helps)) + 2
    lines = [_DESCRIPTION, ""]
    for title, names in COMMAND_GROUPS:
        lines.append(f"{title}:")
        lines.extend(f"  {name:<{width}}{helps[name]}" for name in names if name in helps)
        lines.append("")
    return "\n".join(lines + ["`conceptseg COMMAND --help` shows a command's options."])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conceptseg", usage="conceptseg [-h] [--debug] COMMAND [options]",
                                description=_grouped_commands(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="conceptseg",
                           parser_class=_Subcommand)
    for name, line, options, run in SUBCOMMANDS:
        sub.add_parser(name, help=line, options=options).set_defaults(func=run)
    return p


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """`build_parser()`'s subcommands by name, each with its options added."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: s.built() if isinstance(s, _Subcommand) else s for name, s in action.choices.items()}


def main(argv: list[str] | None = None) -> int:
    """Errors the project raises name the file and the problem in one line; anything else is a bug
    or an input nobody foresaw: one line naming it, and the traceback with --debug (or
    CONCEPTSEG_DEBUG=1)."""
    import os

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CONCEPTSEG_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"conceptseg {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as e:  # ours, and the libraries' that name their file
        if debug:
            raise
        print(f"conceptseg {args.command}: error: {e}", file=sys.stderr)
        if _out_of_memory(e):
            print(_MEMORY_HINT, file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"conceptseg {args.command}: unexpected {type(e).__name__}: {e}\n"
              "rerun with --debug (or CONCEPTSEG_DEBUG=1) for the traceback, and report it if the input looks fine",
              file=sys.stderr)
        return 1
    return 0


_MEMORY_HINT = ("out of memory: lower --batch-size, raise --gradient-accumulation to keep the effective batch, use "
                "--method lora, --optimizer adamw-8bit or --mixed-precision bf16 (and keep --gradient-checkpointing on); "
                "a rerun resumes from the last checkpoint")


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


if __name__ == "__main__":
    sys.exit(main())
