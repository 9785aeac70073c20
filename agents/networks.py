"""The networks the native agents are built from: MLPs, the twin critic that SAC and TD3 share,
and the base of their actors (actions scaled to the bounds of a Box action space)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Container, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LAYER_NORM_EPS", "BoundedActor", "TwinQ", "dropped_units", "mlp"]


def mlp(sizes: Iterable[int], activate_last: bool = False) -> nn.Sequential:
    """Linear layers with ReLU between them (and after the last one if asked)."""
    sizes = list(sizes)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if activate_last or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dropped_units(size: int, rate: float, device: torch.device | str = "cpu") -> Tensor:
    """Where dropout at ``rate`` drops units in a tensor of ``size`` units: their flat
    positions, ascending, then positions >= ``size`` (to be ignored). Each unit is dropped
    independently with probability ``rate``, as ``F.dropout`` drops it, but drawn from the gaps
    between dropped units, which are geometric: about ``rate * size`` random numbers instead
    of ``size`` (DroQ's rate of 0.01: a hundredth; on the CPU, drawing every unit's number
    would cost more than the rest of DroQ's step). Enough gaps are drawn to pass the end with
    overwhelming probability; should they not, more are drawn (a longer tensor)."""
    mean = size * rate
    count = int(mean + 8 * math.sqrt(mean * (1 - rate)) + 16)
    per_log = 1 / math.log1p(-rate)

    def gaps() -> Tensor:  # geometric on 1, 2, ...: P(gap > k) = (1 - rate)^k
        uniform = torch.rand(count, dtype=torch.float64, device=device)
        return torch.floor(torch.log1p(-uniform) * per_log) + 1  # float64: the tail kept

    positions = gaps().cumsum(0) - 1  # a gap counts the units up to the dropped one
    while positions[-1] < size:  # not past the end yet (probability below 1e-15)
        positions = torch.cat([positions, positions[-1] + gaps().cumsum(0)])
    return positions.clamp_(max=size).long()


LAYER_NORM_EPS = 1e-6
"""The epsilon of the critics' layer normalisation (DroQ): flax's LayerNorm default, as SBX's DroQ
critics use it (torch's nn.LayerNorm default is 1e-5)."""


class TwinQ(nn.Module):
    """``n`` Q-networks evaluated together (two by default): every layer is one batched matmul
    for all of them. Each outputs ``out`` values (1: a Q-value; TQC: its quantiles).

    DroQ's critics (``dropout`` > 0, ``layer_norm``): each hidden layer's output goes through
    dropout (active in every evaluation, the target's too, as in DroQ and SBX), then layer
    normalisation with a learned scale and shift per network, then the ReLU. The units dropped
    are ``F.dropout``'s, or, given (``masks``, from ``draw_dropped`` and
    ``dropout_masks``), those drawn before the step: the same eagerly and compiled, and
    cheaper to draw.

    Weights are stored as (networks, inputs, outputs) so that ``baddbmm`` needs no transpose;
    ``unit_weights`` gives the (outputs, inputs) view of each network's layer that a
    per-unit constraint such as max-norm works on.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: tuple[int, ...],
        n: int = 2,
        out: int = 1,
        dropout: float = 0.0,
        layer_norm: bool = False,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TwinQ: dropout={dropout!r} is not a rate in [0, 1)")
        sizes = [in_dim, *hidden, out]
        self.hidden = tuple(hidden)
        self.dropout = float(dropout)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in itertools.pairwise(sizes):
            self.weights.append(nn.Parameter(torch.empty(n, n_in, n_out)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, n_out)))
        # the layer normalisations' scales and shifts, one per network and hidden layer
        self.norm_scales = nn.ParameterList()
        self.norm_shifts = nn.ParameterList()
        for size in hidden if layer_norm else ():
            self.norm_scales.append(nn.Parameter(torch.empty(n, 1, size)))
            self.norm_shifts.append(nn.Parameter(torch.empty(n, 1, size)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation for every network's layers: weights and biases
        uniform in +-1/sqrt(inputs), layer by layer (what ``rw.reinit_`` draws for them); the
        layer normalisations' scales 1 and shifts 0 (nn.LayerNorm's)."""
        for w, b in zip(self.weights, self.biases, strict=True):
            bound = 1 / math.sqrt(w.shape[1])
            w.uniform_(-bound, bound)
            b.uniform_(-bound, bound)
        for scale, shift in zip(self.norm_scales, self.norm_shifts, strict=True):
            scale.fill_(1.0)
            shift.zero_()

    def draw_dropped(self, batch: int, evaluations: int = 1) -> Tensor:
        """The units that dropout drops in ``evaluations`` evaluations of a batch of ``batch``
        inputs, drawn at once (``dropped_units``): positions in their hidden layers'
        outputs laid end to end, evaluation by evaluation, layer by layer, each output
        (networks, batch, units). ``dropout_masks`` makes the masks."""
        return dropped_units(evaluations * self._hidden_units(batch), self.dropout, self._device)

    def dropout_masks(self, dropped: Tensor, batch: int, evaluations: int) -> list[list[Tensor]]:
        """The masks of ``draw_dropped``'s units, per evaluation and hidden layer: 0 where
        a unit is dropped, ``1 / (1 - dropout)`` elsewhere (as ``F.dropout`` scales), each of
        its layer's output shape; one fill for all of them."""
        total = evaluations * self._hidden_units(batch)
        keep = torch.full((total + 1,), 1 / (1 - self.dropout), device=self._device)
        keep = keep.index_fill(0, dropped, 0.0)[:-1]  # the spare slot takes the positions past
        shapes = [(len(self.weights[0]), batch, size) for size in self.hidden]
        flat = keep.split([math.prod(shape) for shape in shapes] * evaluations)
        masks = [part.view(shape) for part, shape in zip(flat, shapes * evaluations, strict=True)]
        layers = len(shapes)
        return [masks[e * layers : (e + 1) * layers] for e in range(evaluations)]

    def _hidden_units(self, batch: int) -> int:
        return len(self.weights[0]) * batch * sum(self.hidden)

    @property
    def _device(self) -> torch.device:
        return self.weights[0].device

    def forward(
        self,
        x: Tensor,
        detach_weights: bool = False,
        first: int | None = None,
        masks: list[Tensor] | None = None,
    ) -> Tensor:
        """Q-values of shape (n, batch), or (n, batch, out) for ``out`` > 1.
        ``detach_weights``: gradients flow to ``x`` only (the actor's loss reads the critic
        without computing critic gradients it would discard).
        ``first``: evaluate only the first ``first`` networks (TD3's actor reads Q1 alone), of
        shape (first, batch).
        ``masks``: dropout's masks of the hidden layers (``dropout_masks``); without,
        ``F.dropout`` draws them."""
        n = len(self.weights[0]) if first is None else first

        def own(t: Tensor) -> Tensor:  # this evaluation's networks, detached if asked
            t = t if first is None else t[:first]
            return t.detach() if detach_weights else t

        h = x.unsqueeze(0).expand(n, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(own(b), h, own(w))
            if i == last:
                break
            if self.dropout > 0.0 and masks is None:
                h = F.dropout(h, self.dropout, training=True)
            elif self.dropout > 0.0:
                h = h * masks[i]
            if self.norm_scales:
                h = F.layer_norm(h, h.shape[-1:], eps=LAYER_NORM_EPS)
                h = torch.addcmul(own(self.norm_shifts[i]), h, own(self.norm_scales[i]))
            h = F.relu(h)
        return h.squeeze(-1) if h.shape[-1] == 1 else h

    def unit_weights(self, names: Container[str] | None = None) -> list[Tensor]:
        """Each network's layer weights as (outputs, inputs) views, of the layers named in
        ``names`` ("weights.1"; all if None)."""
        return [
            w[i].t()
            for k, w in enumerate(self.weights)
            if names is None or f"weights.{k}" in names
            for i in range(len(w))
        ]


class BoundedActor(nn.Module):
    """The base of the continuous actors: a squashed action in [-1, 1] is scaled to the action
    space's bounds [low, high]. ``scale`` and ``bias`` are buffers, saved with the weights."""

    def __init__(self, low, high):
        super().__init__()
        low = torch.as_tensor(low, dtype=torch.float32)
        high = torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("scale", (high - low) / 2)
        self.register_buffer("bias", (high + low) / 2)

    def to_bounds(self, squashed: Tensor) -> Tensor:
        """[-1, 1] -> [low, high]."""
        return squashed * self.scale + self.bias

    def clamp(self, actions: Tensor) -> Tensor:
        """Actions clipped to [low, high]."""
        return actions.clamp(self.bias - self.scale, self.bias + self.scale)
