"""Applying a segmenter: torch against onnxruntime (`conceptseg segment --segmenter X.onnx`), the
same weights, the same geometry (short side to the input size, the whole image), in one process so
the ratios compare.

    python benchmarks/segment_speed.py --threads 1 --json benchmarks/results/segment_speed-cpu.json

Random-weight U-Nets at the paper's width (64: 64..1024 channels) and the demo's (16); photos of
640x480 (so 171x128 at input size 128, padded to 176x128), in batches of --batch. Reports images/s
(best of --repeats), process CPU seconds per image, and max |p_onnx - p_torch| over the batch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    p.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import numpy as np
    import onnxruntime
    import torch
    from PIL import Image

    from conceptseg.modeling.segmenter import UNet
    from conceptseg.segmenter.predict import OnnxSegmenter, Segmenter, export_onnx

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.size[1], args.size[0], 3), dtype=np.uint8)) for _ in range(args.batch)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            torch.manual_seed(0)
            seg = Segmenter(UNet(width=width), args.input_size)
            export_onnx(seg, Path(tmp) / f"w{width}.onnx", check=False)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            onnx = OnnxSegmenter(Path(tmp) / f"w{width}.onnx", provider="cpu")
            onnx.session = onnxruntime.InferenceSession(str(Path(tmp) / f"w{width}.onnx"), options, providers=["CPUExecutionProvider"])
            results = {}
            for name, runner in (("torch", seg), ("onnxruntime", onnx)):
                runner.probabilities(images[:1])  # warm-up
                best, cpu = float("inf"), float("inf")
                for _ in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    probs = runner.probabilities(images)
                    best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
                results[name] = (best, cpu, probs)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(results["torch"][2], results["onnxruntime"][2]))
            for name, (best, cpu, _) in results.items():
                rows.append({"width": width, "runtime": name, "images_per_s": round(args.batch / best, 2),
                             "cpu_s_per_image": round(cpu / args.batch, 4), "max_abs_diff_to_torch": diff if name != "torch" else 0.0})
    print("| width | runtime | images/s | CPU s/image | max abs diff |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['runtime']} | {r['images_per_s']} | {r['cpu_s_per_image']} | {r['max_abs_diff_to_torch']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "torch": torch.__version__,
                                         "onnxruntime": onnxruntime.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
