"""Figure: post-training success of chained supervised controllers by controlled layer, with the
unsteered base model as the reference line (paper Fig. 4).

    hrl pipeline gridworld                       # or: hrl controllers --seed K, for each seed
    python experiments/controller_layer_sweep.py --runs-dir runs --experiment gridworld_quick --seeds 0,1,2

Reads runs/<experiment>/controllers/seed_<k>/ and writes
runs/<experiment>/figures/controller_layer_sweep.png.
"""

from hrl.analysis.figures import controller_layer_sweep_figure, figure_script

if __name__ == "__main__":
    figure_script(controller_layer_sweep_figure, __doc__)
