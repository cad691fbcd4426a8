"""Matching Networks (Vinyals et al., NeurIPS 2016) as a benchmark method.

A query is labelled by attention over the support set: the softmax of the
cosine similarities between its embedding f(x̂, S) and the support embeddings
g(x_i, S) weighs the support labels, ŷ = Σ_i a(x̂, x_i) y_i. Both embeddings
start from one Conv4 (64 filters). With the full context embeddings (FCE,
``MatchingNetConfig.fce``) they also depend on the whole support set S:

* g(x_i, S) = h→_i + h←_i + g'(x_i): a bidirectional LSTM reads the support
  embeddings g'(x_i) in the order given and its two hidden states are added to
  the skip connection;
* f(x̂, S) = attLSTM(f'(x̂), g(S), K): an LSTM whose recurrent input is
  [h_{k-1}, r_{k-1}] runs K read steps on the constant input f'(x̂); each step
  reads r_{k-1} = Σ_i softmax(h_{k-1}ᵀ g(x_i, S)) g(x_i, S) and sets
  h_k = ĥ_k + f'(x̂). The result is h_K.

Readings of the paper where it leaves a choice:

* An LSTM with recurrent input [h, r] has gates W_x x + W_h [h, r] + b; an
  ``nn.LSTMCell`` on the input [f'(x̂), r] with hidden state h has the same
  parameters and the same gates, so that is what runs here.
* h_0 = f'(x̂) (as if ĥ_0 = 0) and c_0 = 0, so r_0 already reads the support set.
* K = 5 read steps (the paper does not give K for its image tasks).
* The loss is the negative log of ŷ at the true class; :meth:`MatchingNet.predict`
  returns log ŷ, whose softmax is ŷ itself.
* Adam at 1e-3 on tasks of the test's ways and shots (training "matches" test).

Example::

    from mtl_plugin.bench.methods.matchingnet import MatchingNet, MatchingNetConfig
    method = MatchingNet(MatchingNetConfig.quick())
    method.fit(context)
    logits = method.predict(support_x, support_y, query_x, ways=5)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugin.backbones import conv4
from mtl_plugin.bench.methods.base import BenchContext
from mtl_plugin.bench.methods.episodic import EpisodicMethod

__all__ = ["MatchingNet", "MatchingNetConfig", "MatchingNetModel"]


@dataclass
class MatchingNetConfig:
    """Matching Networks' settings: 64-filter Conv4, FCE on, Adam 1e-3.

    Example::

        config = MatchingNetConfig()              # FCE on, 5 read steps
        config = MatchingNetConfig(fce=False)     # plain cosine attention
        quick = MatchingNetConfig.quick()         # `mtl bench --profile quick`
    """

    hidden: int = 64  # Conv4 filters
    fce: bool = True  # full context embeddings (bidirectional LSTM + attention LSTM)
    read_steps: int = 5  # K, the attention LSTM's steps (our choice: the paper gives none)
    lr: float = 1e-3
    train_queries: int = 15
    # One task per update. The paper gives no count; this budget is ours.
    max_episodes: int = 40_000
    checkpoint_every: int = 500
    # The fraction of the budget whose weights are averaged into the kept model (episodic.tail_average);
    # 0: the last iterate (paper).
    average_last: float = 0.0

    @classmethod
    def quick(cls) -> MatchingNetConfig:
        """300 episodes for ``mtl bench --profile quick`` (28 px, 2 CPU cores): the quick bench
        compares Matching Networks with MTL by over ten points, so its minutes go to the rows the
        claims compare closely.

        Departs from the defaults where half a minute of training calls for it:

        * ``read_steps=1`` (default: 5): after a short run, five read steps scored below FCE
          switched off, and one step above it;
        * ``train_queries=5`` (tests: 15): cheaper episodes;
        * ``average_last=0.25`` (paper: the last iterate): the mean of the last quarter's weights
          keeps the 5-shot cell within its CI when floats change, and scores higher.

        Measurements: docs/profiles.md#matchingnet
        """
        return replace(cls(), read_steps=1, train_queries=5, max_episodes=300, checkpoint_every=100, average_last=0.25)


class MatchingNetModel(nn.Module):
    """Embeddings f and g with optional full context embeddings, and the attention classifier.

    Example::

        model = MatchingNetModel(channels=1, image_size=28, config=MatchingNetConfig())
        logits = model(support_x, support_y, query_x, ways=5)   # log ŷ, (queries, 5)
    """

    def __init__(self, channels: int, image_size: int, config: MatchingNetConfig):
        super().__init__()
        self.config = config
        self.encoder = conv4(in_channels=channels, hidden=config.hidden, image_size=image_size)
        dim = self.encoder.feature_dim
        if config.fce:
            self.support_lstm = nn.LSTM(dim, dim, bidirectional=True)
            self.query_lstm = nn.LSTMCell(2 * dim, dim)

    def support_embedding(self, support: torch.Tensor) -> torch.Tensor:
        """g(x_i, S) for every support feature g'(x_i) (rows of ``support``), in set order.

        Without FCE it is g'(x_i) itself.
        """
        if not self.config.fce:
            return support
        states, _ = self.support_lstm(support.unsqueeze(1))
        forward, backward = states.squeeze(1).chunk(2, dim=1)
        return forward + backward + support

    def query_embedding(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """f(x̂, S): K attention-LSTM reads of the support embeddings ``support`` = g(S)."""
        if not self.config.fce:
            return query
        h, c = query, torch.zeros_like(query)
        for _ in range(self.config.read_steps):
            read = torch.softmax(h @ support.T, dim=1) @ support
            h_hat, c = self.query_lstm(torch.cat([query, read], dim=1), (h, c))
            h = h_hat + query
        return h

    def forward(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int
    ) -> torch.Tensor:
        features = self.encoder(torch.cat([support_x, query_x]))
        support = self.support_embedding(features[: len(support_x)])
        query = self.query_embedding(features[len(support_x) :], support)
        attention = torch.softmax(F.normalize(query, dim=1) @ F.normalize(support, dim=1).T, dim=1)
        probabilities = attention @ F.one_hot(support_y.long(), ways).to(attention.dtype)
        return probabilities.clamp_min(1e-12).log()


class MatchingNet(EpisodicMethod):
    """Matching Networks trained episodically from scratch (``mtl bench --methods matchingnet``).

    Example::

        method = MatchingNet(MatchingNetConfig.quick())
        method.fit(context)  # resumes from context.work_dir / "checkpoint.pt"
        logits = method.predict(support_x, support_y, query_x, ways=5)
    """

    name: ClassVar[str] = "matchingnet"

    def __init__(self, config: MatchingNetConfig | None = None):
        self.config = config or MatchingNetConfig()
        super().__init__()
        self.backbone_label = f"conv4-{self.config.hidden}" + (" + FCE" if self.config.fce else "")

    def build_model(self, context: BenchContext) -> MatchingNetModel:
        return MatchingNetModel(context.benchmark.channels, context.benchmark.image_size, self.config)

    def episode_loss(self, output: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        # The model returns log-probabilities: the attention's softmax is part of the method.
        return F.nll_loss(output, query_y)
