"""PNG plots of a results dict (matplotlib, optional: without it the plots are skipped with a note)."""

from __future__ import annotations

import os
import sys


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "amphista bench: matplotlib is not installed, no plots (pip install 'amphista[bench]')",
            file=sys.stderr,
        )
        return None
    return plt


def write_plots(out: str, results: dict) -> list[str]:
    plt = _pyplot()
    if plt is None:
        return []
    written = [_speedup_by_category(plt, out, results), _accept_lengths(plt, out, results)]
    if results.get("tree_sweep"):
        written.append(_tree_sweep(plt, out, results))
    return [w for w in written if w]


def _speedup_by_category(plt, out, results) -> str:
    methods = results["methods"]
    cats = list(next(iter(methods.values()))["categories"]) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cats) + 2), 4))
    width = 0.8 / len(methods)
    for i, (name, m) in enumerate(methods.items()):
        vals = [m["categories"][c]["speedup"] for c in cats[:-1]] + [m["speedup"]]
        errs = [m["categories"][c].get("speedup_std") for c in cats[:-1]] + [m.get("speedup_std")]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, [v or 0 for v in vals], width, yerr=[e or 0 for e in errs], label=name, capsize=2)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(cats)), cats)
    ax.set_ylabel(f"speedup over vanilla ({results['vanilla']['baseline']})")
    ax.set_title("Speedup per category")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "speedup_by_category.png")


def _accept_lengths(plt, out, results) -> str:
    hists = {n: m["accept_length_hist"] for n, m in results["methods"].items() if m["kind"] != "vanilla"}
    if not hists:
        return ""
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max((int(k) for h in hists.values() for k in h), default=1)
    width = 0.8 / len(hists)
    for i, (name, h) in enumerate(hists.items()):
        total = sum(h.values()) or 1
        xs = [a + (i - (len(hists) - 1) / 2) * width for a in range(1, top + 1)]
        ax.bar(
            xs,
            [h.get(str(a), 0) / total for a in range(1, top + 1)],
            width,
            label=f"{name} (tau {results['methods'][name]['tau']:.2f})",
        )
    ax.set_xticks(range(1, top + 1))
    ax.set_xlabel("tokens committed per step (bonus included)")
    ax.set_ylabel("fraction of decode steps")
    ax.set_title("Accepted length per step")
    ax.legend(fontsize=8)
    return _save(plt, fig, out, "accept_lengths.png")


def _tree_sweep(plt, out, results) -> str:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entries in results["tree_sweep"].items():
        xs = [e["num_nodes"] for e in entries]
        a1.plot(xs, [e["speedup"] for e in entries], "o-", label=name)
        a2.plot(xs, [e["tau"] for e in entries], "o-", label=f"{name} measured")
        a2.plot(xs, [e["expected_tau"] for e in entries], "x--", label=f"{name} expected")
    for ax, label in ((a1, "speedup over vanilla"), (a2, "tau (tokens per step)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree nodes (tokens verified per step)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("Tree size sweep")
    return _save(plt, fig, out, "tree_sweep.png")


def _save(plt, fig, out, name) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=120)
    plt.close(fig)
    return name
