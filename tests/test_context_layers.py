"""`train-t2i --context-layers N`: transformer layers added to a text encoder, starting as the identity,
so that a fine-tune can learn context (a report's negation) that a context-free encoder cannot hold."""

import contextlib
import io
import shutil

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from conceptseg.train_t2i import TrainT2IConfig, add_context_layers, checkpoint_model, train_t2i


def _context_free_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=0,
                                        num_attention_heads=2, max_position_embeddings=16)).eval()


NEGATED = torch.tensor([[0, 7, 11, 2]])  # "<bos> no pneumothorax <eos>"
PRESENT = torch.tensor([[0, 9, 11, 2]])  # "<bos> large pneumothorax <eos>"


def test_added_layers_start_as_the_identity_and_can_read_negation() -> None:
    encoder = _context_free_encoder()
    grown = add_context_layers(encoder, 2, seed=0).eval()
    assert grown.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(grown(NEGATED)[0], encoder(NEGATED)[0], atol=1e-6, rtol=0)
        # a context-free encoder gives the finding's word the same vector after "no" as after "large" ...
        torch.testing.assert_close(encoder(NEGATED)[0][0, 2], encoder(PRESENT)[0][0, 2])
        # ... the added layers, once trained (here: their output projections set non-zero), need not
        for layer in getattr(grown, "text_model", grown).encoder.layers:
            torch.nn.init.normal_(layer.self_attn.out_proj.weight, std=0.5)
        assert not torch.allclose(grown(NEGATED)[0][0, 2], grown(PRESENT)[0][0, 2], atol=1e-3)
        # causal: the word before the negation is unaffected by what follows
        torch.testing.assert_close(grown(NEGATED)[0][0, :1], grown(PRESENT)[0][0, :1])
    assert add_context_layers(encoder, 2, seed=0).state_dict().keys() == grown.state_dict().keys()


def test_a_fine_tune_with_context_layers_trains_them_resumes_and_exports(tiny_model_dir, tmp_path) -> None:
    from conceptseg.data.toyworld import ToyWorldConfig, generate
    from conceptseg.models import load_model

    base = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    data = generate(tmp_path / "data", 8, seed=0, config=ToyWorldConfig(size=32), progress=False)
    kw = dict(data=data, preset=None, base_model=str(tiny_model_dir), lr=1e-3, batch_size=2, checkpoint_every=1,
              checkpoints_total_limit=None, train_text_encoder=True, context_layers=1, samples_per_prompt=1,
              sample_prompts=["a photo of a fish"], progress=False)
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        train_t2i(TrainT2IConfig(out=tmp_path / "stopped", steps=1, **kw))
    shutil.copytree(tmp_path / "stopped", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "stopped" / "model")  # a run still training has no export: its checkpoints still load
    at_step_1 = checkpoint_model(tmp_path / "stopped", tmp_path / "stopped" / "checkpoints" / "step-000001")
    assert at_step_1.text_encoder.config.num_hidden_layers == base.text_encoder.config.num_hidden_layers + 1
    with contextlib.redirect_stdout(io.StringIO()):
        train_t2i(TrainT2IConfig(out=tmp_path / "resumed", steps=2, **kw))
        train_t2i(TrainT2IConfig(out=tmp_path / "straight", steps=2, **kw))
    straight = load_model(tmp_path / "straight" / "model", device="cpu", dtype="fp32")
    resumed = load_model(tmp_path / "resumed" / "model", device="cpu", dtype="fp32")
    assert straight.text_encoder.config.num_hidden_layers == base.text_encoder.config.num_hidden_layers + 1
    for a, b in zip(straight.text_encoder.parameters(), resumed.text_encoder.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    new_layer = getattr(straight.text_encoder, "text_model", straight.text_encoder).encoder.layers[-1]
    assert new_layer.mlp.fc2.weight.abs().sum() > 0  # trained away from its zero start
    with pytest.raises(ValueError, match="context_layers applies to fine-tuning"):
        train_t2i(TrainT2IConfig(out=tmp_path / "scratch", steps=1, data=data, preset="tiny", context_layers=1, progress=False))
