"""The embedded default: a local Ray, a local redis-server (when none is given), the local
filesystem store and every deployment on the tiny preset. Used by `fashionchameleon up`,
`fashionchameleon demo` and the integration tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import AppConfig, AuthConfig, GeneratorConfig, ModelConfig, ServeConfig, ViewerConfig
from shared.runtime.config import EngineConfig
from shared.sessionbus.config import RedisConfig
from shared.storage.config import LocalStoreConfig, StorageConfig

log = logging.getLogger(__name__)
EMBEDDED_HEADROOM = 1.0  # admission by compute on one shared machine: see embedded_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisUnavailable(RuntimeError):
    """No `redis-server` binary on this machine."""


@dataclass
class LocalRedis:
    url: str
    process: subprocess.Popen
    workdir: Path
    owns_workdir: bool = False

    def stop(self) -> None:
        """Idempotent: terminate (then kill) the server; remove a work folder we created."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def find_redis_server() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )
    if found is None:
        raise RedisUnavailable("redis-server not found: install Redis or pass --redis-url")
    return found


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(
    workdir: str | Path | None = None, *, extra_args: tuple[str, ...] = (), timeout_s: float = 10.0, attempts: int = 3
) -> LocalRedis:
    """A throwaway redis-server on a free loopback port, no persistence, log in `workdir`
    (a temporary folder when None). Retries another port if the chosen one was taken."""
    binary = find_redis_server()
    owns = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="fc-redis-")) if owns else Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    last_log = ""
    for _ in range(attempts):
        port = free_port()
        log_path = folder / f"redis-{port}.log"
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
                "--logfile",
                str(log_path),
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        redis = LocalRedis(f"redis://127.0.0.1:{port}/0", proc, folder, owns)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if _ping(port):
                return redis
            time.sleep(0.02)
        redis.owns_workdir = False
        redis.stop()
        last_log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    if owns:
        shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError(f"redis-server did not start after {attempts} attempts; log tail:\n{last_log}")


def embedded_config(
    *,
    preset: str = "tiny",
    checkpoint: str | None = None,
    redis_url: str,
    store_root: str,
    api_keys: dict[str, str],
    grpc_port: int,
    http_port: int,
    realtime: bool = True,
    namespace: str = "fc",
    idle_ttl_s: float = 300.0,
    generator: dict | None = None,
    decoder: str = "vae",
) -> AppConfig:
    return AppConfig(
        model=ModelConfig(preset=preset, checkpoint=checkpoint, engine=EngineConfig(decoder=decoder)),
        redis=RedisConfig(url=redis_url, namespace=namespace, session_idle_ttl_s=idle_ttl_s),
        storage=StorageConfig(backend="local", local=LocalStoreConfig(root=store_root)),
        # Every deployment shares this machine here, so the generator keeps half of each chunk's
        # playback time for the decoder, encoder and gateway (realtime_headroom 1.0; the chart's
        # default 0.2 is for a generator with a GPU of its own).
        generator=GeneratorConfig(realtime=realtime, **{"realtime_headroom": EMBEDDED_HEADROOM, **(generator or {})}),
        auth=AuthConfig(api_keys=api_keys),
        serve=ServeConfig(grpc_port=grpc_port, http_port=http_port),
        viewer=ViewerConfig(dev_launch=True),  # the player page opens dev sessions (`dev_player_url`)
    )


DEV_LAUNCH_TTL_S = 7 * 24 * 3600.0  # `up`'s launch token: revoked when `up` stops, in any case after a week


@dataclass
class Embedded:
    config: AppConfig
    api_key: str
    redis: LocalRedis | None = None
    cleanup: list = field(default_factory=list)

    player: str | None = None  # the player page URL with a dev launch token (`dev_player_url`)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.config.serve.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.config.serve.http_port}"

    def dev_player_url(
        self, person: bytes, garments: dict[str, bytes], prompt: str, *, ttl_s: float = DEV_LAUNCH_TTL_S
    ) -> str:
        """The player page URL with a launch token for the dev tenant: each load of it opens a
        session (reference `person`, the first of `garments`, `prompt`) and watches it, with the
        garments as the catalog's buttons. Stores the person photo as an upload of the tenant,
        the garments in the tenant's catalog (ids = the keys of `garments`), and the token's
        digest in Redis for `ttl_s` seconds (revoked by `stop`). Also sets `player`."""
        import asyncio

        from services.studio.viewer import ViewerTokens
        from shared.redis_util import connect
        from shared.sessionbus import SessionRegistry
        from shared.storage import GarmentCatalog, open_store, upload_key

        tenant = next(iter(self.config.auth.api_keys))
        store = open_store(self.config.storage)
        reference_key = upload_key(tenant, person)
        store.put_bytes_if_absent(reference_key, person)
        catalog = GarmentCatalog(store)
        for garment_id, image in garments.items():
            catalog.add(image, garment_id, tenant=tenant, overwrite=True)

        async def mint() -> str:
            redis = connect(self.config.redis)
            try:
                tokens = ViewerTokens(
                    redis, self.config.redis.namespace, self.config.viewer, SessionRegistry(redis, self.config.redis)
                )
                token, _ = await tokens.mint_launch(
                    tenant, reference_key=reference_key, garment_id=next(iter(garments)), prompt=prompt, ttl_s=ttl_s
                )
                return token
            finally:
                await redis.aclose()

        token = asyncio.run(mint())
        self.cleanup.append(lambda: asyncio.run(_revoke_launch(self.config, token)))
        self.player = f"{self.http_base}/player?launch={token}"
        return self.player

    def describe(self) -> dict:
        c = self.config
        return {
            "grpc": self.grpc_target,
            "http": self.http_base,
            **({"player": self.player} if self.player else {}),
            "application": c.serve.app_name,
            "api_key": self.api_key,
            "tenant": next(iter(c.auth.api_keys)),
            "redis": c.redis.url,
            "store": str(c.storage.local.root) if c.storage.backend == "local" else c.storage.s3.endpoint,
            "model": c.model.model_id,
        }

    def stop(self, serve_timeout_s: float | None = None) -> None:
        """Shut Serve down (replicas drain gracefully), then Ray, redis and the temporary folders.
        With `serve_timeout_s`, Serve's graceful shutdown gets at most that long: Ray is then shut
        down whatever state Serve is in (its processes are killed)."""
        import ray
        from ray import serve

        with contextlib.suppress(Exception):
            if serve_timeout_s is None:
                serve.shutdown()
            else:
                _shutdown_serve(serve_timeout_s)
        with contextlib.suppress(Exception):
            ray.shutdown()
        if self.redis is not None:
            self.redis.stop()
        for fn in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                fn()


async def _revoke_launch(config: AppConfig, token: str) -> None:
    from services.studio.viewer import ViewerTokens
    from shared.redis_util import connect
    from shared.sessionbus import SessionRegistry

    redis = connect(config.redis)
    try:
        await ViewerTokens(
            redis, config.redis.namespace, config.viewer, SessionRegistry(redis, config.redis)
        ).revoke_launch(token)
    finally:
        await redis.aclose()


def _shutdown_serve(timeout_s: float) -> None:
    """`serve.shutdown()` bounded in time (its client call takes the timeout; ray is pinned)."""
    from ray.serve import context as serve_context

    client = serve_context._get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        client.shutdown(timeout_s=timeout_s)


def start_child_reaper(parent: int | None = None) -> subprocess.Popen | None:
    """Start the watchdog that ends every descendant of `parent` (default: this process) once
    `parent` is gone, even when it is killed (`services.child_reaper`). None off Linux."""
    from services import child_reaper

    return child_reaper.start(parent)


Stage = Callable[[str], None]  # told what start-up does next ("starting Ray", "deploying 2/5", ...)

RAY_LOGGERS = ("ray", "ray.serve")


def quiet_ray() -> None:
    """Keep Ray's own Python log lines off this process's stderr (the token-auth warning, Serve's
    "New http_options... will not be applied" and other INFO lines, its shutdown warnings): only
    errors show. Logs of Ray's other processes stay in its session folder (log_to_driver=False)."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _deploy_reporting(app, config: AppConfig, stage: Stage) -> None:
    """`serve.run` (blocking until the application runs) while reporting how many of its
    deployments are up, from Serve's status."""
    import threading

    from ray import serve

    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app, name=config.serve.app_name, route_prefix="/", blocking=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(e)

    worker = threading.Thread(target=deploy, name="fc-serve-run", daemon=True)
    worker.start()
    shown = None
    while worker.is_alive():
        worker.join(1.0)
        with contextlib.suppress(Exception):  # status is for show: never fail the start on it
            status = serve.status().applications.get(config.serve.app_name)
            if status is None or not status.deployments:
                continue
            total = len(status.deployments)
            up = sorted(n for n, d in status.deployments.items() if d.status == "HEALTHY")
            waiting = sorted(set(status.deployments) - set(up))
            line = f"deploying {len(up)}/{total}" + (f" (starting: {', '.join(waiting)})" if waiting else "")
            if line != shown:
                stage(line)
                shown = line
    if failure:
        raise failure[0]


def start_app(
    config: AppConfig,
    *,
    num_cpus: int | None = None,
    metrics_port: int | None = None,
    metrics_report_interval_ms: int | None = None,
    quiet: bool = False,
    stage: Stage | None = None,
    repick_ports: bool = False,
) -> AppConfig:
    """Start Ray + Serve (gRPC on config.serve.grpc_port) and deploy the application; returns the
    config it serves.

    Ray exports application metrics (prefixed `ray_`) on `metrics_port` at /metrics.
    quiet: only Ray's errors reach stderr (`quiet_ray`). stage: told each start-up step.
    repick_ports: the gRPC/HTTP ports were picked free (`free_port`) rather than asked for; if one
    was taken meanwhile (Ray's own processes bind random ports while it starts), Serve starts on
    newly picked ones, and the returned config says which.
    """
    if quiet:
        quiet_ray()
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.app import EVAL_SERVICER, HEALTH_SERVICER, STUDIO_SERVICER, build_app

    # Ray's gRPC proxy refuses larger messages with RESOURCE_EXHAUSTED before any of our code
    # runs: two images at the upload limit plus room for the rest of a request.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(2 * config.limits.max_image_bytes + 2**20))
    if not ray.is_initialized():
        system_config = (
            {"metrics_report_interval_ms": metrics_report_interval_ms} if metrics_report_interval_ms else None
        )
        if stage:
            stage("starting Ray")
        # A loaded machine can miss Ray's start-up deadlines (the raylet must register with the
        # GCS within 30 s; Ray raises a bare Exception then, a RuntimeError for others): retry.
        attempts = 3
        for attempt in range(attempts):
            try:
                ray.init(
                    num_cpus=num_cpus or max(2, os.cpu_count() or 2),
                    include_dashboard=False,
                    log_to_driver=False,
                    _metrics_export_port=metrics_port,
                    _system_config=system_config,
                    **({"logging_level": logging.ERROR} if quiet else {}),
                )
                break
            except Exception as exc:  # Ray's start-up timeout is a bare Exception
                ray.shutdown()
                if attempt == attempts - 1:
                    raise
                log.warning("Ray start-up failed (%s); retrying (%d/%d)", exc, attempt + 2, attempts)
                time.sleep(2.0)
    if quiet:
        quiet_ray()  # again: ray.init configured its loggers
    if stage:
        stage("starting Serve")
    for attempt in range(attempts := 3):
        try:
            serve.start(
                grpc_options=gRPCOptions(
                    # reflection (on by default in Ray 2.60) lists every registered service to generic clients
                    port=config.serve.grpc_port,
                    grpc_servicer_functions=[STUDIO_SERVICER, EVAL_SERVICER, HEALTH_SERVICER],
                    enable_reflection=True,
                ),
                http_options=HTTPOptions(host="127.0.0.1", port=config.serve.http_port),
            )
            break
        except Exception as exc:  # Serve's proxy reports a taken port as a RayTaskError
            if not repick_ports or "bind" not in str(exc).lower() or attempt == attempts - 1:
                raise
            serve.shutdown()
            ports = {"grpc_port": free_port(), "http_port": free_port()}
            log.warning("a Serve port was taken (%s); starting on %s", str(exc).splitlines()[-1][-120:], ports)
            config = config.model_copy(update={"serve": config.serve.model_copy(update=ports)})
    if quiet:
        quiet_ray()  # serve.start set up the "ray.serve" logger
    if stage:
        _deploy_reporting(build_app(config), config, stage)
    else:
        serve.run(build_app(config), name=config.serve.app_name, route_prefix="/", blocking=False)
    return config


def start_embedded(
    *,
    preset: str = "tiny",
    checkpoint: str | None = None,
    redis_url: str | None = None,
    store_root: str | None = None,
    api_key: str | None = None,
    tenant: str = "dev",
    grpc_port: int | None = None,
    http_port: int | None = None,
    realtime: bool = True,
    idle_ttl_s: float = 300.0,
    generator: dict | None = None,
    decoder: str = "vae",
    quiet: bool = False,
    stage: Stage | None = None,
) -> Embedded:
    """Everything `up` and `demo` run; `quiet` and `stage` as for `start_app`."""
    if redis_url is None and stage is not None:
        stage("starting Redis")
    redis = start_redis_server() if redis_url is None else None
    cleanup = []
    if store_root is None:
        store_root = tempfile.mkdtemp(prefix="fc-store-")
        cleanup.append(lambda: shutil.rmtree(store_root, ignore_errors=True))
    key = api_key or f"dev-{secrets.token_urlsafe(18)}"
    config = embedded_config(
        preset=preset,
        checkpoint=checkpoint,
        redis_url=redis_url or redis.url,
        store_root=store_root,
        api_keys={tenant: key},
        grpc_port=grpc_port or free_port(),
        http_port=http_port or free_port(),
        realtime=realtime,
        idle_ttl_s=idle_ttl_s,
        generator=generator,
        decoder=decoder,
    )
    embedded = Embedded(config, key, redis, cleanup)
    try:
        embedded.config = start_app(
            config, quiet=quiet, stage=stage, repick_ports=grpc_port is None and http_port is None
        )
    except Exception:
        embedded.stop()
        raise
    return embedded
