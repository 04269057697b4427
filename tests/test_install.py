"""What the install promises: a pinned tested set, a quick command line, the current transformers API."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import torch

import amphista

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "matplotlib", "accelerate", "safetensors")


def _loaded_after(code: str) -> dict:
    """Top-level packages and amphista modules loaded by `code` in a fresh interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "heavy": sorted({m.split(".")[0] for m in modules} & set(HEAVY)),
        "amphista": sorted(m for m in modules if m.startswith("amphista.")),
    }


def test_import_amphista_loads_nothing_heavy():
    loaded = _loaded_after("import amphista")
    assert loaded["heavy"] == []
    assert not [m for m in loaded["amphista"] if m.startswith(("amphista.bench", "amphista.training", "amphista.serve"))]


def test_help_of_every_command_loads_neither_torch_nor_transformers():
    from amphista.cli import build_parser

    commands = sorted(build_parser()._subparsers._group_actions[0].choices)
    assert {"bench", "demo", "generate", "serve", "train", "distill"} <= set(commands)
    code = "import contextlib, io\nfrom amphista.cli import main\n"
    for argv in [[], *([c] for c in commands)]:
        code += "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        code += f"    main({argv + ['--help']!r})\n"
    assert _loaded_after(code)["heavy"] == []


def test_lazy_names_still_reachable():
    # In a fresh interpreter: this process has imported everything already.
    code = (
        "import amphista\n"
        "assert amphista.bench.BenchConfig.__name__ == 'BenchConfig'\n"
        "assert amphista.training.TrainConfig.__name__ == 'TrainConfig'\n"
        "assert amphista.SpeculativeDecoder.__module__ == 'amphista.decoder'\n"
        "assert amphista.serve.create_app.__name__ == 'create_app'\n"
        "from amphista import InputError, TargetModel, build_tree\n"
    )
    _loaded_after(code)
    for name in amphista.__all__:
        assert getattr(amphista, name) is not None
    assert set(amphista.__all__) <= set(dir(amphista))
    try:
        amphista.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")


def _names(requirements) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_constraints_pin_every_dependency_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= _names(r for r in extra if not r.startswith("amphista"))
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    assert wanted - set(pins) == set(), "dependencies without a pin in constraints.txt"
    for req in project["dependencies"]:  # honest ranges: lower bounds only, and the pin satisfies them
        assert "<" not in req and ">=" in req, req


def test_greedy_decode_on_bundled_model_warns_nothing_and_equals_plain_decoding():
    target = amphista.load_default_target()
    drafter = amphista.load_default_drafter("amphista", target)
    input_ids = target.tokenizer("Once upon a time", return_tensors="pt").input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated call into transformers or torch fails here
        out = amphista.SpeculativeDecoder(target, drafter, tree="mc_sim_7b_63").generate(
            input_ids, max_new_tokens=48, temperature=0.0
        )
    ref = target.model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=48
    )
    assert out.sequences.shape[1] > input_ids.shape[1] + 8 and out.sequences.equal(ref)
