"""compose.yaml is what an operator deploys; no Docker engine here, so check what matters."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load():
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_postgres_is_18_with_logical_wal_and_a_health_check():
    pg = load()["services"]["postgres"]
    assert pg["image"].split(":")[1].split(".")[0] == "18"
    assert "wal_level=logical" in pg["command"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def test_listener_waits_for_healthy_postgres_and_points_at_it():
    compose = load()
    listener = compose["services"]["listener"]
    assert listener["depends_on"]["postgres"]["condition"] == "service_healthy"
    url = listener["environment"]["DATABASE_URL"]
    env = compose["services"]["postgres"]["environment"]
    assert url == f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    assert "merkle-listener init && merkle-listener run" in " ".join(listener["command"])


def test_the_listener_image_builds_from_this_project():
    assert load()["services"]["listener"]["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    for needed in ("COPY listener", "COPY sql", "pip install"):
        assert needed in dockerfile
