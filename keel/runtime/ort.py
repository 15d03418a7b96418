"""ONNX Runtime on the CPU: a session, and a classifier over an exported folder (keel/export/onnx.py writes them).

Kept apart from the exporter so that loading a run (keel/evaluate.py) needs only the runtime side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from keel.io import verify_manifest


def session_options():
    """keel's ONNX Runtime settings: quiet, and a thread pool that sleeps between runs instead of spinning.

    ORT's pool spins while it waits for work by default; on cores shared with other processes (a server's
    neighbours, a CI machine) the spinning threads take the time slices the next op needs. Without spinning the
    demo's deployable model scored its batches of 32 1.4x-3.4x faster on a loaded 2-core machine
    (benchmarks/deployable_steps.py); a sleeping thread costs a wake-up per parallel op, which only a machine with
    idle cores would show."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])


class OnnxClassifier:
    """An ONNX Runtime session that quacks like a Hugging Face classifier where keel calls one:
    ``model(**batch).logits``, ``model.config.id2label``, ``model.eval()``."""

    def __init__(self, folder: Path):
        from types import SimpleNamespace

        from keel.secure.seal import is_sealed, open_folder

        verify_manifest(folder)
        self.folder = folder
        self.info = json.loads((folder / "keel.json").read_text())
        self.files = None  # a sealed export: its files, decrypted in memory
        if is_sealed(folder):
            from keel.secure.memory import onnx_session

            self.files = open_folder(folder)
            self.session = onnx_session(self.files, options=session_options())
        else:
            self.session = session(folder / "model.onnx")
        self.inputs = [i.name for i in self.session.get_inputs()]
        labels = self.info["labels"]
        self.config = SimpleNamespace(num_labels=len(labels), id2label=dict(enumerate(labels)))

    def _inference_mode(self) -> OnnxClassifier:
        return self  # an ONNX Runtime session has no training mode

    eval = _inference_mode  # the name keel's evaluation calls on every model

    def __call__(self, **batch):
        """Tensors (B, T) by input name -> an object with ``.logits`` (B, C), a torch tensor."""
        from types import SimpleNamespace

        import torch

        feeds = {n: batch[n].cpu().numpy().astype(np.int64) for n in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feeds)[0]))
