"""`train-t2i --drop-negated WORD`: the report sentences that negate WORD are left out of the captions
the model trains on; without it, reports are used as written."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from transformers import PreTrainedTokenizerBase

from conceptseg.data.chest import FINDING_WORDS, FINDINGS, NEGATIONS, Finding, _sentence
from conceptseg.data.medical import drop_negated_sentences, negates
from conceptseg.train_t2i import TrainT2IConfig, train_t2i
from conceptseg.training import checkpoint_settings

WORDS = list(FINDING_WORDS.values())


def test_drops_every_chest_world_negation_and_keeps_findings() -> None:
    rng = np.random.default_rng(0)
    for name in FINDINGS:
        positive = _sentence(rng, Finding(name, None if name == "cardiomegaly" else "left", "large", "mid"))
        for negation in NEGATIONS[name]:
            report = f"{positive} {negation} No acute process."
            kept = drop_negated_sentences(report, WORDS)
            assert kept == f"{positive} No acute process.", report  # a negation of an unlisted thing stays
            assert not any(negates(kept, w) for w in WORDS)
            # only the listed words' negations go
            others = [w for w in WORDS if w != FINDING_WORDS[name]]
            assert drop_negated_sentences(report, others) == report
    assert drop_negated_sentences("No pneumothorax. No effusion.", WORDS) == ""


def test_a_fine_tune_trains_on_the_reports_without_their_negations(tiny_model_dir, tmp_path, monkeypatch) -> None:
    from conceptseg.data.chest import ChestWorldConfig, generate

    data = generate(tmp_path / "chest", 8, seed=1, progress=False, config=ChestWorldConfig(size=32, test_fraction=0.0))
    reports = [json.loads(line)["caption"] for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert any(negates(r, w) for r in reports for w in WORDS)  # the world's reports do negate
    seen: list[str] = []
    tokenize = PreTrainedTokenizerBase.__call__

    def recording(self, text=None, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", recording)
    kw = dict(data=data, preset=None, base_model=str(tiny_model_dir), steps=2, batch_size=4, checkpoint_every=2,
              train_text_encoder=True, samples_per_prompt=1, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        train_t2i(TrainT2IConfig(out=tmp_path / "dropped", drop_negated=WORDS, **kw))
    trained = [t for t in seen if t]
    assert trained and not any(negates(t, w) for t in trained for w in WORDS)
    assert set(trained) <= {drop_negated_sentences(r, WORDS) for r in reports}

    seen.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        train_t2i(TrainT2IConfig(out=tmp_path / "as_written", **kw))
    assert any(negates(t, w) for t in seen if t for w in WORDS)  # the paper's behaviour: reports as written

    # an added setting: at its default it leaves the checkpoints' fingerprint as it was
    as_written = checkpoint_settings(TrainT2IConfig(out=tmp_path / "a", **kw), tmp_path / "a")
    assert "drop_negated" not in as_written
    assert checkpoint_settings(TrainT2IConfig(out=tmp_path / "a", drop_negated=WORDS, **kw), tmp_path / "a")["drop_negated"] == WORDS
