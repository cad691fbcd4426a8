"""The large-scale phase of MTL: train backbone + linear head on all meta-train classes, drop the head.

SGD with Nesterov momentum and weight decay, a step (or cosine) schedule, the
data set's training augmentation. Every epoch the backbone is validated on
few-shot val tasks with a nearest-centroid classifier on its frozen features and
the best epoch is kept (``best.pt``); ``last.pt`` lets a killed run resume.

Example::

    from mtl_plugin.pretrain import PretrainConfig, pretrain
    backbone = pretrain(get_benchmark("kanji"), PretrainConfig(backbone="conv4", epochs=5), "runs/pre")
    features = backbone(images)                      # (B, backbone.feature_dim)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mtl_plugin.backbones import build_backbone
from mtl_plugin.evaluation import EvaluationConfig, evaluate, nearest_centroid
from mtl_plugin.run_log import NonFiniteLossError, RunLog, load_checkpoint, save_checkpoint

__all__ = ["PretrainConfig", "build_pretrained", "load_pretrained", "pretrain"]

CHECKPOINT_KIND = "pretrain"
SCHEDULES = ("step", "cosine")


@dataclass
class PretrainConfig:
    """Pretraining hyper-parameters; defaults are the official MTL code's.

    SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, batch 128, 110 epochs,
    lr x0.2 every 30 epochs; validation on 600 5-way 1-shot val tasks per epoch.
    ``steps_per_epoch`` caps an epoch (``None``: one pass over the data), for
    small budgets.

    Example::

        config = PretrainConfig(backbone="resnet12", schedule="cosine")
    """

    backbone: str = "resnet12"
    epochs: int = 110
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "step"
    lr_step: int = 30
    lr_gamma: float = 0.2
    steps_per_epoch: Optional[int] = None
    val_ways: int = 5
    val_shots: int = 1
    val_queries: int = 15
    val_tasks: int = 600
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        for name in ("epochs", "batch_size", "lr_step", "val_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={self.steps_per_epoch} must be >= 1 or None")


def build_pretrained(info: dict) -> nn.Module:
    """A backbone (no head) of the architecture a pretrain checkpoint's ``model`` entry names.

    Example::

        backbone = build_pretrained({"backbone": "conv4", "in_channels": 1, "image_size": 28})
    """
    return build_backbone(info["backbone"], in_channels=info["in_channels"], image_size=info["image_size"])


def load_pretrained(path: Union[str, Path], map_location: Any = "cpu") -> nn.Module:
    """The feature extractor saved in a pretrain ``best.pt``.

    Example::

        backbone = load_pretrained("runs/pretrain/best.pt")
    """
    state = load_checkpoint(path, map_location)
    if state.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is a {state.get('kind')!r} checkpoint, not a pretrain one (best.pt of mtl pretrain)")
    backbone = build_pretrained(state["model"])
    backbone.load_state_dict(state["backbone"])
    return backbone


def _schedule(optimizer, config: PretrainConfig, steps_per_epoch: int):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step * steps_per_epoch,
                                           gamma=config.lr_gamma)


def pretrain(
    benchmark: Any,
    config: Optional[PretrainConfig] = None,
    out_dir: Union[str, Path] = "runs/pretrain",
    device: Union[str, torch.device] = "cpu",
    resume: bool = True,
    progress: bool = True,
) -> nn.Module:
    """Pretrain ``config.backbone`` on ``benchmark.train_augmented`` and return its best feature extractor.

    Deterministic given ``config.seed`` (the caller's global torch RNG is left as
    it was). With ``resume`` a finished run returns at once and a killed one
    continues from its last epoch. Raises :class:`NonFiniteLossError` on a NaN
    loss, keeping the last good checkpoint.

    Example::

        backbone = pretrain(bench, PretrainConfig(backbone="conv4", epochs=3), "runs/pre")
    """
    config = config or PretrainConfig()
    device = torch.device(device)
    log = RunLog(out_dir)
    info = {"backbone": config.backbone, "in_channels": benchmark.channels, "image_size": benchmark.image_size}
    val_config = EvaluationConfig(config.val_ways, config.val_shots, config.val_queries, config.val_tasks,
                                  config.seed)
    train = benchmark.train_augmented
    num_classes = len(train.labels)
    # fork_rng: augmentation draws from torch's global generator; seed it for this run only.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        backbone = build_pretrained(info)
        classifier = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, num_classes)).to(device)
        steps_per_epoch = math.ceil(len(train) / config.batch_size)
        if config.steps_per_epoch is not None:
            steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
        optimizer = torch.optim.SGD(classifier.parameters(), lr=config.lr, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=config.weight_decay)
        scheduler = _schedule(optimizer, config, steps_per_epoch)
        start, best_accuracy = 0, -math.inf
        if resume and log.last_path.is_file():
            state = load_checkpoint(log.last_path, device)
            if state.get("model") != info:
                raise ValueError(
                    f"{log.last_path} was written for {state.get('model')}, not {info}: use another "
                    f"output folder or run without --resume"
                )
            classifier.load_state_dict(state["classifier"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            start, best_accuracy, log.rows = state["epoch"], state["best_accuracy"], list(state["metrics"])

        for epoch in range(start + 1, config.epochs + 1):
            classifier.train()
            loader = torch.utils.data.DataLoader(
                train, batch_size=config.batch_size, shuffle=True, drop_last=len(train) > config.batch_size,
                generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
            )
            bar = tqdm(loader, total=steps_per_epoch, desc=f"pretrain {epoch}/{config.epochs}",
                       disable=not progress, leave=False)
            losses, correct, seen = [], 0, 0
            for step, (images, labels) in enumerate(bar):
                if step == steps_per_epoch:
                    break
                images, labels = images.to(device), torch.as_tensor(labels).to(device)
                logits = classifier(images)
                loss = F.cross_entropy(logits, labels)
                if not torch.isfinite(loss):
                    where = f"{log.last_path} (epoch {start})" if start else "none was written yet"
                    raise NonFiniteLossError(
                        f"pretraining loss is {loss.item()} at epoch {epoch}, step {step + 1}: lower --lr. "
                        f"The last good checkpoint is {where}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100.0 * correct / seen:.1f}")
            result = evaluate(nearest_centroid(backbone), benchmark.val, val_config, progress=False)
            log.append({"epoch": epoch, "loss": sum(losses) / len(losses), "accuracy": 100.0 * correct / seen,
                        "lr": optimizer.param_groups[0]["lr"], "val_accuracy": result.mean,
                        "val_ci95": result.ci95})
            if progress:
                tqdm.write(f"pretrain epoch {epoch}: loss {log.rows[-1]['loss']:.3f}, val {result}")
            if result.mean > best_accuracy:
                best_accuracy = result.mean
                save_checkpoint({"kind": CHECKPOINT_KIND, "model": info, "config": asdict(config),
                                 "epoch": epoch, "val_accuracy": result.mean,
                                 "backbone": backbone.state_dict()}, log.best_path)
            save_checkpoint({"kind": CHECKPOINT_KIND, "model": info, "config": asdict(config), "epoch": epoch,
                             "classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                             "best_accuracy": best_accuracy, "metrics": log.rows}, log.last_path)
            log.write(curve=("epoch", "val_accuracy"))
            start = epoch
    return load_pretrained(log.best_path, device)
