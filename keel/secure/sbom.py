"""Bill of materials and provenance of a run: a CycloneDX SBOM of the training environment (``sbom.cdx.json``) and
``provenance.json`` (the recipe's hash, the data's and the base model's hashes, the SBOM's hash), written when
training ends; the model card shows them and `keel verify` checks the card's claims against the files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from keel.errors import KeelError
from keel.io import atomic_write_json, atomic_write_text, read_json, sha256_file

SBOM, PROVENANCE = "sbom.cdx.json", "provenance.json"


def environment_sbom() -> str:
    """CycloneDX 1.6 JSON: every installed Python distribution (name, version, purl) of this process's environment."""
    from importlib import metadata

    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    from keel._version import __version__

    bom = Bom()
    bom.metadata.component = Component(name="keel", version=__version__, type=ComponentType.APPLICATION)
    seen = set()
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name, version = dist.metadata["Name"], dist.version
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        bom.components.add(
            Component(
                name=name,
                version=version,
                type=ComponentType.LIBRARY,
                purl=PackageURL(type="pypi", name=name.lower(), version=version),
                bom_ref=f"pypi:{name.lower()}@{version}",
            )
        )
    bom.register_dependency(bom.metadata.component, bom.components)  # a flat graph: the environment as installed
    return JsonV1Dot6(bom).output_as_string(indent=2)


def _folder_digest(folder: Path) -> str:
    """One SHA-256 over the sorted (relative name, file sha256) pairs of a folder: a base model's identity."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def splits_digest(run_dir: Path) -> str | None:
    """One SHA-256 over the frozen splits' files (checked against their manifest first): the data trained on."""
    folder = Path(run_dir) / "splits"
    if not (folder / "manifest.json").is_file():
        return None
    from keel.io import verify_manifest

    files = verify_manifest(folder)["files"]
    return hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode()).hexdigest()


def provenance(run_dir: Path, recipe) -> dict:
    run_dir = Path(run_dir)
    meta = read_json(run_dir / "splits" / "splits.json")
    base = {"name": recipe.model.name}
    try:
        from keel.models.registry import model_dir

        folder = model_dir(recipe.model.name)
        base["sha256"] = _folder_digest(Path(folder))
    except Exception as e:  # noqa: BLE001 (a model from scratch, or one gone: say so, invent no hash; never fail the run)
        base["sha256"] = None
        base["note"] = f"not hashed: {type(e).__name__}"
    data = {
        "source": meta.get("source"),
        "source_sha256": meta.get("source_sha256"),
        "splits_sha256": splits_digest(run_dir),
    }
    return {
        "format": "keel-provenance/1",
        "recipe_sha256": recipe.sha256(),
        "data": data,
        "base_model": base,
        "sbom": {"file": SBOM, "sha256": sha256_file(run_dir / SBOM) if (run_dir / SBOM).is_file() else None},
    }


def record(run_dir: Path, recipe) -> dict:
    """Write the SBOM, then the provenance that names its hash."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / SBOM, environment_sbom())
    prov = provenance(run_dir, recipe)
    atomic_write_json(run_dir / PROVENANCE, prov)
    return prov


def card_lines(run_dir: Path) -> list[str]:
    """The model card's provenance section (read back by `check_card`)."""
    prov = read_json(Path(run_dir) / PROVENANCE)
    if not prov:
        return ["No provenance recorded (trained by an older keel).", ""]
    n = len(read_json(Path(run_dir) / SBOM).get("components", []))
    return [
        f"- Recipe sha256: `{prov['recipe_sha256']}`",
        f"- Data source sha256: `{prov['data'].get('source_sha256')}`",
        f"- Data splits sha256: `{prov['data'].get('splits_sha256')}`",
        f"- Base model: {prov['base_model'].get('name')}, sha256 `{prov['base_model'].get('sha256')}`",
        f"- Environment SBOM (CycloneDX 1.6, {n} packages): `{SBOM}`, sha256 `{prov['sbom'].get('sha256')}`",
        "",
    ]


_CLAIM = re.compile(r"^- (Recipe sha256|Environment SBOM)[^`]*`([^`]+)`(?:, sha256 `([^`]+)`)?", re.MULTILINE)


def check_card(run_dir: Path) -> int:
    """Each hash the model card claims is recomputed from the run's files; returns the number of claims checked."""
    run_dir = Path(run_dir)
    card = run_dir / "model" / "MODEL_CARD.md"
    if not card.is_file():
        return 0
    text = card.read_text()
    prov = read_json(run_dir / PROVENANCE)
    checked = 0
    for m in _CLAIM.finditer(text):
        if m.group(1) == "Recipe sha256":
            from keel.recipe import load_recipe

            actual = load_recipe(run_dir / "recipe.yaml").sha256()
            if m.group(2) != actual or m.group(2) != prov.get("recipe_sha256"):
                raise KeelError(
                    f"{card} claims recipe sha256 {m.group(2)[:12]} but {run_dir / 'recipe.yaml'} hashes "
                    f"to {actual[:12]}; restore the recipe or rebuild the card (keel audit)"
                )
        else:
            path = run_dir / m.group(2)
            actual = sha256_file(path) if path.is_file() else "missing"
            if m.group(3) != actual:
                raise KeelError(
                    f"{card} claims {m.group(2)} sha256 {str(m.group(3))[:12]} but the file is "
                    f"{actual[:12]}; restore it or rebuild the card (keel audit)"
                )
        checked += 1
    for line in text.splitlines():  # the data hashes, recomputed from the frozen splits
        for label, value in (
            ("Data source sha256", read_json(run_dir / "splits" / "splits.json").get("source_sha256")),
            ("Data splits sha256", splits_digest(run_dir)),
        ):
            if line.startswith(f"- {label}: `"):
                if line.split("`")[1] != str(value):
                    raise KeelError(
                        f"{card} claims {label.lower()} {line.split('`')[1][:12]} but the run's splits/ "
                        f"say {str(value)[:12]}; restore them or rebuild the card (keel audit)"
                    )
                checked += 1
    return checked


def section_provenance(run_dir: Path, ctx: dict) -> str | None:
    """The report's section: the hashes of what went into the run, and the environment's packages."""
    import html

    prov = read_json(Path(run_dir) / PROVENANCE)
    if not prov:
        return None
    comps = read_json(Path(run_dir) / SBOM).get("components", [])
    base, data = prov.get("base_model", {}), prov.get("data", {})
    rows = [
        ("recipe sha256", prov.get("recipe_sha256")),
        ("data source", data.get("source")),
        ("data source sha256", data.get("source_sha256")),
        ("frozen splits sha256", data.get("splits_sha256")),
        ("base model", base.get("name")),
        ("base model sha256", base.get("sha256") or base.get("note")),
        (f"SBOM ({SBOM}, CycloneDX 1.6)", f"{len(comps)} packages, sha256 {prov.get('sbom', {}).get('sha256')}"),
    ]
    table = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in rows
    )
    # the package list itself stays in the SBOM: names such as httpx read like links to a page checked for them
    return (
        f"<h2>Provenance</h2><p class='sub'>What trained this model; <code>keel verify</code> checks the model "
        f"card's claims against these files.</p><table>{table}</table>"
    )
