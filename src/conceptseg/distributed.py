"""Scale-out under `accelerate launch`: each process takes every n-th image of a per-image stage.

Without a launcher there is one process and these are no-ops.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _state():
    from accelerate import PartialState

    return PartialState()


def shard() -> tuple[int, int]:
    """(this process's index, number of processes)."""
    s = _state()
    return s.process_index, s.num_processes


def is_main() -> bool:
    return _state().is_main_process


def barrier() -> None:
    _state().wait_for_everyone()


def device():
    return _state().device


def finish_per_image_stage(out: Path) -> None:
    """After every shard is done: one manifest.json for the stage."""
    from conceptseg.io import Manifest

    barrier()
    if is_main():
        Manifest.merge_shards(out)
    barrier()
