"""The MicroNet score: op records and rule tables (:mod:`.rules`), counting (:mod:`.count`), and the
description of a model to count (:mod:`.counts`).

    from micronet.scoring import ModelCounts, score, render_table
"""

from micronet.scoring.counts import (WT103_TEST_BIN_FRACTIONS, ModelCounts, bin_fractions, build_ops, render_table,
                                     score, score_config, score_model)
from micronet.scoring.rules import CONVENTIONS, RULES, Score, Settings

__all__ = ["CONVENTIONS", "RULES", "WT103_TEST_BIN_FRACTIONS", "ModelCounts", "Score", "Settings", "bin_fractions",
           "build_ops", "render_table", "score", "score_config", "score_model"]
