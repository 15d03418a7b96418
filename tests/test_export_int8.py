"""keel's ONNX Runtime int8 graph and sessions: every Linear int8, logits kept, a thread pool that does not spin."""

import numpy as np
import onnx
import torch
from conftest import tiny_bert_classifier

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def _exported(tmp_path):
    """A tiny BERT classifier exported as keel exports it (the packed graph), and the parity feeds."""
    from keel.export.onnx import write_graph
    from keel.export.packed import PackedBertClassifier

    model = tiny_bert_classifier()
    g = torch.Generator().manual_seed(1)
    checks = []
    for lengths in ([9], [3, 12, 6], [20, 4, 11, 7, 15]):
        T = max(lengths)
        mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
        ids = torch.randint(3, 120, (len(lengths), T), generator=g) * mask
        checks.append({"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": 0 * mask.numpy()})
    with torch.no_grad():
        eager = [model(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.numpy() for f in checks]
    path = tmp_path / "model.onnx"
    write_graph(PackedBertClassifier(model), path, checks, eager, NAMES, max_len=32, atol=1e-4)
    return path, checks, eager


def test_dynamic_int8_of_the_packed_graph_quantizes_every_linear_and_keeps_the_logits(tmp_path):
    from keel.export.onnx import quantize_graph

    fp32, checks, eager = _exported(tmp_path)
    int8 = tmp_path / "int8.onnx"
    assert quantize_graph(fp32, int8, checks, eager, min_cosine=0.99) >= 0.99
    graph = onnx.load(str(int8)).graph
    assert len([n for n in graph.node if n.op_type == "MatMulInteger"]) >= 2 * 6  # every Linear of both layers


def test_keels_sessions_sleep_between_runs_instead_of_spinning(tmp_path):
    from keel.runtime.ort import session, session_options
    from keel.secure.memory import onnx_session

    fp32, checks, eager = _exported(tmp_path)
    plain = session(fp32)
    files = {"model.onnx": fp32.read_bytes()}
    files.update({p.name: p.read_bytes() for p in tmp_path.glob("model.onnx.data")})
    in_memory = onnx_session(files, options=session_options())  # how a sealed export is opened
    for s in (plain, in_memory):
        assert s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert np.abs(s.run(None, checks[-1])[0] - eager[-1]).max() <= 1e-4
