#!/usr/bin/env python3
"""Times two edkm binaries side by side: `edkm bench dkm` and `edkm bench lut`, run alternately
(old, new, new, old, ...) so that a machine whose speed drifts during the run favours neither,
then prints, for every row of each benchmark, the best time of each binary and their ratio.

    scripts/compare_binaries.py OLD_EDKM NEW_EDKM [--pairs 3] [--json out.json]

Used to show that a refactoring leaves performance alone (BENCHMARKS.md). Needs only python3."""
import argparse
import json
import subprocess
import sys

BENCHES = {
    "dkm": ["bench", "dkm", "--json", "--reps", "5", "--dense-slice", "65536"],
    "lut": ["bench", "lut", "--json", "--reps", "50", "--tokens", "20"],
}


def rows(bench, result):
    """(row name, seconds) of one benchmark's JSON."""
    if bench == "dkm":
        for r in result["rows"]:
            yield f'{r["method"]} {r["scope"]}', r["seconds"]
        for p in result["passes"]:
            yield f'pass {p["matrix"]} {p["pass"]}', p["seconds"]
    else:
        for r in result["rows"]:
            yield f'{r["workload"]} {r["storage"]}', r["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the table as JSON here")
    a = ap.parse_args()
    best = {}  # (bench, row) -> {"old": s, "new": s}
    for i in range(a.pairs):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for bench, args in BENCHES.items():
            for which in order:
                exe = a.old if which == "old" else a.new
                out = subprocess.run([exe, "-t", str(a.threads)] + args, check=True, capture_output=True, text=True)
                for name, s in rows(bench, json.loads(out.stdout)):
                    cell = best.setdefault((bench, name), {})
                    cell[which] = min(s, cell.get(which, float("inf")))
                print(f"pair {i + 1}/{a.pairs}: {bench} {which} done", file=sys.stderr, flush=True)
    table = []
    print(f"{'benchmark':<6} {'row':<46} {'old ms':>10} {'new ms':>10} {'new/old':>8}")
    for (bench, name), t in best.items():
        ratio = t["new"] / t["old"]
        table.append({"benchmark": bench, "row": name, "old_s": t["old"], "new_s": t["new"], "ratio": ratio})
        print(f"{bench:<6} {name:<46} {1e3 * t['old']:>10.2f} {1e3 * t['new']:>10.2f} {ratio:>8.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"pairs": a.pairs, "threads": a.threads, "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
