"""Writing drift metrics to TensorBoard with ``torch.utils.tensorboard.SummaryWriter``.

Needs the ``tensorboard`` extra (``pip install 'rlweights[tensorboard]'``); without it,
importing this module raises ``rlweights.extras.MissingExtraError`` naming it.

Tags are those of ``rlweights.drift``: ``drift/<module>/<metric>`` for totals and
``drift/<module>/layers/<tensor>/<metric>`` per tensor. A custom-scalars layout (TensorBoard's
"Custom Scalars" tab) puts each module's per-tensor values of one metric on one chart.

```python
>>> from torch.utils.tensorboard import SummaryWriter
>>> logger = DriftLogger(SummaryWriter("runs/exp"), DriftMonitor({"critic": critic}))
>>> for step in range(steps):
...     train_step()
...     if step % 1000 == 0:
...         logger.log(step)

```
"""

from __future__ import annotations

from rlweights.extras import require

require("tensorboard", "tensorboard", "rlweights.tensorboard")

import json  # noqa: E402
import re  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from rlweights.drift import METRICS, DriftMonitor  # noqa: E402

__all__ = ["DriftLogger"]


class DriftLogger:
    """Measures a ``DriftMonitor`` and writes the values (and optionally histograms of
    the weights) to a ``SummaryWriter``; one host sync per ``log`` call."""

    def __init__(
        self,
        writer: SummaryWriter,
        monitor: DriftMonitor,
        histograms: bool = False,
        config: Mapping[str, Any] | None = None,
    ):
        self.writer = writer
        self.monitor = monitor
        self.histograms = histograms
        writer.add_custom_scalars(self.layout())
        if config is not None:
            text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
            writer.add_text("config", "```\n" + text + "\n```")

    def layout(self) -> dict:
        """TensorBoard custom-scalars layout: one category per module, one chart per metric."""
        layout = {}
        for name in self.monitor.modules:
            base = re.escape(f"drift/{name}/")
            charts = {
                metric: ["Multiline", [f"^{base}layers/.*/{metric}$"]]
                for metric in METRICS
                if metric != "target_distance" or name in self.monitor.targets
            }
            charts["totals"] = ["Multiline", [f"^{base}[a-z_]+$"]]
            layout[f"drift/{name}"] = charts
        return layout

    def log(self, step: int) -> dict[str, float]:
        """Measure, write every value at ``step``, and return them as floats."""
        metrics = self.monitor.measure()
        tags = list(metrics)
        tensors = [v.double() for v in metrics.values()]
        if len({t.device for t in tensors}) == 1:
            values = torch.stack(tensors).tolist()  # one device-to-host copy, one sync
        else:
            values = [t.item() for t in tensors]
        out = dict(zip(tags, values, strict=True))
        for tag, value in out.items():
            self.writer.add_scalar(tag, value, step)
        if self.histograms:
            for name, module in self.monitor.modules.items():
                for param_name, p in module.named_parameters():
                    self.writer.add_histogram(f"weights/{name}/{param_name}", p.detach(), step)
        return out
