"""Compression: distillation, pruning, quantization, the budgeted pick; on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RECIPE, keel, write_toy_csv

from keel.compress import prune as P
from keel.compress.budget import pick_deployable, select
from keel.compress.distill import kd_loss, pick_layers, student_from_teacher
from keel.errors import GateError, KeelError
from keel.models import model_dir
from keel.models.resize import load_resized
from keel.recipe import BudgetConfig
from keel.tasks.classification import build_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(model_dir("tiny-bert"), ["neg", "pos", "neu"]).eval()


def _ids(n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t // 2 :] = 0  # one padded row
    return ids, mask


def test_kd_loss_is_zero_for_identical_models_and_positive_otherwise(tiny):
    ids, mask = _ids()
    logits = tiny(input_ids=ids, attention_mask=mask).logits
    assert kd_loss(logits, logits, None, alpha=0.0, temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)
    other = logits + torch.randn_like(logits)
    assert kd_loss(other, logits, None, alpha=0.0, temperature=2.0).item() > 1e-4
    labels = torch.tensor([0, 1, 2, 1])
    mixed = kd_loss(logits, logits, labels, alpha=0.5, temperature=2.0)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert mixed.item() == pytest.approx(0.5 * ce.item(), rel=1e-5)  # the KL half is 0


def test_student_keeps_the_chosen_layers_and_is_smaller(tiny):
    assert pick_layers(6, None) == [1, 3, 5]
    assert pick_layers(6, 2) == [2, 5]
    with pytest.raises(KeelError, match="would not be smaller"):
        pick_layers(2, 2)
    student = student_from_teacher(tiny, [1])
    assert student.config.num_hidden_layers == 1
    assert torch.equal(
        student.bert.encoder.layer[0].output.dense.weight, tiny.bert.encoder.layer[1].output.dense.weight
    )
    ids, mask = _ids()
    student(input_ids=ids, attention_mask=mask)  # runs


def test_unstructured_pruning_reaches_the_target_sparsity(tiny):
    import copy

    m = copy.deepcopy(tiny)
    got = P.global_magnitude_prune(m, 0.6)["sparsity"]
    assert abs(got - 0.6) <= 0.005
    assert not any(n.endswith("_orig") for n, _ in m.named_parameters())  # made permanent


def test_structured_pruning_shrinks_matrices_and_matches_masking(tiny, tmp_path):
    import copy

    pruned, masked = copy.deepcopy(tiny), copy.deepcopy(tiny)
    info = P.structured_prune(pruned, heads=0.5, ffn=0.5)
    assert info == {"heads_per_layer": [1, 1], "ffn_per_layer": [32, 32]}
    for block_p, block_m in zip(pruned.bert.encoder.layer, masked.bert.encoder.layer):
        assert block_p.intermediate.dense.weight.shape == (32, 32)
        assert block_p.attention.self.query.weight.shape == (16, 32)
        # the same model by masking: zero what pruning removed (GELU(0) = 0; a head without output columns is silent)
        kept_ffn = {tuple(r.tolist()) for r in block_p.intermediate.dense.weight}
        for j, row in enumerate(block_m.intermediate.dense.weight):
            if tuple(row.tolist()) not in kept_ffn:
                block_m.intermediate.dense.weight.data[j] = 0
                block_m.intermediate.dense.bias.data[j] = 0
        kept_q = {tuple(r.tolist()) for r in block_p.attention.self.query.weight}
        for j, row in enumerate(block_m.attention.self.query.weight):
            if tuple(row.tolist()) not in kept_q:
                block_m.attention.output.dense.weight.data[:, j] = 0
    ids, mask = _ids()
    expect = masked(input_ids=ids, attention_mask=mask).logits
    got = pruned(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)

    # saved and loaded through keel's path: the smaller shapes come back
    pruned.save_pretrained(tmp_path)
    (tmp_path / "keel.json").write_text(json.dumps({"resized": True}))
    from transformers import AutoModelForSequenceClassification

    loaded = load_resized(AutoModelForSequenceClassification, tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, got)


def test_vocabulary_trimming_maps_unseen_tokens_to_unknown(tiny, tmp_path):
    import copy

    m = copy.deepcopy(tiny)
    ids, mask = _ids()
    seen = set(ids[1:].flatten().tolist())  # row 0 has tokens the trimmed model never saw
    unk = 100
    info = P.trim_vocabulary(m, seen, unk)
    assert info["tokens_kept"] == len(seen | {unk})
    before, after = (
        tiny(input_ids=ids[1:], attention_mask=mask[1:]).logits,
        m(input_ids=ids[1:], attention_mask=mask[1:]).logits,
    )
    torch.testing.assert_close(after, before)  # seen tokens: nothing changes
    unseen = [i for i in ids[0].tolist() if i not in seen]
    swapped = ids[:1].clone()
    swapped[0, [ids[0].tolist().index(i) for i in unseen]] = unk
    torch.testing.assert_close(
        m(input_ids=ids[:1], attention_mask=mask[:1]).logits, tiny(input_ids=swapped, attention_mask=mask[:1]).logits
    )
    m.save_pretrained(tmp_path)
    (tmp_path / "keel.json").write_text(json.dumps({"resized": True}))
    from transformers import AutoModelForSequenceClassification

    loaded = load_resized(AutoModelForSequenceClassification, tmp_path)
    torch.testing.assert_close(
        loaded(input_ids=ids, attention_mask=mask).logits, m(input_ids=ids, attention_mask=mask).logits
    )


def test_torchao_int8_keeps_logits(tiny):
    import copy

    from keel.runtime.int8 import torchao_int8

    ids, mask = _ids(n=8)
    ref = tiny(input_ids=ids, attention_mask=mask).logits.flatten()
    q = torchao_int8(copy.deepcopy(tiny), "weight-only")
    got = q(input_ids=ids, attention_mask=mask).logits.flatten()
    assert torch.nn.functional.cosine_similarity(ref, got, dim=0).item() >= 0.99
    with pytest.raises(KeelError, match="mode"):
        torchao_int8(copy.deepcopy(tiny), "int3")
    with pytest.raises(KeelError, match="no Linear layers"):
        torchao_int8(torch.nn.Sequential(torch.nn.Embedding(10, 4)))


def _row(variant, acc, p50, mb, thr=100.0, base_acc=0.80):
    return {
        "variant": variant,
        "accuracy": acc,
        "p50_ms_batch1": p50,
        "disk_mb": mb,
        "throughput_batch32": thr,
        "accuracy_drop_points": (base_acc - acc) * 100,
    }


def test_budget_picks_the_right_variant_on_fabricated_measurements(tmp_path, monkeypatch):
    from keel.compress import budget as Bu

    scored = []  # the test split: the chosen variant alone, once
    monkeypatch.setattr(
        Bu,
        "test_figures",
        lambda run_dir, v: scored.append(v) or {"accuracy": 0.7, "n": 9, "accuracy_drop_points": 1.5},
    )
    rows = [
        _row("hf-pipeline", 0.80, 15.0, 90.0),
        _row("teacher-torch", 0.80, 12.0, 90.0),
        _row("student-onnx-int8", 0.795, 3.0, 12.0),
        _row("pruned-onnx-int8", 0.785, 2.0, 6.0),
        _row("pruned-onnx", 0.80, 2.5, 20.0, thr=900.0),
    ]
    chosen, why = select(rows, BudgetConfig(max_accuracy_drop=1.0))
    assert chosen["variant"] == "pruned-onnx"  # pruned-onnx-int8 is faster but lost 1.5 points
    assert "accuracy drop 1.50 > 1 points" in why["pruned-onnx-int8"][0]
    assert select(rows, BudgetConfig(max_accuracy_drop=2.0))[0]["variant"] == "pruned-onnx-int8"
    assert select(rows, BudgetConfig(max_accuracy_drop=1.0, prefer="size"))[0]["variant"] == "student-onnx-int8"
    assert select(rows, BudgetConfig(max_accuracy_drop=1.0, max_size_mb=15))[0]["variant"] == "student-onnx-int8"
    assert select(rows, BudgetConfig(max_accuracy_drop=1.0, prefer="throughput"))[0]["variant"] == "pruned-onnx"

    rec = pick_deployable(tmp_path, {"variants": rows}, BudgetConfig(max_accuracy_drop=1.0))
    saved = json.loads((tmp_path / "compress" / "deployable.json").read_text())
    assert saved["deployable"] == rec["deployable"] == "pruned-onnx" and scored == ["pruned-onnx"]
    assert saved["test"]["accuracy"] == 0.7  # reported as it came: a test drop beyond the budget is no re-pick
    with pytest.raises(GateError, match="no compressed variant is within compress.budget"):
        pick_deployable(tmp_path, {"variants": rows}, BudgetConfig(max_accuracy_drop=1.0, max_latency_ms=1.0))
    assert json.loads((tmp_path / "compress" / "deployable.json").read_text())["deployable"] is None
    assert scored == ["pruned-onnx"]  # nothing chosen, nothing scored on the test split


def test_bench_ratios_are_medians_of_same_round_ratios_with_their_range(tmp_path, monkeypatch):
    """Three rounds, the variants taking turns (order reversed every other round): each ratio is the median of the
    rounds' ratios, each against the pipeline of the same round, and the lowest and highest are kept beside it."""
    from keel.export import bench as B

    (tmp_path / "model").mkdir()
    slow_spell = {("hf-pipeline", 0): 2.0, ("pruned-onnx-int8", 1): 3.0}  # (variant, round) -> slowdown
    calls = []

    def measure(run_dir, variant, n_latency, n_eval):
        k = sum(v == variant for v in calls)
        calls.append(variant)
        f = slow_spell.get((variant, k), 1.0)
        p50, thr = {"hf-pipeline": (20.0, 80.0), "pruned-onnx-int8": (2.5, 640.0)}[variant]
        return {
            "variant": variant,
            "accuracy": 0.74,
            "macro_f1": 0.7,
            "disk_mb": 90.0 if variant == "hf-pipeline" else 9.0,
            "p50_ms_batch1": p50 * f,
            "p95_ms_batch1": 2 * p50 * f,
            "throughput_batch32": thr / f,
            "throughput_sorted_batch32": 1.5 * thr / f,
            "peak_rss_mb": 500.0,
        }

    monkeypatch.setattr(B, "_measure", measure)
    result = B.bench(tmp_path, variants=["pruned-onnx-int8"], rounds=3)
    assert calls == ["hf-pipeline", "pruned-onnx-int8", "pruned-onnx-int8", "hf-pipeline", "hf-pipeline", calls[1]]
    base, pruned = result["variants"]
    # per round: 640 / 160 = 16x (the pipeline's slow spell), 213.3 / 80 = 2.67x (the variant's), 8x
    assert pruned["throughput_vs_pipeline"] == 8.0 and pruned["throughput_sorted_vs_pipeline"] == 8.0
    assert pruned["throughput_vs_pipeline_range"] == pytest.approx([640 / 3 / 80, 16.0])
    assert pruned["speedup_p50_vs_pipeline"] == 8.0 and base["throughput_vs_pipeline"] == 1.0
    assert (base["throughput_batch32"], pruned["throughput_batch32"]) == (80.0, 640.0)  # medians of the rounds
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rounds"] == 3 and len(saved["load_average"]) == 3 and saved["warmup_batches"] == B.WARMUP_BATCHES


def test_bench_times_batches_only_after_the_same_warm_up_batches_for_every_variant():
    """The warm-up batches are scored but not timed: a first batch that pays one-off costs counts in no figure."""
    import numpy as np

    from keel.export import bench as B

    now, seen = [0.0], []

    def logits_of(batch):  # a model whose first call costs 100 s and every later one 1 s
        now[0] += 100.0 if not seen else 1.0
        seen.append(len(batch))
        return np.zeros((len(batch), 3))

    texts = [f"text {i}" for i in range(96)]
    in_order = [list(range(i, i + 32)) for i in range(0, 96, 32)]
    timed = B.time_batches(logits_of, texts, in_order, in_order[::-1], clock=lambda: now[0])
    assert seen[: B.WARMUP_BATCHES] == [32] * B.WARMUP_BATCHES and len(seen) == B.WARMUP_BATCHES + 6
    assert timed["throughput_batch32"] == timed["throughput_sorted_batch32"] == 96 / 3.0
    assert timed["logits"].shape == (96, 3)


# -- end to end, through the CLI ---------------------------------------------------------------------------

COMPRESS = """compress:
  distill: {{epochs: 2, lr: 3.0e-3}}
  prune: {{heads: 0.5, ffn: 0.5, vocab: true, finetune_epochs: 1, lr: 1.0e-3}}
  quantize: {{onnx_static_int8: true}}
  budget: {{max_accuracy_drop: {drop}}}
  bench_latency_samples: 5
  bench_eval_samples: 40
"""


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compress")
    csv = write_toy_csv(tmp / "toy.csv", n=200)
    recipe = tmp / "r.yaml"
    recipe.write_text(TINY_RECIPE.format(data=csv, epochs=3, every=0) + COMPRESS.format(drop=100))
    proc = keel("run", str(recipe), cwd=tmp)
    return tmp / "runs" / "tiny", proc


@pytest.mark.slow
def test_keel_run_compresses_exports_and_names_the_deployable_model(compressed_run):
    run, proc = compressed_run
    rec = json.loads((run / "compress" / "deployable.json").read_text())
    bench = json.loads((run / "bench.json").read_text())
    names = [r["variant"] for r in bench["variants"]]
    assert names[:2] == ["hf-pipeline", "teacher-torch"]
    assert {"student-torch", "pruned-torch", "pruned-onnx", "pruned-onnx-int8", "pruned-onnx-static-int8"} <= set(names)
    assert {"teacher-onnx", "teacher-onnx-int8", "teacher-onnx-static-int8"} <= set(names)  # the budget's fallback
    assert rec["deployable"] in names and rec["deployable"] != "hf-pipeline"
    info = json.loads((run / "compress" / "pruned" / "model" / "keel.json").read_text())
    assert info["resized"] and info["structured"]["heads_per_layer"] == [1]
    assert info["params_after"] < info["params_before"]
    assert f"deployable model: {rec['deployable']}" in proc.stdout
    # picked on validation figures, then scored once on the test split, as `keel eval --backend` scores it
    assert rec["picked_on"] == bench["split"] == "validation"
    scored = json.loads(keel("eval", str(run), "--backend", rec["deployable"], "--json", cwd=run.parent.parent).stdout)
    assert (rec["test"]["accuracy"], rec["test"]["n"]) == (scored["accuracy"], scored["n"])
    teacher = json.loads((run / "eval" / "test.json").read_text())
    assert rec["test"]["accuracy_drop_points"] == pytest.approx((teacher["accuracy"] - scored["accuracy"]) * 100)
    html = (run / "report.html").read_text()
    assert rec["deployable"] in html and "Pareto" in html
    # the deployable variant is usable by the other verbs
    pred = keel("predict", str(run), "a lovely trip", "--backend", rec["deployable"], "--json", cwd=run.parent.parent)
    assert json.loads(pred.stdout.strip().splitlines()[-1])["label"] in ("neg", "pos")


@pytest.mark.slow
def test_unstructured_zeros_survive_finetuning_and_reload(compressed_run):
    run, _ = compressed_run
    keel(
        "prune",
        str(run),
        "compress.prune.heads=0",
        "compress.prune.ffn=0",
        "compress.prune.vocab=false",
        "compress.prune.sparsity=0.5",
        "compress.prune.finetune_epochs=1",
        cwd=run.parent.parent,
    )
    from keel.runtime.load import load_trained

    model = load_trained(run / "compress" / "pruned").model
    assert abs(P.measured_sparsity(model) - 0.5) <= 0.005


@pytest.mark.slow
def test_a_budget_no_variant_meets_fails_with_exit_3(compressed_run):
    run, _ = compressed_run
    # no new stages and the fewest exports: the point is the verdict, not the variants
    proc = keel(
        "compress",
        str(run),
        "compress.distill=null",
        "compress.prune=null",
        "compress.budget.max_latency_ms=0.0001",
        "compress.quantize.onnx_static_int8=false",
        "compress.quantize.teacher=false",
        cwd=run.parent.parent,
        check=False,
    )
    assert proc.returncode == 3
    assert "no compressed variant is within compress.budget" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_compression_input_gets_a_clear_error(compressed_run):
    run, _ = compressed_run
    cwd = run.parent.parent
    bigger = keel("distill", str(run), "compress.distill.student=minilm-l6", cwd=cwd, check=False)
    assert bigger.returncode == 2 and "not fewer than the teacher" in bigger.stderr + bigger.stdout
    nothing = keel(
        "prune",
        str(run),
        "compress.prune.ffn=0",
        "compress.prune.heads=0",
        "compress.prune.vocab=false",
        cwd=cwd,
        check=False,
    )
    assert nothing.returncode == 2 and "removes nothing" in nothing.stderr + nothing.stdout
    unknown = keel("predict", str(run), "x", "--backend", "pruned-onnx-int4", cwd=cwd, check=False)
    assert unknown.returncode == 2 and "backend" in unknown.stderr + unknown.stdout


def test_the_distiller_scores_each_text_with_a_classifier_teacher_once_across_epochs():
    """The same texts again (another epoch: reordered, padded longer) reuse the teacher's logits: same loss, no
    second teacher pass; texts it has not scored yet run it."""
    from keel.compress.distill import Distiller

    torch.manual_seed(0)
    teacher = build_model(model_dir("tiny-bert"), ["neg", "pos", "neu"]).eval()
    torch.manual_seed(1)
    student = build_model(model_dir("tiny-bert"), ["neg", "pos", "neu"]).eval()  # another head: a loss well above 0
    passes = []
    teacher.register_forward_hook(lambda module, args, out: passes.append(len(out.logits)))
    ids, mask = _ids()
    distiller = Distiller(teacher, alpha=0.0, temperature=2.0)
    first = distiller(student, {"input_ids": ids, "attention_mask": mask})
    order, pad = torch.tensor([2, 0, 3, 1]), torch.zeros(4, 3, dtype=ids.dtype)
    again = distiller(
        student, {"input_ids": torch.cat([ids[order], pad], 1), "attention_mask": torch.cat([mask[order], pad], 1)}
    )
    assert passes == [4] and first.item() > 0 and again.item() == pytest.approx(first.item(), rel=1e-4)
    distiller(student, {"input_ids": ids[:2] + 1, "attention_mask": mask[:2]})  # two new texts
    assert passes == [4, 2]


def test_logit_distillation_works_for_causal_lms():
    from keel.compress.distill import Distiller
    from keel.tasks import causal_lm

    torch.manual_seed(0)
    teacher = causal_lm.build_model(model_dir("tiny-llama"), []).eval()
    student = student_from_teacher(teacher, [1])
    assert student.config.num_hidden_layers == 1
    ids = torch.randint(10, 1000, (2, 16))
    batch = {"input_ids": ids, "labels": ids.clone()}
    same = Distiller(teacher, alpha=0.0, temperature=2.0, causal=True)(teacher, batch)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    loss = Distiller(teacher, alpha=0.5, temperature=2.0, causal=True)(student.train(), batch)
    loss.backward()
    assert loss.item() > 0 and student.model.layers[0].mlp.down_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen
    info = P.structured_prune(student, ffn=0.5)  # Llama FFN neurons shrink too
    assert info["ffn_per_layer"] == [student.config.intermediate_size // 2]
    with pytest.raises(KeelError, match="heads"):
        P.structured_prune(student, heads=0.5)


@pytest.mark.slow
def test_a_static_int8_export_that_drifts_is_left_out_not_fatal(compressed_run, monkeypatch, capsys):
    from keel.compress import stages
    from keel.export import onnx as O

    def drifting(*args, **kwargs):
        raise KeelError("static int8 ONNX logits drift too far from fp32 (cosine 0.9700 < 0.99)")

    monkeypatch.setattr(O, "quantize_static_int8", drifting)
    run, _ = compressed_run
    produced = stages.quantize(run, stage="teacher")
    assert produced == ["teacher-onnx", "teacher-onnx-int8"]
    assert "static int8 left out: static int8 ONNX logits drift" in capsys.readouterr().err
