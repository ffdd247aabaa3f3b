"""Encoder service: VAE image encoding and umT5 prompt encoding behind content-hash caches.

Images arrive as bytes, as object-store keys (the gateway stores uploads and resolves catalog
ids to keys), or as a decoded frame tensor (the switch's decode-encode round trip). Latents
and embeddings leave as CPU tensor messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import torch

from fashionchameleon.v1 import encoder_pb2
from services.common.errors import InvalidArgument, NotFound
from services.common.lru import LRU
from services.common.model import load_engine
from services.common.tensors import tensor_from_proto, tensor_to_proto, trim_text_embedding
from shared.config import AppConfig
from shared.media.images import ImageError, load_image
from shared.models.prompts import prompt_key, validate_prompt
from shared.storage import ObjectNotFound, open_store
from shared.telemetry import Metrics

_KIND_TAG = {
    encoder_pb2.IMAGE_KIND_REFERENCE: "reference",
    encoder_pb2.IMAGE_KIND_GARMENT: "garment",
    encoder_pb2.IMAGE_KIND_FRAME: "frame",
}


class EncoderService:
    def __init__(self, config_json: str):
        self.config = AppConfig.from_json(config_json)
        self.engine = load_engine(self.config.model, frozenset({"vae", "text_encoder"}))
        self.store = open_store(self.config.storage)
        self.model_id = self.config.model.model_id
        self._images: LRU[tuple, torch.Tensor] = LRU(512)
        self._prompts: LRU[str, tuple[torch.Tensor, int]] = LRU(512)
        self._lock = threading.Lock()  # one model call at a time per replica
        self.metrics = Metrics.create("auto")

    # ---- helpers -----------------------------------------------------------------------
    def _image_bytes(self, image) -> bytes:
        which = image.WhichOneof("source")
        limits = self.config.limits
        if which == "data":
            return image.data
        if which == "object_key":
            try:
                return self.store.get_bytes(image.object_key, max_bytes=limits.max_image_bytes)
            except ObjectNotFound:
                raise NotFound(f"object {image.object_key!r} not found", reason="OBJECT_NOT_FOUND") from None
        raise InvalidArgument(
            "image: give bytes or an object key (catalog ids are resolved by the gateway)", reason="IMAGE_INVALID"
        )

    def _encode_image_sync(self, request: encoder_pb2.EncodeImageRequest) -> encoder_pb2.EncodeImageResponse:
        start = time.perf_counter()
        st = self.engine.preset.streaming
        if (request.height or st.height) != st.height or (request.width or st.width) != st.width:
            raise InvalidArgument(
                f"resolution {request.width}x{request.height} is not served here ({st.width}x{st.height})",
                reason="RESOLUTION_UNSUPPORTED",
            )
        kind = request.kind
        if request.WhichOneof("input") == "pixels":
            pixels = tensor_from_proto(request.pixels, expected_shape=(1, 3, st.height, st.width))
            with self._lock:
                latent = self.engine.encode_frame(pixels.float()).cpu()
            digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
            return encoder_pb2.EncodeImageResponse(
                latent=tensor_to_proto(latent), content_hash=digest, encode_seconds=time.perf_counter() - start
            )
        data = self._image_bytes(request.image)
        digest = hashlib.sha256(data).hexdigest()
        key = (kind, digest, st.height, st.width)
        cached = self._images.get(key)
        cache_hit = cached is not None
        if kind in _KIND_TAG:
            counter = self.metrics.encoder_cache_hits_total if cache_hit else self.metrics.encoder_cache_misses_total
            counter.inc(tags={"kind": _KIND_TAG[kind]})
        if not cache_hit:
            limits = self.config.limits
            try:
                img = load_image(
                    data,
                    max_bytes=limits.max_image_bytes,
                    max_pixels=limits.max_image_pixels,
                    min_side=limits.min_image_side,
                )
            except ImageError as e:
                raise InvalidArgument(f"image: {e}", reason="IMAGE_INVALID") from None
            with self._lock:
                if kind == encoder_pb2.IMAGE_KIND_GARMENT:
                    latent = self.engine.encode_garment(img)
                elif kind in (encoder_pb2.IMAGE_KIND_REFERENCE, encoder_pb2.IMAGE_KIND_FRAME):
                    latent = self.engine.encode_reference(img)
                else:
                    raise InvalidArgument("image kind must be REFERENCE, GARMENT or FRAME", reason="IMAGE_INVALID")
            cached = latent.cpu()
            self._images.put(key, cached)
        return encoder_pb2.EncodeImageResponse(
            latent=tensor_to_proto(cached),
            content_hash=digest,
            cache_hit=cache_hit,
            encode_seconds=time.perf_counter() - start,
        )

    def _encode_prompt_sync(self, request: encoder_pb2.EncodePromptRequest) -> encoder_pb2.EncodePromptResponse:
        start = time.perf_counter()
        try:
            prompt = validate_prompt(request.prompt, self.config.limits.max_prompt_chars)
        except ValueError as e:
            raise InvalidArgument(f"prompt: {e}", reason="PROMPT_INVALID") from None
        key = prompt_key(prompt, self.model_id)
        hit = self._prompts.get(key)
        if hit is None:
            with self._lock:
                embedding = self.engine.text_encoder.encode([prompt]).cpu()
            hit = trim_text_embedding(embedding)
            self._prompts.put(key, hit)
            cache_hit = False
        else:
            cache_hit = True
        (self.metrics.encoder_cache_hits_total if cache_hit else self.metrics.encoder_cache_misses_total).inc(
            tags={"kind": "prompt"}
        )
        trimmed, num_tokens = hit
        return encoder_pb2.EncodePromptResponse(
            embedding=tensor_to_proto(trimmed),
            content_hash=key,
            cache_hit=cache_hit,
            num_tokens=num_tokens,
            encode_seconds=time.perf_counter() - start,
        )

    # ---- RPCs (Ray Serve handles and gRPC use the same names) ----------------------------
    async def EncodeImage(self, request: encoder_pb2.EncodeImageRequest) -> encoder_pb2.EncodeImageResponse:
        return await asyncio.to_thread(self._encode_image_sync, request)

    async def EncodePrompt(self, request: encoder_pb2.EncodePromptRequest) -> encoder_pb2.EncodePromptResponse:
        return await asyncio.to_thread(self._encode_prompt_sync, request)
