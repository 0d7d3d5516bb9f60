"""Figure: held-out accuracy of linear subgoal probes by layer of the frozen base model (paper Fig. 3 / A1).

    hrl pipeline gridworld                       # or: hrl probe --seed K, for each seed
    python experiments/probe_accuracy.py --runs-dir runs --experiment gridworld_quick --seeds 0,1,2

Reads runs/<experiment>/probe/seed_<k>/ and writes runs/<experiment>/figures/probe_accuracy.png.
"""

import argparse
import sys

from hrl.analysis.figures import probe_accuracy_figure
from hrl.cli import seed_list

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--experiment", default="gridworld_quick")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    args = parser.parse_args()
    try:
        print(f"wrote {probe_accuracy_figure(args.runs_dir, args.experiment, args.seeds)}")
    except FileNotFoundError as missing:
        sys.exit(f"{parser.prog}: {missing}")
