"""amphista.bench on the bundled model: schema, answer files, exactness, multi-turn, errors, trees, sweep.

No timing is asserted: the numbers only have to exist and be well formed.
"""

from __future__ import annotations

import copy
import json

import pytest

import amphista
from amphista.bench import BenchConfig, benchmark, load_questions, loading, run_benchmark
from amphista.bench.methods import Settings, TurnOutput
from amphista.bench.questions import PLAIN_TURN_SEPARATOR, answer_text, turn_prompt
from amphista.bench.stats import Record, exactness
from amphista.cli import main
from amphista.drafters import RandomDrafter
from amphista.errors import CheckpointError, DrafterMismatchError, InputError

QUESTIONS = [
    {"question_id": 1, "category": "animals", "turns": ["Once upon a time, there was a little dog."]},
    {"question_id": "two", "category": "magic", "turns": ["A fairy lived in a tree.", "The next day,"]},
]
METRICS = ("tokens_per_s", "speedup", "tau", "exact_match")
ACC = {"top_k": [[0.6, 0.7, 0.75], [0.4, 0.5, 0.55], [0.3, 0.35, 0.4], [0.2, 0.25, 0.3]]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def target():
    return amphista.load_default_target()


@pytest.fixture(scope="module")
def drafter_dirs(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    amphista.MedusaDrafter.for_target(target).save_pretrained(root / "medusa")
    amphista.AmphistaDrafter.for_target(target).save_pretrained(root / "amphista")
    (root / "medusa" / "head_accuracy.json").write_text(json.dumps(ACC))
    return {"medusa": str(root / "medusa"), "amphista": str(root / "amphista")}


def small(**kw) -> BenchConfig:
    base = dict(questions=QUESTIONS, max_new_tokens=8, runs=1, warmup=0, progress=False)
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(target, drafter_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cfg = small(target=target, drafters=drafter_dirs, runs=2, warmup=1, out=str(out), tree="chain")
    results, records = benchmark(cfg)
    return results, records, out


def test_results_json_schema(full_run):
    results, _, out = full_run
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["methods"]) == {"vanilla_loop", "vanilla_hf", "medusa", "amphista"}
    for name, m in on_disk["methods"].items():
        for key in METRICS:
            assert isinstance(m[key], float), (name, key)
        assert 0.0 <= m["exact_match"] <= 1.0
        assert m["exact_match"] == 1.0 and m["exact_mismatches"] == 0
        assert set(m["categories"]) == {"animals", "magic"}
        for cat in m["categories"].values():
            assert all(isinstance(cat[k], float) for k in METRICS)
        assert m["tokens_per_s_std"] is not None and m["steps"] > 0
    vanilla = on_disk["methods"]["vanilla_loop"]
    assert vanilla["tau"] == 1.0 and on_disk["methods"]["vanilla_hf"]["tau"] == 1.0
    assert on_disk["vanilla"]["baseline"] in ("vanilla_loop", "vanilla_hf")
    assert on_disk["methods"][on_disk["vanilla"]["baseline"]]["speedup"] == pytest.approx(1.0)
    assert on_disk["methods"]["medusa"]["tree"] == {
        "source": "chain", "num_nodes": 5, "depth": 4, "shape": "static", "paths": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]
    }
    assert on_disk["methods"]["amphista"]["drafter"]["type"] == "amphista"
    env = on_disk["environment"]
    for key in ("torch", "transformers", "dtype", "cpu", "cpu_cores", "device"):
        assert env[key] is not None
    assert on_disk["warnings"] == []
    assert {"accept_lengths.png", "speedup_by_category.png"} <= {p.name for p in out.iterdir()}
    assert "| medusa |" in (out / "results.md").read_text()


def test_tau_and_steps_follow_accept_lengths(full_run):
    results, records, _ = full_run
    recs = [r for r in records if r.method == "medusa"]
    tokens = sum(len(r.out.tokens) for r in recs)
    steps = sum(len(r.out.accept_lengths) for r in recs)
    assert results["methods"]["medusa"]["tau"] == pytest.approx(tokens / steps)
    assert results["methods"]["medusa"]["steps"] == pytest.approx(steps / 2)  # mean over 2 runs


def test_answer_jsonl_format(full_run):
    _, records, out = full_run
    lines = [json.loads(x) for x in (out / "answers" / "medusa.jsonl").read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [1, "two"]
    for line in lines:
        assert set(line) >= {"question_id", "model_id", "choices", "tstamp", "category"}
        assert line["model_id"].endswith("medusa")
        assert [c["index"] for c in line["choices"]] == [0, 1]
        n_turns = 1 if line["question_id"] == 1 else 2
        for c in line["choices"]:
            for key in ("turns", "new_tokens", "wall_time", "accept_lengths"):
                assert len(c[key]) == n_turns, key
            assert all(isinstance(t, str) for t in c["turns"])
            assert [sum(a) for a in c["accept_lengths"]] == c["new_tokens"]


class Broken:
    """A method that is wrong on purpose: vanilla decoding with the last token changed."""

    def __init__(self, target):
        self.inner = amphista.VanillaDecoder(target)

    def generate(self, input_ids, **kw):
        out = self.inner.generate(input_ids, **kw)
        out.sequences = out.sequences.clone()
        out.sequences[0, -1] = (out.sequences[0, -1] + 1) % 512
        return out


def test_mismatch_is_detected_and_flagged(target, tmp_path, capsys):
    cfg = small(
        target=target,
        drafters={},
        hf_baseline=False,
        extra_methods={"broken": Broken(target)},
        out=str(tmp_path),
    )
    results = run_benchmark(cfg)
    broken = results["methods"]["broken"]
    assert broken["exact_match"] == 0.0 and broken["exact_mismatches"] == 3 == broken["turns"]
    assert broken["mismatch_examples"][0]["first_diff_at"] == 7
    assert results["methods"]["vanilla_loop"]["exact_match"] == 1.0
    assert len(results["warnings"]) == 1 and "GREEDY MISMATCH: broken" in results["warnings"][0]
    assert "GREEDY MISMATCH" in capsys.readouterr().err
    assert "**MISMATCH 3/3**" in (tmp_path / "results.md").read_text()


class Uncopyable(amphista.VanillaDecoder):
    """A method holding what cannot be deep-copied, as weights packed for the CPU (opaque tensors) are."""

    def __deepcopy__(self, memo):
        raise NotImplementedError("Cannot access storage of OpaqueTensorImpl")


def test_a_run_with_methods_passed_as_objects_writes_its_results(target, tmp_path):
    cfg = small(target=target, drafters={}, hf_baseline=False, extra_methods={"own": Uncopyable(target)},
                out=str(tmp_path))
    results = run_benchmark(cfg)
    assert results["methods"]["own"]["exact_match"] == 1.0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["runs"] == 1


def test_results_record_every_setting(target, tmp_path):
    from dataclasses import fields

    cfg = small(target=target, drafters={}, hf_baseline=False, drafter_dtype="float32", seed=7,
                extra_methods={"own": amphista.VanillaDecoder(target)}, out=tmp_path)  # a Path, not a str
    run_benchmark(cfg)
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert settings["out"] == str(tmp_path)
    assert {f.name for f in fields(cfg)} <= set(settings)  # a new field is on record without a list to extend
    assert settings["drafter_dtype"] == "float32" and settings["seed"] == 7
    assert settings["target"] == "TargetModel" and settings["drafters"] == []
    assert settings["extra_methods"] == ["own"] and settings["questions"] == "list"


def test_mismatch_in_plain_transformers_decoding_points_at_numerics():
    from amphista.bench.runner import _warnings

    ex = {"question_id": 1, "turn": 0, "run": 0, "first_diff_at": 3}
    bad = {"exact_mismatches": 1, "turns": 2, "mismatch_examples": [ex]}
    ok = {"exact_mismatches": 0, "turns": 2, "mismatch_examples": []}
    only_drafter = _warnings({"vanilla_hf": ok, "medusa": bad}, small())
    assert len(only_drafter) == 1 and "reduced precision" not in only_drafter[0]
    both = _warnings({"vanilla_hf": bad, "medusa": bad}, small())
    assert len(both) == 2 and all("reduced precision" in w for w in both)
    assert _warnings({"medusa": bad}, small(temperature=0.5)) == []


def test_exactness_fraction():
    def rec(method, qid, turn, tokens):
        return Record(0, method, qid, "c", turn, [1], TurnOutput(tokens, 1.0, [1] * len(tokens), []))

    ref = {(0, 1, 0): [5, 6, 7], (0, 2, 0): [5, 6], (0, 2, 1): [9]}
    recs = [rec("m", 1, 0, [5, 6, 7]), rec("m", 2, 0, [5, 6, 8]), rec("m", 2, 1, [9])]
    frac, mism = exactness(recs, ref)
    assert frac == pytest.approx(2 / 3)
    assert mism == [
        {
            "run": 0,
            "question_id": 2,
            "turn": 0,
            "first_diff_at": 2,
            "new_tokens": 3,
            "reference_new_tokens": 2,
        }
    ]


def test_multi_turn_plain_text(full_run, target):
    _, records, _ = full_run
    tok = target.tokenizer
    for method in ("vanilla_loop", "medusa"):
        first, second = sorted(
            (r for r in records if r.method == method and r.question_id == "two" and r.run == 0),
            key=lambda r: r.turn,
        )
        assert first.text == answer_text(tok, first.prompt, first.out.tokens)
        expected = "A fairy lived in a tree." + first.text + PLAIN_TURN_SEPARATOR + "The next day,"
        assert second.prompt == tok(expected)["input_ids"]


def test_multi_turn_with_chat_template(target):
    tok = copy.deepcopy(target.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    chat_target = amphista.TargetModel(target.model, tok)
    prompt = turn_prompt(tok, ["Hi there.", "And then?"], ["I am a dog."])
    assert tok.decode(prompt) == "[user] Hi there.\n[assistant] I am a dog.\n[user] And then?\n[assistant]"
    results, records = benchmark(
        small(
            target=chat_target,
            drafters={},
            hf_baseline=False,
            extra_methods={
                "random": amphista.SpeculativeDecoder(chat_target, RandomDrafter(512, 64), tree="chain")
            },
        )
    )
    first, second = sorted(
        (r for r in records if r.method == "random" and r.question_id == "two"), key=lambda r: r.turn
    )
    assert first.text == tok.decode(first.out.tokens, skip_special_tokens=True).strip()
    assert tok.decode(second.prompt) == (
        f"[user] A fairy lived in a tree.\n[assistant] {first.text}\n[user] The next day,\n[assistant]"
    )
    assert results["methods"]["random"]["exact_match"] == 1.0


def test_sampling_runs_and_is_not_flagged(target):
    results = run_benchmark(
        small(
            target=target,
            drafters={"random": RandomDrafter(512, 64)},
            tree="chain",
            temperature=0.8,
            top_p=0.9,
            questions=QUESTIONS[:1],
        )
    )
    assert results["settings"]["greedy"] is False and results["warnings"] == []
    assert results["methods"]["vanilla_hf"]["new_tokens"] > 0


# --- errors, raised before any model is loaded -------------------------------------------------------


@pytest.fixture
def no_models(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the target was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_target", fail)


def test_question_file_errors(tmp_path, no_models):
    with pytest.raises(InputError, match="does not exist"):
        run_benchmark(small(questions=str(tmp_path / "nope.jsonl"), drafters={}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "a", "turns": ["x"]}\n{not json}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        run_benchmark(small(questions=str(bad), drafters={}))
    no_turns = write_jsonl(tmp_path / "t.jsonl", [{"question_id": 1, "category": "a", "turns": []}])
    with pytest.raises(InputError, match="turns"):
        run_benchmark(small(questions=no_turns, drafters={}))
    dup = write_jsonl(tmp_path / "d.jsonl", [QUESTIONS[0], QUESTIONS[0]])
    with pytest.raises(InputError, match="appears twice"):
        run_benchmark(small(questions=dup, drafters={}))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question_id": 1, "category": "a", "turns": ["x"]}\n{"question_id": 2, "turns": ["caf\xe9"]}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl' is not UTF-8 text: byte 0xe9 at line 2"):
        run_benchmark(small(questions=str(latin1), drafters={}))
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="holds no questions"):
        load_questions(str(empty))


def test_unknown_category(no_models):
    with pytest.raises(InputError, match=r"unknown category 'math': the questions have animals, magic"):
        run_benchmark(small(categories="animals,math", drafters={}))
    assert [q.question_id for q in load_questions(QUESTIONS, categories="magic")] == ["two"]


def test_drafter_for_another_target(target, drafter_dirs, tmp_path, monkeypatch):
    with pytest.raises(DrafterMismatchError, match="vocabulary of 97"):
        run_benchmark(small(target=target, drafters={"other": RandomDrafter(97, 64)}))
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads(open(f"{drafter_dirs['medusa']}/config.json").read())
    cfg["built_for"]["vocab_size"] = 32000
    (other / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(loading, "load_target", lambda *a, **k: pytest.fail("target loaded"))
    with pytest.raises(DrafterMismatchError, match="'other'.*vocab_size 32000 but this target has 512"):
        run_benchmark(small(drafters={"other": str(other)}))
    with pytest.raises(CheckpointError, match="not a folder"):
        run_benchmark(small(drafters={"gone": str(tmp_path / "gone")}))


def test_missing_bundled_drafters_name_the_training_script(tmp_path, monkeypatch, no_models):
    monkeypatch.setattr(loading, "bundled_drafter_dir", lambda name: tmp_path / name)
    with pytest.raises(CheckpointError, match=loading.TRAIN_SCRIPT):
        run_benchmark(small())


def test_out_that_is_a_file_fails_before_the_benchmark(tmp_path, no_models):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("precious")
    with pytest.raises(InputError, match="--out .*corpus.txt' is an existing file, not a folder"):
        run_benchmark(small(out=str(corpus), drafters={}))
    with pytest.raises(InputError, match="cannot be created"):
        run_benchmark(small(out=str(corpus / "results"), drafters={}))
    assert corpus.read_text() == "precious"


def test_bad_settings(no_models):
    with pytest.raises(InputError, match="runs"):
        run_benchmark(small(runs=0, drafters={}))
    with pytest.raises(InputError, match="tree sizes"):
        run_benchmark(small(tree_sweep=[1], drafters={}))
    with pytest.raises(amphista.TreeError, match="unknown tree"):
        run_benchmark(small(tree="no_such_tree", drafters={}))


# --- trees --------------------------------------------------------------------------------------------


def test_tree_command(tmp_path, capsys):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps(ACC))
    out = tmp_path / "tree.json"
    assert main(["tree", "--accuracies", str(acc), "--nodes", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    spec = amphista.TreeSpec.load(str(out))
    expected = amphista.build_tree(ACC["top_k"], 8)
    assert spec == expected and spec.num_nodes == 8
    assert f"expected tau {json.loads(out.read_text())['expected_tau']:.3f}" in printed
    assert "depth 1" in printed and "[0]" in printed
    assert main(["tree", "--accuracies", str(tmp_path / "none.json"), "--nodes", "8"]) == 2


def test_tree_sweep_one_entry_per_size(target, drafter_dirs, tmp_path):
    cfg = small(
        target=target,
        drafters={"medusa": drafter_dirs["medusa"], "random": RandomDrafter(512, 64)},
        head_accuracies={"random": ACC["top_k"]},
        tree_sweep=["auto", 4, 8, 16],
        questions=QUESTIONS[:1],
        hf_baseline=False,
        out=str(tmp_path),
    )
    results = run_benchmark(cfg)
    for name in ("medusa", "random"):
        entries = results["tree_sweep"][name]
        assert [e["nodes"] for e in entries] == [4, 8, 16] == [e["num_nodes"] for e in entries]
        assert all(e["expected_tau"] > 1 and isinstance(e["speedup"], float) for e in entries)
        assert f"{name}@16" in results["methods"]
        # "auto" runs beside the fixed sizes, not as one of them.
        auto = results["methods"][f"{name}@auto"]
        assert auto["tree"]["source"] == "auto" and auto["exact_match"] == 1.0
    assert (tmp_path / "tree_sweep.png").is_file()


def test_tree_sweep_flag_takes_auto():
    from amphista.bench.cli import _sweep

    assert _sweep("auto,4, 8") == ["auto", 4, 8] and _sweep("8,auto") == [8, "auto"]
    with pytest.raises(InputError, match="--tree-sweep 'auto,big'"):
        _sweep("auto,big")


def test_greedy_auto_trees_come_from_accuracy_against_the_target(target, tmp_path):
    # Data accuracy favours a deep chain, accuracy against the target's argmax a wide first level:
    # a greedy run must build its tree from the latter.
    top_k = [[0.9, 0.91, 0.92], [0.9, 0.91, 0.92], [0.9, 0.91, 0.92]]
    top_k_target = [[0.3, 0.6, 0.8], [0.1, 0.15, 0.2], [0.1, 0.15, 0.2]]
    amphista.MedusaDrafter.for_target(target, num_heads=3).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "head_accuracy.json").write_text(json.dumps({"top_k": top_k, "top_k_target": top_k_target}))
    results = run_benchmark(
        small(target=target, drafters={"m": str(tmp_path / "m")}, tree="auto", tree_nodes=4,
              questions=QUESTIONS[:1], hf_baseline=False, out=str(tmp_path / "r"), plots=False)
    )  # fmt: skip
    paths = results["methods"]["m"]["tree"]["paths"]
    assert paths == amphista.build_tree(top_k_target, 4).to_json() != amphista.build_tree(top_k, 4).to_json()


def test_tree_sweep_without_accuracies_is_a_clear_error(drafter_dirs, no_models):
    with pytest.raises(InputError, match="head_accuracy.json"):
        run_benchmark(small(drafters={"amphista": drafter_dirs["amphista"]}, tree_sweep=[8]))


def test_cli_bench(drafter_dirs, tmp_path, capsys):
    q = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    code = main(
        [
            "bench",
            "--drafter",
            f"medusa={drafter_dirs['medusa']}",
            "--questions",
            q,
            "--categories",
            "magic",
            "--max-new-tokens",
            "6",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--tree",
            "auto",
            "--tree-nodes",
            "8",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
            "--no-plots",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["methods"]["medusa"]["tree"]["num_nodes"] == 8
    assert results["settings"]["categories"] == ["magic"]
    assert "| medusa |" in capsys.readouterr().out
    assert main(["bench", "--questions", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2


def test_shipped_prompts():
    qs = load_questions()
    assert len(qs) >= 16 and {"animals", "adventure", "family", "magic"} <= {q.category for q in qs}
    assert any(len(q.turns) > 1 for q in qs)


def test_hf_generate_matches_loop(target):
    from amphista.bench.methods import vanilla_methods

    loop, hf = vanilla_methods(target)
    prompt = target.tokenizer("Once upon a time")["input_ids"]
    a, b = (m.run(target, prompt, Settings(12)) for m in (loop, hf))
    assert a.tokens == b.tokens and len(b.step_times) == len(b.tokens) == 12
