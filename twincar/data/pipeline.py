"""The input pipeline: one choice, ``data.pipeline``, validated once.

=============  ============================================================================================
``files``      DataLoader workers decode the image files (large JPEGs at reduced size) and transform them.
``cache``      workers read a pre-resized decoded copy (``data.cache_format=raw|jpeg``, built once).
``gpu_decode`` workers only read the JPEG bytes; each batch is decoded, cropped and transformed on the GPU.
``gpu_cache``  the raw cache is held in GPU memory; nothing is read from disk after the first batch.
``stream``     LitData shards (``data.stream``: a folder or ``s3://``), packed once; workers decode and transform.
=============  ============================================================================================

The flags it replaced (``data.cache``, ``data.decode_device``, ``data.cache_on_device``) are gone: setting one, on
the command line or in a run's ``config.yaml``, is a :class:`PipelineError` naming the ``data.pipeline`` to use
instead (a null value, which run directories written before had, means unset and is ignored).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from twincar.errors import TwinCarError

PIPELINES = ("files", "cache", "gpu_decode", "gpu_cache", "stream")
READS_CACHE = ("cache", "gpu_cache")  # pipelines that read the pre-resized copy (built in prepare_data)
ON_DEVICE = ("gpu_decode", "gpu_cache")  # pipelines whose per-image work runs on the training device
# the removed flags and the pipeline each asked for
REMOVED = {"cache": "cache", "decode_device": "gpu_decode", "cache_on_device": "gpu_cache"}


class PipelineError(TwinCarError, ValueError):
    """An input-pipeline choice that does not exist, contradicts another option, or uses a removed flag."""


def check_pipeline(pipeline: str = "files", *, cache_format: str = "raw", stream: str | None = None) -> str:
    """``pipeline`` once checked against :data:`PIPELINES`, ``cache_format`` and ``stream`` (the shards
    ``data.pipeline=stream`` reads); :class:`PipelineError` if not."""
    if pipeline not in PIPELINES:
        raise PipelineError(f"data.pipeline={pipeline} is not one of {', '.join(PIPELINES)}")
    if pipeline == "stream" and not stream:
        raise PipelineError("data.pipeline=stream reads packed shards: set data.stream=DIR_OR_URL (written by "
                            "python -m twincar.cache pack out=DIR)")
    if pipeline == "gpu_cache" and cache_format != "raw":
        raise PipelineError("data.pipeline=gpu_cache holds the raw image cache: set data.cache_format=raw")
    return pipeline


def refuse_removed_flags(options: Mapping[str, object]) -> None:
    """A :class:`PipelineError` naming the ``data.pipeline`` to use when ``options`` (data config keys) sets one
    of the removed flags to anything but null."""
    for flag, value in options.items():
        if flag in REMOVED and value is not None:
            raise _removed(flag, value)


def refuse_removed_overrides(overrides: Iterable[str]) -> None:
    """A :class:`PipelineError` naming the ``data.pipeline`` to use when a command-line override sets one of the
    removed flags (``data.cache=true``, ``+data.cache=true``): checked before Hydra composes the config, where a key
    that no longer exists would only be "not in struct"."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("data.") and key[len("data."):] in REMOVED:
            raise _removed(key[len("data."):], value)


def _removed(flag: str, value: object) -> PipelineError:
    off = str(value).lower() in ("false", "0", "cpu", "null", "none", "")  # the flag asked for no special pipeline
    value = str(value).lower() if isinstance(value, bool) else value  # as YAML and the command line write it
    given = f"data.{flag}={value}" if value != "" else f"data.{flag}"
    return PipelineError(f"{given} was removed: use data.pipeline={'files' if off else REMOVED[flag]} "
                         f"(one of {', '.join(PIPELINES)})")
