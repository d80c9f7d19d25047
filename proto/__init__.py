"""moemesh.proto: wire formats (`*.proto`), their generated stubs, the codec, transports and the status-code map.

Importing this package makes sure the generated stubs exist and are newer than their `.proto` (see `build.py`), so
an editable checkout works right after a `.proto` edit or a clean clone.
"""

from moemesh.proto.build import ensure_stubs as _ensure_stubs

_ensure_stubs()
