"""Write a CSV/TSV/parquet/JSON-lines table of local image paths and captions as shards (`clipforge prep table`).

python data_prep/table.py captions.csv --out data/mine --image-column filepath --caption-column title [--resize 256]
"""

import sys

from clipforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prep", "table", *sys.argv[1:]]))
