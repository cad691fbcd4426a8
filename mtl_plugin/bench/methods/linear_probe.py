"""Linear probe on the pretrained backbone (Tian et al., ECCV 2020, "RFS-simple").

"Rethinking few-shot image classification: a good embedding is all you need?":
no meta-training. The bench's pretrained backbone embeds each task's support
set, the features are L2-normalised, and a multinomial logistic regression is
fitted on them alone (inductive: the queries play no part in the fit); the
(L2-normalised) queries are then classified by it.

RFS fits scikit-learn's ``LogisticRegression(penalty='l2', C=1.0,
solver='lbfgs', max_iter=1000, multi_class='multinomial')``.
:func:`fit_logistic_regression` minimises the same objective in torch,

    C · Σ_i CE(W x_i + b, y_i) + ½ ‖W‖²     (the intercept b is not penalised),

with L-BFGS and a strong-Wolfe line search, from W = 0 and b = 0: no random draw.

Example::

    method = LinearProbe(LinearProbeConfig())
    method.fit(context)  # takes a copy of context.pretrained_backbone()
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mtl_plugin.bench.methods.base import TestTimeMethod
from mtl_plugin.prototypes import embed

__all__ = ["LinearProbe", "LinearProbeConfig", "fit_logistic_regression", "logistic_regression_objective"]


def _check_settings(C: float, max_iter: int, tolerance: float) -> None:
    if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise ValueError(f"C={C!r} must be a finite number > 0 (the inverse strength of the L2 penalty)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0")


@dataclass
class LinearProbeConfig:
    """RFS's logistic regression: scikit-learn's defaults, with ``max_iter=1000``.

    Attributes:
        C: inverse strength of the L2 penalty on the weights (not on the intercept).
        max_iter: most L-BFGS iterations per task.
        tolerance: stop once every entry of the gradient of the objective divided by
            ``C · n`` (scikit-learn's scaling; ``n`` support examples) is at most this
            in absolute value, as scikit-learn's ``tol`` does for its lbfgs solver.

    Raises:
        ValueError: ``C`` <= 0 or not finite, ``max_iter`` < 1, or ``tolerance`` < 0.

    Example::

        config = LinearProbeConfig(C=10.0)   # a weaker penalty: fits the support more tightly
    """

    C: float = 1.0
    max_iter: int = 1000
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        _check_settings(self.C, self.max_iter, self.tolerance)

    @classmethod
    def quick(cls) -> LinearProbeConfig:
        """There is nothing to meta-train, so the quick profile is the paper's setting."""
        return cls()


def logistic_regression_objective(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, C: float = 1.0
) -> torch.Tensor:
    """``C · Σ_i CE(W x_i + b, y_i) + ½ ‖W‖²``, the objective :func:`fit_logistic_regression` minimises.

    Args:
        weight: ``W``, shape (classes, feature_dim).
        bias: ``b``, shape (classes,); not penalised.
        features: ``x_i``, shape (n, feature_dim).
        labels: ``y_i``, integers in 0..classes-1, shape (n,).
        C: inverse strength of the L2 penalty.

    Returns:
        A scalar tensor, differentiable in ``weight`` and ``bias``.

    Example::

        weight, bias = fit_logistic_regression(features, labels, classes=5)
        loss = logistic_regression_objective(weight, bias, features, labels)
    """
    cross_entropy = F.cross_entropy(features @ weight.T + bias, labels.long(), reduction="sum")
    return C * cross_entropy + 0.5 * weight.pow(2).sum()


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: int,
    C: float = 1.0,
    max_iter: int = 1000,
    tolerance: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS (RFS's classifier).

    Minimises :func:`logistic_regression_objective` in float64 on ``features``' device,
    from ``W = 0, b = 0`` (so the same inputs always give the same weights), with
    ``torch.optim.LBFGS`` and a strong-Wolfe line search. As in scikit-learn, the
    objective is divided by ``C · n`` while optimising (the same minimiser), and
    ``tolerance`` bounds the largest absolute entry of that scaled gradient. Only
    ``max_iter`` limits the work (each iteration's line search makes at most 25 evaluations).

    Args:
        features: (n, feature_dim) inputs; not normalised here.
        labels: (n,) integer labels covering every class 0..classes-1.
        classes: number of classes (rows of the weight).
        C: inverse strength of the L2 penalty on ``W`` (> 0); the intercept is not penalised.
        max_iter: most L-BFGS iterations (>= 1).
        tolerance: gradient tolerance (>= 0) of the scaled objective.

    Returns:
        ``(weight, bias)`` of shapes (classes, feature_dim) and (classes,), in
        ``features``' dtype and on its device: logits are ``x @ weight.T + bias``.

    Raises:
        ValueError: a bad ``C``, ``max_iter`` or ``tolerance``; ``features`` not 2-D or not
            finite; ``labels`` not one per row of ``features``; or a class of 0..classes-1
            without an example (its unpenalised intercept would have no finite optimum).

    Example::

        weight, bias = fit_logistic_regression(F.normalize(support_features, dim=1), support_y, classes=5)
        logits = F.normalize(query_features, dim=1) @ weight.T + bias
    """
    _check_settings(C, max_iter, tolerance)
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (examples, feature_dim); got shape {tuple(features.shape)}")
    if labels.dim() != 1 or len(labels) != len(features):
        raise ValueError(
            f"labels must be 1-D with one label per row of features ({len(features)}); got shape {tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or infinite values")
    labels = labels.to(features.device).long()
    if classes < 2 or bool(((labels < 0) | (labels >= classes)).any()):
        raise ValueError(
            f"labels must lie in 0..classes-1 with classes >= 2 (classes={classes}, "
            f"labels {sorted(set(labels.tolist()))})"
        )
    counts = torch.bincount(labels, minlength=classes)
    if bool((counts == 0).any()):
        raise ValueError(
            f"labels must cover every class 0..{classes - 1} (got counts {counts.tolist()}): "
            f"a class without an example has no finite intercept; pass classes equal to "
            f"the number of classes in the support set"
        )

    x = features.detach().to(torch.float64)
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, device=x.device, requires_grad=True)
    scale = 1.0 / (C * len(x))
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=25 * max_iter,
        tolerance_grad=tolerance,
        tolerance_change=64 * torch.finfo(torch.float64).eps,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = scale * logistic_regression_objective(weight, bias, x, labels, C)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().to(features.dtype), bias.detach().to(features.dtype)


class LinearProbe(TestTimeMethod):
    """A logistic regression on the L2-normalised pretrained features of each support set.

    Inductive: each query's logits depend on the support set and that query alone.

    Args:
        config: the regression's settings; ``None``: :class:`LinearProbeConfig` (RFS's).

    Example::

        method = LinearProbe(LinearProbeConfig())
        method.fit(context)  # takes a copy of context.pretrained_backbone()
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "linear-probe"

    def __init__(self, config: LinearProbeConfig | None = None):
        super().__init__()
        self.config = config or LinearProbeConfig()

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Fit the regression on the support set; return the query logits.

        Args:
            support_x: support images.
            support_y: their labels, covering every class 0..ways-1.
            query_x: query images.
            ways: number of classes.

        Returns:
            Logits of shape (len(query_x), ways), on ``query_x``'s device.

        Raises:
            RuntimeError: called before :meth:`fit`.
            ValueError: ``support_y`` misses a class of 0..ways-1.
        """
        backbone, config = self.frozen_backbone(), self.config
        support = F.normalize(embed(backbone, support_x).flatten(1), dim=1)
        query = F.normalize(embed(backbone, query_x).flatten(1), dim=1)
        weight, bias = fit_logistic_regression(support, support_y, ways, config.C, config.max_iter, config.tolerance)
        return (query @ weight.T + bias).to(query_x.device)
