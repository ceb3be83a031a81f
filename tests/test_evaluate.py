"""The pixel judge on the generator's own images, and the eval-shapes driver on a stand-in pipeline."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from latentdiff import evaluate as ev
from latentdiff.commands import eval_shapes
from latentdiff.model_defaults import ModelDefaults
from latentdiff.data.shapes import COLORS, SHAPES, make_shapes, parse_caption, render


def _judge_accuracy(folder, shapes):
    right = {"background": 0, "foreground": 0, "shape": 0}
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    for row in rows:
        color, shape, background = parse_caption(row["text"])
        verdict = ev.judge(np.asarray(Image.open(folder / row["file_name"])), shapes=shapes)
        right["background"] += verdict["background"] == background
        right["foreground"] += verdict["foreground"] == color
        right["shape"] += verdict["shape"] == shape
    return {key: n / len(rows) for key, n in right.items()}


def test_judge_is_right_on_generated_images(tmp_path):
    make_shapes(tmp_path, 300, seed=11, include_holdout=True)
    accuracy = _judge_accuracy(tmp_path, SHAPES)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_judge_tells_the_cross_from_the_star(tmp_path):
    shapes = ("star", "cross", "square")
    make_shapes(tmp_path, 100, seed=12, shapes=shapes)
    accuracy = _judge_accuracy(tmp_path, shapes)
    assert accuracy["shape"] >= 0.99, accuracy


@pytest.mark.parametrize("image", [
    np.full((64, 64, 3), 255, np.uint8),  # nothing drawn
    np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8),  # noise
    np.concatenate([np.zeros((32, 64, 3), np.uint8), np.full((32, 64, 3), 255, np.uint8)]),  # half and half
    np.full((8, 8, 4), 90, np.uint8),  # tiny, RGBA, off-palette
])
def test_judge_survives_ambiguous_images(image):
    verdict = ev.judge(image)
    assert set(verdict) == {"background", "foreground", "shape"}
    assert verdict["background"] in COLORS


def test_judge_says_none_when_nothing_is_drawn():
    assert ev.judge(np.zeros((32, 32, 3), np.uint8)) == {"background": "black", "foreground": None, "shape": None}


class FakePipe:
    """Stands in for a perfect model (draws what the caption says) or a shape-blind one."""

    def __init__(self, force_shape=None):
        self.force_shape = force_shape
        self.calls = []

    defaults = ModelDefaults()

    def __call__(self, prompts, *, num_inference_steps, guidance_scale, seed, sampler, output_type, progress,
                 guidance_min_sigma, guidance_min_sigma_all_steps):
        assert output_type == "numpy" and len(seed) == len(prompts)
        self.calls.append((list(prompts), list(seed)))
        images = []
        for text, s in zip(prompts, seed):
            color, shape, background = parse_caption(text)
            images.append(np.asarray(render(color, self.force_shape or shape, background, np.random.default_rng(s))))
        return SimpleNamespace(images=np.stack(images))


def test_evaluate_scores_a_perfect_and_a_shape_blind_model():
    perfect = ev.evaluate(FakePipe(), n_per_prompt=1, sampler="ddim", steps=10, guidance_scale=3.0, batch_size=50)
    assert perfect["overall"] == {"background": 1.0, "foreground": 1.0, "shape": 1.0, "all": 1.0, "outline": 1.0,
                                  "spot_free": 1.0, "n": 224}
    assert perfect["seen"]["n"] == 196 and perfect["held_out"]["n"] == 28
    assert perfect["confusion"] == {s: {s: 56} for s in SHAPES}
    assert "| triangle | 0 | 0 | 56 | 0 | 100.0% | 100.0% | 100.0% |" in ev.confusion_table(perfect)
    assert perfect["settings"]["sampler"] == "ddim"
    json.dumps(perfect)

    blind = ev.evaluate(FakePipe("circle"), n_per_prompt=1, sampler="ddim", steps=10, guidance_scale=3.0,
                        include_holdout=False)
    assert blind["held_out"] is None
    assert blind["overall"]["shape"] == pytest.approx(blind["seen"]["shape"])
    assert blind["overall"]["shape"] == pytest.approx(sum(p == "circle" for p in _seen_shapes()) / 196)
    assert blind["overall"]["foreground"] == 1.0
    assert blind["confusion"]["star"] == {"circle": 49} and blind["by_shape"]["star"]["outline"] == 0.0
    assert blind["by_shape"]["circle"]["outline"] == 1.0


def _draw(vertices, size=64, fg=(220, 20, 20), bg=(255, 255, 255)):
    image = Image.new("RGB", (size * 4, size * 4), bg)
    ImageDraw.Draw(image).polygon([(size * 2 + x * 4, size * 2 + y * 4) for x, y in vertices], fill=fg)
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))


def _bowed_triangle(r, bow):
    """A triangle whose sides bulge in (bow < 0) or out by `bow` of their length at the middle."""
    corners = [(r * math.cos(a), r * math.sin(a)) for a in np.radians([90, 210, 330])]
    points = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        nx, ny = (y1 - y0), -(x1 - x0)  # outward normal (y down), as long as the side
        for t in np.linspace(0, 1, 20, endpoint=False):
            bulge = 4 * t * (1 - t) * bow
            points.append((x0 + t * (x1 - x0) + bulge * nx, y0 + t * (y1 - y0) + bulge * ny))
    return points


def test_drawing_counts_corners_and_measures_sides_on_the_generators_images():
    rng = np.random.default_rng(0)
    for shape, corners in (("circle", 0), ("square", 4), ("triangle", 3), ("star", 5), ("cross", 4)):
        for _ in range(10):
            drawn = ev.drawing(np.asarray(render("blue", shape, "yellow", rng)))
            assert drawn["points"] == corners and drawn["spots"] == 0, (shape, drawn)
            if shape in ("square", "triangle"):
                assert drawn["side_bow"] <= ev.SIDE_TOLERANCE


def test_drawing_tells_straight_from_concave_triangle_sides():
    assert ev.drawing(_draw(_bowed_triangle(24, 0.0)))["side_bow"] <= ev.SIDE_TOLERANCE
    concave = ev.drawing(_draw(_bowed_triangle(24, -0.12)))  # sides bowed in: a "three-pointed star"
    assert concave["points"] == 3 and concave["side_bow"] > ev.SIDE_TOLERANCE


def test_drawing_finds_stray_spots():
    image = np.asarray(render("red", "circle", "white", np.random.default_rng(1))).copy()
    assert ev.drawing(image)["spots"] == 0
    corner = image.copy()
    corner[58:61, 2:4] = (20, 170, 40)  # a 6-pixel green blob: neither red, white nor a mix of them
    assert ev.drawing(corner)["spots"] == 1
    island = image.copy()
    island[1:3, 60:62] = (220, 20, 20)  # a patch of the shape's color away from the shape
    assert ev.drawing(island)["spots"] == 1
    assert ev.judge(corner) == ev.judge(island) == ev.judge(image)  # the verdict itself does not change


def _seen_shapes():
    from latentdiff.data.shapes import all_prompts
    return [p.shape for p in all_prompts(include_holdout=False)]


def test_image_seeds_do_not_depend_on_batching_or_count(monkeypatch):
    monkeypatch.setattr(ev, "judge", lambda image, shapes=None: {"background": None, "foreground": None, "shape": None})
    a, b = FakePipe(), FakePipe()
    ev.evaluate(a, n_per_prompt=1, sampler="ddim", steps=1, guidance_scale=1.0, batch_size=7, include_holdout=False)
    ev.evaluate(b, n_per_prompt=2, sampler="ddim", steps=1, guidance_scale=1.0, batch_size=64)
    seeds_a = {(t, s) for prompts, seeds in a.calls for t, s in zip(prompts, seeds)}
    seeds_b = {(t, s) for prompts, seeds in b.calls for t, s in zip(prompts, seeds)}
    assert seeds_a < seeds_b


@pytest.fixture
def fake_pipeline_module(monkeypatch):
    monkeypatch.setattr(eval_shapes, "load_pipeline", lambda model, device=None, precision="auto": FakePipe())


def test_eval_shapes_main_writes_json_and_grid(tmp_path, capsys, fake_pipeline_module):
    out, grid = tmp_path / "r.json", tmp_path / "grid.png"
    assert eval_shapes.main(["--n-per-prompt", "1", "--steps", "3", "--out", str(out), "--grid", str(grid)]) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["overall"]["all"] == 1.0 and result["settings"]["steps"] == 3
    assert Image.open(grid).size[0] >= 8 * 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "r.json"]  # no temporary files left


def test_eval_shapes_sweep_prints_a_table(tmp_path, capsys, fake_pipeline_module, monkeypatch):
    calls = []

    def fake_evaluate(pipe, *, sampler, steps, **kwargs):
        calls.append((sampler, steps))
        acc = {"background": 1.0, "foreground": 0.5, "shape": 0.25, "all": 0.125, "n": 8}
        return {"settings": {"sampler": sampler, "steps": steps}, "overall": acc, "seen": acc, "held_out": None}

    monkeypatch.setattr(eval_shapes, "evaluate", fake_evaluate)
    assert eval_shapes.main(["--n-per-prompt", "1", "--sweep", "--out", str(tmp_path / "s.json")]) == 0
    assert calls == [(s, n) for s in ev.SWEEP_SAMPLERS for n in ev.SWEEP_STEPS]
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + 9 and table[2] == "| ddim | 10 | 100.0% | 50.0% | 25.0% | 12.5% | - |"
    assert len(json.loads((tmp_path / "s.json").read_text())) == 9


@pytest.mark.parametrize("argv, message", [
    (["--n-per-prompt", "0"], "--n-per-prompt must be at least 1, got 0"),
    (["--n-per-prompt", "1", "--sampler", "plms"], "unknown sampler 'plms'"),
    (["--n-per-prompt", "1", "--model", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
    (["--n-per-prompt", "1", "--out", "/nonexistent/dir/r.json"], "cannot write /nonexistent/dir/r.json"),
    (["--n-per-prompt", "1", "--precision", "fp8"], "unknown precision 'fp8'"),
    (["--n-per-prompt", "1", "--shapes", "circle,blob"], "unknown shape(s) ['blob']"),
])
def test_eval_shapes_main_rejects_bad_args(argv, message, capsys, fake_pipeline_module):
    with pytest.raises(SystemExit) as info:
        eval_shapes.main(argv)
    assert info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_vae_round_trip_judges_the_shipped_vae_alone():
    """--vae-only: the judge sees the dataset's own drawing after the shipped VAE, so every caption is drawn (the
    renderer cannot miss) and what is lost is the VAE's doing."""
    from latentdiff import load_pipeline

    pipe = load_pipeline(precision="fp32")
    round_trip = ev.VAERoundTrip(pipe)
    out = round_trip(["a red triangle on a white background"], seed=[3], output_type="numpy")
    drawn = np.asarray(render("red", "triangle", "white", np.random.default_rng(3)))
    error = np.abs(out.images[0].astype(int) - drawn).mean()
    assert 0 < error < 12  # decoded, not passed through, and close
    result = ev.evaluate(round_trip, n_per_prompt=1, sampler="ddim", steps=1, guidance_scale=1.0, shapes=("triangle",))
    assert result["overall"]["n"] == 56 and result["by_shape"]["triangle"]["shape"] >= 0.9
    assert result["overall"]["foreground"] == result["overall"]["background"] == 1.0


def test_vae_only_has_nothing_to_sweep(capsys):
    with pytest.raises(SystemExit):
        eval_shapes.main(["--n-per-prompt", "1", "--vae-only", "--sweep"])
    assert "--vae-only judges the VAE alone" in capsys.readouterr().err
