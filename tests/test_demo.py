"""The demo: its task generator, its attention-mass metric and a small end-to-end run."""

import json
import subprocess
import sys

import pytest
import torch

from multihead_sdpadiff.demo import (
    REGIONS,
    DemoConfig,
    TaskConfig,
    attention_shares,
    make_batch,
    region_masks,
)
from multihead_sdpadiff.demo.maps import combined_maps, v2_maps
from multihead_sdpadiff.demo.task import BOS, NOISE, PAIR, QUERY, SEP, SPECIAL
from multihead_sdpadiff.models import DiffTransformer

TASK = TaskConfig(num_pairs=5, num_queries=3, num_keys=11, num_values=7, num_noise_tokens=9)


def _batch(seed, noise=13, n=17, task=TASK):
    return make_batch(task, n, noise, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- the task


def test_generator_is_deterministic_by_seed():
    a, b, c = _batch(3), _batch(3), _batch(4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("noise", [0, 1, 13, 40])
def test_answers_are_right_by_construction(noise):
    task, batch = TASK, _batch(7, noise=noise)
    b, length = batch.input_ids.shape
    p, q = task.num_pairs, task.num_queries
    assert length == task.seq_len(noise) == 2 + p + noise + 2 * q
    assert int(batch.input_ids.max()) < task.vocab_size
    sep = 1 + p + noise
    for i in range(b):
        ids, kinds = batch.input_ids[i].tolist(), batch.kinds[i].tolist()
        assert ids[0] == BOS and kinds[0] == SPECIAL
        assert ids[sep] == SEP and kinds[sep] == SPECIAL
        # Decode the context independently of the generator: key -> (pair token, position).
        table = {}
        for pos in range(1, sep):
            if kinds[pos] == NOISE:
                assert task.first_noise <= ids[pos] < task.vocab_size
                continue
            assert kinds[pos] == PAIR and task.first_pair <= ids[pos] < task.first_noise
            key, value = divmod(ids[pos] - task.first_pair, task.num_values)
            assert 0 <= value < task.num_values
            assert key not in table, "the keys of a sequence are distinct"
            table[key] = (ids[pos], pos)
        assert len(table) == p and kinds.count(NOISE) == noise
        asked = set()
        for j in range(q):
            qp = int(batch.query_pos[i, j])
            assert qp == sep + 1 + 2 * j and kinds[qp] == kinds[qp + 1] == QUERY
            key = ids[qp] - task.first_key
            assert 0 <= key < task.num_keys and key in table and key not in asked
            asked.add(key)
            answer, where = table[key]
            assert ids[qp + 1] == answer == int(batch.labels[i, qp + 1])
            assert int(batch.answer_pos[i, j]) == where
        # Only the answers are labelled.
        assert int((batch.labels != -100)[i].sum()) == q


def test_every_key_value_and_noise_id_turns_up():
    task = TaskConfig(num_pairs=4, num_queries=2, num_keys=5, num_values=3, num_noise_tokens=4)
    ids = make_batch(task, 400, 6, torch.Generator().manual_seed(0)).input_ids
    seen = set(ids.unique().tolist())
    assert seen == set(range(task.vocab_size)), "ids outside the vocabulary, or some never drawn"


def test_model_sees_the_answer_through_the_label_shift():
    """DiffTransformer's loss predicts labels[t + 1] from position t: the query position."""
    batch = _batch(0)
    labelled = (batch.labels != -100).nonzero()[:, 1].view(-1, TASK.num_queries)
    assert torch.equal(labelled - 1, batch.query_pos)


# ------------------------------------------------------------------------------------ the metric


def _masks():
    # positions: 0 BOS, 1 noise, 2 pair*, 3 pair, 4 noise, 5 pair, 6 SEP, 7 query
    kinds = torch.tensor([[SPECIAL, NOISE, PAIR, PAIR, NOISE, PAIR, SPECIAL, QUERY]])
    return region_masks(kinds, torch.tensor([2]))


def test_region_masks_partition_the_positions():
    m = _masks()
    assert m["answer"][0].nonzero().flatten().tolist() == [2]
    assert m["distractor"][0].nonzero().flatten().tolist() == [3, 5]
    assert m["noise"][0].nonzero().flatten().tolist() == [1, 4]
    assert m["other"][0].nonzero().flatten().tolist() == [0, 6, 7]
    assert torch.equal(sum(x.long() for x in m.values()), torch.ones(1, 8, dtype=torch.long))


def test_shares_of_a_softmax_row_are_its_mass():
    row = torch.tensor([[0.1, 0.05, 0.55, 0.1, 0.1, 0.05, 0.0, 0.05]])
    s = attention_shares(row, _masks())
    for kind in ("abs", "pos", "net"):
        assert s[kind]["answer"].item() == pytest.approx(0.55)
        assert s[kind]["distractor"].item() == pytest.approx(0.15)
        assert s[kind]["noise"].item() == pytest.approx(0.15)
        assert s[kind]["other"].item() == pytest.approx(0.15)


def test_shares_of_a_differential_row_with_negative_entries():
    # A1 - λ A2 with λ = 0.5: the answer keeps 0.5, a distractor is pushed to -0.1, noise cancels.
    a1 = torch.tensor([0.0, 0.1, 0.5, 0.1, 0.1, 0.1, 0.0, 0.1])
    a2 = torch.tensor([0.0, 0.2, 0.0, 0.4, 0.2, 0.2, 0.0, 0.0])
    row = (a1 - 0.5 * a2)[None]  # [0, 0, .5, -.1, 0, 0, 0, .1], sums to 1 - λ = 0.5
    assert row.sum().item() == pytest.approx(0.5)
    s = attention_shares(row, _masks())
    # |a| totals 0.7: answer 0.5, distractor 0.1, noise 0, other 0.1.
    assert s["abs"]["answer"].item() == pytest.approx(0.5 / 0.7)
    assert s["abs"]["distractor"].item() == pytest.approx(0.1 / 0.7)
    assert s["abs"]["noise"].item() == pytest.approx(0.0, abs=1e-12)
    assert s["abs"]["other"].item() == pytest.approx(0.1 / 0.7)
    # The positive part totals 0.6 and ignores the negative distractor.
    assert s["pos"]["answer"].item() == pytest.approx(0.5 / 0.6)
    assert s["pos"]["distractor"].item() == pytest.approx(0.0)
    assert s["pos"]["other"].item() == pytest.approx(0.1 / 0.6)
    # net is the signed sum, not normalised.
    assert s["net"]["answer"].item() == pytest.approx(0.5)
    assert s["net"]["distractor"].item() == pytest.approx(-0.1)
    for kind in ("abs", "pos"):
        assert sum(s[kind][r].item() for r in REGIONS) == pytest.approx(1.0)


def test_shares_broadcast_over_heads_and_survive_an_all_zero_row():
    rows = torch.zeros(1, 3, 8)  # (B, heads, Lk)
    rows[0, 0, 2] = 1.0  # all on the answer
    rows[0, 1, 1], rows[0, 1, 4] = 0.7, -0.3  # all on noise, partly negative
    s = attention_shares(rows, _masks())  # head 2 is all zeros
    assert s["abs"]["answer"][0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert s["abs"]["noise"][0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert s["pos"]["noise"][0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert s["net"]["noise"][0].tolist() == pytest.approx([0.0, 0.4, 0.0])
    assert not any(torch.isnan(v).any() for d in s.values() for v in d.values())


# --------------------------------------------------------------------------------------- maps


@pytest.mark.parametrize("attention", ["standard", "diff"])
def test_combined_maps_reproduce_the_layer_output(attention):
    """The maps the demo measures are the ones the model applies: map @ V gives the layer output."""
    torch.manual_seed(0)
    model = DiffTransformer(vocab_size=TASK.vocab_size, embed_dim=48, num_layers=2, num_heads=4,
                            attention=attention, max_seq_len=64).double()
    ids = _batch(1, n=2).input_ids
    maps = combined_maps(model, ids)
    assert len(maps) == 2
    heads = 4 if attention == "standard" else 2
    assert maps[0].shape == (2, heads, ids.shape[1], ids.shape[1])
    rows = maps[0].sum(-1)
    if attention == "standard":
        torch.testing.assert_close(rows, torch.ones_like(rows))
    else:
        lam = model.layers[0].attn.lambda_full()
        torch.testing.assert_close(rows, (1 - lam).expand_as(rows))


def test_v2_maps_reproduce_the_v2_layer():
    mod = pytest.importorskip("multihead_sdpadiff")
    if not hasattr(mod, "MultiheadDiffAttnV2"):
        pytest.skip("this branch has no multihead_sdpadiff.MultiheadDiffAttnV2")
    from multihead_sdpadiff.rotary import RotaryEmbedding

    torch.manual_seed(0)
    attn = mod.MultiheadDiffAttnV2(40, 4, 2).double()
    x = torch.randn(2, 19, 40, dtype=torch.float64)
    cos, sin = RotaryEmbedding(attn.head_dim)(32, dtype=torch.float64)
    a = v2_maps(attn, x, (cos, sin))  # (B, H, L, L)
    v = attn.v_proj(x).view(2, 19, 2, attn.head_dim).transpose(1, 2).repeat_interleave(2, dim=1)
    out = attn.o_proj((a @ v).transpose(1, 2).reshape(2, 19, -1))
    torch.testing.assert_close(out, attn(x, (cos, sin)))


# -------------------------------------------------------------------------------- end to end


def test_importing_the_package_loads_no_plotting_or_progress_libraries():
    # torch itself may import tqdm (torch.hub): only what our imports add counts.
    code = ("import sys, torch; before = set(sys.modules); "
            "import multihead_sdpadiff, multihead_sdpadiff.demo, multihead_sdpadiff.cli; "
            "bad = [m for m in set(sys.modules) - before if m.split('.')[0] in ('matplotlib', 'tqdm')]; "
            "print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="models"):
        DemoConfig(models=("nope",))
    with pytest.raises(ValueError, match="steps"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="num_queries"):
        DemoConfig(num_queries=9, num_pairs=4)
    with pytest.raises(ValueError, match="eval_noise"):
        DemoConfig(eval_noise=(48, -1))
    with pytest.raises(ValueError, match="lr"):
        DemoConfig(lr=0.0)


def test_quick_run_end_to_end(tmp_path):
    from multihead_sdpadiff.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--steps", "12", "--seeds", "0", "1", "--eval-examples", "16", "--attn-examples",
            "8", "--eval-noise", "4", "12", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert results["command"].startswith("sdpadiff demo --quick --steps 12")
    assert results["command"] in report
    load = results["load"]  # why a run took longer: recorded with the results and stated in the report
    assert set(load) >= {"load_average_start", "load_average_end", "cores", "threads", "cpu_share"}
    assert "Machine load: 1-minute load average" in report
    expected = {"standard", "diff"} | ({"diff_v2"} if not results["skipped"] else set())
    assert set(results["models"]) == expected
    assert set(results["skipped"]) <= {"diff_v2"}
    for model in results["models"]:
        assert set(results["runs"][model]) == {"0", "1"}
        run = results["runs"][model]["0"]
        assert len(run["loss"]) == 12
        assert set(run["eval"]) == {"4", "12"}
        att = run["eval"]["12"]["attention"]
        assert set(att) == {"abs", "pos", "net"} and set(att["abs"]) == set(REGIONS)
        layers = results["config"]["num_layers"]
        assert len(att["abs"]["answer"]) == layers
        assert 0.0 <= run["eval"]["4"]["accuracy"] <= 1.0
    params = {results["runs"][m]["0"]["num_parameters"] for m in results["models"]}
    e = results["config"]["embed_dim"]
    assert max(params) - min(params) <= 3 * e * results["config"]["num_layers"], "match_params"
    pytest.importorskip("matplotlib")
    for name in ("accuracy_vs_length.png", "attention_answer_vs_noise.png", "attention_example.png",
                 "training_curves.png"):
        assert (out / name).stat().st_size > 0
        assert f"]({name})" in report
    # --replot redraws from results.json alone.
    (out / "report.md").unlink()
    assert main(["demo", "--replot", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report
