"""``ray start`` for a worker node on this machine's loopback (run by ``LocalHead.add_node``).

The test cluster runs with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` so that every process reports 127.0.0.1 as its
address (no traffic leaves loopback). Plain ``ray start --address`` refuses to join a head in that mode, and with
it off would rewrite ``127.0.0.1`` in the head's address to the machine's routable address. Here only this
process joins as if multi-node were on, with the loopback address kept; its raylet and workers keep the mode.
"""

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services

ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda address=None: "127.0.0.1"

from ray.scripts.scripts import main  # noqa: E402  (after the two settings above)

if __name__ == "__main__":
    sys.argv[0] = "ray"
    sys.exit(main())
