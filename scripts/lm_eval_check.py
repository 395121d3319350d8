#!/usr/bin/env python3
"""Checks `edkm eval` against lm-evaluation-harness itself, item by item.

The harness (PyPI `lm-eval`) builds the requests from its own task configs and scores them with
its own code; the model is the `edkm export`ed Hugging Face directory run by `transformers`, so
neither the requests, the model nor the scoring of the reference comes from edkm. The tasks' data
are the shared assets, converted to the Hugging Face dataset schemas the harness's configs expect
(the machines here have no hub access); the harness's own task configs are `include`d, with only
the dataset swapped. The tokenizer is stories260K's llama2.c tokenizer, reimplemented below from
llama2.c's run.c (encode: dummy-prefix space, code points with byte fallback, merges by score);
edkm prepends BOS, so the harness runs with add_bos_token semantics (tok_encode adds BOS).

    python3 scripts/lm_eval_check.py --edkm build/edkm --limit 200 --out /tmp/lmeval

Needs lm-eval, transformers and torch (a virtual environment outside the repository). Prints a
JSON summary: per task, items compared, identical predictions (acc and acc_norm), disagreements
at near-ties (the top two within 1e-5, where float rounding may pick either), the largest
difference of a log-likelihood, and both accuracies. Exit 1 if any other prediction differs.
"""
import argparse
import bz2
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "copa"]


class Llama2cTokenizer:
    """llama2.c's tokenizer.bin and run.c's encode(), with BOS."""

    def __init__(self, path, vocab_size):
        self.pieces, self.scores = [], []
        with open(path, "rb") as f:
            f.read(4)  # max_token_length
            for _ in range(vocab_size):
                score, n = struct.unpack("<fi", f.read(8))
                self.pieces.append(f.read(n))
                self.scores.append(score)
        self.lookup = {p: i for i, p in enumerate(self.pieces)}

    def encode(self, text):
        tokens = []
        if text:
            tokens.append(self.lookup[b" "])
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.lookup:
                tokens.append(self.lookup[b])
            else:
                tokens.extend(x + 3 for x in b)  # byte fallback: <0x00> is token 3
        while True:
            best, best_score = -1, -1e10
            for i in range(len(tokens) - 1):
                merged = self.pieces[tokens[i]] + self.pieces[tokens[i + 1]]
                j = self.lookup.get(merged)
                if j is not None and self.scores[j] > best_score:
                    best, best_score = i, self.scores[j]
            if best < 0:
                break
            merged = self.lookup[self.pieces[tokens[best]] + self.pieces[tokens[best + 1]]]
            tokens[best : best + 2] = [merged]
        return [1] + tokens


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def convert_assets(assets, out):
    """The shared files in the schemas of the harness's datasets; returns {task: jsonl path}."""
    e = os.path.join(assets, "eval")
    paths = {}

    def lines(p):
        with open(p) as f:
            return [json.loads(l) for l in f if l.strip()]

    piqa = lines(f"{e}/piqa/valid.jsonl")
    with open(f"{e}/piqa/valid-labels.lst") as f:
        labels = [int(l) for l in f if l.strip()]
    paths["piqa"] = [dict(goal=d["goal"], sol1=d["sol1"], sol2=d["sol2"], label=l) for d, l in zip(piqa, labels)]
    for task, name in [("arc_easy", "ARC-Easy-Test"), ("arc_challenge", "ARC-Challenge-Dev")]:
        rows = []
        for d in lines(f"{e}/arc/{name}.jsonl"):
            q = d["question"]
            rows.append(dict(id=d["id"], question=q["stem"], answerKey=d["answerKey"],
                             choices=dict(text=[c["text"] for c in q["choices"]], label=[c["label"] for c in q["choices"]])))
        paths[task] = rows
    # HellaSwag as llama.cpp's 6-line text: the context line is "activity_label: ctx" with ctx_b
    # already joined (and not capitalised), so it goes in as ctx_a with an empty ctx_b.
    with bz2.open(f"{e}/hellaswag/hellaswag_val_full.txt.bz2", "rt") as f:
        t = [l.rstrip("\n") for l in f]
    rows = []
    for i in range(0, len(t) - 5, 6):
        label, _, ctx = t[i].partition(": ")
        rows.append(dict(activity_label=label, ctx_a=ctx, ctx_b="", label=t[i + 1].strip(), endings=t[i + 2 : i + 6]))
    paths["hellaswag"] = rows
    paths["winogrande"] = [dict(sentence=d["sentence"], option1=d["option1"], option2=d["option2"], answer=str(d["answer"]))
                           for d in lines(f"{e}/winogrande/dev.jsonl")]
    paths["boolq"] = [dict(question=d["question"], passage=d["passage"], label=int(str(d["label"]).lower() in ("1", "true")))
                      for d in lines(f"{e}/boolq/val.jsonl")]
    paths["copa"] = lines(f"{e}/copa/val.jsonl")
    files = {}
    for task, rows in paths.items():
        files[task] = os.path.join(out, f"{task}.jsonl")
        write_jsonl(files[task], rows)
    return files


def task_yamls(files, out):
    """One config per task: the harness's own, with the converted file as its validation split."""
    import lm_eval.tasks

    root = os.path.dirname(lm_eval.tasks.__file__)
    builtin = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
               "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
               "boolq": "super_glue/boolq/default.yaml", "copa": "super_glue/copa/default.yaml"}
    d = os.path.join(out, "tasks")
    os.makedirs(d, exist_ok=True)
    for task, path in files.items():
        with open(os.path.join(d, f"check_{task}.yaml"), "w") as f:
            f.write(f"include: {os.path.join(root, builtin[task])}\n"
                    f"task: check_{task}\ntag: []\ndataset_path: json\ndataset_name: null\n"
                    f"dataset_kwargs:\n  data_files:\n    validation: {path}\n"
                    "training_split: null\ntest_split: null\nvalidation_split: validation\n")
    return d


def make_lm(model_dir, tok):
    import torch
    import transformers
    from lm_eval.api.model import TemplateLM

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    max_len = model.config.max_position_embeddings

    class ExportedModel(TemplateLM):
        backend = "causal"

        @property
        def eot_token_id(self):
            return 2

        def tok_encode(self, string, **kwargs):
            return tok.encode(string)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            out = []
            with torch.no_grad():
                for _, context_enc, continuation_enc in requests:
                    # context_enc starts with BOS (tok_encode's); the harness keeps the last max_len inputs.
                    whole = (context_enc + continuation_enc)[-(max_len + 1):]
                    x = torch.tensor([whole[:-1]])
                    logp = torch.log_softmax(model(x).logits[0].double(), -1)
                    n = len(continuation_enc)
                    tgt = torch.tensor(whole[-n:])
                    sel = logp[-n:]
                    ll = sel.gather(1, tgt[:, None]).sum().item()
                    out.append((ll, bool((sel.argmax(-1) == tgt).all())))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return ExportedModel()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edkm", default="build/edkm")
    ap.add_argument("--assets", default=os.path.join(os.path.dirname(__file__), "../../shared/assets"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="lmeval-check-"))
    a = ap.parse_args()
    tasks = a.tasks.split(",")
    os.makedirs(a.out, exist_ok=True)
    stories = os.path.join(a.assets, "models/stories260K/stories260K.bin")
    packed, hf = os.path.join(a.out, "q3.edkm"), os.path.join(a.out, "hf")
    run = lambda *cmd: subprocess.run(cmd, check=True)
    # An edkm compressed model (3-bit k-means palettes) exported as an ordinary HF directory.
    run(a.edkm, "quantize", "--bits", "3", "-m", stories, "-o", packed)
    run(a.edkm, "export", packed, "--dtype", "fp32", "-o", hf)
    samples = os.path.join(a.out, "edkm_samples.jsonl")
    run(a.edkm, "eval", "-q", "-m", hf, "--assets", a.assets, "--tasks", ",".join(tasks), "--limit", str(a.limit),
        "--log-samples", samples, "-o", os.path.join(a.out, "edkm_results.json"))
    ours = {}
    with open(samples) as f:
        for l in f:
            s = json.loads(l)
            ours[(s["task"], s["doc_id"])] = s

    import lm_eval
    from lm_eval.tasks import TaskManager

    tok = Llama2cTokenizer(os.path.join(hf, "tokenizer.bin"), 512)
    tm = TaskManager(include_path=task_yamls(convert_assets(a.assets, a.out), a.out))
    res = lm_eval.simple_evaluate(model=make_lm(hf, tok), tasks=[f"check_{t}" for t in tasks], limit=a.limit,
                                  log_samples=True, task_manager=tm, num_fewshot=0)

    summary = {}
    for t in tasks:
        rows = res["samples"][f"check_{t}"]
        n = same = same_norm = ties = 0
        max_diff = 0.0
        for s in rows:
            mine = ours[(t, s["doc_id"])]
            ref_ll = [float(r[0]) for r in s["filtered_resps"]]
            my_ll = [r[0] for r in mine["filtered_resps"]]
            max_diff = max(max_diff, max(abs(x - y) for x, y in zip(ref_ll, my_ll)))
            n += 1
            top = sorted(ref_ll, reverse=True)
            tie = len(top) > 1 and top[0] - top[1] < 1e-5
            ref_pred = max(range(len(ref_ll)), key=lambda i: (ref_ll[i], -i))
            same += ref_pred == mine["pred"]
            ties += tie and ref_pred != mine["pred"]
            if "acc_norm" in s:
                # The harness's acc_norm prediction: its log-likelihoods over len(choice), the
                # choice being its continuation less the " " target delimiter.
                conts = [args[1] for args in s["arguments"]]  # (context, continuation) per choice
                normed = [ll / len(c[1:]) for ll, c in zip(ref_ll, conts)]
                ref_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
                top = sorted(normed, reverse=True)
                tie_norm = top[0] - top[1] < 1e-5
                same_norm += ref_norm == mine["pred_norm"]
                ties += tie_norm and ref_norm != mine["pred_norm"]
        summary[t] = {"items": n, "same_pred": same, "disagree_near_tie": ties,
                      "same_pred_norm": same_norm if "acc_norm" in rows[0] else None, "max_abs_ll_diff": max_diff,
                      "acc_lm_eval": res["results"][f"check_{t}"].get("acc,none"),
                      "acc_edkm": json.load(open(os.path.join(a.out, "edkm_results.json")))["tasks"][t]["acc"]}
    print(json.dumps(summary, indent=2))
    bad = [t for t, v in summary.items() if v["same_pred"] + v["disagree_near_tie"] < v["items"]
           or (v["same_pred_norm"] is not None and v["same_pred_norm"] + v["disagree_near_tie"] < v["items"])]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
