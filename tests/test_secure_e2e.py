"""Sealed and signed runs through the real CLI: predict/eval/serve open them with the key and refuse them without it;
serve.verify_key refuses an unsigned or changed model before loading it; the key never reaches the server's output."""

import base64
import json
import shutil
import subprocess

import httpx
import pytest
from conftest import TINY_RECIPE, keel, write_toy_csv
from serve_helpers import Server

pytestmark = pytest.mark.slow  # trains, seals, signs and serves runs

KEY = base64.b64encode(bytes(range(7, 39))).decode()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure")
    csv = write_toy_csv(work / "toy.csv", n=120)
    recipe = work / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    keel("train", str(recipe), "output.dir=runs/base", cwd=work, check=True)
    keel("export", "runs/base", cwd=work, check=True)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    (work / "signing.key").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (work / "signing.pub").write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return work


def copy_run(work, name):
    shutil.copytree(work / "runs" / "base", work / "runs" / name)
    return work / "runs" / name


def refused(proc, *needles):
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


def predictions(proc):
    return [json.loads(line)["label"] for line in proc.stdout.splitlines() if line.startswith("{")]


def test_sealed_run_predicts_as_before_with_the_key_and_is_refused_without(base):
    run = copy_run(base, "sealed")
    texts = ["a fine day", "terrible service", "ok"]
    plain = keel("predict", str(run), *texts, "--json", cwd=base, check=True)
    keel("seal", str(run), cwd=base, check=True, env={"KEEL_SEAL_KEY": KEY})
    assert not (run / "model" / "model.safetensors").exists()
    assert not (run / "export" / "onnx" / "model.onnx").exists()
    sealed = keel("predict", str(run), *texts, "--json", cwd=base, check=True, env={"KEEL_SEAL_KEY": KEY})
    assert predictions(sealed) == predictions(plain) and predictions(plain)
    onnx = keel(
        "predict", str(run), *texts, "--json", "--backend", "onnx", cwd=base, check=True, env={"KEEL_SEAL_KEY": KEY}
    )
    assert predictions(onnx) == predictions(plain)
    refused(keel("predict", str(run), "x", cwd=base, env={"KEEL_SEAL_KEY": ""}), "no seal key")
    refused(keel("export", str(run), cwd=base, env={"KEEL_SEAL_KEY": KEY}), "would write plaintext weights")
    wrong = base64.b64encode(bytes(32)).decode()
    refused(keel("eval", str(run), cwd=base, env={"KEEL_SEAL_KEY": wrong}), "seal key does not open")
    keel("eval", str(run), cwd=base, check=True, env={"KEEL_SEAL_KEY": KEY})
    # rotation, then unseal back to the same files
    new = base64.b64encode(bytes(range(100, 132))).decode()
    keel("seal", str(run), cwd=base, check=True, env={"KEEL_SEAL_KEY": KEY, "KEEL_SEAL_NEW_KEY": new})
    refused(keel("predict", str(run), "x", cwd=base, env={"KEEL_SEAL_KEY": KEY}), "seal key does not open")
    keel("unseal", str(run), cwd=base, check=True, env={"KEEL_SEAL_KEY": new})
    assert predictions(keel("predict", str(run), *texts, "--json", cwd=base, check=True)) == predictions(plain)


def test_a_sealed_model_serves_with_the_key_and_the_key_is_never_in_its_output(base):
    run = copy_run(base, "served")
    keel("seal", str(run), cwd=base, check=True, env={"KEEL_SEAL_KEY": KEY})
    server = Server(str(run), "--backend", "torch", env={"KEEL_SEAL_KEY": KEY}, cwd=base)
    try:
        r = httpx.post(f"{server.url}/v1/classify", json={"input": ["hello there"]}, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    raw = base64.b64decode(KEY)
    for form in (KEY, raw.hex(), KEY[:16]):
        assert form not in server.log
    try:
        proc = keel("serve", str(run), "--port", "0", cwd=base, timeout=90, env={"KEEL_SEAL_KEY": ""})
    except subprocess.TimeoutExpired:
        pytest.fail("keel serve started a sealed model without its key")
    refused(proc, "no seal key")


def test_sign_verify_and_serve_verify_key(base):
    run = copy_run(base, "signed")
    key, pub = str(base / "signing.key"), str(base / "signing.pub")
    verify_key = f"serve.verify_key={pub}"
    try:
        refused(keel("serve", str(run), "--port", "0", "--set", verify_key, cwd=base, timeout=90), "is not signed")
    except subprocess.TimeoutExpired:
        pytest.fail("keel serve started an unsigned model with serve.verify_key set")
    keel("sign", str(run), "--key", key, cwd=base, check=True)
    assert (run / "signatures" / "model.sig").is_file()
    assert "signatures: 3 folder(s) match" in keel("verify", str(run), "--key", pub, cwd=base, check=True).stdout
    # a file added to the signed folder, behind keel's manifest too: the signature catches it
    extra = run / "model" / "added.json"
    extra.write_text("{}")
    manifest = (run / "model" / "manifest.json").read_bytes()
    from keel.io import write_manifest

    write_manifest(run / "model")
    refused(keel("verify", str(run), "--key", pub, cwd=base), "does not match its signature", "added added.json")
    try:
        proc = keel("serve", str(run), "--port", "0", "--set", verify_key, cwd=base, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("keel serve started a model that does not match its signature")
    refused(proc, "does not match its signature")
    # ... and one removed
    extra.unlink()
    (run / "model" / "manifest.json").write_bytes(manifest)
    keel("verify", str(run), "--key", pub, cwd=base, check=True)
    (run / "export" / "onnx" / "tokenizer_config.json").unlink()
    write_manifest(run / "export" / "onnx")
    refused(
        keel("verify", str(run), "--key", pub, cwd=base),
        "does not match its signature",
        "removed tokenizer_config.json",
    )
    # the signed, sealed demo path: seal, sign, serve with both
    run2 = copy_run(base, "sealed-signed")
    keel("seal", str(run2), cwd=base, check=True, env={"KEEL_SEAL_KEY": KEY})
    keel("sign", str(run2), "--key", key, cwd=base, check=True)
    server = Server(str(run2), "--set", verify_key, env={"KEEL_SEAL_KEY": KEY}, cwd=base)
    try:
        assert httpx.post(f"{server.url}/v1/classify", json={"input": ["hi"]}, timeout=30).status_code == 200
        assert "signatures of" in server.log and KEY not in server.log
    finally:
        server.stop()


def test_the_run_records_an_sbom_and_provenance_and_verify_checks_the_card(base):
    from keel.trust.card import write_model_card

    run = copy_run(base, "provenance")
    sbom = json.loads((run / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    names = {c["name"].lower(): c["version"] for c in sbom["components"]}
    from importlib import metadata

    assert names["torch"] == metadata.version("torch") and names["cryptography"] == metadata.version("cryptography")
    prov = json.loads((run / "provenance.json").read_text())
    from keel.recipe import load_recipe

    assert prov["recipe_sha256"] == load_recipe(run / "recipe.yaml").sha256()
    assert prov["base_model"]["sha256"] and prov["data"]["splits_sha256"] and prov["data"]["source_sha256"]
    card = write_model_card(run).read_text()
    assert prov["recipe_sha256"] in card and prov["sbom"]["sha256"] in card
    assert "4 claim(s) match" in keel("verify", str(run), cwd=base, check=True).stdout
    sbom["components"] = sbom["components"][1:]  # a package dropped from the bill of materials
    (run / "sbom.cdx.json").write_text(json.dumps(sbom))
    refused(keel("verify", str(run), cwd=base), "claims sbom.cdx.json sha256")
