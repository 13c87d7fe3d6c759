"""Ray job: the whole pipeline (``raygpt run``): tokenize -> pretrain -> finetune -> export -> serve. The job sends
one sample request, prints the summary and ends; the endpoint stays up on the cluster (stop it with
``jobs/serve.py --stop``). ``--no-serve`` stops after training and exporting.

    ray job submit --working-dir . -- python jobs/run.py --config cluster.yaml [--set k=v ...] [--no-serve] [--fresh]
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    status = main(["run", "--exit-after-sample", *sys.argv[1:]])
    if status == 0 and "--no-serve" not in sys.argv:
        print("raygpt job: the endpoint stays up after this job; remove it with jobs/serve.py --stop")
    sys.exit(status)
