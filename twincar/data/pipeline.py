"""The input pipeline: one choice, validated and resolved once, instead of interacting flags.

=============  ============================================================================================
``files``      DataLoader workers decode the image files (large JPEGs at reduced size) and transform them.
``cache``      workers read a pre-resized decoded copy (``data.cache_format=raw|jpeg``, built once).
``gpu_decode`` workers only read the JPEG bytes; each batch is decoded, cropped and transformed on the GPU.
``gpu_cache``  the raw cache is held in GPU memory; nothing is read from disk after the first batch.
=============  ============================================================================================

The older flags (``data.cache=true``, ``data.decode_device=cuda``, ``data.cache_on_device=true``) still work:
they name a pipeline too, and :func:`resolve_pipeline` turns them into one (or says, in one sentence, that
they contradict each other or ``data.pipeline``).
"""

from __future__ import annotations

from twincar.errors import TwinCarError

PIPELINES = ("files", "cache", "gpu_decode", "gpu_cache")
READS_CACHE = ("cache", "gpu_cache")  # pipelines that read the pre-resized copy (built in prepare_data)
ON_DEVICE = ("gpu_decode", "gpu_cache")  # pipelines whose per-image work runs on the training device
DECODE_DEVICES = ("cpu", "cuda")


class PipelineError(TwinCarError, ValueError):
    """An input-pipeline choice that does not exist or contradicts another option."""


def resolve_pipeline(
    pipeline: str = "files",
    *,
    cache: bool | None = None,
    decode_device: str | None = None,
    cache_on_device: bool | None = None,
    cache_format: str = "raw",
) -> str:
    """The one pipeline ``data.pipeline`` and the older flags ask for; :class:`PipelineError` when they disagree."""
    if pipeline not in PIPELINES:
        raise PipelineError(f"data.pipeline={pipeline} is not one of {', '.join(PIPELINES)}")
    if decode_device is not None and decode_device not in DECODE_DEVICES:
        raise PipelineError(f"data.decode_device={decode_device} is not one of {', '.join(DECODE_DEVICES)}")
    implied: dict[str, str] = {}  # older flag -> the pipeline it names
    if decode_device == "cuda":
        implied["data.decode_device=cuda"] = "gpu_decode"
    if cache_on_device:
        if not cache or cache_format != "raw":
            raise PipelineError("data.cache_on_device=true holds the raw image cache: it needs data.cache=true and "
                                "data.cache_format=raw (or use data.pipeline=gpu_cache)")
        implied["data.cache_on_device=true"] = "gpu_cache"
    elif cache:
        implied["data.cache=true"] = "cache"
    if "data.decode_device=cuda" in implied and cache:
        raise PipelineError("data.decode_device=cuda decodes the image files, data.cache=true reads the cache "
                            "instead: set one of them (data.cache_on_device=true for the cache on the GPU), or "
                            "choose one data.pipeline")
    named = set(implied.values())
    if len(named) > 1:
        raise PipelineError(f"{' and '.join(implied)} ask for different input pipelines: choose one data.pipeline")
    if named and pipeline != "files" and named != {pipeline}:
        raise PipelineError(f"data.pipeline={pipeline} and {next(iter(implied))} disagree: keep data.pipeline only")
    chosen = next(iter(named)) if named else pipeline
    if chosen == "gpu_cache" and cache_format != "raw":
        raise PipelineError("data.pipeline=gpu_cache holds the raw image cache: set data.cache_format=raw")
    return chosen
