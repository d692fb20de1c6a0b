"""The run-config section for compression (``upload-codec``, ``download-codec``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sepal.config import ConfigError, parse_section


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    upload_codec: str = dataclasses.field(default="dense", metadata={
        "help": "Codec chain for client-to-server updates, e.g. `dense`, `q8`, "
                "`topk:0.01,ef,q8,zlib` (see Compression)."})
    download_codec: str = dataclasses.field(default="dense", metadata={
        "help": "Codec chain for the global model's deltas sent to the sites (no `ef`)."})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CompressionConfig:
        return parse_section(cls, values)

    @property
    def downlink_compressed(self) -> bool:
        return self.download_codec != "dense"

    def validate(self) -> None:
        from sepal.codecs.chain import parse_chain

        parse_chain(self.upload_codec, "upload-codec")
        download = parse_chain(self.download_codec, "download-codec")
        if download.error_feedback:
            raise ConfigError("run config 'download-codec': leave out 'ef': the server already "
                              "carries what a delta did not send into the next one (it keeps "
                              "the reference model the clients hold)")
