"""The synthetic retrieval task: multi-query associative recall with noise tokens.

A sequence is::

    BOS  n ⟨k1:v1⟩ n n ⟨k2:v2⟩ ... ⟨kP:vP⟩ n  SEP  q1 a1  q2 a2 ... qQ aQ
         \\____ context: P pair tokens and noise ____/     \\___ queries ___/

* a **pair token** ``⟨k:v⟩`` stands for "key k maps to value v"; there is one token id per (key,
  value) combination. The keys of one sequence are distinct, drawn from ``num_keys`` keys; each value
  is drawn independently from ``num_values`` values (two keys may share a value);
* ``noise`` **noise tokens**, drawn from their own ``num_noise_tokens`` ids, take random positions
  among the pairs;
* each **query** ``q_j`` is a key token (its own id, not a pair) of one of the context's pairs
  (distinct queries, in random order), and the answer ``a_j`` is that pair's token ``⟨k:v⟩``. The
  model is trained and scored on predicting ``a_j`` at the position of ``q_j``.

The answer is the whole pair token, so that a small model solves the task with one attention step
(the query finds the pair whose key matches and copies it) and learns it within a CPU budget of
minutes. With the key and the value as two tokens, or with the bare value as the answer, the small
models tried here stayed near guessing among the context's values for thousands of steps (see
``docs/demo.md``).

Difficulty grows with ``num_pairs`` (more distractor pairs) and ``noise`` (more irrelevant
positions). Token ids: 0 BOS, 1 SEP, then the key tokens, the pair tokens
(``first_pair + key * num_values + value``) and the noise tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["BOS", "KIND_NAMES", "SEP", "Batch", "TaskConfig", "make_batch"]

BOS, SEP = 0, 1

#: The codes of :attr:`Batch.kinds`.
KIND_NAMES: tuple[str, ...] = ("special", "pair", "noise", "query")
SPECIAL, PAIR, NOISE, QUERY = range(4)


@dataclass(frozen=True)
class TaskConfig:
    """The token vocabulary and the shape of one task instance (``noise`` is given per batch)."""

    num_pairs: int = 8
    num_queries: int = 4
    num_keys: int = 16
    num_values: int = 16
    num_noise_tokens: int = 16

    def __post_init__(self):
        for name in ("num_pairs", "num_queries", "num_keys", "num_values", "num_noise_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TaskConfig.{name} must be a positive int, got {value!r}")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs {self.num_pairs} needs as many distinct keys (num_keys {self.num_keys})")
        if self.num_queries > self.num_pairs:
            raise ValueError(f"num_queries {self.num_queries} must be at most num_pairs {self.num_pairs}")

    @property
    def first_key(self) -> int:
        return 2

    @property
    def first_pair(self) -> int:
        return self.first_key + self.num_keys

    @property
    def first_noise(self) -> int:
        return self.first_pair + self.num_keys * self.num_values

    @property
    def vocab_size(self) -> int:
        return self.first_noise + self.num_noise_tokens

    def pair_token(self, key: int | torch.Tensor, value: int | torch.Tensor):
        """The id of ``⟨key:value⟩`` for key index ``key`` and value index ``value`` (0-based)."""
        return self.first_pair + key * self.num_values + value

    def seq_len(self, noise: int) -> int:
        return 2 + self.num_pairs + noise + 2 * self.num_queries


class Batch(NamedTuple):
    """One batch of ``B`` sequences of length ``L = task.seq_len(noise)``.

    * ``input_ids`` ``(B, L)``;
    * ``labels`` ``(B, L)``: the answer ``a_j`` (a pair token) at its own position, ``-100`` elsewhere, in the
      :meth:`~multihead_sdpadiff.DiffTransformer.forward` convention (position ``t`` predicts
      ``labels[:, t + 1]``);
    * ``query_pos`` ``(B, Q)``: the position of each query ``q_j`` (its answer follows it);
    * ``answer_pos`` ``(B, Q)``: the position in the context of the pair token ``a_j``;
    * ``kinds`` ``(B, L)``: a code of :data:`KIND_NAMES` for every position.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    query_pos: torch.Tensor
    answer_pos: torch.Tensor
    kinds: torch.Tensor


def make_batch(task: TaskConfig, batch_size: int, noise: int, generator: torch.Generator) -> Batch:
    """Draw ``batch_size`` sequences with ``noise`` noise tokens each, from ``generator`` only.

    The same generator state gives the same batch on any machine (every draw happens on the CPU).
    """
    if isinstance(noise, bool) or not isinstance(noise, int) or noise < 0:
        raise ValueError(f"noise must be an int >= 0, got {noise!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    b, p, q = batch_size, task.num_pairs, task.num_queries
    g = generator
    keys = torch.rand(b, task.num_keys, generator=g).argsort(dim=1)[:, :p]  # (B, P) distinct key indices
    values = torch.randint(task.num_values, (b, p), generator=g)  # (B, P) value indices
    noise_tok = task.first_noise + torch.randint(task.num_noise_tokens, (b, noise), generator=g)  # (B, N)
    ctx = p + noise
    slots = torch.rand(b, ctx, generator=g).argsort(dim=1)  # (B, P + N): a random order of the context
    asked = torch.rand(b, p, generator=g).argsort(dim=1)[:, :q]  # (B, Q) indices of the queried pairs

    pair_pos = 1 + slots[:, :p]  # (B, P) positions of the pairs, in the order of `keys`
    noise_pos = 1 + slots[:, p:]  # (B, N)
    length = task.seq_len(noise)
    input_ids = torch.empty(b, length, dtype=torch.long)
    kinds = torch.empty(b, length, dtype=torch.long)
    input_ids[:, 0], kinds[:, 0] = BOS, SPECIAL
    input_ids.scatter_(1, pair_pos, task.pair_token(keys, values))
    input_ids.scatter_(1, noise_pos, noise_tok)
    kinds.scatter_(1, pair_pos, PAIR)
    kinds.scatter_(1, noise_pos, NOISE)
    sep = 1 + ctx
    input_ids[:, sep], kinds[:, sep] = SEP, SPECIAL

    input_ids[:, sep + 1::2] = task.first_key + keys.gather(1, asked)
    input_ids[:, sep + 2::2] = task.pair_token(keys.gather(1, asked), values.gather(1, asked))
    kinds[:, sep + 1:] = QUERY
    labels = torch.full((b, length), -100, dtype=torch.long)
    labels[:, sep + 2::2] = input_ids[:, sep + 2::2]
    query_pos = (sep + 1 + 2 * torch.arange(q)).expand(b, q).contiguous()  # (B, Q)
    answer_pos = pair_pos.gather(1, asked)  # (B, Q)
    return Batch(input_ids, labels, query_pos, answer_pos, kinds)
