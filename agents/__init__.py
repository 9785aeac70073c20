"""Native RL agents built on rlweights, and the run machinery of ``rlweights train``.

One file per algorithm, each with its whole gradient step in one method: ``dqn``, ``sac``,
``td3``, ``ddpg``, ``tqc``, ``droq``. What they share: ``config`` (``AgentConfig``), ``agent``
(the base classes, ``minimize``), ``networks``, ``replay``, ``target_update``, ``compiled``,
``presets``. The run machinery: ``registry`` (the algorithms by name), ``train`` (the native
training loop), ``sb3_train`` (``--impl sb3``), ``sbx_train`` (``--impl sbx``), ``run`` (what
the runs share), ``evaluation``, ``checkpoint``, ``signals``, ``run_folder``, ``memory``,
``environments``, ``seeding``, ``side_by_side`` (several seeds at once); ``parallel``
(learners under torchrun), ``demo`` (``rlweights demo``) and ``cli`` (the ``rlweights train``
/ ``evaluate`` commands).

```python
>>> from rlweights.agents.registry import make_config
>>> from rlweights.agents.train import train
>>> agent, summary = train(make_config("sac", total_steps=10_000), "runs/my-sac")

```
"""

from rlweights.extras import require

require("gymnasium", "agents", "rlweights.agents")
