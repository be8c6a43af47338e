"""Deployment files. Docker and Kubernetes cannot run here: the Kubernetes manifests are validated
against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields fail), and the compose
file is checked for consistency with the files it mounts and the Prometheus targets (no `docker
compose config` here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).parents[1] / "deploy"


@pytest.mark.parametrize("manifest", ["triton.yaml", "gateway.yaml"])
def test_kubernetes_manifests_match_the_schema(manifest):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / manifest).read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, latest_version(), strict=True)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service"} <= kinds


def test_triton_deployment_has_a_gpu_patient_probes_and_an_hpa_on_queue_length():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "triton.yaml").read_text())}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load the model
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-adapter-values.yaml").read_text())
    assert metric == adapter["rules"]["custom"][0]["name"]["as"] == "qwen3vl_queue_length"


def test_compose_mounts_existing_files_and_prometheus_scrapes_its_services():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"triton", "gateway", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):  # files of this folder (../ are the user's: repository, keys)
                assert (DEPLOY / source).exists(), (name, source)
    assert services["triton"]["shm_size"] and services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    published = {f"{name}:{p.split(':')[-1]}" for name, s in services.items() for p in s.get("ports", [])}
    assert targets <= published, targets - published
