"""Federated learning across sites that cannot pool their data, on Flower.

    partition.py  simulation: the training split cut into sites (IID, Dirichlet label skew, one site per column value)
    site.py       what runs at a site: local training on its own rows, arrays in and out (a Flower NumPyClient)
    guard.py      the server's strategy wrapper: update validation, minimum completion, evaluation, round checkpoints
    privacy.py    client-level DP: noise calibration and the epsilon spent (Opacus's RDP accountant)
    run.py        `keel federate` (simulation), `keel federate serve` and `keel federate join` (separate processes)
    report.py     the per-round curve and the privacy spent, in report.html

Flower does the rounds, the strategies (FedAvg, FedProx, FedAdam, Krum, trimmed mean), the SecAgg+ protocol and the
transport (gRPC, arrays as bytes; nothing is pickled). keel supplies the data, the model, the validation and the run
directory, so `keel eval`, `keel export` and `keel report` work on a federated run like on any other.
"""
