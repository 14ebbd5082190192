"""The README cannot drift from the code: every command line it shows parses with the real parser,
every repository path it names exists, and every path under `runs/demo/` is one a demo run writes
(checked on a tiny demo run). Also: `conceptseg --help` lists every subcommand in exactly one group."""

import re
import shlex
from pathlib import Path

import pytest

from conceptseg.cli import COMMAND_GROUPS, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# where the README's repository paths start; anything else in it (photos/, runs/bird) is the user's
REPO_PREFIXES = ("docs", "src", "configs", "benchmarks", "tests")
DEMO_OUT = "runs/demo"  # `conceptseg demo --out runs/demo`: the README's first command


def _subcommands(parser) -> dict:
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_subcommand_is_in_exactly_one_help_group(capsys):
    parser = build_parser()
    grouped = [name for _, names in COMMAND_GROUPS for name in names]
    assert sorted(grouped) == sorted(_subcommands(parser)), "COMMAND_GROUPS and the parser's subcommands differ"
    assert len(grouped) == len(set(grouped)), "a subcommand is in two groups"
    text = parser.format_help()
    positions = [text.index(f"{title}:\n") for title, _ in COMMAND_GROUPS]
    assert positions == sorted(positions)
    for (title, names), start, end in zip(COMMAND_GROUPS, positions, positions[1:] + [len(text)]):
        assert all(re.search(rf"^  {re.escape(n)}\s", text[start:end], re.M) for n in names), title


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[\w-]*\n(.*?)^```", text, re.M | re.S)


def _command_lines(text: str) -> list[str]:
    """`conceptseg ...` commands in the README's code blocks (chains split at &&) and in its tables' cells."""
    lines = [line for block in _code_blocks(text) for line in block.splitlines()]
    lines += [cell for line in text.splitlines() if line.startswith("|") for cell in re.findall(r"`([^`]+)`", line)]
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["conceptseg"]:
                commands.append(words[1:])
    return commands


def test_readme_command_lines_parse_with_the_real_parser():
    commands = _command_lines(README.read_text())
    assert len(commands) >= 8  # the demo, each family's run, the commands that use a run
    parser = build_parser()
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"README: `conceptseg {' '.join(words)}` does not parse")


def _named_paths(text: str) -> set[str]:
    """Markdown link targets in the repository, and words that start with a repository folder or runs/demo."""
    links = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")}
    starts = "|".join(re.escape(p) for p in (*REPO_PREFIXES, DEMO_OUT))
    words = set(re.findall(rf"(?<![\w./-])((?:{starts})(?:/[\w.\-]+)*/?)", text))
    return {p for p in links | words if p}


def test_readme_repository_paths_exist():
    paths = _named_paths(README.read_text())
    repo = sorted(p for p in paths if not p.startswith(DEMO_OUT))
    assert "docs/demo_grid_best.png" in repo and "CHANGELOG.md" in repo
    missing = [p for p in repo if not (ROOT / p).exists()]
    assert not missing, f"README names paths that are not in the repository: {missing}"


@pytest.fixture(scope="module")
def tiny_demo_run(tiny_model_dir, tmp_path_factory):
    """What `conceptseg demo` writes, on the tiny model with every stage cut to seconds."""
    from conceptseg.demo import demo_config
    from conceptseg.pipeline import Run

    out = tmp_path_factory.mktemp("demo") / "demo"
    cfg = demo_config(out, model=str(tiny_model_dir), device="cpu", num_images=10)
    cfg.prelim.steps = cfg.finetune.steps = cfg.refine.steps = 2
    cfg.synth.num, cfg.synth.steps = 3, 2
    cfg.segmenter.steps, cfg.segmenter.width, cfg.segmenter.input_size = 2, 4, 32
    Run(cfg, progress=False).execute()
    return out


def test_readme_demo_paths_are_what_a_demo_run_writes(tiny_demo_run):
    """Every runs/demo/... path the README names exists after a (tiny) demo run, and the commands
    that take a run find its segmenter and fine-tuned model in it."""
    from conceptseg.runs import pick_model, segmenter_of_run

    demo = sorted(p for p in _named_paths(README.read_text()) if p.startswith(DEMO_OUT))
    assert f"{DEMO_OUT}/grid_best.png" in demo
    missing = [p for p in demo if not (tiny_demo_run / p[len(DEMO_OUT):].lstrip("/")).exists()]
    assert not missing, f"README names demo outputs a demo run does not write: {missing}"
    picked = segmenter_of_run(tiny_demo_run)
    assert picked.row in ("unet_real_synth", "unet_real", "unet_prelim") and "the run's best: IoU" in picked.note
    assert Path(pick_model(tiny_demo_run).source) == tiny_demo_run / "finetune" / "model"
