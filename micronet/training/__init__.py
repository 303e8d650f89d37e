"""Training: the :class:`Trainer` loop, its typed configs, distillation from stored soft labels, torchrun.

    from micronet.training import OptimConfig, TrainConfig, Trainer
"""

from micronet.training.config import OptimConfig, TrainConfig, build_model_config, lr_at
from micronet.training.distill import DistillConfig, Distiller, SoftLabels, build_distiller
from micronet.training.soft_labels import SoftLabelError, generate_soft_labels
from micronet.training.trainer import Trainer

__all__ = ["DistillConfig", "Distiller", "OptimConfig", "SoftLabelError", "SoftLabels", "TrainConfig", "Trainer",
           "build_distiller", "build_model_config", "generate_soft_labels", "lr_at"]
