"""Secure artifacts: encryption at rest (seal.py), signatures (sign.py), bill of materials (sbom.py)."""
