"""JAX test configuration: 8 host CPU devices for the sharding tests.

``XLA_FLAGS`` must be set before jax is imported, so it is set here, at
collection time, as the tox ``jax`` environment also does.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
