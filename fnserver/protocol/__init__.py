"""The fnserver wire protocol, as the server sees it.

The codec lives in the client distribution (``fnclient.protocol``) so that ``pip install
./client`` needs nothing but msgpack and there is exactly one copy of it; the server imports it
from here, under the layer name the design uses. Same module objects, same exception classes.
"""

from __future__ import annotations

from fnclient.protocol import *  # noqa: F403
