"""Coordinates as text and the geometry of image processors: formatting and parsing, round trips through every
transform, the real image processors' pixels, region prompts through the chat template, and the input errors."""

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tiny import make_tokenizer
from transformers import (
    CLIPImageProcessorPil,
    ConvNextImageProcessorPil,
    LlavaImageProcessorPil,
    SiglipImageProcessorPil,
)

from vlbridge.processing import (
    BridgeAnyResImageProcessor,
    BridgeProcessor,
    ImageGeometry,
    format_box,
    format_point,
    parse_coordinates,
    render_region_entries,
)


# ---------------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------------


def test_format_box_and_point():
    assert format_box([0.1234, 0.4564, 0.789, 0.9]) == "[0.123, 0.456, 0.789, 0.900]"
    assert format_box([0, 0, 1, 1], decimals=2) == "[0.00, 0.00, 1.00, 1.00]"
    assert format_box(np.array([0.5, 0.25, 0.75, 1.0])) == "[0.500, 0.250, 0.750, 1.000]"
    assert format_point([0.5, 0.25]) == "[0.500, 0.250]"


@pytest.mark.parametrize(
    "text, boxes, points, clipped, invalid",
    [
        ("[0.123, 0.456, 0.789, 0.900]", [[0.123, 0.456, 0.789, 0.9]], [], 0, 0),
        (
            "the dog [0.1,0.2,0.3,0.4] and the cat [0.5 , 0.6,0.7,  0.8].",
            [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]],
            [],
            0,
            0,
        ),
        ("it is at 0.1, 0.2, 0.3, 0.4 in the image", [[0.1, 0.2, 0.3, 0.4]], [], 0, 0),
        ("[0.1, 0.2, 0.3, 0.4", [[0.1, 0.2, 0.3, 0.4]], [], 0, 0),  # unclosed bracket
        ("<box>(0.1 0.2 0.3 0.4)</box>", [[0.1, 0.2, 0.3, 0.4]], [], 0, 0),
        ("[0.1,0.2,0.3,0.4;0.5,0.5,0.6,0.6]", [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6]], [], 0, 0),  # Shikra's ;
        ("point [0.5, .25] here", [], [[0.5, 0.25]], 0, 0),
        ("[-0.2, 0.1, 1.5, 0.9]", [[0.0, 0.1, 1.0, 0.9]], [], 2, 0),
        ("[12, 40, 100, 200]", [[1.0, 1.0, 1.0, 1.0]], [], 4, 0),  # pixels, not normalised: clipped and counted
        ("[0.5, 0.5, 0.2, 0.9]", [], [], 0, 1),  # xmax < xmin
        ("[0.1, 0.2, 0.3]", [], [], 0, 1),
        ("[3]", [], [], 0, 1),
        ("there are 3 circles and [none] in box2", [], [], 0, 0),  # lone numbers and words are prose
        ("no coordinates at all", [], [], 0, 0),
        ("[0.1, 0.2, 0.3, 0.4] then 0.5, 0.6", [[0.1, 0.2, 0.3, 0.4]], [[0.5, 0.6]], 0, 0),
    ],
)
def test_parse_coordinates_is_robust_and_counts(text, boxes, points, clipped, invalid):
    parsed = parse_coordinates(text)
    assert parsed.boxes == boxes
    assert parsed.points == points
    assert (parsed.num_clipped, parsed.num_invalid) == (clipped, invalid)
    assert (parsed.num_boxes, parsed.num_points) == (len(boxes), len(points))


def test_format_then_parse_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x0, x1 = np.sort(rng.random(2))
        y0, y1 = np.sort(rng.random(2))
        assert np.allclose(parse_coordinates(format_box([x0, y0, x1, y1])).boxes[0], [x0, y0, x1, y1], atol=5e-4)


@pytest.mark.parametrize(
    "box, match",
    [
        ([0.5, 0.2, 0.1, 0.4], "xmin <= xmax"),
        ([0.1, 0.2, 0.3], "needs 4 values"),
        ([0.5, 0.5], "a point is"),
        ([0.1, 0.2, 1.3, 0.4], "in \\[0, 1\\]"),
        ([0.1, float("nan"), 0.3, 0.4], "finite"),
        ("0.1, 0.2, 0.3, 0.4", "sequence"),
    ],
)
def test_format_box_rejects_bad_boxes(box, match):
    with pytest.raises(ValueError, match=match):
        format_box(box)


# ---------------------------------------------------------------------------------------------------------------------
# Geometry: every transform, round trips and the real image processors' pixels
# ---------------------------------------------------------------------------------------------------------------------


def clip(shortest: int = 64, crop: int = 64):
    return CLIPImageProcessorPil(size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop})


# (name, image processor, pad_to_square done by the caller, original (height, width))
CASES = [
    ("identity", None, False, (50, 80)),
    ("clip_resize_crop_wide", clip(), False, (200, 300)),
    ("clip_resize_crop_tall", clip(), False, (301, 157)),
    ("clip_crop_larger_than_image", clip(shortest=33, crop=40), False, (90, 61)),
    ("fixed_size", SiglipImageProcessorPil(size={"height": 48, "width": 40}), False, (120, 70)),
    (
        "shortest_and_longest_edge",
        SiglipImageProcessorPil(size={"shortest_edge": 40, "longest_edge": 60}),
        False,
        (50, 200),
    ),
    ("max_height_width", SiglipImageProcessorPil(size={"max_height": 50, "max_width": 70}), False, (90, 100)),
    (
        "llava_pad_to_square",
        LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        False,
        (90, 150),
    ),
    ("caller_pad_to_square", SiglipImageProcessorPil(size={"height": 64, "width": 64}), True, (150, 91)),
    ("anyres_base_view", BridgeAnyResImageProcessor(size={"height": 32, "width": 32}), False, (45, 100)),
]
CASE_IDS = [case[0] for case in CASES]


def visible_box(geometry: ImageGeometry, rng: np.random.Generator, margin: float = 0.0) -> list[float]:
    """A random box in original pixels that the model sees whole (inside the crop, if any), `margin` model pixels
    away from the edges of the image content it sees."""
    fresh = ImageGeometry(geometry.image_processor, geometry.image_size, pad_to_square=geometry.pad_to_square)
    seen = fresh.to_original([0, 0, 1, 1])
    model = np.multiply(fresh.to_model(seen), fresh.model_size[::-1] * 2)
    per_pixel = (np.subtract(seen[2:], seen[:2]) / np.subtract(model[2:], model[:2])) * margin  # original px, (x, y)
    x0, x1 = np.sort(rng.uniform(seen[0] + per_pixel[0], seen[2] - per_pixel[0], 2))
    y0, y1 = np.sort(rng.uniform(seen[1] + per_pixel[1], seen[3] - per_pixel[1], 2))
    return [float(x0), float(y0), float(x1), float(y1)]


@pytest.mark.parametrize("name, image_processor, pad, size", CASES, ids=CASE_IDS)
def test_round_trip_of_every_transform(name, image_processor, pad, size):
    geometry = ImageGeometry(image_processor, size, pad_to_square=pad or None)
    rng = np.random.default_rng(len(name))
    height, width = size
    for _ in range(30):
        box = visible_box(geometry, rng)
        normalised = geometry.to_model(box)
        assert all(0 <= value <= 1 for value in normalised)
        assert np.allclose(geometry.to_original(normalised), box, atol=1e-9)
        # Through the text a model reads and writes, to one pixel.
        written = parse_coordinates(format_box(normalised)).boxes[0]
        assert np.abs(np.subtract(geometry.to_original(written), box)).max() <= 1.0
        point = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
        assert np.allclose(geometry.point_to_original(geometry.point_to_model(point)), point, atol=1e-9)
    assert geometry.num_clipped == 0
    whole = geometry.to_original([0, 0, 1, 1])  # clipped to the image where the model frame holds padding
    assert whole[2] <= width and whole[3] <= height
    assert geometry.num_clipped == int(
        name in ("clip_crop_larger_than_image", "llava_pad_to_square", "caller_pad_to_square")
    )


def rectangle_image(size: tuple[int, int], box: list[float]) -> Image.Image:
    """A black image of `size` (height, width) with a white rectangle filling `box` (whole pixels, exclusive end)."""
    image = Image.new("RGB", (size[1], size[0]), "black")
    x0, y0, x1, y1 = (round(value) for value in box)
    ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), fill="white")
    return image


def find_rectangle(pixels: np.ndarray, image_processor) -> list[float]:
    """`[xmin, ymin, xmax, ymax]` (model pixels, sub-pixel) of the white rectangle on black in `(C, H, W)` pixels.

    A threshold finds it roughly; then, along the row and the column through its middle, each pixel's share of white
    (resampling blurs the edges) is summed: the sum is the rectangle's extent and the weighted mean its centre. That
    is accurate to a fraction of a pixel, so a geometry one pixel off fails.
    """
    channel = np.asarray(pixels, dtype=np.float64)[0]
    mean, std = image_processor.image_mean[0], image_processor.image_std[0]
    black, white = (0 - mean) / std, (1 - mean) / std
    share = np.clip((channel - black) / (white - black), 0, 1)
    mask = share > 0.75  # above LLaVA's grey padding
    rows, columns = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    rough = [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]
    edges = []
    for profile, low, high in (
        (share[(rough[1] + rough[3]) // 2], rough[0], rough[2]),
        (share[:, (rough[0] + rough[2]) // 2], rough[1], rough[3]),
    ):
        window = np.arange(max(low - 2, 0), min(high + 2, profile.shape[0]))
        weights = profile[window]
        extent, centre = weights.sum(), ((window + 0.5) * weights).sum() / weights.sum()
        edges.append((centre - extent / 2, centre + extent / 2))
    return [edges[0][0], edges[1][0], edges[0][1], edges[1][1]]


def pad_to_square(image: Image.Image) -> Image.Image:
    """LLaVA-1.5's expand2square, as a caller would do it before the image processor."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (127, 127, 127))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


@pytest.mark.parametrize("name, image_processor, pad, size", CASES[1:], ids=CASE_IDS[1:])
def test_geometry_matches_the_real_image_processor(name, image_processor, pad, size):
    geometry = ImageGeometry(image_processor, size, pad_to_square=pad or None)
    rng = np.random.default_rng(len(name) + 1)
    checked = 0
    for _ in range(6):
        box = [float(round(value)) for value in visible_box(geometry, rng, margin=3)]
        if box[2] - box[0] < 8 or box[3] - box[1] < 8:  # too thin to survive downscaling as a clear rectangle
            continue
        image = rectangle_image(size, box)
        pixel_values = image_processor(pad_to_square(image) if pad else image, return_tensors="np")["pixel_values"][0]
        if geometry.is_anyres:
            pixel_values = pixel_values[0]  # the base view
        model_height, model_width = geometry.model_size
        assert pixel_values.shape[-2:] == (model_height, model_width)
        expected = np.multiply(geometry.to_model(box), [model_width, model_height] * 2)
        found = find_rectangle(pixel_values, image_processor)
        assert np.abs(np.subtract(found, expected)).max() <= 0.25, (box, found, expected, geometry)
        checked += 1
    assert checked >= 2


def test_anyres_canvas_matches_the_tiles():
    image_processor = BridgeAnyResImageProcessor(size={"height": 32, "width": 32})
    size, box = (45, 100), [20.0, 10.0, 70.0, 35.0]
    geometry = ImageGeometry(image_processor, size)
    tiles = image_processor(rectangle_image(size, box), return_tensors="np")["pixel_values"][0]
    canvas_height, canvas_width = geometry.canvas_size
    rows, columns = canvas_height // 32, canvas_width // 32
    canvas = np.zeros((3, canvas_height, canvas_width))
    for index in range(rows * columns):
        row, column = divmod(index, columns)
        canvas[:, row * 32 : (row + 1) * 32, column * 32 : (column + 1) * 32] = tiles[1 + index]
    expected = np.multiply(geometry.to_canvas(box), [canvas_width, canvas_height] * 2)
    assert np.abs(np.subtract(find_rectangle(canvas, image_processor), expected)).max() <= 0.25
    # The base view is the whole image: normalising against the original size.
    assert geometry.to_model(box) == [0.2, 10 / 45, 0.7, 35 / 45]


def test_a_box_cut_by_the_center_crop_is_clipped_and_counted():
    geometry = ImageGeometry(clip(), (200, 300))  # resized to 64x96, the crop keeps x 50..250 of the original
    assert geometry.to_model([0, 50, 100, 150]) == [0.0, 0.25, 0.25, 0.75]
    assert geometry.num_clipped == 1
    with pytest.raises(ValueError, match="partly outside"):
        geometry.to_model([0, 50, 100, 150], strict=True)
    with pytest.raises(ValueError, match="entirely outside"):
        geometry.to_model([0, 50, 40, 150])
    with pytest.raises(ValueError, match="outside what the model sees"):
        geometry.point_to_model([10, 100])


def test_a_predicted_box_on_padding_is_clipped_to_the_image_and_counted():
    geometry = ImageGeometry(SiglipImageProcessorPil(size={"height": 64, "width": 64}), (50, 100), pad_to_square=True)
    assert geometry.to_original([0.0, 0.0, 1.0, 1.0]) == [0.0, 0.0, 100.0, 50.0]
    assert geometry.num_clipped == 1


@pytest.mark.parametrize(
    "box, match",
    [
        ([10, 10, 5, 20], "xmin <= xmax"),
        ([10, 10, 20], "needs 4 values"),
        ([10, 10], "a point is"),
        ([10, 10, 120, 20], "outside the 100x50"),
        ([-1, 10, 20, 20], "outside the 100x50"),
    ],
)
def test_geometry_rejects_bad_boxes(box, match):
    with pytest.raises(ValueError, match=match):
        ImageGeometry(None, (50, 100)).to_model(box)


def test_geometry_refuses_what_it_cannot_know():
    with pytest.raises(ValueError, match="has its own"):
        ImageGeometry(ConvNextImageProcessorPil(), (50, 50))
    assert ImageGeometry(ConvNextImageProcessorPil(), (50, 50), allow_unknown_processor=True).model_size
    with pytest.raises(ValueError, match="pads images to a square itself"):
        ImageGeometry(LlavaImageProcessorPil(do_pad=True), (50, 80), pad_to_square=False)
    with pytest.raises(ValueError, match="depends on the batch"):
        ImageGeometry(SiglipImageProcessorPil(do_pad=True), (50, 80))
    with pytest.raises(ValueError, match="height, width"):
        ImageGeometry(None, None)
    with pytest.raises(ValueError, match="any-res"):
        ImageGeometry(None, (50, 80)).to_canvas([0, 0, 10, 10])


# ---------------------------------------------------------------------------------------------------------------------
# Region prompts
# ---------------------------------------------------------------------------------------------------------------------


def make_processor(image_processor=None) -> BridgeProcessor:
    return BridgeProcessor(image_processor or clip(), make_tokenizer(), num_image_tokens=2)


def region_chat(entry: dict, image_entry: dict | None = None) -> list[dict]:
    image = [image_entry or {"type": "image"}]
    text = {"type": "text", "text": "what is in the region?"}
    return [{"role": "user", "content": image + [text, entry]}]


def test_format_region_uses_the_model_frame():
    processor = make_processor()
    image = Image.new("RGB", (300, 200))  # CLIP: the crop keeps x 50..250
    assert processor.format_region([100, 50, 200, 150], image) == "<box>[0.250, 0.250, 0.750, 0.750]</box>"
    assert processor.format_region([150, 100], (200, 300), kind="point", tags=False) == "[0.500, 0.500]"
    with pytest.raises(ValueError, match="a point is"):
        processor.format_region([150, 100], image)


def test_region_entries_render_through_the_chat_template():
    processor = make_processor()
    image = Image.new("RGB", (300, 200))
    messages = region_chat({"type": "box", "box": [100, 50, 200, 150], "image_index": 0})
    text = processor.apply_chat_template(messages, processor_kwargs={"images": [image]})
    assert text.endswith("user: <image>\nwhat is in the region?<box>[0.250, 0.250, 0.750, 0.750]</box>\n")
    # The image inside the entry, and Shikra's bare brackets.
    messages = region_chat({"type": "point", "point": [150, 100], "tags": False}, {"type": "image", "image": image})
    assert "region?[0.500, 0.500]" in processor.apply_chat_template(messages)
    assert messages[0]["content"][2]["type"] == "point"  # the caller's messages are left as they were
    # Batched, tokenized, with the images of each conversation.
    batch = [region_chat({"type": "box", "box": [0, 0, 300, 200]}), region_chat({"type": "box", "box": [0, 0, 8, 8]})]
    out = processor.apply_chat_template(
        batch,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"images": [[image], [Image.new("RGB", (8, 8))]], "return_tensors": "pt"},
    )
    assert out["pixel_values"].shape[0] == 2


def test_region_entries_bad_input_names_the_fix():
    processor = make_processor()
    image = Image.new("RGB", (300, 200))
    no_image = [{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "box", "box": [0, 0, 1, 1]}]}]
    with pytest.raises(ValueError, match="needs the image it points into"):
        processor.apply_chat_template(no_image)
    with pytest.raises(ValueError, match="where a box .* is expected"):
        processor.apply_chat_template(
            region_chat({"type": "box", "box": [10, 10]}), processor_kwargs={"images": [image]}
        )
    with pytest.raises(ValueError, match="image 0 is not available"):
        processor.apply_chat_template(region_chat({"type": "box", "box": [0, 0, 10, 10]}))
    with pytest.raises(ValueError, match="outside the 300x200"):
        processor.apply_chat_template(
            region_chat({"type": "box", "box": [0, 0, 400, 10]}), processor_kwargs={"images": [image]}
        )
    two_images = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "box", "box": [0, 0, 1, 1]}]}
    ]
    with pytest.raises(ValueError, match="say which with 'image_index'"):
        render_region_entries(two_images, [image, image], processor.image_geometry)
    with pytest.raises(ValueError, match="image_index 3"):
        render_region_entries(
            region_chat({"type": "box", "box": [0, 0, 1, 1], "image_index": 3}), [image], processor.image_geometry
        )
