"""torch.compile(fullgraph=True): a training step and cached decoding, on a tiny model.

``fullgraph=True`` is a property of Dynamo's capture, whatever the backend; the default backend
here is ``aot_eager`` (it also traces the backward), which keeps these tests to seconds on two CPU
cores. ``SDPADIFF_COMPILE_BACKEND=inductor`` runs them through Inductor (minutes on a cold cache).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo

from multihead_sdpadiff import DiffTransformer

BACKEND = os.environ.get("SDPADIFF_COMPILE_BACKEND", "aot_eager")
CFG = {"vocab_size": 32, "embed_dim": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 32,
       "init_std": 0.2}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attention", ["diff", "standard"])
def test_training_step_compiles_fullgraph(attention):
    torch.manual_seed(0)
    model = DiffTransformer(attention=attention, **CFG)
    ids = torch.randint(0, 32, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    compiled(ids, attention_mask=mask, labels=labels).loss.backward()
    with torch._dynamo.config.patch(error_on_recompile=True):  # e.g. no guard on a lazily filled table
        got = compiled(ids, attention_mask=mask, labels=labels).loss
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    want = model(ids, attention_mask=mask, labels=labels).loss
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_generate_runs_compiled_on_the_preallocated_cache():
    torch.manual_seed(0)
    model = DiffTransformer(**CFG)
    ids = torch.randint(0, 32, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    want = model.generate(ids, 6, temperature=0, attention_mask=mask)
    model.compile(fullgraph=True, backend=BACKEND)  # in place: generate's self(...) calls run compiled
    got = model.generate(ids, 6, temperature=0, attention_mask=mask)
    assert torch.equal(got, want)
    # The decode graph generalised over the key length after one recompile: a second call with
    # the same shapes compiles nothing.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(model.generate(ids, 6, temperature=0, attention_mask=mask), want)
