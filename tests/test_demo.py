"""`amphista demo`: JSON output in the results.json schema, the story, and the error without drafters."""

from __future__ import annotations

import json
import re

import pytest

import amphista
from amphista.bench import loading
from amphista.cli import main
from amphista.demo import demo_questions


@pytest.fixture(scope="module")
def drafter_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_drafters")
    target = amphista.load_default_target()
    amphista.MedusaDrafter.for_target(target).save_pretrained(root / "medusa")
    amphista.AmphistaDrafter.for_target(target).save_pretrained(root / "amphista")
    acc = {"top_k": [[0.6, 0.7, 0.75], [0.4, 0.5, 0.55], [0.3, 0.35, 0.4], [0.2, 0.25, 0.3]]}
    for name in ("medusa", "amphista"):  # the demo builds its trees from these
        (root / name / "head_accuracy.json").write_text(json.dumps(acc))
    return ["--drafter", f"medusa={root / 'medusa'}", "--drafter", f"amphista={root / 'amphista'}"]


def test_demo_json_has_the_results_schema(drafter_args, capsys):
    code = main(["demo", "--json", "--prompts", "2", "--max-new-tokens", "8", "--runs", "1", *drafter_args])
    out = capsys.readouterr().out
    results = json.loads(out)  # stdout holds the JSON and nothing else
    assert code == 0
    assert set(results["methods"]) == {"vanilla_loop", "vanilla_hf", "medusa", "amphista"}
    for m in results["methods"].values():
        for key in ("tokens_per_s", "speedup", "tau", "exact_match"):
            assert isinstance(m[key], float)
        assert m["exact_match"] == 1.0 and isinstance(m["categories"], dict)
    assert {"torch", "transformers", "cpu"} <= set(results["environment"])
    story = results["story"]
    assert story["method"] == "amphista" and story["equals_vanilla"] is True
    assert story["new_tokens"] == 8 and story["text"]
    tree = results["methods"]["amphista"]["tree"]  # the cost model's choice for one row on this machine
    assert tree["source"] == "auto" and 2 <= tree["num_nodes"] <= 64


def test_demo_table(drafter_args, capsys):
    assert main(["demo", "--prompts", "1", "--max-new-tokens", "6", "--runs", "1", *drafter_args]) == 0
    out = capsys.readouterr().out
    assert (
        "| amphista |" in out and "| vanilla_loop (baseline) |" in out or "| vanilla_hf (baseline) |" in out
    )
    assert "identical to vanilla: True" in out
    assert re.search(r"tree nodes per step \(root included\): medusa: \d+ \(auto\), amphista: \d+ \(auto\)", out)


def test_demo_without_drafters_names_the_training_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "bundled_drafter_dir", lambda name: tmp_path / name)
    assert main(["demo", "--json"]) == 2
    assert loading.TRAIN_SCRIPT in capsys.readouterr().err


def test_demo_prompts_are_varied():
    qs = demo_questions(4)
    assert len({q.category for q in qs}) == 4 and all(len(q.turns) == 1 for q in qs)


def test_demo_with_a_target_uses_its_shipped_drafters_and_mt_bench(capsys):
    # The bundled model's folder given as --target resolves to the stories260K entry of the registry, so
    # the demo takes its shipped drafters by itself and answers MT-Bench first turns.
    target = str(amphista.bundled.default_target_path())
    code = main(["demo", "--json", "--target", target, "--prompts", "2", "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert code == 0
    assert "using the drafters shipped for stories260K: medusa, amphista" in captured.err
    results = json.loads(captured.out)
    assert set(results["methods"]) == {"vanilla_loop", "vanilla_hf", "medusa", "amphista"}
    assert results["settings"]["categories"] == ["writing", "roleplay"]
    assert results["settings"]["runs"] == 1  # the chat-sized default
    assert results["story"]["equals_vanilla"] is True
    assert results["story"]["prompt"].startswith("Compose an engaging travel blog post")
