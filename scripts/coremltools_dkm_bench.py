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

Three configurations: coremltools' defaults (dense DKM), and two with its eDKM options
(palett_unique: the saved [N, k] maps stored once per distinct row; the layer's weights are bf16
so that it applies). coremltools installs its eDKM hook on the tensors autograd saves only when
palett_max_mem < 1 (fake_palettize.py), and the hook asks torch.distributed for the world size,
so the script starts a single-rank Gloo group. The hook offloads what it stores to pinned CPU
memory when the device's allocated fraction exceeds palett_max_mem (eDKM's marshaling):
0.9 keeps it on the GPU, 1e-6 offloads it. palett_shard needs several ranks and is not run.
Each row is written to --out as it completes (a run cut short keeps the rows it finished); a
configuration that fails gets its error in its row.

    python3 scripts/coremltools_dkm_bench.py --device cuda --out coremltools_dkm.json

Needs torch and coremltools (with cattrs and pyaml); scripts/gpu-prepare.sh carries their wheels.
"""
import argparse
import json
import os
import tempfile
import time

import torch
from coremltools.optimize.torch.palettization import (DKMPalettizer, DKMPalettizerConfig,
                                                       ModuleDKMPalettizerConfig)
from coremltools.optimize.torch.palettization._fake_palettizer_tensor_hook import _FakePalettizerTensorHook

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--device", default="cuda")
ap.add_argument("--bits", type=int, default=3)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--layer-scale", type=float, default=1.0, help="shrinks the output dimensions (1 = LLaMA-7B)")
ap.add_argument("--weights", default="bf16", choices=["bf16", "fp32"], help="the layer's dtype, as edkm bench dkm's --weights")
ap.add_argument("--out", help="the JSON file, rewritten after each configuration (default: stdout at the end)")
args = ap.parse_args()
device = torch.device(args.device)
dtype = torch.float32 if args.weights == "fp32" else torch.bfloat16


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated():
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


# What coremltools' eDKM hook did, counted per configuration: an option that does not engage
# leaves the figures of the defaults, which is otherwise silent.
hook = {}


def counted(method, key):
    def wrapper(self, *a):
        hook[key] = hook.get(key, 0) + 1
        if key == "packed" and self.use_cpu:
            hook["offloaded"] = True
        return method(self, *a)
    return wrapper


# coremltools 9.0's _unique_tensor reads x.size(1) of every saved tensor above palett_min_tsize
# (64K elements), and the [N] indices that min(dim=-1) saves in each iteration are 1-D: an
# IndexError for any weight of more than 64K elements, so palett_unique never runs on an LLM's
# layer. The script passes 1-D tensors through as the function's own guard passes [n, 1] ones
# (stored as they are), and uniquifies the rest as coremltools does.
def unique_rows(self, x, _unique=_FakePalettizerTensorHook._unique_tensor):
    if x.dim() < 2:
        hook["passed_1d"] = hook.get("passed_1d", 0) + 1
        return x
    return _unique(self, x)


_FakePalettizerTensorHook.pack = counted(_FakePalettizerTensorHook.pack, "packed")
_FakePalettizerTensorHook._unique_tensor = counted(unique_rows, "uniquified")


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
    hook.clear()
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
    return {"config": label, "options": options, "weights": n, "seconds": best, "edkm_hook": dict(hook),
            "extra_bytes": extra if device.type == "cuda" else None}


configs = [("coremltools DKM (defaults)", {}),
           ("coremltools eDKM: palett_unique, on the GPU", {"palett_unique": True, "palett_max_mem": 0.9}),
           ("coremltools eDKM: palett_unique, offloaded to the CPU", {"palett_unique": True, "palett_max_mem": 1e-6})]


def document(rows):
    return json.dumps({"benchmark": "coremltools_dkm", "device": str(device), "torch": torch.__version__,
                       "coremltools": __import__("coremltools").__version__, "bits": args.bits, "reps": args.reps,
                       "layer_scale": args.layer_scale, "weights": args.weights, "rows": rows}, indent=2)


def write(rows):
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(document(rows) + "\n")
    os.replace(tmp, args.out)


with tempfile.TemporaryDirectory() as store:
    torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(store, "pg"), rank=0, world_size=1)
    rows = []
    for label, options in configs:
        try:
            rows.append(run(label, options))
        except Exception as e:  # recorded, and the next configuration still runs
            rows.append({"config": label, "options": options, "error": f"{type(e).__name__}: {e}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            write(rows)
    torch.distributed.destroy_process_group()
if not args.out:
    print(document(rows))
