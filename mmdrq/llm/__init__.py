"""The language-model path (``pip install .[llm]``): a character-level
decoder LM (a transformers Llama built from its config) trained and switched
per bit through MMEngine as the vision tasks are. Configs import it with
``custom_imports``; the core package never does, and transformers is only
imported when a model is built."""
from .corpus import CORPORA, write_char_corpus
from .dataset import CharLMDataset
from .metric import PerplexityMetric
from .model import CausalLM

__all__ = ['CORPORA', 'CausalLM', 'CharLMDataset', 'PerplexityMetric',
           'write_char_corpus']
