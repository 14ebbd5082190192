"""`conceptseg` command line: one subcommand per stage, and the commands that use, score and
reproduce the result (grouped in `conceptseg --help` by COMMAND_GROUPS)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conceptseg import distributed


def _cmd_toyworld(args) -> None:
    if args.domain == "chest":
        from conceptseg.data.chest import FINDINGS, ChestWorldConfig, generate as generate_chest

        cfg = ChestWorldConfig(size=args.size, findings=tuple(args.classes or FINDINGS))
        out = generate_chest(args.out, args.num, seed=args.seed, config=cfg, workers=args.workers)
        print(f"wrote {args.num} chest radiographs with reports to {out}")
        return
    from conceptseg.data.toyworld import ToyWorldConfig, generate

    cfg = ToyWorldConfig(world=args.world, size=args.size)
    if args.classes:
        cfg.classes = tuple(args.classes)
    out = generate(args.out, args.num, seed=args.seed, config=cfg, workers=args.workers)
    print(f"wrote {args.num} rows to {out}")


def _cmd_train_t2i(args) -> None:
    import torch

    from conceptseg.train_t2i import TrainT2IConfig, train_t2i

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainT2IConfig(
        data=args.data, out=args.out, preset=args.preset, base_model=args.base_model, steps=args.steps,
        vae_steps=args.vae_steps, decoder_steps=args.decoder_steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, seed=args.seed,
        checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
        gradient_accumulation=args.gradient_accumulation, max_grad_norm=args.max_grad_norm, sample_prompts=args.sample_prompt or [],
        sample_guidance=args.sample_guidance, train_text_encoder=args.train_text_encoder,
        forget_words=args.forget_word or [], checkpoints_total_limit=args.checkpoints_total_limit or None,
    )
    final = train_t2i(cfg)
    print(f"model: {final}\nsamples: {Path(args.out) / 'samples.png'}")


def _add_model_args(s: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        s.add_argument("--model", nargs="+", default=[None], help="diffusers folders or hub ids (default: the embedded model)")
    else:
        s.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded toy-world model)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")


def _cmd_prelim(args) -> None:
    from conceptseg.models import load_model
    from conceptseg.prelim import PrelimConfig, run_prelim

    cfg = PrelimConfig(concept=args.concept, prompt=args.prompt, steps=args.steps, batch_size=args.batch_size,
                       seed=args.seed, orphan_filter=not args.no_orphan_filter, sigma_grid=args.sigma_grid,
                       joint_attention=args.joint_attention, maps=args.maps, gmm_components=args.gmm_components, gmm=args.gmm,
                       compile=args.compile, compile_mode=args.compile_mode, channels_last=args.channels_last)
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
    from conceptseg.toy_eval import PARTS, ToyEvalConfig, evaluate_toy_model

    cfg = ToyEvalConfig(per_class=args.per_class, binding_scenes=args.binding_scenes, parts=tuple(args.parts or PARTS),
                        steps=args.steps, seed=args.seed)
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
    from conceptseg.pipeline import Run, format_table, override_config

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
    from conceptseg.pipeline import Run, format_table, load_config

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

    cfg = FinetuneConfig(
        concept=args.concept, images=args.images, split=args.split, prelim=args.prelim, out=args.out, model=args.model, prompt=args.prompt,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, method=args.method, lora_rank=args.lora_rank,
        mixed_precision=args.mixed_precision, gradient_accumulation=args.gradient_accumulation, max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer, latent_cache=args.latent_cache,
        checkpoint_every=args.checkpoint_every, checkpoints_total_limit=args.checkpoints_total_limit or None,
        nonfinite_loss=args.nonfinite_loss, report_to=args.report_to, seed=args.seed,
    )
    print(f"fine-tuned model: {finetune(cfg)}")


def _cmd_refine(args) -> None:
    from conceptseg.models import load_model
    from conceptseg.refine import RefineConfig, run_refine

    cfg = RefineConfig(prompt=args.prompt, steps=args.inpaint_steps, guidance=args.guidance, concept_prompt=args.concept_prompt,
                       sampler=args.sampler, samples=args.samples, inpainter=args.inpainter, postprocess=args.postprocess,
                       difference_to=args.difference_to, batch_size=args.batch_size, seed=args.seed, gmm=args.gmm)
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

    cfg = SynthConfig(concept=args.concept, num=args.num, prompt=args.prompt, steps=args.sample_steps, guidance=args.guidance,
                      prelim_steps=args.prelim_steps, refine=RefineConfig(steps=args.inpaint_steps, postprocess=args.postprocess),
                      batch_size=args.batch_size, seed=args.seed)
    model = load_model(args.model, device=args.device or distributed.device(), dtype=args.dtype)
    run_synth(model, args.out, cfg, shard=distributed.shard())
    distributed.finish_per_image_stage(args.out)
    if distributed.is_main():
        write_metadata(args.out, cfg)
    print(f"synthetic dataset: {args.out}")


def _cmd_train_seg(args) -> None:
    from conceptseg.segmenter.train import TrainSegConfig, train_segmenter

    cfg = TrainSegConfig(data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         lr_schedule=args.lr_schedule, width=args.width, input_size=args.input_size, val_fraction=args.val_fraction,
                         mixed_precision=args.mixed_precision, max_grad_norm=args.max_grad_norm, checkpoint_every=args.checkpoint_every,
                         checkpoints_total_limit=args.checkpoints_total_limit or None, nonfinite_loss=args.nonfinite_loss, seed=args.seed,
                         num_workers=args.num_workers)
    print(f"segmenter: {train_segmenter(cfg)}")


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
    cfg = EditConfig(prompt=args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                     **({"grow": args.grow, "concept_prompt": args.concept_prompt} if args.command == "remove" else {"feather": args.feather}))
    return MaskSource(args.masks, segmenter), cfg


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


def _add_edit_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--images", required=True, help="an image file, a folder, a quoted glob, or a dataset spec with --split")
    s.add_argument("--split", default="all", choices=["train", "test", "all"], help="with a dataset spec")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--masks", type=Path, help="folder of <stem>.png masks (refine's OUT/masks, segment's OUT/masks)")
    where.add_argument("--segmenter", help="or predict the masks with this segmenter (folder, a run's segmenter/<row>, hub id or .onnx)")
    s.add_argument("--run", type=Path, help="a run folder: its best segmenter (unless --masks or --segmenter) and its "
                                            "fine-tuned model (unless --model)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--prompt", default="a photo of a background", help="what the model inpaints or generates")
    s.add_argument("--steps", type=int, default=50, help="sampling steps")
    s.add_argument("--guidance", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--overwrite", action="store_true")


def _add_segmenter_args(s: argparse.ArgumentParser, what: str) -> None:
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--segmenter", help=what + "; a run's segmenter/<row> folder or the run folder itself also work")
    which.add_argument("--run", type=Path, help="a run folder of `conceptseg run` or `demo`: the segmenter it scored best")


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
    from conceptseg.data.medical import read_finding_cases
    from conceptseg.io import write_json
    from conceptseg.medical_eval import FindingEvalConfig, evaluate_findings, format_table
    from conceptseg.models import load_model

    cfg = FindingEvalConfig(prompt=args.prompt, steps=args.steps, batch_size=args.batch_size, gmm_components=args.gmm_components,
                            per_finding=args.per_finding, wrong_word=not args.no_wrong_word, seed=args.seed)
    cases = read_finding_cases(args.dataset, args.split)
    models = {str(m or "embedded toy model"): load_model(m, device=args.device, dtype=args.dtype) for m in args.model}
    report = evaluate_findings(models, cases, cfg)
    report["dataset"], report["split"] = args.dataset, args.split
    print(f"{args.dataset} ({args.split}): pixel-wise AUC-ROC of the raw stage-1 map against the union of the finding's boxes, "
          f"mean over its cases; prompt: {cfg.prompt}; M_pre with a {cfg.gmm_components}-component GMM\n{format_table(report)}")
    if args.out:
        write_json(args.out, report)
        print(f"report: {args.out}")


def _cmd_fid(args) -> None:
    from conceptseg.fid import fid

    print(f"FID {fid(args.real, args.fake, args.inception_weights, device=args.device or 'cpu'):.2f}")


def _limit(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _norm(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_clip_arg(s, default: float | None) -> None:
    s.add_argument("--max-grad-norm", type=_norm, default=default,
                   help=f"clip gradients to this norm ('none': no clipping; default {default})")


def _add_gmm_arg(s) -> None:
    s.add_argument("--gmm", default="sklearn", choices=["sklearn", "torch"],
                   help="GMM threshold fit: sklearn, or torch (the same fit, its EM on the model's device; "
                        "thresholds equal to rounding)")


# `conceptseg --help` lists the subcommands in these groups, in this order; every subcommand is in one.
COMMAND_GROUPS = (
    ("the pipeline's stages", ("run", "plan", "prelim", "finetune", "refine", "synth", "train-seg")),
    ("using the result", ("segment", "serve", "share", "remove", "composite", "export-onnx")),
    ("experiments and evaluation", ("demo", "evaluate", "medical", "evaluate-findings", "fid")),
    ("toy worlds and training", ("toyworld", "train-t2i", "eval-toy-model")),
)

_DESCRIPTION = ("Foreground/background segmentation of a concept named in words, distilled from a text-to-image\n"
                "diffusion model without segmentation labels (Dombrowski et al., ICCV 2023).")


def _grouped_commands(sub) -> str:
    """The subcommands under COMMAND_GROUPS' titles, as git and docker list theirs."""
    helps = {a.dest: a.help or "" for a in sub._choices_actions}  # argparse keeps each add_parser(help=...) here
    width = max(map(len, helps)) + 2
    lines = [_DESCRIPTION, ""]
    for title, names in COMMAND_GROUPS:
        lines.append(f"{title}:")
        lines.extend(f"  {name:<{width}}{helps[name]}" for name in names if name in helps)
        lines.append("")
    return "\n".join(lines + ["`conceptseg COMMAND --help` shows a command's options."])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conceptseg", usage="conceptseg [-h] [--debug] COMMAND [options]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="conceptseg")

    s = sub.add_parser("demo", help="run the pipeline on held-out toy-world images with the embedded model and score it")
    s.add_argument("--out", type=Path, default=Path("runs/demo"))
    s.add_argument("--concept", default="fish", help="toy-world class")
    s.add_argument("--full", action="store_true", help="the paper's settings instead of the reduced ones (hours on a CPU)")
    s.add_argument("--model", default=None, help="default: the embedded toy-world model (embedded:toy; also embedded:toy-v1, embedded:toy-v2)")
    s.add_argument("--world", choices=["v1", "v2"], default=None, help="toy world to draw (default: the one the embedded model knows; else v1)")
    s.add_argument("--device", default=None)
    s.add_argument("--num-images", type=int, default=None, help="toy-world images, 80%% train / 20%% test (default: 400, --full 2000)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. synth.num=256 (repeatable)")
    s.add_argument("--medical", action="store_true",
                   help="instead: per-finding AUC on held-out chest-world radiographs, embedded chest model against the toy model")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("medical", help="the medical experiment from a YAML config: fine-tune on image-report pairs, score per finding")
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. finetune.steps=200 (repeatable)")
    s.set_defaults(func=_cmd_medical)

    s = sub.add_parser("run", help="every stage in order into one run directory, from a YAML config")
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. finetune.steps=200 (repeatable)")
    s.add_argument("--clean", action="store_true",
                   help="once the run has finished, remove the <stage>.old folders (the previous outputs of redone stages)")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("plan", help="each stage's predicted peak device memory and disk for a run config, from the model's configs alone")
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, as `run` takes it (repeatable)")
    s.add_argument("--json", action="store_true", help='print {"device_memory_gb": {stage: GB}, "disk_gb": {stage: GB}, ...}')
    s.add_argument("--device-memory-gb", type=float, default=None,
                   help="device memory to fit, GiB (default: the visible CUDA device's, else none: no knobs)")
    s.add_argument("--images", type=int, default=None, help="images to assume where the config's datasets cannot be listed")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("toyworld", help="generate a procedural known-truth world (images, exact masks, captions or reports)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--num", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--domain", choices=["toy", "chest"], default="toy",
                   help="toy: objects on photo backgrounds; chest: radiographs with findings and reports")
    s.add_argument("--world", default="v1", choices=["v1", "v2"],
                   help="toy domain: v1 objects on photo textures; v2 structured scenes, large occluded objects, web-like captions")
    s.add_argument("--classes", nargs="+", help="subset of the toy classes, or of the chest findings (default: all)")
    s.add_argument("--workers", type=int, default=1, help="render rows in this many processes (same output)")
    s.set_defaults(func=_cmd_toyworld)

    s = sub.add_parser("prelim", help="stage 1: preliminary masks from cross-attention")
    _add_model_args(s)
    s.add_argument("--concept", nargs="+", required=True, help="concept word(s); several words' maps are summed")
    s.add_argument("--prompt", help='default: "a photo of a {first concept word}"')
    s.add_argument("--images", required=True, help="image folder (subfolders too), image file, glob, or dataset spec (cub:/data/CUB_200_2011) with --split")
    s.add_argument("--split", default="all", choices=["train", "test", "all"], help="with a dataset spec")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=40, help="T0: how many of the smallest DDIM-grid timesteps")
    s.add_argument("--batch-size", type=int, default=40, help="UNet rows per forward pass (T0 rows make one image)")
    s.add_argument("--no-orphan-filter", action="store_true")
    s.add_argument("--sigma-grid", default="sampler", choices=["sampler", "uniform"],
                   help="SD 3.x / FLUX: the T0 smallest sigmas of the default sampler's 50-step grid, or of k/50 unshifted")
    s.add_argument("--joint-attention", default="text", choices=["text", "joint"],
                   help="SD 3.x / FLUX: image-to-text attention renormalised over the text tokens, or the joint softmax's columns")
    s.add_argument("--maps", default="cross-attention", choices=["cross-attention", "concept-attention"],
                   help="cross-attention (the paper's) or concept-attention (ConceptAttention; joint-attention families only: "
                        "several --concept words then compete per pixel and the first is the foreground; "
                        "docs/concept_attention.md)")
    s.add_argument("--gmm-components", type=int, default=2,
                   help="GMM components of the threshold (2: the paper; 3 for chest radiographs); foreground = highest mean")
    _add_gmm_arg(s)
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser pass with the capture (same maps; compiles once, pays off on long runs)")
    s.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    s.add_argument("--channels-last", action="store_true", help="UNet weights and inputs in channels_last (same maps)")
    s.add_argument("--overwrite", action="store_true", help="redo images already done")
    s.set_defaults(func=_cmd_prelim)

    s = sub.add_parser("finetune", help="stage 2: fine-tune the model to inpaint background (concept distillation)")
    s.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded toy-world model)")
    s.add_argument("--concept", nargs="+", required=True)
    s.add_argument("--prompt", help='concept prompt y_f; default "a photo of a {first concept word}"')
    s.add_argument("--images", required=True, help="image folder (subfolders too), image file, glob, or dataset spec (cub:/data/CUB_200_2011) with --split")
    s.add_argument("--split", default="all", choices=["train", "test", "all"], help="with a dataset spec")
    s.add_argument("--prelim", type=Path, required=True, help="output folder of `conceptseg prelim`")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--batch-size", type=int, default=4, help="per process")
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--method", choices=["full", "lora"], default="full", help="full UNet (the paper) or LoRA adapters")
    s.add_argument("--lora-rank", type=int, default=8)
    s.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    s.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per optimiser step")
    _add_clip_arg(s, None)
    s.add_argument("--gradient-checkpointing", action="store_true")
    s.add_argument("--optimizer", choices=["adamw", "adamw-fused", "adamw-8bit"], default="adamw")
    s.add_argument("--latent-cache", type=int, default=0, metavar="VIEWS",
                   help="precompute this many augmented views per image, encode them once and train on those fixed "
                        "views (faster; other training data than a fresh crop and flip each step, the default 0)")
    s.add_argument("--checkpoint-every", type=int, default=250)
    s.add_argument("--checkpoints-total-limit", type=_limit, default=2, help="keep the newest N checkpoints ('none': all)")
    s.add_argument("--nonfinite-loss", choices=["stop", "skip"], default="stop",
                   help="a NaN/inf loss stops training with an error naming the step (stop) or skips that batch (skip)")
    s.add_argument("--report-to", help="accelerate tracker for the loss (tensorboard, wandb, ...); always: OUT/train_log.jsonl")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("refine", help="stage 3: refined masks from |image - inpainted background|")
    _add_model_args(s)
    s.add_argument("--images", required=True, help="image folder (subfolders too), image file, glob, or dataset spec (cub:/data/CUB_200_2011) with --split")
    s.add_argument("--split", default="all", choices=["train", "test", "all"], help="with a dataset spec")
    s.add_argument("--prelim", type=Path, required=True, help="output folder of `conceptseg prelim`")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--prompt", default="a photo of a background", help="background prompt y_b")
    s.add_argument("--inpainter", choices=["model", "crop"], default="model", help="crop: the paper's M_crop ablation")
    s.add_argument("--inpaint-steps", type=int, default=50)
    s.add_argument("--sampler", choices=["ddim", "dpm++"], default="ddim")
    s.add_argument("--guidance", type=float, default=1.0)
    s.add_argument("--concept-prompt", help="with --guidance != 1: guide away from this prompt")
    s.add_argument("--samples", type=int, default=1, help="inpaintings per image, difference maps averaged")
    s.add_argument("--postprocess", action="store_true", help="binary closing + fill holes")
    s.add_argument("--difference-to", choices=["image", "reconstruction"], default="image",
                   help="compare the inpainted background with the image (the paper) or with its VAE reconstruction")
    s.add_argument("--batch-size", type=int, default=4)
    _add_gmm_arg(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_refine)

    s = sub.add_parser("synth", help="stage 4: sample a synthetic image + mask dataset from the fine-tuned model")
    _add_model_args(s)
    s.add_argument("--concept", nargs="+", required=True)
    s.add_argument("--prompt", help='default "a photo of a {first concept word}"')
    s.add_argument("--num", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--sample-steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=1.0)
    s.add_argument("--prelim-steps", type=int, default=40, help="T0 of stage 1 on the synthetic images")
    s.add_argument("--inpaint-steps", type=int, default=50)
    s.add_argument("--postprocess", action="store_true", help="binary closing + fill holes on the masks")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("train-seg", help="stage 5: train the U-Net segmenter on one or more mask datasets")
    s.add_argument("--data", action="append", required=True,
                   help="dataset spec, repeatable: an imagefolder DIR, folder:IMAGES,masks=MASKS, cub:ROOT, ...")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=int, default=12000)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant (the paper gives no schedule) or cosine decay to 0")
    s.add_argument("--width", type=int, default=64, help="first-level channels (64: the paper's 64..1024)")
    s.add_argument("--input-size", type=int, default=128)
    s.add_argument("--val-fraction", type=float, default=0.05)
    s.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    _add_clip_arg(s, None)
    s.add_argument("--checkpoint-every", type=int, default=1000)
    s.add_argument("--checkpoints-total-limit", type=_limit, default=2, help="keep the newest N checkpoints ('none': all)")
    s.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes that read images and cut batches (same result for any count)")
    s.add_argument("--nonfinite-loss", choices=["stop", "skip"], default="stop")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_train_seg)

    s = sub.add_parser("segment", help="apply a trained segmenter: masks at the original size, cut-outs, new backgrounds")
    _add_segmenter_args(s, "folder made by train-seg (OUT or OUT/model), a saved or hub segmenter, or an .onnx file from export-onnx")
    s.add_argument("--images", required=True,
                   help="an image file, a folder, a quoted glob ('shots/*.jpg'), or a dataset spec (cub:ROOT) with --split")
    s.add_argument("--split", default="all", choices=["train", "test", "all"], help="with a dataset spec")
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
    s.set_defaults(func=_cmd_segment)

    s = sub.add_parser("export-onnx", help="export a trained segmenter to ONNX, checked against torch")
    s.add_argument("--segmenter", required=True, help="segmenter folder (train-seg's OUT or OUT/model, a run's segmenter/<row>, or the run)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    s.set_defaults(func=_cmd_export_onnx)

    s = sub.add_parser("remove", help="the concept removed: the fine-tuned model inpaints the masked object, original size")
    _add_model_args(s)
    _add_edit_args(s)
    s.add_argument("--grow", type=int, default=3, help="grow the mask by this many pixels first (covers the object's fringe)")
    s.add_argument("--concept-prompt", help="with --guidance > 1: steer the inpainting away from this prompt")
    s.set_defaults(func=_cmd_remove)

    s = sub.add_parser("composite", help="the cut-out over a new background: a given picture, or one the model generates")
    _add_model_args(s)
    _add_edit_args(s)
    s.add_argument("--background", type=Path, help="background picture (scaled to cover, centred); default: generate one per image")
    s.add_argument("--feather", type=float, default=0.0, help="soften the alpha edge (Gaussian blur radius, pixels)")
    s.set_defaults(func=_cmd_composite)

    s = sub.add_parser("serve", help="an HTTP server on localhost: POST an image, get a mask or cut-out; a page at /")
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
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("share", help="a run's segmenter as a Hugging Face folder (save_pretrained) with a model card; optionally pushed")
    s.add_argument("--run", type=Path, required=True,
                   help="run folder of `conceptseg run` or `demo` (or its segmenter/<row> folder: that segmenter)")
    s.add_argument("--row", choices=["unet_real", "unet_real_synth", "unet_prelim", "supervised"],
                   help="which segmenter (default: the method's segmenter with the best IoU in the run's metrics.json)")
    s.add_argument("--out", type=Path, required=True, help="folder to write (config.json, model.safetensors, README.md)")
    s.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to the Hugging Face Hub (needs a login: hf auth login)")
    s.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    s.set_defaults(func=_cmd_share)

    s = sub.add_parser("evaluate", help="stage 6: score predicted masks against a dataset's ground truth")
    s.add_argument("--pred", type=Path, required=True, help="folder of <key>.png masks (or with a masks/ subfolder)")
    s.add_argument("--dataset", required=True, help="SPEC: cub:ROOT, dogs:ROOT, cars:ROOT, h36m:ROOT, folder:IMAGES,masks=MASKS, imagefolder:ROOT")
    s.add_argument("--split", default="test", choices=["train", "test", "all"])
    s.add_argument("--out", type=Path, help="JSON report (default: PRED/evaluation.json)")
    s.add_argument("--protocol", choices=["paper", "full"], default="paper",
                   help="paper: short side resized to --size, centre crop (METHOD.md §5); full: whole image at original size")
    s.add_argument("--size", type=int, default=128, help="the paper protocol's size (128)")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("evaluate-findings", help="medical: AUC-ROC of stage-1 maps per finding against boxes (MS-CXR protocol)")
    _add_model_args(s, several=True)
    s.add_argument("--dataset", required=True, help="chest:ROOT (the chest world) or ms-cxr:ROOT[,images=MIMIC_CXR_JPG_ROOT]")
    s.add_argument("--split", default="test", choices=["train", "test", "all"], help="chest world split (MS-CXR: all of it)")
    s.add_argument("--prompt", default="finding", choices=["finding", "phrase", "photo"],
                   help='finding: "pleural effusion"; phrase: the case\'s own phrase; photo: "a photo of a pleural effusion"')
    s.add_argument("--per-finding", type=int, help="at most this many cases per finding (default: all)")
    s.add_argument("--steps", type=int, default=40, help="T0 of stage 1")
    s.add_argument("--batch-size", type=int, default=40)
    s.add_argument("--gmm-components", type=int, default=3, help="M_pre threshold (3: background, chest, lesion)")
    s.add_argument("--no-wrong-word", action="store_true", help="skip the wrong-finding-word baseline (half the time)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, help="JSON report")
    s.set_defaults(func=_cmd_evaluate_findings)

    s = sub.add_parser("fid", help="FID of generated images against real ones (standard InceptionV3 features)")
    s.add_argument("--real", required=True, help="image folder or dataset spec")
    s.add_argument("--fake", required=True, help="image folder (e.g. SYNTH/images)")
    s.add_argument("--inception-weights", type=Path, help="torch-fidelity's inception-v3-compat weights file")
    s.add_argument("--device", default=None)
    s.set_defaults(func=_cmd_fid)

    s = sub.add_parser("eval-toy-model", help="score a text-to-image model's localisation on held-out toy images")
    _add_model_args(s, several=True)
    s.add_argument("--data", type=Path, required=True, help="toy-world dataset with a test split")
    s.add_argument("--per-class", type=int, default=200)
    s.add_argument("--binding-scenes", type=int, default=100)
    s.add_argument("--steps", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--parts", nargs="+", default=None, metavar="PART",
                   help="measurements to make: localisation classify binding wrong_word random_init centre_prior per_level (default: all)")
    s.add_argument("--out", type=Path, help="JSON report")
    s.set_defaults(func=_cmd_eval_toy_model)

    s = sub.add_parser("train-t2i", help="train a text-to-image latent diffusion model (from scratch or fine-tune)")
    s.add_argument("--data", type=Path, required=True, help="imagefolder dataset (metadata.jsonl with captions)")
    s.add_argument("--out", type=Path, required=True)
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--preset", default="toy", help="architecture preset when training from scratch")
    mode.add_argument("--base-model", help="diffusers folder or hub id to fine-tune instead")
    s.add_argument("--steps", type=int, default=3000)
    s.add_argument("--vae-steps", type=int, default=800)
    s.add_argument("--decoder-steps", type=int, default=0, help="then fine-tune the VAE decoder alone (encoder frozen)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float)
    s.add_argument("--warmup-steps", type=int, default=300, help="linear learning-rate warm-up, then constant")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-every", type=int, default=250)
    s.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    s.add_argument("--gradient-accumulation", type=int, default=1, help="micro-batches per optimiser step")
    _add_clip_arg(s, 1.0)
    s.add_argument("--sample-prompt", action="append", help="prompt for the sample grid (repeatable)")
    s.add_argument("--sample-guidance", type=float, default=1.0)
    s.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train the text encoder too (default: yes from scratch, no when fine-tuning)")
    s.add_argument("--forget-word", action="append",
                   help="fine-tuning: start this word's token embedding again from random (repeatable)")
    s.add_argument("--checkpoints-total-limit", type=int, default=2, help="keep the newest N checkpoints (0: keep all)")
    s.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    s.set_defaults(func=_cmd_train_t2i)
    p.description = _grouped_commands(sub)
    return p


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
                "--gradient-checkpointing, --method lora, --optimizer adamw-8bit or --mixed-precision bf16; a rerun "
                "resumes from the last checkpoint")


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


if __name__ == "__main__":
    sys.exit(main())
