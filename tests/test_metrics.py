"""The bulk histogram observation of the per-image metrics gives exactly what prometheus_client's own ``observe``
gives, one value at a time: same buckets (values on a bound included), same count and sum, NaN in no bucket."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from ttaserve.server.metrics import observe_all

BUCKETS = tuple(i / 20 for i in range(1, 21))


def samples(values: np.ndarray, bulk: bool) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    child = Histogram("probe", "probe", ("model",), buckets=BUCKETS, registry=registry).labels("m")
    if bulk:
        observe_all(child, values)
    else:
        for value in values.tolist():
            child.observe(value)
    (family,) = registry.collect()
    return {(s.name, s.labels.get("le", "")): s.value for s in family.samples if not s.name.endswith("_created")}


@pytest.mark.parametrize("count", [1, 8, 9, 64, 1000])
def test_bulk_observation_matches_one_at_a_time(count: int) -> None:
    rng = np.random.default_rng(count)
    values = rng.random(count).astype(np.float32)
    values[: count // 4] = rng.choice(np.asarray(BUCKETS, np.float32), count // 4)  # exactly on a bound
    bulk, single = samples(values, bulk=True), samples(values, bulk=False)
    assert bulk.keys() == single.keys()
    for key, value in single.items():
        assert bulk[key] == pytest.approx(value, rel=1e-6), key
    assert bulk[("probe_count", "")] == count


def test_nan_is_counted_and_summed_but_lands_in_no_bucket() -> None:
    values = np.linspace(0.0, 1.0, 20, dtype=np.float32)
    values[3] = np.nan
    bulk, single = samples(values, bulk=True), samples(values, bulk=False)
    assert bulk[("probe_bucket", "+Inf")] == single[("probe_bucket", "+Inf")] == 19
    assert np.isnan(bulk[("probe_sum", "")]) and np.isnan(single[("probe_sum", "")])
