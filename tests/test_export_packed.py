"""The padding-free forward pass keel exports for BERT-style classifiers: eager PyTorch (padded) is the oracle."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE, keel, tiny_bert_classifier, write_toy_csv


def _tiny_classifier(heads=0.0, ffn=0.0, vocab=False):
    from keel.compress.prune import structured_prune, trim_vocabulary

    model = tiny_bert_classifier()
    if heads or ffn:
        structured_prune(model, heads, ffn)
    if vocab:
        trim_vocabulary(model, set(range(0, 120, 2)), unk_id=1)
    return model


def _padded_batch(lengths, vocab=120, seed=0):
    """Right-padded ids (B, T) with a [CLS]-like first token, token types in two segments, and junk ids under the
    padding (the packed graph must never read them; the padded one masks them)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    types = ((torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None] // 2) & mask.bool()).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("pruned", [{}, {"heads": 0.5, "ffn": 0.5, "vocab": True}])
def test_packed_logits_equal_the_padded_models(pruned):
    from keel.export.packed import PackedBertClassifier, can_pack

    model = _tiny_classifier(**pruned)
    assert can_pack(model)
    packed = PackedBertClassifier(model)
    for lengths in ([7], [3, 9, 1, 5], [12, 12], [2, 30, 4, 17, 8, 2]):
        batch = _padded_batch(lengths)
        with torch.no_grad():
            ref = model(**batch).logits  # (B, C)
            got = packed(**batch)
            alone = torch.cat(
                [packed(**{k: v[i : i + 1, :n] for k, v in batch.items()}) for i, n in enumerate(lengths)]
            )
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5
        assert (alone - ref).abs().max() <= 1e-5  # a text's logits do not depend on its batch mates or the padding


def test_other_models_are_not_packed():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from keel.export.packed import can_pack

    llama = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    assert not can_pack(llama)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("export-packed")
    csv = write_toy_csv(work / "toy.csv", n=80)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    keel("train", "tiny.yaml", cwd=work, check=True)
    run_dir = work / "runs" / "tiny"
    keel("export", str(run_dir), cwd=work, check=True)
    return run_dir


@pytest.mark.slow
def test_export_of_a_bert_classifier_is_packed_and_matches_eager(exported):
    from transformers import AutoModelForSequenceClassification

    from keel.runtime.ort import OnnxClassifier

    for variant in ("onnx", "onnx-int8"):
        assert json.loads((exported / "export" / variant / "keel.json").read_text())["packed"] is True
    eager = AutoModelForSequenceClassification.from_pretrained(exported / "model").eval()
    fp32 = OnnxClassifier(exported / "export" / "onnx")
    vocab = eager.config.vocab_size
    for lengths in ([5], [2, 20, 9, 3, 14], [31, 4]):  # batch sizes and lengths the export never saw
        batch = _padded_batch(lengths, vocab=vocab, seed=len(lengths))
        with torch.no_grad():
            ref = eager(**batch).logits.numpy()
        assert np.abs(fp32(**batch).logits.numpy() - ref).max() <= 1e-4
    padding_junk = _padded_batch([3, 20], vocab=vocab)
    clean = {k: v.clone() for k, v in padding_junk.items()}
    clean["input_ids"][clean["attention_mask"] == 0] = 0
    assert np.abs(fp32(**padding_junk).logits.numpy() - fp32(**clean).logits.numpy()).max() <= 1e-5
