"""The kanji generator: deterministic, disjoint splits, cached with a checksum, usable as a benchmark."""

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtl_plugin.cli.data import data as data_cli
from mtl_plugin.data import KanjiConfig, get_benchmark, load_kanji
from mtl_plugin.data.cache import manifest_path
from mtl_plugin.data.kanji import (
    STYLES,
    _cache_path,
    _candidates,
    _clutter_kanji,
    choose_classes,
    generate_kanji,
    kanji_strokes,
    kanjivg_folder,
    parse_strokes,
    render_kanji,
)
from mtl_plugin.data.svg_path import flatten, parse_path

SMALL = KanjiConfig(num_classes=30, instances=6)  # the default style, wild
# Everything the wild style adds to the clean one's kind of variation, switched off.
NO_EXTRAS = dict(drop_stroke=0.0, ink=(1.0, 1.0), background=(0.0, 0.0), noise=0.0, clutter=0)


@pytest.fixture(scope="module")
def small():
    return generate_kanji(SMALL, workers=1, progress=False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA", str(tmp_path / "mtl_data"))


def test_svg_path_parser_handles_relative_smooth_and_packed_numbers():
    segments = parse_path("M10,10c1,1.5.5,2,3-1s1,1,2,0L20,20z")
    assert len(segments) == 4  # c, s, L, and the closing line back to (10, 10)
    np.testing.assert_allclose(segments[0][3], [13, 9])
    np.testing.assert_allclose(segments[1][1], 2 * segments[0][3] - segments[0][2])  # reflected control
    np.testing.assert_allclose(segments[-1][3], [10, 10])
    assert flatten(segments, steps=4).shape == (17, 2)
    with pytest.raises(ValueError, match="unsupported"):
        parse_path("M0,0 A1,1 0 0 1 2,2")
    # A number after Z used to loop for ever: Z reads none, so nothing moved past it.
    with pytest.raises(ValueError, match=r"number \('5'\) after 'Z'"):
        parse_path("M0,0 L1,1 Z 5")


def test_same_seed_gives_byte_identical_arrays_whatever_the_worker_count(small):
    one = small
    two = generate_kanji(SMALL, workers=2, progress=False)
    assert one.pixels.dtype == np.uint8 and one.pixels.shape == (30, 6, 28, 28)
    assert one.pixels.tobytes() == two.pixels.tobytes()
    assert one.code_points == two.code_points
    other = generate_kanji(KanjiConfig(num_classes=6, instances=6, seed=1), workers=1, progress=False)
    assert other.pixels.tobytes() != one.pixels[:6].tobytes()


def test_clean_images_are_strokes_on_black_and_writers_differ():
    config = KanjiConfig(num_classes=6, instances=3, image_size=32, style="clean")
    data = generate_kanji(config, workers=1, progress=False)
    assert data.pixels.shape == (6, 3, 32, 32)
    first = data.pixels[0].astype(int)
    assert first.max() == 255 and np.median(first) == 0
    # Anti-aliased: grey levels between ink and paper exist.
    assert ((first > 0) & (first < 255)).any()
    assert not np.array_equal(first[0], first[1])


def test_clean_style_draws_the_first_generators_images():
    data = generate_kanji(KanjiConfig(num_classes=6, instances=3, style="clean"), workers=1, progress=False)
    # SHA-256 of the same configuration's pixels from GENERATOR_VERSION 1, the only style then.
    assert hashlib.sha256(data.pixels.tobytes()).hexdigest() == (
        "611cc8f398b5c31108ba9f5726ba5323bf5cb7b05a4d83e58b577f0206ff0d70"
    )
    bench = get_benchmark("kanji", num_classes=6, instances=3, style="clean", progress=False)
    assert bench.test[0][0].mul(255).round().byte().numpy()[0].tobytes() == data.split_pixels("test")[0, 0].tobytes()


def test_wild_style_differs_from_clean_with_light_strokes_on_a_dark_ground(small):
    clean = generate_kanji(replace(SMALL, style="clean"), workers=1, progress=False)
    assert small.code_points == clean.code_points
    assert not np.array_equal(small.pixels, clean.pixels)
    images = small.pixels.reshape(-1, 28 * 28).astype(int)
    grounds, strokes = np.median(images, axis=1), np.percentile(images, 99, axis=1)
    assert (strokes > grounds + 60).all()
    # Paper brightness varies between writers; the clean style's paper is always black.
    assert grounds.max() > 20 and np.median(clean.pixels) == 0


def test_styles_are_presets_that_explicit_fields_override():
    assert KanjiConfig(style="clean").resolved().stroke_width == STYLES["clean"]["stroke_width"]
    assert KanjiConfig().resolved().clutter == STYLES["wild"]["clutter"]
    assert replace(KanjiConfig(), style="clean").resolved() == KanjiConfig(style="clean").resolved()
    assert KanjiConfig(clutter=0).resolved().clutter == 0
    # Spelling out a style's own value names the same data set (and cache entry).
    spelled = KanjiConfig(style="clean", stroke_width=STYLES["clean"]["stroke_width"])
    assert _cache_path(spelled, Path("c")) == _cache_path(KanjiConfig(style="clean"), Path("c"))
    # The wild style with its extras off is the clean drawing with the wild pose, pen and field.
    pose = {k: v for k, v in STYLES["wild"].items() if k not in NO_EXTRAS}
    tiny = dict(num_classes=5, instances=3)
    wild = generate_kanji(KanjiConfig(**tiny, **NO_EXTRAS), workers=1, progress=False)
    clean = generate_kanji(KanjiConfig(**tiny, style="clean", **pose), workers=1, progress=False)
    assert wild.pixels.tobytes() == clean.pixels.tobytes()


def _render(character: str, others, instances: int = 8, **fields):
    strokes = parse_strokes(kanji_strokes(ord(character)))
    config = KanjiConfig(**{**NO_EXTRAS, **fields})
    return np.stack([render_kanji(strokes, np.random.default_rng(i), config, others) for i in range(instances)])


def test_clutter_adds_faint_strokes_only_when_its_field_allows():
    others = [parse_strokes(kanji_strokes(ord(c))) for c in "鬱曜"]
    bare = _render("木", others)
    cluttered = _render("木", others, clutter=3)
    assert np.array_equal(_render("木", others, clutter=0), bare)
    # Clutter lies behind the character: it only ever adds light, and fainter than the ink.
    assert (cluttered >= bare).all() and (cluttered > bare).any()
    assert cluttered[bare == 0].max() < 255
    with pytest.raises(ValueError, match="clutter=3"):
        _render("木", [], clutter=3)
    # The clutter comes from kanji that can never be a class, so it carries no class's shape.
    pool = _clutter_kanji(SMALL, kanjivg_folder())
    assert len(pool) > 100 and not set(pool) & set(_candidates(SMALL, kanjivg_folder()))


def test_dropped_strokes_follow_their_field_and_keep_most_of_the_kanji():
    full = _render("木", [])
    dropped = _render("木", [], drop_stroke=1.0)
    assert (dropped <= full).all()
    # 4 strokes: one at most is left out, so most of the ink stays.
    assert (dropped.sum(axis=(1, 2)) < full.sum(axis=(1, 2))).all()
    assert (dropped.sum(axis=(1, 2)) > 0.5 * full.sum(axis=(1, 2))).all()
    # A kanji of 3 strokes or fewer keeps them all.
    assert np.array_equal(_render("人", [], drop_stroke=1.0), _render("人", []))


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(style="fancy"), "style='fancy'"),
        (dict(drop_stroke=1.5), "drop_stroke=1.5"),
        (dict(clutter=-1), "clutter=-1"),
        (dict(clutter=1.5), "clutter=1.5"),
        (dict(noise=-0.1), "noise=-0.1"),
        (dict(ink=(0.5, 1.5)), "ink="),
        (dict(background=(0.3, 0.2)), "background="),
        (dict(background=(0.0, 0.7)), "background="),
        (dict(stroke_width=(0.0, 4.0)), "stroke_width="),
        (dict(shift=-1.0), "shift=-1.0"),
    ],
)
def test_bad_drawing_values_are_named(fields, name):
    with pytest.raises(ValueError, match=name):
        KanjiConfig(**fields)
    with pytest.raises(ValueError, match=name):
        get_benchmark("kanji", num_classes=6, instances=2, progress=False, **fields)


def test_splits_are_disjoint_and_fixed_by_the_seed(small):
    data = small
    splits = [set(data.split_classes(s)) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == [18, 6, 6]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert choose_classes(SMALL)[0] == data.code_points
    assert choose_classes(KanjiConfig(num_classes=30, instances=6, seed=1))[0] != data.code_points


def test_cache_is_reused_and_a_corrupt_cache_is_rebuilt(tmp_path):
    tiny = KanjiConfig(num_classes=6, instances=2)
    first = load_kanji(tiny, cache_dir=tmp_path, progress=False)
    path = _cache_path(tiny, tmp_path)
    assert path.exists() and manifest_path(path).exists()
    stamp = path.stat().st_mtime_ns
    assert load_kanji(tiny, cache_dir=tmp_path, progress=False).pixels.tobytes() == first.pixels.tobytes()
    assert path.stat().st_mtime_ns == stamp
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.warns(UserWarning, match="checksum"):
        rebuilt = load_kanji(tiny, cache_dir=tmp_path, progress=False)
    assert rebuilt.pixels.tobytes() == first.pixels.tobytes()
    manifest_path(path).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        load_kanji(tiny, cache_dir=tmp_path, progress=False)


def test_kanji_benchmark_gives_one_channel_tasks_inside_each_split():
    bench = get_benchmark("kanji", num_classes=30, instances=6, progress=False)
    assert (bench.channels, bench.image_size, bench.standard, bench.num_train_classes) == (1, 28, False, 18)
    x, y = bench.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0.0 <= x.min() <= x.max() <= 1.0
    for split in ("train", "val", "test"):
        dataset = bench.split(split)
        assert sorted(dataset.labels) == list(range(len(dataset.labels)))
        tasks = bench.taskset(split, ways=5, shots=1, queries=2, num_tasks=4, seed=0)
        task_x, task_y = tasks[0]
        assert task_x.shape == (15, 1, 28, 28)
        assert sorted(task_y.tolist()) == sorted([0, 1, 2, 3, 4] * 3)
        # Every image of the task is one of the split's own images.
        pool = torch.stack([dataset[i][0] for i in range(len(dataset))]).flatten(1)
        matches = (task_x.flatten(1)[:, None, :] == pool[None]).all(-1).any(-1)
        assert matches.all()
    assert len(bench.train_augmented) == len(bench.train)
    # Kanji has no pretraining augmentation: the pretraining reads the train split and its kept images.
    assert bench.train_augmented.dataset is bench.train.dataset and bench.train.dataset.memoised


def test_cli_generates_and_writes_a_preview(tmp_path):
    out = tmp_path / "preview.png"
    result = CliRunner().invoke(
        data_cli,
        ["kanji", "--num-classes", "12", "--instances", "4", "--cache-dir", str(tmp_path), "--preview", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "12 classes" in result.output and out.stat().st_size > 0
    result = CliRunner().invoke(
        data_cli, ["kanji", "--num-classes", "6", "--instances", "2", "--style", "clean", "--cache-dir", str(tmp_path)]
    )
    assert result.exit_code == 0 and "kanji (clean)" in result.output
    result = CliRunner().invoke(data_cli, ["kanji", "--num-classes", "1", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0 and "num_classes=1" in result.output


def test_bad_kanji_options_are_named():
    with pytest.raises(ValueError, match="num_classes=100000"):
        get_benchmark("kanji", num_classes=100000, progress=False)
    with pytest.raises(ValueError, match="unknown option"):
        get_benchmark("kanji", colour="red")
