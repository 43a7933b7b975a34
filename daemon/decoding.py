"""Frame payload -> image array, checked against the model geometry before any allocation.

Raw payloads become a zero-copy read-only view of the received message buffer. Encoded
payloads go through ``engines.decode.decode_bytes``, the decoder ``inspectd predict`` uses:
the size the image declares is read from its header (``engines.image_header``, over the
whole payload) and checked before a decoder allocates anything.
"""

from __future__ import annotations

import numpy as np

from daemon.protocol import Frame
from engines.decode import decode_bytes
from engines.errors import ImageError, InspectError
from engines.types import DTYPES, Geometry


def decode_frame(frame: Frame, geometry: Geometry) -> np.ndarray:
    """The frame's image in the model's geometry; InspectError("bad_frame", why) otherwise."""
    if frame.encoding == "raw":
        # protocol.parse_* already checked the length, so this is a view, never a copy.
        return np.frombuffer(frame.payload, dtype=DTYPES[geometry.dtype]).reshape(geometry.shape)
    try:
        return decode_bytes(frame.payload, frame.encoding, geometry, source=f"{frame.encoding} frame")
    except ImageError as exc:
        raise InspectError("bad_frame", str(exc)) from None
