"""Secrets in the suite's configuration: API keys as digests, several keys per tenant, a minimum
key length, a reserved tenant name, and per-deployment views so that each Ray deployment (and
Ray's GCS, which keeps constructor arguments) receives only the secrets it uses.

The deployment check walks the application `services.app.build_app` builds, exactly what
`serve.run` would ship, and reads every deployment's constructor argument (no Ray cluster).
"""

from __future__ import annotations

import json

import pytest

from services.studio.auth import ApiKeyAuth
from shared.config import (
    DEPLOYMENT_SECRETS,
    MIN_API_KEY_CHARS,
    AppConfig,
    AuthConfig,
    GeneratorConfig,
    api_key_digest,
)
from shared.sessionbus.config import RedisConfig
from shared.storage.config import S3StoreConfig, StorageConfig

KEY_OLD = "acme-old-key-0123456789"
KEY_NEW = "acme-new-key-9876543210"
KEY_GLOBEX = "globex-key-abcdefghijkl"
ACCESS, SECRET = "AKIAEXAMPLEACCESS", "s3-secret-very-private-value"
REDIS_PASSWORD = "redis-pw-very-private"


def _config(save_clips: bool = True) -> AppConfig:
    return AppConfig(
        auth=AuthConfig(api_keys={"acme": [KEY_OLD, KEY_NEW], "globex": KEY_GLOBEX}),
        storage=StorageConfig(
            backend="s3",
            s3=S3StoreConfig(endpoint="s3.local:9000", bucket="media", access_key=ACCESS, secret_key=SECRET),
        ),
        redis=RedisConfig(url=f"redis://default:{REDIS_PASSWORD}@redis:6379/0"),
        generator=GeneratorConfig(save_clips=save_clips),
    )


def _deployment_configs(app) -> dict[str, str]:
    """name -> the config JSON each deployment of a bound Serve application is constructed with."""
    from ray.serve.deployment import Application

    found: dict[str, str] = {}

    def walk(node: Application) -> None:
        d = node._bound_deployment
        found[d.name] = d.init_args[0]
        for arg in (*d.init_args[1:], *d.init_kwargs.values()):
            if isinstance(arg, Application):
                walk(arg)

    walk(app)
    return found


@pytest.fixture(scope="module")
def shipped() -> dict[str, str]:
    from services.app import build_app, build_eval_app

    configs = _deployment_configs(build_app(_config()))
    configs.update(_deployment_configs(build_eval_app(_config())))
    return configs


def test_every_deployment_gets_its_own_view(shipped):
    assert set(shipped) == set(DEPLOYMENT_SECRETS) == {"studio", "encoder", "decoder", "generator", "jobs", "eval"}
    for text in shipped.values():
        AppConfig.from_json(text)  # each is a whole, valid config


@pytest.mark.parametrize("key", [KEY_OLD, KEY_NEW, KEY_GLOBEX])
def test_no_deployment_receives_a_plaintext_api_key(shipped, key):
    for name, text in shipped.items():
        assert key not in text, f"{name} received a plaintext API key"


def test_only_studio_receives_the_api_key_digests(shipped):
    digests = [api_key_digest(k) for k in (KEY_OLD, KEY_NEW, KEY_GLOBEX)]
    for name, text in shipped.items():
        present = [d for d in digests if d in text]
        if name == "studio":
            assert present == digests
        else:
            assert not present, f"{name} received API key digests it does not use"
            assert not AppConfig.from_json(text).auth.tenants


@pytest.mark.parametrize("secret", [ACCESS, SECRET])
def test_object_store_credentials_reach_only_what_reads_or_writes_objects(shipped, secret):
    holders = {name for name, text in shipped.items() if secret in text}
    assert holders == {"studio", "encoder", "decoder", "jobs", "eval"}, holders  # not the generator
    s3 = AppConfig.from_json(shipped["generator"]).storage.s3
    assert s3.access_key is None and s3.secret_key is None and s3.bucket == "media"


def test_decoder_without_saved_clips_gets_no_object_store_credentials():
    from services.app import build_app

    decoder = _deployment_configs(build_app(_config(save_clips=False)))["decoder"]
    assert SECRET not in decoder and ACCESS not in decoder


def test_redis_credentials_reach_only_what_talks_to_redis(shipped):
    holders = {name for name, text in shipped.items() if REDIS_PASSWORD in text}
    assert holders == {"studio", "generator", "jobs"}, holders
    assert AppConfig.from_json(shipped["encoder"]).redis.url == "redis://redis:6379/0"


def test_studio_built_from_its_view_accepts_every_key_of_a_tenant(shipped, tmp_path):
    """Studio authenticates from digests alone; both keys of a rotating tenant work."""
    from services.studio.service import StudioService

    view = AppConfig.from_json(shipped["studio"]).model_copy(update={"storage": StorageConfig.from_url(str(tmp_path))})
    studio = StudioService(view.to_json(), None, None)
    assert studio.auth.tenant_for_key(KEY_OLD) == "acme"
    assert studio.auth.tenant_for_key(KEY_NEW) == "acme"
    assert studio.auth.tenant_for_key(KEY_GLOBEX) == "globex"
    assert len(studio.auth) == 3


def test_to_json_never_carries_plaintext_api_keys():
    text = _config().to_json()
    assert KEY_OLD not in text and KEY_NEW not in text and KEY_GLOBEX not in text
    again = AppConfig.from_json(text)
    assert again.auth.digest_to_tenant() == _config().auth.digest_to_tenant()
    assert ApiKeyAuth.from_digests(again.auth.digest_to_tenant()).tenant_for_key(KEY_NEW) == "acme"


# ---- AuthConfig rules ---------------------------------------------------------------------


def test_short_api_key_is_refused_with_a_clear_message_that_does_not_show_it():
    short = "abc123-short"
    with pytest.raises(ValueError) as e:
        AuthConfig(api_keys={"acme": [KEY_OLD, short]})
    message = str(e.value)
    assert f"API key #1 of tenant 'acme' is {len(short)} characters long" in message
    assert f"at least {MIN_API_KEY_CHARS}" in message
    assert short not in message


def test_malformed_api_key_is_refused():
    with pytest.raises(ValueError, match="printable ASCII"):
        AuthConfig(api_keys={"acme": "has a space in it 0123456789"})


@pytest.mark.parametrize("field,value", [("api_keys", KEY_OLD), ("api_key_digests", "0" * 64)])
def test_the_shared_catalog_tenant_name_is_reserved(field, value):
    with pytest.raises(ValueError, match="'public' is reserved"):
        AuthConfig(**{field: {"public": value}})


def test_one_key_for_two_tenants_is_refused():
    with pytest.raises(ValueError, match="two tenants"):
        AuthConfig(api_keys={"acme": KEY_OLD}, api_key_digests={"globex": [api_key_digest(KEY_OLD)]})


def test_digests_may_be_configured_instead_of_keys():
    auth = AuthConfig(api_key_digests={"acme": api_key_digest(KEY_OLD).upper()})
    assert auth.digest_to_tenant() == {api_key_digest(KEY_OLD): "acme"}
    with pytest.raises(ValueError, match="64 hex"):
        AuthConfig(api_key_digests={"acme": "not-a-digest"})


def test_from_env_takes_several_keys_and_digests_per_tenant():
    env = {
        "FASHIONCHAMELEON_API_KEYS": json.dumps({"acme": [KEY_OLD, KEY_NEW]}),
        "FASHIONCHAMELEON_API_KEY_DIGESTS": json.dumps({"globex": [api_key_digest(KEY_GLOBEX)]}),
    }
    auth = AppConfig.from_env(env).auth
    assert auth.digest_to_tenant() == {
        api_key_digest(KEY_OLD): "acme",
        api_key_digest(KEY_NEW): "acme",
        api_key_digest(KEY_GLOBEX): "globex",
    }
    with pytest.raises(ValueError, match="at least"):
        AppConfig.from_env({"FASHIONCHAMELEON_API_KEYS": json.dumps({"acme": "k-1"})})


def test_validation_errors_of_the_app_config_never_echo_a_secret():
    with pytest.raises(ValueError) as e:
        AppConfig.from_env({"FASHIONCHAMELEON_API_KEYS": json.dumps({"acme": [KEY_OLD, "short-key-1"]})})
    assert KEY_OLD not in str(e.value) and "short-key-1" not in str(e.value)
