#!/usr/bin/env python3
"""The peer of `edkm bench dkm`: coremltools' DKMPalettizer, the train-time palettization users
run today, on the same LLaMA-7B decoder layer and settings (3 bits, one palette per tensor, the
seven projections with N(0, 0.02) weights), measured the same way: forward + backward of every
projection, best of --reps after a warm-up (which also runs coremltools' k-means
initialisation); extra memory is the device's peak of allocated bytes beyond the weights, the
inputs, the outputs and the weight gradients (the CUDA caching allocator's statistics).

The initial k-means runs before the timed steps, as in training, where it runs once. It is
coremltools' own k-means++ on the device with one restart: its default ("auto": scikit-learn or
its 1-D solver on the CPU, 10 restarts) takes about 30 s for 0.8M weights on this project's CPU
machine, so minutes per matrix of a 7B layer, and it would not change the timed steps.

Two configurations: coremltools' defaults (dense DKM), and with its eDKM options
(palett_unique: attention over the distinct 16-bit values; the layer's weights are bf16 so
that it applies). Prints JSON.

    python3 scripts/coremltools_dkm_bench.py --device cuda > coremltools_dkm.json

Needs torch and coremltools (with cattrs and pyaml); scripts/gpu-prepare.sh carries their wheels.
"""
import argparse
import json
import time

import torch
from coremltools.optimize.torch.palettization import (DKMPalettizer, DKMPalettizerConfig,
                                                       ModuleDKMPalettizerConfig)

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--device", default="cuda")
ap.add_argument("--bits", type=int, default=3)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--layer-scale", type=float, default=1.0, help="shrinks the output dimensions (1 = LLaMA-7B)")
ap.add_argument("--weights", default="bf16", choices=["bf16", "fp32"], help="the layer's dtype, as edkm bench dkm's --weights")
args = ap.parse_args()
device = torch.device(args.device)
dtype = torch.float32 if args.weights == "fp32" else torch.bfloat16


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated():
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def layer():
    """The seven projections of one LLaMA-7B decoder layer as Linear modules, as edkm's bench has them."""
    torch.manual_seed(0)
    d, h = max(1, int(4096 * args.layer_scale)), max(1, int(11008 * args.layer_scale))
    shapes = [(d, 4096)] * 4 + [(h, 4096)] * 2 + [(d, 11008)]
    mods = torch.nn.ModuleList()
    for rows, cols in shapes:
        m = torch.nn.Linear(cols, rows, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.randn(rows, cols) * 0.02)
        mods.append(m)
    return mods.to(device=device, dtype=dtype)


def run(label, options):
    model = layer()
    n = sum(m.weight.numel() for m in model)
    cfg = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(
        n_bits=args.bits, granularity="per_tensor", weight_threshold=0, milestone=0,
        kmeans_init="kmeans++", kmeans_n_init=1, **options))
    palettizer = DKMPalettizer(model, cfg)
    model = palettizer.prepare(inplace=True)
    palettizer.step()
    xs = [torch.randn(1, m.in_features, device=device, dtype=dtype) for m in model]
    upstream = [torch.randn(1, m.out_features, device=device, dtype=dtype) for m in model]
    best, extra = float("inf"), 0
    for rep in range(args.reps + 1):  # the first is the warm-up (k-means initialisation)
        for m in model:
            m.weight.grad = None
        sync()
        base = allocated()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        outs = [m(x) for m, x in zip(model, xs)]
        for o, g in zip(outs, upstream):
            o.backward(g)
        sync()
        seconds = time.perf_counter() - t0
        if rep == 0:
            continue
        best = min(best, seconds)
        if device.type == "cuda":
            grads = sum(m.weight.grad.numel() * m.weight.grad.element_size() for m in model)
            extra = max(extra, torch.cuda.max_memory_allocated(device) - base - grads)
    return {"config": label, "options": options, "weights": n, "seconds": best,
            "extra_bytes": extra if device.type == "cuda" else None}


rows = [run("coremltools DKM (defaults)", {}),
        run("coremltools DKM + eDKM unique", {"palett_unique": True})]
print(json.dumps({"benchmark": "coremltools_dkm", "device": str(device), "torch": torch.__version__,
                  "coremltools": __import__("coremltools").__version__, "bits": args.bits, "reps": args.reps,
                  "layer_scale": args.layer_scale, "weights": args.weights, "rows": rows}, indent=2))
