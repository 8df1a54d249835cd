"""Built-in tasks, all offline, and the task contract (see ``tasks.base``)."""

from tasks.base import IGNORE, KINDS, Batches, TensorTask, frequency_loss
from tasks.digits import Digits
from tasks.synthetic import AssociativeRecall, Reverse
from tasks.text import StdlibCharLM

__all__ = ["IGNORE", "KINDS", "AssociativeRecall", "Batches", "Digits", "Reverse", "StdlibCharLM", "TensorTask", "frequency_loss"]
