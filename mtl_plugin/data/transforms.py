"""Image recipes (size, normalisation, the pretraining augmentation) and their transforms. Each data
set's recipe is part of its entry in :mod:`mtl_plugin.data.registry`; the built-in ones follow the papers:

* mini/tieredImageNet: MTL's PyTorch code (Sun et al. 2019, after FEAT) resizes to
  92/80 of the target size and centre-crops; pretraining adds RandomResizedCrop
  and a horizontal flip; CIFAR-100 channel statistics. Native size 84 px.
* CIFAR-FS / FC100: 32 px, random crop with 4 px padding, flip and colour jitter
  0.4 (MetaOptNet, RFS), same statistics.
* Omniglot / kanji: greyscale, strokes 1 on 0 (Omniglot is inverted, ``1 - x``),
  Lanczos resize, no normalisation and no augmentation beyond Omniglot's
  rotated classes.
* Image folders: mini-ImageNet's recipe with ImageNet statistics.

Example::

    from mtl_plugin.data.registry import dataset_spec
    from mtl_plugin.data.transforms import eval_transform, train_transform
    recipe = dataset_spec("mini-imagenet").recipe
    test_tf = eval_transform(recipe, 84)      # PIL image -> normalised 3x84x84 tensor
    pretrain_tf = train_transform(recipe, 84)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = ["CIFAR_STATS", "IMAGENET_STATS", "ImageRecipe", "eval_transform", "train_transform"]

# (mean, std) per channel: CIFAR-100's, which MTL's code uses for mini/tieredImageNet too, and ImageNet's.
CIFAR_STATS = (tuple(x / 255.0 for x in (125.3, 123.0, 113.9)), tuple(x / 255.0 for x in (63.0, 62.1, 66.7)))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ImageRecipe:
    """How one data set's images become tensors.

    ``crop_ratio < 1`` means: resize to ``size / crop_ratio`` then centre-crop
    ``size`` (MTL's 92 -> 80). ``augmentation`` is ``"resized-crop"``,
    ``"padded-crop"`` or ``"none"``.

    Example::

        recipe = ImageRecipe(native_size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    """

    native_size: int
    channels: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    invert: bool = False
    crop_ratio: float = 1.0
    augmentation: str = "none"
    padding_fraction: float = 0.125
    colour_jitter: float = 0.0
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to before the transform."""
        return "L" if self.channels == 1 else "RGB"


def _to_tensor(recipe: ImageRecipe) -> list:
    steps: list = [T.ToTensor()]
    if recipe.invert:
        steps.append(_invert)
    if recipe.mean is not None:
        steps.append(T.Normalize(recipe.mean, recipe.std))
    return steps


def _invert(x: torch.Tensor) -> torch.Tensor:
    # A module-level function, not a lambda, so data loaders can pickle the transform.
    return 1.0 - x


def eval_transform(recipe: ImageRecipe, size: int) -> Callable:
    """Deterministic PIL -> tensor transform for meta-train/val/test tasks.

    Example::

        tensor = eval_transform(dataset_spec("fc100").recipe, 32)(pil_image)   # 3x32x32
    """
    if recipe.crop_ratio < 1.0:
        resize = [T.Resize(round(size / recipe.crop_ratio), recipe.interpolation), T.CenterCrop(size)]
    else:
        resize = [T.Resize((size, size), recipe.interpolation)]
    return T.Compose(resize + _to_tensor(recipe))


def train_transform(recipe: ImageRecipe, size: int) -> Callable:
    """Randomised transform for supervised pretraining on the meta-train classes.

    Example::

        augment = train_transform(dataset_spec("mini-imagenet").recipe, 84)
    """
    if recipe.augmentation == "none":
        return eval_transform(recipe, size)
    if recipe.augmentation == "resized-crop":
        # MTL: Resize(92), RandomResizedCrop(88), CenterCrop(80), flip -- scaled to ``size``.
        steps = [
            T.Resize(round(size / recipe.crop_ratio), recipe.interpolation),
            T.RandomResizedCrop(round(size * 88 / 80), interpolation=recipe.interpolation),
            T.CenterCrop(size),
        ]
    elif recipe.augmentation == "padded-crop":
        steps = [
            T.Resize((size, size), recipe.interpolation),
            T.RandomCrop(size, padding=max(1, round(size * recipe.padding_fraction))),
        ]
    else:
        raise ValueError(f"unknown augmentation {recipe.augmentation!r}: use resized-crop, padded-crop or none")
    steps.append(T.RandomHorizontalFlip())
    if recipe.colour_jitter > 0:
        steps.append(T.ColorJitter(recipe.colour_jitter, recipe.colour_jitter, recipe.colour_jitter))
    return T.Compose(steps + _to_tensor(recipe))
