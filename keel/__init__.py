import logging as _logging

__version__ = "0.1.0"

# torchao, once installed, is imported by transformers and narrates at import time (optional CUDA kernels it
# cannot load on a CPU, deprecation notes from torch's pytree): nothing a keel user can act on.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
