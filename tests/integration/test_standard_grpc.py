"""Any language, standard gRPC (issue 16), on the real suite (redis-server, SeaweedFS, Ray Serve,
tiny preset) through the public gRPC port, with no FashionChameleon client code:

- `grpc.health.v1.Health` (Check, List, Watch), as Kubernetes' `grpc:` probes call it: no
  metadata, the overall server ("") or the Studio service; unknown names are NOT_FOUND;
- server reflection lists the Studio (and Health) and serves its descriptors, as grpcurl uses it;
- a storefront backend in Node.js (@grpc/grpc-js + @grpc/proto-loader reading the .proto files,
  tests/interop/node/storefront.js) creates a session, streams it to a file, switches the
  garment mid-stream; the file decodes here with PyAV, frame by frame, switch included.

Node.js is skipped where it is not installed, except in CI (.ci/run installs it and sets CI),
where a missing `node` fails. `npm ci` runs from the lockfile when node_modules is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.ray_suite import ray_suite

pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "interop" / "node"
EXAMPLES = ROOT / "examples"
KEYS = {"acme": "key-acme-0123456789"}
STUDIO = "fashionchameleon.v1.Studio"

suite = ray_suite("stdgrpc", keys=KEYS, sessions_per_replica=2)


@pytest.fixture()
def channel(suite):
    with grpc.insecure_channel(suite.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


# ---- grpc.health.v1.Health ---------------------------------------------------------------------


def test_health_check_answers_serving_for_the_server_and_the_studio(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", STUDIO):  # no metadata at all: what kubelet's gRPC probe sends
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    listed = health.List(health_pb2.HealthListRequest(), timeout=30)
    assert {name: r.status for name, r in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        STUDIO: health_pb2.HealthCheckResponse.SERVING,
    }


def test_health_check_of_an_unknown_service_is_not_found(channel):
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_the_current_status(channel):
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=STUDIO), timeout=60)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        watch.cancel()
    unknown = health.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=60)
    try:
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    finally:
        unknown.cancel()


# ---- server reflection -------------------------------------------------------------------------


def test_reflection_lists_and_describes_the_studio(channel):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {STUDIO, "grpc.health.v1.Health"} <= services, services
    assert not any(s.startswith("ray.serve") for s in services), "Serve's internal API is not advertised"
    pool = DescriptorPool(db)
    studio = pool.FindServiceByName(STUDIO)
    methods = {m.name: m for m in studio.methods}
    assert {"CreateSession", "StreamSession", "SwitchGarment", "CloseSession"} <= set(methods)
    assert methods["StreamSession"].output_type.full_name == "fashionchameleon.v1.VideoChunk"
    assert methods["StreamSession"].server_streaming
    assert "fmp4" in methods["StreamSession"].output_type.fields_by_name


# ---- a storefront backend in Node.js -----------------------------------------------------------


def _node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are required in CI (.ci/run installs them)")
        pytest.skip("Node.js (node, npm) is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600)
    return node


def test_node_storefront_streams_switches_and_saves_a_playable_clip(suite, tmp_path):
    import av

    node = _node()
    config, target = suite
    out = tmp_path / "storefront.mp4"
    args = {
        "--target": target,
        "--api-key": KEYS["acme"],
        "--application": config.serve.app_name,
        "--protos": ROOT / "protos",
        "--person": EXAMPLES / "person.png",
        "--garment": EXAMPLES / "garment-red.png",
        "--switch-garment": EXAMPLES / "garment-green.png",
        "--out": out,
        "--max-chunks": 10,
        "--switch-at": 1,
    }
    argv = [node, str(NODE_DIR / "storefront.js")] + [str(a) for kv in args.items() for a in kv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    media = [c for c in report["chunks"] if c["num_frames"] > 0]
    assert [c["index"] for c in media] == list(range(10))
    assert report["chunks"][-1]["end_of_stream"]
    assert [c["is_init_segment_included"] for c in media] == [True] + [False] * 9
    assert media[0]["mime_type"].startswith("video/mp4")
    assert out.stat().st_size == sum(c["bytes"] for c in report["chunks"])

    # The switch was acknowledged with the chunk it takes effect at, and that chunk says so.
    switch = report["switch"]
    assert switch is not None and switch["garment_id"] != report["initial_garment_id"]
    effective = switch["effective_chunk_index"]
    assert 1 < effective < 10
    applied = [c["index"] for c in media if c["switch_applied"]]
    assert applied == [effective]
    assert all(c["garment_id"] == report["initial_garment_id"] for c in media if c["index"] < effective)
    assert all(c["garment_id"] == switch["garment_id"] for c in media if c["index"] >= effective)

    # The saved bytes are one playable fragmented MP4: every frame decodes, in order.
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
    assert len(frames) == sum(c["num_frames"] for c in media)
    times = [f.time for f in frames]
    assert all(b > a for a, b in itertools.pairwise(times)), "frame timestamps must strictly increase"
    fps = media[0]["fps"]
    assert times[0] == pytest.approx(0.0, abs=0.5 / fps)
    assert times[-1] == pytest.approx((len(frames) - 1) / fps, abs=0.5 / fps)
    first_of = {c["index"]: c["first_frame_index"] for c in media}
    assert frames[first_of[effective]].time == pytest.approx(first_of[effective] / fps, abs=0.5 / fps)
    assert (frames[0].width, frames[0].height) == (report["width"], report["height"])
