"""Ray job: tokenize the pretraining corpus and the fine-tune set into <run.dir> (``raygpt tokenize`` +
``raygpt tokenize-finetune``).

    ray job submit --working-dir . -- python jobs/tokenize_data.py --config cluster.yaml [--set k=v ...] [--overwrite]

(Not ``tokenize.py``: a script's folder comes first on ``sys.path``, where that name would shadow the standard
library's ``tokenize`` module.)
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]) or main(["tokenize-finetune", *sys.argv[1:]]))
