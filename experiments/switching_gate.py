"""Figure: the switching gate beta_t over held-out episodes above the ground-truth subgoals (paper Fig. 6 / A3).

    hrl pipeline gridworld                       # or: hrl discover --seed K [--variant cotrained]
    python experiments/switching_gate.py --runs-dir runs --experiment gridworld_quick --seeds 0,1,2

Reads runs/<experiment>/discovery{,_cotrained}/seed_<k>/ and writes runs/<experiment>/figures/switching_gate.png.
"""

from hrl.analysis.figures import figure_script, switching_gate_figure

if __name__ == "__main__":
    figure_script(switching_gate_figure, __doc__)
