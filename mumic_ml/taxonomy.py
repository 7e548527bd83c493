"""The label taxonomy: class names and the text prompts that describe each class to the text tower.

File format (YAML)::

    prompts: ["a photo of {}.", "an image showing {}."]   # default templates, `{}` is the class name
    classes:
      - circle                                 # a bare name uses the default templates
      - name: red circle
        prompts: ["a picture with a red circle."]   # replaces the default templates for this class
        description: "a circle filled in red"        # added as one more prompt

Label matching is forgiving about spelling noise that annotation tools introduce but strict about meaning:
case and runs of whitespace are normalised (" Red  Circle" matches "red circle"); anything else must match a
class name exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mumic_ml.io import atomic_write_text

DEFAULT_PROMPTS: tuple[str, ...] = ("a photo of {}.",)


class TaxonomyError(ValueError):
    """The taxonomy file is missing, malformed or inconsistent."""


def normalise_label(label: str) -> str:
    """Lower-case and collapse whitespace, so labels exported by different tools compare equal."""
    return re.sub(r"\s+", " ", label.strip()).lower()


@dataclass(frozen=True)
class ClassSpec:
    name: str
    prompts: tuple[str, ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[ClassSpec, ...]
    default_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise TaxonomyError("taxonomy has no classes")
        index: dict[str, int] = {}
        for i, spec in enumerate(self.classes):
            key = normalise_label(spec.name)
            if not key:
                raise TaxonomyError(f"class #{i + 1} has an empty name")
            if key in index:
                raise TaxonomyError(
                    f"classes {self.classes[index[key]].name!r} and {spec.name!r} are the same after normalising "
                    "case and whitespace"
                )
            index[key] = i
        for template in self.default_prompts:
            _check_template(template, "default prompts")
        for spec in self.classes:
            for template in spec.prompts:
                _check_template(template, f"class {spec.name!r}")
        object.__setattr__(self, "_index", index)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def canonical(self, label: str) -> str | None:
        """The taxonomy's spelling of `label`, or None when it is not a class."""
        i = self._index.get(normalise_label(label))
        return None if i is None else self.classes[i].name

    def index_of(self, label: str) -> int:
        i = self._index.get(normalise_label(label))
        if i is None:
            raise KeyError(label)
        return i

    def prompts_for(self, spec: ClassSpec) -> list[str]:
        return class_prompts(spec.name, spec.prompts or self.default_prompts, spec.description)

    def all_prompts(self) -> list[list[str]]:
        return [self.prompts_for(c) for c in self.classes]

    def subset(self, names: Iterable[str]) -> Taxonomy:
        keep = {normalise_label(n) for n in names}
        return Taxonomy(tuple(c for c in self.classes if normalise_label(c.name) in keep), self.default_prompts)

    def to_dict(self) -> dict:
        classes: list[object] = []
        for c in self.classes:
            if not c.prompts and c.description is None:
                classes.append(c.name)
                continue
            entry: dict[str, object] = {"name": c.name}
            if c.prompts:
                entry["prompts"] = list(c.prompts)
            if c.description is not None:
                entry["description"] = c.description
            classes.append(entry)
        return {"prompts": list(self.default_prompts), "classes": classes}

    @classmethod
    def from_dict(cls, data: object, source: str = "taxonomy") -> Taxonomy:
        if not isinstance(data, dict):
            raise TaxonomyError(f"{source}: expected a mapping with a 'classes' list")
        unknown = set(data) - {"prompts", "classes"}
        if unknown:
            raise TaxonomyError(f"{source}: unknown keys {sorted(unknown)}")
        prompts = data.get("prompts", list(DEFAULT_PROMPTS))
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise TaxonomyError(f"{source}: 'prompts' must be a non-empty list of strings")
        raw_classes = data.get("classes")
        if not isinstance(raw_classes, list) or not raw_classes:
            raise TaxonomyError(f"{source}: 'classes' must be a non-empty list")
        specs = [_parse_class(entry, f"{source}: classes[{i}]") for i, entry in enumerate(raw_classes)]
        return cls(tuple(specs), tuple(prompts))

    @classmethod
    def from_names(cls, names: Sequence[str], prompts: Sequence[str] = DEFAULT_PROMPTS) -> Taxonomy:
        return cls(tuple(ClassSpec(n) for n in names), tuple(prompts))


def training_classes(taxonomy: Taxonomy, held_out: Sequence[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Names and prompts of the classes a model learns, and the canonical names of those held out for zero-shot."""
    held = []
    for name in held_out:
        canonical = taxonomy.canonical(name)
        if canonical is None:
            raise ValueError(f"train.held_out_classes names {name!r}, which is not in the taxonomy")
        held.append(canonical)
    kept = [spec for spec in taxonomy.classes if spec.name not in held]
    if not kept:
        raise ValueError("train.held_out_classes removes every class")
    return [s.name for s in kept], [taxonomy.prompts_for(s) for s in kept], held


def class_prompts(name: str, templates: Sequence[str], description: str | None = None) -> list[str]:
    """The texts that describe one class: every template filled with its name, plus its description."""
    texts = [t.format(name) if "{}" in t else t for t in templates]
    if description:
        texts.append(description)
    return texts


def _check_template(template: str, where: str) -> None:
    if not isinstance(template, str) or not template.strip():
        raise TaxonomyError(f"{where}: prompt templates must be non-empty strings")
    if template.count("{}") > 1 or re.search(r"\{(?!\})|(?<!\{)\}", template):
        raise TaxonomyError(f"{where}: prompt template {template!r} may contain only one '{{}}' placeholder")


def _parse_class(entry: object, where: str) -> ClassSpec:
    if isinstance(entry, str):
        return ClassSpec(entry.strip())
    if not isinstance(entry, dict) or "name" not in entry:
        raise TaxonomyError(f"{where}: expected a class name or a mapping with 'name'")
    unknown = set(entry) - {"name", "prompts", "description"}
    if unknown:
        raise TaxonomyError(f"{where}: unknown keys {sorted(unknown)}")
    name = entry["name"]
    if not isinstance(name, str):
        raise TaxonomyError(f"{where}: 'name' must be a string")
    prompts = entry.get("prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise TaxonomyError(f"{where}: 'prompts' must be a list of strings")
    description = entry.get("description")
    if description is not None and not isinstance(description, str):
        raise TaxonomyError(f"{where}: 'description' must be a string")
    return ClassSpec(name.strip(), tuple(prompts), description)


def load_taxonomy(path: str | Path) -> Taxonomy:
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"taxonomy file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TaxonomyError(f"{path}: not valid YAML: {exc}") from exc
    return Taxonomy.from_dict(data, source=str(path))


def save_taxonomy(taxonomy: Taxonomy, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(taxonomy.to_dict(), sort_keys=False, allow_unicode=True))
