"""The embedded default's configuration and what `fashionchameleon up` prints (no Ray needed)."""

from __future__ import annotations

import json

from services.launcher import Embedded, embedded_config, free_port, start_redis_server
from shared.config import AppConfig, api_key_digest


def _embedded_args(tmp_path) -> dict:
    return dict(
        redis_url="redis://127.0.0.1:1/0",
        store_root=str(tmp_path),
        api_keys={"dev": "secret-key-000000000"},
        grpc_port=9123,
        http_port=9124,
    )


def test_describe_is_json_and_config_round_trips(tmp_path):
    config = embedded_config(**_embedded_args(tmp_path))
    info = json.loads(json.dumps(Embedded(config, "secret-key-000000000").describe()))
    assert info["grpc"] == "127.0.0.1:9123" and info["tenant"] == "dev" and info["store"] == str(tmp_path)
    again = AppConfig.from_json(config.to_json())  # what every Ray replica rebuilds
    assert again.auth.key_to_tenant() == {}, "API keys cross to replicas as digests only"
    assert again.auth.digest_to_tenant() == {api_key_digest("secret-key-000000000"): "dev"}
    assert again == config.model_copy(update={"auth": config.auth.hashed()})


def test_local_redis_starts_and_stops():
    redis = start_redis_server()
    try:
        import redis as redis_sync

        assert redis_sync.Redis.from_url(redis.url).ping()
    finally:
        redis.stop()
    assert redis.process.poll() is not None
    assert free_port() > 0


def test_from_env_reads_secrets_from_their_own_variables():
    import pytest

    base = {"storage": {"backend": "s3", "s3": {"endpoint": "s3.local:9000", "bucket": "media"}}}
    env = {
        "FASHIONCHAMELEON_CONFIG": json.dumps(base),
        "FASHIONCHAMELEON_API_KEYS": json.dumps({"acme": "key-acme-0123456789"}),
        "FASHIONCHAMELEON_REDIS_URL": "redis://redis:6379/1",
        "FASHIONCHAMELEON_S3_ACCESS_KEY": "AK",
        "FASHIONCHAMELEON_S3_SECRET_KEY": "SK",
    }
    config = AppConfig.from_env(env)
    assert (
        config.storage.s3.secret_key.get_secret_value() == "SK"
        and config.storage.s3.access_key.get_secret_value() == "AK"
    )
    assert config.auth.key_to_tenant() == {"key-acme-0123456789": "acme"} and config.redis.url == "redis://redis:6379/1"
    with pytest.raises(ValueError, match="both"):
        AppConfig.from_env({**env, "FASHIONCHAMELEON_S3_SECRET_KEY": ""})
    with pytest.raises(ValueError, match=r"no storage\.s3"):
        AppConfig.from_env({**env, "FASHIONCHAMELEON_CONFIG": "{}"})


def test_embedded_generator_keeps_half_a_chunk_for_the_deployments_it_shares_the_machine_with(tmp_path):
    args = _embedded_args(tmp_path)
    assert embedded_config(**args).generator.realtime_headroom == 1.0
    mine = embedded_config(**args, generator={"realtime_headroom": 0.3, "max_batch_size": 2}).generator
    assert (mine.realtime_headroom, mine.max_batch_size) == (0.3, 2)  # an explicit setting wins


def test_serve_moves_to_new_ports_when_a_picked_port_was_taken(tmp_path, monkeypatch):
    """Ray's own processes bind random ports while it starts: a port `free_port` picked can be
    gone when Serve's proxy binds it. With repick_ports, Serve starts on newly picked ports and
    the returned config says which; without, the error stands."""
    import ray
    from ray import serve

    import services.app
    from services.launcher import start_app

    starts: list[tuple[int, int]] = []

    def start(grpc_options, http_options):
        starts.append((grpc_options.port, http_options.port))
        if len(starts) == 1:
            raise RuntimeError("ray::ProxyActor.ready() ... Failed to bind to address '127.0.0.1:1'.")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "run", lambda *a, **k: None)
    monkeypatch.setattr(services.app, "build_app", lambda config: None)
    config = embedded_config(**_embedded_args(tmp_path))
    served = start_app(config, repick_ports=True)
    assert len(starts) == 2 and starts[0] == (9123, 9124) and starts[1] != starts[0]
    assert (served.serve.grpc_port, served.serve.http_port) == starts[1]
    starts.clear()
    import pytest

    with pytest.raises(RuntimeError, match="Failed to bind"):
        start_app(config)  # ports the caller asked for are never changed behind its back
