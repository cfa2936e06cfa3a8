"""A generated vision-language world: coloured shapes on plain or textured backgrounds, deterministic from a seed.

A scene is one shape (circle, square, ...) of one colour and size at one position, drawn over a background that is a
plain colour or a two-tone texture (stripes, dots, checks, a grid, waves). Scenes are sampled as arrays (`Scenes`)
and rendered in batches with vectorised numpy masks, so tens of thousands of 64 px images take seconds.

Two versions of the world exist, each a `WorldSpec` (`WORLDS`): v1 (`shapes-world-v1`, the first shipped model's)
and v2 (`shapes-world-v2`): larger shapes near the centre, so that the protocol's random crops keep most of the object,
and a fine-grained attribute, the fill (solid or hollow: an outline with the background showing inside), that the
captions name only rarely. v1 is drawn exactly as before (v2's extra draws happen only in v2), so its data and its
checkpoint stay reproducible.

Everything is a pure function of a `numpy.random.Generator`: the same seed gives bit-identical scenes, images and
captions. A world's version string names it; a new version is needed whenever sampling or rendering changes, since a
checkpoint records the version it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

DATA_VERSION = "shapes-world-v1"
DATA_VERSION_V2 = "shapes-world-v2"
IMAGE_SIZE = 64

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}
# Background colours are dull, so that every shape colour stands out against every background.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (125, 125, 125),
    "brown": (110, 75, 45),
    "beige": (210, 195, 160),
    "teal": (30, 105, 110),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "grid", "wavy")
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Shape radius in pixels (of a 64 px image) for each size word, as [low, high).
# Shapes are large and near the centre: a from-scratch tiny ViT (16 px patches) learns their outlines in minutes on a
# CPU, while 6-9 px shapes anywhere in the image took it far longer than the pretraining budget.
SIZE_RADII: tuple[tuple[float, float], ...] = ((11.0, 15.0), (15.0, 19.0), (19.0, 24.0))
CENTRE_JITTER = 8.0  # pixels the centre may move from the image centre in x and y

SHAPE_COLOUR_NAMES = tuple(SHAPE_COLOURS)
BACKGROUND_COLOUR_NAMES = tuple(BACKGROUND_COLOURS)
FILLS: tuple[str, ...] = ("solid", "hollow")


@dataclass(frozen=True)
class WorldSpec:
    """The geometry and attributes of one version of the world.

    Attributes:
        version: the data version recorded with datasets and checkpoints.
        size_radii: shape radius in pixels (of a 64 px image) per size word, as [low, high).
        centre_jitter: pixels the shape's centre may move from the image centre in x and y.
        hollow_probability: probability that a shape is drawn hollow (0: the world has no fill attribute, and no
            fill is drawn from the generator).
        outline_fraction: a hollow shape keeps the ring between its outline and the same shape scaled by this.
    """

    version: str
    size_radii: tuple[tuple[float, float], ...] = SIZE_RADII
    centre_jitter: float = CENTRE_JITTER
    hollow_probability: float = 0.0
    outline_fraction: float = 0.6

    @property
    def has_fill(self) -> bool:
        """Whether scenes of this world have the solid/hollow attribute."""
        return self.hollow_probability > 0.0


WORLD_V1 = WorldSpec(DATA_VERSION)
# v2: shapes cover most of the image (radius 19-29 px of 64, centre within 3 px), so that RandomResizedCrop at scale
# 0.08-1 mostly lands on the object, as crops of real photographs do; half the shapes are hollow.
WORLD_V2 = WorldSpec(
    DATA_VERSION_V2, size_radii=((19.0, 22.5), (22.5, 26.0), (26.0, 29.0)), centre_jitter=3.0, hollow_probability=0.5
)
WORLDS: dict[str, WorldSpec] = {"v1": WORLD_V1, "v2": WORLD_V2}


def _regular_polygon(corners: int, start_degrees: float, radius: float = 1.0) -> np.ndarray:
    angles = np.deg2rad(start_degrees + np.arange(corners) * 360.0 / corners)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = np.deg2rad(-90.0 + np.arange(2 * points) * 180.0 / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(half_width: float = 0.32, reach: float = 0.95) -> np.ndarray:
    w, r = half_width, reach
    return np.array(
        [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w)]
        + [
            (-r, -w),
            (-w, -w),
        ]
    )


# Polygon outlines in unit coordinates (x right, y down), centred on the shape's centre.
POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
    "triangle": _regular_polygon(3, -90.0) + np.array([0.0, 0.15]),
    "star": _star(),
    "cross": _cross(),
    "diamond": np.array([(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]),
    "hexagon": _regular_polygon(6, 0.0, 0.95),
}


@dataclass
class Scenes:
    """A batch of N scenes as parallel arrays (indices into the module's attribute tuples).

    Attributes:
        shape: (N,) index into SHAPES.
        colour: (N,) index into SHAPE_COLOURS.
        size: (N,) index into SIZES.
        radius: (N,) shape radius in pixels.
        centre: (N, 2) shape centre (x, y) in pixels.
        rotation: (N,) small rotation in radians (never enough to turn a square into a diamond).
        texture: (N,) index into TEXTURES.
        background: (N,) index into BACKGROUND_COLOURS (the texture's first tone).
        texture_period: (N,) texture period in pixels.
        texture_phase: (N, 2) texture offset in pixels.
        texture_light: (N,) whether the texture's second tone is lighter (True) or darker than the first.
        hollow: (N,) bool, whether the shape is drawn as an outline; None in a world without fills (v1).
    """

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    radius: np.ndarray
    centre: np.ndarray
    rotation: np.ndarray
    texture: np.ndarray
    background: np.ndarray
    texture_period: np.ndarray
    texture_phase: np.ndarray
    texture_light: np.ndarray
    hollow: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.shape)

    def subset(self, index: np.ndarray | slice) -> Scenes:
        """The scenes at `index`, as a new `Scenes`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Scenes(**{name: None if value is None else value[index] for name, value in values.items()})


def _fix(drawn: np.ndarray, fixed: np.ndarray | int | None) -> np.ndarray:
    if fixed is None:
        return drawn
    return np.broadcast_to(np.asarray(fixed, dtype=np.int64), drawn.shape).copy()


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    shape: np.ndarray | int | None = None,
    colour: np.ndarray | int | None = None,
    texture: np.ndarray | int | None = None,
    background: np.ndarray | int | None = None,
    image_size: int = IMAGE_SIZE,
    world: WorldSpec = WORLD_V1,
    hollow: np.ndarray | bool | None = None,
) -> Scenes:
    """Sample `n` scenes; every attribute is uniform unless fixed (an index, or an (n,) array of indices).

    Args:
        rng: the generator that makes this deterministic.
        n: number of scenes.
        shape, colour, texture, background: fixed attribute indices (scalar or (n,)), or None for uniform.
        image_size: image side in pixels (radii scale with it).
        world: the world's geometry and attributes (v1 by default).
        hollow: fixed fill (scalar or (n,) bool) in a world with fills, or None for random.

    Returns:
        The sampled `Scenes`. The draws happen in a fixed order, so fixing an attribute changes only that attribute;
        a world's extra attributes are drawn after all of v1's, so v1's scenes are the same as before they existed.
    """
    scale = image_size / IMAGE_SIZE
    shapes = rng.integers(0, len(SHAPES), size=n)
    colours = rng.integers(0, len(SHAPE_COLOURS), size=n)
    textures = rng.integers(0, len(TEXTURES), size=n)
    backgrounds = rng.integers(0, len(BACKGROUND_COLOURS), size=n)
    shapes, colours = _fix(shapes, shape), _fix(colours, colour)
    textures, backgrounds = _fix(textures, texture), _fix(backgrounds, background)
    sizes = rng.integers(0, len(SIZES), size=n)
    low = np.array([r[0] for r in world.size_radii])[sizes]
    high = np.array([r[1] for r in world.size_radii])[sizes]
    radius = rng.uniform(low, high) * scale
    jitter = np.maximum(np.minimum(world.centre_jitter * scale, image_size / 2 - radius - 1.0), 0.0)[:, None]
    centre = image_size / 2 + rng.uniform(-1.0, 1.0, size=(n, 2)) * jitter
    scenes = Scenes(
        shape=shapes,
        colour=colours,
        size=sizes,
        radius=radius,
        centre=centre,
        rotation=rng.uniform(-0.2, 0.2, size=n),
        texture=textures,
        background=backgrounds,
        texture_period=rng.uniform(6.0, 11.0, size=n) * scale,
        texture_phase=rng.uniform(0.0, 12.0, size=(n, 2)) * scale,
        texture_light=rng.random(n) < 0.5,
    )
    if world.has_fill:
        drawn = rng.random(n) < world.hollow_probability
        scenes.hollow = drawn if hollow is None else np.broadcast_to(np.asarray(hollow, dtype=bool), (n,)).copy()
    return scenes


def _polygon_mask(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for every pixel: u, v (n, H, W) unit coordinates -> (n, H, W) bool."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        inside ^= crosses & (u < (x2 - x1) * (v - y1) / (y2 - y1) + x1)
    return inside


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if name == "circle":
        return u * u + v * v <= 0.9**2
    if name == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.15  # the implicit heart curve, y up, scaled to the unit disc
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    return _polygon_mask(u, v, POLYGONS[name])


def _texture_pattern(name: str, x: np.ndarray, y: np.ndarray, period: np.ndarray) -> np.ndarray:
    if name == "striped":
        return np.floor((x + y) / period) % 2 == 0
    if name == "dotted":
        dx, dy = x % period - period / 2, y % period - period / 2
        return dx * dx + dy * dy <= (0.28 * period) ** 2
    if name == "checkered":
        return (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    if name == "grid":
        return (x % period < 1.6) | (y % period < 1.6)
    if name == "wavy":
        return np.floor((y + 2.5 * np.sin(x * 2 * np.pi / (1.7 * period))) / (0.6 * period)) % 2 == 0
    return np.zeros(x.shape, dtype=bool)  # plain


def _texture_mask(scenes: Scenes, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(n, H, W) bool: where the texture's second tone goes."""
    mask = np.zeros(xs.shape, dtype=bool)
    for index, name in enumerate(TEXTURES):
        members = np.flatnonzero(scenes.texture == index)
        if name == "plain" or not len(members):
            continue
        period = scenes.texture_period[members, None, None].astype(np.float32)
        x = xs[members] + scenes.texture_phase[members, 0, None, None].astype(np.float32)
        y = ys[members] + scenes.texture_phase[members, 1, None, None].astype(np.float32)
        mask[members] = _texture_pattern(name, x, y, period)
    return mask


def render(
    scenes: Scenes, rng: np.random.Generator, image_size: int = IMAGE_SIZE, outline_fraction: float = 0.6
) -> np.ndarray:
    """Draw the scenes.

    Args:
        scenes: N scenes.
        rng: generator for colour jitter and pixel noise (deterministic with the seed).
        image_size: image side in pixels.
        outline_fraction: a hollow shape is its mask minus the same shape scaled by this (`WorldSpec`).

    Returns:
        (N, image_size, image_size, 3) uint8 RGB images.
    """
    n = len(scenes)
    grid_y, grid_x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    xs = np.broadcast_to(grid_x, (n, image_size, image_size))
    ys = np.broadcast_to(grid_y, (n, image_size, image_size))

    base = np.array(list(BACKGROUND_COLOURS.values()), dtype=np.float32)[scenes.background]
    base = base + rng.uniform(-10, 10, size=(n, 3)).astype(np.float32)
    towards = np.where(scenes.texture_light[:, None], np.float32(255), np.float32(0))
    second = base + 0.4 * (towards - base)
    texture = _texture_mask(scenes, xs, ys)[..., None]
    image = np.where(texture, second[:, None, None, :], base[:, None, None, :])

    rotation, radius = scenes.rotation.astype(np.float32), scenes.radius.astype(np.float32)[:, None, None]
    centre = scenes.centre.astype(np.float32)
    cos, sin = np.cos(rotation)[:, None, None], np.sin(rotation)[:, None, None]
    rel_x = (xs - centre[:, 0, None, None]) / radius
    rel_y = (ys - centre[:, 1, None, None]) / radius
    u, v = cos * rel_x + sin * rel_y, -sin * rel_x + cos * rel_y
    shape_mask = np.zeros((n, image_size, image_size), dtype=bool)
    hollow = scenes.hollow if scenes.hollow is not None else np.zeros(n, dtype=bool)
    for index, name in enumerate(SHAPES):
        members = np.flatnonzero(scenes.shape == index)
        if len(members):
            shape_mask[members] = _shape_mask(name, u[members], v[members])
        outlined = np.flatnonzero((scenes.shape == index) & hollow)
        if len(outlined):
            inner = _shape_mask(name, u[outlined] / outline_fraction, v[outlined] / outline_fraction)
            shape_mask[outlined] &= ~inner
    colour = np.array(list(SHAPE_COLOURS.values()), dtype=np.float32)[scenes.colour]
    colour = colour + rng.uniform(-15, 15, size=(n, 3)).astype(np.float32)
    image = np.where(shape_mask[..., None], colour[:, None, None, :], image)
    image += 6.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def position_word(scenes: Scenes, image_size: int = IMAGE_SIZE) -> list[str]:
    """Where each shape sits: "in the center", "on the left", "on the right", "at the top" or "at the bottom"."""
    offset = scenes.centre - image_size / 2
    words = []
    for dx, dy in offset:
        if max(abs(dx), abs(dy)) < image_size / 8:
            words.append("in the center")
        elif abs(dx) >= abs(dy):
            words.append("on the left" if dx < 0 else "on the right")
        else:
            words.append("at the top" if dy < 0 else "at the bottom")
    return words
