"""Ray job: fine-tune the pretrained export on <run.dir>/finetune_data (``raygpt finetune``).

ray job submit --working-dir . -- python jobs/finetune.py --config cluster.yaml [--set k=v ...] [--fresh]
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
