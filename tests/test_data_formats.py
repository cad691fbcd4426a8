"""Each standard format loads from tiny fake files written exactly as the real ones are laid out.

Every fake image is one flat grey level that names its class, so a task's images
tell which classes they came from: they must all come from the task's own split.
"""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_plugin.data import KNOWN_BENCHMARKS, get_benchmark
from mtl_plugin.data import benchmark as benchmark_module
from mtl_plugin.data.registry import dataset_spec

SPLIT_CLASSES = {"train": [0, 1, 2, 3, 4, 5], "val": [6, 7, 8, 9, 10], "test": [11, 12, 13, 14, 15]}
PER_CLASS = 4
L2L_NAME = {"train": "train", "val": "validation", "test": "test"}


def _grey(global_class: int) -> int:
    return 10 + 15 * global_class  # distinct and far apart after resizing


def _pixels(global_class: int, size: int) -> np.ndarray:
    return np.full((PER_CLASS, size, size, 3), _grey(global_class), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mini_imagenet(root):
    for split, classes in SPLIT_CLASSES.items():
        image_data = np.concatenate([_pixels(c, 84) for c in classes])
        class_dict = {f"n{c:08d}": list(range(k * PER_CLASS, (k + 1) * PER_CLASS)) for k, c in enumerate(classes)}
        with open(root / f"mini-imagenet-cache-{L2L_NAME[split]}.pkl", "wb") as handle:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, handle)


def write_tiered_imagenet(root):
    folder = root / "tiered-imagenet"
    folder.mkdir()
    for split, classes in SPLIT_CLASSES.items():
        # Ren et al.'s pickles: a list of PNG-encoded uint8 arrays, and per-image labels.
        images = [np.frombuffer(_png(img), dtype=np.uint8) for c in classes for img in _pixels(c, 84)]
        labels = np.repeat(np.arange(len(classes)), PER_CLASS)
        with open(folder / f"{split}_images_png.pkl", "wb") as handle:
            pickle.dump(images, handle)
        with open(folder / f"{split}_labels.pkl", "wb") as handle:
            pickle.dump({"label_specific": labels, "label_general": labels // 2}, handle)


def write_fc100(root):
    for split, classes in SPLIT_CLASSES.items():
        # Labels are CIFAR-100 class ids, not 0..n-1 within the split.
        archive = {
            "data": np.concatenate([_pixels(c, 32) for c in classes]),
            "labels": [3 * c + 1 for c in classes for _ in range(PER_CLASS)],
        }
        with open(root / f"FC100_{split}.pickle", "wb") as handle:
            pickle.dump(archive, handle, protocol=2)


def write_cifarfs(root):
    data = root / "cifarfs" / "cifar100" / "data"
    splits = root / "cifarfs" / "cifar100" / "splits" / "bertinetto"
    splits.mkdir(parents=True)
    for split, classes in SPLIT_CLASSES.items():
        (splits / f"{split}.txt").write_text("".join(f"class_{c}\n" for c in classes))
        for c in classes:
            (data / f"class_{c}").mkdir(parents=True)
            for k, img in enumerate(_pixels(c, 32)):
                Image.fromarray(img).save(data / f"class_{c}" / f"class_{c}_s_{k:06d}.png")


def write_folder(root):
    for split, classes in SPLIT_CLASSES.items():
        for c in classes:
            (root / split / f"class_{c}").mkdir(parents=True)
            for k, img in enumerate(_pixels(c, 40)):
                suffix = ".jpg" if k % 2 else ".png"
                Image.fromarray(img).save(root / split / f"class_{c}" / f"{k}{suffix}", quality=100)


WRITERS = {
    "mini-imagenet": write_mini_imagenet,
    "tiered-imagenet": write_tiered_imagenet,
    "fc100": write_fc100,
    "cifarfs": write_cifarfs,
    "folder": write_folder,
}


def _grey_level(x: torch.Tensor, recipe) -> int:
    mean = torch.tensor(recipe.mean).view(-1, 1, 1)
    std = torch.tensor(recipe.std).view(-1, 1, 1)
    return int(round(float(((x * std + mean) * 255).mean())))


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_format_loads_and_tasks_stay_inside_their_split(name, tmp_path):
    WRITERS[name](tmp_path)
    bench = get_benchmark(name, root=tmp_path)
    recipe = dataset_spec(name).recipe
    assert bench.channels == 3 and bench.image_size == recipe.native_size
    assert bench.standard == (name != "folder")
    assert bench.num_train_classes == len(SPLIT_CLASSES["train"])
    x, _ = bench.train_augmented[0]
    assert x.shape == (3, recipe.native_size, recipe.native_size)
    for split, classes in SPLIT_CLASSES.items():
        dataset = bench.split(split)
        assert sorted(dataset.labels) == list(range(len(classes)))
        allowed = {_grey(c) for c in classes}
        tasks = bench.taskset(split, ways=3, shots=1, queries=2, num_tasks=3, seed=1)
        for i in range(3):
            task_x, task_y = tasks[i]
            assert task_x.shape == (9, 3, recipe.native_size, recipe.native_size)
            levels = {}
            for image, label in zip(task_x, task_y.tolist()):
                level = _grey_level(image, recipe)
                assert min(abs(level - a) for a in allowed) <= 2, f"{split} task drew an image of another split"
                levels.setdefault(label, set()).add(level)
            # One class per task label.
            assert all(len(v) == 1 for v in levels.values()) and len(levels) == 3


def test_small_splits_keep_their_transformed_images_and_augmentation_stays_random(tmp_path, monkeypatch):
    WRITERS["folder"](tmp_path)
    bench = get_benchmark("folder", root=tmp_path)
    train = bench.train.dataset
    first, label = train[0]
    assert train.memoised and train[0][0] is first
    fresh = train.with_transform(train.transform)  # the same transform, read afresh
    assert not fresh.memoised and torch.equal(fresh[0][0], first) and fresh[0][1] == label
    # The folder recipe augments for pretraining: a kept image would freeze its random crop.
    assert not bench.train_augmented.dataset.memoised
    monkeypatch.setattr(benchmark_module, "MEMO_BYTES", 0)
    assert not get_benchmark("folder", root=tmp_path).train.dataset.memoised


def test_cifarfs_reads_the_processed_layout_too(tmp_path):
    for split, classes in SPLIT_CLASSES.items():
        for c in classes:
            folder = tmp_path / "cifarfs" / "processed" / split / f"class_{c}"
            folder.mkdir(parents=True)
            for k, img in enumerate(_pixels(c, 32)):
                Image.fromarray(img).save(folder / f"{k}.png")
    bench = get_benchmark("cifarfs", root=tmp_path)
    assert [len(bench.split(s).labels) for s in SPLIT_CLASSES] == [6, 5, 5]


def write_omniglot(root, alphabets=3, characters=6, drawers=3):
    for part in ("images_background", "images_evaluation"):
        for a in range(alphabets):
            for c in range(characters):
                folder = root / "omniglot-py" / part / f"{part[7:]}_alphabet{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(drawers):
                    # A black mark in the top-left corner of a white page, so rotations are visible.
                    page = np.full((105, 105), 255, dtype=np.uint8)
                    page[5:40, 5:20] = 0
                    Image.fromarray(page).convert("1").save(folder / f"{c:04d}_{d + 1:02d}.png")


def test_omniglot_uses_rotations_as_classes_and_disjoint_character_splits(tmp_path):
    write_omniglot(tmp_path)
    bench = get_benchmark("omniglot", root=tmp_path, data_seed=3)
    assert (bench.channels, bench.image_size) == (1, 28)
    names = {}
    for split in ("train", "val", "test"):
        dataset = bench.split(split).dataset
        assert len(dataset.class_names) % 4 == 0
        names[split] = {n.split("@")[0] for n in dataset.class_names}
    assert sum(len(v) for v in names.values()) == 36
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert len(names["train"]) == round(36 * 1100 / 1623)
    dataset = bench.train.dataset
    upright, turned = dataset[0], dataset[1]  # same drawing, 0 and 90 degrees
    assert upright[1] != turned[1]
    assert upright[0].shape == (1, 28, 28)
    # Inverted: strokes are 1, the page 0; the mark sits top-left, then bottom-left after 90 degrees.
    assert upright[0][0, :14, :14].mean() > 0.1 and upright[0][0, 14:, 14:].mean() < 0.05
    assert turned[0][0, 14:, :14].mean() > 0.1
    tasks = bench.taskset("test", ways=5, shots=1, queries=1, num_tasks=2, seed=0)
    assert tasks[0][0].shape == (10, 1, 28, 28)
    unrotated = get_benchmark("omniglot", root=tmp_path, data_seed=3, rotations=False)
    assert unrotated.num_train_classes * 4 == bench.num_train_classes


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mini-imagenet", "mini-imagenet-cache-train.pkl"),
        ("tiered-imagenet", "train_images_png.pkl"),
        ("fc100", "FC100_train.pickle"),
        ("cifarfs", "train.txt"),
        ("omniglot", "images_background"),
        ("folder", "train"),
    ],
)
def test_missing_files_name_the_expected_path(name, expected, tmp_path):
    with pytest.raises(FileNotFoundError, match=expected) as error:
        get_benchmark(name, root=tmp_path)
    assert str(tmp_path) in str(error.value)
    assert not any(tmp_path.iterdir()), "a missing data set must not leave files behind"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        get_benchmark("imagenet-21k")
    assert all(name in str(error.value) for name in KNOWN_BENCHMARKS)


def test_aliases_resolve_to_the_canonical_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-train.pkl"):
        get_benchmark("miniImageNet", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="FC100_train.pickle"):
        get_benchmark("FC100", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="cifarfs"):
        get_benchmark("cifar-fs", root=tmp_path)


def test_small_class_is_named_or_skipped_on_request(tmp_path):
    write_folder(tmp_path)
    for extra in list((tmp_path / "test" / "class_12").iterdir())[1:]:
        extra.unlink()
    bench = get_benchmark("folder", root=tmp_path)
    with pytest.raises(ValueError, match="has 1 images"):
        bench.taskset("test", ways=3, shots=1, queries=2)
    with pytest.warns(UserWarning, match=r"class_12 \(1\)"):
        bench = get_benchmark("folder", root=tmp_path, min_per_class=3)
    assert "class_12" not in bench.test.dataset.class_names
    assert len(bench.test.labels) == 4 and len(bench.train.labels) == 6
    bench.taskset("test", ways=3, shots=1, queries=2)[0]


def test_corrupt_image_error_names_its_path(tmp_path):
    write_folder(tmp_path)
    bad = tmp_path / "val" / "class_7" / "0.png"
    bad.write_bytes(b"definitely not a png")
    bench = get_benchmark("folder", root=tmp_path)
    index = bench.val.dataset.source.paths.index(bad)
    with pytest.raises(ValueError, match="0.png"):
        bench.val[index]


def test_info_command_counts_classes_and_images(tmp_path):
    from click.testing import CliRunner

    from mtl_plugin.cli.data import data

    write_fc100(tmp_path)
    result = CliRunner().invoke(data, ["info", "fc100", "--root", str(tmp_path), "--image-size", "28"])
    assert result.exit_code == 0, result.output
    assert "3 x 28 x 28" in result.output and "train      6 classes       24 images" in result.output
    result = CliRunner().invoke(data, ["info", "mini-imagenet", "--root", str(tmp_path)])
    assert result.exit_code != 0 and "mini-imagenet-cache-train.pkl" in result.output


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made by a test go into a copy of the registry, gone after it."""
    from mtl_plugin.data import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


def test_a_registered_data_set_loads_by_name_with_its_recipe_and_options(tmp_path, own_registry):
    from mtl_plugin import ImageRecipe, Splits, register_dataset
    from mtl_plugin.data import image_folder_split, list_datasets

    write_folder(tmp_path)
    calls = []

    @register_dataset("my-glyphs", recipe=ImageRecipe(native_size=20, channels=1), options=("variant",), seeded=True)
    def my_glyphs(root, *, image_size, data_seed, variant="a"):
        calls.append((root, image_size, data_seed, variant))
        return Splits(*(image_folder_split(root, s) for s in ("train", "val", "test")), content="abc")

    assert list_datasets()[-1] == "my-glyphs"
    bench = get_benchmark("My_Glyphs", root=tmp_path, data_seed=3, variant="b")
    assert calls == [(tmp_path, 20, 3, "b")]
    assert (bench.name, bench.channels, bench.image_size, bench.standard) == ("my-glyphs", 1, 20, False)
    assert bench.settings == {"variant": "b", "seed": 3} and bench.content == "abc"
    assert bench.train[0][0].shape == (1, 20, 20)
    assert bench.num_train_classes == len(SPLIT_CLASSES["train"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]; accepted options: \['variant'\]"):
        get_benchmark("my-glyphs", root=tmp_path, colour=1)


def test_a_data_set_is_registered_once_whatever_its_spelling(own_registry):
    from mtl_plugin import ImageRecipe, register_dataset

    with pytest.raises(ValueError, match="'Mini_ImageNet' is registered already"):
        register_dataset("Mini_ImageNet", recipe=ImageRecipe(native_size=84, channels=3))(lambda root, **_: None)
    with pytest.raises(ValueError, match="or register yours with register_dataset"):
        get_benchmark("glyphs-never-registered")


def test_a_data_set_that_needs_a_root_says_so(own_registry):
    from mtl_plugin import ImageRecipe, register_dataset
    from mtl_plugin.data.benchmark import data_root

    register_dataset("rooted", recipe=ImageRecipe(native_size=28, channels=1), needs_root=True)(lambda root, **_: None)
    assert data_root("rooted") is None
    with pytest.raises(ValueError, match="the 'rooted' data set needs root="):
        get_benchmark("rooted")
