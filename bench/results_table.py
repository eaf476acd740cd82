"""Turn pytest-benchmark's JSON into the markdown tables of bench/README.md.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/results_table.py bench.json

GFLOP/s is ``extra_info["flops"]`` (each benchmark's dense-equivalent count) over the
median time. Ratios are of medians measured side by side in the same benchmark (a partner
step before every timed round), never across benchmarks.
"""

from __future__ import annotations

import json
import sys


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def tables(path: str) -> str:
    data = json.load(open(path))
    rows = data["benchmarks"]
    first = next((b["extra_info"] for b in rows if "cpu" in b["extra_info"]), {})
    dates = sorted(b["extra_info"]["date"] for b in rows if "date" in b["extra_info"])
    span = f"{dates[0]} to {dates[-1][11:]} (local time)" if dates else "?"
    head = [f"Machine: {first.get('cpu', '?')} ({first.get('cpus', '?')} cores), torch {first.get('torch', '?')}, "
            f"{first.get('torch_threads', '?')} intra-op threads by default; measured {span}."]
    ops = [b for b in rows if b["name"].startswith(("test_encode", "test_decode", "test_orth"))]
    steps = [b for b in rows if b["name"].startswith("test_train_step")]
    races = [b for b in rows if b["name"].startswith("test_race")]
    out = head
    if ops:
        out += ["", "| op [device-provider-case-mode] | median ms | GFLOP/s (dense-equiv.) | L0 |",
                "|---|---:|---:|---:|"]
        for b in ops:
            e, t = b["extra_info"], b["stats"]["median"]
            l0 = f"{e['l0']:.1f}" if "l0" in e else ""
            op = b["name"].split("[")[0][len("test_"):]
            out.append(f"| {op} [{b['param']}] | {_ms(t)} | {e['flops'] / t / 1e9:,.1f} | {l0} |")
    if steps:
        out += ["", "| step [case-variant] | median ms | tokens/s | phases ms (fwd / bwd / opt) | L0 | partner | "
                "partner ms | partner / ours | load |", "|---|---:|---:|---|---|---|---:|---:|---:|"]
        for b in steps:
            e, t = b["extra_info"], b["stats"]["median"]
            ph = " / ".join(f"{e['phases_ms'].get(k, 0):,.0f}" for k in ("forward", "backward", "optimizer"))
            l0 = " + ".join(f"{v:.0f}" for v in e["l0"])
            out.append(f"| {b['param']} | {_ms(t)} | {1024 / t:,.0f} | {ph} | {l0} | {e['partner']} | "
                       f"{_ms(e['partner_s'])} | {e['partner_s'] / t:.2f} | {e['load_1min']} |")
    if races:
        out += ["", "| race [ours vs SAELens] | our Adam | threads | ours ms | SAELens ms | SAELens / ours | ours tokens/s | "
                "SAELens tokens/s | L0 ours / SAELens | penalty ms (share of ours) | load |",
                "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for b in races:
            e, t = b["extra_info"], b["stats"]["median"]
            l0 = " + ".join(f"{v:.0f}" for v in e["ours_l0"])
            pen = f"{_ms(e['orth_s'])} ({e['orth_share']:.0%})" if "orth_s" in e else ""
            adam = "fused" if e.get("our_adam_fused") else "trainer's"
            out.append(f"| {b['param']} | {adam} | {e['threads_both']} | {_ms(t)} | {_ms(e['saelens_s'])} | "
                       f"{e['saelens_s'] / t:.2f} | {1024 / t:,.0f} | {1024 / e['saelens_s']:,.0f} | "
                       f"{l0} / {e['saelens_l0']:.0f} | {pen} | {e['load_1min']} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1]))
