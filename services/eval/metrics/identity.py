"""Face identity similarity between the reference photo and the generated frames.

Procedure (OpenS2V-Eval's face similarity, which the paper's "Cur Score" follows): embed the
largest face of the reference; embed the largest face of each of `num_frames` uniformly
sampled frames; cosine similarity per frame, clamped at 0; frames without a detected face are
skipped; the score is the mean. A video in which no face is found scores 0 (identity lost),
with `faces_detected = 0` in the details. No face in the *reference* makes the metric
"missing" for that sample: there is nothing to compare with.

Embedders (local weights only, never downloaded):
- "onnx": an ArcFace / CurricularFace ONNX file (112x112 aligned input, (x - 127.5) / 127.5,
  NCHW). Faces are aligned to the standard 5-point ArcFace template from dlib's 68 landmarks.
- "dlib" (default): dlib's face-recognition ResNet (128-d) with its HOG detector and 5-point
  aligner, from the `face_recognition_models` package. Its cosines run higher than ArcFace's
  (same person ~0.95, different people ~0.85-0.9): never compare numbers across models.
Both need dlib for detection; without it the metric reports "unavailable".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import MetricsConfig
from .base import MetricResult, SampleVideo, sample_indices

KEY = "face_similarity"
# ArcFace 112x112 template: left eye, right eye, nose tip, left / right mouth corner (x, y).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


class FaceEmbedder(Protocol):
    name: str

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        """Unit-norm embedding of the largest face in uint8 RGB [H, W, 3], or None if no face."""


class Unavailable(Exception):
    """The embedder cannot be built here (the message is the reason)."""


def dlib_models_dir(configured: Path | None) -> Path:
    """The folder with dlib's .dat models: configured, or the installed face_recognition_models.

    Located without importing the package (its __init__ needs pkg_resources, which recent
    setuptools no longer ships).
    """
    if configured is not None:
        return Path(configured)
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("face_recognition_models is not installed (pip install face_recognition_models)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise Unavailable(
            "dlib is not installed (pip install dlib-bin for a prebuilt wheel, or dlib to compile it)"
        ) from None
    return dlib


def _model_file(folder: Path, name: str) -> str:
    path = folder / name
    if not path.is_file():
        raise Unavailable(f"dlib model {path} not found")
    return str(path)


class _DlibDetector:
    """Largest frontal face (HOG); retried on a 25 % grey-padded image as OpenS2V does."""

    def __init__(self, dlib, landmarks_file: str):
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(landmarks_file)

    def find(self, rgb: np.ndarray):
        """(image the shape refers to, landmarks) or None."""
        img = np.ascontiguousarray(rgb)
        for attempt in range(2):
            boxes = self.detector(img, 1)
            if len(boxes):
                box = max(boxes, key=lambda b: b.area())
                return img, self.predictor(img, box)
            if attempt == 0:
                h, w = img.shape[:2]
                ph, pw = h // 4, w // 4
                img = np.pad(img, ((ph, ph), (pw, pw), (0, 0)), constant_values=128)
        return None


class DlibEmbedder:
    name = "dlib-resnet-v1"

    def __init__(self, models_dir: Path | None = None):
        dlib = _import_dlib()
        folder = dlib_models_dir(models_dir)
        self.detector = _DlibDetector(dlib, _model_file(folder, "shape_predictor_5_face_landmarks.dat"))
        self.model = dlib.face_recognition_model_v1(_model_file(folder, "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        found = self.detector.find(rgb)
        if found is None:
            return None
        img, shape = found
        v = np.asarray(self.model.compute_face_descriptor(img, shape), dtype=np.float64)
        return v / max(np.linalg.norm(v), 1e-12)


def five_points(shape) -> np.ndarray:
    """ArcFace's 5 points from dlib's 68 landmarks (image left eye first)."""
    p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float32)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


class OnnxEmbedder:
    def __init__(self, onnx_path: Path, name: str, bgr: bool = False, models_dir: Path | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise Unavailable("onnxruntime is not installed (pip install onnxruntime)") from None
        path = Path(onnx_path)
        if not path.is_file():
            raise Unavailable(f"face ONNX model {path} not found")
        dlib = _import_dlib()
        folder = dlib_models_dir(models_dir)
        self.detector = _DlibDetector(dlib, _model_file(folder, "shape_predictor_68_face_landmarks.dat"))
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.name = name
        self.bgr = bgr

    def aligned(self, rgb: np.ndarray) -> np.ndarray | None:
        import cv2

        found = self.detector.find(rgb)
        if found is None:
            return None
        img, shape = found
        m, _ = cv2.estimateAffinePartial2D(five_points(shape), ARCFACE_TEMPLATE, method=cv2.LMEDS)
        if m is None:
            return None
        return cv2.warpAffine(img, m, (112, 112), borderValue=0)  # uint8 [112, 112, 3]

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        face = self.aligned(rgb)
        if face is None:
            return None
        if self.bgr:
            face = face[..., ::-1]
        x = ((face.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]  # [1, 3, 112, 112]
        v = np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float64).reshape(-1)
        return v / max(np.linalg.norm(v), 1e-12)


def build_embedder(cfg: MetricsConfig) -> FaceEmbedder:
    """The configured embedder; raises Unavailable with the reason."""
    kind = cfg.face_model
    if kind == "auto":
        kind = "onnx" if cfg.face_onnx is not None else "dlib"
    if kind == "onnx":
        if cfg.face_onnx is None:
            raise Unavailable("face_model is 'onnx' but no face_onnx file is configured")
        return OnnxEmbedder(cfg.face_onnx, cfg.face_onnx_name, cfg.face_onnx_bgr, cfg.dlib_models_dir)
    return DlibEmbedder(cfg.dlib_models_dir)


def face_similarity(
    embedder: FaceEmbedder, video: SampleVideo, num_frames: int, clip_negative: bool = True
) -> MetricResult:
    ref = embedder.embed(np.asarray(video.reference.convert("RGB")))
    if ref is None:
        return MetricResult.missing(KEY, "no face detected in the reference image", embedder.name)
    idx = sample_indices(video.frames.shape[0], num_frames)
    sims = []
    for i in idx:
        e = embedder.embed(video.frames[i])
        if e is None:
            continue
        c = float(np.dot(ref, e))
        sims.append(max(0.0, c) if clip_negative else c)
    details = {"frames_sampled": len(idx), "faces_detected": len(sims)}
    return MetricResult.ok(KEY, float(np.mean(sims)) if sims else 0.0, embedder.name, **details)
