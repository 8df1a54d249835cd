"""The remote-code side of a Hugging Face folder, for architectures no family holds exactly:
``configuration_qkvsearch.py`` (a ``PretrainedConfig`` carrying the architecture) and
``modeling_qkvsearch.py`` (the export's standalone model source, then ``PreTrainedModel``
classes around it), registered in ``config.json`` through ``auto_map`` and loaded with
``trust_remote_code=True``."""

from __future__ import annotations

from typing import Any

from qkvsearch.models import ArchConfig
from qkvsearch.search.export.codegen import generate_model_source

CONFIGURATION = '''"""The configuration of a model qkvsearch found: its architecture as plain data."""

from transformers import PretrainedConfig


class QkvConfig(PretrainedConfig):
    model_type = "qkvsearch"

    def __init__(self, arch=None, **kwargs):
        self.arch = arch or {}
        super().__init__(**kwargs)
'''

WRAPPERS = '''

# --- Hugging Face classes around the model above -----------------------------------------

from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput

from .configuration_qkvsearch import QkvConfig


class QkvPreTrainedModel(PreTrainedModel):
    config_class = QkvConfig
    base_model_prefix = "net"
    _tied_weights_keys = TIED

    def _init_weights(self, module):
        pass  # build() initialises; from_pretrained loads the trained weights

    def get_input_embeddings(self):
        return (self.net.decoder if hasattr(self.net, "decoder") else self.net.stack).embedding


class QkvForCausalLM(QkvPreTrainedModel, GenerationMixin):
    """Logits over the vocabulary at every position; ``labels`` are the inputs (shifted here)."""

    def __init__(self, config):
        super().__init__(config)
        self.net = build()
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        logits = self.net(input_ids, attention_mask.bool() if attention_mask is not None else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


class QkvForSequenceClassification(QkvPreTrainedModel):
    """Logits over the labels (``config.id2label``) for each sequence."""

    def __init__(self, config):
        super().__init__(config)
        self.net = build()
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        logits = self.net(input_ids, attention_mask.bool() if attention_mask is not None else None)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class QkvOutput(ModelOutput):
    logits: torch.FloatTensor = None


class QkvModel(QkvPreTrainedModel):
    """The model's own outputs: per-token logits of an encoder or an encoder-decoder."""

    def __init__(self, config):
        super().__init__(config)
        self.net = build()
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, **kwargs):
        mask = attention_mask.bool() if attention_mask is not None else None
        if decoder_input_ids is None:
            return QkvOutput(logits=self.net(input_ids, mask))
        target_mask = decoder_attention_mask.bool() if decoder_attention_mask is not None else None
        return QkvOutput(logits=self.net(input_ids, decoder_input_ids, mask, target_mask))
'''


def remote_class(arch: ArchConfig) -> tuple[str, str]:
    """The class a folder registers for this architecture, and the Auto class that loads it."""
    if arch.kind == "decoder" and arch.head.name == "lm":
        return "QkvForCausalLM", "AutoModelForCausalLM"
    if arch.head.name == "classifier":
        return "QkvForSequenceClassification", "AutoModelForSequenceClassification"
    return "QkvModel", "AutoModel"


def remote_sources(arch: ArchConfig) -> dict[str, str]:
    """The two files of the remote-code path, by name.

    Raises:
        ExportError: a component of the architecture cannot be written as source.
    """
    stack = "decoder" if arch.kind == "encoder_decoder" else "stack"  # the embedding a tied head shares
    tied = {"net.head.proj.weight": f"net.{stack}.embedding.weight"} if arch.tie_embeddings else None
    model = generate_model_source(arch)
    return {"configuration_qkvsearch.py": CONFIGURATION,
            "modeling_qkvsearch.py": model + WRAPPERS.replace("_tied_weights_keys = TIED", f"_tied_weights_keys = {tied!r}")}


def remote_config(arch: ArchConfig, labels: list[str] | None = None) -> dict[str, Any]:
    """``config.json`` of the remote-code path."""
    cls, auto = remote_class(arch)
    config: dict[str, Any] = {
        "model_type": "qkvsearch", "architectures": [cls], "arch": arch.to_dict(), "use_cache": False,
        "tie_word_embeddings": arch.tie_embeddings, "vocab_size": arch.vocab_size,
        "auto_map": {"AutoConfig": "configuration_qkvsearch.QkvConfig", auto: f"modeling_qkvsearch.{cls}"},
    }
    if labels:
        config["id2label"] = dict(enumerate(labels))
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    return config
