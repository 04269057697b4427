"""Training: data formats, assistant-only masks, loss alignment, the loop, checkpoints and resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from test_training_helpers import CHATML, config, tiny_target, tokenizer, write_chats, write_stories

import amphista
from amphista.drafters import AmphistaDrafter, MedusaDrafter
from amphista.errors import CheckpointError, InputError
from amphista.training import DraftLoss, TrainConfig, apply_overrides, head_weights, load_examples, train
from amphista.training.batching import collate, epoch_batches, head_labels, label_counts
from amphista.training.checkpoint import atomic_write, find_checkpoint, list_checkpoints
from amphista.training.data import DEFAULT_CHAT_TEMPLATE, tokenize_chat
from amphista.training.losses import target_probs
from amphista.tree import build_tree, load_accuracies


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Feature cache entries of these runs go to the test's folder, not the user's cache."""
    monkeypatch.setenv("AMPHISTA_CACHE", str(tmp_path / "cache"))


# ---- data -------------------------------------------------------------------------------------------


def _lines(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_each_format_parses(tmp_path):
    tok = tokenizer()
    chat = [{"from": "human", "value": "Hi there."}, {"from": "gpt", "value": "Once upon a time."}]
    files = {
        "sharegpt.jsonl": _lines(tmp_path / "sharegpt.jsonl", [{"conversations": chat}] * 2),
        "messages.jsonl": _lines(
            tmp_path / "messages.jsonl",
            [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "A cat."}]}],
        ),
        "text.jsonl": _lines(tmp_path / "text.jsonl", [{"text": "Once upon a time there was a dog."}]),
    }
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi, friend."}] * 3, indent=1))
    files["alpaca.json"] = str(alpaca)
    txt = tmp_path / "plain.txt"
    txt.write_text("The sun was warm. " * 40)  # one document, cut into seq_len windows
    files["plain.txt"] = str(txt)
    expected = {"sharegpt.jsonl": 2, "messages.jsonl": 1, "text.jsonl": 1, "alpaca.json": 3}
    for name, path in files.items():
        examples, (report,) = load_examples([path], tok, seq_len=64)
        assert report.malformed == [] and report.examples == len(examples) > 0, name
        if name in expected:
            assert len(examples) == expected[name], name
    examples, _ = load_examples([files["plain.txt"]], tok, seq_len=64)
    assert len(examples) > 1 and all(len(ex.input_ids) <= 64 for ex in examples)


def test_malformed_records_counted_with_line_numbers(tmp_path):
    good = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}
    path = _lines(
        tmp_path / "mixed.jsonl",
        [
            good,  # 1
            "{not json",  # 2
            {"conversations": [{"from": "alien", "value": "x"}]},  # 3 unknown role
            "",  # 4 blank: ignored, not counted
            {"messages": [{"role": "user", "content": "only a question"}]},  # 5 no assistant turn
            {"foo": 1},  # 6 no known field
            good,  # 7
            {"input_ids": [1, 5, 99999]},  # 8 outside the vocabulary
            {"input_ids": [1, 300, 301, 302]},  # 9 pre-tokenized
        ],
    )
    examples, (report,) = load_examples([path], tokenizer(), seq_len=64)
    assert len(examples) == 3 and examples[-1].input_ids == [1, 300, 301, 302]
    assert [n for n, _ in report.malformed] == [2, 3, 5, 6, 8]
    assert "line 2" in report.summary() and "5 malformed" in report.summary()
    bad = _lines(tmp_path / "bad.jsonl", ["{oops", {"x": 1}])
    with pytest.raises(InputError, match="no usable record"):
        load_examples([bad], tokenizer(), seq_len=64)

    arr = tmp_path / "arr.json"  # JSON arrays report the line each element starts on
    arr.write_text('[\n  {"text": "Once upon a time."},\n  {"nope": 1},\n  {"text": "The end of it."}\n]\n')
    _, (report,) = load_examples([str(arr)], tokenizer(), seq_len=64)
    assert [n for n, _ in report.malformed] == [3]


@pytest.mark.parametrize("template", [CHATML, None])
def test_assistant_only_mask(template):
    tok = tokenizer()
    tok.chat_template = template
    msgs = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time there was a cat."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "The cat slept."},
    ]
    ex = tokenize_chat(tok, msgs)
    labelled = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    # Exactly the assistant turns and their end-of-turn markup; no prompt text, no assistant header.
    for word in ("story", "Be kind", "then?", "assistant", "USER", "ASSISTANT"):
        assert word not in labelled
    assert "Once upon a time there was a cat." in labelled and "The cat slept." in labelled
    assert tok.eos_token in tok.decode(ex.input_ids)
    eos = tok.eos_token_id
    # The token ending each assistant turn is labelled (the drafter must learn to stop).
    assert sum(m for t, m in zip(ex.input_ids, ex.loss_mask) if t == eos) == 2
    if template is None:
        assert "USER: Tell me a story." in tok.apply_chat_template(msgs, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)


# ---- losses --------------------------------------------------------------------------------------------


def _perturb(drafter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return drafter


@pytest.mark.parametrize("kind", [MedusaDrafter, AmphistaDrafter])
def test_loss_matches_hand_computation(kind):
    """Head k at position t: CE to x_{t+2+k} and CE to softmax(target logits at t+1+k), mean over labels."""
    target = tiny_target()
    drafter = _perturb(kind.for_target(target, num_heads=3, dtype=torch.float32))
    K, lm_w, al_w = 3, 0.7, 0.4
    g = torch.Generator().manual_seed(1)
    lengths = [9, 6]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, 512, (n,), generator=g)
        mask[b, :n] = 1
    mask[0, 3] = 0  # a prompt token inside the sequence: never a label
    hidden, logits = target.forward_train(ids)
    hidden, logp = hidden.clone(), F.log_softmax(logits, -1)

    w = head_weights(K, "decay", 0.8)
    expected = torch.zeros(())
    with torch.no_grad():
        q = drafter(hidden[:, :-1], ids[:, 1:])  # (B, T-1, K, V)
    for k in range(K):
        lm, al, n = 0.0, 0.0, 0
        for b, L in enumerate(lengths):
            for t in range(L - 2 - k):
                label = t + 2 + k
                if not mask[b, label]:
                    continue
                logq = F.log_softmax(q[b, t, k], -1)
                lm += -logq[ids[b, label]]
                al += -(logp[b, t + 1 + k].exp() * logq).sum()
                n += 1
        expected += w[k] * (lm_w * lm + al_w * al) / n
    norm = torch.tensor([float(mask[b, 2 + k : lengths[b]].sum()) for k in range(K) for b in [0]])
    norm = torch.tensor([sum(float(mask[b, 2 + k : lengths[b]].sum()) for b in range(2)) for k in range(K)])
    for chunk in (0, 3):  # whole and chunked (checkpointed) vocabulary projection agree
        loss_fn = DraftLoss(drafter, w, lm_w, al_w, chunk=chunk)
        loss, stats = loss_fn(hidden, ids, mask, target_probs(logp), norm)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        assert stats[3].tolist() == norm.tolist()
        loss.backward()
        grads = [p.grad.clone() for p in drafter.parameters()]
        drafter.zero_grad()
        if chunk == 0:
            reference = grads
        else:
            for a, b in zip(grads, reference):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_automatic_logit_chunk_follows_the_memory_available(monkeypatch):
    import psutil

    from amphista.training import losses

    def available(n):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": n})())

    available(64 << 30)
    assert losses.auto_chunk_elements(torch.device("cpu")) == (64 << 30) // 16 // 4  # float32 elements
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the machine's memory
    assert losses.auto_chunk_elements(torch.device("cpu")) == (64 << 30) // 16 // 4 // 4
    available(1 << 30)
    assert losses.auto_chunk_elements(torch.device("cpu")) == losses.AUTO_CHUNK_ELEMENTS  # never below the floor
    assert losses.auto_chunk_elements(torch.device("meta")) == losses.AUTO_CHUNK_ELEMENTS  # not a CPU: fixed

    # A step is recomputed in backward only when its logits exceed the chunk, read once per loss module.
    target = tiny_target()
    drafter = MedusaDrafter.for_target(target, num_heads=2, dtype=torch.float32)
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    hidden, logits = target.forward_train(ids)
    probs, norm = F.softmax(logits, -1), torch.tensor([14.0, 12.0])
    calls = []
    monkeypatch.setattr(losses, "checkpoint", lambda fn, *args, **kw: calls.append(1) or fn(*args))
    for elements, chunked in ((2 * 512 * 3, True), (1 << 26, False)):
        monkeypatch.setattr(losses, "auto_chunk_elements", lambda device, n=elements: n)
        calls.clear()
        loss, _ = DraftLoss(drafter, head_weights(2), 1.0, 1.0)(hidden, ids, mask, probs, norm)
        assert bool(calls) is chunked and torch.isfinite(loss)


def test_head_labels_and_counts():
    ids = torch.tensor([[10, 11, 12, 13, 14, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    labels = head_labels(ids, mask, 2)  # (1, 5, 2)
    assert labels[0, :, 0].tolist() == [12, 13, 14, -100, -100]
    assert labels[0, :, 1].tolist() == [13, 14, -100, -100, -100]
    from amphista.training.data import Example

    assert label_counts([Example([10, 11, 12, 13, 14], [0, 0, 1, 1, 1])], 2).tolist() == [3.0, 2.0]
    batches = epoch_batches([5, 9, 3, 7, 8, 2, 4], 2, seed=0, epoch=0)
    assert len(batches) == 3 and batches == epoch_batches([5, 9, 3, 7, 8, 2, 4], 2, seed=0, epoch=0)
    ids, mask = collate([Example([1, 2, 3], [1, 1, 1]), Example([4], [1])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---- the loop -----------------------------------------------------------------------------------------


def test_loss_decreases_and_output_is_a_drafter(tmp_path):
    data = write_stories(tmp_path / "stories.jsonl", n=48)
    target = tiny_target()
    cfg = config(tmp_path, [data], drafter="amphista", max_steps=30, log_every=5, batch_size=8, tensorboard=True)
    result = train(cfg, target=target)
    assert os.listdir(tmp_path / "out" / "tensorboard")
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    lm = [r["lm_loss"][0] for r in rows if "loss" in r]
    # The random target's own distribution is hard to match; the data's LM term falls fast.
    assert losses[-1] < 0.9 * losses[0] and lm[-1] < 0.7 * lm[0], (losses, lm)
    drafter = amphista.drafters.load_drafter(tmp_path / "out", target)
    assert isinstance(drafter, AmphistaDrafter)
    acc = load_accuracies(tmp_path / "out" / "head_accuracy.json")
    assert len(acc) == 4 and all(len(row) == 5 for row in acc)
    assert all(a <= b for row in acc for a, b in zip(row, row[1:]))  # cumulative top-k
    build_tree(acc, 16)
    assert result.head_accuracy["top_k"] == acc
    saved = json.load(open(tmp_path / "out" / "training_config.json"))
    assert saved["drafter"] == "amphista" and saved["steps"] == 30


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_resume_equals_uninterrupted(tmp_path):
    data = write_chats(tmp_path / "chats.jsonl", n=24)
    target = tiny_target()
    kw = dict(max_steps=8, save_every=3, batch_size=4, micro_batch_size=2)  # 2 accumulation steps
    full = config(tmp_path / "a", [data], drafter="amphista", **kw)
    train(full, target=target)

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 5:  # after the step-3 checkpoint, before the next one
            raise Crash

    part = config(tmp_path / "b", [data], drafter="amphista", **kw)
    with pytest.raises(Crash):
        train(part, target=target, callback=crash)
    assert [os.path.basename(p) for p in list_checkpoints(part.out)] == ["step-00000003"]
    part.resume = True
    train(part, target=target)
    a, b = _weights(full.out), _weights(part.out)
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-exact on CPU
    steps = [json.loads(line)["step"] for line in open(os.path.join(part.out, "metrics.jsonl"))]
    losses = lambda out: [r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]  # noqa: E731
    assert [s for s in steps if s] == sorted(s for s in steps if s)  # no step logged twice
    assert losses(full.out) == pytest.approx(losses(part.out), abs=1e-5)


def test_resume_refuses_other_settings_naming_old_and_new(tmp_path):
    data = write_stories(tmp_path / "s.jsonl", n=16)
    target = tiny_target()
    train(config(tmp_path, [data], drafter="medusa", max_steps=2, batch_size=4, seq_len=64), target=target)

    def resume(files=(data,), **kw):
        return train(config(tmp_path, list(files), **{"drafter": "medusa", "max_steps": 2, "resume": True, **kw}),
                     target=target)  # fmt: skip

    with pytest.raises(InputError, match="is a Medusa run and --drafter is amphista: pass --drafter medusa"):
        resume(drafter="amphista")
    with pytest.raises(InputError) as e:
        resume(batch_size=2, seq_len=32)
    assert "--batch-size 2 (was 4)" in str(e.value) and "--seq-len 32 (was 64)" in str(e.value)
    with pytest.raises(InputError, match=r"--lr 0.5 \(was 0.01\)"):  # None meant medusa's default 1e-2
        resume(lr=0.5)
    with pytest.raises(InputError, match=r"--set num_heads=3 \(was unset\)"):
        resume(drafter_config={"num_heads": 3})
    other = write_stories(tmp_path / "other.jsonl", n=16, seed=1)
    with pytest.raises(InputError, match="training data differs"):
        resume(files=[other])
    # How a global batch is split over processes and micro-batches changes no gradient: allowed.
    resume(micro_batch_size=2)

    # A checkpoint from before checkpoints recorded their config: the finished run's training_config.json.
    ckpt = list_checkpoints(str(tmp_path / "out"))[-1]
    state_path = os.path.join(ckpt, "trainer_state.json")
    state = json.load(open(state_path))
    json.dump({k: state[k] for k in ("step", "epoch", "cursor")}, open(state_path, "w"))
    with pytest.raises(InputError, match="is a Medusa run"):
        resume(drafter="amphista")


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "file.json"
    atomic_write(str(path), lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(str(path), boom)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.json"]

    # A run killed while writing a checkpoint leaves only a temporary folder, which resume ignores.
    data = write_stories(tmp_path / "s.jsonl", n=16)
    cfg = config(tmp_path, [data], max_steps=4, save_every=2)
    from accelerate import Accelerator

    real = Accelerator.save_state

    def dying_save(self, output_dir=None, **kw):
        real(self, output_dir, **kw)
        if "step-00000004" in output_dir:
            raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, target=tiny_target())
    names = sorted(os.listdir(os.path.join(cfg.out, "checkpoints")))
    assert names == [".step-00000004.tmp", "step-00000002"]
    assert find_checkpoint(cfg.out, True).endswith("step-00000002")
    with pytest.raises(CheckpointError):
        find_checkpoint(cfg.out, str(tmp_path / "nowhere"))


def test_overrides_and_config_checks(tmp_path):
    cfg = apply_overrides(TrainConfig(), ["lr=0.01", "num_heads=3", "head_weighting=equal", "eval_data=x.jsonl"])
    assert cfg.lr == 0.01 and cfg.drafter_config == {"num_heads": 3} and cfg.eval_data == ["x.jsonl"]
    with pytest.raises(InputError):
        apply_overrides(TrainConfig(), ["batch_size=big"])
    with pytest.raises(InputError):
        apply_overrides(TrainConfig(), ["novalue"])
    data = write_stories(tmp_path / "s.jsonl", n=16)
    with pytest.raises(InputError, match="micro_batch_size"):
        train(config(tmp_path, [data], batch_size=4, micro_batch_size=3), target=tiny_target())


def test_measured_path_frequencies_count_each_node_the_way_greedy_verification_accepts():
    from amphista.training.evaluate import TOPK, _count_paths, _path_table

    g = torch.Generator().manual_seed(0)
    K = 3
    # A small vocabulary of 8 makes hits at every rank and depth common; -100 marks positions without a label.
    top = torch.stack([torch.randperm(8, generator=g)[:TOPK] for _ in range(2 * 30 * K)]).view(2, 30, K, TOPK)
    labels = torch.randint(0, 8, (2, 30, K), generator=g)
    labels[0, -2:, 2] = -100
    labels[1, -1:, 1:] = -100
    path_hits = [torch.zeros(2, TOPK ** (d + 1)) for d in range(K)]
    positions = torch.zeros(2)
    _count_paths(top, labels, 1, path_hits, positions)
    table = _path_table(path_hits, positions, 1)

    counts, n = {}, 0
    for b in range(2):
        for t in range(30):
            if (labels[b, t] < 0).any():
                continue
            n += 1
            path = []
            for k in range(K):
                hit = (top[b, t, k] == labels[b, t, k]).nonzero().flatten().tolist()
                if not hit:
                    break
                path.append(hit[0])
                counts[tuple(path)] = counts.get(tuple(path), 0) + 1
    assert positions[1] == n == 57 and positions[0] == 0
    measured = {tuple(p): f for p, f in table}
    assert measured.keys() == counts.keys() and max(map(len, counts)) == K and len(counts) > 20
    for node, c in counts.items():
        assert measured[node] == pytest.approx(c / n, abs=1e-6), node
    assert [f for _, f in table] == sorted((f for _, f in table), reverse=True)


def test_head_accuracy_writes_consistent_path_tables(tmp_path):
    from amphista.training.evaluate import head_accuracy

    target = tiny_target()
    drafter = AmphistaDrafter.for_target(target, num_heads=3)
    examples, _ = load_examples([write_stories(tmp_path / "s.jsonl", n=6)], tokenizer(), seq_len=48)
    result = head_accuracy(drafter, target, examples, batch_size=4)
    for key, top_k in (("paths", "top_k"), ("paths_target", "top_k_target")):
        freq = {tuple(p): f for p, f in result[key]}
        assert freq, key
        assert all(freq[p[:-1]] >= f for p, f in freq.items() if len(p) > 1)  # a child never beats its parent
        # Depth 1 is head 1's top-5 accuracy, over the positions where every head has a label.
        assert sum(f for p, f in freq.items() if len(p) == 1) == pytest.approx(result[top_k][0][-1], abs=0.05)
