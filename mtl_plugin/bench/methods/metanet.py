"""Meta Networks (MetaNet; Munkhdalai & Yu, ICML 2017) as a benchmark method.

MetaNet adapts to a task in one forward pass. Its meta learners read the
gradients of the base learner's loss (the "meta information") and turn them
into fast weights that are added to the slow weights by layer augmentation:

* ``u`` (dynamic representation learner, slow weights Q) computes the
  representation loss on the support set; its preprocessed gradients run
  through ``d`` (a coordinate-wise LSTM) to give the task-level fast weights Q*.
* ``b`` (base learner, slow weights W) computes the task loss on each support
  example; its preprocessed gradients run through ``m`` (a coordinate-wise MLP)
  to give the example-level fast weights W*_i, stored in memory under the key
  r'_i = u(x'_i; Q, Q*).
* A query reads its fast weights as the softmax over the cosine similarities of
  its key u(x; Q, Q*) with the stored keys, and ``b`` classifies it with the
  slow and the read fast weights. Everything is trained end to end on the
  query cross-entropy with Adam (1e-3) and gradient-norm clipping at 10.
  The quick profile also learns a scale of the read's cosines, decays the
  learning rate and keeps the mean of the last weights (see
  :meth:`MetaNetConfig.quick`).

Readings of the paper where it leaves a choice (the simplest faithful one,
each also what the authors' Chainer code does unless said otherwise):

* Meta information is an input: gradients are detached before preprocessing
  (log magnitude and sign, Andrychowicz et al. 2016, k = 7), so no
  second-order terms are formed.
* ``m`` and ``d`` are shared by every coordinate of every augmented layer.
  ``m`` is 2 -> 20 -> 20 -> 1 with ReLU; ``d`` is an LSTM with 20 units and a
  20 -> 1 output map whose output after the last step is Q*.
* Layer augmentation covers the last ``augmented_layers`` layers, three as
  the paper describes its Omniglot networks (the authors' "Full" variant
  augments every layer): the last conv layer, the hidden linear layer and
  the classifier of ``b``, and the same layers of ``u`` but its classifier
  head, which only serves the representation loss and never reaches a key
  (the authors' code computes that head's fast weights and never uses them).
  Fast weights replace weight matrices only; biases stay slow.
* ``d`` reads T = ``representation_steps`` (5) gradients: the support set is
  cut into T consecutive chunks and each step sees one chunk's mean loss.
  With one shot the loss is cross-entropy on ``u``'s classifier head; with
  more shots it is the contrastive loss (Hadsell et al. 2006) on the keys of
  every pair of support examples, the pairs dealt round-robin to the T steps.
* Both networks have ``max_ways`` (20) output units; a task with fewer ways
  uses the first ``ways`` of them, so one model serves any number of ways up
  to ``max_ways``.
* Weights of b and u start with He initialisation (our choice: without batch
  norm the default initialisation shrinks activations layer by layer).
* Pooling rounds up (``ceil_mode``), as Chainer's default does, so that five
  2x2 poolings take 28 px to 1 px (28 -> 14 -> 7 -> 4 -> 2 -> 1).
* The meta learners' output layers start at 1/1000 of their default scale
  with a bias of 1e-3, so that fast weights start small and positive and the
  ReLU(fast h) units start alive (our choice; the paper does not say).

Example::

    from mtl_plugin.bench.methods.metanet import MetaNet, MetaNetConfig
    method = MetaNet(MetaNetConfig.quick())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.episodic import EpisodicMethod

__all__ = [
    "MetaNet",
    "MetaNetConfig",
    "MetaNetModel",
    "LayerAugmentedConvNet",
    "CoordinateMLP",
    "CoordinateLSTM",
    "preprocess_gradients",
    "read_memory",
    "contrastive_loss",
]


@dataclass
class MetaNetConfig:
    """MetaNet's hyper-parameters; the defaults are the paper's Omniglot setting.

    Example::

        config = MetaNetConfig()                    # the paper's networks
        quick = MetaNetConfig.quick()               # `mtl bench --profile quick`: 450 episodes
        custom = MetaNetConfig(max_episodes=1000, train_queries=5)
    """

    filters: int = 64  # conv filters per layer in b and u
    conv_layers: int = 5
    hidden: int = 64  # width of the hidden linear layer (the key size of u)
    max_ways: int = 20  # output units of b and u; tasks use the first `ways`
    augmented_layers: int = 3  # the last 3 layers of b (and of u, but its classifier head)
    meta_hidden: int = 20  # hidden units of m and d
    gradient_k: float = 7.0  # Andrychowicz et al.'s preprocessing constant
    representation_steps: int = 5  # T: gradients that d reads per task
    contrastive_margin: float = 1.0
    # The memory read's softmax(s · cos): None is the paper's s = 1; a value, a scale s learned from it
    # (see MetaNetModel.attention_scale).
    attention_scale: float | None = None
    lr: float = 1e-3  # Adam
    gradient_clip: float = 10.0  # on the global gradient norm
    meta_batch: int = 1  # tasks per update (the paper gives no count)
    # The paper gives no count of updates; this budget is ours.
    max_episodes: int = 30_000
    train_queries: int = 15
    checkpoint_every: int = 500
    # The fraction of the budget over which lr decays to 0 (episodic.budget_decay); 0: constant (paper).
    budget_decay: float = 0.0
    # The fraction of the budget whose weights are averaged into the kept model (episodic.tail_average);
    # 0: the last iterate (paper).
    average_last: float = 0.0
    # Independent fits a bench cell averages (bench.methods.base.fit_count); 1: one fit, as a paper reports.
    fits: int = 1

    @classmethod
    def quick(cls) -> MetaNetConfig:
        """450 episodes for ``mtl bench --profile quick`` (28 px, 2 CPU cores). The quick bench
        compares MetaNet with MTL by a margin of over ten points, so its minutes go to the rows the
        claims compare closely, to bring ``make bench`` near 20 minutes. MetaNet learns slowly: the
        profile buys episodes with width, and still ends mid take-off, where a refit moves the cell
        by several points (docs/stability.md); longer runs score higher (900 episodes about nine
        points over 450 on val, 2,700 about eight over 900).

        * ``filters=32`` (paper: 64) and ``augmented_layers=2`` (paper: 3, the last conv too):
          about 1.7x and 2x cheaper per episode, so more episodes fit the minutes;
        * ``train_queries=5`` (paper and tests: 15): cheaper episodes; 15 unsettled 1-shot;
        * ``attention_scale=30`` (paper: a fixed 1; see :meth:`MetaNetModel.attention_scale`) and
          ``budget_decay=0.3`` (paper: a constant rate): without them training idles near chance
          and takes off when rounding lets it;
        * ``average_last=0.25`` (paper: the last iterate): the kept model is the mean of the last
          quarter's weights, not one noisy step;
        * ``fits=1``: a bench cell is one fit, as a paper reports; how far a refit moves it is
          measured once by ``benchmarks/float_spread.py`` (docs/stability.md).

        Every shot setting gets the same episodes (a budget of seconds would give 5-shot fewer).
        Measurements: docs/profiles.md#metanet
        """
        return replace(
            cls(),
            filters=32,
            augmented_layers=2,
            max_episodes=450,
            train_queries=5,
            checkpoint_every=100,
            attention_scale=30.0,
            budget_decay=0.3,
            average_last=0.25,
            fits=1,
        )


def preprocess_gradients(gradients: torch.Tensor, k: float = 7.0) -> torch.Tensor:
    """Andrychowicz et al.'s per-coordinate encoding: a trailing axis of (log magnitude, sign).

    Coordinates with ``|g| >= exp(-k)`` map to ``(log|g| / k, sign g)``, smaller
    ones to ``(-1, exp(k) g)``: gradients of very different scales give inputs
    of similar size.

    Example::

        g = torch.tensor([1e-5, -0.3])
        preprocess_gradients(g)      # shape (2, 2)
    """
    large = gradients.abs() >= math.exp(-k)
    magnitude = torch.where(large, gradients.abs().clamp_min(math.exp(-k)).log() / k, torch.full_like(gradients, -1.0))
    sign = torch.where(large, gradients.sign(), gradients * math.exp(k))
    return torch.stack([magnitude, sign], dim=-1)


def read_memory(
    query_keys: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft memory read: ``softmax(scale · cos(keys, query)) @ values`` for each query (the paper: scale 1).

    Returns ``(read, attention)``: ``read`` has shape (queries, value size) and
    each row of ``attention`` (queries, slots) is non-negative and sums to one,
    so every read is a convex combination of the stored values.

    Example::

        read, attention = read_memory(torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 100))
        read.shape, attention.shape   # (3, 100), (3, 5)
    """
    similarity = F.cosine_similarity(query_keys.unsqueeze(1), keys.unsqueeze(0), dim=-1)
    attention = (scale * similarity).softmax(dim=1)
    return attention @ values, attention


def contrastive_loss(
    embeddings: torch.Tensor, pairs: torch.Tensor, same: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Hadsell et al.'s contrastive loss, averaged over ``pairs`` (P, 2) of embedding rows.

    Pulls same-class pairs together (squared distance) and pushes other pairs
    at least ``margin`` apart.

    Example::

        e = torch.randn(4, 8)
        pairs = torch.tensor([[0, 1], [2, 3]])
        contrastive_loss(e, pairs, same=torch.tensor([True, False]))
    """
    squared = (embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]]).pow(2).sum(-1)
    # The epsilon keeps the square root differentiable for identical embeddings.
    apart = F.relu(margin - (squared + 1e-8).sqrt()).pow(2)
    return torch.where(same, squared, apart).mean()


def _conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.dim() == 5:
        # One kernel per example: a grouped convolution over the batch folded into channels.
        n = h.shape[0]
        out = F.conv2d(h.reshape(1, -1, *h.shape[2:]), weight.flatten(0, 1), padding=1, groups=n)
        return out.reshape(n, -1, *out.shape[2:])
    return F.conv2d(h, weight, bias, padding=1)


def _linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 3:
        return torch.einsum("ni,noi->no", h, weight)
    return h @ weight.t()


class LayerAugmentedConvNet(nn.Module):
    """MetaNet's Omniglot network (conv blocks, a hidden linear layer, a classifier) with layer augmentation.

    Layers are named ``conv1`` .. ``convN``, ``hidden`` and ``classifier``.
    ``forward`` takes optional fast weights per layer name, either one tensor
    of the layer's weight shape (shared by the batch) or one per example (a
    leading batch axis); an augmented hidden layer outputs
    ReLU(slow h) + ReLU(fast h) and the classifier sums the two linear outputs.

    Example::

        net = LayerAugmentedConvNet(channels=1, image_size=28, outputs=5)
        fast = {"classifier": torch.zeros(4, 5, 64)}          # one per example
        net(torch.randn(4, 1, 28, 28), fast).shape             # (4, 5)
        net(torch.randn(4, 1, 28, 28), stop="hidden").shape    # (4, 64)
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        outputs: int,
        filters: int = 64,
        conv_layers: int = 5,
        hidden: int = 64,
    ):
        super().__init__()
        layers: dict[str, nn.Module] = {}
        size = image_size
        for index in range(conv_layers):
            layers[f"conv{index + 1}"] = nn.Conv2d(channels if index == 0 else filters, filters, 3, padding=1)
            size = math.ceil(size / 2)
        layers["hidden"] = nn.Linear(filters * size * size, hidden, bias=False)
        layers["classifier"] = nn.Linear(hidden, outputs, bias=False)
        self.layers = nn.ModuleDict(layers)
        # Without batch norm, PyTorch's default init shrinks the signal about sqrt(3)-fold per
        # layer, and training crawls at first: He init keeps ReLU activations at scale.
        for layer in self.layers.values():
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    @property
    def layer_names(self) -> list[str]:
        """Layer names from input to output."""
        return list(self.layers.keys())

    def forward(
        self,
        x: torch.Tensor,
        fast: dict[str, torch.Tensor] | None = None,
        start: str | None = None,
        stop: str | None = None,
    ) -> torch.Tensor:
        """Run the layers from ``start`` (``x`` is its input) through ``stop`` (inclusive)."""
        fast = fast or {}
        names = self.layer_names
        first = names.index(start) if start else 0
        last = names.index(stop) if stop else len(names) - 1
        h = x
        for name in names[first : last + 1]:
            h = self._layer(name, h, fast.get(name))
        return h

    def _layer(self, name: str, h: torch.Tensor, fast: torch.Tensor | None) -> torch.Tensor:
        layer = self.layers[name]
        if isinstance(layer, nn.Conv2d):
            out = F.relu(layer(h))
            if fast is not None:
                out = out + F.relu(_conv(h, fast))
            return F.max_pool2d(out, 2, ceil_mode=True)
        h = h.flatten(1)
        slow = _linear(h, layer.weight)
        fast_out = _linear(h, fast) if fast is not None else None
        if name == "classifier":
            return slow if fast_out is None else slow + fast_out
        out = F.relu(slow)
        return out if fast_out is None else out + F.relu(fast_out)


def _scale_output_layer(layer: nn.Linear, scale: float = 1e-3, offset: float = 1e-3) -> None:
    # Small fast weights at first, so training starts near the plain slow network; positive
    # ones, because the inputs of the augmented layers are ReLU outputs (>= 0) and fast
    # weights of one negative sign would leave every ReLU(fast h) unit dead, with no
    # gradient ever reaching m or d.
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.fill_(offset)


class CoordinateMLP(nn.Module):
    """The example-level meta learner ``m``: preprocessed gradient coordinates -> fast weights.

    Example::

        m = CoordinateMLP(hidden=20)
        m(torch.randn(5, 1000, 2)).shape     # (5, 1000): one fast weight per coordinate
    """

    def __init__(self, hidden: int = 20):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        _scale_output_layer(self.net[-1])

    def forward(self, meta_information: torch.Tensor) -> torch.Tensor:
        """Map (..., 2) preprocessed gradients to (...) fast weights."""
        return self.net(meta_information).squeeze(-1)


class CoordinateLSTM(nn.Module):
    """The task-level meta learner ``d``: a sequence of preprocessed gradients -> fast weights.

    Example::

        d = CoordinateLSTM(hidden=20)
        d(torch.randn(5, 1000, 2)).shape     # (1000,): T = 5 steps in, the last step's output out
    """

    def __init__(self, hidden: int = 20):
        super().__init__()
        self.lstm = nn.LSTM(2, hidden)
        self.output = nn.Linear(hidden, 1)
        _scale_output_layer(self.output)

    def forward(self, meta_information: torch.Tensor) -> torch.Tensor:
        """Map (steps, coordinates, 2) preprocessed gradients to (coordinates,) fast weights."""
        states, _ = self.lstm(meta_information)
        return self.output(states[-1]).squeeze(-1)


def _flatten(tensors: dict[str, torch.Tensor], names: Sequence[str], batch_dims: int) -> torch.Tensor:
    return torch.cat([tensors[name].flatten(batch_dims) for name in names], dim=-1)


def _unflatten(flat: torch.Tensor, net: LayerAugmentedConvNet, names: Sequence[str]) -> dict[str, torch.Tensor]:
    shapes = [net.layers[name].weight.shape for name in names]
    pieces = flat.split([math.prod(shape) for shape in shapes], dim=-1)
    batch = flat.shape[:-1]
    return {name: piece.reshape(*batch, *shape) for name, piece, shape in zip(names, pieces, shapes)}


def _weight_gradients(
    net: LayerAugmentedConvNet,
    names: Sequence[str],
    loss_of_output,
    h: torch.Tensor,
    stop: str | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of ``loss_of_output(net(h, start=names[0], stop=stop))`` w.r.t. the named slow weights."""
    weights = {f"layers.{name}.weight": net.layers[name].weight.detach() for name in names}

    def loss(w):
        out = functional_call(net, w, (h,), {"start": names[0], "stop": stop})
        return loss_of_output(out)

    return {name: g for name, g in zip(names, grad(loss)(weights).values())}


class MetaNetModel(nn.Module):
    """Base learner ``b``, representation learner ``u`` and meta learners ``m`` and ``d``.

    ``forward(support_x, support_y, query_x, ways)`` runs Algorithm 1 of the
    paper on one task and returns the query logits (queries, ways).

    Example::

        model = MetaNetModel(channels=1, image_size=28, config=MetaNetConfig())
        xs, ys = torch.randn(5, 1, 28, 28), torch.arange(5)
        logits = model(xs, ys, torch.randn(10, 1, 28, 28), ways=5)   # (10, 5)
    """

    def __init__(self, channels: int, image_size: int, config: MetaNetConfig):
        super().__init__()
        if not 2 <= config.augmented_layers <= config.conv_layers + 2:
            raise ValueError(
                f"augmented_layers={config.augmented_layers} must be between 2 (hidden and classifier) "
                f"and conv_layers + 2 = {config.conv_layers + 2} (every layer)"
            )
        self.config = config

        def network() -> LayerAugmentedConvNet:
            return LayerAugmentedConvNet(
                channels, image_size, config.max_ways, config.filters, config.conv_layers, config.hidden
            )

        self.base = network()  # b, slow weights W
        self.representation = network()  # u, slow weights Q
        self.example_meta = CoordinateMLP(config.meta_hidden)  # m, weights Z
        self.task_meta = CoordinateLSTM(config.meta_hidden)  # d, weights G
        self.base_augmented = self.base.layer_names[-config.augmented_layers :]
        # u's key is its hidden layer: its classifier head serves only the representation loss.
        self.representation_augmented = self.base_augmented[:-1]
        # Learned in log space, so that it stays positive; registered last, so that the other
        # parameters draw the same initial values with it or without it.
        self.log_attention_scale = (
            None if config.attention_scale is None else nn.Parameter(torch.tensor(math.log(config.attention_scale)))
        )

    def attention_scale(self) -> float | torch.Tensor:
        """The scale s of the memory read's softmax(s · cos): 1 (the paper's), or the learned one.

        u's keys are ReLU outputs, so the cosine of two keys lies in [0, 1], and early in training the
        keys of a task's support examples are nearly parallel (mean cosine 0.9-0.97 on kanji, measured
        every 100 episodes up to 600): softmax(cos) then reads every slot with about the same weight
        (largest weight 0.21-0.24 of five for the first 600 episodes), the read carries next to nothing
        about which support example a query matches, and d and u get almost no gradient (d's gradient
        norm below 1e-3). Training then idles near chance until the keys drift apart, and when that
        happens depends on float rounding (the same seed reached 36 % on one thread and 24 % on two). A
        learned scale, as cosine classifiers use, lets the read sharpen from the start.
        """
        return 1.0 if self.log_attention_scale is None else self.log_attention_scale.exp()

    def forward(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Query logits (len(query_x), ways) after one-pass adaptation to the support set."""
        if not 1 <= ways <= self.config.max_ways:
            raise ValueError(f"ways={ways} must be between 1 and max_ways={self.config.max_ways}")
        support_y = support_y.long()
        shots = int(torch.bincount(support_y, minlength=ways).max())
        n = len(support_x)
        # Support and queries share each network's slow trunk: one batch instead of two.
        images = torch.cat([support_x, query_x])
        u, b = self.representation, self.base
        u_features = self._trunk(u, self.representation_augmented, images)
        b_features = self._trunk(b, self.base_augmented, images)

        task_fast = self.task_fast_weights(u_features[:n].detach(), support_y, ways, shots)
        keys = u(u_features, task_fast, start=self.representation_augmented[0], stop="hidden")
        memory = self.example_fast_weights(b_features[:n].detach(), support_y, ways)
        read, _ = read_memory(keys[n:], keys[:n], memory, self.attention_scale())
        fast = _unflatten(read, b, self.base_augmented)
        return b(b_features[n:], fast, start=self.base_augmented[0])[:, :ways]

    def task_fast_weights(
        self, support_features: torch.Tensor, support_y: torch.Tensor, ways: int, shots: int
    ) -> dict[str, torch.Tensor]:
        """Q* = d(gradients of the representation loss on T chunks of the support set).

        ``support_features`` is the input of u's first augmented layer.
        """
        u, names, h = self.representation, self.representation_augmented, support_features
        n = len(h)
        steps = min(self.config.representation_steps, n if shots == 1 else n * (n - 1) // 2)
        with torch.no_grad():
            gradients = []
            if shots == 1:
                for chunk in torch.arange(n, device=h.device).tensor_split(steps):

                    def cross_entropy(out, labels=support_y[chunk]):
                        return F.cross_entropy(out[:, :ways], labels)

                    gradients.append(_weight_gradients(u, names, cross_entropy, h[chunk]))
            else:
                pairs = torch.combinations(torch.arange(n, device=h.device), r=2)
                same = support_y[pairs[:, 0]] == support_y[pairs[:, 1]]
                for step in range(steps):
                    chosen = torch.arange(step, len(pairs), steps, device=h.device)

                    def contrastive(out, p=pairs[chosen], s=same[chosen]):
                        return contrastive_loss(out, p, s, self.config.contrastive_margin)

                    gradients.append(_weight_gradients(u, names, contrastive, h, stop="hidden"))
            sequence = torch.stack([_flatten(g, names, 0) for g in gradients])
            meta_information = preprocess_gradients(sequence, self.config.gradient_k)
        return _unflatten(self.task_meta(meta_information), u, names)

    def example_fast_weights(self, support_features: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
        """Memory values M: one flat W*_i = m(gradient of b's task loss on x'_i) per support example.

        ``support_features`` is the input of b's first augmented layer.
        """
        b, names = self.base, self.base_augmented
        with torch.no_grad():

            def per_example(h_i, y_i):
                gradients = _weight_gradients(
                    b, names, lambda out: F.cross_entropy(out[:, :ways], y_i[None]), h_i[None]
                )
                return _flatten(gradients, names, 0)

            meta_information = preprocess_gradients(
                vmap(per_example)(support_features, support_y), self.config.gradient_k
            )
        return self.example_meta(meta_information)

    @staticmethod
    def _trunk(net: LayerAugmentedConvNet, augmented: Sequence[str], x: torch.Tensor) -> torch.Tensor:
        """The input of the first augmented layer (slow weights only below it)."""
        position = net.layer_names.index(augmented[0])
        return net(x, stop=net.layer_names[position - 1]) if position > 0 else x


class MetaNet(EpisodicMethod):
    """Meta Networks trained episodically from scratch (``mtl bench --methods metanet``).

    Example::

        method = MetaNet(MetaNetConfig.quick())
        method.fit(context)  # resumes from context.work_dir / "checkpoint.pt"
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "metanet"

    def __init__(self, config: MetaNetConfig | None = None):
        self.config = config or MetaNetConfig()
        super().__init__()
        self.backbone_label = f"conv{self.config.conv_layers}-{self.config.filters} (b, u)"

    def build_model(self, context: BenchContext) -> MetaNetModel:
        if context.ways > self.config.max_ways:
            raise ValueError(
                f"ways={context.ways} exceeds MetaNetConfig.max_ways={self.config.max_ways}; "
                f"raise max_ways to at least {context.ways}"
            )
        return MetaNetModel(context.benchmark.channels, context.benchmark.image_size, self.config)
