"""What the feature code needs to know of an architecture: loading a model folder (tokenizer or image processor,
with or without its classification head), which module's output is the features (`backbone`, `vision_tower`), what
a head reads (`classifier_layer`), how long a text it takes, and the pooling of its hidden states into one vector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.contract import POOLINGS
from workers.features.result import POOLING


def check_pooling(pooling: str) -> None:
    """Raise ValueError unless pooling is one of service.contract.POOLINGS."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def is_decoder_only(config: Any) -> bool:
    """A causal language model (Llama, Gemma, GPT-2, ...), whose sequence-classification head reads the last token:
    a model type with a causal-LM class and no masked-LM one (BERT and MPNet have both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def takes_token_types(config: Any) -> bool:
    """Whether the model has token type embeddings for a pair's second text (BERT, ALBERT, ELECTRA: 2). A tokenizer
    can declare token type ids that its model cannot take: RoBERTa-like configs hold one type, and the second
    text's type 1 would index past it; DistilBERT and decoders have none."""
    return int(getattr(config, "type_vocab_size", 0) or 0) >= 2


_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "longformer"}


def length_limit(tokenizer: Any, model: Any, max_length: int) -> int:
    """max_length capped by what the model reads: the tokenizer's model_max_length and the position embeddings
    (RoBERTa-like models start their positions after the padding index)."""
    limit = max_length
    if 0 < (tokenizer.model_max_length or 0) < 1_000_000:
        limit = min(limit, int(tokenizer.model_max_length))
    positions = getattr(model.config, "max_position_embeddings", None)
    if getattr(model.config, "model_type", "") in _OFFSET_POSITIONS and isinstance(positions, int):
        positions -= 2  # positions start after the padding index
    if isinstance(positions, int) and positions > 0:
        limit = min(limit, positions)
    return limit


def load_text_model(model_dir: Path, device: str) -> tuple[Any, Any, bool]:
    """(tokenizer, model, has_head) of a text model folder, in eval mode on `device`, float32. has_head: the folder
    is a *ForSequenceClassification model with its labels (its softmax is a source head for LEEP/NCE); otherwise
    the base model (the encoder alone of an encoder-decoder). The tokenizer pads on the right, with a pad token."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:  # decoders: any id works, padded positions are masked out
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])) \
        and bool(getattr(config, "id2label", None))
    loader: Any = AutoModelForSequenceClassification if has_head else AutoModel
    architecture = (config.architectures or [""])[0]
    if not has_head and architecture.endswith("EncoderModel") and hasattr(transformers, architecture):
        # T5EncoderModel (sentence-T5, Flan-T5 encoders): AutoModel would build the whole T5Model around it
        loader = getattr(transformers, architecture)
    model = loader.from_pretrained(model_dir, dtype=torch.float32)
    if not has_head and getattr(config, "is_encoder_decoder", False):
        # T5, BART, mT5: the encoder's states are the text's features (the decoder would need a target sequence,
        # and BART's own forward feeds it the shifted input, giving decoder states of the input instead).
        model = model.get_encoder()
    if has_head and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder heads read the last non-pad token
    model.eval().to(device)
    return tokenizer, model, has_head


def load_image_model(model_dir: Path, device: str, pooling: str = POOLING) -> tuple[Any, Any, bool, Any]:
    """(processor, model, has_head, head_layer). has_head: the folder is an image classifier with its labels (its
    softmax is a source head for LEEP/NCE). With pooling "head" the model is always an image classifier (a new head
    when the folder has none: only its input is used) and head_layer is its last linear layer, whose input is the
    feature; None where the architecture has no image-classification class."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(model_dir)
    # PIL-based processing unless torchvision is installed (it is not beside this torch build).
    processor = AutoImageProcessor.from_pretrained(model_dir)
    has_head = any(a.endswith("ForImageClassification") for a in (config.architectures or [])) \
        and bool(getattr(config, "id2label", None))
    model = None
    if has_head:
        model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32)
    elif pooling == "head":
        try:
            model = image_classifier(model_dir, {"num_labels": 2, "dtype": torch.float32})
        except ValueError:  # no image-classification class for this architecture: pool its backbone instead
            pass
    head_layer = classifier_layer(model, model.config.num_labels) if model is not None and pooling == "head" else None
    if model is None:
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        if hasattr(config, "vision_config"):
            model = vision_tower(model)
    model.eval().to(device)
    return processor, model, has_head, head_layer


def image_classifier(model_dir: Path, head: dict[str, Any]) -> Any:
    """AutoModelForImageClassification of the folder, with `head` (num_labels, id2label, ...). A dual encoder's vision
    tower saved alone (CLIPVisionModel, SiglipVisionModel: model_type "clip_vision_model", ...) has no image
    classifier of its own: it becomes the parent's (CLIPForImageClassification), whose vision_model.* weights are
    the tower's."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_dir)
    kind = getattr(config, "model_type", "") or ""
    parent = kind.removesuffix("_vision_model")
    if parent == kind or parent not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return AutoModelForImageClassification.from_pretrained(model_dir, **head)
    labels = {k: head[k] for k in ("num_labels", "problem_type", "id2label", "label2id") if k in head}
    classifier = AutoModelForImageClassification.from_config(
        AutoConfig.for_model(parent, vision_config=config.to_dict(), **labels)).to(torch.float32)
    # the tower's weights into the classifier's tower, module to module: the files' key prefixes differ between
    # towers (CLIPVisionModel writes vision_model.*, SiglipVisionModel writes none)
    tower = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    source = getattr(tower, "vision_model", tower)
    missing, _ = vision_tower(classifier).load_state_dict(source.state_dict(), strict=False)
    if missing:
        raise ValueError(f"{model_dir}: the {kind} weights do not fill {parent}'s image classifier "
                         f"(missing {missing[:3]})")
    return classifier


def backbone(model: Any) -> Any:
    """The module of a classifier whose output its head reads and whose states are the model's features, as they
    are for the same weights without the head: the base model (`base_model_prefix`); the encoder of an
    encoder-decoder (T5ForSequenceClassification's T5Model would report its decoder's states); the vision tower of
    a dual encoder's image classifier (CLIPForImageClassification has no `clip` attribute)."""
    import torch

    base = getattr(model, model.base_model_prefix, None)
    if not isinstance(base, torch.nn.Module) or base is model:
        return vision_tower(model) if hasattr(model.config, "vision_config") else model
    if getattr(base.config, "is_encoder_decoder", False) and hasattr(base, "get_encoder"):
        return base.get_encoder()
    return base


def vision_tower(model: Any) -> Any:
    """The image encoder of a model that has more than one (CLIP, SigLIP, ALIGN: a text and a vision tower)."""
    for name in ("vision_model", "vision_tower", "visual"):
        tower = getattr(model, name, None)
        if tower is not None:
            return tower
    raise ValueError(f"{type(model).__name__} has a vision_config but no vision tower this service knows "
                     "(vision_model, vision_tower or visual)")


def classifier_layer(model: Any, num_outputs: int) -> Any:
    """The head's last nn.Linear with num_outputs outputs, outside the backbone: the layer producing the logits of
    every Hugging Face *ForSequenceClassification / *ForImageClassification head (its input is what the head reads)."""
    import torch

    base = backbone(model)
    inside = {id(m) for m in base.modules()} if base is not model else set()
    found = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in inside and module.out_features == num_outputs:
            found = module
    return found


class BackboneOutput:
    """The backbone's own output when the model is a classifier (its head gives source_probs): a forward hook on
    the backbone (see `backbone`), removed on exit. Without a head the model is the backbone and nothing is
    hooked."""

    def __init__(self, model: Any, has_head: bool) -> None:
        self.base = backbone(model) if has_head else model
        self.has_head = has_head
        self.output: Any = None
        self._hook: Any = None

    def __enter__(self) -> BackboneOutput:
        if self.has_head:
            self._hook = self.base.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()

    def _keep(self, _module: Any, _args: Any, output: Any) -> None:
        self.output = output

    def take(self, out: Any) -> Any:
        """The backbone output of the forward that returned `out`."""
        if not self.has_head:
            return out
        output, self.output = self.output, None
        return output


def last_hidden(output: Any) -> Any:
    """The last hidden state of a model output (a ModelOutput, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def pool_text_output(hidden: Any, mask: Any, pooling: str, last_token: bool) -> Any:
    """One float32 vector per text from the last hidden state (B, T, D) and the attention mask (B, T) of a
    right-padded batch. "mean" averages the states over the mask; "head" takes the token a Hugging Face
    sequence-classification head reads: the last real token when last_token (decoder-only models,
    `is_decoder_only`), the first token otherwise."""
    import torch

    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    # batches are right-padded: the last real token sits at length - 1
    at = mask.sum(1) - 1 if last_token else torch.zeros_like(mask[:, 0])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), at].float()


def pool_image_output(output: Any, pooling: str) -> Any:
    """One vector per image from a vision backbone's output.

    Feature maps (B, C, H, W), as CNNs return: "mean" averages over the positions; "head" takes pooler_output (what
    their image-classification heads read: the global average, after ConvNeXt's layer norm) when there is one.
    Token sequences (B, T, D), as ViTs return: "mean" averages over the tokens; "head" takes the first ([CLS]) token,
    which ViTForImageClassification reads (its pooler_output is an untrained dense + tanh in most checkpoints).
    extract_image_features uses "head" here only for architectures without an image-classification class; the
    others give the input of their classifier's last linear layer (see load_image_model)."""
    hidden = last_hidden(output)
    if hidden.ndim == 4:
        pooled = getattr(output, "pooler_output", None) if pooling == "head" else None
        if pooled is None:
            return hidden.float().mean(dim=(2, 3))
        return pooled.float().flatten(1)
    if hidden.ndim == 3:
        return hidden[:, 0].float() if pooling == "head" else hidden.float().mean(dim=1)
    raise ValueError(f"cannot pool a last hidden state of shape {tuple(hidden.shape)}")
