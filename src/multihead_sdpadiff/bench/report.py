"""The terminal table, drawn from a results document (live or loaded from its file)."""

from __future__ import annotations

COLUMNS = (
    ("method", "<"), ("N", ">"), ("status", "<"), ("median ms", ">"), ("IQR ms", ">"), ("x standard", ">"),
    ("GFLOP/s", ">"), ("peak MiB", ">"), ("x qkv", ">"),
)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


#: Timing rows during which other processes used more than this share of the CPUs get a ``*``.
BUSY_SHARE = 0.05


def _cells(r: dict, second: str | None = None) -> list[str]:
    name = r["method"] + (f" ({r['resolved']})" if r.get("resolved") else "")
    if (r.get("foreign_cpu") or 0) > BUSY_SHARE:
        name += " *"
    ms = None if r["median_s"] is None else r["median_s"] * 1e3
    iqr = None if r["iqr_s"] is None else r["iqr_s"] * 1e3
    mib = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
    cells = [name, str(r["seq_len"]), r["status"], _fmt(ms, ".3g" if ms is not None and ms < 1 else ".1f"),
             _fmt(iqr, ".2g"), _fmt(r["ratio"], ".2f"), _fmt(r["gflops"], ".1f"), _fmt(mib, ".1f"),
             _fmt(r["mem_ratio"], ".2f")]
    if second:
        cells.insert(6, _fmt(r.get("ratio_second"), ".2f"))
    return cells


def _columns(second: str | None) -> tuple[tuple[str, str], ...]:
    """COLUMNS, with ``x <second>`` after ``x standard`` when the run has a second yardstick."""
    return COLUMNS if not second else (*COLUMNS[:6], (f"x {second}", ">"), *COLUMNS[6:])


def _table(rows: list[dict], second: str | None = None) -> list[str]:
    columns = _columns(second)
    body = [_cells(r, second) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, (h, _) in enumerate(columns)]

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cells, columns, widths, strict=True)).rstrip()

    return [line([h for h, _ in columns]), line(["-" * w for w in widths]), *map(line, body)]


def format_report(doc: dict) -> str:
    env, cfg = doc["env"], doc["config"]
    head = (f"sdpadiff bench: level {cfg['level']}, {env['device']} ({env['device_name']}), {env['dtype']}, "
            f"{env['threads']} threads, B={cfg['batch']} E={cfg['embed_dim']} heads={cfg['num_heads']} "
            f"kv_heads={cfg['num_kv_heads']}; torch {env['torch']}")
    out = [head]
    if cfg.get("note"):
        out.append(cfg["note"])
    second = cfg.get("second_yardstick")
    if env["device"] == "cpu" and _busy(env):
        out.append(f"warning: 1-minute load average {env.get('load_average')} before, {env.get('load_average_end')} "
                   f"after, on {env.get('cpu_count')} CPUs: other processes were running, CPU times are inflated")
    rows = doc["results"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        # Only what can run here is a table row; a skipped method is listed below with its reason.
        shown = [r for r in rows if r["mode"] == mode and r["status"] != "skipped"]
        out += ["", f"[{mode}]"]
        out += _table(shown, second) if shown else ["(nothing ran)"]
    busy = [r for r in rows if (r.get("foreign_cpu") or 0) > BUSY_SHARE]
    if busy:
        worst = max(r["foreign_cpu"] for r in busy)
        out += ["", f"* other processes used more than {BUSY_SHARE:.0%} of the CPUs while these were timed "
                    f"(up to {worst:.0%}): their times are inflated; rerun on a quiet machine"]
    notes = _notes(rows)
    if notes:
        out += ["", "not timed (status, cases, reason):"] + notes
    if doc.get("interrupted"):
        out += ["", "interrupted: the table holds what was measured before Ctrl-C"]
    return "\n".join(out)


def _busy(env: dict) -> bool:
    """Was the machine busy? Before the run the load is other processes'; after it, it includes
    this run's own threads."""
    cores = env.get("cpu_count") or 1
    before, after = env.get("load_average"), env.get("load_average_end")
    return bool((before and before[0] > 0.5 * cores + 0.25) or (after and after[0] > cores + 1))


def _notes(rows: list[dict]) -> list[str]:
    """One line per (method, status, reason), listing the cases it covers."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            groups.setdefault((r["method"], r["status"], r["reason"]), []).append(f"{r['mode']}@{r['seq_len']}")
    return [f"  {m} [{s}] ({', '.join(where)}): {reason}" for (m, s, reason), where in groups.items()]
