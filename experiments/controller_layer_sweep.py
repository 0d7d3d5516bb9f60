"""Figure: post-training success of chained supervised controllers by controlled layer, with the
unsteered base model as the reference line (paper Fig. 4).

    hrl pipeline gridworld                       # or: hrl controllers --seed K, for each seed
    python experiments/controller_layer_sweep.py --runs-dir runs --experiment gridworld_quick --seeds 0,1,2

Reads runs/<experiment>/controllers/seed_<k>/ and writes
runs/<experiment>/figures/controller_layer_sweep.png.
"""

import argparse
import sys

from hrl.analysis.figures import controller_layer_sweep_figure
from hrl.cli import seed_list

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--experiment", default="gridworld_quick")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    args = parser.parse_args()
    try:
        print(f"wrote {controller_layer_sweep_figure(args.runs_dir, args.experiment, args.seeds)}")
    except FileNotFoundError as missing:
        sys.exit(f"{parser.prog}: {missing}")
