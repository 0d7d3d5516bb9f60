"""Figure: rate-distortion curves of the metacontroller over alpha, frozen base vs co-trained (paper Fig. 7).

    hrl pipeline gridworld                       # or: hrl discover --seed K [--variant cotrained|beta1]
    python experiments/rate_distortion.py --runs-dir runs --experiment gridworld_quick --seeds 0,1,2

Reads runs/<experiment>/discovery*/seed_<k>/ and writes runs/<experiment>/figures/rate_distortion.png.
"""

from hrl.analysis.figures import figure_script, rate_distortion_figure

if __name__ == "__main__":
    figure_script(rate_distortion_figure, __doc__)
