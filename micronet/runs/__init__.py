"""The base layer: results directories, typed configs and errors, the stage runner, paths, progress bars.

Imports nothing else from micronet; everything else may import it. Modules: :mod:`.config` (errors,
typed dataclass configs), :mod:`.paths`, :mod:`.progress`, :mod:`.device`, :mod:`.results` (the
results-directory contract: file names, atomic writes, checkpoints, the guard), :mod:`.lineage`
(derived runs' records and names), :mod:`.cli` (Hydra entry points, logging, one-line errors).
"""

from micronet.runs.config import ConfigError, MicronetError, as_dict, typed
from micronet.runs.device import pick_device
from micronet.runs.paths import CONF_DIR, PROJECT_ROOT, data_root, results_root, shared_data_dir
from micronet.runs.results import CheckpointError, GuardError, RunDir, WriteError

__all__ = ["CONF_DIR", "PROJECT_ROOT", "CheckpointError", "ConfigError", "GuardError", "MicronetError", "RunDir",
           "WriteError", "as_dict", "data_root", "pick_device", "results_root", "shared_data_dir", "typed"]
