"""How an image is shaped before the processor sees it: `image_aspect_ratio`, as LLaVA-1.5 names it.

    native   the processor's own preprocessing (CLIP: resize the shortest edge, then centre-crop to a square,
             so a 4:3 image loses an eighth of its width on each side; Qwen2-VL: its own dynamic resolution)
    pad      LLaVA-1.5's `expand2square`: the image centred on a square canvas of the processor's mean colour
             (image_mean × 255, truncated as LLaVA does), then the processor's own preprocessing, which now
             crops nothing: edges survive (counting, POPE's objects near the border)

The setting belongs to the model, not to one run: training stores it on the processor's image processor
(`image_aspect_ratio` in processor_config.json, which transformers saves and loads with the processor) and in a
delta's metadata, so evaluation and analysis of that model shape images the same way without being told."""

from __future__ import annotations

from PIL import Image

IMAGE_ASPECT_RATIOS = ("native", "pad")


def image_aspect_ratio(processor) -> str:
    """The setting a processor carries (native where none was saved)."""
    return getattr(getattr(processor, "image_processor", None), "image_aspect_ratio", None) or "native"


def set_image_aspect_ratio(processor, mode: str) -> None:
    if mode not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {', '.join(IMAGE_ASPECT_RATIOS)}, got {mode!r}")
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ValueError("image_aspect_ratio: this processor has no image processor")
    image_processor.image_aspect_ratio = mode


def pad_colour(processor) -> tuple[int, int, int]:
    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(x * 255) for x in mean)


def pad_to_square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's expand2square: the image centred on a square of `colour`, its longer side kept."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def fit_images(processor, images: list[Image.Image]) -> list[Image.Image]:
    """The images as the processor should see them under the processor's image_aspect_ratio."""
    if image_aspect_ratio(processor) != "pad" or not images:
        return images
    colour = pad_colour(processor)
    return [pad_to_square(im, colour) for im in images]


def fitted_size(processor, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of `size` after fit_images: what the processor's token count must be told."""
    if image_aspect_ratio(processor) != "pad":
        return size
    side = max(size)
    return side, side
