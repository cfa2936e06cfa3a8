"""Import the reference's few-shot files `split_fewshot/shot_{K}-seed_{S}.pkl` without unpickling arbitrary classes.

Those files are pickles of {"train": [Datum, ...], "val": [Datum, ...]} where `Datum` is the Dassl toolkit's record
class (`dassl.data.datasets.base_dataset.Datum`, state `_impath`, `_label`, `_domain`, `_classname`) and the paths are
absolute paths of the machine that wrote them. A restricted unpickler resolves that one class to a stand-in, accepts
the few helpers that pickle protocols 0 and 1 emit for plain objects, and refuses every other global before anything
is called. Paths are rebased onto the user's data root: the part after the dataset's image folder is kept.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from fastprompt.data.items import FolderGuard, Item, path_text
from fastprompt.errors import FastPromptError, brief, one_line

if TYPE_CHECKING:
    from fastprompt.data.registry import DatasetSpec

TOOLKIT_RECORD = ("dassl.data.datasets.base_dataset", "Datum")
RECORD_FIELDS = ("_impath", "_label", "_domain", "_classname")


class ToolkitDatum:
    """Stand-in for the toolkit's `Datum`: holds the pickled state, runs no code of the pickle's choosing."""

    impath: str = ""
    label: int = 0
    domain: int = 0
    classname: str = ""

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not set(state) <= set(RECORD_FIELDS):
            raise pickle.UnpicklingError(f"unexpected Datum state {type(state).__name__}")
        impath, label = state.get("_impath", ""), state.get("_label", 0)
        domain, classname = state.get("_domain", 0), state.get("_classname", "")
        # the toolkit writes str, int, int, str; nothing is converted (str() of a list nested 100000 deep recurses)
        if not (isinstance(impath, str) and type(label) is int and label >= 0 and type(domain) is int
                and isinstance(classname, str)):  # fmt: skip
            raise pickle.UnpicklingError(
                f"a Datum state {brief(state)} is not (path text, label >= 0, domain, class name text)"
            )
        self.impath, self.label, self.domain, self.classname = impath, label, domain, classname


def _reconstruct(cls: type, base: type, state: object) -> ToolkitDatum:
    """Protocol 0/1's `copyreg._reconstructor`, limited to creating a `ToolkitDatum`."""
    if cls is not ToolkitDatum or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor with arguments other than (Datum, object, None)")
    return ToolkitDatum()


_ALLOWED = {
    TOOLKIT_RECORD: ToolkitDatum,
    ("copyreg", "_reconstructor"): _reconstruct,
    ("copy_reg", "_reconstructor"): _reconstruct,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that knows only the toolkit's record class and plain containers."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_restricted(path: Path) -> object:
    """Unpickle `path` allowing only the toolkit's `Datum` and plain containers.

    Raises:
        FastPromptError: the file is missing, is no pickle, holds a malformed Datum, or references any other global
            (nothing of it is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FastPromptError(f"Expected the few-shot file '{path}'; check the path (or sample the subsets instead).")
    try:
        return RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as error:  # only the allow-list's code runs: whatever fails here is the file's content
        raise FastPromptError(
            f"Refused '{path}': {one_line(error)}; only the toolkit's Datum records and plain containers are read, "
            f"never code."
        ) from None


def rebase_key(impath: str, dataset_dir: str, image_dir: str) -> str:
    """The part of an absolute toolkit path after the dataset's image folder, with forward slashes.

    `/home/a/data/oxford_pets/images/x/abyssinian_1.jpg` with ("oxford_pets", "images") -> `x/abyssinian_1.jpg`.
    The pair (dataset folder, image folder) is searched first, then the image folder's name alone (last occurrence).

    Raises:
        FastPromptError: the image folder's name does not occur in the path.
    """
    pure = PureWindowsPath(impath) if "\\" in impath else PurePosixPath(impath)
    parts = pure.parts
    anchor = (dataset_dir, *PurePosixPath(image_dir).parts) if image_dir not in ("", ".") else (dataset_dir,)
    for start in range(len(parts) - len(anchor), -1, -1):
        if tuple(parts[start : start + len(anchor)]) == anchor:
            return "/".join(parts[start + len(anchor) :])
    if anchor[-1] in parts:
        last = len(parts) - 1 - parts[::-1].index(anchor[-1])
        return "/".join(parts[last + 1 :])
    raise FastPromptError(
        f"The path {brief(impath)} does not contain the image folder '{'/'.join(anchor)}' to rebase on."
    )


def records_to_items(records: object, image_root: Path, dataset_dir: str, image_dir: str, what: str) -> list[Item]:
    """Turn a list of toolkit records into items whose paths lie under `image_root`."""
    if not isinstance(records, list) or not all(isinstance(r, ToolkitDatum) for r in records):
        raise FastPromptError(f"{what} must be a list of the toolkit's Datum records.")
    items = []
    guard = FolderGuard(Path(image_root), what)
    for record in records:
        key = rebase_key(path_text(record.impath, what), dataset_dir, image_dir)
        items.append(Item(key=key, path=guard.path(key), label=record.label, classname=record.classname))
    return items


def fewshot_pkl_path(spec: DatasetSpec, root: Path, shots: int, seed: int) -> Path:
    """Where the reference caches a few-shot subset: `<root>/<dataset_dir>/split_fewshot/shot_K-seed_S.pkl`."""
    return Path(root) / spec.dataset_dir / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"


def import_fewshot_pkl(path: Path, spec: DatasetSpec, image_root: Path) -> tuple[list[Item], list[Item]]:
    """Read one reference few-shot file as (train items, val items), paths rebased under `image_root`.

    Args:
        path: the `shot_K-seed_S.pkl` file.
        spec: the dataset's registered spec (its folder and image folder names anchor the rebasing).
        image_root: the dataset's image folder on this machine.

    Returns:
        (train, val); val is empty when the file has none (the reference's ImageNet files).
    """
    content = load_restricted(path)
    if not isinstance(content, dict) or "train" not in content:
        raise FastPromptError(f"'{path}' must hold a dict with a 'train' list (and usually 'val').")
    train = records_to_items(content["train"], image_root, spec.dataset_dir, spec.image_dir, f"'train' of '{path}'")
    val = records_to_items(content.get("val", []), image_root, spec.dataset_dir, spec.image_dir, f"'val' of '{path}'")
    return train, val
