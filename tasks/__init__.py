"""Built-in tasks, all offline, and the task contract (see ``tasks.base``)."""

from qkvsearch.tasks.base import IGNORE, KINDS, Batches, TensorTask, frequency_loss
from qkvsearch.tasks.classification import TextClassification
from qkvsearch.tasks.corpus import TextCorpus
from qkvsearch.tasks.digits import Digits
from qkvsearch.tasks.synthetic import AssociativeRecall, Reverse
from qkvsearch.tasks.text import StdlibCharLM

__all__ = ["IGNORE", "KINDS", "AssociativeRecall", "Batches", "Digits", "Reverse", "StdlibCharLM", "TensorTask", "TextClassification", "TextCorpus", "frequency_loss"]
