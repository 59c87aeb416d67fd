"""Which queries form a batch, and which demonstrations each query sees.

Everything is a pure function of (seed, epoch, indices), never of the process count or of
where a run was resumed, so a resumed or DDP run sees exactly the demonstrations a
single uninterrupted run sees.

A batch is a list of *groups*; a group is the queries that share one demonstration set.
``random``, ``similar`` and ``same-class`` use groups of one query; ``one-to-many`` uses groups of
``group_size`` queries of the same task sharing one randomly drawn set (the LLM then holds
that demonstration prefix once per group: ``modules.prefix_cache``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

STRATEGIES = ("random", "similar", "same-class", "one-to-many")


@dataclasses.dataclass
class Group:
    queries: list[int]  # indices into the query data set
    demos: list[int]  # indices into the demonstration pool, shared by every query of the group


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def epoch_groups(
    tasks: list[str], strategy: str, group_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """The epoch's query order, as groups (one-to-many: same-task groups of ``group_size``; leftovers dropped)."""
    n = len(tasks)
    order = _rng(seed, epoch, 0xE0).permutation(n) if shuffle else np.arange(n)
    if strategy != "one-to-many":
        return [[int(i)] for i in order]
    by_task: dict[str, list[int]] = {}
    for i in order:
        by_task.setdefault(tasks[i], []).append(int(i))
    groups = [idx[s : s + group_size] for idx in by_task.values() for s in range(0, len(idx) - group_size + 1, group_size)]
    if shuffle:
        groups = [groups[i] for i in _rng(seed, epoch, 0xE1).permutation(len(groups))]
    return groups


def batches_of(groups: list[list[int]], batch_queries: int, drop_last: bool) -> list[list[list[int]]]:
    """Consecutive groups packed into batches of ``batch_queries`` queries (groups never split)."""
    out, cur, size = [], [], 0
    for g in groups:
        cur.append(g)
        size += len(g)
        if size >= batch_queries:
            out.append(cur)
            cur, size = [], 0
    if cur and not drop_last:
        out.append(cur)
    return out


class DemoSampler:
    """Draws demonstrations from ``pool`` for queries of ``queries`` (the same set in training).

    ``same_task``: only demonstrations of the query's own task (its instruction, answer style
    and, for the embedded ``what_*`` tasks, what is asked). Whatever the strategy, a query never
    gets a demonstration of its own image or video (``Example.media_key``: e.g. the other captions
    of its image would give the answer away), nor, one-to-many, of any image of its group; so in
    training the query itself is never its own demonstration.
    """

    def __init__(self, pool, queries, num_demos: int, strategy: str, same_task: bool = True, seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        if num_demos < 0:
            raise ValueError(f"num_demos: expected >= 0, got {num_demos}")
        self.pool, self.queries, self.k, self.strategy, self.seed = pool, queries, num_demos, strategy, seed
        self.same_task = same_task
        pool_tasks = np.array(pool.tasks())
        self.candidates = {t: np.flatnonzero(pool_tasks == t) for t in set(pool_tasks.tolist())} if same_task else None
        self.all = np.arange(len(pool))
        # Images as integers: a pool example's image, and each query's (-1 - i: an image the pool never shows).
        media_id: dict[str, int] = {}
        self.pool_media = np.array([media_id.setdefault(e.media_key, len(media_id)) for e in pool.examples], dtype=np.int64)
        self.query_media = np.array([media_id.get(e.media_key, -1 - i) for i, e in enumerate(queries.examples)], dtype=np.int64)
        self._labels = None
        if strategy == "similar" and num_demos:
            self.pool_emb, self.query_emb = pool.image_embeddings(), queries.image_embeddings()
        self._similar: dict[tuple, list[int]] = {}  # nearest neighbours do not change between epochs

    def _candidates(self, queries: list[int]) -> np.ndarray:
        """The pool examples the group may see: its task's (``same_task``), none of the group's images."""
        cands = self.all
        if self.same_task:
            cands = self.candidates.get(self.queries[queries[0]].task, self.all[:0])
        media = self.pool_media[cands]
        if len(queries) == 1:
            cands = cands[media != self.query_media[queries[0]]]
        else:
            cands = cands[~np.isin(media, self.query_media[queries])]
        if len(cands) < self.k:
            raise ValueError(
                f"only {len(cands)} demonstration candidates for task {self.queries[queries[0]].task!r} (other images "
                f"than the query's), need num_demos={self.k}"
            )
        return cands

    def group(self, queries: list[int], epoch: int) -> Group:
        if self.k == 0:
            return Group(list(queries), [])
        if self.strategy == "similar":
            key = tuple(queries)
            if key not in self._similar:
                # Nearest neighbours of the (first) query's image; the most similar goes last,
                # right before the query, where recency matters most to the LLM.
                cands = self._candidates(list(queries))
                sims = self.pool_emb[torch.from_numpy(cands)] @ self.query_emb[queries[0]]
                self._similar[key] = [int(d) for d in cands[torch.topk(sims, self.k).indices.flip(0).numpy()]]
            return Group(list(queries), list(self._similar[key]))
        cands = self._candidates(list(queries))
        if self.strategy == "same-class":
            # Random demonstrations of the query's class (``label``); too few: the rest from its task.
            if self._labels is None:
                self._labels = np.array([e.label for e in self.pool.examples], dtype=object)
            label = self.queries[queries[0]].label
            same = cands[self._labels[cands] == label]
            rng = _rng(self.seed, epoch, 0xD1, queries[0])
            if len(same) >= self.k:
                return Group(list(queries), [int(d) for d in rng.choice(same, self.k, replace=False)])
            rest = rng.choice(cands[~np.isin(cands, same)], self.k - len(same), replace=False)
            return Group(list(queries), [int(d) for d in np.concatenate([rng.permutation(same), rest])])
        demos = _rng(self.seed, epoch, 0xD0, queries[0]).choice(cands, self.k, replace=False)
        return Group(list(queries), [int(d) for d in demos])

    def groups(self, query_groups: list[list[int]], epoch: int) -> list[Group]:
        return [self.group(q, epoch) for q in query_groups]
