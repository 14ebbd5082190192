"""`train-t2i --attention-layers N`: transformer blocks added to each of a UNet's cross-attention
blocks, starting as the identity, so that a fine-tune gives more of the denoiser a reading of the prompt."""

import contextlib
import io
import shutil

import pytest
import torch

from conceptseg.attention import is_cross_attention
from conceptseg.train_t2i import TrainT2IConfig, add_attention_layers, checkpoint_model, train_t2i


def _cross_attention_layers(unet) -> int:
    return sum(is_cross_attention(name) for name in unet.attn_processors)


def test_added_blocks_start_as_the_identity_and_read_the_prompt(tiny_model_dir) -> None:
    from conceptseg.models import load_model

    unet = load_model(tiny_model_dir, device="cpu", dtype="fp32").unet.eval()
    grown = add_attention_layers(unet, 1, seed=0).eval()
    # every cross-attention block holds one more transformer block: down, mid and up
    blocks = [m for m in unet.modules() if hasattr(m, "transformer_blocks")]
    assert _cross_attention_layers(grown) == _cross_attention_layers(unet) + len(blocks)
    torch.manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.tensor([10, 700])
    prompt, other_prompt = (torch.randn(2, 77, unet.config.cross_attention_dim) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(grown(latents, t, prompt).sample, unet(latents, t, prompt).sample, atol=1e-6, rtol=0)
        # once trained (here: a new block's cross-attention output set non-zero) the new block reads the prompt
        new_blocks = [m.transformer_blocks[-1] for m in grown.modules() if hasattr(m, "transformer_blocks")]
        torch.nn.init.normal_(new_blocks[0].attn2.to_out[0].weight, std=0.5)
        added = [grown(latents, t, c).sample - unet(latents, t, c).sample for c in (prompt, other_prompt)]
        assert added[0].abs().max() > 1e-4
        assert not torch.allclose(added[0], added[1], atol=1e-4)  # what the block adds depends on the prompt
    assert add_attention_layers(unet, 1, seed=0).state_dict().keys() == grown.state_dict().keys()


def test_a_fine_tune_with_attention_layers_trains_them_resumes_and_exports(tiny_model_dir, tmp_path) -> None:
    from conceptseg.data.toyworld import ToyWorldConfig, generate
    from conceptseg.models import load_model

    base = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    data = generate(tmp_path / "data", 8, seed=0, config=ToyWorldConfig(size=32), progress=False)
    kw = dict(data=data, preset=None, base_model=str(tiny_model_dir), lr=1e-3, batch_size=2, checkpoint_every=1,
              checkpoints_total_limit=None, attention_layers=1, samples_per_prompt=1,
              sample_prompts=["a photo of a fish"], progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        train_t2i(TrainT2IConfig(out=tmp_path / "stopped", steps=1, **kw))
    shutil.copytree(tmp_path / "stopped", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "stopped" / "model")  # a run still training has no export: its checkpoints still load
    at_step_1 = checkpoint_model(tmp_path / "stopped", tmp_path / "stopped" / "checkpoints" / "step-000001")
    assert _cross_attention_layers(at_step_1.unet) > _cross_attention_layers(base.unet)
    with contextlib.redirect_stdout(io.StringIO()):
        train_t2i(TrainT2IConfig(out=tmp_path / "resumed", steps=2, **kw))
        train_t2i(TrainT2IConfig(out=tmp_path / "straight", steps=2, **kw))
    straight = load_model(tmp_path / "straight" / "model", device="cpu", dtype="fp32")
    resumed = load_model(tmp_path / "resumed" / "model", device="cpu", dtype="fp32")
    assert _cross_attention_layers(straight.unet) == _cross_attention_layers(at_step_1.unet)
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    new_block = straight.unet.mid_block.attentions[0].transformer_blocks[-1]
    assert new_block.attn2.to_out[0].weight.abs().sum() > 0  # trained away from its zero start
    with pytest.raises(ValueError, match="attention_layers applies to fine-tuning"):
        train_t2i(TrainT2IConfig(out=tmp_path / "scratch", steps=1, data=data, preset="tiny", attention_layers=1, progress=False))
