"""DiffLlama forward time and generate() throughput: transformers' original against the converted model.

    PYTHONPATH=src python benchmarks/hf_model.py --threads 1 --out hf_model.json

Both models are built from one random DiffLlamaConfig and timed in the same process, one after
the other, with ``torch.utils.benchmark.Timer`` (``num_threads`` set explicitly; each time is the
median of ``blocked_autorange``). Before a converted model is timed its logits are compared with
the original's and its greedy tokens must be identical; a model that fails the check is recorded
with its error and no timing. The raw results go to a JSON file (with torch and transformers
versions, device, dtype and threads) before the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any

import torch
from torch.utils import benchmark as tb


def benchmark_diffllama(
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 8,
    num_kv_heads: int = 4,
    vocab_size: int = 1024,
    batch: int = 1,
    seq_len: int = 256,
    prompt_len: int = 32,
    new_tokens: int = 32,
    attn_implementation: str = "sdpa",
    impls: tuple[str, ...] = ("auto",),
    num_threads: int = 1,
    min_run_time: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``model(ids)`` on ``(batch, seq_len)`` tokens and greedy ``generate`` of ``new_tokens``
    after a ``prompt_len`` prompt, for the original model and one converted model per ``impls``.

    Returns the setup and, per model, ``forward_s`` and ``generate_s`` (medians, seconds),
    ``generate_tok_per_s`` (``batch * new_tokens / generate_s``), and for converted models the
    ratios to the original: ``forward_ratio`` (time, below 1 is faster) and
    ``generate_tok_per_s_ratio`` (throughput, above 1 is faster).
    """
    import transformers

    from multihead_sdpadiff.hf import convert_diffllama

    torch.manual_seed(seed)
    config = transformers.DiffLlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=8 * hidden_size // 3 // 8 * 8,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max(seq_len, prompt_len + new_tokens), pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    original = transformers.DiffLlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1, vocab_size, (batch, seq_len), device=device)
    prompt = ids[:, :prompt_len]
    gen_kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}

    def timed(stmt: str, model) -> float:
        timer = tb.Timer(stmt=stmt, globals={"model": model, "ids": ids, "prompt": prompt, "kw": gen_kw},
                         num_threads=num_threads)
        with torch.inference_mode():
            return timer.blocked_autorange(min_run_time=min_run_time).median

    def measure(model) -> dict[str, float]:
        fwd = timed("model(ids)", model)
        gen = timed("model.generate(prompt, **kw)", model)
        return {"forward_s": fwd, "generate_s": gen, "generate_tok_per_s": batch * new_tokens / gen}

    results: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device": device if device != "cpu" else f"cpu ({os.cpu_count()} cores)", "dtype": str(dtype),
        "num_threads": num_threads, "attn_implementation": attn_implementation,
        "config": {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
                   "num_kv_heads": num_kv_heads, "head_dim": hidden_size // num_heads, "vocab_size": vocab_size},
        "batch": batch, "seq_len": seq_len, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "min_run_time": min_run_time, "load_average_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "models": {},
    }
    with torch.inference_mode():
        ref_logits = original(ids).logits.double()
        ref_tokens = original.generate(prompt, **gen_kw)
    results["models"]["original"] = measure(original)
    base = results["models"]["original"]
    for impl in impls:
        name = f"converted[{impl}]"
        try:
            converted = convert_diffllama(original, impl=impl)
            with torch.inference_mode():
                err = (converted(ids).logits.double() - ref_logits).abs().max().item()
                same = bool(torch.equal(converted.generate(prompt, **gen_kw), ref_tokens))
        except Exception as exc:  # recorded as a missing value, as any other failure
            results["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        entry: dict[str, Any] = {"max_abs_logit_err": err, "tokens_identical": same}
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
        if same and err <= tol * max(1.0, ref_logits.abs().max().item()):
            entry.update(measure(converted))
            entry["forward_ratio"] = entry["forward_s"] / base["forward_s"]
            entry["generate_tok_per_s_ratio"] = entry["generate_tok_per_s"] / base["generate_tok_per_s"]
        else:
            entry["error"] = "output check failed; not timed"
        results["models"][name] = entry
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"DiffLlama {results['config']} batch={results['batch']} {results['dtype']} "
        f"attn={results['attn_implementation']} threads={results['num_threads']} "
        f"torch {results['torch']} transformers {results['transformers']}",
        f"forward: L={results['seq_len']}; generate: prompt {results['prompt_len']} + {results['new_tokens']} "
        "greedy tokens (medians)",
        f"{'model':<24}{'forward ms':>12}{'ratio':>8}{'generate tok/s':>16}{'ratio':>8}{'max |dlogit|':>14}",
    ]
    for name, r in results["models"].items():
        if "forward_s" not in r:
            lines.append(f"{name:<24}  {r.get('error')}")
            continue
        lines.append(
            f"{name:<24}{r['forward_s'] * 1e3:>12.2f}{r.get('forward_ratio', 1.0):>8.2f}"
            f"{r['generate_tok_per_s']:>16.1f}{r.get('generate_tok_per_s_ratio', 1.0):>8.2f}"
            f"{r.get('max_abs_logit_err', 0.0):>14.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8, help="num_attention_heads (maps)")
    p.add_argument("--kv-heads", type=int, default=4, help="num_key_value_heads")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256, help="forward length")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32, help="generated tokens")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--impls", default="auto", help="comma-separated strategies for the converted model")
    p.add_argument("--threads", type=int, default=1, help="torch.utils.benchmark num_threads")
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="hf_model.json", help="raw results (JSON)")
    a = p.parse_args(argv)
    results = benchmark_diffllama(
        hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, vocab_size=a.vocab,
        batch=a.batch, seq_len=a.seq, prompt_len=a.prompt, new_tokens=a.new, attn_implementation=a.attn,
        impls=tuple(a.impls.split(",")), num_threads=a.threads, min_run_time=a.min_run_time,
        dtype=getattr(torch, a.dtype), device=a.device,
    )
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(format_table(results))
    print(f"raw results: {a.out}")


if __name__ == "__main__":
    main()
