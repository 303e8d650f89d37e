"""The network: the Transformer LM and its parts (adaptive input and softmax, band attention, linear
softmax, hash dropout), the neural cache, the Hebbian softmax, and online evaluation over a stream.

    from micronet.model import ModelConfig, TransformerLM
"""

from micronet.model.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from micronet.model.cache import CacheConfig, EvalCache, TrainCache, attach_cache
from micronet.model.evaluation import evaluate_stream
from micronet.model.hebbian import HebbianConfig, HebbianSoftmax
from micronet.model.transformer import Block, Memory, ModelConfig, TransformerLM, WindowAttention, count_parameters

__all__ = ["AdaptiveEmbedding", "AdaptiveLogSoftmax", "Block", "CacheConfig", "EvalCache", "HebbianConfig",
           "HebbianSoftmax", "Memory", "ModelConfig", "TrainCache", "TransformerLM", "WindowAttention",
           "attach_cache", "count_parameters", "evaluate_stream"]
