"""Ray job: tokenize the pretraining corpus and the fine-tune set into <run.dir> (``raygpt tokenize`` +
``raygpt tokenize-finetune``).

    ray job submit --working-dir . -- python jobs/tokenize.py --config cluster.yaml [--set k=v ...] [--overwrite]
"""

import sys

from _entry import run

if __name__ == "__main__":
    status = run(["tokenize"])
    sys.exit(status or run(["tokenize-finetune"]))
