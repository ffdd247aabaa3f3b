"""The four curation stages as plain functions of (Context, ClipRecord) (paper App. A).

Each stage looks only at pending records, and either extends the record (scores, captions,
artifacts) or drops it with "{stage}:{kind}[: detail]". Nothing here knows about Ray: the
pipeline (pipeline.py) maps these over a Ray Dataset and adds resume; tests call them directly.

    segment_video    raw video -> sub-clip records (shots, 3-5 s pieces; short ones dropped)
    filter_clip      single person -> motion -> quality/aesthetics (cheap to costly)
    caption_clip     VLM static/dynamic captions (paper's prompt)
    garment_clip     try-off of the first frame + three VLM checks, <= max_tries
    reference_clip   garment type -> compatible catalog garment -> try-on -> VLM check, <= max_tries
    finalize_clip    copy the triplet to samples/{clip_id}/
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import av
from PIL import Image

from shared.media.video import read_frames, write_mp4
from shared.storage.base import ObjectStore
from shared.storage.factory import open_store

from . import edit as edit_mod
from . import filters, shots
from . import vlm as vlm_mod
from .config import CurationConfig
from .records import ClipRecord, Layout, video_id

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class _Entry:
    key: str


class FolderSource:
    """A plain folder of videos read like an object store (keys are POSIX relative paths)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def list(self, prefix: str = "") -> list[_Entry]:
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return [_Entry(k) for k in sorted(keys) if k.startswith(prefix)]

    def get_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self.root / key, path)

    def get_bytes(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


class Context:
    """Per-process handles built lazily from the run's config (one per worker process)."""

    _by_config: ClassVar[dict[str, Context]] = {}

    def __init__(self, cfg: CurationConfig):
        self.cfg = cfg
        self.layout = Layout(cfg.output_prefix)

    @classmethod
    def get(cls, cfg: CurationConfig) -> Context:
        key = cfg.model_dump_json()
        if key not in cls._by_config:
            cls._by_config[key] = cls(cfg)
        return cls._by_config[key]

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.cfg.output)

    @cached_property
    def input_store(self) -> ObjectStore | FolderSource:
        if self.cfg.input_folder is not None:
            return FolderSource(self.cfg.input_folder)
        return open_store(self.cfg.input)

    @cached_property
    def person(self) -> filters.PersonDetector:
        return filters.build_person_detector(self.cfg.person)

    @cached_property
    def quality(self) -> filters.FrameScorer:
        return filters.build_scorer(self.cfg.quality, "quality")

    @cached_property
    def aesthetic(self) -> filters.FrameScorer:
        return filters.build_scorer(self.cfg.quality, "aesthetic")

    @cached_property
    def vlm(self) -> vlm_mod.VLMClient:
        return vlm_mod.VLMClient(self.cfg.vlm, self.store, lambda d: self.layout.vlm_cache(d))

    @cached_property
    def try_off(self) -> edit_mod.ImageEditor:
        return edit_mod.build_editor(self.cfg.try_off)

    @cached_property
    def try_on(self) -> edit_mod.ImageEditor:
        return edit_mod.build_editor(self.cfg.try_on)

    @cached_property
    def catalog(self) -> tuple[ObjectStore | FolderSource, dict[str, list[CatalogGarment]]]:
        """The garment database (listed once per process) and the store holding it."""
        rc = self.cfg.reference
        if rc.folder is not None:
            folder = FolderSource(rc.folder)
            return folder, list_catalog(folder, "")
        store = open_store(rc.store) if rc.store is not None else self.store
        return store, list_catalog(store, rc.prefix)

    # -- object helpers (relative keys are under the run's prefix) --
    def put_image(self, rel: str, img: Image.Image) -> str:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        self.store.put_bytes(self.layout.key(rel), buf.getvalue(), content_type="image/png")
        return rel

    def get_image(self, rel: str) -> Image.Image:
        return Image.open(io.BytesIO(self.store.get_bytes(self.layout.key(rel)))).convert("RGB")

    def clip_bytes(self, rec: ClipRecord) -> bytes:
        return self.store.get_bytes(self.layout.key(rec.artifacts["clip"]))


# ---- stage 1: shots and sub-clips --------------------------------------------------------
def segment_video(ctx: Context, key: str) -> list[ClipRecord]:
    """Cut one raw video into sub-clip records; kept pieces are written to _work/clips/."""
    vid = video_id(key)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("raw" + Path(key).suffix)
        ctx.input_store.get_file(key, path)
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = read_frames(path)
        except (av.error.FFmpegError, IndexError, ValueError) as e:
            rec = ClipRecord(f"{vid}-undecodable", key, vid, 0.0, 0, 0)
            return [rec.drop("segment", "undecodable", str(e)[:200])]
        if fps <= 0 or len(frames) == 0:
            return [ClipRecord(f"{vid}-empty", key, vid, fps, 0, 0).drop("segment", "empty_video")]
        ranges = shots.detect_shots(frames, fps, ctx.cfg.shots, path)
    out = []
    for sc in shots.cut_subclips(ranges, fps, ctx.cfg.shots, len(frames)):
        rec = ClipRecord(f"{vid}-s{sc.shot:03d}-c{sc.piece:02d}", key, vid, fps, sc.start, sc.end)
        if sc.reason is not None:
            out.append(rec.drop("segment", sc.reason, f"{rec.seconds:.2f} s"))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            clip_path = Path(tmp) / "clip.mp4"
            write_mp4(frames[sc.start : sc.end], clip_path, fps=fps, crf=18)
            rel = Layout.work_clip(rec.clip_id)
            ctx.store.put_file(ctx.layout.key(rel), clip_path, content_type="video/mp4")
        rec.artifacts["clip"] = rel
        out.append(rec)
    return out


# ---- stage 1: fine filters -----------------------------------------------------------------
def filter_clip(ctx: Context, rec: ClipRecord) -> ClipRecord:
    cfg = ctx.cfg
    frames = read_frames(ctx.clip_bytes(rec))  # [T, H, W, 3]
    det = ctx.person
    if not det.available:
        if cfg.person.on_unavailable == "drop":
            return rec.drop("filter", "person_check_unavailable", det.why_unavailable)
        rec.notes.append(f"person check skipped: {det.why_unavailable}")
    else:
        idx = filters.sample_indices(len(frames), cfg.person.frames)
        ok, kind, area = filters.single_person([det.detect(frames[i]) for i in idx], cfg.person)
        rec.scores["person_area"] = area
        if not ok:
            return rec.drop("filter", kind)
    rec.scores["motion"] = motion = filters.motion_magnitude(frames, cfg.motion)
    if motion < cfg.motion.min_magnitude:
        return rec.drop("filter", "low_motion", f"{motion:.3f} px/frame")
    if cfg.motion.max_magnitude is not None and motion > cfg.motion.max_magnitude:
        return rec.drop("filter", "excessive_motion", f"{motion:.3f} px/frame")
    sample = frames[filters.sample_indices(len(frames), cfg.quality.frames)]
    rec.scores["quality"] = q = ctx.quality.score(sample)
    rec.scores["aesthetic"] = a = ctx.aesthetic.score(sample)
    if q < cfg.quality.min_quality:
        return rec.drop("filter", "low_quality", f"{q:.3f}")
    if a < cfg.quality.min_aesthetic:
        return rec.drop("filter", "low_aesthetic", f"{a:.3f}")
    return rec


# ---- stage 2: captions ---------------------------------------------------------------------
def caption_clip(ctx: Context, rec: ClipRecord) -> ClipRecord:
    cfg = ctx.cfg.vlm
    frames = read_frames(ctx.clip_bytes(rec))
    frames = frames[filters.sample_indices(len(frames), cfg.frames)]
    parts: list[vlm_mod.Part] = [("text", f"The video, as {len(frames)} frames sampled uniformly in temporal order:")]
    parts += [vlm_mod.image_part(f, cfg) for f in frames]
    out = ctx.vlm.ask("caption", vlm_mod.CAPTION_PROMPT, parts, vlm_mod.parse_captions)
    if not out.ok:
        return rec.drop("caption", f"vlm_{out.kind}", out.reason or "")
    rec.captions = {"static": out.value["en_long"][1], "dynamic": out.value["en_long"][0], **out.value}
    return rec


# ---- stage 3: garment extraction -----------------------------------------------------------
def first_frame(data: bytes) -> Image.Image:
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            return frame.to_image().convert("RGB")
    raise ValueError("clip has no frames")


def _seed(cfg: CurationConfig, clip_id: str, stage: str, attempt: int) -> int:
    h = hashlib.sha256(f"{cfg.seed}/{clip_id}/{stage}/{attempt}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _verdict(ctx: Context, name: str, prompt: str, images: list[Image.Image]) -> vlm_mod.Outcome:
    parts: list[vlm_mod.Part] = []
    for i, img in enumerate(images, start=1):
        parts += [("text", f"[Image {i}]"), vlm_mod.image_part(img, ctx.cfg.vlm)]
    return ctx.vlm.ask(name, prompt, parts, vlm_mod.parse_verdict)


def garment_clip(ctx: Context, rec: ClipRecord) -> ClipRecord:
    cfg = ctx.cfg
    frame = first_frame(ctx.clip_bytes(rec))
    prompt = cfg.try_off.prompt or edit_mod.TRY_OFF_PROMPT
    last = ""
    for attempt in range(cfg.garment.max_tries):
        try:
            garment = ctx.try_off.edit([frame], prompt, _seed(cfg, rec.clip_id, "try_off", attempt))
        except edit_mod.EditFailed as e:
            last = f"edit_failed: {e}"
            continue
        failed = None
        for check, check_prompt in vlm_mod.GARMENT_CHECKS.items():
            out = _verdict(ctx, f"garment_{check}", check_prompt, [frame, garment])
            if not out.ok:
                return rec.drop("garment", f"vlm_{out.kind}", f"{check} check: {out.reason}")
            if not out.value["pass"]:
                failed = f"{check}: {out.value['reason']}"
                break
        if failed is None:
            rec.scores["garment_tries"] = attempt + 1
            rec.artifacts["garment"] = ctx.put_image(Layout.work_image(rec.clip_id, "garment"), garment)
            return rec
        last = f"failed check {failed}"
    kind = "edit_failed" if last.startswith("edit_failed") else "invalid_garment"
    return rec.drop("garment", kind, f"after {cfg.garment.max_tries} tries, last: {last}")


# ---- stage 4: reference construction -------------------------------------------------------
@dataclass(frozen=True)
class CatalogGarment:
    garment_type: str
    key: str  # full key in the catalog store


def list_catalog(store: ObjectStore | FolderSource, prefix: str) -> dict[str, list[CatalogGarment]]:
    """Garment database: {prefix}{upper|lower|full}/<name>.<png|jpg|webp>, sorted by key."""
    out: dict[str, list[CatalogGarment]] = {t: [] for t in vlm_mod.GARMENT_TYPES}
    for info in store.list(prefix):
        rest = info.key[len(prefix) :]
        kind, _, name = rest.partition("/")
        if kind in out and name and info.key.lower().endswith(IMAGE_EXTENSIONS):
            out[kind].append(CatalogGarment(kind, info.key))
    return {k: sorted(v, key=lambda g: g.key) for k, v in out.items()}


def reference_clip(ctx: Context, rec: ClipRecord) -> ClipRecord:
    cfg, vcfg = ctx.cfg, ctx.cfg.vlm
    garment = ctx.get_image(rec.artifacts["garment"])
    out = ctx.vlm.ask("garment_type", vlm_mod.TYPE_PROMPT, [vlm_mod.image_part(garment, vcfg)],
                      vlm_mod.parse_garment_type)  # fmt: skip
    if not out.ok:
        return rec.drop("reference", f"vlm_{out.kind}", f"garment type: {out.reason}")
    kind = rec.garment_type = out.value["garment_type"]
    store, catalog = ctx.catalog
    pool = catalog[kind]
    if not pool:
        return rec.drop("reference", "no_catalog_garment", kind)
    start = int(hashlib.sha256(rec.clip_id.encode()).hexdigest(), 16) % len(pool)  # spread picks over the pool
    candidates = [pool[(start + i) % len(pool)] for i in range(min(cfg.reference.candidates, len(pool)))]
    images = [Image.open(io.BytesIO(store.get_bytes(c.key))).convert("RGB") for c in candidates]
    frame = first_frame(ctx.clip_bytes(rec))
    choice = 0
    if len(candidates) > 1:
        parts: list[vlm_mod.Part] = [("text", "[Image 1]"), vlm_mod.image_part(frame, vcfg)]
        for i, img in enumerate(images):
            parts += [("text", f"Candidate {i}"), vlm_mod.image_part(img, vcfg)]
        out = ctx.vlm.ask("retrieve", vlm_mod.RETRIEVE_PROMPT.format(kind=kind), parts,
                          vlm_mod.choice_parser(len(candidates)))  # fmt: skip
        if not out.ok:
            return rec.drop("reference", f"vlm_{out.kind}", f"retrieval: {out.reason}")
        choice = out.value["choice"]
    chosen = images[choice]
    rec.artifacts["catalog_garment"] = candidates[choice].key
    prompt = (cfg.try_on.prompt or edit_mod.TRY_ON_PROMPT).format(kind=kind)
    last = ""
    for attempt in range(cfg.reference.max_tries):
        try:
            ref = ctx.try_on.edit([frame, chosen], prompt, _seed(cfg, rec.clip_id, "try_on", attempt))
        except edit_mod.EditFailed as e:
            last = f"edit_failed: {e}"
            continue
        out = _verdict(ctx, "reference_check", vlm_mod.REFERENCE_CHECK.replace("{kind}", kind), [frame, ref, chosen])
        if not out.ok:
            return rec.drop("reference", f"vlm_{out.kind}", f"validity check: {out.reason}")
        if out.value["pass"]:
            rec.scores["reference_tries"] = attempt + 1
            rec.artifacts["reference"] = ctx.put_image(Layout.work_image(rec.clip_id, "reference"), ref)
            return rec
        last = f"failed check: {out.value['reason']}"
    kind = "edit_failed" if last.startswith("edit_failed") else "invalid_reference"
    return rec.drop("reference", kind, f"after {cfg.reference.max_tries} tries, last: {last}")


# ---- finalize -------------------------------------------------------------------------------
def finalize_clip(ctx: Context, rec: ClipRecord) -> ClipRecord:
    """Copy the kept triplet to samples/{clip_id}/ and mark the record kept."""
    lay, store = ctx.layout, ctx.store
    for name, src, dst in (("video", "clip", "video.mp4"), ("reference", "reference", "reference.png"),
                           ("garment", "garment", "garment.png")):  # fmt: skip
        rel = Layout.sample(rec.clip_id, dst)
        store.put_bytes(lay.key(rel), store.get_bytes(lay.key(rec.artifacts[src])))
        rec.artifacts[name] = rel
    rec.status, rec.stage = "kept", "finalize"
    return rec


def manifest_line(rec: ClipRecord) -> str:
    """One line of the training preprocessing's JSONL manifest (paths relative to it)."""
    return json.dumps({
        "id": rec.clip_id,
        "reference": rec.artifacts["reference"],
        "garment": rec.artifacts["garment"],
        "video": rec.artifacts["video"],
        "static_caption": rec.captions.get("static", ""),
        "dynamic_caption": rec.captions.get("dynamic", ""),
        "garment_type": rec.garment_type,
        "source": rec.video_key,
        "start_frame": rec.start_frame,
        "end_frame": rec.end_frame,
        "fps": rec.fps,
    }, ensure_ascii=False)  # fmt: skip
