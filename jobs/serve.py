"""Ray job: deploy the OpenAI-compatible endpoint and leave it on the cluster (``raygpt serve --detach``); the job
ends once the replicas are up. ``--stop`` deletes the application instead.

    ray job submit --working-dir . -- python jobs/serve.py --config cluster.yaml [--export DIR] [--stop]
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
