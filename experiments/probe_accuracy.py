"""Figure: held-out accuracy of linear subgoal probes by layer of the frozen base model (paper Fig. 3 / A1).

    hrl pipeline gridworld                       # or: hrl probe --seed K, for each seed
    python experiments/probe_accuracy.py --runs-dir runs --experiment gridworld_quick --seeds 0,1,2

Reads runs/<experiment>/probe/seed_<k>/ and writes runs/<experiment>/figures/probe_accuracy.png.
"""

from hrl.analysis.figures import figure_script, probe_accuracy_figure

if __name__ == "__main__":
    figure_script(probe_accuracy_figure, __doc__)
