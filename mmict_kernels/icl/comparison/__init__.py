"""The paper's comparison on the embedded data: the engine behind ``python -m mmict_kernels.compare``.

VanillaFine-Tune (the query alone), Vanilla ICT (raw demonstrations), MMICT (the driver's
default) and AIM (frozen MMICT backbone + trained projection) with the same model sizes, data,
optimiser and step budget, for each sampling strategy (random, similar, one-to-many) and number
of demonstrations. See docs/COMPARE.md for the protocol and what each column measures.

- ``config.py``: :class:`CompareConfig` (what to compare) and :func:`load_compare_config`;
- ``methods.py``: each method as a trainable stepper from the same initial weights;
- ``measure.py``: step time and memory, and the machine that measured them;
- ``answers.py``: every method's answers to the same queries, and their scores;
- ``run.py``: :func:`run_comparison`, the loop over methods, strategies and counts;
- ``report.py``: the table on screen and the rows in JSON and CSV.
"""

from .answers import predict, summarize
from .config import SAMPLINGS, CompareConfig, load_compare_config
from .measure import SavedTensorBytes, machine, measure_step
from .methods import Stepper, build_aim, fresh_model, make_trainer, train
from .report import COLUMNS, format_markdown, format_row, format_table, write_results
from .run import run_comparison

__all__ = [
    "COLUMNS",
    "SAMPLINGS",
    "CompareConfig",
    "SavedTensorBytes",
    "Stepper",
    "build_aim",
    "format_markdown",
    "format_row",
    "format_table",
    "fresh_model",
    "load_compare_config",
    "machine",
    "make_trainer",
    "measure_step",
    "predict",
    "run_comparison",
    "summarize",
    "train",
    "write_results",
]
