"""The speculative decode loop: draft a tree, verify it in one target forward, commit the accepted path.

One step (docs/method.md, One decoding step):
  1. drafter: K per-head logits from the last committed position -> top-k -> candidate tree tokens
  2. target: one forward over the N tree tokens with the tree mask and depth positions
  3. verify: greedy / lossless rejection sampling / typical acceptance -> accepted nodes + bonus token
  4. commit: compact the KV cache to the accepted path; hand the accepted hidden states to the drafter
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .drafters.base import Drafter
from .errors import InputError, TreeError
from .generation import Decoder, Request, sync
from .sampling import sample, target_probs
from .target import attention_layout, decode_attention, window_masks
from .tree import FixedTree, TreeBuffers, TreeSpec, dynamic_order, smaller_trees_accepted
from .verify import verify_greedy, verify_sampling, verify_typical


def head_accuracies(decoder: SpeculativeDecoder, required: bool = True):
    """The decoder's head accuracies for greedy trees: `accuracies=` (lists or a file), else the
    head_accuracy.json beside the drafter's weights; None (or TreeError when `required`) without either."""
    from .tree import load_accuracies

    accuracies = decoder.accuracies
    if accuracies is None:
        path = getattr(decoder.drafter, "accuracy_file", None)
        if path is None:
            if not required:
                return None
            raise TreeError(
                "tree='auto' needs the drafter's head accuracies: load the drafter from a folder holding "
                "head_accuracy.json (training writes it; `amphista heads-accuracy` measures it), pass "
                "accuracies= (per-head top-k lists), or give a fixed tree"
            )
        return load_accuracies(path, greedy=True)
    if isinstance(accuracies, (str, bytes)) or hasattr(accuracies, "__fspath__"):
        return load_accuracies(accuracies, greedy=True)
    return accuracies


def auto_policy(decoder: SpeculativeDecoder):
    """tree="auto": a TreePolicy from the drafter's head accuracies and this machine's measured step costs
    (calibrated once per model, drafter, device and thread count, then cached; see docs/cost-model.md)."""
    from .batch import StepTimer
    from .costs import ROWS, CostModel, cost_key, load_or_calibrate
    from .policy import TreePolicy

    drafter = decoder.drafter
    accuracies = head_accuracies(decoder)
    # The candidate trees first (they need no costs), then the cost of a whole step with each of them.
    policy = TreePolicy(CostModel({(1, 1): 1.0}), accuracies, max_depth=drafter.num_heads)
    trees = {c.nodes: c.tree for c in policy.candidates}
    config = getattr(drafter, "config", None)
    described = {
        "type": type(drafter).__name__,
        "config": getattr(config, "__dict__", None),
        "dtype": str(getattr(drafter, "dtype", None)),
        "trees": {n: t.to_json() if t is not None else None for n, t in trees.items()},
    }
    key = cost_key(decoder.target.config, decoder.target.dtype, decoder.target.device, described)
    decoder.tree_policy = policy  # the timer's engine sizes its cache by the largest candidate
    timer = StepTimer(decoder, max(ROWS))
    cost = load_or_calibrate(key, lambda rows, nodes: timer.step(rows, trees[nodes]), tokens=tuple(trees), overhead_s=0.0)
    switch = None if getattr(drafter, "keeps_state", True) else 0.0  # no catch-up draft to pay for
    return TreePolicy(cost, accuracies, max_depth=drafter.num_heads, switch=switch)


class TreeMask:
    """The 4D additive mask (1, 1, N, L + N) for a tree whose root sits at cache position L.

    One buffer per request: each step zeroes the columns the previous tree used (now committed or free)
    and writes the tree block at L, so nothing of size L is rebuilt per step.
    """

    def __init__(self, buf: TreeBuffers, max_len: int, dtype: torch.dtype, device, window: int | None, types):
        self.window, self.types = window, types
        self.min = torch.finfo(dtype).min
        self.full = torch.zeros(1, 1, buf.num_nodes, max_len, dtype=dtype, device=device)
        self.dirty = self.width = 0
        self.buf = None
        self._set(buf)

    def _set(self, buf: TreeBuffers) -> None:
        self.buf = buf
        self.block = torch.zeros(buf.num_nodes, buf.num_nodes, dtype=self.full.dtype, device=self.full.device)
        self.block.masked_fill_(~buf.mask, self.min)

    def __call__(self, start: int, buf: TreeBuffers | None = None):
        """The mask for a tree rooted at `start`; `buf`: this step's tree, when it differs from the last one
        (a dynamic tree, of at most as many nodes as the first)."""
        if buf is not None and buf is not self.buf:
            self._set(buf)
        n = self.buf.num_nodes
        # The previous tree's columns are committed or free now; rows past n are not handed out.
        self.full[..., self.dirty : self.dirty + self.width] = 0.0
        self.full[..., :n, start : start + n] = self.block
        self.dirty, self.width = start, n
        full = self.full[..., :n, : start + n]
        if self.window is None:
            return full
        q_pos = start + self.buf.depth  # (N,)
        kv_pos = torch.cat([torch.arange(start, device=q_pos.device), q_pos])  # (L + N,)
        return window_masks(full, q_pos[None], kv_pos[None], self.window, self.types)


class SpeculativeDecoder(Decoder):
    """Lossless speculative decoding of a Hugging Face causal LM with a multi-head drafter.

    `SpeculativeDecoder(target, drafter, tree="mc_sim_7b_63").generate(input_ids, max_new_tokens=128)`.
    Each step the drafter proposes a tree of tokens and the target verifies the whole tree in one forward:
    greedy output is identical to plain decoding, and sampled output follows the target's distribution
    exactly (with the default acceptance="exact").

    Args:
        target: a Hugging Face causal LM (or a TargetModel wrapping one), one sequence at a time.
        drafter: a Drafter built for this target (AmphistaDrafter, MedusaDrafter, or one from
            amphista.load_drafter); a drafter for another vocabulary or hidden size raises
            DrafterMismatchError.
        tree: the token tree verified per step: a name ("mc_sim_7b_63", default, or "chain": one token per
            head), a JSON file of paths, a list of paths such as [[0], [1], [0, 0]] (each path the draft
            ranks from the root), or a TreeSpec. No deeper than the drafter has heads; see
            amphista.build_tree for a tree fitted to a drafter's accuracies. `set_tree` changes it later.
        tokenizer: used for stop strings; default None: the tokenizer the target was loaded with, if any.
        accuracies: the drafter's head accuracies for tree="auto" (a head_accuracy.json path or per-head
            top-k lists); default None: the file beside a drafter loaded from a folder.
        dynamic: shape each step's tree from the drafter's own probabilities at that step (as many nodes as
            the tree in use, placed where the drafter is most confident: deep when it is sure, wide when it
            hesitates), blended with the measured path frequencies of its head accuracies where it has them,
            instead of verifying the same shape every step; each row of generate_batch gets its own.
            Default None: on with tree="auto", off with a given tree. Output is exact either way.

    `generate` and `stream` take the keywords listed in `help(SpeculativeDecoder.generate)`; each returned
    GenerateOutput also reports `accept_lengths` and `tau`, the mean tokens per target forward.
    """

    # True: each generate() keeps, per decode step, the seconds spent in (drafting, tree forward, verification,
    # cache commit) in `last_step_parts`; they add up to that step's entry of `step_times`. Off by default:
    # on a GPU the parts need a synchronisation each, which would cost the plain loop its overlap.
    profile_steps = False

    # Most ranks per head a dynamic tree considers: deeper ranks are almost never worth a node.
    DYNAMIC_WIDTH = 10

    def __init__(
        self, target, drafter: Drafter, tree="mc_sim_7b_63", tokenizer=None, accuracies=None, dynamic=None
    ):
        super().__init__(target, tokenizer)
        self.accuracies = accuracies
        if dynamic not in (None, True, False):
            raise InputError(f"dynamic must be True, False or None (on with tree='auto'), got {dynamic!r}")
        self.dynamic = dynamic
        self.last_step_parts: list[tuple[float, float, float, float]] = []
        if not isinstance(drafter, Drafter):
            raise InputError(f"drafter must be an amphista Drafter, got {type(drafter).__name__}")
        drafter.attach(self.target)
        self.drafter = drafter.eval()
        self.set_tree(tree)
        self.window, self.layer_types = attention_layout(self.target.text_config)

    def set_tree(self, tree) -> None:
        """Verify with another token tree from now on (same forms as the constructor's `tree`)."""
        self.auto = isinstance(tree, str) and tree == "auto"
        self.dynamic_trees = self.auto if self.dynamic is None else self.dynamic
        # Dynamic trees blend in the measured path frequencies where the drafter has them (see dynamic_tree).
        accuracies = head_accuracies(self, required=False) if self.dynamic_trees else None
        self.tree_prior = getattr(accuracies, "paths", None)
        self._buffers_by_nodes: dict[int, TreeBuffers] = {}
        self._shapes: dict[int, tuple[int, int] | None] = {}
        self.last_step_nodes: list[int] = []
        if self.auto:
            self.tree_policy = auto_policy(self)
            # One sequence at a time: the tree the cost model picks for one row at each step, or none (plain
            # decoding), as the policy learns from the steps it sees; the cache leaves room for the largest.
            self._use(self.tree_policy.choose(1, fresh=True))
            self.extra_cache = self.tree_policy.max_nodes
        else:
            spec = TreeSpec.load(tree, self.drafter.num_heads)
            self._use(spec)
            self.tree_policy = FixedTree(spec)

    def dynamic_shape(self, nodes: int) -> tuple[int, int] | None:
        """(heads, ranks per head) a dynamic tree of `nodes` nodes draws from, or None where they cannot
        fill it (a one-head drafter, a tiny draft vocabulary): such steps keep the static tree."""
        d2t = getattr(self.drafter, "d2t", None)
        vocab = self.target.vocab_size if d2t is None else d2t.numel()
        depth = min(self.drafter.num_heads, nodes - 1)
        k = min(nodes - 1, self.DYNAMIC_WIDTH, vocab)
        return (depth, k) if sum(k**d for d in range(1, depth + 1)) >= nodes - 1 else None

    @property
    def tree_nodes(self) -> int:
        """Tokens verified per row in each step of the latest (or next) call: the tree's nodes, root included, or
        1 where tree="auto" decodes plainly. With tree="auto" the choice is per step: `last_step_nodes` has
        every step's, and this is the latest step's."""
        if self.auto and self.last_step_nodes:
            return self.last_step_nodes[-1]
        return 1 if self._plain else self.tree.num_nodes

    def _use(self, spec: TreeSpec | None) -> None:
        self._plain = spec is None
        spec = spec or TreeSpec.chain(1)
        if spec.depth > self.drafter.num_heads:
            raise TreeError(
                f"the tree is {spec.depth} levels deep but the drafter has {self.drafter.num_heads} heads: "
                f"use a tree of depth <= {self.drafter.num_heads} (e.g. amphista.build_tree) or a drafter with more heads"
            )
        if spec.max_rank >= self.target.vocab_size:
            raise TreeError(
                f"the tree asks for rank {spec.max_rank} but the vocabulary has {self.target.vocab_size} tokens"
            )
        self.tree = spec
        self.buffers = TreeBuffers(spec, self.target.device)
        self.extra_cache = spec.num_nodes

    def _buffers(self, spec: TreeSpec) -> TreeBuffers:
        """The buffers of a fixed tree: the one in use, or one of tree="auto"'s candidates (built once)."""
        if spec is self.tree:
            return self.buffers
        buf = self._buffers_by_nodes.get(spec.num_nodes)
        if buf is None:
            buf = self._buffers_by_nodes[spec.num_nodes] = TreeBuffers(spec, self.target.device)
        return buf

    def _shape(self, nodes: int) -> tuple[int, int] | None:
        if not self.dynamic_trees:
            return None
        if nodes not in self._shapes:
            self._shapes[nodes] = self.dynamic_shape(nodes)
        return self._shapes[nodes]

    @torch.inference_mode()
    def _run(self, request: Request) -> Iterator[list[int]]:
        target, drafter, params = self.target, self.drafter, request.params
        policy = self.tree_policy if self.auto else None
        device = target.device
        t0 = time.perf_counter()
        cache = self._new_cache(request)
        # tree="auto" chooses every step, so the mask has rows for the largest candidate.
        largest = policy.candidates[-1].tree if policy is not None else None
        mask_buf = self._buffers(largest) if largest is not None else self.buffers
        mask = TreeMask(mask_buf, cache.max_len, target.dtype, device, self.window, self.layer_types)
        drafter.reset(cache.max_len)
        generated: list[int] = []
        accept_lengths: list[int] = []
        step_times: list[float] = []
        step_nodes: list[int] = []
        parts = [] if self.profile_steps else None
        self.last_step_parts = parts if parts is not None else []
        self.last_step_nodes = step_nodes

        # Prefill: the prompt, then the first token from the target alone.
        ts = time.perf_counter()
        prompt = torch.tensor([request.prompt], device=device)
        out = target.forward(
            prompt,
            position_ids=torch.arange(prompt.shape[1], device=device)[None],
            cache=cache,
            logits_at=slice(-1, None),
        )
        first = self._pick(out.logits[0, -1], request)
        # What the drafter has not read yet: the committed positions' hidden states, each paired with its
        # successor token, from position `start` on. Plain steps add to it; a tree step's draft reads it all.
        unread = (out.hidden, torch.cat([prompt[:, 1:], torch.tensor([[first]], device=device)], 1), 0)
        sync(device)
        step_times.append(time.perf_counter() - ts)
        emitted, reason = request.stop(generated, [first])
        accept_lengths.append(len(emitted))
        yield emitted
        root = first
        # The first step's drafter reads the whole prompt whatever was chosen before: no switching margin.
        spec = policy.choose(1, fresh=True) if policy is not None else None if self._plain else self.tree

        while reason is None:
            ts = time.perf_counter()
            start = cache.length  # position of the root
            if spec is None:  # tree="auto" found no tree that pays for one row at this step
                ids, positions = torch.tensor([[root]], device=device), torch.tensor([[start]], device=device)
                out = target.forward(ids, position_ids=positions, cache=cache)
                logits = out.logits[0, -1]
                if params.greedy:
                    bonus = int(logits.argmax())
                else:
                    bonus = sample(target_probs(logits, params), request.sampler, start + 1)
                buf, order, nodes, new = None, None, [0], [bonus]
            else:
                shape = self._shape(spec.num_nodes)
                dynamic = shape is not None
                with decode_attention(device):
                    if dynamic:  # the best tree of this many nodes for this step's drafts
                        depth, k = shape
                        top, probs = drafter.draft_topk_probs(*unread, depth, k)  # (D, k) ids, probabilities
                        order = dynamic_order(probs.tolist(), spec.num_nodes, self.tree_prior)
                        buf = TreeBuffers.of(TreeSpec.canonical(order), device)
                        drafts = top.reshape(-1)[buf.head * k + buf.rank]
                    else:
                        buf, order = self._buffers(spec), None
                        drafts = drafter.draft_topk(*unread, spec.depth, spec.max_rank + 1).view(-1)[buf.flat]
                tokens = torch.cat([torch.tensor([root], device=device), drafts])  # (N,)
                if parts is not None:
                    sync(device)
                t_draft = time.perf_counter()
                out = target.forward(
                    tokens[None], position_ids=(start + buf.depth)[None], attention_mask=mask(start, buf), cache=cache
                )
                logits = out.logits[0]  # (N, V)
                if parts is not None:
                    sync(device)
                t_forward = time.perf_counter()
                if params.greedy:
                    nodes, idx, bonus = verify_greedy(tokens, logits, buf)
                elif request.acceptance == "typical":
                    nodes, idx, bonus = verify_typical(tokens, logits, buf, params, request.sampler, start)
                else:
                    nodes, idx, bonus = verify_sampling(tokens, logits, buf, params, request.sampler, start)
                if parts is not None:
                    sync(device)
                t_verify = time.perf_counter()
                cache.commit(start, idx, nodes)
                new = tokens[idx[1:]].tolist() + [bonus]
            emitted, reason = request.stop(generated, new)
            if reason is not None:  # drop what was accepted past the stop: the cache holds what was emitted
                cache.truncate(len(request.prompt) + len(generated) - 1)
            hidden = out.hidden if buf is None else out.hidden[:, idx]
            successors = torch.tensor([new], device=device)
            if spec is None:
                unread = (torch.cat([unread[0], hidden], 1), torch.cat([unread[1], successors], 1), unread[2])
            else:
                unread = (hidden, successors, start)
            root = bonus
            sync(device)
            te = time.perf_counter()
            step_times.append(te - ts)
            step_nodes.append(1 if buf is None else buf.num_nodes)
            if policy is not None:
                policy.observe(
                    1, step_nodes[-1], te - ts, len(nodes),
                    smaller_trees_accepted(order, buf, nodes) if order is not None and params.greedy else None,
                )
                spec = policy.choose(1)
            if parts is not None:  # a plain step is all forward: no draft, and one node needs no commit
                parts.append(
                    (0.0, te - ts, 0.0, 0.0) if buf is None
                    else (t_draft - ts, t_forward - t_draft, t_verify - t_forward, te - t_verify)
                )
            accept_lengths.append(len(emitted))
            yield emitted
        return self._output(request, generated, accept_lengths, reason, t0, step_times)

    @staticmethod
    def _pick(logits: torch.Tensor, request: Request) -> int:
        if request.params.greedy:
            return int(logits.argmax())
        return sample(target_probs(logits, request.params), request.sampler, len(request.prompt))
