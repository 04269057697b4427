"""Many sequences at once: one target forward verifies the trees of every live row.

`BatchEngine` is the loop behind `generate_batch`, `stream_batch` and the server's continuous batching. Rows
join at any time (`add`, `add_requests`: prompts that join together are prefilled in one right-padded
forward, each into its own cache slot), every `step` drafts
for all live rows in one drafter call, verifies all their trees in one target forward, and commits each
row's accepted path; a row that finishes or is cancelled leaves at once. Each row keeps its own committed
length, stop rules and sampler, so a row's output does not depend on which rows it shared
forwards with (greedy rows equal their own plain decoding and sampled rows follow the target's distribution
with the same text as plain sampling for the same seed, both up to float rounding: a forward of many rows
multiplies with other kernels than one of a single row, and a near-tie between two tokens can flip, as in 1
of 512 SmolLM2 answers decoded 64 rows at a time). With tree="auto" each step's
tree (or none: plain decoding) comes from the decoder's TreePolicy for the number of live rows.

Ragged rows share one KV buffer without padding the prompts: row b's tree sits at its own committed length
L_b, written by position index, and the 4D mask lets each query see only its row's committed prefix and
its tree ancestors. Columns between a row's tree and the longest row's are masked, never read.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import BatchingError, InputError
from .generation import GenerateOutput, Request, sync
from .kv_cache import RowsCache
from .sampling import SamplingParams, sample, sample_rows, target_probs
from .target import attention_layout, window_masks
from .tree import TreeBuffers, TreeSpec, dynamic_order, smaller_trees_accepted
from .verify import accepted_path, verify_sampling, verify_typical


@dataclass
class RowEvent:
    """What one step did for one row: the tokens it committed (after stop rules), and its GenerateOutput
    once it finished (None while it runs)."""

    id: int
    tokens: list[int]
    output: GenerateOutput | None = None


@dataclass(eq=False)  # identity: a step's snapshot of its rows finds a row with tuple.index
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
    # The hidden states of plain steps are not here but in the engine's plain history (its last plain_steps).
    pending_hidden: list[torch.Tensor] = field(default_factory=list)
    pending_tokens: list[int] = field(default_factory=list)
    pending_start: int = 0
    plain_steps: int = 0  # plain steps since the drafter last saw this row


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

    def __init__(self, decoder, max_rows: int = 8, max_len: int | None = None, ragged: bool = True):
        if max_rows < 1:
            raise InputError(f"max_rows must be >= 1, got {max_rows}")
        self.decoder = decoder
        self.target = decoder.target
        self.drafter = getattr(decoder, "drafter", None)
        if self.drafter is not None and not getattr(self.drafter, "supports_rows", False):
            raise BatchingError(
                f"{type(self.drafter).__name__} does not support batched decoding (it lacks reset_rows/draft_rows/"
                "move_row, see amphista.drafters.base): decode one prompt at a time with generate()"
            )
        self.max_rows = max_rows
        self.max_len = max_len  # cache positions per row; None: sized by the first request, grown as needed
        # A fixed set of rows that all have to finish (generate_batch): trees must beat plain decoding by the
        # ragged-tail margin (TreePolicy.margin). False where a finished row's slot is refilled (the server).
        self.ragged = ragged
        self.rows: list[_Row] = []
        self.cache: RowsCache | None = None
        self._ids = itertools.count()
        self._buffers: dict = {}  # TreeSpec (None: plain) -> its buffers
        self._early: list[RowEvent] = []  # rows that finished at prefill
        self.last_tree: TreeSpec | None = None  # the tree of the latest step (None: plain)
        self.forced_tree = _UNFORCED  # StepTimer's: the tree every step uses, whatever the policy says
        # The latest plain steps' (hidden (B, 1, d), rows): what a catch-up draft reads, kept once per step
        # rather than split into every row (that per-row split cost ~1% of a 16-row plain step of the bundled
        # model), and never more than CATCH_UP of them however long a batch decodes plainly.
        self._plain_history: deque[tuple[torch.Tensor, tuple[_Row, ...]]] = deque(maxlen=self.CATCH_UP)
        try:
            self.window, self.layer_types = attention_layout(self.target.text_config)
        except InputError as e:  # a batch masks every step, its plain ones too
            raise BatchingError(f"{e}; decode its prompts one at a time with generate()") from None

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

    def add_request(self, request: Request) -> int:
        return self.add_requests([request])[0]

    # Prompts prefilled together in one forward hold a (rows, T, T) mask: past this many entries they go in
    # smaller groups, so that a batch of long prompts does not allocate gigabytes for its mask.
    PREFILL_MASK_ENTRIES = 1 << 24
    # What one more forward costs, in padded prompt positions (prefill_groups): SmolLM2 on two threads, a
    # one-token forward ~38 ms, each more position ~2 ms.
    PREFILL_FORWARD_POSITIONS = 32

    @torch.inference_mode()
    def add_requests(self, requests: list[Request]) -> list[int]:
        """Prefill several checked requests (right-padded; each row's padding lands past its own length, where
        the next step overwrites it), in groups of similar lengths (prefill_groups); return their row ids, in
        order."""
        if len(self.rows) + len(requests) > self.max_rows:
            raise InputError(f"the batch is full ({self.max_rows} rows): wait for a row to finish")
        groups = prefill_groups([len(r.prompt) for r in requests], self.PREFILL_FORWARD_POSITIONS)
        if len(groups) > 1:
            ids = {}
            for group in groups:
                ids.update(zip(group, self.add_requests([requests[i] for i in group])))
            return [ids[i] for i in range(len(requests))]
        longest = max(len(r.prompt) for r in requests)
        if len(requests) > 1 and len(requests) * longest * longest > self.PREFILL_MASK_ENTRIES:
            half = len(requests) // 2
            return self.add_requests(requests[:half]) + self.add_requests(requests[half:])
        target, device = self.target, self.target.device
        need = max(len(r.prompt) + r.max_new_tokens for r in requests)  # a tree's room comes when needed (step)
        if self.cache is None:
            size = max(need, self.max_len or 0)
            self.cache = RowsCache(target.num_layers, self.max_rows, size)
            if self.drafter is not None:
                self.drafter.reset_rows(self.max_rows, size)
        elif need > self.cache.max_len:
            # Doubling spares the next longer request a copy; never past what the context window can use.
            window = (target.max_context or need) + tree_slots(self.decoder)
            self._grow(max(need, min(2 * self.cache.max_len, window)))
        first_slot, n, t = len(self.rows), len(requests), longest
        ts = time.perf_counter()
        lengths = [len(r.prompt) for r in requests]
        ids = torch.tensor([r.prompt + [0] * (t - len(r.prompt)) for r in requests], device=device)
        positions = torch.arange(t, device=device).expand(n, t)
        self.cache.prepare(slice(first_slot, first_slot + n), positions, t)
        causal = torch.full((t, t), torch.finfo(target.dtype).min, dtype=target.dtype, device=device).triu(1)
        out = target.forward(
            ids,
            position_ids=positions,
            attention_mask=self._layer_masks(causal.expand(n, 1, t, t), positions),
            cache=self.cache,
            logits_at=slice(0, 0),
        )
        last = torch.tensor(lengths, device=device) - 1
        logits = target.logits(out.hidden[torch.arange(n, device=device), last])  # (n, V)
        greedy = logits.argmax(-1).tolist()
        rows = []
        for b, request in enumerate(requests):
            first = (
                greedy[b]
                if request.params.greedy
                else sample(target_probs(logits[b], request.params), request.sampler, lengths[b])
            )
            row = _Row(next(self._ids), request, ts, length=lengths[b], root=first)
            if self.drafter is not None:
                # The drafter reads the prompt at the row's first tree step, not now: where plain decoding is
                # chosen (many rows, a weak drafter) it never has to.
                row.pending_hidden = [out.hidden[b, : lengths[b]]]
                row.pending_tokens = request.prompt[1:] + [first]
            rows.append(row)
        sync(device)
        seconds = time.perf_counter() - ts
        self.rows.extend(rows)
        for slot in reversed(range(first_slot, first_slot + n)):
            row = self.rows[slot]
            row.step_times.append(seconds)
            emitted, row.reason = row.request.stop(row.generated, [row.root])
            row.accept_lengths.append(len(emitted))
            row.unreported.extend(emitted)
            if row.reason is not None:  # done at its first token: it leaves before any step
                self._early.append(RowEvent(row.id, row.unreported, self._output(row)))
                self._remove(slot)
        return [row.id for row in rows]

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

    def _layer_masks(self, mask: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor | None = None):
        """mask (B, 1, q, kv) additive, q_pos (B, q) positions, kv_pos the keys' positions (default: their
        slots, which they equal outside a tree block) -> what the target's forward takes."""
        if kv_pos is None:
            kv_pos = torch.arange(mask.shape[-1], device=mask.device)[None]
        return window_masks(mask, q_pos, kv_pos, self.window, self.layer_types)

    # After a run of plain steps a row has many positions the drafter has not seen; catching up on all of them
    # costs what many drafts do (Amphista, 16 rows x 128 positions: 22 ms against 1.4 ms for a step's draft on
    # the bundled model). After more plain steps than this, the drafter skips to the newest this many (a row's
    # prompt, read at its first tree step, is read whole).
    CATCH_UP = 32

    def _draft(self, depth: int, k: int, probs: bool = False):
        """(B, depth, k) target ids from every live row's unseen committed positions (probs=True: and the
        drafter's probabilities of them)."""
        device = self.target.device
        rows = self.rows
        skipped = [b for b, r in enumerate(rows) if r.plain_steps > self.CATCH_UP]
        for b in skipped:  # its newest CATCH_UP positions all come from plain steps
            r = rows[b]
            cut = len(r.pending_tokens) - self.CATCH_UP
            r.pending_hidden, r.plain_steps = [], self.CATCH_UP
            r.pending_tokens = r.pending_tokens[cut:]
            r.pending_start += cut
        if skipped:
            self.drafter.skip_rows(skipped, [rows[b].pending_start for b in skipped])
        history = list(self._plain_history)
        for r in rows:
            if r.plain_steps:
                r.pending_hidden.extend(step[members.index(r)] for step, members in history[-r.plain_steps :])
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
        top = self.drafter.draft_rows(hidden, tokens, start, count, depth, k, rows=slice(0, len(rows)), probs=probs)
        for r in rows:
            r.pending_hidden, r.pending_tokens, r.plain_steps = [], [], 0
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
        if self.forced_tree is not _UNFORCED:
            tree, policy = self.forced_tree, None
        else:
            tree = policy.choose(B, ragged=self.ragged) if (policy is not None and self.drafter is not None) else None
        self.last_tree = tree
        buf = self._buffers_for(tree)
        N = buf.num_nodes
        roots = torch.tensor([[r.root] for r in rows], device=device)
        shape = None
        if tree is not None and policy is not None and getattr(self.decoder, "dynamic_trees", False):
            shape = self.decoder.dynamic_shape(N)
        bufs = orders = None  # per row, where each row's tree is shaped from its own drafts
        if shape is not None:
            top, probs = self._draft(*shape, probs=True)  # (B, depth, k) each
            prior = self.decoder.tree_prior
            orders = [dynamic_order(p, N, prior) for p in probs.tolist()]
            bufs = [TreeBuffers.of(TreeSpec.canonical(order), device) for order in orders]
            head, rank = torch.stack([b.head for b in bufs]), torch.stack([b.rank for b in bufs])  # (B, N-1)
            tokens = torch.cat([roots, top.reshape(B, -1).gather(1, head * shape[1] + rank)], dim=1)  # (B, N)
        elif tree is not None:
            top = self._draft(tree.depth, tree.max_rank + 1)  # (B, depth, k)
            tokens = torch.cat([roots, top.view(B, -1)[:, buf.flat]], dim=1)  # (B, N)
        else:
            tokens = roots
        starts = [r.length for r in rows]
        start = torch.tensor(starts, device=device)
        kv_end = max(starts) + N
        if kv_end > self.cache.max_len:
            # Room for a tree past a row's last token comes with the first tree step that needs it, for the
            # largest tree and every live row's whole request at once: 64 spare slots per row, allocated up
            # front, slowed every plain step of 16 bundled rows by 2-4% (where `auto` decodes plainly).
            longest = max(len(r.request.prompt) + r.request.max_new_tokens for r in rows)
            self._grow(max(kv_end, longest + tree_slots(self.decoder)))
        cols = torch.arange(kv_end, device=device)[None]  # (1, kv)
        kv_pos = None  # keys' positions where they differ from their slots (a tree block)
        if tree is None:  # plain: each row's token sees its prefix and itself; four ops, not a tree's ten
            positions = slots = start[:, None]  # (B, 1)
            mask = torch.where(cols <= positions, 0.0, torch.finfo(target.dtype).min).to(target.dtype)
            mask = mask[:, None, None, :]  # (B, 1, 1, kv)
        else:
            rel = cols - start[:, None]  # (B, kv)
            in_tree = (rel >= 0) & (rel < N)
            node = rel.clamp(0, N - 1)  # (B, kv): the tree node a column holds, where it holds one
            if bufs is None:
                depth = buf.depth[None]  # (1, N)
                ancestors = buf.mask[:, node].permute(1, 0, 2)  # (B, N, kv)
            else:
                depth = torch.stack([b.depth for b in bufs])  # (B, N)
                ancestors = torch.stack([b.mask for b in bufs]).gather(2, node[:, None, :].expand(B, N, -1))
            positions = start[:, None] + depth  # (B, N)
            allowed = (rel < 0)[:, None, :] | (in_tree[:, None, :] & ancestors)
            mask = torch.zeros(B, 1, N, kv_end, dtype=target.dtype, device=device)
            mask.masked_fill_(~allowed[:, None], torch.finfo(target.dtype).min)
            # Node j of row b sits in cache slot start_b + j (commit expects that order); its position, its depth.
            slots = start[:, None] + torch.arange(N, device=device)[None]
            if self.window is not None:
                kv_pos = torch.where(in_tree, start[:, None] + depth.expand(B, -1).gather(1, node), cols)
        self.cache.prepare(slice(0, B), slots, kv_end)
        out = target.forward(
            tokens,
            position_ids=positions,
            attention_mask=self._layer_masks(mask, positions, kv_pos),
            cache=self.cache,
        )
        logits = out.logits  # (B, N, V)
        # Greedy rows need only argmaxes: two host transfers for the whole batch, then a walk per row.
        argmax = logits.argmax(-1).tolist() if any(r.request.params.greedy for r in rows) else None
        tok = tokens.tolist()
        sampled = self._sample_plain(rows, logits, starts) if tree is None else {}
        accepted, new_tokens = [], []
        for b, r in enumerate(rows):
            req = r.request
            row_buf = buf if bufs is None else bufs[b]
            if b in sampled:
                nodes, bonus = [0], sampled[b]
            elif req.params.greedy:
                if tree is None:
                    nodes, bonus = [0], argmax[b][0]
                else:
                    nodes, bonus = accepted_path(tok[b], row_buf.children, argmax[b].__getitem__)
            elif req.acceptance == "typical":
                nodes, _, bonus = verify_typical(tokens[b], logits[b], row_buf, req.params, req.sampler, starts[b])
            else:
                nodes, _, bonus = verify_sampling(tokens[b], logits[b], row_buf, req.params, req.sampler, starts[b])
            accepted.append(nodes)
            new_tokens.append([tok[b][i] for i in nodes[1:]] + [bonus])
        self.cache.commit(B, starts, accepted)
        smaller = None  # what each smaller tree would have accepted, per row on average (TreePolicy.observe)
        if orders is not None and all(r.request.params.greedy for r in rows):
            per_row = [smaller_trees_accepted(*row) for row in zip(orders, bufs, accepted)]
            smaller = [sum(counts) / B for counts in zip(*per_row)]
        if self.drafter is not None and tree is None:
            kept = out.hidden  # plain step: every row kept its root, node 0
        elif self.drafter is not None:
            # Every row's accepted hidden states in one gather; row b's are its first len(nodes[b]).
            width = max(map(len, accepted))
            index = torch.tensor([n + [n[-1]] * (width - len(n)) for n in accepted], device=device)
            kept = out.hidden.gather(1, index[..., None].expand(-1, -1, out.hidden.shape[-1]))
        sync(device)
        seconds = time.perf_counter() - ts
        finished = []
        if self.drafter is not None and tree is None:
            self._plain_history.append((kept, tuple(rows)))
        kept_rows = kept.unbind(0) if self.drafter is not None and tree is not None else ()  # one call, not B
        for b, (r, nodes, new) in enumerate(zip(rows, accepted, new_tokens)):
            if self.drafter is not None:
                if not r.pending_tokens:
                    r.pending_start = r.length
                if tree is None:
                    r.plain_steps += 1
                else:
                    r.pending_hidden.append(kept_rows[b][: len(nodes)])
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
            policy.observe(B, N, seconds, sum(map(len, accepted)) / B, smaller)
        return events

    @staticmethod
    def _sample_plain(rows: list[_Row], logits: torch.Tensor, starts: list[int]) -> dict[int, int]:
        """A plain step's sampled tokens {row: token}, the rows of each sampling setting drawn together
        (sample_rows: the tokens verify_sampling gives one row at a time, for a fraction of the cost)."""
        groups: dict[SamplingParams, list[int]] = {}
        for b, r in enumerate(rows):
            req = r.request
            if not req.params.greedy and req.acceptance == "exact":
                groups.setdefault(req.params, []).append(b)
        out = {}
        for params, bs in groups.items():
            samplers = [rows[b].request.sampler for b in bs]
            tokens = sample_rows(logits[bs, 0], params, samplers, [starts[b] + 1 for b in bs])
            out.update(zip(bs, tokens))
        return out

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
        self.depths = [0]


def prefill_groups(lengths: list[int], forward_cost: float) -> list[list[int]]:
    """Indices of prompts of these lengths in groups prefilled together, of the least total cost, where a
    group costs `forward_cost` plus its rows times its longest prompt (every row is padded to it): 32 rows
    that all pad to one 423-token AlpacaEval prompt cost ~8x their own tokens, and made a 64-row distillation
    of SmolLM2 half as fast as a 32-row one. Groups are runs of the length-sorted order (an optimal
    partition can always be sorted so), found by dynamic programming over where each run starts."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, start = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):  # best[end]: the `end` shortest prompts, grouped
        longest = lengths[order[end - 1]]
        for first in range(end):
            cost = best[first] + forward_cost + (end - first) * longest
            if cost < best[end]:
                best[end], start[end] = cost, first
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


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
    if len(requests) == 1:
        # One prompt: the single-sequence loop decodes it exactly as a batch of one would (its seed is the
        # row's), without the batch's per-row masks and gathers, a tenth of a step on a small model.
        gen = decoder._run(requests[0])
        while True:
            try:
                tokens = next(gen)
            except StopIteration as done:
                return [done.value]
            if tokens:
                yield {0: tokens}
    rows = len(requests) if max_rows is None else min(max_rows, len(requests))
    # Sized for the longest request up front: plain steps never wait for the cache to grow (trees near a row's
    # end may, once: BatchEngine.step).
    longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engine = BatchEngine(decoder, rows, max_len=longest)
    index_of: dict[int, int] = {}
    outputs: list[GenerateOutput | None] = [None] * len(requests)
    waiting = list(range(len(requests)))
    while waiting or engine:
        joining = waiting[: engine.max_rows - len(engine)]
        if joining:
            del waiting[: len(joining)]
            for i, rid in zip(joining, engine.add_requests([requests[i] for i in joining])):
                index_of[rid] = i
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
    """Times whole batched steps on this machine, for the cost model behind tree="auto": `rows` live rows
    verifying a given tree (None: plain decoding) -- draft, target forward, verification, commit and
    bookkeeping, everything a real step pays. The rows hold random prompts of `context` tokens; a step's
    cost barely depends on what the tokens are."""

    def __init__(self, decoder, max_rows: int, context: int = 64, seed: int = 0):
        self.decoder, self.max_rows, self.context = decoder, max_rows, context
        self.generator = torch.Generator().manual_seed(seed)
        self.engine: BatchEngine | None = None

    def _fill(self) -> None:
        target = self.decoder.target
        room = (target.max_context or 4096) - self.context
        self.engine = BatchEngine(self.decoder, self.max_rows)
        prompts = torch.randint(target.vocab_size, (self.max_rows, self.context), generator=self.generator)
        requests = [
            self.decoder._request(p, {"max_new_tokens": min(room, 1024), "eos_token_id": []}, "calibrate")
            for p in prompts
        ]
        self.engine.add_requests(requests)
        self.rows = list(self.engine.rows)
        # Rows are refilled once they are `context` + 192 long: measured at a cache length a short chat
        # turn sees, not at whatever length a long calibration would drift to.
        self.limit = min(self.context + 192, self.context + min(room, 1024) - 2 * tree_slots(self.decoder))

    def _unseen_lost(self, rows: int) -> bool:
        """Whether a plain step of fewer rows came between one of the first `rows` rows' plain steps and now.
        A live row takes part in every step of a real batch, and the drafter's catch-up reads a row's unseen
        hidden states from the engine's last plain steps; the timer's steps take any number of rows."""
        history = list(self.engine._plain_history) if self.engine is not None else []
        recent = (history[len(history) - r.plain_steps :] for r in self.rows[:rows])
        return any(
            r.plain_steps > len(history) or any(r not in members for _, members in steps)
            for r, steps in zip(self.rows[:rows], recent)
            if r.plain_steps
        )

    @torch.inference_mode()
    def step(self, rows: int, tree: TreeSpec | None) -> float:
        full = self.engine is not None and any(r.length >= self.limit for r in self.rows[:rows])
        if self.engine is None or full or self._unseen_lost(rows):
            self._fill()  # fresh rows before any could finish mid-measurement
        engine = self.engine
        engine.rows = self.rows[:rows]  # the other slots keep their state, untouched by this step
        engine.forced_tree = tree
        try:
            sync(self.decoder.target.device)
            t0 = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - t0
        finally:
            engine.forced_tree = _UNFORCED
            engine.rows = self.rows
        return seconds


_UNFORCED = object()
