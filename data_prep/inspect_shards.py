"""Validate shards (ours or img2dataset's) and write their counts and histograms to _stats.json
(same as `clipforge prep inspect`).

    python data_prep/inspect_shards.py data/mine
    python data_prep/inspect_shards.py 'data/laion/{00000..00099}.tar' --no-write
"""

import sys

from clipforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prep", "inspect", *sys.argv[1:]]))
