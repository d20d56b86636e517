"""Images to features: encoded files decoded upright at 8 bits (`decode_images`, `eight_bit`), resized and
normalised by the folder's own image processor in threads ahead of the model, and the forward passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import numpy as np

from workers.features.adapters import BackboneOutput, check_pooling, load_image_model, pool_image_output
from workers.features.flops import counted_flops
from workers.features.result import POOLING, FeatureExtractionCancelled, FeatureResult, FeatureRows
from workers.features.runtime import ForwardClock, autocast_dtype, pick_device, prepared_in_order, threads_ahead


def extract_image_features(model_dir: Path, images: list[bytes], *, batch_size: int = 32, device: str | None = None,
                           on_batch: Callable[[int, int], None] | None = None,
                           should_cancel: Callable[[], bool] | None = None,
                           pooling: str = POOLING) -> FeatureResult:
    """Pooled last hidden states (see pool_image_output) of encoded image files, in order, from the vision model in
    `model_dir`, each image resized and normalised by the folder's own image processor. If the folder is an
    *ForImageClassification model with id2label, source_probs holds its head's softmax. Token counts are image
    counts (nothing is padded); flops_estimate is the forward FLOPs of one image, counted by torch's
    FlopCounterMode, times the number of images. float32 on CPU, bf16 autocast on CUDA."""
    import torch

    if not images:
        raise ValueError("extract_image_features needs at least one image")
    check_pooling(pooling)
    began = time.perf_counter()
    device = pick_device(device)
    processor, model, has_head, head_layer = load_image_model(Path(model_dir), device, pooling)
    load_seconds = time.perf_counter() - began
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"
    on_cuda = device.startswith("cuda")
    amp_dtype = autocast_dtype(on_cuda)

    def pixels(rows: list[bytes]) -> Any:
        batch = processor(images=decode_images(rows, mode), return_tensors="pt")["pixel_values"]
        return batch.to(device, non_blocking=True)

    collected = FeatureRows(len(images))
    clock = ForwardClock(on_cuda)
    batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
    head_inputs: list[Any] = []
    with ExitStack() as stack:
        base_output = stack.enter_context(BackboneOutput(model, has_head))
        if head_layer is not None:  # "head": the input of the classifier's last linear layer
            hook = head_layer.register_forward_hook(lambda _m, args, _out: head_inputs.append(args[0]))
            stack.callback(hook.remove)
        per_image_flops = counted_flops(lambda: base_output.take(model(pixel_values=pixels([images[0]]))))
        head_inputs.clear()
        # closing(): a cancel or a failing forward stops the decoding threads at once, not when collected
        prepared = stack.enter_context(closing(prepared_in_order(lambda rows: pixels([images[i] for i in rows]),
                                                                 batches, ahead=threads_ahead(on_cuda))))
        for done, (rows, pixel_values) in enumerate(zip(batches, prepared), start=1):
            if should_cancel is not None and should_cancel():
                raise FeatureExtractionCancelled(f"cancelled after {done - 1} of {len(batches)} batches")
            with clock.timing(), torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype, enabled=on_cuda):
                out = model(pixel_values=pixel_values)
                base = base_output.take(out)
                if head_layer is not None:
                    pooled = head_inputs.pop().float().flatten(1)
                    head_inputs.clear()
                else:
                    pooled = pool_image_output(base, pooling)
                batch_probs = torch.softmax(out.logits.float(), dim=-1) if has_head else None
            collected.put(rows, pooled, batch_probs)
            if on_batch is not None:
                on_batch(done, len(batches))
    assert collected.features is not None
    return FeatureResult(features=collected.features, source_probs=collected.probs, forward_seconds=clock.seconds,
                         total_seconds=time.perf_counter() - began, tokens=len(images), padded_tokens=len(images),
                         num_parameters=sum(p.numel() for p in model.parameters()),
                         flops_estimate=per_image_flops * len(images), device=device, load_seconds=load_seconds)


def decode_images(images: list[bytes], mode: str = "RGB") -> list[Any]:
    """PIL images from encoded files, turned upright by their EXIF orientation (a phone's portrait photo is stored
    sideways with a tag saying so), brought to 8 bits per channel (`eight_bit`) and converted to `mode` (grayscale
    and palette images become RGB)."""
    import io

    from PIL import Image, ImageOps

    decoded = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            upright = ImageOps.exif_transpose(image)  # loads the pixels: the file can close
            decoded.append(eight_bit(upright).convert(mode))
    return decoded


def eight_bit(image: Any) -> Any:
    """An image whose pixels a pretrained model's processor reads as a picture: 8 bits per channel, no alpha.

    PIL's convert("RGB") clips 16-bit and 32-bit grayscale (microscopy, medical and satellite PNG/TIFF) to 255, so
    a 16-bit image came out almost white. Here "I;16" images, and "I" images within 0..65535, are scaled by the full
    16-bit range (value / 257, as torchvision's convert_image_dtype does: relative brightness between images is
    kept); float images within 0..1 by 255; other integer or float images are stretched from their own minimum to
    their maximum. Transparent pixels (RGBA, LA, palette transparency) are laid over white, as a viewer shows them;
    convert("RGB") would keep whatever colour hides under alpha 0, often black."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
            scaled = values / 257.0
        elif image.mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image
