"""Build the real emoji benchmark crawl: a thin wrapper around `tldr_tasks.data.real_crawl`.

The crawl (four vendors' drawings from the npm emoji-datasource packages, planted web noise, the
Facebook drawings held out for eval) is written in the synthetic crawl's layout, ready for

    .venv/bin/python scripts/real_crawl.py --out /tmp/emoji_crawl [--seed 0 --noise 0.3 --max-eval 2000]
    nice -n 15 .venv/bin/tldr-vlp compress --input '/tmp/emoji_crawl/train/{00000..00010}.tar' --out /tmp/realrun \\
        --eval --eval-input '/tmp/emoji_crawl/eval/{00000..00001}.tar'

(the exact shard patterns are crawl.json's train_input and eval_input, printed when it is done).
"""

from __future__ import annotations

import sys

from tldr_tasks.data.real_crawl import main

if __name__ == "__main__":
    sys.exit(main())
