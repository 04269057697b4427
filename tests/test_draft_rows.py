"""Batched drafting (draft_rows): every row drafts exactly what the single-sequence path drafts for it on its
own, whatever its batch-mates, its slot, its padding or the tree depth."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_target

from amphista import AmphistaDrafter, InputError, MedusaDrafter, TargetModel
from amphista.drafters import AdversarialDrafter, Drafter, OracleDrafter, RandomDrafter

D2T = torch.tensor(sorted({2, *range(3, 97, 4)}))[:24]  # a reduced draft vocabulary of 24 ids, EOS among them

CONFIGS = {
    "medusa": {"kind": "medusa"},
    "medusa_shared_d2t": {"kind": "medusa", "shared_lm_head": True, "d2t": D2T},
    "default": {},
    "token_once": {"sal_variant": "token_once"},
    "split": {"sal_variant": "split"},
    "three_stages_split": {"sal_stages": 3, "sal_variant": "split"},
    "one_stage": {"sal_stages": 1},
    "no_sal": {"use_sal": False},
    "no_aeb": {"aeb_layers": 0},
    "rotary_aeb": {"aeb_layers": 2, "position_embedding": "rotary"},
    "narrow_split": {"sal_width": 16, "aeb_width": 16, "sal_variant": "split"},
    "narrow_refuse": {"sal_width": 16, "aeb_width": 16},
    "shared_head": {"shared_lm_head": True},
    "d2t": {"d2t": D2T},
    "five_heads": {"num_heads": 5},
}
MAX_LENGTH = 40


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_target("llama", vocab=97, seed=3))


def make(target, kind="amphista", seed=0, **overrides):
    """A drafter with every weight moved off its initialisation: untrained, SAL and AEB would add nothing."""
    torch.manual_seed(seed)
    overrides.setdefault("num_heads", 4)
    cls = MedusaDrafter if kind == "medusa" else AmphistaDrafter
    drafter = cls.for_target(target, dtype=torch.float32, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return drafter


def pad(chunks):
    """Per-row (hidden (c, d), tokens (c,)) -> hidden (B, n, d), tokens (B, n), count (B,), padded with NaN
    hidden states and arbitrary ids: padding must never reach a real row."""
    n, d = max(h.shape[0] for h, _ in chunks), chunks[0][0].shape[1]
    hidden = torch.full((len(chunks), n, d), float("nan"))
    tokens = torch.randint(0, 97, (len(chunks), n), generator=torch.Generator().manual_seed(n))
    for b, (h, t) in enumerate(chunks):
        hidden[b, : h.shape[0]], tokens[b, : t.shape[0]] = h, t
    return hidden, tokens, torch.tensor([h.shape[0] for h, _ in chunks])


class Harness:
    """Drives draft_rows and remembers each slot's calls, to replay them through the single path."""

    def __init__(self, drafter, capacity, seed=0):
        self.drafter, self.g = drafter, torch.Generator().manual_seed(seed)
        self.lengths = [0] * capacity
        self.history: list[list] = [[] for _ in range(capacity)]  # per slot: (start, h, t, logits or None)
        drafter.reset_rows(capacity, MAX_LENGTH)

    def chunk(self, c):
        return torch.randn(c, self.drafter.hidden_size, generator=self.g), torch.randint(3, 97, (c,), generator=self.g)

    def step(self, counts, rows=None, depth=4, back=None):
        """Row b appends counts[b] positions, starting back[b] before its length (a rollback)."""
        rows = rows or slice(0, len(counts))
        slots = range(rows.start, rows.stop)
        back = back or [0] * len(counts)
        starts = [self.lengths[s] - k for s, k in zip(slots, back, strict=True)]
        chunks = [self.chunk(c) for c in counts]
        hidden, tokens, count = pad(chunks)
        with torch.inference_mode():
            out = self.drafter._draft_rows_logits(hidden, tokens, torch.tensor(starts), count, depth, rows)
        for b, s in enumerate(slots):
            self.lengths[s] = starts[b] + counts[b]
            self.history[s].append((starts[b], *chunks[b], None if out is None else out[b]))
        return out

    def move(self, src, dst):
        self.drafter.move_row(src, dst)
        self.history[dst], self.lengths[dst] = self.history[src], self.lengths[src]
        self.history[src], self.lengths[src] = [], 0

    def check(self):
        """Each slot's calls, replayed through reset / _draft_logits, give the logits draft_rows gave."""
        compared = 0
        for calls in self.history:
            self.drafter.reset(MAX_LENGTH)
            for start, h, t, logits in calls:
                with torch.inference_mode():
                    ref = self.drafter._draft_logits(h[None], t[None], start)  # (K, N)
                if logits is not None:
                    torch.testing.assert_close(logits, ref[: logits.shape[0]], atol=2e-5, rtol=1e-5)
                    compared += 1
        return compared


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_equal_single_sequence(target, name):
    drafter = make(target, **CONFIGS[name])
    run = Harness(drafter, capacity=4)
    rng = random.Random(name)
    run.step([7, 3, 1, 5])  # prompts of different lengths
    for i in range(5):
        counts = [rng.choice([1, 1, 2, 3, 4]) for _ in range(4)]
        back = [1 if i == 2 and b % 2 else 0 for b in range(4)]  # two rows rewrite their last position
        depth = rng.choice([1, 3, 4])
        assert run.step(counts, back=back, depth=depth).shape == (4, depth, drafter.config.head_vocab_size)
    assert run.check() == 24


@pytest.mark.parametrize("name", ["medusa", "default", "split", "no_sal"])
def test_depth_zero_absorbs(target, name):
    run = Harness(make(target, **CONFIGS[name]), capacity=3)
    assert run.step([4, 2, 5], depth=0) is None
    assert run.step([1, 3, 2], depth=0) is None
    assert run.step([2, 1, 1]).shape[:2] == (3, 4)
    assert run.check() == 3


@pytest.mark.parametrize("name", ["default", "split", "narrow_refuse"])
def test_prefill_one_row_leaves_the_others(target, name):
    drafter = make(target, **CONFIGS[name])
    run = Harness(drafter, capacity=4)
    run.step([4, 2, 3], rows=slice(0, 3))
    run.step([1, 2, 1], rows=slice(0, 3))
    caches = [layer.attn.row_cache[:, :3, :, :MAX_LENGTH].clone() for layer in drafter.sal.layers]
    run.step([6], rows=slice(3, 4))  # a new sequence joins in slot 3
    for layer, before in zip(drafter.sal.layers, caches, strict=True):
        assert torch.equal(layer.attn.row_cache[:, :3, :, :MAX_LENGTH], before)
    run.step([2, 1, 3, 1])
    run.step([1, 1, 1, 2], rows=slice(0, 4))
    assert run.check() == 3 * 2 + 1 + 4 * 2


def test_reset_rows_forgets_and_resizes(target):
    drafter = make(target, **CONFIGS["split"])
    run = Harness(drafter, capacity=2)
    run.step([5, 3])
    assert run.check() == 1 * 2
    run = Harness(drafter, capacity=50)  # more rows than positions per row
    run.step([1 + b % 3 for b in range(45)], rows=slice(2, 47))
    run.step([1 + b % 2 for b in range(45)], rows=slice(2, 47))
    assert run.check() == 2 * 45
    run = Harness(drafter, capacity=3)  # fits in the larger cache
    run.step([1, 2, 3])
    run.step([2, 2, 1])
    assert run.check() == 2 * 3


@pytest.mark.parametrize("name", ["medusa", "default", "three_stages_split"])
def test_move_row_equals_staying(target, name):
    moved, stayed = make(target, **CONFIGS[name]), make(target, **CONFIGS[name])
    a, b = Harness(moved, capacity=3), Harness(stayed, capacity=3)
    for counts in ([3, 5, 4], [2, 1, 3]):  # lengths 5, 6, 7
        a.step(counts)
        b.step(counts)
    a.move(2, 0)  # row 0 finished: row 2 takes its slot
    g = torch.Generator().manual_seed(1)
    for counts in ([2, 1], [1, 3]):  # (old row 2, row 1)
        chunks = [(torch.randn(c, 32, generator=g), torch.randint(3, 97, (c,), generator=g)) for c in counts]
        with torch.inference_mode():
            h, t, n = pad(chunks)
            got = moved._draft_rows_logits(h, t, torch.tensor([a.lengths[0], a.lengths[1]]), n, 4)
            h, t, n = pad(chunks[::-1])
            ref = stayed._draft_rows_logits(h, t, torch.tensor([b.lengths[1], b.lengths[2]]), n, 4, slice(1, 3))
        torch.testing.assert_close(got, ref.flip(0), atol=2e-5, rtol=1e-5)
        for s, c in zip((0, 1), counts, strict=True):
            a.lengths[s] += c
        for s, c in zip((2, 1), counts, strict=True):
            b.lengths[s] += c


@pytest.mark.parametrize("name", ["medusa", "default", "d2t", "medusa_shared_d2t"])
def test_draft_rows_ids_equal_draft_topk(target, name):
    drafter = make(target, **CONFIGS[name])
    drafter.reset_rows(2, MAX_LENGTH)
    g = torch.Generator().manual_seed(2)
    chunks = [(torch.randn(c, 32, generator=g), torch.randint(3, 97, (c,), generator=g)) for c in (5, 2)]
    top = drafter.draft_rows(*pad(chunks)[:2], torch.tensor([0, 0]), torch.tensor([5, 2]), 3, 4)  # (2, 3, 4)
    assert top.shape == (2, 3, 4)
    for b, (h, t) in enumerate(chunks):
        drafter.reset(MAX_LENGTH)
        assert torch.equal(top[b], drafter.draft_topk(h[None], t[None], 0, 3, 4))
    if drafter.d2t is not None:
        assert set(top.flatten().tolist()) <= set(D2T.tolist())


@pytest.mark.parametrize("name", ["medusa", "default", "shared_head", "d2t"])
def test_shallow_draft_topk_equals_draft(target, name):
    drafter = make(target, **CONFIGS[name])
    h, t = torch.randn(1, 6, 32), torch.randint(3, 97, (1, 6))
    drafter.reset(MAX_LENGTH)
    full = drafter.draft(h, t, 0)  # (K, V)
    for depth in (1, 2, 4):
        drafter.reset(MAX_LENGTH)
        top = drafter.draft_topk(h, t, 0, depth, 3)
        assert torch.equal(top, torch.topk(full[:depth], 3, dim=-1).indices)


def test_drafters_without_rows_say_so():
    class Bare(Drafter):
        num_heads, hidden_size, vocab_size = 4, 32, 97

    assert not Bare.supports_rows
    assert MedusaDrafter.supports_rows and AmphistaDrafter.supports_rows and OracleDrafter.supports_rows
    for call in (
        lambda d: d.reset_rows(2, 16),
        lambda d: d.draft_rows(torch.zeros(1, 1, 32), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1), torch.ones(1), 1, 1),
        lambda d: d.move_row(1, 0),
    ):
        with pytest.raises(InputError, match=r"^Bare does not support batched decoding .*generate\(\)$"):
            call(Bare())


def test_bad_rows_input_is_refused(target):
    drafter = make(target)
    h, t = torch.randn(2, 3, 32), torch.randint(3, 97, (2, 3))
    with pytest.raises(InputError, match="reset_rows"):
        drafter.draft_rows(h, t, torch.tensor([0, 0]), torch.tensor([3, 3]), 2, 2)
    drafter.reset_rows(3, 8)
    with pytest.raises(InputError, match="exactly once, in order"):  # a new row starts at position 0
        drafter.draft_rows(h, t, torch.tensor([0, 1]), torch.tensor([3, 3]), 2, 2)
    drafter.draft_rows(h, t, torch.tensor([0, 0]), torch.tensor([3, 3]), 2, 2)
    with pytest.raises(InputError, match="exactly once, in order"):  # a gap: row 1 has 3 positions, not 4
        drafter.draft_rows(h, t, torch.tensor([3, 4]), torch.tensor([1, 1]), 2, 2)
    with pytest.raises(InputError, match="at least one per row"):
        drafter.draft_rows(h, t, torch.tensor([3, 3]), torch.tensor([1, 0]), 2, 2)
    drafter.draft_rows(h, t, torch.tensor([3, 3]), torch.tensor([3, 2]), 2, 2)
    with pytest.raises(InputError, match="holds 8 positions"):  # row 0 asks for positions 6..8
        drafter.draft_rows(h, t, torch.tensor([6, 5]), torch.tensor([3, 1]), 2, 2)
    with pytest.raises(InputError, match="slice of 2 state slots"):
        drafter.draft_rows(h, t, torch.tensor([0, 0]), torch.tensor([1, 1]), 2, 2, slice(2, 4))


def test_stub_drafters_rule_per_row():
    reference = list(range(10, 40))
    oracle = OracleDrafter(reference, vocab_size=97, hidden_size=8)
    oracle.reset_rows(3, 64)
    h, t = torch.zeros(3, 2, 8), torch.zeros(3, 2, dtype=torch.long)
    top = oracle.draft_rows(h, t, torch.tensor([0, 4, 9]), torch.tensor([2, 1, 2]), 3, 2)  # last: 1, 4, 10
    assert top[:, :, 0].tolist() == [[reference[p + 2 + k] for k in range(3)] for p in (1, 4, 10)]
    assert oracle.row_calls == [[(0, 2), (4, 1), (9, 2)]]
    adversary = AdversarialDrafter(reference, vocab_size=97, hidden_size=8)
    top = adversary.draft_rows(h, t, torch.tensor([0, 4, 9]), torch.tensor([2, 1, 2]), 3, 2)
    assert top[:, 0, 1].tolist() == [reference[p + 2] for p in (1, 4, 10)]  # head 0: the truth at rank 1
    assert RandomDrafter(97, 8).draft_rows(h, t, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1]), 2, 5).shape == (3, 2, 5)
    assert oracle.draft_rows(h, t, torch.tensor([2, 5, 11]), torch.tensor([1, 1, 1]), 0, 2) is None


@pytest.mark.parametrize("name", ["default", "split", "medusa"])
def test_skip_rows_forgets_what_came_before(target, name):
    """A row that skipped to position p drafts as a row that never saw anything before p: the history is
    neither attended to nor needed."""
    drafter = make(target, **CONFIGS[name])
    drafter.reset_rows(2, MAX_LENGTH)
    g = torch.Generator().manual_seed(3)
    old = [(torch.randn(9, 32, generator=g), torch.randint(3, 97, (9,), generator=g))] * 2
    window = [(torch.randn(4, 32, generator=g), torch.randint(3, 97, (4,), generator=g))] * 2
    with torch.inference_mode():
        h, t, n = pad(old)
        drafter._draft_rows_logits(h[:1], t[:1], torch.tensor([0]), n[:1], 0, slice(0, 1))  # slot 0 saw 0..8
        drafter.skip_rows([0, 1], [12, 12])  # both continue at 12; slot 1 never saw anything
        h, t, n = pad(window)
        out = drafter._draft_rows_logits(h, t, torch.tensor([12, 12]), n, 4)
    torch.testing.assert_close(out[0], out[1], atol=2e-5, rtol=1e-5)
    with torch.inference_mode():  # and without the skip the history matters (the check could fail)
        drafter.reset_rows(2, MAX_LENGTH)
        h, t, n = pad(old)
        drafter._draft_rows_logits(h[:1], t[:1], torch.tensor([0]), n[:1], 0, slice(0, 1))
        drafter.skip_rows([1], [9])
        h, t, n = pad(window)
        seen = drafter._draft_rows_logits(h, t, torch.tensor([9, 9]), n, 4)
    if name != "medusa":
        assert not torch.allclose(seen[0], seen[1], atol=1e-4)


@pytest.mark.parametrize("buffer", ["reused", "fresh"])
def test_grow_rows_keeps_every_rows_state(target, buffer):
    """grow_rows after a small reset_rows: whether the buffer is one kept from a longer batch or must be
    reallocated, the rows continue as if they had had the room from the start."""
    drafter = make(target, **CONFIGS["default"])
    if buffer == "reused":
        drafter.reset_rows(2, 4 * MAX_LENGTH)  # leaves a long buffer behind
    run = Harness(drafter, capacity=2)  # reset_rows(2, MAX_LENGTH)
    drafter.reset_rows(2, 12)
    run.step([5, 3])
    drafter.grow_rows(MAX_LENGTH)
    run.step([4, 6])
    run.step([2, 1])
    assert run.check() == 3 * 2


def test_a_slot_reused_after_a_skip_starts_afresh(target):
    """A new sequence in a slot whose previous one skipped ahead sees its own positions from 0."""
    drafter = make(target, **CONFIGS["default"])
    drafter.reset_rows(2, MAX_LENGTH)
    g = torch.Generator().manual_seed(5)
    chunk = [(torch.randn(6, 32, generator=g), torch.randint(3, 97, (6,), generator=g))] * 2
    with torch.inference_mode():
        drafter.skip_rows([0], [20])  # slot 0's last sequence skipped to 20; slot 1 is fresh
        h, t, n = pad(chunk)
        out = drafter._draft_rows_logits(h, t, torch.tensor([0, 0]), n, 4)  # a new sequence in each slot
    torch.testing.assert_close(out[0], out[1], atol=2e-5, rtol=1e-5)
