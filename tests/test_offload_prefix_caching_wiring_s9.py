"""An engine's offload layer knows whether prefix caching is on (vLLM tracks other requests' loads, and holds a
lookup back for them, only with prefix caching on; tests/test_offload_store_jobs_s9.py has the behaviour)."""
from __future__ import annotations

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.instance import InstanceSpec
from tests.test_connectors_v033 import deployment


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_the_offload_layer_is_built_with_the_engines_prefix_caching(prefix_caching):
    d = deployment(kv_offloading_size=1, enable_prefix_caching=prefix_caching)
    sim = build_cluster(ClusterSpec([InstanceSpec("a", d, (d.model.name,))]))
    (engine,) = sim.engines
    assert engine.kv.offload.prefix_caching is prefix_caching
