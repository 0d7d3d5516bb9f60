"""Figure: post-training success against training episodes, internal RL vs raw-action GRPO vs the
beta = 1 and co-trained ablations (and CRL where it ran), median and IQR over seeds (paper Fig. 8).

    hrl pipeline gridworld        # or: hrl internal-rl --seed K [--variant beta1|cotrained]; hrl grpo --seed K
    python experiments/rl_success.py --runs-dir runs --experiment gridworld_quick --seeds 0,1,2

Reads runs/<experiment>/{internal_rl*,grpo,crl}/seed_<k>/metrics.jsonl and writes
runs/<experiment>/figures/rl_success.png.
"""

from hrl.analysis.figures import figure_script, rl_success_figure

if __name__ == "__main__":
    figure_script(rl_success_figure, __doc__)
