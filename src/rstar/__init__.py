"""rStar-Math: small LMs master math by deep thinking (arXiv 2501.04519).

Modules name the paper's stages: `steps` (code-augmented CoT format), `sandbox`
(executing model-written code), `grading` (answer equivalence), `data` (problem sets,
extraction of SFT/PPM data, the embedded synthetic world), `models` (policy and reward
backends, the PPM), `search` (MCTS, beam, best-of-N, greedy and the batching scheduler),
`training` (policy SFT, PPM), `evolve` (the 4-round loop), `evaluate`.
"""

__version__ = "0.1.0"


class RstarError(ValueError):
    """Bad input from a user (a file, a field, a flag): the CLI prints its message, which
    names the place, and exits 2 instead of showing a traceback."""
