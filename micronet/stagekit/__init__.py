"""What the stages are built from: the shared preamble (:func:`open_stage`), the evaluate and score
work as library functions (called by their stages and at the end of prune and quantize), and the
lineage planner of the pipeline stage. The top library layer: it may import every other one.
"""

from micronet.stagekit.evaluation import EvalConfig, evaluate_run
from micronet.stagekit.preamble import Stage, open_stage
from micronet.stagekit.score_run import ScoreConfig, evaluate_and_score, score_run

__all__ = ["EvalConfig", "ScoreConfig", "Stage", "evaluate_and_score", "evaluate_run", "open_stage", "score_run"]
