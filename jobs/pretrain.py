"""Ray job: pretrain model.preset on <run.dir>/data with DeepSpeed ZeRO-3 (``raygpt pretrain``).

    ray job submit --working-dir . -- python jobs/pretrain.py --config cluster.yaml [--set k=v ...] [--fresh]

``--working-dir`` puts the uploaded checkout first on the job's PYTHONPATH, so the job runs that code.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
