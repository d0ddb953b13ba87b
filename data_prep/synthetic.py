"""Write the synthetic default data set (same as `clipforge prep synthetic`).

python data_prep/synthetic.py --out data/synth --num-samples 20000
"""

import sys

from clipforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prep", "synthetic", *sys.argv[1:]]))
