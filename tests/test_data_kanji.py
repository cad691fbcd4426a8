"""The kanji generator: deterministic, disjoint splits, cached with a checksum, usable as a benchmark."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtl_plugin.data import KanjiConfig, get_benchmark, load_kanji
from mtl_plugin.data.cache import manifest_path
from mtl_plugin.data.cli import data as data_cli
from mtl_plugin.data.kanji import _cache_path, choose_classes, generate_kanji
from mtl_plugin.data.svg_path import flatten, parse_path


SMALL = KanjiConfig(num_classes=30, instances=6)


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


def test_same_seed_gives_byte_identical_arrays_whatever_the_worker_count(small):
    one = small
    two = generate_kanji(SMALL, workers=2, progress=False)
    assert one.pixels.dtype == np.uint8 and one.pixels.shape == (30, 6, 28, 28)
    assert one.pixels.tobytes() == two.pixels.tobytes()
    assert one.code_points == two.code_points
    other = generate_kanji(KanjiConfig(num_classes=6, instances=6, seed=1), workers=1, progress=False)
    assert other.pixels.tobytes() != one.pixels[:6].tobytes()


def test_images_are_strokes_on_black_and_writers_differ():
    data = generate_kanji(KanjiConfig(num_classes=6, instances=3, image_size=32), workers=1, progress=False)
    assert data.pixels.shape == (6, 3, 32, 32)
    first = data.pixels[0].astype(int)
    assert first.max() == 255 and np.median(first) == 0
    # Anti-aliased: grey levels between ink and paper exist.
    assert ((first > 0) & (first < 255)).any()
    assert not np.array_equal(first[0], first[1])


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


def test_cli_generates_and_writes_a_preview(tmp_path):
    out = tmp_path / "preview.png"
    result = CliRunner().invoke(
        data_cli,
        ["kanji", "--num-classes", "12", "--instances", "4", "--cache-dir", str(tmp_path), "--preview", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "12 classes" in result.output and out.stat().st_size > 0
    result = CliRunner().invoke(data_cli, ["kanji", "--num-classes", "1", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0 and "num_classes=1" in result.output


def test_bad_kanji_options_are_named():
    with pytest.raises(ValueError, match="num_classes=100000"):
        get_benchmark("kanji", num_classes=100000, progress=False)
    with pytest.raises(ValueError, match="unknown option"):
        get_benchmark("kanji", colour="red")
