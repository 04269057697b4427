"""Self-distillation: the target answers prompts, and its answers become the drafter's training data.

Prompts: a .txt file (one per line) or JSONL/JSON records with `turns` (MT-Bench), `prompt`, `text`,
`instruction` (+ `input`), or `conversations`/`messages` (their user turns are replayed one by one).
Output, JSONL with one record per (prompt, sample):
  chat        {"id": "12:0", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}, ...]}
  completion  {"id": "12:0", "text": "<prompt + continuation>"}   (a base model continues the text)
Resumable: records whose id is already in the output are skipped, and a last line cut by an
interruption is removed first, so nothing is duplicated or lost.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import BatchingError, InputError
from ..target import TargetModel
from ..vanilla import VanillaDecoder
from .data import _message, chat_template, check_output, read_records, read_text

CHUNK_BATCHES = 4  # prompts per write, in batch sizes: finished rows are replaced until the chunk runs dry
TURN_SEEDS = 1 << 40  # sampling seeds of a chunk's later turns start this far from the first turn's


@dataclass
class DistillConfig:
    target: str = ""
    prompts: str = ""
    out: str = ""
    batch_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 1.0
    num_samples: int = 1  # answers per prompt (sampling)
    mode: str = "auto"  # chat | completion | auto: completion when there is no chat template and one turn
    system: str | None = None  # system prompt for chat mode
    max_prompts: int | None = None
    seed: int = 0
    progress: bool = True
    device: str | None = None  # where the target runs (default: the CPU)
    dtype: str = "auto"  # the target's weights (target.DTYPE_NAMES); auto: as saved


@dataclass
class Prompt:
    id: str
    turns: list[str]
    system: str | None = None


def _turns(record) -> tuple[list[str], str | None]:
    if isinstance(record, str):
        return [record], None
    if not isinstance(record, dict):
        raise ValueError("expected an object or a string")
    if "turns" in record:
        return list(record["turns"]), None
    for key in ("prompt", "text"):
        if key in record:
            return [record[key]], None
    if "instruction" in record:
        extra = record.get("input") or ""
        return [record["instruction"] + ("\n\n" + extra if extra else "")], record.get("system")
    for key, role, content in (("conversations", "from", "value"), ("messages", "role", "content")):
        if key in record:
            msgs = [_message(t, role, content) for t in record[key]]
            system = next((m["content"] for m in msgs if m["role"] == "system"), None)
            return [m["content"] for m in msgs if m["role"] == "user"], system
    raise ValueError("no 'turns', 'prompt', 'text', 'instruction', 'conversations' or 'messages' field")


def read_prompts(path: str) -> list[Prompt]:
    """Prompts with stable ids (their line number), so a resumed run knows which are done."""
    prompts, bad = [], []
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise InputError(f"prompt file {path!r} does not exist")
        # Split the way text-mode iteration does (any newline style, nothing else), so that the line
        # numbers, which are the prompt ids a resumed run matches, stay those of earlier versions.
        text = read_text(path, "prompt file").replace("\r\n", "\n").replace("\r", "\n")
        prompts = [Prompt(str(n), [line]) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    else:
        for n, record in read_records(path, "prompt file"):
            try:
                turns, system = _turns(record)
                if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                    raise ValueError("no non-empty user turn")
                prompts.append(Prompt(str(n), turns, system))
            except ValueError as e:
                bad.append((n, str(e)))
    if bad:
        print(f"{path}: skipped {len(bad)} malformed prompts: " + ", ".join(f"line {n} ({e})" for n, e in bad[:10]))
    if not prompts:
        raise InputError(f"no usable prompt in {path!r}")
    return prompts


def finished_ids(path: str) -> set[str]:
    """Ids already written; first cuts a partial last line left by an interrupted write."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    ids = set()
    for line in data[:end].decode("utf-8", errors="replace").splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def _generate(decoder, tokenizer, texts: list[str], cfg: DistillConfig, special: bool, seed: int):
    """(prompt ids, new ids up to the first EOS) per text, None for a text that fills the target's context
    window. The project's batch engine decodes them, at most cfg.batch_size rows at once, each row with its
    own cache length (no padding) and a waiting text taking the place of a finished one: greedy answers are
    those of `generate` on each text alone, and no row waits for the longest one, as in transformers' padded
    `generate` (docs/training.md has the times). The n-th text that fits samples with seed + n."""
    eos = set(decoder.target.eos_token_ids())
    limit = decoder.target.max_context
    prompts = [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
    fits = [i for i, p in enumerate(prompts) if limit is None or len(p) < limit]
    options = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    results: list[tuple[list, list] | None] = [None] * len(prompts)
    if not fits:
        return results
    try:
        batch = [prompts[i] for i in fits]
        outputs = decoder.generate_batch(batch, max_batch_size=cfg.batch_size, seed=seed, **options)
    except BatchingError:  # a target the batch engine cannot hold: the same answers, one prompt at a time
        outputs = [decoder.generate(prompts[i], seed=seed + n, **options) for n, i in enumerate(fits)]
    for i, out in zip(fits, outputs):
        new = out.new_tokens
        cut = next((k for k, t in enumerate(new) if t in eos), len(new))
        results[i] = (prompts[i], new[:cut])
    return results


def _chat_records(decoder, tok, template, batch, cfg: DistillConfig, seed: int) -> tuple[list[dict], int]:
    """Chat mode: each prompt's user turns answered one after another -> (records, new tokens). A conversation
    ends before a turn that fills the target's context window; one that ends before its first answer gives no
    record."""
    system = [cfg.system or p.system for _, p in batch]
    convs = [[{"role": "system", "content": text}] if text else [] for text in system]
    ended = [False] * len(batch)
    new_tokens = 0
    for turn in range(max(len(p.turns) for _, p in batch)):
        live = [b for b, (_, p) in enumerate(batch) if turn < len(p.turns) and not ended[b]]
        asks = {b: convs[b] + [{"role": "user", "content": batch[b][1].turns[turn]}] for b in live}
        texts = [
            tok.apply_chat_template(asks[b], chat_template=template, tokenize=False, add_generation_prompt=True)
            for b in live
        ]
        for b, answer in zip(live, _generate(decoder, tok, texts, cfg, False, seed + turn * TURN_SEEDS)):
            if answer is None:
                ended[b] = True
                continue
            new_tokens += len(answer[1])
            reply = tok.decode(answer[1], skip_special_tokens=True).strip()
            convs[b] = asks[b] + [{"role": "assistant", "content": reply}]
    share = {"system": "system", "user": "human", "assistant": "gpt"}
    records = [
        {"id": i, "conversations": [{"from": share[m["role"]], "value": m["content"]} for m in conv]}
        for (i, _), conv in zip(batch, convs)
        if any(m["role"] == "assistant" for m in conv)
    ]
    return records, new_tokens


def check_settings(cfg: DistillConfig) -> None:
    """Raise InputError, naming the flag, for a setting distillation cannot run with."""
    for name, value in (("batch_size", cfg.batch_size), ("max_new_tokens", cfg.max_new_tokens),
                        ("num_samples", cfg.num_samples), ("max_prompts", cfg.max_prompts)):  # fmt: skip
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"--{name.replace('_', '-')} is {value!r}: it must be an integer, at least 1")
    if not cfg.temperature >= 0:
        raise InputError(f"--temperature is {cfg.temperature}: it must be 0 (greedy) or more")
    if not 0 < cfg.top_p <= 1:
        raise InputError(f"--top-p is {cfg.top_p}: it must be in (0, 1]")
    if cfg.mode not in ("auto", "chat", "completion"):
        raise InputError(f"--mode is {cfg.mode!r}: use auto, chat or completion")


@torch.inference_mode()
def distill(cfg: DistillConfig, target=None) -> dict:
    """Answer every prompt with the target; append to cfg.out. Returns counts."""
    check_settings(cfg)
    check_output(cfg.out, "--out", folder=False)
    prompts = read_prompts(cfg.prompts)[: cfg.max_prompts]
    if target is None:
        target = TargetModel.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
    target = TargetModel.wrap(target)
    tok = target.tokenizer
    if tok is None:
        raise InputError("the target has no tokenizer: save one in the target folder")
    mode = cfg.mode
    if mode == "auto":
        single = all(len(p.turns) == 1 and not p.system for p in prompts)
        mode = "completion" if getattr(tok, "chat_template", None) is None and single else "chat"
    jobs = [(f"{p.id}:{s}", p) for p in prompts for s in range(cfg.num_samples)]
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    done = finished_ids(cfg.out)
    # Sorted by length: a chunk's cache is sized by its longest prompt.
    todo = sorted((j for j in jobs if j[0] not in done), key=lambda j: len(j[1].turns[0]))
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), disable=not cfg.progress, desc="distill", unit="rec")
    template = chat_template(tok)
    decoder = VanillaDecoder(target)
    too_long: list[str] = []  # prompts whose first turn fills the target's context window
    new_tokens, t0 = 0, time.perf_counter()
    # Prompts decoded together, cfg.batch_size rows at a time: enough to keep every row busy to the end.
    chunk = cfg.batch_size * CHUNK_BATCHES
    with open(cfg.out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            # Row i of a chunk's turn t samples with seed + i: distinct across the run's chunks and turns.
            seed = (cfg.seed * 1_000_003 + len(done) + start) % 2**62  # + turns and rows: a valid seed
            if mode == "completion":
                gens = _generate(decoder, tok, [p.turns[0] for _, p in batch], cfg, True, seed)
                records = [
                    {"id": i, "text": tok.decode(g[0] + g[1], skip_special_tokens=True)}
                    for (i, _), g in zip(batch, gens)
                    if g is not None
                ]
                new_tokens += sum(len(g[1]) for g in gens if g is not None)
            else:
                records, tokens = _chat_records(decoder, tok, template, batch, cfg, seed)
                new_tokens += tokens
            written = {r["id"] for r in records}
            too_long += [i for i, _ in batch if i not in written]
            # One write per chunk, flushed to disk: an interruption loses at most this chunk's tail line.
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    if too_long:
        print(
            f"skipped {len(too_long)} prompts that fill the target's context window of {target.max_context} "
            f"tokens (shorten them or use a target with a longer context): ids {', '.join(too_long[:10])}"
            + (" ..." if len(too_long) > 10 else "")
        )
    return {
        "total": len(jobs), "written": len(todo) - len(too_long), "already_done": len(jobs) - len(todo),
        "too_long": len(too_long), "mode": mode, "new_tokens": new_tokens, "seconds": time.perf_counter() - t0,
    }  # fmt: skip
