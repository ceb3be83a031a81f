"""Shapes generator, dataset readers, augmentation reproducibility, latent cache."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.commands.make_shapes import main as make_shapes_main
from latentdiff.data import (COLORS, HOLDOUT, CaptionedImageDataset, DataError, all_prompts, caption,
                             collate_skip_none, make_shapes, scan_captioned_images)
from latentdiff.data.shapes import parse_caption


def _read(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _save(path, color=(200, 30, 30), size=(40, 30)):
    Image.new("RGB", size, color).save(path)


# --- shapes generator ---------------------------------------------------------------------------

def test_make_shapes_is_deterministic_and_atomic(tmp_path):
    assert make_shapes(tmp_path / "a", 12, seed=3) == 12
    make_shapes(tmp_path / "b", 12, seed=3, workers=2)  # sharded over processes: the same bytes
    make_shapes(tmp_path / "c", 12, seed=4)
    a = _read(tmp_path / "a")
    assert a == _read(tmp_path / "b")
    assert a != _read(tmp_path / "c")
    assert sorted(a) == [f"{i:05d}.png" for i in range(12)] + ["metadata.jsonl"]  # no .tmp left
    make_shapes(tmp_path / "a", 12, seed=3)  # a rerun rewrites identical files
    assert _read(tmp_path / "a") == a


def test_make_shapes_images_and_captions(tmp_path):
    make_shapes(tmp_path, 200, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 200
    for row in rows:
        color, shape, background = parse_caption(row["text"])
        assert color != background and (color, shape) not in HOLDOUT
        image = Image.open(tmp_path / row["file_name"])
        assert image.size == (64, 64) and image.mode == "RGB"
        # the border is the background; the shape's color is there too
        pixels = np.asarray(image).reshape(-1, 3)
        assert (np.abs(pixels - COLORS[color]).sum(1) < 10).mean() > 0.05


def test_holdout_included_on_request_and_extensible(tmp_path):
    make_shapes(tmp_path, 300, seed=1, include_holdout=True)
    pairs = {parse_caption(json.loads(line)["text"])[:2] for line in open(tmp_path / "metadata.jsonl")}
    assert set(HOLDOUT) <= pairs
    make_shapes(tmp_path / "x", 40, colors={"pink": (255, 105, 180), "black": (0, 0, 0)}, shapes=("cross",))
    texts = {json.loads(line)["text"] for line in open(tmp_path / "x" / "metadata.jsonl")}
    assert texts == {caption("pink", "cross", "black"), caption("black", "cross", "pink")}


def test_caption_grammar():
    assert caption("red", "star", "blue") == "a red star on a blue background"
    prompts = all_prompts()
    assert len(prompts) == 8 * 4 * 7
    assert sum(p.held_out for p in prompts) == len(HOLDOUT) * 7
    assert len(all_prompts(include_holdout=False)) == (8 * 4 - len(HOLDOUT)) * 7


@pytest.mark.parametrize("argv, message", [
    (["--n", "-1"], "n must be >= 0, got -1"),
    (["--n", "3", "--colors", "red,teal"], "unknown color 'teal'"),
    (["--n", "3", "--shapes", "circle,blob"], "unknown shape(s) blob"),
    (["--n", "3", "--colors", "red"], "at least two colors are needed"),
    (["--n", "3", "--colors", "red,pink=#ff69"], "color 'pink=#ff69' must look like name=#rrggbb"),
    (["--n", "3", "--shape-weights", "triangle"], "shape weight 'triangle' must look like shape=number"),
    (["--n", "3", "--shape-weights", "cross=2"], "a weight is given for 'cross', which is not among the shapes"),
    (["--n", "3", "--shape-weights", "star=0"], "the weight of 'star' must be a positive number, got 0.0"),
    (["--n", "3", "--shape-sizes", "star=0.4"], "shape size 'star=0.4' must look like shape=low:high"),
    (["--n", "3", "--shape-sizes", "star=a:b"], "shape size 'star=a:b' must look like shape=low:high"),
    (["--n", "3", "--shape-sizes", "cross=0.3:0.4"], "a size is given for 'cross', which is not among the shapes"),
    (["--n", "3", "--shape-sizes", "star=0.4:0.3"], "the size of 'star' must satisfy 0 < low <= high <= 0.5"),
    (["--n", "3", "--shape-sizes", "star=0.3:0.6"], "the size of 'star' must satisfy 0 < low <= high <= 0.5"),
    (["--n", "3", "--shape-sizes", "star=0:0.3"], "the size of 'star' must satisfy 0 < low <= high <= 0.5"),
])
def test_make_shapes_cli_rejects_bad_args(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        make_shapes_main([str(out), *argv])
    assert exit_info.value.code == 2
    assert not out.exists()
    assert f"error: {message}" in capsys.readouterr().err


def test_shape_weights_draw_more_of_a_shape(tmp_path):
    make_shapes(tmp_path / "even", 400, size=8)
    make_shapes(tmp_path / "more", 400, size=8, shape_weights={"triangle": 3.0})
    count = {name: sum("triangle" in text for _, text in scan_captioned_images(tmp_path / name))
             for name in ("even", "more")}
    # 1/4 of the images uniformly; 3/6 with the weight (holdout trims a few pairs): 100 ± 26 vs 200 ± 30 at 3 σ
    assert 74 <= count["even"] <= 126 and 170 <= count["more"] <= 230


def test_shape_sizes_keep_a_shape_to_its_range(tmp_path):
    def areas(folder):  # foreground pixels per image, by shape (the background color differs from the shape's)
        found = {}
        for path, text in scan_captioned_images(folder):
            color, shape, _ = parse_caption(text)
            pixels = np.asarray(Image.open(path), int)
            found.setdefault(shape, []).append(int((np.abs(pixels - COLORS[color]).sum(-1) < 60).sum()))
        return found

    make_shapes(tmp_path / "even", 200, seed=5)
    make_shapes(tmp_path / "sized", 200, seed=5, shape_sizes={"star": (0.2, 0.2), "circle": (0.45, 0.45)})
    even, sized = areas(tmp_path / "even"), areas(tmp_path / "sized")
    # a disc of radius 0.45 * 64 px covers 2606 px; a star of circumradius r = 0.2 * 64 px ~ 1.18 r^2 = 193 px
    # (its anti-aliased rim, a larger share of a small shape, falls outside the color threshold)
    assert all(abs(a - 2606) < 100 for a in sized["circle"]) and all(abs(a - 185) < 40 for a in sized["star"])
    assert sized["square"] == even["square"] and sized["triangle"] == even["triangle"]  # the other shapes untouched
    assert np.ptp(even["star"]) > 300  # by default stars come in every size of 0.30-0.45


def test_make_shapes_cli(tmp_path):
    assert make_shapes_main([str(tmp_path), "--n", "5", "--colors", "red,pink=#ff69b4", "--shapes", "cross"]) == 0
    assert len(scan_captioned_images(tmp_path)) == 5
    assert make_shapes_main([str(tmp_path / "sized"), "--n", "3", "--shape-sizes", "star=0.3:0.3,circle=0.2:0.25"]) == 0
    make_shapes(tmp_path / "api", 3, shape_sizes={"star": (0.3, 0.3), "circle": (0.2, 0.25)})
    assert _read(tmp_path / "sized") == _read(tmp_path / "api")


# --- readers ------------------------------------------------------------------------------------

def test_reads_metadata_jsonl(tmp_path):
    make_shapes(tmp_path, 4)
    items = scan_captioned_images(tmp_path)
    assert [p.name for p, _ in items] == [f"{i:05d}.png" for i in range(4)]
    assert all(parse_caption(text) for _, text in items)


def test_reads_sidecar_captions_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first\n")
    _save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.caption").write_text("second")
    items = scan_captioned_images(tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), t) for p, t in items] == [("a.png", "first"), ("sub/b.jpg", "second")]


def _error(root, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        scan_captioned_images(root, **kwargs)
    return str(info.value)


def test_reader_errors(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")
    assert "no images found" in _error(tmp_path)
    for i in range(13):
        _save(tmp_path / f"img{i:02d}.png")
    message = _error(tmp_path)
    assert "13 image(s)" in message and "img00.png" in message and "and 3 more" in message
    assert [t for _, t in scan_captioned_images(tmp_path, allow_missing_captions=True)] == [""] * 13


@pytest.mark.parametrize("line, expected", [
    ("{not json", "line 2 is not valid JSON"),
    ('{"file_name": "a.png", "text": 7}', "line 2 has a 'text' of type int"),
    ('{"file_name": "a.png", "text": ["x"]}', "line 2 has a 'text' of type list"),
    ('{"file_name": "gone.png", "text": "x"}', "line 2 names 'gone.png', which does not exist"),
    ('{"text": "x"}', "line 2 must be a JSON object with a string 'file_name'"),
])
def test_metadata_errors_name_the_line(tmp_path, line, expected):
    _save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n' + line + "\n")
    assert expected in _error(tmp_path)


# --- CaptionedImageDataset ----------------------------------------------------------------------

def test_dataset_item_and_corrupt_images(tmp_path, caplog):
    _save(tmp_path / "good.png", size=(48, 32))
    (tmp_path / "good.txt").write_text("good")
    _save(tmp_path / "trunc.png", size=(64, 64))
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "trunc.txt").write_text("trunc")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.txt").write_text("junk")
    items = scan_captioned_images(tmp_path)
    dataset = CaptionedImageDataset(items, 16)
    by_name = {p.name: i for i, (p, _) in enumerate(items)}
    item = dataset[by_name["good.png"]]
    assert item["pixel_values"].shape == (3, 16, 16) and item["text"] == "good"
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    with caplog.at_level(logging.WARNING):
        assert dataset[by_name["trunc.png"]] is None
        assert dataset[by_name["junk.png"]] is None
        assert dataset[by_name["junk.png"]] is None  # warned and counted once per file
    assert dataset.skipped == 2
    assert sum("junk.png" in r.getMessage() for r in caplog.records) == 1
    assert any("trunc.png" in r.getMessage() for r in caplog.records)
    batch = collate_skip_none([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (1, 3, 16, 16) and batch["text"] == ["good"]
    assert collate_skip_none([None, None]) is None


def test_augmentation_reproducible_per_seed_epoch_index(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    items = [(tmp_path / "a.png", "x")] * 16

    def views(seed, epoch):
        dataset = CaptionedImageDataset(items, 16, center_crop=False, random_flip=True, seed=seed)
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i]["pixel_values"] for i in range(len(items))])

    first = views(0, 1)
    assert torch.equal(first, views(0, 1))
    assert len({tuple(v.flatten().tolist()) for v in first}) > 1  # crops/flips differ between indices
    assert not torch.equal(first, views(0, 2))
    assert not torch.equal(first, views(1, 1))
    # random access order does not matter: a resumed run that starts at index 9 sees the same view
    resumed = CaptionedImageDataset(items, 16, center_crop=False, random_flip=True, seed=0)
    resumed.set_epoch(1)
    assert torch.equal(resumed[9]["pixel_values"], first[9])


# --- latent cache -------------------------------------------------------------------------------

def _tiny_vae(seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4, sample_size=16,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()


def test_latent_cache_hit_miss_and_invalidation(tmp_path):
    from latentdiff.data.latent_cache import CachedLatentDataset, LatentCache
    from latentdiff.vae import sample_posterior
    make_shapes(tmp_path / "imgs", 4)
    items = scan_captioned_images(tmp_path / "imgs")
    vae = _tiny_vae()

    def cache(v=vae):
        return LatentCache(tmp_path / "cache", v, 16, center_crop=True, random_flip=True)

    assert cache().build(items, batch_size=3, progress=False) == 4
    assert cache().build(items, 3, progress=False) == 0  # all hits
    assert not list((tmp_path / "cache").glob("*.tmp")) and not list((tmp_path / "cache").glob(".*"))

    # the stored posterior is the VAE's, for the plain and the mirrored image
    from latentdiff.data.datasets import load_pixels
    x = load_pixels(items[0][0], 16)
    with torch.no_grad():
        expected = vae.encode(torch.stack([x, x.flip(-1)])).latent_dist.parameters
    assert torch.allclose(cache().load(items[0][0]), expected[0], atol=1e-5)
    assert torch.allclose(cache().load(items[0][0], flip=True), expected[1], atol=1e-5)

    _save(items[2][0], size=(64, 64))  # a changed image misses
    assert cache().build(items, 3, progress=False) == 1
    other = _tiny_vae()
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # changed VAE weights miss everything
    assert cache(other).build(items, 3, progress=False) == 4
    with pytest.raises(ValueError, match="center_crop"):
        LatentCache(tmp_path / "cache", vae, 16, center_crop=False)

    # flips drawn like CaptionedImageDataset's; the sample has the latent shape
    dataset = CachedLatentDataset(cache(), items, seed=5)
    images = CaptionedImageDataset(items, 16, random_flip=True, seed=5)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        images.set_epoch(epoch)
        for i in range(4):
            flipped = torch.equal(images[i]["pixel_values"], load_pixels(items[i][0], 16, flip=True))
            assert torch.equal(dataset[i]["latent_dist"], cache().load(items[i][0], flip=flipped))
    params = collate_skip_none([dataset[0], dataset[1]])["latent_dist"]
    assert params.shape == (2, 8, 16, 16)
    generator = torch.Generator().manual_seed(0)
    assert sample_posterior(params, generator).shape == (2, 4, 16, 16)
    cache().path_for(items[3][0]).unlink()  # a missing entry is skipped and counted
    assert dataset[3] is None and dataset.skipped == 1


# --- odd datasets -------------------------------------------------------------------------------

def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from latentdiff.data import load_pixels

    gradient = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = load_pixels(tmp_path / "g16.png", 32)  # (3, 32, 32) in [-1, 1]
    expected = torch.from_numpy(gradient / 65535 * 2 - 1).float()
    assert (x[0] - expected).abs().max() < 2 / 255 + 1e-6
    assert torch.equal(x[0], x[1]) and abs(x.mean().item()) < 0.01


def test_non_utf8_metadata_and_paths_outside_the_dataset_are_one_sentence(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"metadata.jsonl is not UTF-8 text \(byte 35"):
        scan_captioned_images(tmp_path)
    (tmp_path.parent / "secret.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "../secret.png", "text": "x"}\n')
    with pytest.raises(DataError, match="line 1 names '../secret.png', which is outside the dataset folder"):
        scan_captioned_images(tmp_path)


def test_a_long_caption_is_warned_about_once(caplog):
    from latentdiff.text import build_clip_tokenizer, tokenize

    tokenizer = build_clip_tokenizer()
    caption = "a red circle " + "very " * 80 + "GIRAFFE"
    with caplog.at_level(logging.WARNING, logger="latentdiff.text"):
        for _ in range(3):  # three epochs
            tokenize(tokenizer, [caption, "short"])
    assert caplog.text.lower().count("giraffe") == 1
