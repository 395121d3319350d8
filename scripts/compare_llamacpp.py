#!/usr/bin/env python3
"""SmolLM2-135M-Instruct (the Q4_1 GGUF from scripts/get-models.sh) in edkm against llama.cpp on
the same file, for BENCHMARKS.md:

  1. every tensor edkm dequantizes is bit-identical to the `gguf` package's dequantization
     (edkm convert's fp32 model.safetensors; llama q/k rows interleaved back as in the file);
  2. next-token logits on a few prompts: llama.cpp (llama-cpp-python, logits_all, fp32 KV cache)
     against the model edkm read (transformers on edkm convert's directory, whose forward pass
     the test suite checks against edkm's to ~1e-6), max relative error over the vocabulary.
     llama.cpp runs on an F32 copy of the file made with the gguf package (on the Q4_1 file
     itself it quantizes activations to 8 bits for its integer dot products: that error is
     reported too);
  3. the greedy continuation of prompts, 64 tokens, `edkm generate --temperature 0` against
     llama.cpp's greedy sampling on the F32 copy;
  4. WikiText-2 perplexity on the first --wiki-bytes of the shared wiki.test.raw: disjoint windows
     of 512 tokens, each scoring its tokens after the first (edkm perplexity --context 512, and
     the same windows evaluated by llama.cpp on the F32 copy here);
  5. generation speed on the same cores, alternating rounds: edkm fp32, bf16, and the 4- and 3-bit
     LUT runtime after `edkm quantize`, against llama.cpp on the GGUF; and training tokens/s of
     `edkm compress` with and without DKM.

    ~/venv-ref/bin/pip install gguf llama-cpp-python transformers torch
    ~/venv-ref/bin/python scripts/compare_llamacpp.py [--edkm build/edkm] [--threads 2]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ap = argparse.ArgumentParser()
ap.add_argument("--edkm", default=os.path.join(ROOT, "build", "edkm"))
ap.add_argument("--gguf", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--assets", default=os.path.join(ROOT, "..", "shared", "assets"))
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--wiki-bytes", type=int, default=100000)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--skip", default="", help="comma-separated steps to skip: tensors,logits,greedy,ppl,speed")
ARGS = ap.parse_args()
SKIP = set(filter(None, ARGS.skip.split(",")))
PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl who",
           "To make a cup of tea, you first", "def fibonacci(n):"]
RESULTS = {}


def edkm(*args, json_out=False):
    r = subprocess.run([ARGS.edkm, "-t", str(ARGS.threads), *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"edkm {' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout) if json_out else r


def llama(path, **kw):
    """llama.cpp on `path`; its KV cache in fp32 (its default is fp16) for the accuracy checks."""
    import llama_cpp
    return llama_cpp.Llama(model_path=path, n_threads=ARGS.threads, n_threads_batch=ARGS.threads, verbose=False,
                           **kw)


def f32_copy(path):
    """The GGUF with every tensor dequantized to F32 by the gguf package (the same metadata):
    llama.cpp multiplies Q4_1 weights by activations it first quantizes to 8 bits (ggml's
    vec_dot_q4_1_q8_1), so only on this copy does it compute the fp32 model that edkm reads."""
    import gguf
    reader = gguf.GGUFReader(ARGS.gguf)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch=arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), vtype)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape(tuple(reversed(t.shape.tolist()))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


F32 = dict(type_k=0, type_v=0)  # GGML_TYPE_F32


def permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_tensors(hf_dir):
    import gguf
    from safetensors.numpy import load_file
    ours = load_file(os.path.join(hf_dir, "model.safetensors"))
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    leaves = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    reader = gguf.GGUFReader(ARGS.gguf)
    identical, types = 0, {}
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if t.name in names:
            name = names[t.name]
        else:
            _, layer, leaf, kind = t.name.split(".")
            name = f"model.layers.{layer}.{leaves[leaf]}.{kind}"
        w = ours[name]
        if ".q_proj." in name:
            w = permute(w, cfg["num_attention_heads"])
        if ".k_proj." in name:
            w = permute(w, cfg["num_key_value_heads"])
        same = w.shape == ref.shape and np.array_equal(w.view(np.uint32), ref.view(np.uint32))
        identical += same
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if not same:
            print(f"  {t.name} ({t.tensor_type.name}) differs", file=sys.stderr)
    RESULTS["tensors"] = {"identical": identical, "total": len(reader.tensors), "types": types}
    print(f"tensors: {identical}/{len(reader.tensors)} bit-identical to gguf's dequantization ({types})")


def check_logits(hf_dir, f32_gguf):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for label, path in (("F32 copy", f32_gguf), ("Q4_1 file", ARGS.gguf)):
        llm = llama(path, n_ctx=512, logits_all=True, **F32)
        RESULTS[f"logits_max_rel_err ({label})"] = logits_against(model, llm, label)


def logits_against(model, llm, label):
    worst = 0.0
    for p in PROMPTS:
        ids = llm.tokenize(p.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].float()
        err = ((ours - theirs).abs().amax(-1) / theirs.abs().amax(-1)).max().item()
        worst = max(worst, err)
        print(f"logits, llama.cpp on the {label}: '{p}' ({len(ids)} tokens): max relative error {err:.2e}")
    return worst


def check_greedy(f32_gguf):
    llm = llama(f32_gguf, n_ctx=512, **F32)
    same = 0
    for p in PROMPTS:
        theirs = llm.create_completion(p, max_tokens=64, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0)["choices"][0]["text"]
        ours = edkm("generate", "-m", ARGS.gguf, "--prompt", p, "-n", "64", "--temperature", "0").stdout
        ours = ours[len(p):] if ours.startswith(p) else ours
        ok = ours.rstrip("\n") == theirs.rstrip("\n")
        same += ok
        print(f"greedy '{p}': {'identical' if ok else 'DIFFERENT'}\n  edkm:      {ours[:120]!r}\n  llama.cpp: {theirs[:120]!r}")
    RESULTS["greedy_identical"] = f"{same}/{len(PROMPTS)}"


def check_perplexity(tmp, f32_gguf):
    with open(os.path.join(ARGS.assets, "eval/wikitext2/wiki.test.raw"), "rb") as f:
        data = f.read(ARGS.wiki_bytes)
    text = data[:data.rfind(b"\n") + 1].decode("utf-8")
    path = os.path.join(tmp, "wiki.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    ours = edkm("perplexity", "-m", ARGS.gguf, "--text", path, "--context", "512", "--json", "-q", json_out=True)
    llm = llama(f32_gguf, n_ctx=512, logits_all=True, **F32)
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    nll, n = 0.0, 0
    for begin in range(0, len(ids) - 1, 512):
        win = ids[begin:begin + 512]
        if len(win) < 2:
            break
        llm.reset()
        llm.eval(win)
        logits = torch.tensor(np.array(llm.scores[:len(win)]), dtype=torch.float64)
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(win[1:]), reduction="sum").item()
        n += len(win) - 1
    theirs = float(np.exp(nll / n))
    rel = abs(ours["perplexity"] - theirs) / theirs
    RESULTS["perplexity"] = {"edkm": ours["perplexity"], "llama.cpp": theirs, "rel": rel, "tokens_edkm": ours["tokens"],
                             "tokens_llama.cpp": n, "bytes": len(text.encode())}
    print(f"perplexity (first {len(text.encode())} bytes of wiki.test.raw, disjoint 512-token windows): edkm "
          f"{ours['perplexity']:.4f} over {ours['tokens']} tokens, llama.cpp {theirs:.4f} over {n} tokens "
          f"(relative difference {rel:.2e})")


def edkm_tokens_per_second(model, extra=()):
    r = edkm("generate", "-m", model, "--prompt", PROMPTS[1], "-n", "64", "--temperature", "0", *extra)
    m = re.search(r"([0-9.]+) tokens/s", r.stderr)
    return float(m.group(1))


def llamacpp_tokens_per_second(llm):
    t_first = None
    n = 0
    for chunk in llm.create_completion(PROMPTS[1], max_tokens=64, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                       stream=True):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t_first)


def speed(tmp):
    q4, q3 = os.path.join(tmp, "q4.edkm"), os.path.join(tmp, "q3.edkm")
    edkm("quantize", "-m", ARGS.gguf, "--bits", "4", "-o", q4)
    edkm("quantize", "-m", ARGS.gguf, "--bits", "3", "-o", q3)
    llm = llama(ARGS.gguf, n_ctx=512)
    runs = {"edkm fp32": lambda: edkm_tokens_per_second(ARGS.gguf),
            "edkm bf16": lambda: edkm_tokens_per_second(ARGS.gguf, ("--dtype", "bf16")),
            "edkm 4-bit LUT": lambda: edkm_tokens_per_second(q4),
            "edkm 3-bit LUT": lambda: edkm_tokens_per_second(q3),
            "llama.cpp Q4_1": lambda: llamacpp_tokens_per_second(llm)}
    best = {k: 0.0 for k in runs}
    for _ in range(ARGS.rounds):  # alternate, keep each method's best round
        for k, f in runs.items():
            best[k] = max(best[k], f())
    for k, v in best.items():
        print(f"generation: {k}: {v:.1f} tokens/s ({v / best['llama.cpp Q4_1']:.2f}x llama.cpp)")
    data = os.path.join(tmp, "train.txt")
    with open(os.path.join(ARGS.assets, "eval/tinystories/val_a.txt"), encoding="utf-8") as f:
        open(data, "w", encoding="utf-8").write(f.read(60000))
    train = {}
    for label, extra in (("compress (DKM, 3 bits)", ()), ("fine-tuning without DKM", ("--no-cluster",))):
        r = edkm("compress", "-m", ARGS.gguf, "-d", data, "-o", os.path.join(tmp, "c.edkm"), "--steps", "4",
                 "--seq-len", "256", "--batch", "4", "--val-fraction", "0.05", "-q", "--json", *extra, json_out=True)
        train[label] = r["train"]["tokens_per_second"] if "train" in r else r["tokens_per_second"]
        print(f"training: {label}: {train[label]:.0f} tokens/s")
    RESULTS["generation_tokens_per_second"] = best
    RESULTS["training_tokens_per_second"] = train


def main():
    if not os.path.exists(ARGS.gguf):
        sys.exit(f"{ARGS.gguf}: not found; run scripts/get-models.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        edkm("convert", "-m", ARGS.gguf, "-o", hf_dir, "--dtype", "fp32")
        f32_gguf = f32_copy(os.path.join(tmp, "f32.gguf"))
        if "tensors" not in SKIP:
            check_tensors(hf_dir)
        if "logits" not in SKIP:
            check_logits(hf_dir, f32_gguf)
        if "greedy" not in SKIP:
            check_greedy(f32_gguf)
        if "ppl" not in SKIP:
            check_perplexity(tmp, f32_gguf)
        if "speed" not in SKIP:
            speed(tmp)
    import llama_cpp
    RESULTS["versions"] = {"llama_cpp_python": llama_cpp.__version__, "threads": ARGS.threads}
    print(json.dumps(RESULTS, indent=1))


main()
