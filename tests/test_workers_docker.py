"""The Docker files, checked offline: compose structure, and a Dockerfile that copies files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_redis_persists_and_is_health_checked() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "healthcheck" in redis


def test_workers_reserve_gpus_share_the_store_and_use_the_compose_redis() -> None:
    services = compose()["services"]
    worker = services["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["environment"]["KVSTORE_REDIS_URL"].startswith("redis://redis:")
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["command"][:2] == ["kvstore", "worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert {v.split(":")[1] for v in worker["volumes"]} == {"/data", "/models"}
    assert set(compose()["volumes"]) >= {v.split(":")[0] for v in worker["volumes"] + services["redis"]["volumes"]}


def test_flower_is_an_optional_profile_on_the_same_broker() -> None:
    flower = compose()["services"]["flower"]
    assert flower["profiles"] == ["monitor"]
    assert (
        flower["environment"]["CELERY_BROKER_URL"]
        == compose()["services"]["worker"]["environment"]["KVSTORE_REDIS_URL"]
    )


def test_dockerfile_copies_only_what_exists_and_installs_cuda_torch() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text, re.M)
    assert "download.pytorch.org/whl/cu" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            matches = list(ROOT.glob(source))
            assert matches or source.endswith("*"), f"COPY source {source} does not exist"
    assert (DOCKER / "Dockerfile.dockerignore").exists()


def test_the_s3_override_points_workers_at_a_bucket_with_credentials_only_from_the_environment() -> None:
    override = yaml.safe_load((DOCKER / "docker-compose.s3.yml").read_text())["services"]
    worker = override["worker"]["environment"]
    assert worker["KVSTORE_BLOBS"].startswith("${KVSTORE_BLOBS:-s3://kvstore/")
    assert "minio:9000" in worker["AWS_ENDPOINT_URL"] and "minio" in override and "bucket" in override
    assert override["worker"]["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    secrets = [v for s in override.values() for v in (s.get("environment") or {}).values() if "SECRET" in str(v)]
    assert secrets and all("${AWS_SECRET_ACCESS_KEY" in v for v in secrets)  # passed through, never written here
    assert "s3" in re.search(r"\.\[([a-z,0-9]+)\]", (DOCKER / "Dockerfile").read_text()).group(1).split(",")
