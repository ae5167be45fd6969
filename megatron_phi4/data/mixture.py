"""YAML mixture spec: which indexed datasets a pre-training stage reads, and with what weights.

Format (see docs/data.md)::

    sources:
      - name: web
        weight: 0.15
        paths: [/data/web/shard_00, /data/web/shard_01]     # indexed-dataset prefixes
      - name: code
        weight: 0.20
        min_document_tokens: 8192                            # optional long-document filter
        paths:
          - {path: /data/code/github, weight: 3}             # optional per-path weight
          - {path: /data/code/notebooks, weight: 1}

Source weights are relative (normalized to sum to 1). Within a source, paths without weights are
weighted by their token counts (after the document filter) -- i.e. as if concatenated; paths with
weights use those (all paths of a source must then have one). Validation errors name the file and
the field (``mix.yaml: sources[2].weight: must be positive, got 0``).

Only numpy/yaml are imported here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

__all__ = ["MixtureError", "MixturePath", "MixtureSource", "MixtureSpec"]


class MixtureError(ValueError):
    """A mixture spec is invalid; the message names the file and the field."""


@dataclass
class MixturePath:
    prefix: str
    weight: Optional[float] = None


@dataclass
class MixtureSource:
    name: str
    weight: float
    paths: List[MixturePath]
    min_document_tokens: int = 0

    @property
    def prefixes(self) -> List[str]:
        return [p.prefix for p in self.paths]


@dataclass
class MixtureSpec:
    sources: List[MixtureSource]
    file: Optional[str] = None
    description: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str, check_paths: bool = False) -> "MixtureSpec":
        path = str(path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise MixtureError(f"{path}: cannot read mixture spec: {e}") from None
        except yaml.YAMLError as e:
            raise MixtureError(f"{path}: invalid YAML: {e}") from None
        base = os.path.dirname(os.path.abspath(path))
        return cls.from_dict(data, file=path, base_dir=base, check_paths=check_paths)

    @classmethod
    def from_dict(cls, data: Any, file: Optional[str] = None, base_dir: Optional[str] = None,
                  check_paths: bool = False) -> "MixtureSpec":
        where = file or "<mixture>"

        def err(fld: str, msg: str) -> MixtureError:
            return MixtureError(f"{where}: {fld}: {msg}")

        if not isinstance(data, dict):
            raise err("<top>", f"expected a mapping with a 'sources' list, got {type(data).__name__}")
        unknown = set(data) - {"sources", "description", "name"}
        if unknown:
            raise err(sorted(unknown)[0], "unknown top-level key (allowed: sources, description, name)")
        raw = data.get("sources")
        if not isinstance(raw, list) or not raw:
            raise err("sources", "must be a non-empty list")
        sources: List[MixtureSource] = []
        names = set()
        for i, s in enumerate(raw):
            f = f"sources[{i}]"
            if not isinstance(s, dict):
                raise err(f, f"expected a mapping, got {type(s).__name__}")
            unknown = set(s) - {"name", "weight", "paths", "min_document_tokens"}
            if unknown:
                raise err(f"{f}.{sorted(unknown)[0]}",
                          "unknown key (allowed: name, weight, paths, min_document_tokens)")
            name = s.get("name")
            if not isinstance(name, str) or not name:
                raise err(f"{f}.name", f"must be a non-empty string, got {name!r}")
            if name in names:
                raise err(f"{f}.name", f"duplicate source name {name!r}")
            names.add(name)
            f = f"sources[{i}] ({name})"
            w = s.get("weight")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w != w \
                    or w == float("inf"):
                raise err(f"{f}.weight", f"must be a positive number, got {w!r}")
            mdt = s.get("min_document_tokens", 0)
            if isinstance(mdt, bool) or not isinstance(mdt, int) or mdt < 0:
                raise err(f"{f}.min_document_tokens", f"must be an integer >= 0, got {mdt!r}")
            rp = s.get("paths")
            if isinstance(rp, str):
                rp = [rp]
            if not isinstance(rp, list) or not rp:
                raise err(f"{f}.paths", "must be a non-empty list of dataset prefixes")
            paths: List[MixturePath] = []
            for j, p in enumerate(rp):
                pf = f"{f}.paths[{j}]"
                if isinstance(p, str):
                    mp = MixturePath(p)
                elif isinstance(p, dict):
                    unknown = set(p) - {"path", "weight"}
                    if unknown or "path" not in p:
                        raise err(pf, "expected {path: PREFIX, weight: W}")
                    pw = p.get("weight")
                    if pw is not None and (isinstance(pw, bool) or not isinstance(pw, (int, float))
                                           or not pw > 0 or pw == float("inf")):
                        raise err(f"{pf}.weight", f"must be a positive number, got {pw!r}")
                    if not isinstance(p["path"], str) or not p["path"]:
                        raise err(f"{pf}.path", f"must be a non-empty string, got {p['path']!r}")
                    mp = MixturePath(p["path"], None if pw is None else float(pw))
                else:
                    raise err(pf, f"expected a prefix string or a mapping, got {type(p).__name__}")
                mp.prefix = os.path.expanduser(os.path.expandvars(mp.prefix))
                if base_dir is not None and not os.path.isabs(mp.prefix):
                    mp.prefix = os.path.normpath(os.path.join(base_dir, mp.prefix))
                if check_paths:
                    missing = [mp.prefix + e for e in (".bin", ".idx")
                               if not os.path.exists(mp.prefix + e)]
                    if missing:
                        raise err(pf, f"indexed dataset not found: {', '.join(missing)}")
                paths.append(mp)
            has_w = [p.weight is not None for p in paths]
            if any(has_w) and not all(has_w):
                raise err(f"{f}.paths", "either every path of a source has a weight or none has")
            sources.append(MixtureSource(name, float(w), paths, int(mdt)))
        return cls(sources, file=file, description=data.get("description"))

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> List[str]:
        return [s.name for s in self.sources]

    def normalized_weights(self) -> List[float]:
        tot = sum(s.weight for s in self.sources)
        return [s.weight / tot for s in self.sources]

    def source(self, name: str) -> MixtureSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"{self.file or '<mixture>'}: no source named {name!r} "
                       f"(sources: {', '.join(self.names)})")

    def to_dict(self) -> Dict[str, Any]:
        return {"sources": [
            {"name": s.name, "weight": s.weight, "min_document_tokens": s.min_document_tokens,
             "paths": [{"path": p.prefix, "weight": p.weight} for p in s.paths]}
            for s in self.sources]}


def path_weights(source: MixtureSource, path_tokens: Sequence[int]) -> List[float]:
    """Relative weights of a source's paths (explicit, else proportional to token counts)."""
    if source.paths and source.paths[0].weight is not None:
        w = [p.weight for p in source.paths]
    else:
        w = [float(t) for t in path_tokens]
    tot = sum(w)
    if tot <= 0:
        raise MixtureError(f"source {source.name!r}: no tokens left in any of its paths "
                           f"(min_document_tokens={source.min_document_tokens})")
    return [x / tot for x in w]
