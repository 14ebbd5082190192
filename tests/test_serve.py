"""`conceptseg serve` end to end over HTTP, and its page in a real headless browser."""

import io
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from conceptseg.modeling.segmenter import UNet
from conceptseg.segmenter.predict import Segmenter, save_segmenter
from conceptseg.serve import App, make_server


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def serve():
    """serve(app) -> base URL of a server running in a thread; stopped after the test."""
    servers = []

    def start(app: App) -> str:
        server = make_server(app, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def segmenter():
    torch.manual_seed(0)
    return Segmenter(UNet(width=4), input_size=32)


def _post(url: str, body: bytes, content_type: str = "image/png"):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_post_an_image_get_mask_or_cutout(serve, segmenter, textured):
    base = serve(App(segmenter, source="seg"))
    image = textured(50, 30, seed=3)
    expected = segmenter.masks([image])[0]
    assert 0 < expected.sum() < expected.size
    status, kind, body = _post(f"{base}/api/segment?output=mask", _png(image))
    mask = np.asarray(Image.open(io.BytesIO(body)))
    assert status == 200 and kind == "image/png" and mask.shape == (30, 50)
    np.testing.assert_array_equal(mask == 255, expected)
    rgba = np.asarray(Image.open(io.BytesIO(_post(f"{base}/api/segment?output=rgba", _png(image))[2])))
    np.testing.assert_array_equal(rgba[..., 3] == 255, expected)
    np.testing.assert_array_equal(rgba[..., :3], np.asarray(image))
    lower = np.asarray(Image.open(io.BytesIO(_post(f"{base}/api/segment?output=mask&threshold=0.2", _png(image))[2])))
    np.testing.assert_array_equal(lower == 255, segmenter.probabilities([image])[0] > 0.2)
    # multipart/form-data, as curl -F file=@photo.png sends it
    boundary = "xYzBoundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + _png(image) + f"\r\n--{boundary}--\r\n".encode()
    body = _post(f"{base}/api/segment", form, f"multipart/form-data; boundary={boundary}")[2]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))) == 255, expected)
    # the page and the info
    with urllib.request.urlopen(f"{base}/", timeout=10) as r:
        assert "conceptseg" in r.read().decode() and r.headers["Content-Type"].startswith("text/html")
    with urllib.request.urlopen(f"{base}/api/info", timeout=10) as r:
        assert json.loads(r.read()) == {"segmenter": "seg", "input_size": 32, "threshold": 0.5, "stage1": False, "example": False,
                                        "maps": "cross-attention"}


def test_bad_requests_get_one_clear_error(serve, segmenter, textured):
    base = serve(App(segmenter))
    for url, body, needle in [(f"{base}/api/segment", b"not an image", "not an image"),
                              (f"{base}/api/segment?output=jpeg", _png(textured(8, 8)), "output must be"),
                              (f"{base}/api/prelim?concept=fish", _png(textured(8, 8)), "--model")]:
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(url, body)
        assert e.value.code == 400 and needle in json.loads(e.value.read())["error"]


def test_stage1_map_and_prelim_mask_with_a_model(serve, segmenter, tiny_model, textured):
    base = serve(App(segmenter, model=tiny_model))
    image = textured(40, 24, seed=1)
    from conceptseg.prelim import preliminary_masks

    expected = preliminary_masks(tiny_model, [image], ["cat"])[0].mask
    mask = np.asarray(Image.open(io.BytesIO(_post(f"{base}/api/prelim?concept=cat&output=mask", _png(image))[2])))
    np.testing.assert_array_equal(mask == 255, expected)
    heat = Image.open(io.BytesIO(_post(f"{base}/api/prelim?concept=cat&output=map", _png(image))[2]))
    assert heat.size == (40, 24) and heat.mode == "RGB" and np.asarray(heat).std() > 0


def test_serve_command_answers_over_http(tmp_path, segmenter, textured):
    save_segmenter(segmenter.net, tmp_path / "seg", 32)
    proc = subprocess.Popen([sys.executable, "-m", "conceptseg", "serve", "--segmenter", str(tmp_path / "seg"), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        url = re.search(r"http://\S+/", line).group(0)
        image = textured(20, 20)
        body = _post(f"{url}api/segment?output=mask", _png(image))[2]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))) == 255, segmenter.masks([image])[0])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium installed (Debian: apt-get install -y chromium; .ci/run does it)")
def test_page_in_a_headless_browser_shows_the_result(serve, tmp_path):
    """The page, opened with ?example, uploads the example image and shows the mask tinted over it:
    a uniform grey image under an all-foreground segmenter becomes a magenta-grey block."""
    torch.manual_seed(0)
    example = tmp_path / "grey.png"
    Image.new("RGB", (64, 48), (128, 128, 128)).save(example)
    base = serve(App(Segmenter(UNet(width=4), 32, threshold=0.0), example=example, source="test"))
    tinted = np.array([192, 64, 192])  # half grey 128, half magenta (255, 0, 255)

    def shot(path: str) -> np.ndarray:
        out = tmp_path / f"shot{len(list(tmp_path.glob('shot*')))}.png"
        subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700", f"--screenshot={out}",
                        "--virtual-time-budget=20000", f"{base}{path}"], capture_output=True, timeout=120, check=True)
        assert out.stat().st_size > 1000
        return np.asarray(Image.open(out).convert("RGB")).astype(int)

    def tinted_pixels(image: np.ndarray) -> int:
        return int((np.abs(image - tinted).max(-1) <= 3).sum())

    page = shot("/")
    assert page.std() > 0 and tinted_pixels(page) == 0  # the page alone: no result
    result = shot("/?example")
    assert tinted_pixels(result) > 256 * 150  # the overlay, shown 256 px wide (192 px high)


def test_serve_takes_a_run_or_its_stage_folders(tmp_path, segmenter, tiny_model_dir, monkeypatch, capsys):
    """`serve --segmenter runs/x/segmenter/unet_real` (not only .../model), `--run runs/x`, and
    `--model runs/x/finetune`: each resolved, and what was taken printed."""
    import conceptseg.serve
    from conceptseg.cli import main
    from test_share import make_run

    run = make_run(tmp_path / "run", segmenter.net, model_dir=tiny_model_dir)
    apps = []

    class NoServer:
        server_address = ("127.0.0.1", 7860)

        def serve_forever(self):
            pass

        def server_close(self):
            pass

    monkeypatch.setattr(conceptseg.serve, "make_server", lambda app, host, port: apps.append(app) or NoServer())
    stage = run / "segmenter" / "unet_real"
    assert main(["serve", "--segmenter", str(stage), "--device", "cpu"]) == 0
    assert apps[-1].source == str(stage / "model") and apps[-1].model is None
    assert f"conceptseg serving {stage / 'model'} on http://127.0.0.1:7860/" in capsys.readouterr().out
    assert main(["serve", "--run", str(run), "--model", str(run / "finetune"), "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert apps[-1].source == str(stage / "model") and "the run's best: IoU 76.3" in said
    assert f"model {run / 'finetune' / 'model'} (the model of stage folder {run / 'finetune'})" in said
    assert apps[-1].model is not None and apps[-1].model.source == str((run / "finetune" / "model").resolve())


def test_stage1_map_kind_option(serve, segmenter, tiny_model, textured, tmp_path, monkeypatch, capsys):
    """`--maps` (App.maps) and `&maps=`: concept attention on a joint-attention family gives stage 1's
    concept-attention mask; the default stays cross-attention; a family without joint attention or
    an unknown kind is refused with one clear error."""
    import conceptseg.serve
    from conceptseg.cli import main
    from conceptseg.families import family_from_components
    from conceptseg.modeling.presets import build_family_components
    from conceptseg.prelim import preliminary_masks

    flux = family_from_components("flux", build_family_components("flux", "tiny"), "cpu", torch.float32)
    image = textured(40, 24, seed=1)
    base = serve(App(segmenter, model=flux, maps="concept-attention"))
    with urllib.request.urlopen(f"{base}/api/info", timeout=10) as r:
        assert json.loads(r.read())["maps"] == "concept-attention"
    concept = preliminary_masks(flux, [image], ["bird", "sky"], maps="concept-attention")[0].mask
    cross = preliminary_masks(flux, [image], ["bird"])[0].mask  # words the prompt "a photo of a bird" holds
    assert not np.array_equal(concept, cross)  # the two kinds differ here, so the comparisons can fail
    for query, expected in (("bird+sky", concept), ("bird&maps=cross-attention", cross)):
        body = _post(f"{base}/api/prelim?output=mask&concept={query}", _png(image))[2]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))) == 255, expected)
    sd = serve(App(segmenter, model=tiny_model))  # SD 1.x: cross-attention only
    for url, needle in ((f"{base}/api/prelim?concept=bird&maps=attention", "maps must be one of"),
                        (f"{sd}/api/prelim?concept=cat&maps=concept-attention", "--maps cross-attention")):
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(url, _png(image))
        assert e.value.code == 400 and needle in json.loads(e.value.read())["error"]
    with pytest.raises(ValueError, match="joint-attention"):
        App(segmenter, model=tiny_model, maps="concept-attention")
    save_segmenter(segmenter.net, tmp_path / "seg", 32)
    monkeypatch.setattr(conceptseg.serve, "make_server", lambda app, host, port: pytest.fail("served"))
    assert main(["serve", "--segmenter", str(tmp_path / "seg"), "--device", "cpu", "--maps", "concept-attention"]) == 2
    assert "need --model" in capsys.readouterr().err
