#!/usr/bin/env python3
"""The SmolLM2-135M compression study (issue 18): every method at 4, 3 and 2 bits, each model
scored on WikiText-2 perplexity and zero-shot accuracy, with its compression time and peak memory.

    ./scripts/get-models.sh                    # models/SmolLM2-135M-Instruct
    python3 scripts/study_smollm2.py --out study/
    ./build/edkm report study/results/*.json -o study/report

Standard library only. Each model and each result is a file under --out; a run that is stopped
and started again skips what exists, so the study can go on in the background across sessions
(on a GPU machine, the same script with --device cuda and a larger --train-tokens).

Methods (--methods):
  fp32           the model as loaded (the reference)
  rtn            round-to-nearest, a scale and zero point per --grid-group weights of a row
  gptq           GPTQ on the same grid, calibrated on --calib (first --calib-samples windows)
  kmeans         Lloyd k-means (k-means++ seeding) palettes, hard-assigned
  optimal        the exact 1-D k-means palettes (dynamic programming)
  skm            sensitivity-weighted (Fisher) k-means, exact, calibrated on --calib
  dkm            edkm compress: DKM fine-tuning on --data for --train-tokens tokens
  dkm-distill    the same with --distill (KL to the frozen bf16 teacher)
  hard-kmeans    the same fine-tuning with hard nearest-centroid assignment (straight-through)
  qat            the same fine-tuning with a uniform grid per row, learned scale and zero point
  dkm-unweighted, hard-kmeans-unweighted
                 dkm and hard-kmeans with unweighted centroid updates (--no-sensitive-updates)
The palette methods share one palette layout (--palette-args); DKM and hard k-means start from
the skm palettes (exact k-means weighted by the Fisher information on the calibration text),
and weigh their centroid updates by the same Fisher information unless -unweighted.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--edkm", default=os.path.join(ROOT, "build", "edkm"))
ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
ap.add_argument("--assets", default=os.environ.get("EDKM_ASSETS", os.path.join(ROOT, "..", "shared", "assets")))
ap.add_argument("--out", default=os.path.join(ROOT, "study"))
ap.add_argument("--bits", default="3,4,2", help="in this order")
ap.add_argument("--methods", default="fp32,rtn,gptq,kmeans,optimal,skm,dkm,dkm-distill,hard-kmeans,qat")
ap.add_argument("--tasks", default="piqa,hellaswag,arc_easy,arc_challenge,winogrande,boolq,copa",
                help="zero-shot tasks, scored after every model's perplexity (\"\": none)")
ap.add_argument("--limit", type=int, default=500, help="items per zero-shot task (0: all)")
ap.add_argument("--wiki-bytes", type=int, default=100_000, help="WikiText-2 test text scored (first N bytes)")
ap.add_argument("--calib", default=None, help="calibration text (default: the C4 demo documents)")
ap.add_argument("--calib-samples", type=int, default=32)
ap.add_argument("--calib-seq-len", type=int, default=512)
ap.add_argument("--grid-group", type=int, default=128, help="RTN and GPTQ: weights per scale and zero point")
ap.add_argument("--palette-args", default="--per-row-scale --group-size 16",
                help="palette layout of every k-means method and DKM")
ap.add_argument("--data", default=None,
                help="fine-tuning files for DKM, comma-separated: one mixture (default: the C4 demo documents)")
ap.add_argument("--train-tokens", type=int, default=16384, help="DKM: tokens seen (steps = tokens / (batch * seq-len))")
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--train-args", default="", help="more edkm compress flags (e.g. --device cuda)")
ap.add_argument("--threads", type=int, default=0, help="-t for every command (0: all cores)")
args = ap.parse_args()
calib = args.calib or os.path.join(args.assets, "calib", "c4_demo_300.jsonl")
data = args.data.split(",") if args.data else [calib]
os.makedirs(os.path.join(args.out, "models"), exist_ok=True)
os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
threads = ["-t", str(args.threads)] if args.threads else []


def run(cmd, log):
    """Runs an edkm command, its stderr to `log`; returns its stdout (JSON) parsed."""
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}); see {log}")
    return json.loads(p.stdout) if p.stdout.strip() else {}


def wiki_slice():
    path = os.path.join(args.out, f"wiki.test.{args.wiki_bytes}.raw")
    if not os.path.exists(path):
        with open(os.path.join(args.assets, "eval", "wikitext2", "wiki.test.raw"), "rb") as f:
            text = f.read(args.wiki_bytes)
        text = text[: text.rfind(b"\n") + 1]  # whole lines
        with open(path, "wb") as f:
            f.write(text)
    return path


def compress_model(method, bits, name):
    """Makes the model file; returns (path, how it was made)."""
    path = os.path.join(args.out, "models", name + ".edkm")
    meta = os.path.join(args.out, "models", name + ".json")
    if os.path.exists(path) and os.path.exists(meta):
        return path, json.load(open(meta))
    log = os.path.join(args.out, "models", name + ".log")
    base = [args.edkm]
    if method in ("rtn", "gptq", "kmeans", "optimal", "skm"):
        ptq = {"rtn": "rtn", "gptq": "gptq", "kmeans": "kmeans", "optimal": "kmeans", "skm": "sensitive-kmeans"}[method]
        cmd = base + ["quantize", *threads, "--json", "-m", args.model, "-o", path, "--bits", str(bits), "--method", ptq]
        if method in ("rtn", "gptq"):
            cmd += ["--rtn-group" if method == "rtn" else "--gptq-group", str(args.grid_group)]
        else:
            cmd += args.palette_args.split() + ["--palette-init", "kmeans++" if method == "kmeans" else "optimal"]
        if method in ("gptq", "skm"):
            cmd += ["--calib", calib, "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
        r = run(cmd, log)
        how = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "bits_per_weight": r["bits_per_weight"],
               "calib_tokens": r["calib_tokens"], "tokens_seen": 0}
    else:
        steps = max(1, args.train_tokens // (args.batch * args.seq_len))
        data_flags = [flag for d in data for flag in ("-d", d)]
        cmd = base + ["compress", *threads, "--json", "-q", "-m", args.model, *data_flags, "-o", path, "--bits", str(bits),
                      "--steps", str(steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                      "--lr", str(args.lr), "--warmup", str(max(1, steps // 10)), "--val-fraction", "0.02",
                      "--palette-init", "optimal", "--overwrite", *args.palette_args.split(), *args.train_args.split()]
        cmd += ["--method", {"dkm": "dkm", "dkm-distill": "dkm", "hard-kmeans": "hard-kmeans", "qat": "qat",
                             "dkm-unweighted": "dkm", "hard-kmeans-unweighted": "hard-kmeans"}[method]]
        if method != "qat":  # start from the sensitivity-weighted palettes (the skm baseline)
            cmd += ["--sensitive-init", calib, "--calib-samples", str(args.calib_samples),
                    "--calib-seq-len", str(args.calib_seq_len)]
        if method == "dkm-distill":
            cmd += ["--distill"]
        if method.endswith("-unweighted"):
            cmd += ["--no-sensitive-updates"]
        r = run(cmd, log)
        how = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_bytes"] / 2**20,
               "bits_per_weight": r["size"]["clustered_bits_per_weight"], "calib_tokens": 0,
               "tokens_seen": r["tokens_seen"], "steps": r["steps"], "tokens_per_second": r["tokens_per_second"],
               "val_loss": r["val_loss"]}
    json.dump(how, open(meta, "w"), indent=2)
    return path, how


def main():
    wiki = wiki_slice()
    plan = [("fp32", 16)] if "fp32" in args.methods.split(",") else []
    for bits in [int(b) for b in args.bits.split(",")]:
        for method in args.methods.split(","):
            if method != "fp32":
                plan.append((method, bits))
    tasks = [t for t in args.tasks.split(",") if t]
    # Perplexity of every model first (minutes each), then zero-shot accuracy (tens of minutes
    # each): a result file gains each part once.
    for phase in ("perplexity", "zero-shot"):
        for method, bits in plan:
            if phase == "zero-shot" and not tasks:
                break
            name = "fp32" if method == "fp32" else f"{method}-{bits}bit"
            result_path = os.path.join(args.out, "results", name + ".json")
            res = json.load(open(result_path)) if os.path.exists(result_path) else None
            if phase == "zero-shot" and res and res.get("settings", {}).get("limit") == args.limit \
                    and all(t in res.get("tasks", {}) for t in tasks):
                continue
            if phase == "perplexity" and res:
                continue
            t0 = time.time()
            if method == "fp32":
                model, how = args.model, {"seconds": 0, "peak_rss_mb": None, "bits_per_weight": 16.0,
                                          "calib_tokens": 0, "tokens_seen": 0}
            else:
                model, how = compress_model(method, bits, name)
            log = os.path.join(args.out, "results", name + ".log")
            if phase == "perplexity":
                ppl = run([args.edkm, "perplexity", *threads, "--json", "-q", "-m", model, "--text", wiki,
                           "--context", "512", "--stride", "512"], log)
                res = {"model": model, "label": name, "method": method, "tasks": {}, "perplexity": {
                    "wikitext2": {"token_perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
                                  "bytes": args.wiki_bytes, "context": 512, "stride": 512}}}
                print(f"{name}: wikitext2 ppl {ppl['perplexity']:.3f}, {how['bits_per_weight']:.3f} bits/weight "
                      f"({time.time() - t0:.0f} s)", flush=True)
            else:
                ev = run([args.edkm, "eval", *threads, "--json", "-q", "-m", model, "--tasks", ",".join(tasks),
                          "--limit", str(args.limit), "--label", name, "--method", method], log)
                res["tasks"], res["settings"] = ev["tasks"], ev["settings"]
                print(f"{name}: zero-shot done ({time.time() - t0:.0f} s)", flush=True)
            res["bits_per_weight"] = how["bits_per_weight"]
            res["bits"] = bits
            res["compression"] = how
            json.dump(res, open(result_path, "w"), indent=2)


main()
