"""Quality proxies: a cheap, honest estimate of how good a candidate architecture is.

    from nas.quality import QualitySettings, score, cache_key
    result = score(spec, "mad", device="cuda", settings=QualitySettings.default(), seed=0)
    result.score                       # higher is better
    result.detail["task_accuracy"]     # per task; also lr, steps, tokens, wall_s, device, ...

A candidate is scored through its *proxy* (`nas.quality.proxy`): the same layout and
operators (layers, attention placement, head and KV-head counts, conv kernel, SWA window)
at `settings.width_factor` of the width, with a task vocabulary, trained for a fixed
budget with a small learning-rate sweep (best of). Two kinds of score:

* `"mad"` -- mean accuracy over six synthetic tasks (`nas.quality.tasks`, after MAD and
  Zoology's MQAR): in-context recall, noisy and fuzzy recall, selective copying,
  compression, memorisation.
* `"lm"` -- minus the bits per byte on held-out Python-stdlib text (`lfm2.corpus`) after a
  short byte-level training run.
* `"layout"` -- no proxy, no training: minus the bits per byte a long reference run would
  reach, predicted from the layout and parameter count by a fit shipped as data
  (`nas.quality.layout`). The search's default: in BENCHMARKS.md's fidelity runs no trained
  proxy ranked architectures better than such free signals.

Stopping hopeless candidates early. Optuna 5.0's pruners do not work for multi-objective
studies: `Trial.report` and `Trial.should_prune` raise `NotImplementedError("... is not
supported for multi-objective optimization.")` (checked in optuna/trial/_trial.py). So
`score` takes its own `report(step, value)` callback instead: it is called with
intermediate scores (after the learning-rate sweep, then every `eval_every` steps), and
when it returns something truthy the training stops and the last value is the result
(`detail["stopped_early"]`). The search may implement any rule there (for example a median
rule over earlier candidates' curves, kept in the driver or a user attr, never via
`trial.report`). Inside `score`, hopeless *learning rates* are dropped after the first
`sweep_fraction` of the budget (successive halving with one survivor), and a run whose
loss becomes non-finite stops at once with the worst score.
"""

from lfm2.lazy import lazy_attributes

# Loaded on first use (PEP 562): scoring needs torch, which `lfm2-nas --help` (it imports the
# `quality` command's module, a submodule of this package) must not pay for.
_LAZY = {
    "proxy_spec": "nas.quality.proxy",
    "KINDS": "nas.quality.scoring",
    "FREE_KINDS": "nas.quality.scoring",
    "signal_version": "nas.quality.scoring",
    "QUALITY_VERSION": "nas.quality.scoring",
    "QualityResult": "nas.quality.scoring",
    "cache_key": "nas.quality.scoring",
    "score": "nas.quality.scoring",
    "QualitySettings": "nas.quality.settings",
    "SettingsError": "nas.quality.settings",
    "TASKS": "nas.quality.tasks",
    "TaskBatch": "nas.quality.tasks",
    "TaskConfig": "nas.quality.tasks",
    "TaskError": "nas.quality.tasks",
    "generate": "nas.quality.tasks",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "score",
    "cache_key",
    "QualityResult",
    "QualitySettings",
    "SettingsError",
    "KINDS",
    "FREE_KINDS",
    "signal_version",
    "QUALITY_VERSION",
    "TASKS",
    "TaskConfig",
    "TaskBatch",
    "TaskError",
    "generate",
    "proxy_spec",
]
