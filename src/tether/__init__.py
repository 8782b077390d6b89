"""tether: session reliability for any TCP service.

The public API. The command line (``tether server``, ``tether client``, ``tether demo``)
is built on the same objects.
"""

from .aio.client import TetherClient, connect
from .aio.server import TetherServer
from .aio.service import ServiceStatistics
from .aio.stream import TetherStream
from .config import Address, ClientConfig, ServerConfig, parse_address
from .errors import InvalidState, ProtocolError, SessionClosed, TetherError
from .protocol.codes import CloseCode
from .protocol.session import SessionConfig, SessionStatistics

__version__ = "0.1.0"

__all__ = [
    "Address",
    "ClientConfig",
    "CloseCode",
    "InvalidState",
    "ProtocolError",
    "ServerConfig",
    "ServiceStatistics",
    "SessionClosed",
    "SessionConfig",
    "SessionStatistics",
    "TetherClient",
    "TetherError",
    "TetherServer",
    "TetherStream",
    "__version__",
    "connect",
    "parse_address",
]
