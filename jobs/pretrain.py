"""Ray job: pretrain model.preset on <run.dir>/data with DeepSpeed ZeRO-3 (``raygpt pretrain``).

ray job submit --working-dir . -- python jobs/pretrain.py --config cluster.yaml [--set k=v ...] [--fresh]
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["pretrain"]))
