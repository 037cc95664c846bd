"""``sdpadiff bench``: every strategy of :data:`multihead_sdpadiff.IMPLS`, checked against the float64
reference, then timed against standard attention of the same width and transformers'
``DiffLlamaAttention``. The command is :func:`multihead_sdpadiff.bench.cli.main`; the pieces:

* :mod:`.cases`: case shapes, FLOP counts and the methods (data; append your own);
* :mod:`.guard`: the correctness check that gates timing;
* :mod:`.timing`, :mod:`.memory`: median/IQR timing and peak memory growth;
* :mod:`.runner`: the sweep and its results file; :mod:`.report`, :mod:`.plot`: table and plots.

Importing this package imports neither transformers, triton, tqdm nor matplotlib.
"""

from .cases import Case, Method, build_methods
from .runner import BenchConfig, load_results, run_sweep

__all__ = ["BenchConfig", "Case", "Method", "build_methods", "load_results", "run_sweep"]
