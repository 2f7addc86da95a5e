"""The one registry of fan-out methods: name -> how the report names it and which assets it retrieves with
(besides the catalog's embedding index). Light (no torch), so that the CLI can validate a method name fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    title: str                 # as the report's tables print it
    assets: tuple[str, ...]    # what it needs besides the index (CATALOG_ASSETS per catalog, others per regime)


METHODS = {m.name: m for m in (
    Method("no_fanout", "No fan-out", ()),
    Method("zero_shot", "Zero-shot fan-out", ("folm_base",)),
    Method("best_of_n", "Best-of-N", ("folm_base",)),
    Method("r4t_folm", "R4T-FOLM", ("folm_checkpoint",)),
    Method("r4t_diffusion", "R4T-Diffusion", ("diffusion_checkpoint",)),
    Method("supervised_diffusion", "Supervised set diffusion", ("supervised_diffusion",)),
)}
CATALOG_ASSETS = ("folm_base", "supervised_diffusion")  # one per catalog, shared by its regimes
ALIASES = {"diffusion": "r4t_diffusion", "folm": "r4t_folm"}
FANOUT_METHODS = tuple(name for name in METHODS if name != "no_fanout")  # the ones that can also keep the query
KEPT_QUERY = "+query"  # suffix of a method's key in the evaluation when the query was kept as one more direction
