"""The expand-route-ablate example in a small setting (~20-60 s on 2 loaded cores): ablating the
expanded units hurts the forget domain more than the retain domain, and far more than in the
control trained without routing masks."""
from __future__ import annotations

import math

from examples.gradient_routing import era


def test_era_localizes_the_forget_domain_into_the_expanded_units():
    results = era.run("test", verbose=False)
    delta = {f"{run}_{dom}": results[run][f"{dom}_after"] - results[run][f"{dom}_before"]
             for run in ("era", "control") for dom in ("forget", "retain")}
    assert all(math.isfinite(v) for v in delta.values()), delta
    assert delta["era_forget"] > 0.5, delta
    assert delta["era_forget"] > 1.5 * delta["era_retain"], delta
    assert delta["era_forget"] > 3 * delta["control_forget"], delta
    # zero-initialised expansion + no routing masks: the control's curves start where ERA's do
    assert results["era"]["curves"]["forget"][0] == results["control"]["curves"]["forget"][0]
