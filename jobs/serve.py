"""Ray job: deploy the OpenAI-compatible endpoint and leave it on the cluster (``raygpt serve --detach``); the job
ends once the replicas are up. ``--stop`` deletes the application instead.

    ray job submit --working-dir . -- python jobs/serve.py --config cluster.yaml [--export DIR] [--stop]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["serve", "--detach"]))
