"""What a stage's manifest and fingerprint record (settings.py)."""

from dataclasses import dataclass, field
from pathlib import Path

from conceptseg.settings import resolved_settings


@dataclass
class _Item:
    image: Path


@dataclass
class _Config:
    prelim: Path
    items: list[_Item] = field(default_factory=list)


def _config(run: str) -> _Config:
    return _Config(Path(run) / "prelim", [_Item(Path(run) / "data" / "a.png")])


def test_relative_paths_inside_the_run_are_recorded_relative_to_it(tmp_path, monkeypatch):
    """Paths given relative to the working folder were recorded as written ("runs/a/data/a.png"), so
    two copies of one run (table2.py's segmenter seeds) had different fingerprints and redid stage 2."""
    monkeypatch.chdir(tmp_path)
    a, b = resolved_settings(_config("runs/a"), "runs/a"), resolved_settings(_config("runs/b"), "runs/b")
    assert a == b == {"prelim": "prelim", "items": [{"image": str(Path("data") / "a.png")}]}
    absolute = resolved_settings(_config(str(tmp_path / "runs" / "a")), tmp_path / "runs" / "a")
    assert absolute == a  # relative or absolute, the same record
    outside = resolved_settings(_Config(Path("elsewhere")), "runs/a")
    assert outside["prelim"] == str(tmp_path / "elsewhere")  # outside the run: absolute
