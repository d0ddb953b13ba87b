"""Write a Hugging Face `datasets` dataset as training shards (same as `clipforge prep hf`).

python data_prep/hf.py path/to/save_to_disk_dir --out data/mine [--image-column image --caption-column text]
python data_prep/hf.py path/to/images --imagefolder --out data/mine   # images + metadata.jsonl (file_name, text)
"""

import sys

from clipforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prep", "hf", *sys.argv[1:]]))
