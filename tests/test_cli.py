"""The command line's options: each one that sets a stage config's field is built from that field
(its default is the config's, never a second copy), the option names are those the README, docs and
scripts use, and `conceptseg --help` builds no stage's options (they import torch)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from conceptseg.cli import _config, _config_option, build_parser, subcommand_parsers
from conceptseg.data.chest import ChestWorldConfig
from conceptseg.data.toyworld import ToyWorldConfig
from conceptseg.edit import EditConfig
from conceptseg.finetune import FinetuneConfig
from conceptseg.medical_eval import FindingEvalConfig
from conceptseg.prelim import PrelimConfig
from conceptseg.refine import RefineConfig
from conceptseg.segmenter.train import TrainSegConfig
from conceptseg.synth import SynthConfig
from conceptseg.toy_eval import PARTS, ToyEvalConfig
from conceptseg.train_t2i import TrainT2IConfig

# the subcommands whose options set config fields, and those configs
CONFIGS = {
    "toyworld": (ToyWorldConfig,), "prelim": (PrelimConfig,), "finetune": (FinetuneConfig,), "refine": (RefineConfig,),
    "synth": (SynthConfig, RefineConfig), "train-seg": (TrainSegConfig,), "remove": (EditConfig,), "composite": (EditConfig,),
    "evaluate-findings": (FindingEvalConfig,), "eval-toy-model": (ToyEvalConfig,), "train-t2i": (TrainT2IConfig,),
}
# options named like a config field that do not set it, and why
NOT_FIELDS = {("toyworld", "classes"): "toy classes or chest findings; unset: all of the domain's"}

# every subcommand's options as the parser had them before its options were built from the configs
OPTIONS = {
    'composite': ('--help', '--model', '--device', '--dtype', '--images', '--split', '--masks', '--segmenter',
        '--run', '--out', '--prompt', '--steps', '--guidance', '--seed', '--batch-size', '--overwrite',
        '--background', '--feather'),
    'demo': ('--help', '--out', '--concept', '--full', '--model', '--world', '--device', '--num-images', '--set',
        '--medical'),
    'eval-toy-model': ('--help', '--model', '--device', '--dtype', '--data', '--per-class', '--binding-scenes',
        '--steps', '--seed', '--parts', '--out'),
    'evaluate': ('--help', '--pred', '--dataset', '--split', '--out', '--protocol', '--size'),
    'evaluate-findings': ('--help', '--model', '--device', '--dtype', '--dataset', '--split', '--prompt',
        '--per-finding', '--steps', '--batch-size', '--gmm-components', '--no-wrong-word', '--seed', '--out'),
    'export-onnx': ('--help', '--segmenter', '--out', '--no-check'),
    'fid': ('--help', '--real', '--fake', '--inception-weights', '--device'),
    'finetune': ('--help', '--model', '--concept', '--prompt', '--images', '--split', '--prelim', '--out', '--steps',
        '--batch-size', '--lr', '--method', '--lora-rank', '--mixed-precision', '--gradient-accumulation',
        '--max-grad-norm', '--gradient-checkpointing', '--no-gradient-checkpointing', '--optimizer', '--latent-cache', '--checkpoint-every',
        '--checkpoints-total-limit', '--nonfinite-loss', '--report-to', '--seed'),
    'medical': ('config', '--help', '--set'),
    'plan': ('config', '--help', '--set', '--json', '--device-memory-gb', '--images'),
    'prelim': ('--help', '--model', '--device', '--dtype', '--concept', '--prompt', '--images', '--split', '--out',
        '--seed', '--steps', '--batch-size', '--no-orphan-filter', '--sigma-grid', '--joint-attention', '--maps',
        '--gmm-components', '--gmm', '--compile', '--compile-mode', '--channels-last', '--overwrite'),
    'refine': ('--help', '--model', '--device', '--dtype', '--images', '--split', '--prelim', '--out', '--prompt',
        '--inpainter', '--inpaint-steps', '--sampler', '--guidance', '--concept-prompt', '--samples',
        '--postprocess', '--difference-to', '--overlay', '--batch-size', '--gmm', '--seed', '--overwrite'),
    'remove': ('--help', '--model', '--device', '--dtype', '--images', '--split', '--masks', '--segmenter', '--run',
        '--out', '--prompt', '--steps', '--guidance', '--seed', '--batch-size', '--overwrite', '--grow',
        '--concept-prompt'),
    'run': ('config', '--help', '--set', '--clean'),
    'segment': ('--help', '--segmenter', '--run', '--images', '--split', '--out', '--output', '--cutout', '--color',
        '--background', '--threshold', '--rle', '--provider', '--num-workers', '--batch-size', '--device',
        '--overwrite'),
    'serve': ('--help', '--segmenter', '--run', '--model', '--dtype', '--example', '--host', '--port', '--threshold',
        '--provider', '--device', '--maps'),
    'share': ('--help', '--run', '--row', '--out', '--push-to-hub', '--private'),
    'synth': ('--help', '--model', '--device', '--dtype', '--concept', '--prompt', '--num', '--out',
        '--sample-steps', '--guidance', '--prelim-steps', '--inpaint-steps', '--postprocess', '--batch-size',
        '--seed'),
    'toyworld': ('--help', '--out', '--num', '--seed', '--size', '--domain', '--world', '--classes', '--workers'),
    'train-seg': ('--help', '--data', '--out', '--steps', '--batch-size', '--lr', '--lr-schedule', '--width',
        '--input-size', '--val-fraction', '--mixed-precision', '--max-grad-norm', '--checkpoint-every',
        '--checkpoints-total-limit', '--num-workers', '--nonfinite-loss', '--seed'),
    'train-t2i': ('--help', '--data', '--out', '--preset', '--base-model', '--steps', '--vae-steps',
        '--decoder-steps', '--batch-size', '--lr', '--warmup-steps', '--seed', '--checkpoint-every',
        '--mixed-precision', '--gradient-accumulation', '--max-grad-norm', '--sample-prompt', '--sample-guidance',
        '--train-text-encoder', '--no-train-text-encoder', '--forget-word', '--drop-negated', '--context-layers',
        '--attention-layers', '--checkpoints-total-limit', '--threads'),
}


def _field_default(config: type, name: str):
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _problems(command: str, parser: argparse.ArgumentParser, configs: tuple[type, ...]) -> list[str]:
    """Where `parser`'s options and `configs` disagree: a default written beside the option, an
    option named like a field but not built from it, a config with no option built from it."""
    built = parser.get_default("config_options") or {}
    problems = [f"{command}: no option built from {c.__name__}" for c in configs if c not in built]
    problems += [f"{command}: options built from {c.__name__}, not one of its configs" for c in built if c not in configs]
    actions = {a.dest: a for a in parser._actions}
    for config, fields in built.items():
        for dest, name in fields.items():
            default, action = _field_default(config, name), actions[dest]
            if default is dataclasses.MISSING:
                if not action.required:
                    problems.append(f"{command} {action.option_strings}: {config.__name__}.{name} has no default, the option is optional")
            elif action.default != default or type(action.default) is not type(default):
                problems.append(f"{command} {action.option_strings}: default {action.default!r}, {config.__name__}.{name} {default!r}")
    fields = {f.name for c in configs for f in dataclasses.fields(c)}
    mirrored = {dest for f in built.values() for dest in f}
    problems += [f"{command} {a.option_strings}: sets field {a.dest} with a default of its own ({a.default!r}); build it "
                 "with _config_option" for a in parser._actions
                 if a.dest in fields and a.dest not in mirrored and (command, a.dest) not in NOT_FIELDS]
    return problems


def test_every_config_option_takes_its_default_from_the_config():
    parsers = subcommand_parsers(build_parser())
    problems = [p for command, parser in parsers.items() for p in _problems(command, parser, CONFIGS.get(command, ()))]
    assert not problems, "\n".join(problems)
    # the toyworld --size serves both domains
    assert parsers["toyworld"].get_default("size") == ChestWorldConfig().size


def test_a_default_written_beside_an_option_is_found():
    s = argparse.ArgumentParser()
    _config_option(s, PrelimConfig, "concept", nargs="+")
    s.add_argument("--steps", type=int, default=41)
    assert any("sets field steps with a default of its own (41)" in p for p in _problems("prelim", s, (PrelimConfig,)))
    s = argparse.ArgumentParser()
    _config_option(s, PrelimConfig, "steps").default = 41
    assert any("default 41, PrelimConfig.steps 40" in p for p in _problems("prelim", s, (PrelimConfig,)))


def test_option_names_are_unchanged():
    parsers = subcommand_parsers(build_parser())
    assert sorted(parsers) == sorted(OPTIONS)
    for command, parser in parsers.items():
        names = [a.dest for a in parser._actions if not a.option_strings]
        names += [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        assert sorted(names) == sorted(OPTIONS[command]), command


def _parsed(*words: str):
    return build_parser().parse_args(list(words))


def test_options_read_as_before():
    args = _parsed("prelim", "--concept", "bird", "--images", "x", "--out", "o")
    assert _config(args, PrelimConfig) == PrelimConfig(["bird"])
    args = _parsed("prelim", "--concept", "bird", "wing", "--images", "x", "--out", "o", "--no-orphan-filter", "--steps", "7",
                   "--compile", "--compile-mode", "reduce-overhead")
    assert _config(args, PrelimConfig) == PrelimConfig(["bird", "wing"], steps=7, orphan_filter=False, compile=True,
                                                       compile_mode="reduce-overhead")
    args = _parsed("finetune", "--concept", "bird", "--images", "x", "--prelim", "p", "--out", "o", "--max-grad-norm", "none",
                   "--checkpoints-total-limit", "none")
    cfg = _config(args, FinetuneConfig)
    assert (cfg.max_grad_norm, cfg.checkpoints_total_limit, cfg.images, str(cfg.prelim)) == (None, None, "x", "p")
    args = _parsed("synth", "--concept", "bird", "--num", "3", "--out", "o", "--sample-steps", "9", "--inpaint-steps", "7", "--postprocess")
    cfg = _config(args, SynthConfig, refine=_config(args, RefineConfig))
    assert (cfg.steps, cfg.refine.steps, cfg.refine.postprocess, cfg.num) == (9, 7, True, 3)
    args = _parsed("train-t2i", "--data", "d", "--out", "o", "--checkpoints-total-limit", "0", "--max-grad-norm", "0.5",
                   "--sample-prompt", "a fish", "--sample-prompt", "a car", "--no-train-text-encoder")
    cfg = _config(args, TrainT2IConfig)
    assert (cfg.checkpoints_total_limit, cfg.max_grad_norm, cfg.sample_prompts, cfg.forget_words, cfg.train_text_encoder,
            cfg.preset) == (None, 0.5, ["a fish", "a car"], [], False, "toy")
    assert _config(_parsed("train-t2i", "--data", "d", "--out", "o"), TrainT2IConfig).sample_prompts == []  # not shared
    args = _parsed("evaluate-findings", "--dataset", "chest:x", "--no-wrong-word", "--per-finding", "5")
    assert _config(args, FindingEvalConfig) == FindingEvalConfig(wrong_word=False, per_finding=5)
    args = _parsed("eval-toy-model", "--data", "d")
    assert _config(args, ToyEvalConfig, parts=tuple(args.parts)) == ToyEvalConfig(parts=PARTS)
    args = _parsed("remove", "--images", "x", "--masks", "m", "--out", "o", "--grow", "5")
    assert _config(args, EditConfig) == EditConfig(grow=5)
    with pytest.raises(SystemExit):
        _parsed("train-t2i", "--data", "d", "--out", "o", "--preset", "tiny", "--base-model", "m")  # one or the other


def test_help_builds_no_stage_options():
    code = ("import sys; from conceptseg.cli import build_parser; p = build_parser(); p.format_help(); "
            "p.parse_args(['toyworld', '--out', 'x', '--num', '1']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
