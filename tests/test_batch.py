"""Batched decoding: ragged prompts in one forward, each row equal to its own decoding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_greedy, tiny_target

import amphista
from amphista.batch import BatchEngine, prefill_groups
from amphista.drafters import AmphistaDrafter, MedusaDrafter, RandomDrafter
from amphista.errors import InputError

PROMPTS = [[1, 5, 7], [1, 9, 3, 4, 5, 6, 7, 8, 20, 11, 12], [1], [1, 30, 31, 32, 33]]


def _noisy(drafter, seed: int = 0):
    """Untrained heads equal the target's lm_head; perturbed ones make SAL and AEB matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return drafter


@pytest.mark.parametrize("arch", ["llama", "mistral_sw", "gemma2", "qwen3"])
def test_vanilla_batch_equals_plain_decoding_per_row(arch):
    model = tiny_target(arch)
    outs = amphista.VanillaDecoder(model).generate_batch(PROMPTS, max_new_tokens=30, eos_token_id=[])
    assert [o.sequences[0].tolist() for o in outs] == [hf_greedy(model, p, 30) for p in PROMPTS]
    assert all(o.num_prompt_tokens == len(p) and o.finish_reason == "length" for o, p in zip(outs, PROMPTS))


def _speculative(model, kind: str, tree):
    target = amphista.TargetModel.wrap(model)
    if kind == "random":
        drafter = RandomDrafter(target.vocab_size, target.hidden_size, num_heads=3)
    else:
        cls = AmphistaDrafter if kind == "amphista" else MedusaDrafter
        drafter = _noisy(cls.for_target(target, num_heads=3, dtype=torch.float32))
    return amphista.SpeculativeDecoder(target, drafter, tree=tree)


@pytest.mark.parametrize("kind", ["medusa", "amphista", "random"])
@pytest.mark.parametrize("arch", ["llama", "mistral_sw"])
def test_speculative_batch_equals_plain_decoding_per_row(arch, kind):
    model = tiny_target(arch, sharpen=8.0)
    decoder = _speculative(model, kind, [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    outs = decoder.generate_batch(PROMPTS, max_new_tokens=30, eos_token_id=[])
    assert [o.sequences[0].tolist() for o in outs] == [hf_greedy(model, p, 30) for p in PROMPTS]


@pytest.fixture(scope="module")
def bundled():
    target = amphista.load_default_target()
    drafters = {kind: amphista.load_default_drafter(kind, target) for kind in ("medusa", "amphista")}
    return target, drafters


def _drain(engine) -> dict:
    """Step the engine until every row has finished; {row id: GenerateOutput}."""
    outputs = {}
    while engine:
        for event in engine.step():
            if event.output is not None:
                outputs[event.id] = event.output
    return outputs


def _story_prompts(target, n):
    openings = ["Once upon a time", "Lily and Ben", "The little dog", "One day, a bird", "Tom had a red",
                "In the park", "A big bear", "Sue liked to"]
    return [target.tokenizer(openings[i % len(openings)])["input_ids"] for i in range(n)]


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_bundled_drafters_batch_is_exact_and_accepts_drafts(bundled, kind):
    target, drafters = bundled
    prompts = _story_prompts(target, 6)
    decoder = amphista.SpeculativeDecoder(target, drafters[kind], tree="mc_sim_7b_63")
    outs = decoder.generate_batch(prompts, max_new_tokens=48)
    plain = amphista.VanillaDecoder(target)
    for prompt, out in zip(prompts, outs):
        ref = plain.generate(prompt, max_new_tokens=48)
        assert out.new_tokens == ref.new_tokens and out.finish_reason == ref.finish_reason
    assert sum(o.tau for o in outs) / len(outs) > 1.5  # the trained drafters' drafts are accepted in batches too


def test_rows_stop_at_different_steps_and_late_rows_join(bundled):
    target, drafters = bundled
    prompts = _story_prompts(target, 5)
    decoder = amphista.SpeculativeDecoder(target, drafters["amphista"], tree="mc_sim_7b_63")
    plain = amphista.VanillaDecoder(target)
    # max_length counts the prompt, so rows of different lengths stop after different numbers of tokens;
    # two rows at a time, so later prompts join while others run.
    outs = decoder.generate_batch(prompts, max_length=30, max_batch_size=2)
    for prompt, out in zip(prompts, outs):
        assert out.sequences[0].tolist() == plain.generate(prompt, max_length=30).sequences[0].tolist()
    assert len({o.num_new_tokens for o in outs}) > 1


def test_stream_batch_yields_each_rows_tokens_in_order(bundled):
    target, drafters = bundled
    prompts = _story_prompts(target, 3)
    decoder = amphista.SpeculativeDecoder(target, drafters["medusa"], tree="mc_sim_7b_63")
    seen: dict[int, list[int]] = {i: [] for i in range(3)}
    stream = decoder.stream_batch(prompts, max_new_tokens=20)
    for step in stream:
        for i, tokens in step.items():
            seen[i].extend(tokens)
    assert [seen[i] for i in range(3)] == [o.new_tokens for o in decoder.last_outputs]
    assert [o.new_tokens for o in decoder.generate_batch(prompts, max_new_tokens=20)] == [seen[i] for i in range(3)]


def _three_rows(bundled, drafter: str, max_new_tokens: int):
    """Three story openings added to one engine (64-node tree): (target, prompts, decoder, engine, row ids)."""
    target, drafters = bundled
    prompts = _story_prompts(target, 3)
    decoder = amphista.SpeculativeDecoder(target, drafters[drafter], tree="mc_sim_7b_63")
    engine = BatchEngine(decoder, max_rows=3)
    return target, prompts, decoder, engine, [engine.add(p, max_new_tokens=max_new_tokens) for p in prompts]


def test_cancelled_row_leaves_and_the_others_are_unaffected(bundled):
    target, prompts, decoder, engine, ids = _three_rows(bundled, "amphista", 40)
    engine.step()
    engine.step()
    assert engine.cancel(ids[0]) and len(engine) == 2 and not engine.cancel(ids[0])
    outputs = _drain(engine)
    plain = amphista.VanillaDecoder(target)
    for rid, prompt in zip(ids[1:], prompts[1:]):
        assert outputs[rid].new_tokens == plain.generate(prompt, max_new_tokens=40).new_tokens
    assert ids[0] not in outputs


def test_engine_grows_its_cache_for_a_longer_request(bundled):
    target, drafters = bundled
    prompts = _story_prompts(target, 2)
    decoder = amphista.SpeculativeDecoder(target, drafters["amphista"], tree="mc_sim_7b_63")
    engine = BatchEngine(decoder, max_rows=2)
    short = engine.add(prompts[0], max_new_tokens=8)
    engine.step()
    size = engine.cache.max_len
    long = engine.add(prompts[1], max_new_tokens=100)
    assert engine.cache.max_len > size
    outputs = _drain(engine)
    plain = amphista.VanillaDecoder(target)
    assert outputs[short].new_tokens == plain.generate(prompts[0], max_new_tokens=8).new_tokens
    assert outputs[long].new_tokens == plain.generate(prompts[1], max_new_tokens=100).new_tokens


def test_a_trees_room_past_the_requests_comes_with_the_first_tree_that_needs_it(bundled):
    # Spare slots for a tree past every row's last token slow plain steps (auto decodes many rows plainly):
    # the cache holds the requests alone until a tree step near a row's end needs more, then grows once.
    target, drafters = bundled
    prompts = _story_prompts(target, 2)
    longest = max(len(p) for p in prompts) + 20
    plain = amphista.VanillaDecoder(target)
    engine = BatchEngine(plain, max_rows=2)
    for p in prompts:
        engine.add(p, max_new_tokens=20, eos_token_id=[])
    _drain(engine)
    assert engine.cache.max_len == longest
    decoder = amphista.SpeculativeDecoder(target, drafters["medusa"], tree=[[0], [1], [0, 0], [0, 0, 0]])
    engine = BatchEngine(decoder, max_rows=2)
    ids = [engine.add(p, max_new_tokens=20, eos_token_id=[]) for p in prompts]
    assert engine.cache.max_len == longest
    finished = []
    while engine:
        for event in engine.step():
            if event.output is not None:
                finished.append((event.id, event.output))
        assert engine.cache.max_len in (longest, longest + 5)
    assert engine.cache.max_len == longest + 5  # the rows' last trees ran past their requests
    outputs = dict(finished)
    for rid, p in zip(ids, prompts):
        assert outputs[rid].new_tokens == plain.generate(p, max_new_tokens=20, eos_token_id=[]).new_tokens


def test_cache_rows_equal_recomputation(bundled):
    """After speculative steps with rejected branches, each row's committed keys and values are exactly
    what one forward over its committed tokens computes."""
    target, prompts, decoder, engine, _ = _three_rows(bundled, "medusa", 60)
    for _ in range(4):
        engine.step()
    from transformers import DynamicCache

    from amphista.target import cache_keyword

    for slot, row in enumerate(engine.rows):
        tokens = (row.request.prompt + row.generated)[: row.length]
        cache = DynamicCache()
        with torch.inference_mode():
            target.model(torch.tensor([tokens]), use_cache=True, **{cache_keyword(target.model): cache})
        for layer in range(target.num_layers):
            keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]
            torch.testing.assert_close(engine.cache.buf[layer, 0, slot, :, : row.length], keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(engine.cache.buf[layer, 1, slot, :, : row.length], values, rtol=1e-4, atol=1e-5)


def test_seeded_batches_are_reproducible_and_rows_differ(bundled):
    target, drafters = bundled
    prompt = _story_prompts(target, 1)[0]
    decoder = amphista.SpeculativeDecoder(target, drafters["amphista"], tree="mc_sim_7b_63")
    a = decoder.generate_batch([prompt] * 4, max_new_tokens=24, temperature=1.0, seed=7)
    b = decoder.generate_batch([prompt] * 4, max_new_tokens=24, temperature=1.0, seed=7)
    assert [o.new_tokens for o in a] == [o.new_tokens for o in b]
    assert len({tuple(o.new_tokens) for o in a}) > 1  # row i is seeded with 7 + i


def test_rows_of_different_sampling_settings_each_sample_as_their_own_generate(bundled):
    # A plain step draws the sampled rows of each setting together; every row must still get the tokens of
    # its own generate with its seed, greedy and typical rows alongside.
    target, _ = bundled
    plain = amphista.VanillaDecoder(target)
    prompts = _story_prompts(target, 3)
    settings = [
        dict(temperature=1.0, seed=3), dict(temperature=0.7, top_p=0.9, seed=4), dict(temperature=1.0, seed=5),
        dict(), dict(temperature=0.7, top_k=5, seed=6), dict(temperature=1.0, seed=7, acceptance="typical"),
    ]  # fmt: skip
    engine = BatchEngine(plain, max_rows=len(settings))
    ids = [engine.add(prompts[i % 3], max_new_tokens=20, eos_token_id=[], **kw) for i, kw in enumerate(settings)]
    outputs = {}
    while engine:
        outputs.update({e.id: e.output for e in engine.step() if e.output is not None})
    for i, kw in enumerate(settings):
        own = plain.generate(prompts[i % 3], max_new_tokens=20, eos_token_id=[], **kw)
        assert outputs[ids[i]].new_tokens == own.new_tokens, kw


def test_batch_errors_name_the_prompt_and_the_fix(bundled):
    target, drafters = bundled
    decoder = amphista.VanillaDecoder(target)
    with pytest.raises(InputError, match="prompt 1: the prompt is empty"):
        decoder.generate_batch([[1, 2], []])
    with pytest.raises(InputError, match="at least one prompt"):
        decoder.generate_batch([])
    with pytest.raises(InputError, match="max_batch_size"):
        decoder.generate_batch([[1, 2]], max_batch_size=0)
    with pytest.raises(InputError, match="unsupported keyword"):
        decoder.generate_batch([[1, 2]], num_beams=2)
    engine = BatchEngine(decoder, max_rows=1)
    engine.add([1, 2], max_new_tokens=4)
    with pytest.raises(InputError, match="batch is full"):
        engine.add([1, 3], max_new_tokens=4)


def test_a_drafter_without_row_support_is_refused_clearly(bundled):
    target, _ = bundled

    class Single(RandomDrafter):
        supports_rows = False

    decoder = amphista.SpeculativeDecoder(target, Single(target.vocab_size, target.hidden_size), tree="chain")
    with pytest.raises(amphista.BatchingError, match="does not support batched decoding"):
        decoder.generate_batch([[1, 2], [1, 3]])
    # One prompt takes the single-sequence loop, which needs no row support.
    [out] = decoder.generate_batch([[1, 2]], max_new_tokens=6, eos_token_id=[])
    assert out.sequences.tolist() == decoder.generate([1, 2], max_new_tokens=6, eos_token_id=[]).sequences.tolist()


def test_a_target_whose_attention_a_batch_cannot_mask_is_refused_and_generate_still_serves_it(bundled):
    target, _ = bundled
    plain = amphista.VanillaDecoder(target)
    expected = plain.generate([1, 2], max_new_tokens=5, eos_token_id=[]).sequences.tolist()
    config = target.text_config
    had, before = hasattr(config, "layer_types"), getattr(config, "layer_types", None)
    config.layer_types = ["chunked_attention"] * config.num_hidden_layers  # no mask for it here
    try:
        with pytest.raises(amphista.BatchingError, match=r"\['chunked_attention'\].*one at a time with generate"):
            plain.generate_batch([[1, 2], [1, 3]])
        assert plain.generate([1, 2], max_new_tokens=5, eos_token_id=[]).sequences.tolist() == expected
    finally:
        if had:
            config.layer_types = before
        else:
            del config.layer_types


# --- tree="auto" --------------------------------------------------------------------------------------------


def _cost_file(tmp_path, per_token: float) -> str:
    """A cost model where a step costs 1 ms + per_token ms for each token of each row."""
    grid = [[r, n, 1e-3 + per_token * 1e-3 * r * n] for r in (1, 4, 16) for n in (1, 2, 4, 8, 16, 32, 64)]
    path = tmp_path / f"costs-{per_token}.json"
    path.write_text(json.dumps({"version": 1, "forward": grid, "overhead_s": 0.0}))
    return str(path)


def test_auto_picks_trees_where_they_pay_and_plain_where_not(bundled, tmp_path, monkeypatch):
    target, drafters = bundled
    prompts = _story_prompts(target, 3)
    plain = amphista.VanillaDecoder(target)
    refs = [plain.generate(p, max_new_tokens=24).new_tokens for p in prompts]
    monkeypatch.setenv("AMPHISTA_COST_MODEL", _cost_file(tmp_path, 0.0))  # verifying more tokens is free
    free = amphista.SpeculativeDecoder(target, drafters["amphista"], tree="auto")
    assert free.tree.num_nodes > 8 and not free._plain
    assert [free.generate(p, max_new_tokens=24).new_tokens for p in prompts] == refs
    assert [o.new_tokens for o in free.generate_batch(prompts, max_new_tokens=24)] == refs
    monkeypatch.setenv("AMPHISTA_COST_MODEL", _cost_file(tmp_path, 5.0))  # every token costs 5 ms
    dear = amphista.SpeculativeDecoder(target, drafters["amphista"], tree="auto")
    assert dear._plain and dear.tree_policy.choose(16) is None
    seen = dear.tree_policy._observations
    out = dear.generate(prompts[0], max_new_tokens=24)
    assert out.new_tokens == refs[0] and out.tau == 1.0
    assert dear.tree_policy._observations == seen + 23  # plain steps are observed too (after the prefill)
    outs = dear.generate_batch(prompts, max_new_tokens=24)
    assert [o.new_tokens for o in outs] == refs and all(o.tau == 1.0 for o in outs)


def test_the_engine_tells_the_policy_whether_finished_rows_are_refilled(bundled):
    from amphista.tree import FixedTree, TreeSpec

    target, drafters = bundled
    seen = []

    class Recording(FixedTree):
        def choose(self, rows, fresh=False, ragged=True):
            seen.append((rows, ragged))
            return super().choose(rows)

    decoder = amphista.SpeculativeDecoder(target, drafters["amphista"], tree=TreeSpec.chain(3))
    decoder.tree_policy = Recording(decoder.tree)
    prompts = _story_prompts(target, 2)
    for ragged in (True, False):  # generate_batch's fixed rows, the server's refilled ones
        engine = BatchEngine(decoder, 2, ragged=ragged)
        for p in prompts:
            engine.add(p, max_new_tokens=4)
        engine.step()
    assert seen == [(2, True), (2, False)]


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_step_timer_takes_its_steps_in_any_order_of_rows(kind):
    # Calibration's later looks go over the grid forwards and backwards: a plain step of 4 rows, then of 2, then
    # a tree step of 4 rows, whose rows 3-4 missed the 2-row plain step the drafter's catch-up would read.
    from amphista.batch import StepTimer

    decoder = _speculative(tiny_target(sharpen=8.0), kind, [[0], [1], [0, 0]])
    timer = StepTimer(decoder, 4, context=8)
    tree = decoder.tree
    for rows, spec in [(4, None), (2, None), (4, tree), (1, None), (4, None), (2, tree), (4, tree), (3, tree)]:
        assert timer.step(rows, spec) > 0
    assert all(r.length > 8 for r in timer.rows)


def test_auto_calibrates_on_this_machine_and_caches(bundled, tmp_path, monkeypatch):
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path))
    monkeypatch.delenv("AMPHISTA_COST_MODEL", raising=False)
    target, drafters = bundled
    decoder = amphista.SpeculativeDecoder(target, drafters["medusa"], tree="auto")
    files = list((tmp_path / "costs").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["threads"] == torch.get_num_threads()
    assert decoder.tree_policy.choose(1) is not None  # the trained drafter pays at one row here
    before = files[0].stat().st_mtime_ns
    amphista.SpeculativeDecoder(target, drafters["medusa"], tree="auto")
    assert files[0].stat().st_mtime_ns == before  # read, not measured again


def test_auto_without_accuracies_says_what_it_needs(bundled):
    target, _ = bundled
    drafter = MedusaDrafter.for_target(target)
    with pytest.raises(amphista.TreeError, match="head_accuracy.json"):
        amphista.SpeculativeDecoder(target, drafter, tree="auto")
    accuracies = [[0.6, 0.7], [0.4, 0.5], [0.3, 0.35], [0.2, 0.25]]
    decoder = amphista.SpeculativeDecoder(target, drafter, tree="auto", accuracies=accuracies)
    assert decoder.auto and decoder.tree_policy.max_nodes >= 2


def test_trees_after_a_long_plain_stretch_skip_the_drafters_catch_up_and_stay_exact(bundled):
    from amphista.batch import _UNFORCED

    target, prompts, decoder, engine, ids = _three_rows(bundled, "amphista", 90)
    engine.forced_tree = None  # plain steps: the drafter falls behind by 40 positions per row
    for _ in range(40):
        engine.step()
    assert all(len(r.pending_tokens) > BatchEngine.CATCH_UP for r in engine.rows)
    engine.forced_tree = _UNFORCED
    outputs = _drain(engine)
    plain = amphista.VanillaDecoder(target)
    for rid, prompt in zip(ids, prompts):
        assert outputs[rid].new_tokens == plain.generate(prompt, max_new_tokens=90).new_tokens
    assert sum(outputs[rid].tau for rid in ids) / 3 > 1.2  # drafts from the skipped-ahead state still land


def test_a_window_narrower_than_the_tree_masks_by_position_not_slot():
    """Tree nodes sit in consecutive cache slots but at their depth's position. With a 2-token sliding window,
    node [1, 0, 0] (depth 3) must not see its ancestor [1] (depth 1, slot 2), which a mask built from slots
    would let it: the drafter below always puts the truth at rank 1 of head 0, so that path is the one
    accepted."""
    import transformers as T

    from amphista.drafters import AdversarialDrafter

    cfg = T.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          sliding_window=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = T.MistralForCausalLM(cfg).eval()
    prompt = PROMPTS[1]
    reference = hf_greedy(model, prompt, 30)
    drafter = AdversarialDrafter(reference, 97, 32, num_heads=3)
    decoder = amphista.SpeculativeDecoder(model, drafter, tree=[[0], [1], [0, 0], [1, 0], [0, 0, 0], [1, 0, 0]])
    outs = decoder.generate_batch([prompt, prompt], max_new_tokens=30, eos_token_id=[])
    assert all(o.sequences[0].tolist() == reference for o in outs)
    assert min(o.tau for o in outs) > 2.0  # the [1, 0, 0] path was accepted: the case was exercised


def test_one_prompt_decodes_as_generate_does(bundled, monkeypatch):
    target, drafters = bundled
    decoder = amphista.SpeculativeDecoder(target, drafters["amphista"], tree="auto")
    # The same tree for both calls: step times fed back between them could move auto's choice (timing, not code).
    monkeypatch.setattr(decoder.tree_policy, "observe", lambda *args, **kwargs: None)
    prompt = [1, 403, 407, 261, 378]
    for options in ({}, {"do_sample": True, "temperature": 0.8, "seed": 7}):
        [out] = decoder.generate_batch([prompt], max_new_tokens=24, **options)
        ref = decoder.generate(prompt, max_new_tokens=24, **options)
        assert out.sequences.tolist() == ref.sequences.tolist() and out.steps == ref.steps
    streamed = list(decoder.stream_batch([prompt], max_new_tokens=24))
    assert all(list(step) == [0] for step in streamed)
    assert sum((step[0] for step in streamed), []) == decoder.last_outputs[0].new_tokens


@pytest.mark.parametrize("plain_steps", [11, 40])
def test_a_catch_up_draft_reads_the_targets_hidden_states_of_every_unseen_position(bundled, plain_steps):
    """After a plain stretch in which a row leaves (the last row moves into its slot) and another joins, the
    first tree step's draft reads, for each row, the hidden states and next tokens of the positions the drafter
    has not seen (its newest CATCH_UP where it fell further behind): equal to a full forward of the row's text."""
    from amphista.batch import _UNFORCED

    target, prompts, decoder, engine, ids = _three_rows(bundled, "amphista", 90)
    engine.forced_tree = None
    for step in range(plain_steps):
        if step == 4:
            engine.cancel(ids[0])
        if step == 7:
            engine.add(_story_prompts(target, 5)[4], max_new_tokens=90)
        engine.step()
    seen = []
    draft_rows = engine.drafter.draft_rows
    engine.drafter.draft_rows = lambda hidden, tokens, start, count, *a, **k: (
        seen.append((hidden.clone(), tokens.clone(), start.tolist(), count.tolist())),
        draft_rows(hidden, tokens, start, count, *a, **k),
    )[1]
    rows = list(engine.rows)
    behind = [row.plain_steps for row in rows]
    # Committed positions (the newest token, the root, is not in the cache yet) and the token after each.
    texts = [row.request.prompt + row.generated for row in rows]
    assert all(len(text) == row.length + 1 for text, row in zip(texts, rows))
    engine.forced_tree = _UNFORCED
    engine.step()
    [(hidden, tokens, starts, counts)] = seen
    assert len(rows) == 3 and max(counts) > 1
    for b, text in enumerate(texts):
        full, _ = target.forward_train(torch.tensor([text[:-1]]))
        start, count, length = starts[b], counts[b], len(text) - 1
        # Never drafted: from the prompt's first position, or the newest CATCH_UP after a longer stretch.
        assert start == (0 if behind[b] <= BatchEngine.CATCH_UP else length - BatchEngine.CATCH_UP)
        assert start + count == length
        torch.testing.assert_close(hidden[b, :count], full[0, start:length], atol=1e-4, rtol=1e-4)
        assert tokens[b, :count].tolist() == text[start + 1 :]


def test_prefill_groups_are_the_cheapest_partition_of_the_prompts():
    import itertools

    def cost(groups, lengths, c):
        return sum(c + len(g) * max(lengths[i] for i in g) for g in groups)

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            for i in range(len(part)):
                yield part[:i] + [[first, *part[i]]] + part[i + 1 :]
            yield [[first], *part]

    g = torch.Generator().manual_seed(0)
    for n, c in itertools.product((1, 2, 5, 6), (0, 8, 64)):
        lengths = torch.randint(1, 120, (n,), generator=g).tolist()
        groups = prefill_groups(lengths, c)
        assert sorted(i for grp in groups for i in grp) == list(range(n))  # every prompt exactly once
        assert cost(groups, lengths, c) == min(cost(p, lengths, c) for p in partitions(list(range(n))))
    # One long prompt among short ones prefills apart; similar lengths stay together.
    assert prefill_groups([423, *[20] * 31], 32) == [list(range(1, 32)), [0]]
    assert prefill_groups([20, 22, 21, 19], 32) == [[3, 0, 2, 1]]


@pytest.mark.parametrize("kind", ["vanilla", "amphista"])
def test_prompts_of_very_different_lengths_prefill_in_groups_and_stay_exact(kind, monkeypatch):
    model = tiny_target("llama", sharpen=8.0)
    if kind == "vanilla":
        decoder = amphista.VanillaDecoder(amphista.TargetModel.wrap(model))
    else:
        decoder = _speculative(model, kind, [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    monkeypatch.setattr(BatchEngine, "PREFILL_FORWARD_POSITIONS", 4)
    widths = []
    forward = type(decoder.target).forward

    def spy(self, input_ids, **kwargs):
        widths.append(tuple(input_ids.shape))
        return forward(self, input_ids, **kwargs)

    monkeypatch.setattr(type(decoder.target), "forward", spy)
    long_prompts = [[1, *(3 + i % 90 for i in range(50))], [1, *(3 + 7 * i % 90 for i in range(40))]]
    prompts = [long_prompts[0], *PROMPTS, long_prompts[1]]  # two long prompts among short ones
    outs = decoder.generate_batch(prompts, max_new_tokens=20, eos_token_id=[])
    assert [o.sequences[0].tolist() for o in outs] == [hf_greedy(model, p, 20) for p in prompts]
    groups = prefill_groups([len(p) for p in prompts], 4)
    assert len(groups) > 2
    # The first forwards are the prefills, one per group, each padded to its own longest prompt only.
    assert widths[: len(groups)] == [(len(g), max(len(prompts[i]) for i in g)) for g in groups]
