"""Many sequences at once: one target forward verifies the trees of every live row.

`BatchEngine` is the loop behind `generate_batch`, `stream_batch` and the server's continuous batching. Rows
join at any time (`add`: the prompt is prefilled alone, into the row's own cache slot), every `step` drafts
for all live rows in one drafter call, verifies all their trees in one target forward, and commits each
row's accepted path; a row that finishes or is cancelled leaves at once. Each row keeps its own committed
length, stop rules and sampling generator, so a row's output does not depend on which rows it shared
forwards with (greedy rows equal their own plain decoding; sampled rows follow the target's distribution).

Ragged rows share one KV buffer without padding the prompts: row b's tree sits at its own committed length
L_b, written by position index, and the 4D mask lets each query see only its row's committed prefix and
its tree ancestors. Columns between a row's tree and the longest row's are masked, never read.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import InputError
from .generation import GenerateOutput, Request, sync
from .sampling import sample, target_probs
from .tree import TreeBuffers, TreeSpec
from .verify import verify_greedy, verify_sampling, verify_typical


class _RowsLayer(DynamicLayer):
    """One layer's view of the shared buffer; the cache says which rows and positions a forward writes."""

    def __init__(self, owner: RowsCache, index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True  # the owner allocates; transformers must not

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.past

    def get_max_length(self) -> int:
        return self.owner.max_len


class RowsCache(Cache):
    """The target's KV cache for up to `capacity` sequences, each with its own committed length.

    One (layers, 2, capacity, H, max_len, D) buffer: rows live in slots 0..B-1, a position's keys and values
    sit at its index, so a row's prefix never moves and committing an accepted path is one gather and one
    scatter for the whole model. `prepare` names the rows and positions the next forward writes."""

    def __init__(self, num_layers: int, capacity: int, max_len: int):
        super().__init__(layers=[_RowsLayer(self, i) for i in range(num_layers)])
        self.num_layers, self.capacity, self.max_len = num_layers, capacity, max_len
        self.buf: torch.Tensor | None = None
        self.rows = slice(0, 0)
        self.index: torch.Tensor | None = None  # (r, 1, q, 1) write positions, expanded per layer
        self.kv_end = 0
        self.past = 0

    def prepare(self, rows: slice, slots: torch.Tensor, kv_end: int) -> None:
        """The next forward writes rows `rows`, token j of row b into cache slot slots[b, j], and attends to
        slots < kv_end. (A tree's slots are not its positions: siblings share a position, not a slot.)"""
        self.rows, self.kv_end = rows, kv_end
        self.index = slots[:, None, :, None]
        self.past = kv_end - slots.shape[1]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        if self.buf is None:
            _, h, _, d = key.shape
            if value.shape[-1] != d:
                raise InputError(
                    "batched decoding needs keys and values of one head size in every layer; this target's "
                    "differ: decode its sequences one at a time with generate()"
                )
            self.buf = key.new_zeros(self.num_layers, 2, self.capacity, h, self.max_len, d)
        index = self.index.expand(-1, key.shape[1], -1, key.shape[3])
        k, v = self.buf[layer, 0, self.rows], self.buf[layer, 1, self.rows]
        k.scatter_(2, index, key)
        v.scatter_(2, index, value)
        return k[:, :, : self.kv_end], v[:, :, : self.kv_end]

    def grow(self, max_len: int) -> None:
        """Make every slot hold `max_len` positions, keeping what the live rows hold."""
        if max_len <= self.max_len:
            return
        if self.buf is not None:
            old = self.buf
            self.buf = old.new_zeros(*old.shape[:4], max_len, old.shape[5])
            self.buf[..., : self.max_len, :] = old
        self.max_len = max_len

    def commit(self, rows: int, starts: list[int], nodes: list[list[int]]) -> None:
        """Row b wrote a tree at starts[b]..; keep its accepted `nodes[b]` (ascending, root first) at
        starts[b].. . Rows whose accepted nodes already sit in place (a chain of top-1s) need no copy."""
        if self.buf is None or all(n[-1] == len(n) - 1 for n in nodes):
            return
        width = max(len(n) for n in nodes)
        src = torch.tensor(
            [[s + (n[i] if i < len(n) else n[-1]) for i in range(width)] for s, n in zip(starts, nodes)]
        )
        dst = torch.tensor([[s + i for i in range(width)] for s in starts])
        buf = self.buf[:, :, :rows]
        shape = (*buf.shape[:3], buf.shape[3], width, buf.shape[5])
        src = src.to(buf.device)[None, None, :, None, :, None].expand(shape)
        dst = dst.to(buf.device)[None, None, :, None, :, None].expand(shape)
        buf.scatter_(4, dst, buf.gather(4, src))

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot `src`'s first `length` positions now live in slot `dst`."""
        if self.buf is not None and src != dst:
            self.buf[:, :, dst, :, :length] = self.buf[:, :, src, :, :length]


@dataclass
class RowEvent:
    """What one step did for one row: the tokens it committed (after stop rules), and its GenerateOutput
    once it finished (None while it runs)."""

    id: int
    tokens: list[int]
    output: GenerateOutput | None = None


@dataclass
class _Row:
    id: int
    request: Request
    t0: float
    length: int = 0  # positions in the target's cache
    root: int = 0  # the newest committed token, not yet in the cache
    generated: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    unreported: list[int] = field(default_factory=list)
    reason: str | None = None
    # Committed positions the drafter has not seen yet: hidden states, the token after each, first position.
    pending_hidden: list[torch.Tensor] = field(default_factory=list)
    pending_tokens: list[int] = field(default_factory=list)
    pending_start: int = 0


class BatchEngine:
    """Decode up to `max_rows` sequences together with a SpeculativeDecoder or VanillaDecoder.

        engine = BatchEngine(decoder, max_rows=8)
        rid = engine.add(prompt_ids, max_new_tokens=64)      # the keywords of decoder.generate
        while engine:                                         # rows are live
            for event in engine.step():                       # event.id, event.tokens, event.output
                ...
        engine.cancel(rid)                                    # frees the row at once

    `add` checks the request and prefills its prompt (its first token comes with the next step's events).
    Each step uses the decoder's tree policy: a fixed tree, a tree chosen for the number of live rows
    (tree="auto"), or one node (plain decoding, no draft) for VanillaDecoder or where no tree pays.
    """

    def __init__(self, decoder, max_rows: int = 8, max_len: int | None = None):
        if max_rows < 1:
            raise InputError(f"max_rows must be >= 1, got {max_rows}")
        self.decoder = decoder
        self.target = decoder.target
        self.drafter = getattr(decoder, "drafter", None)
        if self.drafter is not None and not getattr(self.drafter, "supports_rows", False):
            raise InputError(
                f"{type(self.drafter).__name__} does not support batched decoding (it lacks reset_rows/draft_rows/"
                "move_row, see amphista.drafters.base): decode one prompt at a time with generate()"
            )
        self.max_rows = max_rows
        self.max_len = max_len  # cache positions per row; None: sized by the first request, grown as needed
        self.rows: list[_Row] = []
        self.cache: RowsCache | None = None
        self._ids = itertools.count()
        self._buffers: dict = {}  # TreeSpec (None: plain) -> its buffers
        self._early: list[RowEvent] = []  # rows that finished at prefill
        self.last_tree: TreeSpec | None = None  # the tree of the latest step (None: plain)
        cfg = self.target.text_config
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        types = getattr(cfg, "layer_types", None)
        self.layer_types = sorted(set(types)) if types else None
        self.window = (
            window if (self.layer_types is None or "sliding_attention" in self.layer_types) else None
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows) or bool(self._early)

    @property
    def ids(self) -> list[int]:
        """The ids of the live rows, in slot order."""
        return [row.id for row in self.rows]

    # --- joining and leaving ---------------------------------------------------------------------

    def add(self, input_ids, **kwargs) -> int:
        """Check and prefill one prompt; return its row id. Raises InputError for a bad request, and when
        `max_rows` rows are live."""
        request = self.decoder._request(input_ids, kwargs, "add")
        return self.add_request(request)

    @torch.inference_mode()
    def add_request(self, request: Request) -> int:
        if len(self.rows) >= self.max_rows:
            raise InputError(f"the batch is full ({self.max_rows} rows): wait for a row to finish")
        target, device = self.target, self.target.device
        row = _Row(next(self._ids), request, time.perf_counter())
        need = len(request.prompt) + request.max_new_tokens + tree_slots(self.decoder)
        if self.cache is None:
            size = max(need, self.max_len or 0)
            self.cache = RowsCache(target.num_layers, self.max_rows, size)
            if self.drafter is not None:
                self.drafter.reset_rows(self.max_rows, size)
        elif need > self.cache.max_len:
            self._grow(max(need, 2 * self.cache.max_len))
        slot = len(self.rows)
        ts = time.perf_counter()
        prompt = torch.tensor([request.prompt], device=device)
        t = prompt.shape[1]
        positions = torch.arange(t, device=device)[None]
        self.cache.prepare(slice(slot, slot + 1), positions, t)
        causal = torch.full((t, t), torch.finfo(target.dtype).min, dtype=target.dtype, device=device).triu(1)
        out = target.forward(
            prompt,
            position_ids=positions,
            attention_mask=self._layer_masks(causal[None, None], positions),
            cache=self.cache,
            logits_at=slice(-1, None),
        )
        logits = out.logits[0, -1]
        first = (
            int(logits.argmax())
            if request.params.greedy
            else sample(target_probs(logits, request.params), request.generator)
        )
        row.length, row.root = t, first
        if self.drafter is not None:
            succ = request.prompt[1:] + [first]
            if t > 1:  # the prompt's positions but the last: the first step's draft starts from that one
                self.drafter.draft_rows(
                    out.hidden[:, : t - 1],
                    torch.tensor([succ[:-1]], device=device),
                    torch.zeros(1, dtype=torch.long, device=device),
                    torch.tensor([t - 1], device=device),
                    0,
                    0,
                    rows=slice(slot, slot + 1),
                )
            row.pending_hidden, row.pending_tokens, row.pending_start = (
                [out.hidden[0, t - 1 :]],
                [first],
                t - 1,
            )
        sync(device)
        row.step_times.append(time.perf_counter() - ts)
        emitted, row.reason = request.stop(row.generated, [first])
        row.accept_lengths.append(len(emitted))
        row.unreported.extend(emitted)
        if row.reason is not None:
            self._early.append(RowEvent(row.id, row.unreported, self._output(row)))
        else:
            self.rows.append(row)
        return row.id

    @torch.inference_mode()
    def cancel(self, row_id: int) -> bool:
        """Drop a row now (its slot is free for the next `add`); False when no live row has that id."""
        for slot, row in enumerate(self.rows):
            if row.id == row_id:
                self._remove(slot)
                return True
        self._early = [e for e in self._early if e.id != row_id]
        return False

    def _remove(self, slot: int) -> None:
        last = len(self.rows) - 1
        if slot != last:  # keep the live rows in slots 0..B-1: the last one moves into the hole
            moved = self.rows[last]
            self.cache.move(last, slot, moved.length)
            if self.drafter is not None:
                self.drafter.move_row(last, slot)
            self.rows[slot] = moved
        self.rows.pop()

    def _grow(self, max_len: int) -> None:
        """A request longer than any so far joined: every slot gets room for it, live rows keep their state."""
        self.cache.grow(max_len)
        if self.drafter is not None:
            self.drafter.grow_rows(max_len)

    # --- one step ----------------------------------------------------------------------------------

    def _buffers_for(self, spec: TreeSpec | None) -> TreeBuffers | _RootOnly:
        buf = self._buffers.get(spec)
        if buf is None:
            device = self.target.device
            buf = self._buffers[spec] = _RootOnly(device) if spec is None else TreeBuffers(spec, device)
        return buf

    def _layer_masks(self, mask: torch.Tensor, q_pos: torch.Tensor):
        """mask (B, 1, q, kv) additive, q_pos (B, q) absolute positions -> what the target's forward takes."""
        if self.window is None:
            return mask
        kv = torch.arange(mask.shape[-1], device=mask.device)
        too_far = (q_pos[:, None, :, None] - kv) >= self.window
        sliding = mask.masked_fill(too_far, torch.finfo(mask.dtype).min)
        if self.layer_types is None:
            return sliding
        return {"full_attention": mask, "sliding_attention": sliding}

    def _draft(self, tree: TreeSpec) -> torch.Tensor:
        """(B, depth, k) target ids from every live row's unseen committed positions."""
        device = self.target.device
        rows = self.rows
        n = max(len(r.pending_tokens) for r in rows)
        d = rows[0].pending_hidden[0].shape[-1]
        hidden = torch.zeros(len(rows), n, d, dtype=rows[0].pending_hidden[0].dtype, device=device)
        tokens = torch.zeros(len(rows), n, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            h = r.pending_hidden[0] if len(r.pending_hidden) == 1 else torch.cat(r.pending_hidden)
            hidden[b, : h.shape[0]] = h
            tokens[b, : len(r.pending_tokens)] = torch.tensor(r.pending_tokens, device=device)
        start = torch.tensor([r.pending_start for r in rows], device=device)
        count = torch.tensor([len(r.pending_tokens) for r in rows], device=device)
        top = self.drafter.draft_rows(
            hidden, tokens, start, count, tree.depth, tree.max_rank + 1, rows=slice(0, len(rows))
        )
        for r in rows:
            r.pending_hidden, r.pending_tokens = [], []
        return top

    @torch.inference_mode()
    def step(self) -> list[RowEvent]:
        """One target forward for every live row; the events of the rows that committed tokens or finished.
        Rows that finished leave the batch before this returns."""
        events, self._early = self._early, []
        if not self.rows:
            return events
        target, device = self.target, self.target.device
        ts = time.perf_counter()
        rows = self.rows
        B = len(rows)
        policy = getattr(self.decoder, "tree_policy", None)
        tree = policy.choose(B) if (policy is not None and self.drafter is not None) else None
        self.last_tree = tree
        buf = self._buffers_for(tree)
        N = buf.num_nodes
        roots = torch.tensor([[r.root] for r in rows], device=device)
        if tree is not None:
            top = self._draft(tree)  # (B, depth, k)
            tokens = torch.cat([roots, top.view(B, -1)[:, buf.flat]], dim=1)  # (B, N)
        else:
            tokens = roots
        starts = [r.length for r in rows]
        start = torch.tensor(starts, device=device)
        positions = start[:, None] + buf.depth[None]  # (B, N)
        kv_end = max(starts) + N
        rel = torch.arange(kv_end, device=device)[None] - start[:, None]  # (B, kv)
        in_tree = (rel >= 0) & (rel < N)
        ancestors = buf.mask[:, rel.clamp(0, N - 1)].permute(1, 0, 2)  # (B, N, kv)
        allowed = (rel < 0)[:, None, :] | (in_tree[:, None, :] & ancestors)
        mask = torch.zeros(B, 1, N, kv_end, dtype=target.dtype, device=device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(target.dtype).min)
        # Node j of row b sits in cache slot start_b + j (commit expects that order); its position is its depth.
        slots = start[:, None] + torch.arange(N, device=device)[None]
        self.cache.prepare(slice(0, B), slots, kv_end)
        out = target.forward(
            tokens,
            position_ids=positions,
            attention_mask=self._layer_masks(mask, positions),
            cache=self.cache,
        )
        logits = out.logits  # (B, N, V)
        accepted, new_tokens = [], []
        for b, r in enumerate(rows):
            req = r.request
            if req.params.greedy:
                nodes, idx, bonus = verify_greedy(tokens[b], logits[b], buf)
            elif req.acceptance == "typical":
                nodes, idx, bonus = verify_typical(tokens[b], logits[b], buf, req.params, req.generator)
            else:
                nodes, idx, bonus = verify_sampling(tokens[b], logits[b], buf, req.params, req.generator)
            accepted.append(nodes)
            new_tokens.append((idx, tokens[b, idx[1:]].tolist() + [bonus]))
        self.cache.commit(B, starts, accepted)
        sync(device)
        seconds = time.perf_counter() - ts
        finished = []
        for b, (r, nodes, (idx, new)) in enumerate(zip(rows, accepted, new_tokens)):
            if self.drafter is not None:
                if not r.pending_tokens:
                    r.pending_start = r.length
                r.pending_hidden.append(out.hidden[b, idx])
                r.pending_tokens.extend(new)
            r.length += len(nodes)
            r.root = new[-1]
            emitted, r.reason = r.request.stop(r.generated, new)
            r.accept_lengths.append(len(emitted))
            r.step_times.append(seconds)
            r.unreported.extend(emitted)
            if r.reason is not None:
                events.append(RowEvent(r.id, r.unreported, self._output(r)))
                finished.append(b)
            elif r.unreported:
                events.append(RowEvent(r.id, r.unreported))
                r.unreported = []
        for b in reversed(finished):
            self._remove(b)
        if policy is not None and hasattr(policy, "observe"):
            policy.observe(B, N, seconds)
        return events

    def _output(self, row: _Row) -> GenerateOutput:
        seq = torch.tensor([row.request.prompt + row.generated], dtype=torch.long)
        return GenerateOutput(
            seq,
            row.accept_lengths,
            row.reason,
            len(row.request.prompt),
            time.perf_counter() - row.t0,
            row.step_times,
        )


def tree_slots(decoder) -> int:
    """Cache positions a step may write beyond a row's committed ones: the largest tree the decoder uses."""
    policy = getattr(decoder, "tree_policy", None)
    return policy.max_nodes if policy is not None else 1


class _RootOnly:
    """The buffers of a one-node tree (plain decoding: the root alone, nothing drafted), in TreeBuffers' form."""

    num_nodes = 1

    def __init__(self, device):
        self.parent = torch.zeros(1, dtype=torch.long, device=device)
        self.depth = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.ones(1, 1, dtype=torch.bool, device=device)
        self.retrieve = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.valid = torch.ones(1, 1, dtype=torch.bool, device=device)
        self.children: list[list[int]] = [[]]


def run_batch(decoder, prompts, options: dict, max_rows: int | None = None) -> Iterator[dict[int, list[int]]]:
    """Decode `prompts` (in order) together; yield {prompt index: new tokens} per step; return the outputs.

    A `seed` gives row i the seed `seed + i` (wrapped into torch's range), so each row's sampled stream is
    reproducible on its own."""
    from .generation import SEED_MAX, SEED_MIN

    prompts = list(prompts)
    if not prompts:
        raise InputError("generate_batch needs at least one prompt")
    seed = options.get("seed")
    requests = []
    for i, prompt in enumerate(prompts):
        opts = dict(options)
        if (
            seed is not None
            and isinstance(seed, int)
            and not isinstance(seed, bool)
            and SEED_MIN <= seed <= SEED_MAX
        ):
            opts["seed"] = SEED_MIN + (seed + i - SEED_MIN) % (SEED_MAX - SEED_MIN + 1)
        try:
            requests.append(decoder._request(prompt, opts, "generate_batch"))
        except InputError as e:
            raise InputError(f"prompt {i}: {e}") from None
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise InputError(
            f"max_batch_size must be a positive integer or None (all prompts at once), got {max_rows!r}"
        )
    rows = len(requests) if max_rows is None else min(max_rows, len(requests))
    # Sized for the longest request up front: no row ever waits for the cache to grow.
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engine = BatchEngine(decoder, rows, max_len=longest + tree_slots(decoder))
    index_of: dict[int, int] = {}
    outputs: list[GenerateOutput | None] = [None] * len(requests)
    waiting = list(range(len(requests)))
    while waiting or engine:
        while waiting and len(engine) < engine.max_rows:
            i = waiting.pop(0)
            index_of[engine.add_request(requests[i])] = i
        step: dict[int, list[int]] = {}
        for event in engine.step():
            i = index_of[event.id]
            if event.tokens:
                step[i] = event.tokens
            if event.output is not None:
                outputs[i] = event.output
        if step:
            yield step
    return outputs


class StepTimer:
    """Times the pieces of a batched step on this machine, for the cost model behind tree="auto": one target
    forward of `rows` x `tokens` (a causal block after `context` committed positions per row) and one
    draft call for `rows` rows. The cache holds zeros: the arithmetic, not the values, sets the time."""

    def __init__(self, decoder, max_rows: int, max_tokens: int, context: int = 128):
        self.target, self.drafter = decoder.target, getattr(decoder, "drafter", None)
        self.context = context
        self.cache = RowsCache(self.target.num_layers, max_rows, context + max_tokens)
        if self.drafter is not None:
            self.drafter.reset_rows(max_rows, context + max_tokens)
        self._hidden: torch.Tensor | None = None

    @torch.inference_mode()
    def forward(self, rows: int, tokens: int) -> float:
        target, device = self.target, self.target.device
        positions = (self.context + torch.arange(tokens, device=device)).expand(rows, tokens)
        mask = torch.zeros(rows, 1, tokens, self.context + tokens, dtype=target.dtype, device=device)
        mask[..., self.context :] = torch.full(
            (tokens, tokens), torch.finfo(target.dtype).min, dtype=target.dtype, device=device
        ).triu(1)
        ids = torch.randint(target.vocab_size, (rows, tokens), device=device)
        self.cache.prepare(slice(0, rows), positions, self.context + tokens)
        sync(device)
        t0 = time.perf_counter()
        out = target.forward(ids, position_ids=positions, attention_mask=mask, cache=self.cache)
        sync(device)
        seconds = time.perf_counter() - t0
        if self._hidden is None:
            self._hidden = out.hidden[:1, :1].clone()
        return seconds

    @torch.inference_mode()
    def draft(self, rows: int, depth: int, k: int) -> float:
        if self._hidden is None:
            self.forward(1, 1)
        device = self.target.device
        hidden = self._hidden.expand(rows, 2, -1).contiguous()  # two new positions per row, a typical step
        tokens = torch.randint(self.target.vocab_size, (rows, 2), device=device)
        start = torch.full((rows,), self.context, dtype=torch.long, device=device)
        count = torch.full((rows,), 2, dtype=torch.long, device=device)
        sync(device)
        t0 = time.perf_counter()
        self.drafter.draft_rows(hidden, tokens, start, count, depth, k, rows=slice(0, rows))
        sync(device)
        return time.perf_counter() - t0
