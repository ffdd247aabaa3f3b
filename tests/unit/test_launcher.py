"""The embedded default's configuration and what `fashionchameleon up` prints (no Ray needed)."""

from __future__ import annotations

import json

from services.launcher import Embedded, embedded_config, free_port, start_redis_server
from shared.config import AppConfig


def test_describe_is_json_and_config_round_trips(tmp_path):
    config = embedded_config(
        redis_url="redis://127.0.0.1:1/0", store_root=str(tmp_path), api_keys={"dev": "secret-key-000000000"},
        grpc_port=9123, http_port=9124,
    )
    info = json.loads(json.dumps(Embedded(config, "secret-key-000000000").describe()))
    assert info["grpc"] == "127.0.0.1:9123" and info["tenant"] == "dev" and info["store"] == str(tmp_path)
    again = AppConfig.from_json(config.to_json())  # what every Ray replica rebuilds
    assert again.auth.key_to_tenant() == {"secret-key-000000000": "dev"}
    assert again == config


def test_local_redis_starts_and_stops():
    redis = start_redis_server()
    try:
        import redis as redis_sync

        assert redis_sync.Redis.from_url(redis.url).ping()
    finally:
        redis.stop()
    assert redis.process.poll() is not None
    assert free_port() > 0
