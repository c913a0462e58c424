"""The routing the exported model runs, under the name its modeling code imports it by.

In an export directory ``pool_routing.py`` is ``megatron_null_moe/pool_routing.py``'s own
text; in the package the modeling code's ``from .pool_routing import`` lands here.
"""

from megatron_null_moe.pool_routing import (  # noqa: F401 (re-exported)
    real_experts_per_token,
    route_with_null_experts,
)
