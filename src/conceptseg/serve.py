"""`conceptseg serve`: a segmenter behind a small HTTP server on localhost, with a page to try it.

    GET  /                         the page: upload images, see the mask over each, the cut-out, download both
    POST /api/segment?output=KIND  body: an image (raw bytes, or multipart/form-data with one file)
                                   -> PNG; KIND: mask (0/255), rgba (cut-out), overlay (mask tinted over the
                                   image), color (over &color=...); &threshold=0.5 overrides the default
    POST /api/prelim?concept=WORD&output=map|mask   (with --model) stage 1: the attention map or M_pre;
                                   &maps=cross-attention|concept-attention overrides the server's --maps
                                   (concept-attention: joint-attention families; several words compete)
    GET  /api/info                 JSON: segmenter, input size, threshold, whether stage 1 is available, map kind
    GET  /example.png              the --example image (the page's "try the example" button)

Built on the standard library's ThreadingHTTPServer: the tool needs one upload form and a few PNG
answers on localhost, so it adds no dependency (Gradio, the field's convention, would bring a web
stack of its own, FastAPI and uvicorn among it, for the same page). Requests share one model under
a lock, so they run one at a time.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from conceptseg.cutout import cutout, over, overlay, parse_color
from conceptseg.geometry import to_rgb

MAX_UPLOAD_BYTES = 64 * 2**20
SEGMENT_OUTPUTS = ("mask", "rgba", "overlay", "color")


class BadRequest(ValueError):
    """A request the server answers with 400 and this message."""


@dataclass
class App:
    segmenter: object  # conceptseg.segmenter.Segmenter
    model: object | None = None  # a `families.base.DiffusionModel` for stage 1, optional
    example: Path | None = None
    source: str = ""
    maps: str = "cross-attention"  # stage 1's map kind (`prelim.PrelimConfig.maps`) unless a request names one

    def __post_init__(self):
        self.lock = threading.Lock()
        self.check_maps(self.maps)

    def check_maps(self, maps: str) -> None:
        """One clear error for an unknown map kind, or concept attention on a model without joint attention."""
        from conceptseg.concept_attention import MAP_KINDS, check_supports_concept_attention

        if maps not in MAP_KINDS:
            raise BadRequest(f"maps must be one of {', '.join(MAP_KINDS)}, not {maps!r}")
        if maps == "concept-attention" and self.model is not None:
            check_supports_concept_attention(self.model)

    def segment(self, image: Image.Image, output: str, threshold: float | None, color: str) -> Image.Image:
        if output not in SEGMENT_OUTPUTS:
            raise BadRequest(f"output must be one of {', '.join(SEGMENT_OUTPUTS)}, not {output!r}")
        with self.lock:
            prob = self.segmenter.probabilities([image])[0]
        mask = prob > (self.segmenter.threshold if threshold is None else threshold)
        if output == "mask":
            return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
        if output == "rgba":
            return cutout(image, mask)
        if output == "color":
            return over(image, mask, parse_color(color))
        return overlay(image, mask)

    def prelim(self, image: Image.Image, concept: str, output: str, maps: str | None = None) -> Image.Image:
        if self.model is None:
            raise BadRequest("stage 1 needs a diffusion model: start the server with --model")
        if not concept.strip():
            raise BadRequest("give a concept word (?concept=bird)")
        maps = maps or self.maps
        self.check_maps(maps)
        from conceptseg.prelim import preliminary_masks

        with self.lock:
            result = preliminary_masks(self.model, [image], concept.split(), maps=maps)[0]
        if output == "mask":
            return Image.fromarray(np.where(result.mask, 255, 0).astype(np.uint8), mode="L")
        if output != "map":
            raise BadRequest(f"output must be map or mask, not {output!r}")
        from conceptseg.geometry import Canvas

        from conceptseg.pictures import heatmap

        return Image.fromarray(heatmap(Canvas(image.width, image.height, self.model.resolution).restore(
            result.attention, Image.Resampling.BILINEAR)))

    def info(self) -> dict:
        return {"segmenter": self.source, "input_size": self.segmenter.input_size, "threshold": self.segmenter.threshold,
                "stage1": self.model is not None, "example": self.example is not None, "maps": self.maps}


def read_image(body: bytes, content_type: str) -> Image.Image:
    """The uploaded image: the raw body, or the first file of a multipart/form-data body."""
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        files = [part for part in message.iter_parts() if part.get_filename() is not None or part.get_content_maintype() == "image"]
        if not files:
            raise BadRequest("the form holds no file")
        body = files[0].get_payload(decode=True) or b""
    if not body:
        raise BadRequest("no image in the request body")
    try:
        with Image.open(io.BytesIO(body)) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"the upload is not an image Pillow can read ({type(e).__name__})") from None
    return to_rgb(im)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_handler(app: App):
    class Handler(BaseHTTPRequestHandler):
        server_version = "conceptseg"

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            pass  # quiet; errors are answered to the client

        def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(), "application/json")

        def do_GET(self):  # noqa: N802 (http.server's naming)
            path = urlparse(self.path).path
            if path == "/":
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/info":
                self._send(200, json.dumps(app.info()).encode(), "application/json")
            elif path == "/example.png" and app.example is not None:
                from conceptseg.geometry import load_rgb

                self._send(200, _png(load_rgb(app.example)), "image/png")
            else:
                self._error(404, f"no such page: {path}")

        def do_POST(self):  # noqa: N802
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD_BYTES:
                self._error(413, f"upload of {length} bytes is over the limit of {MAX_UPLOAD_BYTES}")
                return
            body = self.rfile.read(length)
            try:
                image = read_image(body, self.headers.get("Content-Type", ""))
                if url.path == "/api/segment":
                    threshold = float(query["threshold"]) if "threshold" in query else None
                    result = app.segment(image, query.get("output", "mask"), threshold, query.get("color", "white"))
                elif url.path == "/api/prelim":
                    result = app.prelim(image, query.get("concept", ""), query.get("output", "map"), query.get("maps"))
                else:
                    self._error(404, f"no such endpoint: {url.path}")
                    return
            except (BadRequest, ValueError) as e:
                self._error(400, str(e))
                return
            self._send(200, _png(result), "image/png")

    return Handler


def make_server(app: App, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free port; `server.server_address` says which); call serve_forever()."""
    server = ThreadingHTTPServer((host, port), make_handler(app))
    server.daemon_threads = True
    return server


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>conceptseg</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
 h1 { font-size: 1.3em; margin: 0 0 .3em; } #info { color: #666; margin-bottom: 1em; }
 .controls { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin-bottom: 1em; }
 .result { display: flex; gap: 1em; align-items: flex-start; margin: 1em 0; flex-wrap: wrap; }
 figure { margin: 0; } figcaption { font-size: .85em; color: #555; }
 figure img { display: block; width: 256px; image-rendering: auto; border: 1px solid #ccc; }
 .checker img { background: repeating-conic-gradient(#ddd 0% 25%, #fff 0% 50%) 50% / 16px 16px; }
 .error { color: #b00; }
</style></head>
<body>
<h1>conceptseg</h1>
<div id="info"></div>
<div class="controls">
 <input type="file" id="files" accept="image/*" multiple>
 <label>threshold <input type="number" id="threshold" min="0" max="1" step="0.05" style="width:5em"></label>
 <button id="example" hidden>try the example</button>
 <span id="stage1" hidden><input id="concept" placeholder="concept word"> <label><input type="checkbox" id="prelim"> stage-1 map and M_pre</label></span>
</div>
<div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
let info = {};
async function post(path, blob) {
  const r = await fetch(path, {method: "POST", body: blob, headers: {"Content-Type": blob.type || "application/octet-stream"}});
  if (!r.ok) throw new Error((await r.json()).error || r.statusText);
  return URL.createObjectURL(await r.blob());
}
function figure(url, caption, download, checker) {
  const f = document.createElement("figure");
  if (checker) f.className = "checker";
  f.innerHTML = `<img alt="${caption}"><figcaption>${caption}${download ? ` · <a download="${download}">download</a>` : ""}</figcaption>`;
  f.querySelector("img").src = url;
  if (download) f.querySelector("a").href = url;
  return f;
}
async function run(blob, name) {
  const row = document.createElement("div");
  row.className = "result";
  row.innerHTML = `<div>${name}</div>`;
  $("results").prepend(row);
  const t = $("threshold").value, q = t ? `&threshold=${t}` : "";
  const stem = name.replace(/\\.[^.]*$/, "");
  try {
    const [over, cut, mask] = await Promise.all(["overlay", "rgba", "mask"].map((o) => post(`/api/segment?output=${o}${q}`, blob)));
    row.innerHTML = "";
    row.append(figure(over, `${name}: mask over the image`, null),
               figure(cut, "cut-out", `${stem}_cutout.png`, true),
               figure(mask, "mask", `${stem}_mask.png`));
    const word = $("concept").value.trim();
    if (info.stage1 && $("prelim").checked && word) {
      const c = encodeURIComponent(word);
      const [map, pre] = await Promise.all(["map", "mask"].map((o) => post(`/api/prelim?concept=${c}&output=${o}`, blob)));
      row.append(figure(map, `stage-1 map of "${word}"`, null), figure(pre, "M_pre", `${stem}_prelim.png`));
    }
    row.dataset.done = "1";
  } catch (e) {
    row.innerHTML = `<span class="error">${name}: ${e.message}</span>`;
  }
}
$("files").addEventListener("change", () => { for (const f of $("files").files) run(f, f.name); });
async function example() {
  const blob = await (await fetch("/example.png")).blob();
  await run(blob, "example.png");
}
$("example").addEventListener("click", example);
(async () => {
  info = await (await fetch("/api/info")).json();
  $("info").textContent = `segmenter ${info.segmenter} · short side resized to ${info.input_size} px · threshold ${info.threshold}`;
  $("threshold").placeholder = info.threshold;
  $("example").hidden = !info.example;
  $("stage1").hidden = !info.stage1;
  if (info.example && new URLSearchParams(location.search).has("example")) example();
})();
</script>
</body></html>
"""
