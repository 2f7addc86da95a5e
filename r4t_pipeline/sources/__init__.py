"""Loaders from real public datasets into the generic catalog format (`r4t_pipeline.catalog`)."""

from r4t_pipeline.sources.djmix import load_djmix
from r4t_pipeline.sources.files import DataFileMissing, resolve_data_dir
from r4t_pipeline.sources.polyvore import load_polyvore

__all__ = ["DataFileMissing", "load_djmix", "load_polyvore", "resolve_data_dir"]
