"""Corpora: download and verification, word-level tokenisation into cached int32 arrays, training batches.

    from micronet.data import DataConfig, load_corpus
"""

from micronet.data.batches import sample_batch
from micronet.data.corpus import EOS, SPLITS, Corpus, DataConfig, load_corpus, prepare
from micronet.data.fetch import DataError

__all__ = ["EOS", "SPLITS", "Corpus", "DataConfig", "DataError", "load_corpus", "prepare", "sample_batch"]
