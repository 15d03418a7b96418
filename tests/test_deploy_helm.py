"""deploy/helm/keel renders with Helm's own engine (the Helm SDK, offline) into manifests that pass the Kubernetes
schemas in strict mode, with the probes on keel's health routes, the API keys in a Secret and a locked-down pod."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="the Helm SDK is not installed (make deploy-tools)")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (make deploy-tools)")

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "keel"
KUBE_VERSION = "1.30.0"  # the oldest Kubernetes the chart is checked against; newer ones keep these APIs
KEYS = {"apiKeys": {"keys": ["helm-test-key-0123456789"]}}


def render(values: dict | None = None) -> list[dict]:
    manifests = helm.Chart.load(CHART).render(values, name="demo", namespace="serving")
    docs = []
    for path, text in manifests.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def strict_errors(docs: list[dict]) -> list[str]:
    errors = []
    for doc in docs:
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{doc['kind']}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


@pytest.mark.parametrize(
    "values",
    [
        KEYS,
        {**KEYS, "autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
        {"apiKeys": {"existingSecret": "my-keys"}, "model": {"claimName": "runs", "subPath": "quickstart"}},
    ],
    ids=["defaults", "fixed-replicas", "existing-secret"],
)
def test_the_chart_renders_manifests_that_pass_the_strict_schemas(values):
    docs = render(values)
    assert docs and strict_errors(docs) == []


def test_the_strict_check_catches_a_misspelt_field():
    docs = render({**KEYS, "securityContext": {"readOnlyRootFileSystem": True}})  # FileSystem: not a field
    assert any("readOnlyRootFileSystem" in e for e in strict_errors(docs))


def test_probes_keys_and_the_pod_are_what_keel_serve_expects():
    from keel.serve.guard import OPEN_PATHS

    kinds = by_kind(render(KEYS))
    assert "ConfigMap" not in kinds
    assert {"Deployment", "Service", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    probes = {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"] == "/health/ready" and probes["livenessProbe"] == "/health/live"
    assert set(probes.values()) <= set(OPEN_PATHS)  # probes need no key: keel leaves exactly these open
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model"]["mountPath"] == "/model" and mounts["model"]["readOnly"] is True
    assert mounts["tmp"]["mountPath"] == "/tmp"  # the one writable place (caches)
    # the keys reach keel as a file from the Secret, never through args or a plain env value
    args = container["args"]
    assert args[args.index("--api-key-file") + 1].startswith(mounts["api-keys"]["mountPath"])
    secret = kinds["Secret"]
    assert pod["volumes"][1]["secret"]["secretName"] == secret["metadata"]["name"]
    assert "helm-test-key-0123456789" not in yaml.safe_dump(kinds["Deployment"])
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert "serve.max_batch_size=32" in args


def test_the_serve_values_become_settings_keel_serve_accepts():
    from keel.recipe import validate_serve

    [deployment] = [d for d in render(KEYS) if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    settings = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    raw = {s.split("=", 1)[0].removeprefix("serve."): s.split("=", 1)[1] for s in settings}
    config = validate_serve(raw)  # raises KeelError on a key or value keel serve would refuse
    assert raw and all(str(getattr(config, k)) == v for k, v in raw.items() if "." not in k)


def test_without_api_keys_the_chart_refuses_to_render_and_says_how():
    with pytest.raises(helm.HelmError) as e:
        render({})
    assert "apiKeys.existingSecret" in str(e.value)


def _leaves(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        if (
            isinstance(value, dict)
            and value
            and key not in ("serve", "resources", "podSecurityContext", "securityContext")
        ):
            keys += _leaves(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def test_the_chart_readme_documents_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    missing = [key for key in _leaves(values) if f"`{key}`" not in readme]
    assert missing == []
