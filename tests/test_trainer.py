"""What every trainer shares (`conceptseg.training`): optimiser steps with gradient clipping and
accumulation, checkpoints checked against the run's settings, and folders swapped into place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conceptseg import io


def _sgd_steps(max_grad_norm, accumulation=1):
    """One optimiser step of SGD (lr 1) on a loss whose gradient has norm 1000 * sqrt(10) per micro-batch."""
    from conceptseg.training import OptimiserSteps, Precision, trainer_accelerator

    with trainer_accelerator(accumulation) as accelerator:
        p = torch.nn.Parameter(torch.zeros(10))
        optimizer = torch.optim.SGD([p], lr=1.0)
        updates = OptimiserSteps(accelerator, Precision("no", accelerator.device), optimizer, [p], accumulation, max_grad_norm)
        for i in range(accumulation):
            with updates.micro_batch(i):
                updates.backward((p * 1000).sum())
            if i < accumulation - 1:
                with pytest.raises(RuntimeError, match="does not end an accumulation"):
                    updates.update()
        assert updates.update()
        return p.detach().clone()


def test_gradients_are_clipped_to_max_grad_norm():
    assert torch.linalg.vector_norm(_sgd_steps(None)) == pytest.approx(1000 * 10**0.5)
    assert torch.linalg.vector_norm(_sgd_steps(1.0)) == pytest.approx(1.0)
    assert torch.linalg.vector_norm(_sgd_steps(1.0, accumulation=2)) == pytest.approx(1.0)


def test_an_accumulated_step_averages_its_micro_batches():
    torch.testing.assert_close(_sgd_steps(None, accumulation=2), _sgd_steps(None, accumulation=1))


def test_train_t2i_clips_by_default_as_diffusers_and_the_method_s_trainers_do_not_as_the_paper():
    from conceptseg.finetune import FinetuneConfig
    from conceptseg.segmenter.train import TrainSegConfig
    from conceptseg.train_t2i import TrainT2IConfig

    assert FinetuneConfig("bird", [], ".", ".").max_grad_norm is None  # the paper's code does not clip
    assert TrainT2IConfig(data=".", out=".").max_grad_norm == 1.0
    assert TrainSegConfig(data=[], out=".").max_grad_norm is None  # the paper's segmenter recipe: plain Adam
    with pytest.raises(ValueError, match="max_grad_norm"):
        FinetuneConfig("bird", [], ".", ".", max_grad_norm=0)


def test_a_checkpoint_is_checked_against_the_settings_but_steps_may_grow(tmp_path):
    from conceptseg.training import CheckpointMismatch, Checkpoints, trainer_accelerator

    with trainer_accelerator() as accelerator:
        checkpoints = Checkpoints(accelerator, tmp_path / "out", {"lr": 1e-4, "method": "full", "seed": 0})
        ckpt = tmp_path / "out" / "checkpoints" / "step-000004"
        checkpoints.check(ckpt, {"step": 4, "settings": {"lr": 1e-4, "method": "full", "seed": 0}}, steps=8)
        checkpoints.check(ckpt, {"step": 4}, steps=8)  # made before checkpoints recorded settings
        with pytest.raises(CheckpointMismatch, match=r"step-000004.*seed: 1 there, 0 now"):
            checkpoints.check(ckpt, {"step": 4, "settings": {"lr": 1e-4, "method": "full", "seed": 1}}, steps=8)
        with pytest.raises(CheckpointMismatch, match="past this run's steps=2"):
            checkpoints.check(ckpt, {"step": 4, "settings": checkpoints.settings}, steps=2)


def _folder(path: Path, text: str) -> None:
    path.mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (path / name).write_text(text)


def _complete(path: Path) -> str:
    texts = {(path / n).read_text() for n in ("a.txt", "b.txt")}
    assert len(texts) == 1 and sorted(p.name for p in path.iterdir()) == ["a.txt", "b.txt"]
    return texts.pop()


def test_a_failed_folder_swap_leaves_the_old_folder_complete(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    _folder(dest, "old")
    real_rename = Path.rename

    def failing(self, target):
        if self.name == ".model.tmp":
            raise OSError("disk went away")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk went away"):
        io.write_folder(dest, lambda tmp: _folder(tmp, "new"))
    assert _complete(dest) == "old"
    monkeypatch.setattr(Path, "rename", real_rename)
    io.write_folder(dest, lambda tmp: _folder(tmp, "new"))
    assert _complete(dest) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_swap_killed_between_its_renames_is_restored(tmp_path):
    dest = tmp_path / "model"
    _folder(tmp_path / ".model.old", "old")  # what a kill after the first rename leaves
    io.write_folder(dest, lambda tmp: _folder(tmp, "new"))
    assert _complete(dest) == "new" and not (tmp_path / ".model.old").exists()


def test_a_checkpoint_that_fails_to_load_on_another_process_is_skipped_on_this_one(tmp_path, monkeypatch):
    """The processes agree (a gathered flag) on whether a checkpoint loaded: one that failed on any
    process is set aside on all of them, which go on to the one before it together."""
    from conceptseg import training

    with training.trainer_accelerator() as accelerator:
        net = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        net, optimizer = accelerator.prepare(net, optimizer)
        checkpoints = training.Checkpoints(accelerator, tmp_path, {"lr": 0.1}, total_limit=None)
        checkpoints.save(1)
        checkpoints.save(2)
        votes = []

        def other_process_failed_on_step_2(acc, ok):
            votes.append(ok)
            return ok and len(votes) > 1

        monkeypatch.setattr(training, "all_ranks", other_process_failed_on_step_2)
        assert checkpoints.resume(steps=4)[0] == 1
        assert votes == [True, True]  # this process loaded both; the other's failure decided
        assert (tmp_path / "checkpoints" / "step-000002.damaged").exists()
