"""The toy try-on world: the renderer's contracts (determinism, held-out colours and identities,
the reference's different top) and the frame-only metrics on rendered clips with known answers:
garment fidelity per pattern, identity, bottoms, motion kinds, switch latency, jumps at a splice,
drift, the empty background, examples/person.png, and tolerance to blur + noise."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from shared.toyworld import metrics as M
from shared.toyworld import render as R
from shared.toyworld.samples import SPLIT_SEEDS, make_sample

H, W = 160, 96  # the model's portrait video size
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

RED, BLUE, YELLOW, GREEN = (200, 40, 50), (40, 90, 200), (235, 215, 60), (40, 150, 80)


def degrade(frames: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 3x3 box blur, then gaussian noise (sigma 6): a stand-in for generated frames. [..., H, W, 3] uint8."""
    f = frames.astype(np.float32)
    lead = ((0, 0),) * (f.ndim - 3)
    p = np.pad(f, lead + ((1, 1), (1, 1), (0, 0)), mode="edge")
    s = p[..., :-2, :, :] + p[..., 1:-1, :, :] + p[..., 2:, :, :]
    s = (s[..., :, :-2, :] + s[..., :, 1:-1, :] + s[..., :, 2:, :]) / 9
    s += np.random.default_rng(seed).normal(0, 6, s.shape)
    return np.clip(np.round(s), 0, 255).astype(np.uint8)


def scene(
    kind: str = "still",
    speed: str = "steadily",
    top: R.Top | None = None,
    skin=(224, 180, 150),
    hair=(30, 25, 20),
    hair_style: str = "short",
    bottoms=(40, 50, 90),
    style: str = "pants",
    x: float = 0.5,
    height: float = 0.74,
    build: float = 1.0,
    floor: bool = True,
) -> R.Scene:
    return R.Scene(
        R.Identity(skin, hair, hair_style, height, build),
        top or R.Top(RED, BLUE, "solid", "short"),
        R.Bottoms(bottoms, style),
        R.Background((220, 230, 220), (170, 160, 150) if floor else None, 0.8, 0.06),
        R.Motion(kind, speed),
        x=x,
        feet=0.93 if kind != "toward" else 0.86,
    )


def padded(garment: np.ndarray) -> np.ndarray:
    """The pipeline's garment preprocessing: fit inside H x W, centre-pad with white."""
    img = ImageOps.pad(Image.fromarray(garment), (W, H), method=Image.Resampling.LANCZOS, color=(255, 255, 255))
    return np.asarray(img)


# ---- the renderer ---------------------------------------------------------------------------
def test_same_split_and_index_give_identical_arrays():
    a, b = make_sample(7, "train", 6, H, W), make_sample(7, "train", 6, H, W)
    for name in ("video", "reference", "garment"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.id == b.id and a.static_caption == b.static_caption and a.dynamic_caption == b.dynamic_caption
    c = make_sample(8, "train", 6, H, W)
    assert not np.array_equal(a.video, c.video)


def _scenes(split: str, n: int):
    """The (scene, reference scene) of samples 0 .. n-1, drawn exactly as make_sample draws them."""
    for i in range(n):
        rng = np.random.default_rng([SPLIT_SEEDS[split], i])
        s = R.sample_scene(rng, split)
        yield s, s.with_top(R.reference_top(s, rng, split))


def test_train_top_colours_stay_away_from_the_holdout_anchors():
    closest = math.inf
    for s, ref in _scenes("train", 300):
        for colour in (s.top.colour, s.top.colour2, ref.top.colour):
            closest = min(closest, min(math.dist(colour, a) for a in R.HOLDOUT_COLOURS))
    assert closest >= R.HOLDOUT_RADIUS
    # and the test split does draw around the anchors
    near = [min(math.dist(s.top.colour, a) for a in R.HOLDOUT_COLOURS) for s, _ in _scenes("test", 50)]
    assert max(near) <= 12 * math.sqrt(3) + 1e-9


def test_test_split_identities_are_held_out():
    assert all(R.identity_key(s.identity) == 0 for s, _ in _scenes("test", 300))
    assert all(R.identity_key(s.identity) != 0 for s, _ in _scenes("train", 300))


def test_reference_wears_a_different_top():
    for i in range(6):
        s = make_sample(i, "train", 1, H, W)
        assert s.reference_scene.top != s.scene.top
        assert math.dist(s.reference_scene.top.colour, s.scene.top.colour) >= 100
        assert s.reference_scene.identity == s.scene.identity and s.reference_scene.bottoms == s.scene.bottoms
        # ... and the metrics see it: the clip's top matches the garment, the reference's does not
        assert M.garment_fidelity(s.video[0], s.garment)["matches"]
        assert not M.garment_fidelity(s.reference, s.garment)["matches"]
        assert M.identity_score(s.video[0], s.reference)["matches"]
        assert M.bottoms_score(s.video[0], s.reference)["matches"]


def test_motion_kinds_match_the_renderer():
    assert M.MOTION_KINDS == R.MOTIONS


# ---- colour ---------------------------------------------------------------------------------
def test_lab_known_values():
    lab = M.srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [128, 128, 128]]))
    assert lab[0] == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    assert lab[1] == pytest.approx([0.0, 0.0, 0.0], abs=0.05)
    assert lab[2] == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    assert lab[3] == pytest.approx([53.59, 0.0, 0.0], abs=0.05)
    assert float(M.delta_e(lab[0], lab[1])) == pytest.approx(100.0, abs=0.05)


# ---- locating the person --------------------------------------------------------------------
def test_blank_backgrounds_have_no_person():
    wall = np.full((H, W, 3), (214, 222, 230), np.uint8)
    ramp = np.tile(np.linspace(190, 235, H)[:, None, None], (1, W, 3)).astype(np.uint8)
    ramp[125:] = (150, 150, 160)  # a floor band
    for frame in (wall, ramp, degrade(ramp, 1)):
        assert M.locate_person(frame) is None
        assert M.body_regions(frame) is None
        assert not M.garment_fidelity(frame, R.render_garment(R.Top(RED, RED, "solid", "none")))["matches"]
    assert M.trajectory(np.stack([wall, wall]))["found"] == [False, False]


def test_background_with_a_person_at_the_border():
    s = scene("still", x=0.12, build=1.1)  # the left arm leaves the frame
    frame = R.render_frame(s, 0, H, W)
    fg = M.foreground_mask(frame)
    assert fg[:, 0].any() and not fg[:, -1].any()
    bg = M.estimate_background(frame)  # [H, 3]
    assert bg.shape == (H, 3)
    assert np.abs(bg[1:-1] - frame[1:-1, -1].astype(np.float32)).max() < 3  # the clean right border
    p = M.locate_person(frame)
    assert p["clipped_side"] and p["cx"] == pytest.approx(R.pose_at(s, 0, H, W).x, abs=1.5)


@pytest.mark.parametrize(
    "case",
    [
        "wave_bun",
        "skirt_long_hair",
        "near_left_edge",
        "near_right_edge",
        "jump_bald",
        "head_cut_off_wave",
        "head_cut_off_jump",
    ],
)
def test_locate_person_known_answers(case):
    tall = dict(height=0.9, top=R.Top(RED, BLUE, "stripes", "short"))
    s, t = {
        "wave_bun": (scene("wave", hair_style="bun"), 6),
        "skirt_long_hair": (scene("still", hair_style="long", style="skirt", build=0.9), 0),
        "near_left_edge": (scene("still", x=0.2, build=1.1), 0),
        "near_right_edge": (scene("still", x=0.8, height=0.8), 0),
        "jump_bald": (scene("jump", hair_style="none"), 6),
        # the frame cuts the head off (13 px / 9 px of it): the height comes from the hanging hands
        "head_cut_off_wave": (replace(scene("wave", build=0.9, **tall), feet=0.82), 3),
        "head_cut_off_jump": (replace(scene("jump", build=1.1, hair_style="long", **tall), feet=0.93), 6),
    }[case]
    frame = R.render_frame(s, t, H, W)
    pose = R.pose_at(s, t, H, W)
    true_h, true_feet = s.identity.height * H * pose.scale, pose.feet - pose.lift
    for f in (frame, degrade(frame)):
        p = M.locate_person(f)
        assert p is not None
        assert p["cx"] == pytest.approx(pose.x, abs=1.5)
        assert p["feet"] == pytest.approx(true_feet, abs=1.5)
        assert p["height"] == pytest.approx(true_h, rel=0.04)
        assert p["width_factor"] == pytest.approx(s.identity.build, rel=0.12)
        assert p["top"] <= max(p["head_top"], 0) + 1 and p["bottom"] >= p["feet"] - 2
        assert (p["arm_up"] > M.WAVE_ARM_AREA) == (s.motion.kind == "wave")
        assert p["clipped_top"] == case.startswith("head_cut_off")
        assert M.garment_fidelity(f, R.render_garment(s.top))["matches"]


def test_example_person_png_regions():
    img = Image.open(EXAMPLES / "person.png").convert("RGB")
    assert img.size == (256, 448)
    frame = np.asarray(img.resize((W, H), Image.Resampling.LANCZOS))
    p = M.locate_person(frame)
    assert p is not None and not p["clipped_top"] and not p["clipped_side"]
    assert p["cx"] == pytest.approx(W / 2, abs=2)
    assert p["height"] == pytest.approx(381 / 448 * H, rel=0.04)  # the drawing spans rows 40 .. 420 of 448
    regions = M.body_regions(frame)
    expect = {"torso": (90, 110, 150), "legs": (60, 60, 70), "face": (224, 180, 150), "hair": (224, 180, 150)}
    for name, rgb in expect.items():  # bald: the hair region is scalp skin
        assert regions[name]["pixels"] > 10
        assert regions[name]["rgb"] == pytest.approx(rgb, abs=12), name
    ident = M.identity_score(frame, frame)
    assert ident["matches"] and not ident["has_hair"]


# ---- garment fidelity -----------------------------------------------------------------------
@pytest.mark.parametrize("pattern", R.PATTERNS)
def test_garment_fidelity_distinguishes_patterns_and_colours(pattern):
    top = R.Top(RED, BLUE, pattern, "long" if pattern == "stripes" else "short")
    s = scene("walk_right", top=top, hair_style="long" if pattern == "halves" else "short")
    clip = np.stack([R.render_frame(s, t, H, W) for t in (0, 29, 15)])
    frames = np.concatenate([clip[:2], degrade(clip[2:], 2)])  # clean (the 2nd with a padded garment) and degraded
    for i, frame in enumerate(frames):
        for other in R.PATTERNS:  # the same colours in every pattern: only its own matches
            g = R.render_garment(R.Top(RED, BLUE, other, "none"))
            fid = M.garment_fidelity(frame, padded(g) if i == 1 else g)
            assert fid["matches"] == (other == pattern), (i, other, fid)
            if other == pattern:
                assert fid["pattern_delta_e"] < M.GARMENT_MATCH_DE / 2
                assert fid["torso_pattern"] == pattern and fid["pattern_agrees"]
            else:
                assert fid["pattern_delta_e"] > 1.5 * M.GARMENT_MATCH_DE
        different = M.garment_fidelity(frame, R.render_garment(R.Top(YELLOW, GREEN, pattern, "short")))
        assert not different["matches"] and different["colour_delta_e"] > 30


def test_garment_fidelity_example_garment():
    red = np.asarray(Image.open(EXAMPLES / "garment-red.png").convert("RGB"))
    green = np.asarray(Image.open(EXAMPLES / "garment-green.png").convert("RGB"))
    frame = R.render_frame(scene(top=R.Top((200, 40, 50), (200, 40, 50), "solid", "short")), 0, H, W)
    assert M.garment_fidelity(frame, red)["matches"] and M.garment_fidelity(frame, padded(red))["matches"]
    assert not M.garment_fidelity(frame, green)["matches"]
    y0, y1, x0, x1 = M.garment_body_box(red)
    assert (y0, y1, x0, x1) == pytest.approx((0.12 * 240, 0.92 * 240, 0.25 * 240, 0.75 * 240), abs=3)


# ---- identity and bottoms -------------------------------------------------------------------
def test_identity_and_bottoms_against_the_reference():
    base = scene("still", top=R.Top(RED, RED, "solid", "short"))
    reference = R.render_frame(base.with_top(R.Top(BLUE, YELLOW, "halves", "long")), 0, H, W)
    same_person = R.render_frame(base, 10, H, W)
    other_skin = R.render_frame(replace(base, identity=replace(base.identity, skin=(170, 120, 90))), 10, H, W)
    other_hair = R.render_frame(replace(base, identity=replace(base.identity, hair=(220, 190, 120))), 10, H, W)
    bald = R.render_frame(replace(base, identity=replace(base.identity, hair_style="none")), 10, H, W)
    other_bottoms = [
        R.render_frame(replace(base, bottoms=R.Bottoms(c, "pants")), 10, H, W) for c in ((150, 130, 95), (60, 60, 70))
    ]  # Delta-E 58 and 21 from (40, 50, 90)
    skirt_same_colour = R.render_frame(replace(base, bottoms=R.Bottoms(base.bottoms.colour, "skirt")), 10, H, W)
    for deg in (False, True):
        f = degrade if deg else (lambda x: x)
        ref = f(reference)
        same = M.identity_score(f(same_person), ref)
        assert same["matches"] and same["skin_delta_e"] < 3 and same["has_hair"] and same["hair_agrees"]
        assert not M.identity_score(f(other_skin), ref)["matches"]
        hair = M.identity_score(f(other_hair), ref)
        assert not hair["matches"] and hair["skin_delta_e"] < 3 and hair["hair_delta_e"] > M.HAIR_MATCH_DE
        no_hair = M.identity_score(f(bald), ref)
        assert not no_hair["matches"] and not no_hair["has_hair"] and not no_hair["hair_agrees"]
        bottoms = M.bottoms_score(f(same_person), ref)
        assert bottoms["matches"] and bottoms["delta_e"] < 3
        assert M.bottoms_score(f(skirt_same_colour), ref)["matches"]
        for other in other_bottoms:
            assert not M.bottoms_score(f(other), ref)["matches"]


# ---- motion ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", R.MOTIONS)
def test_classify_motion_on_rendered_clips(kind):
    speed = "slowly" if kind in ("walk_left", "walk_right", "toward") else "steadily"  # the hardest walks
    x = {"walk_left": 0.62, "walk_right": 0.38}.get(kind, 0.5)
    s = scene(kind, speed, top=R.Top(GREEN, YELLOW, "vsplit", "none"), hair_style="bun", x=x)
    clip = R.render_clip(s, 45, H, W)
    for frames in (clip, degrade(clip, 3)):
        assert M.classify_motion(frames) == kind
        assert M.motion_direction_correct(frames, s.motion.caption)
    if kind in ("walk_left", "walk_right"):
        wrong = "The person walks to the right slowly." if kind == "walk_left" else "walk_left"
        assert not M.motion_direction_correct(clip, wrong)
    if kind == "still":
        assert not M.motion_direction_correct(clip, "toward") and not M.motion_direction_correct(clip, "wave")


def test_toward_clip_with_the_head_leaving_the_frame():
    s = scene("toward", "quickly", top=R.Top(RED, BLUE, "stripes", "short"), height=0.82)
    clip = R.render_clip(s, 45, H, W)
    tr = M.trajectory(clip)
    true = [s.identity.height * H * R.pose_at(s, t, H, W).scale for t in range(45)]
    assert np.allclose(tr["height"], true, rtol=0.04)
    assert M.classify_motion(clip) == "toward"
    garment = R.render_garment(s.top)
    assert M.switch_latency(clip, 0, garment, hold=45) == 0  # every frame matches, clipped ones too


def test_trajectory_of_a_walk():
    s = scene("walk_right", "quickly", x=0.35)
    clip = R.render_clip(s, 24, H, W)
    tr = M.trajectory(clip)
    assert all(tr["found"]) and len(tr["cx"]) == 24
    true_x = [R.pose_at(s, t, H, W).x for t in range(24)]
    assert np.allclose(tr["cx"], true_x, atol=1.0)
    assert np.allclose(tr["width_factor"], 1.0, atol=0.1)
    assert max(tr["arm_up"]) == 0.0
    sm = M.smoothness(clip)
    assert sm["cx_px"] < 0.6 and sm["feet_px"] < 0.6 and sm["height_px"] < 1.5


def test_jump_at_a_splice_and_not_at_a_garment_switch():
    s = scene("walk_right", "steadily", x=0.38)
    a = R.render_clip(s, 30, H, W)
    moved = R.render_clip(replace(s, x=s.x + 0.15), 30, H, W)  # 14 px to the right
    spliced = np.concatenate([a[:15], moved[15:]])
    new_top = s.with_top(R.Top(YELLOW, GREEN, "halves", "long"))
    switched = np.concatenate([a[:15], R.render_clip(new_top, 15, H, W, start=15)])  # same pose, another top
    for deg in (False, True):
        f = (lambda x: degrade(x, 4)) if deg else (lambda x: x)
        jump = M.jump_at(f(spliced), 15)
        assert jump["is_jump"] and jump["traj_step_px"] > 10 and jump["traj_ratio"] > 5 and jump["mask_ratio"] > 5
        smooth = M.jump_at(f(a), 15)
        assert not smooth["is_jump"] and smooth["traj_step_px"] < 2.5
        switch = M.jump_at(f(switched), 15)
        assert not switch["is_jump"] and switch["traj_step_px"] < 2.5
        assert switch["frame_diff"] > switch["frame_diff_typical"] + 3  # the colours did change at the switch
    assert M.smoothness(spliced)["cx_px"] > M.smoothness(a)["cx_px"] + 0.4


def test_switch_latency_and_score_clip():
    s = scene("walk_left", "steadily", top=R.Top(RED, BLUE, "halves", "short"), x=0.62)
    top_b = R.Top(YELLOW, GREEN, "stripes", "long")
    k, n = 14, 30
    clip = np.concatenate([R.render_clip(s, k, H, W), R.render_clip(s.with_top(top_b), n - k, H, W, start=k)])
    ga, gb = R.render_garment(s.top), R.render_garment(top_b)
    gc = R.render_garment(R.Top(BLUE, BLUE, "solid", "none"))
    assert M.switch_latency(clip, k, gb) == 0
    assert M.switch_latency(clip, 0, gb) == k  # asked from frame 0: the new top shows from k
    assert M.switch_latency(clip, k, gc) is None
    late = np.concatenate([clip[: k + 5], R.render_clip(s.with_top(top_b), n - k - 5, H, W, start=k + 5)])
    late[k : k + 5] = R.render_clip(s, 5, H, W, start=k)  # the old top lingers 5 frames
    assert M.switch_latency(late, k, gb) == 5
    reference = R.render_frame(s.with_top(R.Top(GREEN, GREEN, "solid", "none")), 0, H, W)
    out = M.score_clip(degrade(late, 5), reference, [ga, gb], [k], s.motion.caption)
    assert out["frames"] == n and out["found_rate"] == 1.0
    assert out["motion_detected"] == "walk_left" and out["motion_direction_accuracy"] == 1.0
    assert out["switch0_latency_frames"] == 5 and out["switch0_frame"] == k
    assert out["switch0_before_match_rate"] == 1.0 and out["switch0_after_match_rate"] < 0.5
    assert out["seg0_garment_match_rate"] == 1.0 and out["seg1_garment_match_rate"] == pytest.approx(11 / 16)
    assert out["garment_match_rate"] == 1.0  # after the latency
    assert out["identity_match_rate"] == 1.0 and out["bottoms_match_rate"] == 1.0
    assert out["switch0_jump"] is False and out["smoothness_cx_px"] < 1.0
    assert all(isinstance(v, (int, float, str, bool)) for v in out.values())


def test_drift_over_a_long_run():
    s = scene("wave", top=R.Top(RED, BLUE, "vsplit", "short"))
    reference = R.render_frame(s.with_top(R.Top(GREEN, GREEN, "solid", "none")), 0, H, W)
    faded = s.with_top(R.Top((150, 80, 90), (90, 110, 160), "vsplit", "short"))  # the top washed out at the end
    bleached = replace(faded, identity=replace(faded.identity, skin=(170, 120, 90)))
    clip = np.concatenate([R.render_clip(s, 12, H, W), R.render_clip(bleached, 8, H, W, start=12)])
    d = M.drift(clip, reference, R.render_garment(s.top), window=6)
    assert d["garment_match_rate_start"] == 1.0 and d["garment_match_rate_end"] == 0.0
    assert d["garment_match_rate_change"] == -1.0 and d["garment_delta_e_change"] > M.GARMENT_MATCH_DE
    assert d["identity_match_rate_start"] == 1.0 and d["identity_match_rate_end"] == 0.0
    assert d["skin_delta_e_change"] > 10
    steady = M.drift(R.render_clip(s, 20, H, W), reference, R.render_garment(s.top), window=6)
    assert abs(steady["garment_delta_e_change"]) < 2 and abs(steady["skin_delta_e_change"]) < 2
