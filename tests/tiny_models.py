"""Tiny Hugging Face model folders built from a config, for tests that need no network.

Each folder is what `AutoModel.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`
load: config.json, model.safetensors, and a WordPiece tokenizer whose vocabulary covers any
lower-case ASCII text (letters fall back to single-character pieces).
"""

from __future__ import annotations

import string
from pathlib import Path

_COMMON_WORDS = (
    "the a an and or of to in on for with is was are be this that it as by at from game match team "
    "win won play player season goal market shares bank profit company economy growth price film "
    "music star award show actor band album government minister election party vote labour law "
    "phone software computer internet technology users mobile digital network data good bad great "
    "terrible love hate movie book happy sad excellent awful"
).split()


def _write_vocab(folder: Path) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = specials + chars + pieces + sorted(set(_COMMON_WORDS))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")


def _save_tokenizer(folder: Path, token_types: bool = False) -> None:
    """token_types: the tokenizer declares token type ids as a model input, as real BERT tokenizers do (a text
    pair's second text is segment 1)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    _write_vocab(folder)
    wordpiece = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=True)
    inputs = {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]} if token_types else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=256, **inputs,
    )
    tokenizer.save_pretrained(folder)


def _vocab_size(folder: Path) -> int:
    return len((folder / "vocab.txt").read_text(encoding="utf-8").splitlines())


def make_tiny_bert(folder: Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0,
                   num_labels: int | None = None) -> Path:
    """A randomly initialised 2-layer BERT encoder (optionally with a classification head)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(folder, token_types=True)
    config = BertConfig(
        vocab_size=_vocab_size(folder), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    if num_labels is None:
        model = BertModel(config)
    else:
        config.num_labels = num_labels
        model = BertForSequenceClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_roberta(folder: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised 2-layer RoBERTa with one token type (as real RoBERTa checkpoints) behind a tokenizer
    that declares token type ids: a pair's type 1 must not reach its embeddings."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(folder, token_types=True)
    config = RobertaConfig(vocab_size=_vocab_size(folder), hidden_size=hidden_size, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=258,
                           type_vocab_size=1, pad_token_id=0)
    torch.manual_seed(seed)
    RobertaModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_llama(folder: Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama decoder: the decoder path (causal, last-token-free pooling)."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=_vocab_size(folder), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=2, intermediate_size=2 * hidden_size,
        max_position_embeddings=256, pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _save_image_processor(folder: Path, kind: str, image_size: int) -> None:
    import transformers

    # The plain class names resolve to the PIL-based processors when torchvision is absent (as here).
    if kind == "vit":
        processor = transformers.ViTImageProcessor(size={"height": image_size, "width": image_size})
    else:
        processor = transformers.MobileNetV2ImageProcessor(size={"shortest_edge": image_size + 8},
                                                           crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(folder)


def make_tiny_vit(folder: Path, hidden_size: int = 32, image_size: int = 32, seed: int = 0,
                  num_labels: int | None = None) -> Path:
    """A randomly initialised 2-layer ViT on 32×32 images (8×8 patches), with its image processor; with
    num_labels, a ViTForImageClassification whose config carries id2label (a source head for LEEP/NCE)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_image_processor(folder, "vit", image_size)
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=hidden_size, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=2 * hidden_size)
    torch.manual_seed(seed)
    if num_labels is None:
        model = ViTModel(config)
    else:
        config.num_labels = num_labels
        config.id2label = {i: f"source-{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = ViTForImageClassification(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_mobilenet(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised MobileNetV2 at depth multiplier 0.35 (a CNN: 4-D feature maps, 1280 channels)."""
    import torch
    from transformers import MobileNetV2Config, MobileNetV2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_image_processor(folder, "mobilenet_v2", image_size)
    torch.manual_seed(seed)
    MobileNetV2Model(MobileNetV2Config(image_size=image_size, depth_multiplier=0.35)).save_pretrained(
        folder, safe_serialization=True)
    return folder


def make_tiny_t5(folder: Path, hidden_size: int = 32, seed: int = 0, encoder_only: bool = False) -> Path:
    """A randomly initialised encoder-decoder T5 (or, encoder_only, a T5EncoderModel as sentence-T5 ships)."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(folder)
    config = T5Config(vocab_size=_vocab_size(folder), d_model=hidden_size, d_kv=hidden_size // 2,
                      d_ff=2 * hidden_size, num_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=3)  # [SEP], which the tokenizer appends: T5 classifiers read the last EOS
    torch.manual_seed(seed)
    (T5EncoderModel if encoder_only else T5Model)(config).save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_clip(folder: Path, hidden_size: int = 32, image_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised CLIP dual encoder (text and vision towers) with its image processor and tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    tower = dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden_size)
    config = CLIPConfig(text_config=dict(vocab_size=_vocab_size(folder), **tower),
                        vision_config=dict(image_size=image_size, patch_size=8, **tower), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    return folder
